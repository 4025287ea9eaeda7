//! The TorchScript files jobs name: uploaded ones (`sha256:HEX`) fetched
//! from the coordinator in chunks and checked against their hash, or a path
//! on this worker. The last few are kept in memory, since every generation
//! of a job (and a dry run before it) needs the same file.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use ringtrain_common::jobspec::{BlobId, ModelSource};
use ringtrain_proto as pb;
use ringtrain_proto::worker_control_client::WorkerControlClient;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

/// Files kept in memory.
const KEEP: usize = 2;
/// The most bytes a fetch takes, whatever the coordinator sends.
const MAX_BYTES: usize = 4 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ModelFileError {
    #[error("model {id}: the coordinator says: {message}")]
    Fetch { id: BlobId, message: String },
    #[error("model {id}: the bytes received hash to {got}")]
    Corrupt { id: BlobId, got: BlobId },
    #[error("model {id}: more than {MAX_BYTES} bytes")]
    TooLarge { id: BlobId },
    #[error("model file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub type ModelBytes = Arc<Vec<u8>>;

pub struct ModelFiles {
    client: WorkerControlClient<Channel>,
    cache: Mutex<VecDeque<(BlobId, ModelBytes)>>,
}

impl ModelFiles {
    pub fn new(client: WorkerControlClient<Channel>) -> Self {
        Self {
            client,
            cache: Mutex::new(VecDeque::new()),
        }
    }

    fn cached(&self, id: &BlobId) -> Option<ModelBytes> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.iter().find(|(k, _)| k == id).map(|(_, v)| v.clone())
    }

    /// The bytes of the job's TorchScript file (None for a built-in model).
    pub async fn get(&self, source: &ModelSource) -> Result<Option<ModelBytes>, ModelFileError> {
        match source {
            ModelSource::Builtin(_) => Ok(None),
            ModelSource::ScriptFile(path) => tokio::fs::read(path)
                .await
                .map(|b| Some(Arc::new(b)))
                .map_err(|source| ModelFileError::Read {
                    path: path.clone(),
                    source,
                }),
            ModelSource::ScriptBlob(id) => {
                if let Some(bytes) = self.cached(id) {
                    return Ok(Some(bytes));
                }
                let bytes = Arc::new(self.fetch(id).await?);
                let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                cache.push_back((*id, bytes.clone()));
                while cache.len() > KEEP {
                    cache.pop_front();
                }
                Ok(Some(bytes))
            }
        }
    }

    async fn fetch(&self, id: &BlobId) -> Result<Vec<u8>, ModelFileError> {
        let failed = |s: tonic::Status| ModelFileError::Fetch {
            id: *id,
            message: s.message().to_string(),
        };
        let mut client = self.client.clone();
        let mut chunks = client
            .fetch_model(pb::FetchModelRequest {
                model: id.to_string(),
            })
            .await
            .map_err(failed)?
            .into_inner();
        let mut bytes = Vec::new();
        let mut hasher = Sha256::new();
        while let Some(chunk) = chunks.message().await.map_err(failed)? {
            if bytes.len() + chunk.data.len() > MAX_BYTES {
                return Err(ModelFileError::TooLarge { id: *id });
            }
            hasher.update(&chunk.data);
            bytes.extend_from_slice(&chunk.data);
        }
        let got = BlobId(hasher.finalize().into());
        if got != *id {
            return Err(ModelFileError::Corrupt { id: *id, got });
        }
        Ok(bytes)
    }
}
