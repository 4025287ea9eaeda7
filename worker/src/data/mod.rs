//! Data sets loaded whole onto the CPU, in the formats a job spec names
//! (`dataset.format`): MNIST's IDX files ([`idx`]), `inputs`/`targets`
//! tensors in a safetensors file ([`tensors`]), a byte-level text corpus
//! ([`text`]) and CIFAR-10's binary batches ([`cifar`]). [`load`] reads both
//! splits and applies the spec's filters (`classes`, then `limit`).
//!
//! A [`Split`] hands out batches by sample index; how it stores its samples
//! (whole tensors, or a text corpus cut into windows on demand) is its own
//! business.

mod cifar;
mod idx;
mod tensors;
mod text;

use crate::tensors::from_bytes as tensor_from_bytes;
use std::path::{Path, PathBuf};

use ringtrain_common::jobspec::{DataFormat, DatasetSpec};
use tch::{Kind, Tensor};

pub use idx::IdxKind;

/// Why a data set could not be loaded. Each message is one line naming the
/// file (and the tensor or spec key) involved.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// IDX: `path` is the plain file name; its `.gz` twin was looked for too.
    #[error("dataset not found: {}(.gz) does not exist", path.display())]
    NotFound { path: PathBuf },
    #[error("dataset not found: {} does not exist", path.display())]
    Missing { path: PathBuf },
    #[error(
        "dataset not found: {} holds none of data_batch_1.bin ... data_batch_5.bin",
        dir.display()
    )]
    NoCifarBatches { dir: PathBuf },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not an IDX {what} file (magic {magic:#010x})", path.display())]
    BadMagic {
        path: PathBuf,
        what: IdxKind,
        magic: u32,
    },
    #[error("{}: truncated: expected {expected} bytes, found {found}", path.display())]
    Truncated {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("{}: {extra} bytes of trailing data after {expected} bytes", path.display())]
    TrailingData {
        path: PathBuf,
        expected: u64,
        extra: u64,
    },
    #[error(
        "{} holds {images} images but {} holds {labels} labels",
        images_path.display(),
        labels_path.display()
    )]
    CountMismatch {
        images_path: PathBuf,
        images: u64,
        labels_path: PathBuf,
        labels: u64,
    },
    #[error("{}: not a safetensors file: {source}", path.display())]
    Safetensors {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// `found` lists the file's tensors, sorted, comma-separated.
    #[error("{}: no tensor '{name}' (found: {found})", path.display())]
    NoTensor {
        path: PathBuf,
        name: &'static str,
        found: String,
    },
    #[error(
        "{}: tensor '{name}' has dtype {dtype}, not one of {}",
        path.display(),
        tensors::SUPPORTED
    )]
    UnsupportedDtype {
        path: PathBuf,
        name: &'static str,
        dtype: String,
    },
    #[error(
        "{}: tensor '{name}' is a scalar; its first dimension must count the samples",
        path.display()
    )]
    NoSampleDim { path: PathBuf, name: &'static str },
    #[error("{}: tensor '{name}' has shape {shape:?}: a dimension exceeds i64", path.display())]
    ShapeTooLarge {
        path: PathBuf,
        name: &'static str,
        shape: Vec<usize>,
    },
    #[error(
        "{}: tensor 'inputs' holds {inputs} samples but 'targets' holds {targets}",
        path.display()
    )]
    SampleCountMismatch {
        path: PathBuf,
        inputs: u64,
        targets: u64,
    },
    /// The test file's samples differ from the training file's (`found`,
    /// `expected`: kind and per-sample shape).
    #[error(
        "{}: tensor '{name}' holds samples of {found} but the training split's are {expected}",
        path.display()
    )]
    SplitMismatch {
        path: PathBuf,
        name: &'static str,
        found: String,
        expected: String,
    },
    #[error("{}: empty text corpus", path.display())]
    EmptyCorpus { path: PathBuf },
    #[error(
        "{}: a text corpus of {bytes} bytes is shorter than one sample ({} bytes for context {context})",
        path.display(),
        context + 1
    )]
    CorpusTooShort {
        path: PathBuf,
        bytes: u64,
        context: usize,
    },
    /// The corpus is split by `test_fraction`; `part` is "training" or
    /// "held-out test".
    #[error(
        "{}: the {part} part of the corpus ({bytes} of its {total} bytes, test_fraction {fraction}) is shorter than one sample ({} bytes for context {context})",
        path.display(),
        context + 1
    )]
    PartTooShort {
        path: PathBuf,
        part: &'static str,
        bytes: u64,
        total: u64,
        fraction: f64,
        context: usize,
    },
    #[error(
        "{}: {len} bytes is not a whole number of CIFAR records ({} bytes each)",
        path.display(),
        cifar::RECORD
    )]
    CifarLength { path: PathBuf, len: u64 },
    #[error("{}: the training split holds no samples", path.display())]
    NoTrainingSamples { path: PathBuf },
    /// `targets` describes what the split holds instead (kind and shape).
    #[error(
        "dataset.classes needs 1-D integer targets, but {} has {targets}",
        path.display()
    )]
    ClassesNeedLabels { path: PathBuf, targets: String },
    #[error("dataset.classes {classes:?} leaves no training samples")]
    ClassesLeaveNothing { classes: Vec<i64> },
    /// A setting of the spec that this format cannot honour (`key` without
    /// the `dataset.` prefix).
    #[error("dataset.{key} {problem}")]
    BadSpec { key: &'static str, problem: String },
    /// A file whose contents the format's own checks let through but torch
    /// refused (should not happen; kept so that nothing panics).
    #[error("{}: {problem}", path.display())]
    Malformed { path: PathBuf, problem: String },
}

/// Both splits of a data set, on the CPU.
#[derive(Debug)]
pub struct Dataset {
    pub train: Split,
    pub test: Split,
}

/// Loads both splits as `spec` says (CPU tensors), then keeps the samples
/// of `spec.classes` (both splits) and the first `spec.limit` training
/// samples. A training split left empty is an error.
pub fn load(spec: &DatasetSpec) -> Result<Dataset, DataError> {
    let path = Path::new(&spec.path);
    let test_path = (!spec.test_path.is_empty()).then(|| Path::new(&spec.test_path));
    let ds = match spec.format {
        DataFormat::Idx | DataFormat::Cifar if test_path.is_some() => {
            return Err(DataError::BadSpec {
                key: "test_path",
                problem: format!(
                    "applies to safetensors and text data only, not {} (its test split lies beside the training one in dataset.path)",
                    spec.format
                ),
            })
        }
        DataFormat::Idx => idx::load(path)?,
        DataFormat::Cifar => cifar::load(path)?,
        DataFormat::Safetensors => tensors::load(path, test_path)?,
        DataFormat::Text => text::load(path, test_path, spec.context, spec.test_fraction)?,
    };
    if ds.train.is_empty() {
        return Err(DataError::NoTrainingSamples {
            path: path.to_owned(),
        });
    }
    filter(ds, spec)
}

fn filter(mut ds: Dataset, spec: &DatasetSpec) -> Result<Dataset, DataError> {
    if !spec.classes.is_empty() {
        let path = Path::new(&spec.path);
        ds.train = ds.train.keep_classes(&spec.classes, path)?;
        let test_path = if spec.test_path.is_empty() {
            path
        } else {
            Path::new(&spec.test_path)
        };
        ds.test = ds.test.keep_classes(&spec.classes, test_path)?;
        if ds.train.is_empty() {
            return Err(DataError::ClassesLeaveNothing {
                classes: spec.classes.clone(),
            });
        }
    }
    if spec.limit > 0 {
        ds.train = ds.train.first(spec.limit);
    }
    Ok(ds)
}

/// One split of a data set, on the CPU.
#[derive(Debug)]
pub struct Split {
    samples: Samples,
    /// Cached [`Split::num_classes`].
    num_classes: Option<i64>,
}

#[derive(Debug)]
enum Samples {
    /// `inputs [n, ...]` and `targets [n, ...]`, whole.
    Pairs { inputs: Tensor, targets: Tensor },
    /// `[n, context + 1]` u8: the text windows, a view of the corpus; a
    /// batch widens only its own rows to i64.
    Windows(Tensor),
}

impl Split {
    /// Samples stored whole; both tensors have the sample count as their
    /// first dimension (the loaders check that).
    fn pairs(inputs: Tensor, targets: Tensor) -> Split {
        debug_assert_eq!(inputs.size().first(), targets.size().first());
        let num_classes = label_count(&targets);
        Split {
            samples: Samples::Pairs { inputs, targets },
            num_classes,
        }
    }

    /// `[n, context + 1]` windows of a byte corpus.
    fn windows(windows: Tensor) -> Split {
        Split {
            samples: Samples::Windows(windows),
            num_classes: None,
        }
    }

    pub fn len(&self) -> usize {
        let t = match &self.samples {
            Samples::Pairs { targets, .. } => targets,
            Samples::Windows(w) => w,
        };
        t.size().first().map_or(0, |&n| n as usize)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Inputs and targets of the samples at `indices` (each < len), stacked
    /// along a new first dim. Text gives i64 `[B, context]` both, the
    /// targets being the inputs shifted by one byte.
    ///
    /// Panics if an index is out of range (the caller's bug, not the data's).
    pub fn batch(&self, indices: &[i64]) -> (Tensor, Tensor) {
        let n = self.len() as i64;
        if let Some(bad) = indices.iter().find(|&&i| !(0..n).contains(&i)) {
            panic!("sample index {bad} out of range for a split of {n} samples");
        }
        let idx = Tensor::from_slice(indices);
        match &self.samples {
            Samples::Pairs { inputs, targets } => {
                (inputs.index_select(0, &idx), targets.index_select(0, &idx))
            }
            Samples::Windows(w) => {
                let rows = w.index_select(0, &idx).to_kind(Kind::Int64);
                let context = rows.size()[1] - 1;
                (
                    rows.narrow(1, 0, context).contiguous(),
                    rows.narrow(1, 1, context).contiguous(),
                )
            }
        }
    }

    /// Shape of one sample's inputs, e.g. `[1, 28, 28]`, `[3, 32, 32]` or
    /// `[context]`.
    pub fn sample_shape(&self) -> Vec<i64> {
        match &self.samples {
            Samples::Pairs { inputs, .. } => inputs.size().split_off(1),
            Samples::Windows(w) => vec![w.size()[1] - 1],
        }
    }

    /// For 1-D integer targets: 1 + the largest target; None otherwise (and
    /// for an empty split).
    pub fn num_classes(&self) -> Option<i64> {
        self.num_classes
    }

    /// What the targets are, for messages: kind and shape of the whole split.
    fn describe_targets(&self) -> String {
        match &self.samples {
            Samples::Pairs { targets, .. } => describe(targets.kind(), &targets.size()),
            Samples::Windows(w) => {
                let s = w.size();
                describe(Kind::Int64, &[s[0], s[1] - 1])
            }
        }
    }

    /// Keeps the samples whose target is one of `classes` (in their order).
    fn keep_classes(self, classes: &[i64], path: &Path) -> Result<Split, DataError> {
        let need_labels = || DataError::ClassesNeedLabels {
            path: path.to_owned(),
            targets: format!("targets of {}", self.describe_targets()),
        };
        let Samples::Pairs { inputs, targets } = &self.samples else {
            return Err(need_labels());
        };
        if targets.dim() != 1 || !is_integer(targets.kind()) {
            return Err(need_labels());
        }
        let wanted = Tensor::from_slice(classes).to_kind(targets.kind());
        let keep = Tensor::isin(targets, &wanted, false, false)
            .nonzero()
            .squeeze_dim(1);
        Ok(Split::pairs(
            inputs.index_select(0, &keep),
            targets.index_select(0, &keep),
        ))
    }

    /// The first `n` samples (all if there are fewer).
    fn first(self, n: usize) -> Split {
        let n = n.min(self.len()) as i64;
        match self.samples {
            Samples::Pairs { inputs, targets } => {
                Split::pairs(inputs.narrow(0, 0, n), targets.narrow(0, 0, n))
            }
            Samples::Windows(w) => Split::windows(w.narrow(0, 0, n)),
        }
    }
}

fn is_integer(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Uint8 | Kind::Int8 | Kind::Int16 | Kind::Int | Kind::Int64
    )
}

/// 1 + the largest of 1-D integer targets.
fn label_count(targets: &Tensor) -> Option<i64> {
    (targets.dim() == 1 && is_integer(targets.kind()) && targets.numel() > 0)
        .then(|| targets.max().int64_value(&[]) + 1)
}

/// `Float [3, 4]`: a kind and a shape, for messages.
fn describe(kind: Kind, shape: &[i64]) -> String {
    format!("{kind:?} {shape:?}")
}

/// Reads a whole file; a missing one is [`DataError::Missing`].
fn read_file(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            DataError::Missing {
                path: path.to_owned(),
            }
        } else {
            DataError::Io {
                path: path.to_owned(),
                source,
            }
        }
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A spec of `format` at `path`, no filters.
    pub(crate) fn spec(format: DataFormat, path: &Path) -> DatasetSpec {
        DatasetSpec {
            format,
            path: path.display().to_string(),
            test_path: String::new(),
            context: 0,
            test_fraction: 0.1,
            classes: vec![],
            limit: 0,
        }
    }

    pub(crate) fn ints(t: &Tensor) -> Vec<i64> {
        Vec::<i64>::try_from(t.flatten(0, -1).to_kind(Kind::Int64)).unwrap()
    }

    pub(crate) fn floats(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.flatten(0, -1).to_kind(Kind::Float)).unwrap()
    }

    /// Inputs `[i, 10 + i]` f32, targets `labels` i64.
    fn labelled(labels: &[i64]) -> Split {
        let n = labels.len() as i64;
        let x: Vec<f32> = (0..n).flat_map(|i| [i as f32, 10.0 + i as f32]).collect();
        Split::pairs(
            Tensor::from_slice(&x).view([n, 2]),
            Tensor::from_slice(labels),
        )
    }

    fn all(split: &Split) -> (Tensor, Tensor) {
        let idx: Vec<i64> = (0..split.len() as i64).collect();
        split.batch(&idx)
    }

    #[test]
    fn classes_filter_both_splits_and_limit_only_train() {
        let ds = Dataset {
            train: labelled(&[3, 1, 4, 1, 5, 9, 2, 6]),
            test: labelled(&[5, 3, 5, 8, 9]),
        };
        let mut s = spec(DataFormat::Safetensors, Path::new("/x"));
        s.classes = vec![1, 5];
        s.limit = 1;
        let ds = filter(ds, &s).unwrap();
        // Train: samples 1, 3, 4 have classes 1, 1, 5; the limit keeps one.
        let (x, y) = all(&ds.train);
        assert_eq!(ints(&y), [1]);
        assert_eq!(floats(&x), [1.0, 11.0]);
        // Test: samples 0 and 2 (class 5), not limited.
        let (x, y) = all(&ds.test);
        assert_eq!(ints(&y), [5, 5]);
        assert_eq!(floats(&x), [0.0, 10.0, 2.0, 12.0]);
        assert_eq!(ds.train.num_classes(), Some(2));
        assert_eq!(ds.test.num_classes(), Some(6));
        // Without the limit, the train split keeps all three.
        let ds = Dataset {
            train: labelled(&[3, 1, 4, 1, 5, 9, 2, 6]),
            test: labelled(&[]),
        };
        s.limit = 0;
        let (x, y) = all(&filter(ds, &s).unwrap().train);
        assert_eq!(ints(&y), [1, 1, 5]);
        assert_eq!(floats(&x), [1.0, 11.0, 3.0, 13.0, 4.0, 14.0]);
    }

    #[test]
    fn limit_alone_keeps_the_head_of_train() {
        let ds = Dataset {
            train: labelled(&[3, 1, 4, 1, 5]),
            test: labelled(&[2, 7, 1, 8]),
        };
        let mut s = spec(DataFormat::Idx, Path::new("/x"));
        s.limit = 3;
        let ds = filter(ds, &s).unwrap();
        assert_eq!(ints(&all(&ds.train).1), [3, 1, 4]);
        assert_eq!(ints(&all(&ds.test).1), [2, 7, 1, 8]);
        // A limit beyond the split keeps everything.
        s.limit = 99;
        let ds = filter(ds, &s).unwrap();
        assert_eq!(ds.train.len(), 3);
    }

    #[test]
    fn classes_that_leave_nothing_are_an_error() {
        let ds = Dataset {
            train: labelled(&[0, 1, 2]),
            test: labelled(&[11]),
        };
        let mut s = spec(DataFormat::Idx, Path::new("/x"));
        s.classes = vec![11];
        let e = filter(ds, &s).unwrap_err().to_string();
        assert_eq!(e, "dataset.classes [11] leaves no training samples");
    }

    #[test]
    fn classes_need_1d_integer_targets() {
        let float_targets = Split::pairs(
            Tensor::zeros([2, 3], tch::kind::FLOAT_CPU),
            Tensor::from_slice(&[0.5f32, 1.5]),
        );
        let ds = Dataset {
            train: float_targets,
            test: labelled(&[]),
        };
        let mut s = spec(DataFormat::Safetensors, Path::new("/d/train.safetensors"));
        s.classes = vec![1];
        let e = filter(ds, &s).unwrap_err().to_string();
        assert_eq!(
            e,
            "dataset.classes needs 1-D integer targets, but /d/train.safetensors has targets of Float [2]"
        );
        let two_d = Split::pairs(
            Tensor::zeros([2, 3], tch::kind::FLOAT_CPU),
            Tensor::zeros([2, 4], tch::kind::INT64_CPU),
        );
        assert_eq!(two_d.num_classes(), None);
        let e = two_d.keep_classes(&[1], Path::new("f")).unwrap_err();
        assert!(
            e.to_string().ends_with("f has targets of Int64 [2, 4]"),
            "{e}"
        );
    }

    #[test]
    #[should_panic(expected = "sample index 3 out of range for a split of 3 samples")]
    fn batch_refuses_indices_past_the_end() {
        let split = labelled(&[0, 1, 2]).first(3);
        let _ = split.batch(&[0, 3]);
    }

    #[test]
    fn test_path_is_refused_where_the_format_has_its_own() {
        let mut s = spec(DataFormat::Cifar, Path::new("/nowhere"));
        s.test_path = "/nowhere/else".into();
        let e = load(&s).unwrap_err().to_string();
        assert!(
            e.starts_with("dataset.test_path applies to safetensors and text data only, not cifar"),
            "{e}"
        );
    }
}
