//! `format = "safetensors"`: one file holding tensors `inputs` and `targets`
//! (any shape and any common dtype; the first dimension counts the samples
//! and is the same in both). Inputs keep the dtype the file stores; integer
//! (and boolean) targets become i64, as cross-entropy wants, float targets
//! stay as they are. An optional second file of the same layout is the test
//! split; without one the test split is empty.

use std::path::Path;

use safetensors::SafeTensors;
use tch::{Kind, Tensor};

use super::{describe, read_file, tensor_from_bytes, DataError, Dataset, Split};
use crate::tensors::kind_of;

/// The dtypes a data file may store, for messages.
pub(super) const SUPPORTED: &str = "F32, F16, BF16, F64, I64, I32, I16, I8, U8, BOOL";

/// Loads `path` as the training split and `test_path` (if any) as the test split.
pub(super) fn load(path: &Path, test_path: Option<&Path>) -> Result<Dataset, DataError> {
    let (inputs, targets) = read_split(path)?;
    let test = match test_path {
        Some(test_path) => {
            let (test_inputs, test_targets) = read_split(test_path)?;
            for (name, train, test) in [
                ("inputs", &inputs, &test_inputs),
                ("targets", &targets, &test_targets),
            ] {
                let (expected, found) = (sample_kind(train), sample_kind(test));
                if expected != found {
                    return Err(DataError::SplitMismatch {
                        path: test_path.to_owned(),
                        name,
                        found,
                        expected,
                    });
                }
            }
            Split::pairs(test_inputs, test_targets)
        }
        None => Split::pairs(inputs.narrow(0, 0, 0), targets.narrow(0, 0, 0)),
    };
    Ok(Dataset {
        train: Split::pairs(inputs, targets),
        test,
    })
}

/// `Float [1, 28, 28]`: the kind and the shape of one sample.
fn sample_kind(t: &Tensor) -> String {
    describe(t.kind(), &t.size()[1..])
}

/// `(inputs, targets)` of one file, targets widened to i64 when integer.
fn read_split(path: &Path) -> Result<(Tensor, Tensor), DataError> {
    let bytes = read_file(path)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|source| DataError::Safetensors {
        path: path.to_owned(),
        source,
    })?;
    let inputs = read_tensor(&st, path, "inputs")?;
    let targets = read_tensor(&st, path, "targets")?;
    let (n_inputs, n_targets) = (inputs.size()[0], targets.size()[0]);
    if n_inputs != n_targets {
        return Err(DataError::SampleCountMismatch {
            path: path.to_owned(),
            inputs: n_inputs as u64,
            targets: n_targets as u64,
        });
    }
    let targets = match targets.kind() {
        Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double => targets,
        _ => targets.to_kind(Kind::Int64),
    };
    Ok((inputs, targets))
}

/// The tensor `name` of the file, as stored (at least one dimension).
fn read_tensor(st: &SafeTensors, path: &Path, name: &'static str) -> Result<Tensor, DataError> {
    let view = st.tensor(name).map_err(|_| {
        let mut names = st.names();
        names.sort_unstable();
        DataError::NoTensor {
            path: path.to_owned(),
            name,
            found: if names.is_empty() {
                "none".into()
            } else {
                names.join(", ")
            },
        }
    })?;
    let kind = kind_of(view.dtype()).ok_or_else(|| DataError::UnsupportedDtype {
        path: path.to_owned(),
        name,
        dtype: view.dtype().to_string(),
    })?;
    if view.shape().is_empty() {
        return Err(DataError::NoSampleDim {
            path: path.to_owned(),
            name,
        });
    }
    let shape = view
        .shape()
        .iter()
        .map(|&d| i64::try_from(d))
        .collect::<Result<Vec<i64>, _>>()
        .map_err(|_| DataError::ShapeTooLarge {
            path: path.to_owned(),
            name,
            shape: view.shape().to_vec(),
        })?;
    tensor_from_bytes(view.data(), &shape, kind).map_err(|problem| DataError::Malformed {
        path: path.to_owned(),
        problem: format!("tensor '{name}': {problem}"),
    })
}

#[cfg(test)]
mod tests {
    use ringtrain_common::jobspec::DataFormat;
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;

    use super::*;
    use crate::data::tests::{floats, ints, spec};
    use crate::data::{self, Samples};

    /// One tensor to write: name, dtype, shape, little-endian bytes.
    type Entry<'a> = (&'a str, Dtype, Vec<usize>, Vec<u8>);

    fn write(path: &Path, entries: &[Entry]) {
        let views: Vec<(&str, TensorView)> = entries
            .iter()
            .map(|(n, d, s, b)| (*n, TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// `inputs` F32 `[n, 2]` = `[10 i, 10 i + 1]`, `targets` U8 `labels`.
    fn write_pairs(path: &Path, labels: &[u8]) {
        let n = labels.len();
        let x: Vec<f32> = (0..n)
            .flat_map(|i| [10.0 * i as f32, 10.0 * i as f32 + 1.0])
            .collect();
        write(
            path,
            &[
                ("inputs", Dtype::F32, vec![n, 2], f32s(&x)),
                ("targets", Dtype::U8, vec![n], labels.to_vec()),
            ],
        );
    }

    fn err(path: &Path) -> String {
        data::load(&spec(DataFormat::Safetensors, path))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn loads_inputs_and_targets_and_an_empty_test_split() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.safetensors");
        write_pairs(&path, &[3, 0, 7]);
        let ds = data::load(&spec(DataFormat::Safetensors, &path)).unwrap();
        assert_eq!(ds.train.len(), 3);
        assert_eq!(ds.train.sample_shape(), [2]);
        assert_eq!(ds.train.num_classes(), Some(8));
        let (x, y) = ds.train.batch(&[2, 0]);
        assert_eq!((x.size(), x.kind()), (vec![2, 2], Kind::Float));
        assert_eq!((y.size(), y.kind()), (vec![2], Kind::Int64));
        assert_eq!(floats(&x), [20.0, 21.0, 0.0, 1.0]);
        assert_eq!(ints(&y), [7, 3]);
        assert!(ds.test.is_empty());
        assert_eq!(ds.test.sample_shape(), [2]);
        assert_eq!(ds.test.num_classes(), None);
        let (x, y) = ds.test.batch(&[]);
        assert_eq!((x.size(), y.size()), (vec![0, 2], vec![0]));
    }

    #[test]
    fn test_path_is_the_test_split_and_filters_apply() {
        let dir = tempfile::tempdir().unwrap();
        let (train, test) = (dir.path().join("a"), dir.path().join("b"));
        write_pairs(&train, &[1, 2, 1, 3, 1, 2]);
        write_pairs(&test, &[2, 3, 2, 1]);
        let mut s = spec(DataFormat::Safetensors, &train);
        s.test_path = test.display().to_string();
        let ds = data::load(&s).unwrap();
        assert_eq!((ds.train.len(), ds.test.len()), (6, 4));
        assert_eq!(ds.test.num_classes(), Some(4));
        assert_eq!(floats(&ds.test.batch(&[3]).0), [30.0, 31.0]);

        s.classes = vec![2, 3];
        s.limit = 2;
        let ds = data::load(&s).unwrap();
        // Train: samples 1, 3, 5 are of classes 2 and 3; the limit keeps 1 and 3.
        let (x, y) = ds.train.batch(&[0, 1]);
        assert_eq!(ds.train.len(), 2);
        assert_eq!(ints(&y), [2, 3]);
        assert_eq!(floats(&x), [10.0, 11.0, 30.0, 31.0]);
        // Test: samples 0, 1, 2 are; no limit.
        let (x, y) = ds.test.batch(&[0, 1, 2]);
        assert_eq!(ds.test.len(), 3);
        assert_eq!(ints(&y), [2, 3, 2]);
        assert_eq!(floats(&x), [0.0, 1.0, 10.0, 11.0, 20.0, 21.0]);

        s.classes = vec![9];
        let e = data::load(&s).unwrap_err().to_string();
        assert_eq!(e, "dataset.classes [9] leaves no training samples");
    }

    #[test]
    fn every_supported_dtype_loads_with_its_values() {
        // (dtype, bytes of three values, kind as input, values as f64)
        let cases: Vec<(Dtype, Vec<u8>, Kind, [f64; 3])> = vec![
            (
                Dtype::F32,
                f32s(&[1.0, 2.0, -0.5]),
                Kind::Float,
                [1.0, 2.0, -0.5],
            ),
            (
                Dtype::F64,
                [1.0f64, 2.0, -0.5]
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
                Kind::Double,
                [1.0, 2.0, -0.5],
            ),
            // IEEE half: 1.0 = 0x3C00, 2.0 = 0x4000, -0.5 = 0xB800.
            (
                Dtype::F16,
                vec![0x00, 0x3C, 0x00, 0x40, 0x00, 0xB8],
                Kind::Half,
                [1.0, 2.0, -0.5],
            ),
            // bfloat16: the high half of the f32: 0x3F80, 0x4000, 0xBF00.
            (
                Dtype::BF16,
                vec![0x80, 0x3F, 0x00, 0x40, 0x00, 0xBF],
                Kind::BFloat16,
                [1.0, 2.0, -0.5],
            ),
            (
                Dtype::I64,
                [5i64, 0, -2].iter().flat_map(|x| x.to_le_bytes()).collect(),
                Kind::Int64,
                [5.0, 0.0, -2.0],
            ),
            (
                Dtype::I32,
                [5i32, 0, -2].iter().flat_map(|x| x.to_le_bytes()).collect(),
                Kind::Int,
                [5.0, 0.0, -2.0],
            ),
            (
                Dtype::I16,
                [5i16, 0, -2].iter().flat_map(|x| x.to_le_bytes()).collect(),
                Kind::Int16,
                [5.0, 0.0, -2.0],
            ),
            (Dtype::I8, vec![5, 0, 0xFE], Kind::Int8, [5.0, 0.0, -2.0]),
            (Dtype::U8, vec![5, 0, 254], Kind::Uint8, [5.0, 0.0, 254.0]),
            (Dtype::BOOL, vec![1, 0, 1], Kind::Bool, [1.0, 0.0, 1.0]),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        for (dtype, bytes, kind, values) in cases {
            write(
                &path,
                &[
                    ("inputs", dtype, vec![3, 1], bytes.clone()),
                    ("targets", dtype, vec![3], bytes),
                ],
            );
            let ds = data::load(&spec(DataFormat::Safetensors, &path)).unwrap();
            let (x, y) = ds.train.batch(&[0, 1, 2]);
            assert_eq!(x.kind(), kind, "{dtype}");
            assert_eq!(x.size(), [3, 1], "{dtype}");
            let as_f64 = |t: &Tensor| Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1));
            assert_eq!(as_f64(&x).unwrap(), values, "{dtype} inputs");
            assert_eq!(as_f64(&y).unwrap(), values, "{dtype} targets");
            let float = matches!(dtype, Dtype::F32 | Dtype::F64 | Dtype::F16 | Dtype::BF16);
            let want_target = if float { kind } else { Kind::Int64 };
            assert_eq!(y.kind(), want_target, "{dtype} targets");
            let want_classes = (!float).then(|| values[0].max(values[2]) as i64 + 1);
            assert_eq!(ds.train.num_classes(), want_classes, "{dtype}");
        }
    }

    #[test]
    fn inputs_of_any_rank_keep_their_sample_shape() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img.safetensors");
        let pixels: Vec<u8> = (0..2 * 3 * 4 * 5).map(|i| i as u8).collect();
        write(
            &path,
            &[
                ("inputs", Dtype::U8, vec![2, 3, 4, 5], pixels),
                (
                    "targets",
                    Dtype::F32,
                    vec![2, 2],
                    f32s(&[0.5, 1.5, 2.5, 3.5]),
                ),
                ("extra", Dtype::U16, vec![1], vec![0, 0]),
            ],
        );
        let ds = data::load(&spec(DataFormat::Safetensors, &path)).unwrap();
        assert_eq!(ds.train.sample_shape(), [3, 4, 5]);
        assert_eq!(ds.train.num_classes(), None, "2-D float targets");
        let (x, y) = ds.train.batch(&[1]);
        assert_eq!(x.size(), [1, 3, 4, 5]);
        assert_eq!(ints(&x), (60..120).collect::<Vec<i64>>());
        assert_eq!(floats(&y), [2.5, 3.5]);
        // Stored whole, not widened.
        let Samples::Pairs { inputs, .. } = &ds.train.samples else {
            panic!("pairs")
        };
        assert_eq!(inputs.kind(), Kind::Uint8);
    }

    #[test]
    fn missing_and_malformed_files_are_errors_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.safetensors");
        let p = path.display();
        assert_eq!(err(&path), format!("dataset not found: {p} does not exist"));

        std::fs::write(&path, [1, 2, 3, 4]).unwrap();
        assert_eq!(
            err(&path),
            format!("{p}: not a safetensors file: header too small")
        );

        // A header that claims more bytes than the file has.
        write_pairs(&path, &[1, 2]);
        let full = std::fs::read(&path).unwrap();
        std::fs::write(&path, &full[..20]).unwrap();
        assert_eq!(
            err(&path),
            format!("{p}: not a safetensors file: invalid header length")
        );
        // Data cut short.
        std::fs::write(&path, &full[..full.len() - 1]).unwrap();
        assert_eq!(
            err(&path),
            format!("{p}: not a safetensors file: incomplete metadata, file not fully covered")
        );

        // A negative dimension, written by hand.
        let header = br#"{"inputs":{"dtype":"U8","shape":[-1],"data_offsets":[0,0]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header);
        std::fs::write(&path, bytes).unwrap();
        let e = err(&path);
        assert!(
            e.starts_with(&format!(
                "{p}: not a safetensors file: invalid JSON in header: "
            )),
            "{e}"
        );
        assert!(e.contains("-1"), "{e}");
    }

    #[test]
    fn missing_odd_and_mismatched_tensors_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.safetensors");
        let p = path.display();
        let one = |n: &'static str, d: Dtype, s: Vec<usize>, b: Vec<u8>| (n, d, s, b);

        write(
            &path,
            &[
                one("b", Dtype::U8, vec![1], vec![0]),
                one("a", Dtype::U8, vec![1], vec![0]),
            ],
        );
        assert_eq!(err(&path), format!("{p}: no tensor 'inputs' (found: a, b)"));
        write(&path, &[one("inputs", Dtype::U8, vec![1], vec![0])]);
        assert_eq!(
            err(&path),
            format!("{p}: no tensor 'targets' (found: inputs)")
        );
        write(&path, &[]);
        assert_eq!(err(&path), format!("{p}: no tensor 'inputs' (found: none)"));

        write(
            &path,
            &[
                one("inputs", Dtype::U16, vec![1], vec![0, 0]),
                one("targets", Dtype::U8, vec![1], vec![0]),
            ],
        );
        assert_eq!(
            err(&path),
            format!(
                "{p}: tensor 'inputs' has dtype U16, not one of F32, F16, BF16, F64, I64, I32, I16, I8, U8, BOOL"
            )
        );

        write(
            &path,
            &[
                one("inputs", Dtype::U8, vec![1], vec![0]),
                one("targets", Dtype::U8, vec![], vec![4]),
            ],
        );
        assert_eq!(
            err(&path),
            format!(
                "{p}: tensor 'targets' is a scalar; its first dimension must count the samples"
            )
        );

        write(
            &path,
            &[
                one("inputs", Dtype::U8, vec![3, 2], vec![0; 6]),
                one("targets", Dtype::U8, vec![2], vec![0; 2]),
            ],
        );
        assert_eq!(
            err(&path),
            format!("{p}: tensor 'inputs' holds 3 samples but 'targets' holds 2")
        );

        // Zero samples of an absurd width: consistent for safetensors, not for us.
        write(
            &path,
            &[
                one("inputs", Dtype::U8, vec![0, 1 << 63], vec![]),
                one("targets", Dtype::U8, vec![0], vec![]),
            ],
        );
        assert_eq!(
            err(&path),
            format!(
                "{p}: tensor 'inputs' has shape [0, {}]: a dimension exceeds i64",
                1u64 << 63
            )
        );

        write(
            &path,
            &[
                one("inputs", Dtype::U8, vec![0, 2], vec![]),
                one("targets", Dtype::U8, vec![0], vec![]),
            ],
        );
        assert_eq!(
            err(&path),
            format!("{p}: the training split holds no samples")
        );
    }

    #[test]
    fn a_test_file_unlike_the_training_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (train, test) = (dir.path().join("a"), dir.path().join("b"));
        write_pairs(&train, &[1, 2]);
        let mut s = spec(DataFormat::Safetensors, &train);
        s.test_path = test.display().to_string();
        let load_err =
            |s: &ringtrain_common::jobspec::DatasetSpec| data::load(s).unwrap_err().to_string();
        assert_eq!(
            load_err(&s),
            format!("dataset not found: {} does not exist", test.display())
        );
        write(
            &test,
            &[
                ("inputs", Dtype::F32, vec![1, 3], f32s(&[0.0; 3])),
                ("targets", Dtype::U8, vec![1], vec![0]),
            ],
        );
        assert_eq!(
            load_err(&s),
            format!(
                "{}: tensor 'inputs' holds samples of Float [3] but the training split's are Float [2]",
                test.display()
            )
        );
        write(
            &test,
            &[
                ("inputs", Dtype::F32, vec![1, 2], f32s(&[0.0; 2])),
                ("targets", Dtype::F32, vec![1], f32s(&[0.0])),
            ],
        );
        assert_eq!(
            load_err(&s),
            format!(
                "{}: tensor 'targets' holds samples of Float [] but the training split's are Int64 []",
                test.display()
            )
        );
    }

    #[test]
    fn classes_need_integer_targets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write(
            &path,
            &[
                ("inputs", Dtype::F32, vec![2, 1], f32s(&[0.0, 1.0])),
                ("targets", Dtype::F32, vec![2], f32s(&[0.0, 1.0])),
            ],
        );
        let mut s = spec(DataFormat::Safetensors, &path);
        s.classes = vec![1];
        assert_eq!(
            data::load(&s).unwrap_err().to_string(),
            format!(
                "dataset.classes needs 1-D integer targets, but {} has targets of Float [2]",
                path.display()
            )
        );
    }
}
