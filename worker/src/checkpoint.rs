//! Checkpoints: a directory with
//! - `model.safetensors`: the model's state under its own names, trained and
//!   frozen parameters and buffers with their dtypes (what `state_dict()`
//!   holds in PyTorch: `module.load_state_dict(safetensors.torch.load_file(..))`
//!   takes it as it is);
//! - `optimizer.safetensors`: the optimizer's state, `<state>.<parameter>`
//!   (e.g. `momentum.f1.weight`, `exp_avg.f1.weight`), F32;
//! - `checkpoint.json`: where training stands.
//!
//! Each file is replaced atomically, the JSON last, and the JSON carries
//! hashes of the trained parameters and of the optimizer state, so a
//! checkpoint torn between the renames is detected on load.

use std::collections::HashMap;
use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ringtrain_common::data_plan::ShardCursor;
use ringtrain_common::ParamVersion;
use safetensors::tensor::TensorView;
use safetensors::{SafeTensorError, SafeTensors};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::model::{tensor_bytes, ParamLayout};
use crate::tensors::{dtype_of, kind_of};

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const META_FILE: &str = "checkpoint.json";

/// Where training stands, as `checkpoint.json` says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub job_id: String,
    pub param_version: ParamVersion,
    pub epoch: u64,
    pub shard_cursor: ShardCursor,
    pub model: String,
    /// Trained parameters (elements).
    pub num_params: usize,
    /// [`param_hash`] of the trained parameters.
    pub param_hash: u64,
    /// [`param_hash`] of the optimizer state, in its file's order (0 when none).
    #[serde(default)]
    pub optimizer_hash: u64,
    /// The job's spec (TOML): what rebuilds the model (`ringtrain generate`).
    #[serde(default)]
    pub spec: String,
}

/// Why a checkpoint (or a weights file) could not be written or read. Each
/// names the directory or file, and the tensor involved.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {}: {file} not found", dir.display())]
    NotFound { dir: PathBuf, file: &'static str },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a safetensors file: {source}", path.display())]
    Safetensors {
        path: PathBuf,
        #[source]
        source: SafeTensorError,
    },
    #[error("{}: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: tensor {name}: {problem}", path.display())]
    Tensor {
        path: PathBuf,
        name: String,
        problem: String,
    },
    /// The files disagree with each other or with the model.
    #[error("checkpoint {}: {what}", dir.display())]
    Inconsistent { dir: PathBuf, what: String },
}

/// xxh3-64 of f32 values' little-endian bytes: replicas that hash alike
/// hold bit-identical values.
pub fn param_hash(params: &[f32]) -> u64 {
    // Native byte order is little-endian on every target we build for.
    xxhash_rust::xxh3::xxh3_64(bytemuck::cast_slice(params))
}

/// [`param_hash`] fed in consecutive pieces (while each is still in cache):
/// the same hash as of the pieces joined.
#[derive(Default)]
pub struct ParamHasher(xxhash_rust::xxh3::Xxh3);

impl ParamHasher {
    pub fn update(&mut self, params: &[f32]) {
        self.0.update(bytemuck::cast_slice(params));
    }

    pub fn finish(&self) -> u64 {
        self.0.digest()
    }
}

/// Serializes named tensors (any dtype safetensors has) to safetensors bytes.
fn serialize(path: &Path, tensors: &[(String, Tensor)]) -> Result<Vec<u8>, CheckpointError> {
    let mut bytes = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let dtype = dtype_of(t.kind()).ok_or_else(|| CheckpointError::Tensor {
            path: path.to_owned(),
            name: name.clone(),
            problem: format!("dtype {:?} cannot be stored", t.kind()),
        })?;
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        bytes.push((name.clone(), dtype, shape, tensor_bytes(t)));
    }
    let views = bytes
        .iter()
        .map(|(name, dtype, shape, data)| {
            TensorView::new(*dtype, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|source| CheckpointError::Safetensors {
                    path: path.to_owned(),
                    source,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // What transformers-style loaders expect to find.
    let info = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::serialize(views, Some(info)).map_err(|source| CheckpointError::Safetensors {
        path: path.to_owned(),
        source,
    })
}

/// Every tensor of a safetensors file, as CPU tensors of its dtypes.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>, CheckpointError> {
    let bytes = fs::read(path).map_err(|source| CheckpointError::Io {
        path: path.to_owned(),
        source,
    })?;
    decode(path, &bytes)
}

fn decode(path: &Path, bytes: &[u8]) -> Result<HashMap<String, Tensor>, CheckpointError> {
    let st = SafeTensors::deserialize(bytes).map_err(|source| CheckpointError::Safetensors {
        path: path.to_owned(),
        source,
    })?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let kind = kind_of(view.dtype()).ok_or_else(|| CheckpointError::Tensor {
            path: path.to_owned(),
            name: name.clone(),
            problem: format!("dtype {:?} is not supported", view.dtype()),
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = crate::tensors::from_bytes(view.data(), &shape, kind).map_err(|problem| {
            CheckpointError::Tensor {
                path: path.to_owned(),
                name: name.clone(),
                problem,
            }
        })?;
        out.insert(name, t);
    }
    Ok(out)
}

/// The weights file `init_from` names: a .safetensors file, or a checkpoint
/// directory's model file.
pub fn weights_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(MODEL_FILE)
    } else {
        path.to_owned()
    }
}

/// Flattens the named F32 tensors of `layout` from `tensors`.
fn flatten(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    layout: &ParamLayout,
    prefix: &str,
) -> Result<Vec<f32>, CheckpointError> {
    let mut flat = vec![0f32; layout.total()];
    for spec in layout.params() {
        let name = format!("{prefix}{}", spec.name);
        let bad = |problem: String| CheckpointError::Tensor {
            path: path.to_owned(),
            name: name.clone(),
            problem,
        };
        let t = tensors.get(&name).ok_or_else(|| bad("missing".into()))?;
        if t.kind() != Kind::Float || t.size() != spec.shape {
            return Err(bad(format!(
                "is {:?} {:?}, expected Float {:?}",
                t.kind(),
                t.size(),
                spec.shape
            )));
        }
        t.copy_data(&mut flat[spec.range()], spec.len);
    }
    Ok(flat)
}

/// Everything a checkpoint holds.
#[derive(Debug)]
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    /// The trained parameters, flat in the layout's order.
    pub params: Vec<f32>,
    /// Every tensor of the model file, by its own name.
    pub model: HashMap<String, Tensor>,
    /// Optimizer state: (state name, flat over the layout).
    pub optimizer: Vec<(String, Vec<f32>)>,
}

/// Writes a checkpoint into `dir` (created if missing) and returns `dir`:
/// `state` (the model's named tensors, the trained ones as of `params`),
/// and the optimizer's state buffers, flat over `layout`.
pub fn save(
    dir: &Path,
    meta: &CheckpointMeta,
    state: &[(String, Tensor)],
    layout: &ParamLayout,
    params: &[f32],
    optimizer: &[(&str, &[f32])],
) -> Result<PathBuf, CheckpointError> {
    let inconsistent = |what: String| CheckpointError::Inconsistent {
        dir: dir.to_owned(),
        what,
    };
    let total = layout.total();
    if params.len() != total {
        return Err(inconsistent(format!(
            "{} parameters to save, the model has {total}",
            params.len()
        )));
    }
    if let Some((name, buf)) = optimizer.iter().find(|(_, b)| b.len() != total) {
        return Err(inconsistent(format!(
            "{} {name} values to save, the model has {total} parameters",
            buf.len()
        )));
    }
    fs::create_dir_all(dir).map_err(|source| CheckpointError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let model_path = dir.join(MODEL_FILE);
    atomic_write(dir, MODEL_FILE, &serialize(&model_path, state)?)?;
    let mut optim_tensors = Vec::new();
    let mut optim_flat: Vec<f32> = Vec::new();
    for (name, buf) in optimizer {
        for spec in layout.params() {
            let t = Tensor::from_slice(&buf[spec.range()]).view(spec.shape.as_slice());
            optim_tensors.push((format!("{name}.{}", spec.name), t));
        }
        optim_flat.extend_from_slice(buf);
    }
    let optim_path = dir.join(OPTIMIZER_FILE);
    atomic_write(
        dir,
        OPTIMIZER_FILE,
        &serialize(&optim_path, &optim_tensors)?,
    )?;
    let meta = CheckpointMeta {
        num_params: total,
        param_hash: param_hash(params),
        optimizer_hash: if optim_flat.is_empty() {
            0
        } else {
            param_hash(&optim_flat)
        },
        ..meta.clone()
    };
    let json = serde_json::to_vec_pretty(&meta).map_err(|source| CheckpointError::Json {
        path: dir.join(META_FILE),
        source,
    })?;
    atomic_write(dir, META_FILE, &json)?;
    Ok(dir.to_owned())
}

/// Only the metadata of the checkpoint in `dir`.
pub fn read_meta(dir: &Path) -> Result<CheckpointMeta, CheckpointError> {
    let bytes = read(dir, META_FILE)?;
    serde_json::from_slice(&bytes).map_err(|source| CheckpointError::Json {
        path: dir.join(META_FILE),
        source,
    })
}

/// Reads the checkpoint in `dir` for a model whose trained parameters are
/// `layout`, with optimizer state of the `optimizer_states` names.
pub fn load(
    dir: &Path,
    layout: &ParamLayout,
    optimizer_states: &[&str],
) -> Result<Checkpoint, CheckpointError> {
    let meta_path = dir.join(META_FILE);
    let meta_bytes = read(dir, META_FILE)?;
    let meta: CheckpointMeta =
        serde_json::from_slice(&meta_bytes).map_err(|source| CheckpointError::Json {
            path: meta_path,
            source,
        })?;
    let inconsistent = |what: String| CheckpointError::Inconsistent {
        dir: dir.to_owned(),
        what,
    };
    if meta.num_params != layout.total() {
        return Err(inconsistent(format!(
            "{META_FILE} has {} parameters (model {}), this model trains {}",
            meta.num_params,
            meta.model,
            layout.total()
        )));
    }
    let model_path = dir.join(MODEL_FILE);
    let model = decode(&model_path, &read(dir, MODEL_FILE)?)?;
    let params = flatten(&model_path, &model, layout, "")?;
    let hash = param_hash(&params);
    if hash != meta.param_hash {
        return Err(inconsistent(format!(
            "{MODEL_FILE} hashes to {hash:#018x}, {META_FILE} says {:#018x} (torn or mixed checkpoint)",
            meta.param_hash
        )));
    }
    let optim_path = dir.join(OPTIMIZER_FILE);
    let optim = decode(&optim_path, &read(dir, OPTIMIZER_FILE)?)?;
    let mut optimizer = Vec::new();
    let mut optim_flat = Vec::new();
    for name in optimizer_states {
        let prefix = format!("{name}.");
        if !optim.keys().any(|k| k.starts_with(&prefix)) {
            continue;
        }
        let flat = flatten(&optim_path, &optim, layout, &prefix)?;
        optim_flat.extend_from_slice(&flat);
        optimizer.push((name.to_string(), flat));
    }
    let optim_hash = if optim_flat.is_empty() {
        0
    } else {
        param_hash(&optim_flat)
    };
    if optim_hash != meta.optimizer_hash {
        return Err(inconsistent(format!(
            "{OPTIMIZER_FILE} does not match {META_FILE} (torn checkpoint, or another optimizer's)"
        )));
    }
    Ok(Checkpoint {
        meta,
        params,
        model,
        optimizer,
    })
}

fn read(dir: &Path, file: &'static str) -> Result<Vec<u8>, CheckpointError> {
    fs::read(dir.join(file)).map_err(|source| match source.kind() {
        ErrorKind::NotFound => CheckpointError::NotFound {
            dir: dir.to_owned(),
            file,
        },
        _ => CheckpointError::Io {
            path: dir.join(file),
            source,
        },
    })
}

/// Replaces `dir/file` with `bytes` via a synced temporary file and a rename,
/// so readers see the old file or the new one, never a partial one.
fn atomic_write(dir: &Path, file: &str, bytes: &[u8]) -> Result<(), CheckpointError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{file}.tmp-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, dir.join(file))
    };
    write().map_err(|source| {
        let _ = fs::remove_file(&tmp);
        CheckpointError::Io {
            path: dir.join(file),
            source,
        }
    })?;
    // Make the rename itself durable; best effort (not every filesystem allows it).
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use safetensors::Dtype;

    use super::*;

    fn layout() -> ParamLayout {
        ParamLayout::new([
            ("a.bias".to_owned(), vec![3]),
            ("a.weight".to_owned(), vec![3, 2]),
            ("b.weight".to_owned(), vec![2, 2, 1]),
        ])
    }

    fn meta() -> CheckpointMeta {
        CheckpointMeta {
            job_id: "job-1".into(),
            param_version: ParamVersion(17),
            epoch: 2,
            shard_cursor: ShardCursor {
                epoch: 2,
                position: 640,
            },
            model: "mlp".into(),
            num_params: 0,
            param_hash: 0,
            optimizer_hash: 0,
            spec: String::new(),
        }
    }

    fn values(n: usize, base: f32) -> Vec<f32> {
        (0..n).map(|i| base + i as f32 * 0.5).collect()
    }

    /// The model's state for flat `params`, plus an int buffer.
    fn state(l: &ParamLayout, params: &[f32]) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = l
            .params()
            .iter()
            .map(|p| {
                let t = Tensor::from_slice(&params[p.range()]).view(p.shape.as_slice());
                (p.name.clone(), t)
            })
            .collect();
        out.push(("bn.num_batches_tracked".into(), Tensor::from(41i64)));
        out
    }

    #[test]
    fn round_trip_with_and_without_optimizer_state() {
        let l = layout();
        assert_eq!(l.total(), 13);
        let params = values(13, -3.0);
        let mom = values(13, 100.0);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("nested/ckpt");
        let saved = save(
            &dir,
            &meta(),
            &state(&l, &params),
            &l,
            &params,
            &[("momentum", &mom)],
        );
        assert_eq!(saved.unwrap(), dir);
        let c = load(&dir, &l, &["momentum"]).unwrap();
        assert_eq!(c.params, params);
        assert_eq!(c.optimizer, [("momentum".to_string(), mom.clone())]);
        assert_eq!(c.model["bn.num_batches_tracked"].int64_value(&[]), 41);
        assert_eq!(c.model["bn.num_batches_tracked"].kind(), Kind::Int64);
        assert_eq!(c.meta.num_params, 13);
        assert_eq!(c.meta.param_hash, param_hash(&params));

        // Overwriting in place drops the momentum and leaves no temp files.
        let params2 = values(13, 7.0);
        save(&dir, &meta(), &state(&l, &params2), &l, &params2, &[]).unwrap();
        let c = load(&dir, &l, &["momentum"]).unwrap();
        assert_eq!((c.params, c.optimizer), (params2, vec![]));
        let mut names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [META_FILE, MODEL_FILE, OPTIMIZER_FILE]);
    }

    #[test]
    fn tensors_are_stored_under_their_names_shapes_and_dtypes() {
        let l = layout();
        let params = values(13, 0.0);
        let tmp = tempfile::tempdir().unwrap();
        save(
            tmp.path(),
            &meta(),
            &state(&l, &params),
            &l,
            &params,
            &[("exp_avg", &params)],
        )
        .unwrap();
        let bytes = fs::read(tmp.path().join(MODEL_FILE)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut names = st.names();
        names.sort();
        assert_eq!(
            names,
            ["a.bias", "a.weight", "b.weight", "bn.num_batches_tracked"]
        );
        let w = st.tensor("a.weight").unwrap();
        assert_eq!((w.dtype(), w.shape()), (Dtype::F32, &[3usize, 2][..]));
        assert_eq!(w.data(), bytemuck::cast_slice::<f32, u8>(&params[3..9]));
        assert_eq!(
            st.tensor("bn.num_batches_tracked").unwrap().dtype(),
            Dtype::I64
        );
        let bytes = fs::read(tmp.path().join(OPTIMIZER_FILE)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut names = st.names();
        names.sort();
        assert_eq!(
            names,
            ["exp_avg.a.bias", "exp_avg.a.weight", "exp_avg.b.weight"]
        );
    }

    #[test]
    fn missing_files_are_named() {
        let l = layout();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let e = load(dir, &l, &[]).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("checkpoint {}: checkpoint.json not found", dir.display())
        );
        let p = values(13, 0.0);
        save(dir, &meta(), &state(&l, &p), &l, &p, &[]).unwrap();
        fs::remove_file(dir.join(MODEL_FILE)).unwrap();
        let e = load(dir, &l, &[]).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("checkpoint {}: model.safetensors not found", dir.display())
        );
    }

    #[test]
    fn a_missing_or_misshapen_tensor_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let other = ParamLayout::new([
            ("a.bias".to_owned(), vec![3]),
            ("b.weight".to_owned(), vec![2, 2, 1]),
            ("c.weight".to_owned(), vec![6]),
        ]);
        let p = values(13, 0.0);
        save(dir, &meta(), &state(&other, &p), &other, &p, &[]).unwrap();
        let e = load(dir, &layout(), &[]).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: tensor a.weight: missing",
                dir.join(MODEL_FILE).display()
            )
        );
        let transposed = ParamLayout::new([
            ("a.bias".to_owned(), vec![3]),
            ("a.weight".to_owned(), vec![2, 3]),
            ("b.weight".to_owned(), vec![2, 2, 1]),
        ]);
        save(dir, &meta(), &state(&transposed, &p), &transposed, &p, &[]).unwrap();
        let e = load(dir, &layout(), &[]).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: tensor a.weight: is Float [2, 3], expected Float [3, 2]",
                dir.join(MODEL_FILE).display()
            )
        );
    }

    #[test]
    fn other_model_sizes_and_torn_checkpoints_are_refused() {
        let l = layout();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let p0 = values(13, 0.0);
        save(dir, &meta(), &state(&l, &p0), &l, &p0, &[]).unwrap();
        let bigger = ParamLayout::new([("a.bias".to_owned(), vec![14])]);
        let e = load(dir, &bigger, &[]).unwrap_err().to_string();
        assert!(
            e.ends_with("checkpoint.json has 13 parameters (model mlp), this model trains 14"),
            "{e}"
        );

        // New tensors, old JSON: as if a crash fell between the renames.
        let json = fs::read(dir.join(META_FILE)).unwrap();
        let p1 = values(13, 1.0);
        save(dir, &meta(), &state(&l, &p1), &l, &p1, &[]).unwrap();
        fs::write(dir.join(META_FILE), &json).unwrap();
        let e = load(dir, &l, &[]).unwrap_err().to_string();
        assert!(e.contains("torn or mixed checkpoint"), "{e}");
        // Optimizer state from another save.
        save(dir, &meta(), &state(&l, &p1), &l, &p1, &[("momentum", &p0)]).unwrap();
        let json = fs::read(dir.join(META_FILE)).unwrap();
        save(dir, &meta(), &state(&l, &p1), &l, &p1, &[("momentum", &p1)]).unwrap();
        fs::write(dir.join(META_FILE), json).unwrap();
        let e = load(dir, &l, &["momentum"]).unwrap_err().to_string();
        assert!(e.contains("optimizer.safetensors does not match"), "{e}");

        let p12 = values(12, 0.0);
        let e = save(dir, &meta(), &[], &l, &p12, &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with("12 parameters to save, the model has 13"),
            "{e}"
        );
    }

    #[test]
    fn corrupt_files_name_the_file() {
        let l = layout();
        let tmp = tempfile::tempdir().unwrap();
        let p = values(13, 0.0);
        save(tmp.path(), &meta(), &state(&l, &p), &l, &p, &[]).unwrap();
        fs::write(tmp.path().join(META_FILE), b"{").unwrap();
        let e = load(tmp.path(), &l, &[]).unwrap_err().to_string();
        assert!(e.contains("checkpoint.json: "), "{e}");
        let junk = tmp.path().join("junk.safetensors");
        fs::write(&junk, b"\x01\x00\x00\x00\x00\x00\x00\x00{").unwrap();
        let e = read_safetensors(&junk).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}: not a safetensors file", junk.display())),
            "{e}"
        );
    }

    #[test]
    fn param_hash_sees_every_bit() {
        let a = values(1000, 0.0);
        let mut b = a.clone();
        assert_eq!(param_hash(&a), param_hash(&b));
        b[999] = f32::from_bits(b[999].to_bits() ^ 1);
        assert_ne!(param_hash(&a), param_hash(&b));
        // Pinned: the hash is over the little-endian f32 bytes.
        let mut bytes = Vec::new();
        for v in &a {
            bytes.extend(v.to_le_bytes());
        }
        assert_eq!(param_hash(&a), xxhash_rust::xxh3::xxh3_64(&bytes));
    }

    #[test]
    fn param_hash_in_pieces_is_the_whole_hash() {
        let a = values(300_000, 0.5);
        for piece in [1, 7, 4096, 65_536, 300_000] {
            let mut h = ParamHasher::default();
            for part in a.chunks(piece) {
                h.update(part);
            }
            assert_eq!(h.finish(), param_hash(&a), "pieces of {piece}");
        }
    }

    mod props {
        use std::sync::OnceLock;

        use proptest::prelude::*;

        use super::*;

        /// One good checkpoint's files (with optimizer state), written once:
        /// each case corrupts a copy.
        fn good_files() -> &'static [(&'static str, Vec<u8>)] {
            static FILES: OnceLock<Vec<(&'static str, Vec<u8>)>> = OnceLock::new();
            FILES.get_or_init(|| {
                let l = layout();
                let tmp = tempfile::tempdir().unwrap();
                let p = values(13, -1.0);
                let mom = values(13, 3.0);
                save(
                    tmp.path(),
                    &meta(),
                    &state(&l, &p),
                    &l,
                    &p,
                    &[("momentum", &mom)],
                )
                .unwrap();
                [META_FILE, MODEL_FILE, OPTIMIZER_FILE]
                    .into_iter()
                    .map(|f| (f, fs::read(tmp.path().join(f)).unwrap()))
                    .collect()
            })
        }

        /// How a file is damaged.
        #[derive(Clone, Debug)]
        enum Damage {
            /// Cut to this share of its length (always shorter).
            Truncate(f64),
            /// XOR these bytes in at these shares of its length.
            Flip(Vec<(f64, u8)>),
            /// Replaced by these bytes.
            Replace(Vec<u8>),
            /// With these bytes appended.
            Append(Vec<u8>),
        }

        fn damage() -> impl Strategy<Value = Damage> {
            prop_oneof![
                (0.0f64..1.0).prop_map(Damage::Truncate),
                prop::collection::vec((0.0f64..1.0, 1u8..), 1..8).prop_map(Damage::Flip),
                prop::collection::vec(any::<u8>(), 0..512).prop_map(Damage::Replace),
                prop::collection::vec(any::<u8>(), 1..64).prop_map(Damage::Append),
            ]
        }

        fn apply(bytes: &[u8], d: &Damage) -> Vec<u8> {
            let at = |share: f64| ((bytes.len() as f64 * share) as usize).min(bytes.len() - 1);
            match d {
                Damage::Truncate(share) => bytes[..at(*share)].to_vec(),
                Damage::Flip(flips) => {
                    let mut out = bytes.to_vec();
                    for &(share, x) in flips {
                        out[at(share)] ^= x;
                    }
                    out
                }
                Damage::Replace(junk) => junk.clone(),
                Damage::Append(junk) => [bytes, junk].concat(),
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn a_damaged_checkpoint_is_an_error_never_a_panic(which in 0usize..3, d in damage()) {
                let files = good_files();
                let tmp = tempfile::tempdir().unwrap();
                for (i, (name, bytes)) in files.iter().enumerate() {
                    let bytes = if i == which { apply(bytes, &d) } else { bytes.clone() };
                    fs::write(tmp.path().join(name), bytes).unwrap();
                }
                let loaded = load(tmp.path(), &layout(), &["momentum"]);
                match &d {
                    // A cut file never passes for a whole one.
                    Damage::Truncate(_) => prop_assert!(loaded.is_err()),
                    // Tensor bytes are covered by the hashes in the JSON.
                    Damage::Flip(_) | Damage::Replace(_) if which != 0 => {
                        if let Ok(c) = &loaded {
                            prop_assert_eq!(c.meta.param_hash, param_hash(&c.params));
                        }
                    }
                    _ => {}
                }
                if let Err(e) = &loaded {
                    prop_assert!(!e.to_string().is_empty());
                }
                let _ = read_meta(tmp.path());
                let _ = read_safetensors(&tmp.path().join(files[which].0));
            }

            #[test]
            fn any_bytes_as_a_weights_file_are_an_error_never_a_panic(bytes in prop::collection::vec(any::<u8>(), 0..1024), header in prop::collection::vec(any::<u8>(), 0..200)) {
                // With a well-formed length prefix, so the header parser
                // sees the bytes too.
                let mut file = (header.len() as u64).to_le_bytes().to_vec();
                file.extend(&header);
                file.extend(&bytes);
                let json = serde_json::from_slice::<serde_json::Value>(&header);
                let decoded = decode(Path::new("x"), &file);
                prop_assert!(json.is_ok() || decoded.is_err());
                let _ = decode(Path::new("x"), &bytes);
            }
        }

        #[test]
        fn forged_headers_are_errors() {
            let forge = |json: &str, data: &[u8]| {
                let mut file = (json.len() as u64).to_le_bytes().to_vec();
                file.extend(json.as_bytes());
                file.extend(data);
                decode(Path::new("forged.safetensors"), &file)
            };
            for json in [
                // A shape far larger than the data.
                r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}}"#,
                // Dimensions whose product overflows.
                r#"{"w":{"dtype":"F32","shape":[18446744073709551615,2],"data_offsets":[0,8]}}"#,
                // Offsets past the end, and backwards.
                r#"{"w":{"dtype":"U8","shape":[4],"data_offsets":[0,400]}}"#,
                r#"{"w":{"dtype":"U8","shape":[0],"data_offsets":[4,0]}}"#,
                // A dtype libtorch has no kind for.
                r#"{"w":{"dtype":"F8_E4M3","shape":[4],"data_offsets":[0,4]}}"#,
            ] {
                assert!(forge(json, &[0; 8]).is_err(), "{json}");
            }
            assert!(forge(
                r#"{"w":{"dtype":"U8","shape":[2,2],"data_offsets":[0,4]}}"#,
                &[1; 4]
            )
            .is_ok());
        }
    }

    /// PyTorch reads both files.
    #[test]
    fn pytorch_can_load_it() {
        let python = concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python");
        let has_it = std::process::Command::new(python)
            .args(["-c", "from safetensors.torch import load_file"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !has_it
            && ringtrain_common::testing::skip(&format!(
                "{python} lacks safetensors (scripts/env.sh installs it)"
            ))
        {
            return;
        }
        let l = layout();
        let tmp = tempfile::tempdir().unwrap();
        let p = values(13, 0.0);
        save(
            tmp.path(),
            &meta(),
            &state(&l, &p),
            &l,
            &p,
            &[("momentum", &values(13, 1.0))],
        )
        .unwrap();
        let script = "import sys; from safetensors.torch import load_file\n\
            t = load_file(sys.argv[1] + '/model.safetensors')\n\
            assert t['a.weight'].shape == (3, 2) and t['a.weight'].dtype.is_floating_point\n\
            assert t['a.weight'][1, 0].item() == 2.5, t['a.weight']\n\
            assert t['bn.num_batches_tracked'].item() == 41\n\
            o = load_file(sys.argv[1] + '/optimizer.safetensors')\n\
            assert o['momentum.b.weight'].shape == (2, 2, 1)\n\
            print(len(t), len(o))";
        let out = std::process::Command::new(python)
            .args(["-c", script])
            .arg(tmp.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "4 3");
    }
}
