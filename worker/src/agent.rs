//! The worker's own gRPC service, for the coordinator: a dry run of a job
//! (build its model and data here, run one forward) before the job is
//! accepted. One dry run at a time: a flood of submissions cannot make a
//! worker load many data sets at once.

use std::sync::{Arc, OnceLock};

use ringtrain_common::jobspec::JobSpec;
use ringtrain_common::security::CertRole;
use ringtrain_proto as pb;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

use crate::model_files::ModelFiles;

#[derive(Clone)]
pub struct AgentService {
    inner: Arc<Inner>,
}

struct Inner {
    /// Set once the worker has reached the coordinator (uploaded models
    /// come from there).
    files: OnceLock<Arc<ModelFiles>>,
    one_at_a_time: Semaphore,
}

impl Default for AgentService {
    fn default() -> Self {
        Self {
            inner: Arc::new(Inner {
                files: OnceLock::new(),
                one_at_a_time: Semaphore::new(1),
            }),
        }
    }
}

impl AgentService {
    pub fn set_model_files(&self, files: Arc<ModelFiles>) {
        let _ = self.inner.files.set(files);
    }

    pub fn into_server(self) -> pb::worker_agent_server::WorkerAgentServer<Self> {
        pb::worker_agent_server::WorkerAgentServer::new(self)
    }
}

#[tonic::async_trait]
impl pb::worker_agent_server::WorkerAgent for AgentService {
    async fn dry_run(
        &self,
        request: Request<pb::DryRunRequest>,
    ) -> Result<Response<pb::DryRunReply>, Status> {
        // Only the coordinator may make a worker load data and run a model.
        let transport = ringtrain_common::security::process_transport();
        ringtrain_common::security::tls::peer_is(&transport, &request, CertRole::Coordinator)
            .map_err(|_| {
                Status::permission_denied("dry runs take the coordinator's certificate")
            })?;
        let spec = JobSpec::parse(&request.into_inner().spec_toml, &[])
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let files = self.inner.files.get().cloned().ok_or_else(|| {
            Status::unavailable("this worker has not reached the coordinator yet")
        })?;
        let _turn = self
            .inner
            .one_at_a_time
            .acquire()
            .await
            .map_err(|_| Status::unavailable("shutting down"))?;
        let error = match files.get(&spec.model).await {
            Err(e) => e.to_string(),
            Ok(bytes) => {
                let run = tokio::task::spawn_blocking(move || {
                    crate::trainer::dry_run(&spec, bytes.as_deref().map(Vec::as_slice))
                });
                match run.await {
                    Ok(Ok(())) => String::new(),
                    Ok(Err(e)) => e.to_string(),
                    // libtorch errors surface as panics in parts of tch.
                    Err(e) => format!("the model failed on a batch: {}", crate::panic_message(e)),
                }
            }
        };
        Ok(Response::new(pb::DryRunReply { error }))
    }
}
