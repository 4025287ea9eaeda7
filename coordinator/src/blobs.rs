//! Files jobs bring (TorchScript models), kept by content hash in
//! `<data_dir>/models/<hex>.pt`: a client uploads one in chunks, a job names
//! it `sha256:HEX`, workers fetch it in chunks. Written and read with async
//! file I/O, never under the state lock; an upload lands in a temporary file
//! renamed into place once its hash is known, so a reader never sees part
//! of a file.

use std::path::{Path, PathBuf};

use futures::{Stream, StreamExt};
use ringtrain_common::jobspec::BlobId;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes per chunk sent to workers (well under gRPC's 4 MiB message limit).
pub const CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("the model is larger than this coordinator accepts ({max} bytes, max_model_bytes)")]
    TooLarge { max: u64 },
    #[error("the upload is empty")]
    Empty,
    #[error("model {0} was not uploaded to this coordinator")]
    Unknown(BlobId),
    #[error("{0}")]
    Stream(tonic::Status),
    #[error("model store {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub struct BlobStore {
    dir: PathBuf,
    max_bytes: u64,
}

fn hex(id: &BlobId) -> String {
    id.to_string().trim_start_matches("sha256:").to_string()
}

impl BlobStore {
    pub fn new(dir: &Path, max_bytes: u64) -> Self {
        Self {
            dir: dir.to_path_buf(),
            max_bytes,
        }
    }

    fn io(&self, path: &Path) -> impl Fn(std::io::Error) -> BlobError {
        let path = path.to_path_buf();
        move |source| BlobError::Io {
            path: path.clone(),
            source,
        }
    }

    pub fn path(&self, id: &BlobId) -> PathBuf {
        self.dir.join(format!("{}.pt", hex(id)))
    }

    /// Deletes the models no job in `in_use` (`sha256:HEX` ids) names,
    /// except those stored within `grace` (uploaded for a submission that
    /// is still on its way). Blocking; returns how many went.
    pub fn collect_garbage(
        &self,
        in_use: &std::collections::HashSet<String>,
        grace: std::time::Duration,
    ) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(hex) = name.strip_suffix(".pt") else {
                continue;
            };
            let young = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_none_or(|age| age < grace);
            if young || in_use.contains(&format!("sha256:{hex}")) {
                continue;
            }
            if std::fs::remove_file(entry.path()).is_ok() {
                tracing::info!(model = %format!("sha256:{hex}"), "uploaded model deleted: no remembered job names it");
                removed += 1;
            }
        }
        removed
    }

    pub async fn contains(&self, id: &BlobId) -> bool {
        tokio::fs::metadata(self.path(id)).await.is_ok()
    }

    /// Stores what `chunks` carry; returns its id and size. A stream past
    /// the size limit is refused as soon as it crosses it.
    pub async fn put(
        &self,
        mut chunks: impl Stream<Item = Result<bytes::Bytes, tonic::Status>> + Unpin,
    ) -> Result<(BlobId, u64), BlobError> {
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(self.io(&self.dir))?;
        let tmp = self.dir.join(format!(
            ".upload-{}-{:016x}",
            std::process::id(),
            rand_suffix()
        ));
        let result = self.receive(&mut chunks, &tmp).await;
        let (id, size) = match result {
            Ok(v) => v,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
        };
        let path = self.path(&id);
        tokio::fs::rename(&tmp, &path)
            .await
            .map_err(self.io(&path))?;
        Ok((id, size))
    }

    async fn receive(
        &self,
        chunks: &mut (impl Stream<Item = Result<bytes::Bytes, tonic::Status>> + Unpin),
        tmp: &Path,
    ) -> Result<(BlobId, u64), BlobError> {
        let mut file = tokio::fs::File::create(tmp).await.map_err(self.io(tmp))?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(BlobError::Stream)?;
            size += chunk.len() as u64;
            if size > self.max_bytes {
                return Err(BlobError::TooLarge {
                    max: self.max_bytes,
                });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(self.io(tmp))?;
        }
        if size == 0 {
            return Err(BlobError::Empty);
        }
        file.sync_all().await.map_err(self.io(tmp))?;
        Ok((BlobId(hasher.finalize().into()), size))
    }

    /// The stored file in chunks of [`CHUNK`] bytes.
    pub async fn read(
        &self,
        id: &BlobId,
    ) -> Result<impl Stream<Item = Result<bytes::Bytes, BlobError>>, BlobError> {
        let path = self.path(id);
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BlobError::Unknown(*id))
            }
            Err(e) => return Err(self.io(&path)(e)),
        };
        let io = self.io(&path);
        Ok(futures::stream::unfold(
            (file, io, false),
            |(mut file, io, done)| async move {
                if done {
                    return None;
                }
                let mut buf = vec![0u8; CHUNK];
                let mut filled = 0;
                while filled < CHUNK {
                    match file.read(&mut buf[filled..]).await {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) => return Some((Err(io(e)), (file, io, true))),
                    }
                }
                if filled == 0 {
                    return None;
                }
                buf.truncate(filled);
                let last = filled < CHUNK;
                Some((Ok(bytes::Bytes::from(buf)), (file, io, last)))
            },
        ))
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(
        parts: &[&'static [u8]],
    ) -> impl Stream<Item = Result<bytes::Bytes, tonic::Status>> + Unpin {
        futures::stream::iter(
            parts
                .iter()
                .map(|p| Ok(bytes::Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
    }

    #[tokio::test]
    async fn a_file_is_kept_by_its_hash_and_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path(), 1 << 20);
        let (id, size) = store.put(chunks(&[b"hello ", b"world"])).await.unwrap();
        assert_eq!(size, 11);
        // sha256("hello world")
        assert_eq!(
            id.to_string(),
            "sha256:b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        );
        assert!(store.contains(&id).await);
        let back: Vec<u8> = store
            .read(&id)
            .await
            .unwrap()
            .map(|c| c.unwrap().to_vec())
            .concat()
            .await;
        assert_eq!(back, b"hello world");
        // No temporary left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[tokio::test]
    async fn uploads_past_the_limit_empty_ones_and_unknown_ids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path(), 8);
        let err = store.put(chunks(&[b"12345", b"67890"])).await.unwrap_err();
        assert!(matches!(err, BlobError::TooLarge { max: 8 }), "{err}");
        assert!(matches!(
            store.put(chunks(&[])).await,
            Err(BlobError::Empty)
        ));
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "nothing kept"
        );
        let unknown = BlobId([7; 32]);
        assert!(matches!(
            store.read(&unknown).await,
            Err(BlobError::Unknown(_))
        ));
    }
}
