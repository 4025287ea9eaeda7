//! Checkpoints: a directory with `model.safetensors` (one F32 tensor per
//! parameter under its layout name, plus `momentum.<name>` for the optimizer
//! state; loadable by `safetensors.torch.load_file`) and `checkpoint.json`
//! (where training stands). Each file is replaced atomically, the JSON last,
//! and the JSON carries a hash of the parameters, so a checkpoint torn between
//! the two renames is detected on load.

use std::collections::HashMap;
use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ringtrain_common::data_plan::ShardCursor;
use ringtrain_common::ParamVersion;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::model::ParamLayout;

pub const MODEL_FILE: &str = "model.safetensors";
pub const META_FILE: &str = "checkpoint.json";
const MOMENTUM_PREFIX: &str = "momentum.";

/// Where training stands, as `checkpoint.json` says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub job_id: String,
    pub param_version: ParamVersion,
    pub epoch: u64,
    pub shard_cursor: ShardCursor,
    pub model: String,
    pub num_params: usize,
    /// [`param_hash`] of the parameters in `model.safetensors`.
    pub param_hash: u64,
}

/// Why a checkpoint could not be written or read. Each names the checkpoint
/// directory, and the file or tensor involved.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {}: {file} not found", dir.display())]
    NotFound { dir: PathBuf, file: &'static str },
    #[error("checkpoint {}: {file}: {source}", dir.display())]
    Io {
        dir: PathBuf,
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint {}: {MODEL_FILE}: {source}", dir.display())]
    Safetensors {
        dir: PathBuf,
        #[source]
        source: SafeTensorError,
    },
    #[error("checkpoint {}: {META_FILE}: {source}", dir.display())]
    Json {
        dir: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("checkpoint {}: {MODEL_FILE} lacks tensor {name}", dir.display())]
    MissingTensor { dir: PathBuf, name: String },
    #[error(
        "checkpoint {}: {MODEL_FILE} tensor {name} is {dtype:?} {shape:?}, expected F32 {expected:?}",
        dir.display()
    )]
    BadTensor {
        dir: PathBuf,
        name: String,
        dtype: Dtype,
        shape: Vec<usize>,
        expected: Vec<usize>,
    },
    /// The files disagree with each other or with the model.
    #[error("checkpoint {}: {what}", dir.display())]
    Inconsistent { dir: PathBuf, what: String },
}

/// xxh3-64 of the parameters' little-endian bytes: replicas that hash alike
/// hold bit-identical parameters.
pub fn param_hash(params: &[f32]) -> u64 {
    // Native byte order is little-endian on every target we build for.
    xxhash_rust::xxh3::xxh3_64(bytemuck::cast_slice(params))
}

/// Writes the checkpoint into `dir` (created if missing) and returns `dir`.
/// `num_params` and `param_hash` in the JSON are computed from `params`,
/// whatever `meta` holds.
pub fn save(
    dir: &Path,
    meta: &CheckpointMeta,
    layout: &ParamLayout,
    params: &[f32],
    momentum: Option<&[f32]>,
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
    if let Some(m) = momentum.filter(|m| m.len() != total) {
        return Err(inconsistent(format!(
            "{} momentum values to save, the model has {total} parameters",
            m.len()
        )));
    }
    fs::create_dir_all(dir).map_err(|source| CheckpointError::Io {
        dir: dir.to_owned(),
        file: "creating the directory".to_owned(),
        source,
    })?;

    let st_err = |source| CheckpointError::Safetensors {
        dir: dir.to_owned(),
        source,
    };
    let mut views = Vec::with_capacity(layout.params().len() * 2);
    for (prefix, flat) in [("", Some(params)), (MOMENTUM_PREFIX, momentum)] {
        let Some(flat) = flat else { continue };
        for spec in layout.params() {
            let shape = spec.shape.iter().map(|&d| d as usize).collect();
            let bytes = bytemuck::cast_slice(&flat[spec.range()]);
            let view = TensorView::new(Dtype::F32, shape, bytes).map_err(st_err)?;
            views.push((format!("{prefix}{}", spec.name), view));
        }
    }
    // What transformers-style loaders expect to find.
    let info = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    let bytes = safetensors::serialize(views, Some(info)).map_err(st_err)?;
    atomic_write(dir, MODEL_FILE, &bytes)?;

    let meta = CheckpointMeta {
        num_params: total,
        param_hash: param_hash(params),
        ..meta.clone()
    };
    let json = serde_json::to_vec_pretty(&meta).map_err(|source| CheckpointError::Json {
        dir: dir.to_owned(),
        source,
    })?;
    atomic_write(dir, META_FILE, &json)?;
    Ok(dir.to_owned())
}

/// What [`load`] returns: the metadata, the parameters, and the momentum
/// buffer if the checkpoint has one.
pub type Loaded = (CheckpointMeta, Vec<f32>, Option<Vec<f32>>);

/// Reads the checkpoint in `dir` for a model with `layout`: the metadata, the
/// parameters, and the momentum buffer if the checkpoint has one.
pub fn load(dir: &Path, layout: &ParamLayout) -> Result<Loaded, CheckpointError> {
    let meta_bytes = read(dir, META_FILE)?;
    let meta: CheckpointMeta =
        serde_json::from_slice(&meta_bytes).map_err(|source| CheckpointError::Json {
            dir: dir.to_owned(),
            source,
        })?;
    let inconsistent = |what: String| CheckpointError::Inconsistent {
        dir: dir.to_owned(),
        what,
    };
    if meta.num_params != layout.total() {
        return Err(inconsistent(format!(
            "{META_FILE} has {} parameters (model {}), this model has {}",
            meta.num_params,
            meta.model,
            layout.total()
        )));
    }

    let model_bytes = read(dir, MODEL_FILE)?;
    let st =
        SafeTensors::deserialize(&model_bytes).map_err(|source| CheckpointError::Safetensors {
            dir: dir.to_owned(),
            source,
        })?;
    let params = read_tensors(dir, &st, layout, "")?;
    let has_momentum = st.names().iter().any(|n| n.starts_with(MOMENTUM_PREFIX));
    let momentum = if has_momentum {
        Some(read_tensors(dir, &st, layout, MOMENTUM_PREFIX)?)
    } else {
        None
    };

    let hash = param_hash(&params);
    if hash != meta.param_hash {
        return Err(inconsistent(format!(
            "{MODEL_FILE} hashes to {hash:#018x}, {META_FILE} says {:#018x} (torn or mixed checkpoint)",
            meta.param_hash
        )));
    }
    Ok((meta, params, momentum))
}

fn read_tensors(
    dir: &Path,
    st: &SafeTensors<'_>,
    layout: &ParamLayout,
    prefix: &str,
) -> Result<Vec<f32>, CheckpointError> {
    let mut flat = vec![0.0f32; layout.total()];
    for spec in layout.params() {
        let name = format!("{prefix}{}", spec.name);
        let view = match st.tensor(&name) {
            Ok(v) => v,
            Err(SafeTensorError::TensorNotFound(_)) => {
                return Err(CheckpointError::MissingTensor {
                    dir: dir.to_owned(),
                    name,
                })
            }
            Err(source) => {
                return Err(CheckpointError::Safetensors {
                    dir: dir.to_owned(),
                    source,
                })
            }
        };
        let expected: Vec<usize> = spec.shape.iter().map(|&d| d as usize).collect();
        if view.dtype() != Dtype::F32 || view.shape() != expected.as_slice() {
            return Err(CheckpointError::BadTensor {
                dir: dir.to_owned(),
                name,
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                expected,
            });
        }
        // Byte copy: the view's data need not be 4-byte aligned.
        bytemuck::cast_slice_mut::<f32, u8>(&mut flat[spec.range()]).copy_from_slice(view.data());
    }
    Ok(flat)
}

fn read(dir: &Path, file: &'static str) -> Result<Vec<u8>, CheckpointError> {
    fs::read(dir.join(file)).map_err(|source| match source.kind() {
        ErrorKind::NotFound => CheckpointError::NotFound {
            dir: dir.to_owned(),
            file,
        },
        _ => CheckpointError::Io {
            dir: dir.to_owned(),
            file: file.to_owned(),
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
            dir: dir.to_owned(),
            file: file.to_owned(),
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
        }
    }

    fn values(n: usize, base: f32) -> Vec<f32> {
        (0..n).map(|i| base + i as f32 * 0.5).collect()
    }

    #[test]
    fn round_trip_with_and_without_momentum() {
        let l = layout();
        assert_eq!(l.total(), 13);
        let params = values(13, -3.0);
        let mom = values(13, 100.0);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("nested/ckpt");

        assert_eq!(save(&dir, &meta(), &l, &params, Some(&mom)).unwrap(), dir);
        let (m, p, mo) = load(&dir, &l).unwrap();
        assert_eq!(p, params);
        assert_eq!(mo.as_deref(), Some(mom.as_slice()));
        let want = CheckpointMeta {
            num_params: 13,
            param_hash: param_hash(&params),
            ..meta()
        };
        assert_eq!(m, want);

        // Overwriting in place drops the momentum and leaves no temp files.
        let params2 = values(13, 7.0);
        save(&dir, &meta(), &l, &params2, None).unwrap();
        let (_, p, mo) = load(&dir, &l).unwrap();
        assert_eq!((p, mo), (params2, None));
        let mut names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [META_FILE, MODEL_FILE]);
    }

    #[test]
    fn tensors_are_stored_under_layout_names_and_shapes() {
        let l = layout();
        let params = values(13, 0.0);
        let tmp = tempfile::tempdir().unwrap();
        save(tmp.path(), &meta(), &l, &params, Some(&params)).unwrap();
        let bytes = fs::read(tmp.path().join(MODEL_FILE)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut names = st.names();
        names.sort();
        assert_eq!(
            names,
            [
                "a.bias",
                "a.weight",
                "b.weight",
                "momentum.a.bias",
                "momentum.a.weight",
                "momentum.b.weight"
            ]
        );
        let w = st.tensor("a.weight").unwrap();
        assert_eq!((w.dtype(), w.shape()), (Dtype::F32, &[3usize, 2][..]));
        assert_eq!(w.data(), bytemuck::cast_slice::<f32, u8>(&params[3..9]));
    }

    #[test]
    fn missing_files_are_named() {
        let l = layout();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let e = load(dir, &l).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("checkpoint {}: checkpoint.json not found", dir.display())
        );
        save(dir, &meta(), &l, &values(13, 0.0), None).unwrap();
        fs::remove_file(dir.join(MODEL_FILE)).unwrap();
        let e = load(dir, &l).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("checkpoint {}: model.safetensors not found", dir.display())
        );
    }

    #[test]
    fn missing_tensor_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let other = ParamLayout::new([
            ("a.bias".to_owned(), vec![3]),
            ("b.weight".to_owned(), vec![2, 2, 1]),
            ("c.weight".to_owned(), vec![6]),
        ]);
        save(dir, &meta(), &other, &values(13, 0.0), None).unwrap();
        let e = load(dir, &layout()).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "checkpoint {}: model.safetensors lacks tensor a.weight",
                dir.display()
            )
        );
    }

    #[test]
    fn shape_mismatch_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let transposed = ParamLayout::new([
            ("a.bias".to_owned(), vec![3]),
            ("a.weight".to_owned(), vec![2, 3]),
            ("b.weight".to_owned(), vec![2, 2, 1]),
        ]);
        save(dir, &meta(), &transposed, &values(13, 0.0), None).unwrap();
        let e = load(dir, &layout()).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "checkpoint {}: model.safetensors tensor a.weight is F32 [2, 3], expected F32 [3, 2]",
                dir.display()
            )
        );
    }

    #[test]
    fn other_model_sizes_and_torn_checkpoints_are_refused() {
        let l = layout();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        save(dir, &meta(), &l, &values(13, 0.0), None).unwrap();
        let bigger = ParamLayout::new([("a.bias".to_owned(), vec![14])]);
        let e = load(dir, &bigger).unwrap_err().to_string();
        assert!(e.ends_with("checkpoint.json has 13 parameters (model mlp), this model has 14"));

        // New tensors, old JSON: as if a crash fell between the two renames.
        let json = fs::read(dir.join(META_FILE)).unwrap();
        save(dir, &meta(), &l, &values(13, 1.0), None).unwrap();
        fs::write(dir.join(META_FILE), json).unwrap();
        let e = load(dir, &l).unwrap_err().to_string();
        assert!(e.contains("torn or mixed checkpoint"), "{e}");

        let e = save(dir, &meta(), &l, &values(12, 0.0), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with("12 parameters to save, the model has 13"),
            "{e}"
        );
    }

    #[test]
    fn corrupt_json_names_the_file() {
        let l = layout();
        let tmp = tempfile::tempdir().unwrap();
        save(tmp.path(), &meta(), &l, &values(13, 0.0), None).unwrap();
        fs::write(tmp.path().join(META_FILE), b"{").unwrap();
        let e = load(tmp.path(), &l).unwrap_err().to_string();
        assert!(e.contains(": checkpoint.json: "), "{e}");
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

    /// PyTorch reads the file (only where the venv has `safetensors`).
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
        save(
            tmp.path(),
            &meta(),
            &l,
            &values(13, 0.0),
            Some(&values(13, 1.0)),
        )
        .unwrap();
        let script = "import sys; from safetensors.torch import load_file\n\
            t = load_file(sys.argv[1])\n\
            assert t['a.weight'].shape == (3, 2) and t['a.weight'].dtype.is_floating_point\n\
            assert t['a.weight'][1, 0].item() == 2.5, t['a.weight']\n\
            assert t['momentum.b.weight'].shape == (2, 2, 1)\n\
            print(len(t))";
        let out = std::process::Command::new(python)
            .args(["-c", script])
            .arg(tmp.path().join(MODEL_FILE))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "6");
    }
}
