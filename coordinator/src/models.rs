//! Models users bring: their upload and the workers' download (through the
//! [`BlobStore`]), and the check of a submission before it is accepted: its
//! uploaded model exists, and one worker builds it and runs one forward on
//! the job's data (a dry run), so a bad model is refused at submit time with
//! the reason rather than failing a running job.

use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use ringtrain_common::jobspec::{DataFormat, DeviceSpec, JobSpec, ModelSource};
use ringtrain_common::security::{CertRole, Transport};
use ringtrain_proto as pb;
use tonic::{Status, Streaming};
use tracing::{info, warn};

use crate::blobs::{BlobError, BlobStore};

/// How long a dry run may take on the worker (data loading included).
const DRY_RUN_TIMEOUT: Duration = Duration::from_secs(120);

fn status(e: BlobError) -> Status {
    match e {
        BlobError::TooLarge { .. } => Status::resource_exhausted(e.to_string()),
        BlobError::Empty => Status::invalid_argument(e.to_string()),
        BlobError::Unknown(_) => Status::not_found(e.to_string()),
        BlobError::Stream(s) => s,
        BlobError::Io { .. } => Status::unavailable(e.to_string()),
    }
}

pub async fn upload(
    blobs: &BlobStore,
    chunks: Streaming<pb::FileChunk>,
) -> Result<pb::UploadModelResponse, Status> {
    let (id, bytes) = blobs
        .put(chunks.map(|c| c.map(|c| c.data)))
        .await
        .map_err(status)?;
    info!(model = %id, bytes, "model uploaded");
    Ok(pb::UploadModelResponse {
        model: id.to_string(),
        bytes,
    })
}

pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::FileChunk, Status>> + Send>>;

pub async fn fetch(blobs: &BlobStore, model: &str) -> Result<ChunkStream, Status> {
    let id = model.parse().map_err(Status::invalid_argument)?;
    let chunks = blobs.read(&id).await.map_err(status)?;
    Ok(Box::pin(chunks.map(|c| {
        c.map(|data| pb::FileChunk { data }).map_err(status)
    })))
}

/// Whether a submission asks for more than the built-in models on IDX data
/// on the CPU (which the spec parser and the client already check).
fn needs_dry_run(spec: &JobSpec) -> bool {
    spec.model.is_script()
        || spec.dataset.format != DataFormat::Idx
        || spec.device != DeviceSpec::Cpu
        || !spec.init_from.is_empty()
        || !spec.freeze.is_empty()
        || !spec.reinit.is_empty()
}

/// Refuses a submission whose uploaded model is missing, or that a worker
/// (at `worker`, when one is alive) cannot build and run.
pub async fn check_submission(
    blobs: &BlobStore,
    spec: &JobSpec,
    worker: Option<String>,
    transport: &Transport,
) -> Result<(), Status> {
    if let ModelSource::ScriptBlob(id) = &spec.model {
        if !blobs.contains(id).await {
            return Err(Status::invalid_argument(format!(
                "model {id} was not uploaded to this coordinator (ringtrain submit uploads .pt files)"
            )));
        }
    }
    if !needs_dry_run(spec) {
        return Ok(());
    }
    let Some(addr) = worker else {
        info!("no live worker for a dry run: the job is checked when it starts");
        return Ok(());
    };
    match dry_run(&addr, spec, transport).await {
        Ok(reply) if reply.error.is_empty() => Ok(()),
        Ok(reply) => Err(Status::invalid_argument(reply.error)),
        Err(e) => {
            warn!(worker = %addr, error = %e, "dry run failed to run: the job is checked when it starts");
            Ok(())
        }
    }
}

async fn dry_run(
    addr: &str,
    spec: &JobSpec,
    transport: &Transport,
) -> Result<pb::DryRunReply, String> {
    // Over TLS the worker checks that this is the coordinator's certificate.
    let endpoint = transport
        .endpoint(addr, CertRole::Coordinator, Some(CertRole::Worker))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(DRY_RUN_TIMEOUT);
    let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
    let mut agent = pb::worker_agent_client::WorkerAgentClient::new(channel);
    agent
        .dry_run(pb::DryRunRequest {
            spec_toml: spec.to_toml(),
        })
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| s.message().to_string())
}
