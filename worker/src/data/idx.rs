//! IDX datasets (the MNIST file format, gzipped or plain) loaded whole into
//! tensors, as the reference script does: pixels scaled to [0,1], labels i64.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use tch::Kind;

use super::{tensor_from_bytes, DataError, Dataset, Split};

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

/// Which of the two IDX files of a split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdxKind {
    Images,
    Labels,
}

impl fmt::Display for IdxKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdxKind::Images => "images",
            IdxKind::Labels => "labels",
        })
    }
}

/// Loads the train (`train-*`) and test (`t10k-*`) splits from `dir`.
pub(super) fn load(dir: &Path) -> Result<Dataset, DataError> {
    Ok(Dataset {
        train: load_split(dir, true)?,
        test: load_split(dir, false)?,
    })
}

/// Loads the train (`train-*`) or test (`t10k-*`) split from `dir`, preferring
/// `.gz` files over plain ones when both exist.
fn load_split(dir: &Path, train: bool) -> Result<Split, DataError> {
    let prefix = if train { "train" } else { "t10k" };
    let images_path = find(dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let labels_path = find(dir, &format!("{prefix}-labels-idx1-ubyte"))?;

    let images = read_idx(&images_path, IdxKind::Images)?;
    let labels = read_idx(&labels_path, IdxKind::Labels)?;
    if images.dims[0] != labels.dims[0] {
        return Err(DataError::CountMismatch {
            images_path,
            images: images.dims[0],
            labels_path,
            labels: labels.dims[0],
        });
    }

    let (n, rows, cols) = (
        images.dims[0] as i64,
        images.dims[1] as i64,
        images.dims[2] as i64,
    );
    let malformed = |path: &Path| {
        let path = path.to_owned();
        move |problem| DataError::Malformed { path, problem }
    };
    let mut x = tensor_from_bytes(images.payload(), &[n, 1, rows, cols], Kind::Uint8)
        .map_err(malformed(&images_path))?
        .to_kind(Kind::Float);
    // Divide (not multiply by 1/255) so pixels equal the reference script's bit for bit.
    let _ = x.g_div_scalar_(255.0);
    let y = tensor_from_bytes(labels.payload(), &[n], Kind::Uint8)
        .map_err(malformed(&labels_path))?
        .to_kind(Kind::Int64);
    Ok(Split::pairs(x, y))
}

fn find(dir: &Path, name: &str) -> Result<PathBuf, DataError> {
    let plain = dir.join(name);
    let gz = dir.join(format!("{name}.gz"));
    if gz.is_file() {
        Ok(gz)
    } else if plain.is_file() {
        Ok(plain)
    } else {
        Err(DataError::NotFound { path: plain })
    }
}

struct Idx {
    bytes: Vec<u8>,
    header_len: usize,
    dims: Vec<u64>,
}

impl Idx {
    fn payload(&self) -> &[u8] {
        &self.bytes[self.header_len..]
    }
}

fn read_idx(path: &Path, kind: IdxKind) -> Result<Idx, DataError> {
    let io = |source| DataError::Io {
        path: path.to_owned(),
        source,
    };
    let raw = std::fs::read(path).map_err(io)?;
    let bytes = if path.extension().is_some_and(|e| e == "gz") {
        // Multi-member so that concatenated gzip streams decode whole.
        let mut out = Vec::with_capacity(raw.len() * 4);
        flate2::read::MultiGzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(io)?;
        out
    } else {
        raw
    };

    let truncated = |expected: u64| DataError::Truncated {
        path: path.to_owned(),
        expected,
        found: bytes.len() as u64,
    };
    let magic_bytes: [u8; 4] = bytes
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| truncated(4))?;
    let magic = u32::from_be_bytes(magic_bytes);
    let (want, ndim) = match kind {
        IdxKind::Images => (IMAGES_MAGIC, 3),
        IdxKind::Labels => (LABELS_MAGIC, 1),
    };
    if magic != want {
        return Err(DataError::BadMagic {
            path: path.to_owned(),
            what: kind,
            magic,
        });
    }
    let header_len = 4 + 4 * ndim;
    let header = bytes
        .get(4..header_len)
        .ok_or_else(|| truncated(header_len as u64))?;
    let dims: Vec<u64> = header
        .chunks_exact(4)
        .map(|c| u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
        .collect();
    // Saturating: dimensions whose product overflows read as "truncated".
    let payload_len = dims.iter().fold(1u64, |acc, &d| acc.saturating_mul(d));
    let expected = (header_len as u64).saturating_add(payload_len);
    let found = bytes.len() as u64;
    if found < expected {
        return Err(truncated(expected));
    }
    if found > expected {
        return Err(DataError::TrailingData {
            path: path.to_owned(),
            expected,
            extra: found - expected,
        });
    }
    Ok(Idx {
        bytes,
        header_len,
        dims,
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use ringtrain_common::jobspec::DataFormat;
    use tch::Tensor;

    use super::*;
    use crate::data::{self, tests as data_tests};

    const FASHION: &str = "/usr/share/datasets/fashion-mnist";

    fn idx_bytes(magic: u32, dims: &[u32], payload: &[u8]) -> Vec<u8> {
        let mut b = magic.to_be_bytes().to_vec();
        for d in dims {
            b.extend(d.to_be_bytes());
        }
        b.extend(payload);
        b
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    /// A 3-sample split of 2x2 images with all pixels 0, 85 and 255.
    fn write_small(dir: &Path, prefix: &str, gzip: bool) {
        let pixels: Vec<u8> = [0u8, 85, 255].iter().flat_map(|&v| [v; 4]).collect();
        let images = idx_bytes(IMAGES_MAGIC, &[3, 2, 2], &pixels);
        let labels = idx_bytes(LABELS_MAGIC, &[3], &[7, 0, 9]);
        let (images, labels, ext) = if gzip {
            (gz(&images), gz(&labels), ".gz")
        } else {
            (images, labels, "")
        };
        std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte{ext}")), images).unwrap();
        std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte{ext}")), labels).unwrap();
    }

    fn check_small(split: &Split) {
        assert_eq!(split.len(), 3);
        assert_eq!(split.sample_shape(), [1, 2, 2]);
        assert_eq!(split.num_classes(), Some(10));
        let (images, labels) = split.batch(&[0, 1, 2]);
        assert_eq!(images.size(), [3, 1, 2, 2]);
        assert_eq!(images.kind(), Kind::Float);
        assert_eq!(labels.kind(), Kind::Int64);
        assert_eq!(Vec::<i64>::try_from(&labels).unwrap(), [7, 0, 9]);
        let px = Vec::<f32>::try_from(images.flatten(0, -1)).unwrap();
        assert_eq!(&px[..4], &[0.0; 4]);
        assert_eq!(&px[4..8], &[85.0 / 255.0; 4]);
        assert_eq!(&px[8..], &[1.0; 4]);
    }

    #[test]
    fn loads_plain_and_gzipped_files() {
        for gzip in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            write_small(dir.path(), "train", gzip);
            write_small(dir.path(), "t10k", gzip);
            check_small(&load_split(dir.path(), true).unwrap());
            check_small(&load_split(dir.path(), false).unwrap());
        }
    }

    #[test]
    fn prefers_gz_over_plain() {
        let dir = tempfile::tempdir().unwrap();
        write_small(dir.path(), "train", true);
        // A broken plain twin: loading must not look at it.
        std::fs::write(dir.path().join("train-images-idx3-ubyte"), b"junk").unwrap();
        check_small(&load_split(dir.path(), true).unwrap());
    }

    #[test]
    fn batch_gathers_rows() {
        let dir = tempfile::tempdir().unwrap();
        write_small(dir.path(), "train", false);
        let split = load_split(dir.path(), true).unwrap();
        let (x, y) = split.batch(&[2, 0]);
        assert_eq!(x.size(), [2, 1, 2, 2]);
        assert_eq!(Vec::<i64>::try_from(&y).unwrap(), [9, 7]);
        assert_eq!(x.double_value(&[0, 0, 1, 1]), 1.0);
        let (x, y) = split.batch(&[]);
        assert_eq!((x.size()[0], y.size()[0]), (0, 0));
    }

    #[test]
    fn missing_file_names_it() {
        let dir = tempfile::tempdir().unwrap();
        write_small(dir.path(), "train", false);
        std::fs::remove_file(dir.path().join("train-labels-idx1-ubyte")).unwrap();
        let e = load_split(dir.path(), true).unwrap_err().to_string();
        let want = format!(
            "dataset not found: {}/train-labels-idx1-ubyte(.gz) does not exist",
            dir.path().display()
        );
        assert_eq!(e, want);
        let e = load_split(dir.path(), false).unwrap_err().to_string();
        assert!(
            e.contains("t10k-images-idx3-ubyte(.gz) does not exist"),
            "{e}"
        );
    }

    #[test]
    fn bad_magic_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_small(dir.path(), "train", true);
        // Labels where images belong.
        let labels = idx_bytes(LABELS_MAGIC, &[3], &[1, 2, 3]);
        let path = dir.path().join("train-images-idx3-ubyte.gz");
        std::fs::write(&path, gz(&labels)).unwrap();
        let e = load_split(dir.path(), true).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: not an IDX images file (magic 0x00000801)",
                path.display()
            )
        );
    }

    #[test]
    fn truncated_and_oversized_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_small(dir.path(), "train", false);
        let path = dir.path().join("train-images-idx3-ubyte");
        let full = std::fs::read(&path).unwrap();
        std::fs::write(&path, &full[..full.len() - 5]).unwrap();
        let e = load_split(dir.path(), true).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("{}: truncated: expected 28 bytes, found 23", path.display())
        );

        std::fs::write(&path, &full[..6]).unwrap();
        let e = load_split(dir.path(), true).unwrap_err().to_string();
        assert!(e.ends_with("truncated: expected 16 bytes, found 6"), "{e}");

        let mut long = full.clone();
        long.push(0);
        std::fs::write(&path, long).unwrap();
        let e = load_split(dir.path(), true).unwrap_err().to_string();
        assert!(
            e.ends_with("1 bytes of trailing data after 28 bytes"),
            "{e}"
        );
    }

    #[test]
    fn corrupt_gzip_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write_small(dir.path(), "train", true);
        let path = dir.path().join("train-labels-idx1-ubyte.gz");
        std::fs::write(&path, b"not gzip at all").unwrap();
        let e = load_split(dir.path(), true).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}: ", path.display())), "{e}");
    }

    #[test]
    fn count_mismatch_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_small(dir.path(), "train", false);
        let labels = idx_bytes(LABELS_MAGIC, &[2], &[1, 2]);
        std::fs::write(dir.path().join("train-labels-idx1-ubyte"), labels).unwrap();
        let e = load_split(dir.path(), true).unwrap_err().to_string();
        assert!(e.contains("holds 3 images but"), "{e}");
        assert!(e.ends_with("holds 2 labels"), "{e}");
    }

    #[test]
    fn load_reads_both_splits_and_filters_them() {
        let dir = tempfile::tempdir().unwrap();
        write_small(dir.path(), "train", false);
        write_small(dir.path(), "t10k", true);
        let mut spec = data_tests::spec(DataFormat::Idx, dir.path());
        let ds = data::load(&spec).unwrap();
        check_small(&ds.train);
        check_small(&ds.test);
        spec.classes = vec![9, 7];
        spec.limit = 1;
        let ds = data::load(&spec).unwrap();
        assert_eq!(data_tests::ints(&ds.train.batch(&[0]).1), [7]);
        assert_eq!(ds.train.len(), 1);
        let (x, y) = ds.test.batch(&[0, 1]);
        assert_eq!(data_tests::ints(&y), [7, 9]);
        assert_eq!(data_tests::floats(&x), [[0.0; 4], [1.0; 4]].concat());
    }

    #[test]
    fn absurd_dimensions_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        write_small(dir.path(), "train", false);
        let path = dir.path().join("train-images-idx3-ubyte");
        let header = idx_bytes(IMAGES_MAGIC, &[u32::MAX; 3], &[]);
        std::fs::write(&path, header).unwrap();
        let e = load_split(dir.path(), true).unwrap_err().to_string();
        assert!(
            e.ends_with(&format!("truncated: expected {} bytes, found 16", u64::MAX)),
            "{e}"
        );
        // No images (and no labels) of an absurd size: an error either way.
        std::fs::write(
            &path,
            idx_bytes(IMAGES_MAGIC, &[0, u32::MAX, u32::MAX], &[]),
        )
        .unwrap();
        let labels = dir.path().join("train-labels-idx1-ubyte");
        std::fs::write(&labels, idx_bytes(LABELS_MAGIC, &[0], &[])).unwrap();
        write_small(dir.path(), "t10k", false);
        let spec = data_tests::spec(DataFormat::Idx, dir.path());
        assert!(data::load(&spec).is_err());
    }

    #[test]
    fn loads_fashion_mnist() {
        let dir = Path::new(FASHION);
        if !dir.is_dir()
            && ringtrain_common::testing::skip(&format!(
                "{FASHION} is missing (scripts/test.sh installs Debian's dataset-fashion-mnist)"
            ))
        {
            return;
        }
        for (train, n) in [(true, 60_000), (false, 10_000)] {
            let split = load_split(dir, train).unwrap();
            assert_eq!(split.len(), n);
            assert_eq!(split.sample_shape(), [1, 28, 28]);
            assert_eq!(split.num_classes(), Some(10));
            let all: Vec<i64> = (0..n as i64).collect();
            let (images, labels) = split.batch(&all);
            assert_eq!(images.size(), [n as i64, 1, 28, 28]);
            let (lo, hi) = (labels.min().int64_value(&[]), labels.max().int64_value(&[]));
            assert_eq!((lo, hi), (0, 9));
            // Balanced classes: n/10 each.
            let counts = labels.bincount::<Tensor>(None, 10);
            assert_eq!(
                Vec::<i64>::try_from(&counts).unwrap(),
                vec![n as i64 / 10; 10]
            );
            let (pmin, pmax) = (
                images.min().double_value(&[]),
                images.max().double_value(&[]),
            );
            assert_eq!((pmin, pmax), (0.0, 1.0));
        }
    }
}
