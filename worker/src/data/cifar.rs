//! `format = "cifar"`: CIFAR-10's binary batches in one directory,
//! `data_batch_1.bin` … `data_batch_5.bin` (training: whichever exist, at
//! least one, in that order) and `test_batch.bin`. A record is one label
//! byte and 3072 pixel bytes (3×32×32, channel-major). Inputs become f32
//! `[N, 3, 32, 32]` in [0, 1] (divided by 255, as for IDX), labels i64.

use std::path::{Path, PathBuf};

use tch::Kind;

use super::{read_file, tensor_from_bytes, DataError, Dataset, Split};

const PIXELS: usize = 3 * 32 * 32;
/// Bytes per record: the label, then the pixels.
pub(super) const RECORD: usize = 1 + PIXELS;

pub(super) fn load(dir: &Path) -> Result<Dataset, DataError> {
    if !dir.is_dir() {
        return Err(DataError::Missing {
            path: dir.to_owned(),
        });
    }
    let batches: Vec<PathBuf> = (1..=5)
        .map(|i| dir.join(format!("data_batch_{i}.bin")))
        .filter(|p| p.is_file())
        .collect();
    if batches.is_empty() {
        return Err(DataError::NoCifarBatches {
            dir: dir.to_owned(),
        });
    }
    Ok(Dataset {
        train: read_records(&batches)?,
        test: read_records(&[dir.join("test_batch.bin")])?,
    })
}

/// The records of `files`, concatenated.
fn read_records(files: &[PathBuf]) -> Result<Split, DataError> {
    let mut bytes = Vec::new();
    for file in files {
        let b = read_file(file)?;
        if b.len() % RECORD != 0 {
            return Err(DataError::CifarLength {
                path: file.clone(),
                len: b.len() as u64,
            });
        }
        bytes.extend(b);
    }
    let n = (bytes.len() / RECORD) as i64;
    let records =
        tensor_from_bytes(&bytes, &[n, RECORD as i64], Kind::Uint8).map_err(|problem| {
            DataError::Malformed {
                path: files.first().cloned().unwrap_or_default(),
                problem,
            }
        })?;
    drop(bytes);
    let labels = records.select(1, 0).to_kind(Kind::Int64);
    let mut images = records
        .narrow(1, 1, PIXELS as i64)
        .view([n, 3, 32, 32])
        .to_kind(Kind::Float);
    let _ = images.g_div_scalar_(255.0);
    Ok(Split::pairs(images, labels))
}

#[cfg(test)]
mod tests {
    use ringtrain_common::jobspec::DataFormat;

    use super::*;
    use crate::data;
    use crate::data::tests::{floats, ints, spec};

    /// The pixel bytes of record `seed`: byte `j` is `(j * 7 + seed) % 256`.
    fn pixels(seed: usize) -> Vec<u8> {
        (0..PIXELS).map(|j| ((j * 7 + seed) % 256) as u8).collect()
    }

    /// Records `(label, seed)`, laid out as CIFAR-10 does.
    fn records(recs: &[(u8, usize)]) -> Vec<u8> {
        recs.iter()
            .flat_map(|&(label, seed)| {
                let mut r = vec![label];
                r.extend(pixels(seed));
                r
            })
            .collect()
    }

    fn err(dir: &Path) -> String {
        data::load(&spec(DataFormat::Cifar, dir))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn loads_whichever_batches_exist_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("data_batch_3.bin"), records(&[(9, 30)])).unwrap();
        std::fs::write(d.join("data_batch_1.bin"), records(&[(6, 10), (0, 11)])).unwrap();
        std::fs::write(d.join("test_batch.bin"), records(&[(4, 40)])).unwrap();
        std::fs::write(d.join("batches.meta.txt"), "airplane\n").unwrap();
        let ds = data::load(&spec(DataFormat::Cifar, d)).unwrap();
        assert_eq!((ds.train.len(), ds.test.len()), (3, 1));
        assert_eq!(ds.train.sample_shape(), [3, 32, 32]);
        assert_eq!(ds.train.num_classes(), Some(10));
        assert_eq!(ds.test.num_classes(), Some(5));

        let (x, y) = ds.train.batch(&[0, 1, 2]);
        assert_eq!((x.size(), x.kind()), (vec![3, 3, 32, 32], Kind::Float));
        assert_eq!(y.kind(), Kind::Int64);
        assert_eq!(ints(&y), [6, 0, 9]);
        let want: Vec<f32> = [10, 11, 30]
            .iter()
            .flat_map(|&s| pixels(s))
            .map(|b| f32::from(b) / 255.0)
            .collect();
        assert_eq!(floats(&x), want);
        // Channel-major: [c, h, w] is byte c * 1024 + h * 32 + w of the record.
        let j = 2 * 1024 + 5 * 32 + 17;
        let byte = ((j * 7 + 10) % 256) as u8;
        assert_eq!(
            x.double_value(&[0, 2, 5, 17]),
            f64::from(f32::from(byte) / 255.0)
        );

        let (x, y) = ds.test.batch(&[0]);
        assert_eq!(ints(&y), [4]);
        assert_eq!(x.double_value(&[0, 0, 0, 0]), f64::from(40.0f32 / 255.0));
        let (lo, hi) = (x.min().double_value(&[]), x.max().double_value(&[]));
        assert!(lo >= 0.0 && hi <= 1.0, "{lo} {hi}");
    }

    #[test]
    fn filters_apply_to_cifar() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let train = [(1, 0), (2, 1), (1, 2), (3, 3), (1, 4)];
        std::fs::write(d.join("data_batch_2.bin"), records(&train)).unwrap();
        std::fs::write(d.join("test_batch.bin"), records(&[(2, 5), (1, 6), (3, 7)])).unwrap();
        let mut s = spec(DataFormat::Cifar, d);
        s.classes = vec![1, 3];
        s.limit = 3;
        let ds = data::load(&s).unwrap();
        let (x, y) = ds.train.batch(&[0, 1, 2]);
        assert_eq!(ds.train.len(), 3);
        assert_eq!(ints(&y), [1, 1, 3]);
        assert_eq!(x.double_value(&[2, 0, 0, 0]), f64::from(3.0f32 / 255.0));
        let (x, y) = ds.test.batch(&[0, 1]);
        assert_eq!(ds.test.len(), 2);
        assert_eq!(ints(&y), [1, 3]);
        assert_eq!(x.double_value(&[1, 0, 0, 0]), f64::from(7.0f32 / 255.0));
    }

    #[test]
    fn missing_and_malformed_files_are_errors_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("cifar");
        assert_eq!(
            err(&d),
            format!("dataset not found: {} does not exist", d.display())
        );
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("data_batch_6.bin"), records(&[(1, 1)])).unwrap();
        assert_eq!(
            err(&d),
            format!(
                "dataset not found: {} holds none of data_batch_1.bin ... data_batch_5.bin",
                d.display()
            )
        );
        std::fs::write(d.join("data_batch_4.bin"), records(&[(1, 1)])).unwrap();
        let test = d.join("test_batch.bin");
        assert_eq!(
            err(&d),
            format!("dataset not found: {} does not exist", test.display())
        );

        std::fs::write(&test, &records(&[(1, 1)])[1..]).unwrap();
        assert_eq!(
            err(&d),
            format!(
                "{}: 3072 bytes is not a whole number of CIFAR records (3073 bytes each)",
                test.display()
            )
        );
        std::fs::write(&test, records(&[(1, 1)])).unwrap();
        let batch = d.join("data_batch_4.bin");
        let mut long = records(&[(1, 1)]);
        long.push(0);
        std::fs::write(&batch, long).unwrap();
        assert_eq!(
            err(&d),
            format!(
                "{}: 3074 bytes is not a whole number of CIFAR records (3073 bytes each)",
                batch.display()
            )
        );
        std::fs::write(&batch, []).unwrap();
        assert_eq!(
            err(&d),
            format!("{}: the training split holds no samples", d.display())
        );
    }
}
