//! `format = "text"`: a byte-level corpus, one file or the regular files
//! directly in a directory (sorted by name, concatenated). With `context = N`
//! sample `i` is the window of bytes `[i N, i N + N + 1)`: its first `N`
//! bytes are the inputs, its last `N` the targets (each position predicts the
//! next byte). Consecutive windows overlap by one byte, so every byte after
//! the first is a target exactly once, up to the last whole window (the
//! fewer than `N` bytes after it are not used).
//!
//! The test split is `test_path` (a file or directory, windowed alike) or
//! else the corpus's tail: its last `round(len × test_fraction)` bytes, held
//! out whole (no window spans the cut).
//!
//! The corpus stays u8 in memory; a split is a `[windows, N + 1]` view of
//! it, and only a batch's rows are widened to i64.

use std::path::{Path, PathBuf};

use tch::Tensor;

use super::{read_file, DataError, Dataset, Split};

pub(super) fn load(
    path: &Path,
    test_path: Option<&Path>,
    context: usize,
    test_fraction: f64,
) -> Result<Dataset, DataError> {
    if context == 0 {
        return Err(DataError::BadSpec {
            key: "context",
            problem: "must be at least 1 for text (bytes per sample)".into(),
        });
    }
    let corpus = read_corpus(path)?;
    if let Some(test_path) = test_path {
        let test = read_corpus(test_path)?;
        return Ok(Dataset {
            train: windows(path, &Tensor::from_slice(&corpus), context)?,
            test: windows(test_path, &Tensor::from_slice(&test), context)?,
        });
    }

    if !(test_fraction > 0.0 && test_fraction < 1.0) {
        return Err(DataError::BadSpec {
            key: "test_fraction",
            problem: format!("must be in (0, 1) (got {test_fraction})"),
        });
    }
    let total = corpus.len();
    if total <= context {
        return Err(too_short(path, total, context));
    }
    let test_len = ((total as f64 * test_fraction).round() as usize).min(total);
    let cut = total - test_len;
    for (part, bytes) in [("training", cut), ("held-out test", test_len)] {
        if bytes <= context {
            return Err(DataError::PartTooShort {
                path: path.to_owned(),
                part,
                bytes: bytes as u64,
                total: total as u64,
                fraction: test_fraction,
                context,
            });
        }
    }
    let all = Tensor::from_slice(&corpus);
    Ok(Dataset {
        train: windows(path, &all.narrow(0, 0, cut as i64), context)?,
        test: windows(path, &all.narrow(0, cut as i64, test_len as i64), context)?,
    })
}

/// The windows of `bytes` (1-D u8): a view, `[(len - 1) / context, context + 1]`.
fn windows(path: &Path, bytes: &Tensor, context: usize) -> Result<Split, DataError> {
    let len = bytes.size()[0] as usize;
    if len <= context {
        return Err(too_short(path, len, context));
    }
    let n = context as i64;
    Ok(Split::windows(bytes.unfold(0, n + 1, n)))
}

fn too_short(path: &Path, bytes: usize, context: usize) -> DataError {
    DataError::CorpusTooShort {
        path: path.to_owned(),
        bytes: bytes as u64,
        context,
    }
}

/// The bytes of a file, or of the text files directly in a directory
/// (sorted by name, concatenated): each file once, however many links name
/// it, and files holding a NUL byte (binary, such as fortune's .dat
/// indexes) left out. Empty is an error.
fn read_corpus(path: &Path) -> Result<Vec<u8>, DataError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source: std::io::Error| {
            if source.kind() == std::io::ErrorKind::NotFound {
                DataError::Missing { path }
            } else {
                DataError::Io { path, source }
            }
        }
    };
    let meta = std::fs::metadata(path).map_err(io(path))?;
    let corpus = if meta.is_dir() {
        let mut files: Vec<PathBuf> = Vec::new();
        for entry in std::fs::read_dir(path).map_err(io(path))? {
            let file = entry.map_err(io(path))?.path();
            if file.is_file() {
                files.push(file);
            }
        }
        files.sort();
        let mut seen = std::collections::HashSet::new();
        let mut corpus = Vec::new();
        for file in &files {
            let real = std::fs::canonicalize(file).map_err(io(file))?;
            if !seen.insert(real) {
                continue;
            }
            let bytes = read_file(file)?;
            if !bytes.contains(&0) {
                corpus.extend(bytes);
            }
        }
        corpus
    } else {
        read_file(path)?
    };
    if corpus.is_empty() {
        return Err(DataError::EmptyCorpus {
            path: path.to_owned(),
        });
    }
    Ok(corpus)
}

#[cfg(test)]
mod tests {
    use ringtrain_common::jobspec::{DataFormat, DatasetSpec};
    use tch::Kind;

    use super::*;
    use crate::data::tests::{ints, spec};
    use crate::data::{self, Samples};

    fn text_spec(path: &Path, context: usize) -> DatasetSpec {
        let mut s = spec(DataFormat::Text, path);
        s.context = context;
        s
    }

    /// Inputs and targets of every window, in order, as i64 rows.
    fn all_windows(split: &Split) -> (Vec<Vec<i64>>, Vec<Vec<i64>>) {
        let idx: Vec<i64> = (0..split.len() as i64).collect();
        let (x, y) = split.batch(&idx);
        let rows = |t: &Tensor| {
            let width = t.size()[1] as usize;
            ints(t).chunks(width).map(<[i64]>::to_vec).collect()
        };
        (rows(&x), rows(&y))
    }

    /// The windows as the spec defines them, computed from the bytes alone.
    fn expected_windows(bytes: &[u8], n: usize) -> (Vec<Vec<i64>>, Vec<Vec<i64>>) {
        let mut inputs = Vec::new();
        let mut targets = Vec::new();
        let mut i = 0;
        while i * n + n < bytes.len() {
            let w: Vec<i64> = bytes[i * n..=i * n + n].iter().map(|&b| b.into()).collect();
            inputs.push(w[..n].to_vec());
            targets.push(w[1..].to_vec());
            i += 1;
        }
        (inputs, targets)
    }

    /// Bytes that do not repeat with a short period (a linear congruential
    /// sequence), so that a window at the wrong offset shows.
    fn noise(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                (x >> 16) as u8
            })
            .collect()
    }

    #[test]
    fn a_file_is_windowed_and_its_tail_held_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("corpus.txt");
        let corpus: Vec<u8> = (0..100).collect();
        std::fs::write(&path, &corpus).unwrap();
        let mut s = text_spec(&path, 4);
        s.test_fraction = 0.2;
        let ds = data::load(&s).unwrap();
        // Train: bytes 0..80, (80 - 1) / 4 windows; test: bytes 80..100.
        assert_eq!((ds.train.len(), ds.test.len()), (19, 4));
        assert_eq!(ds.train.sample_shape(), [4]);
        assert_eq!(ds.test.sample_shape(), [4]);
        assert_eq!(
            (ds.train.num_classes(), ds.test.num_classes()),
            (None, None)
        );

        let (x, y) = ds.train.batch(&[0, 18]);
        assert_eq!((x.size(), x.kind()), (vec![2, 4], Kind::Int64));
        assert_eq!((y.size(), y.kind()), (vec![2, 4], Kind::Int64));
        assert_eq!(ints(&x), [0, 1, 2, 3, 72, 73, 74, 75]);
        assert_eq!(ints(&y), [1, 2, 3, 4, 73, 74, 75, 76]);
        let (x, y) = ds.test.batch(&[3, 0]);
        assert_eq!(ints(&x), [92, 93, 94, 95, 80, 81, 82, 83]);
        assert_eq!(ints(&y), [93, 94, 95, 96, 81, 82, 83, 84]);

        // Held out: no training window reaches the tail, no test window the head.
        let (x, y) = all_windows(&ds.train);
        assert!(x.iter().chain(&y).flatten().all(|&b| b < 80));
        let (x, y) = all_windows(&ds.test);
        assert!(x.iter().chain(&y).flatten().all(|&b| b >= 80));

        // The default fraction, 0.1: the last 10 bytes.
        let ds = data::load(&text_spec(&path, 4)).unwrap();
        assert_eq!(all_windows(&ds.train), expected_windows(&corpus[..90], 4));
        assert_eq!(all_windows(&ds.test), expected_windows(&corpus[90..], 4));
        assert_eq!((ds.train.len(), ds.test.len()), (22, 2));
    }

    #[test]
    fn every_byte_after_the_first_is_a_target_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let (path, test) = (dir.path().join("train"), dir.path().join("test"));
        std::fs::write(&test, noise(50, 9)).unwrap();
        for (len, context) in [(7 * 85 + 1, 7), (600, 7), (1000, 1), (33, 32), (34, 32)] {
            let corpus = noise(len, len as u32);
            std::fs::write(&path, &corpus).unwrap();
            let mut s = text_spec(&path, context);
            s.test_path = test.display().to_string();
            let ds = data::load(&s).unwrap();
            let (inputs, targets) = all_windows(&ds.train);
            // Count, per corpus position, the windows that target it.
            let mut hits = vec![0u32; len];
            for (w, row) in targets.iter().enumerate() {
                for (k, &b) in row.iter().enumerate() {
                    let pos = w * context + 1 + k;
                    assert_eq!(b, i64::from(corpus[pos]), "window {w} target {k}");
                    hits[pos] += 1;
                }
            }
            let used = (len - 1) / context * context;
            assert_eq!(hits[0], 0);
            assert!(hits[1..=used].iter().all(|&h| h == 1), "len {len}");
            assert!(hits[used + 1..].iter().all(|&h| h == 0));
            assert!(len - 1 - used < context, "a whole window was left out");
            assert_eq!(
                (inputs, targets),
                expected_windows(&corpus, context),
                "len {len}, context {context}"
            );
        }
    }

    #[test]
    fn a_directory_is_its_files_sorted_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("corpus");
        std::fs::create_dir(&corpus).unwrap();
        std::fs::write(corpus.join("b.txt"), "world").unwrap();
        std::fs::write(corpus.join("a.txt"), "hello ").unwrap();
        std::fs::create_dir(corpus.join("c")).unwrap();
        std::fs::write(corpus.join("c").join("deeper.txt"), "NOT READ").unwrap();
        // Binary files and second names of a file are left out.
        std::fs::write(corpus.join("a.dat"), b"\x00\x01index").unwrap();
        std::os::unix::fs::symlink(corpus.join("b.txt"), corpus.join("b.u8")).unwrap();
        let test = dir.path().join("test");
        std::fs::create_dir(&test).unwrap();
        std::fs::write(test.join("2"), "89").unwrap();
        std::fs::write(test.join("1"), "01234567").unwrap();

        let mut s = text_spec(&corpus, 2);
        s.test_path = test.display().to_string();
        let ds = data::load(&s).unwrap();
        assert_eq!(all_windows(&ds.train), expected_windows(b"hello world", 2));
        assert_eq!(ds.train.len(), 5);
        let (x, y) = ds.train.batch(&[4]);
        assert_eq!(ints(&x), [b'r', b'l'].map(i64::from));
        assert_eq!(ints(&y), [b'l', b'd'].map(i64::from));
        assert_eq!(all_windows(&ds.test), expected_windows(b"0123456789", 2));
        assert_eq!(ds.test.len(), 4);
    }

    #[test]
    fn limit_cuts_train_only_and_classes_do_not_apply() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        std::fs::write(&path, (0..100).collect::<Vec<u8>>()).unwrap();
        let mut s = text_spec(&path, 4);
        s.limit = 5;
        let ds = data::load(&s).unwrap();
        assert_eq!((ds.train.len(), ds.test.len()), (5, 2));
        assert_eq!(ints(&ds.train.batch(&[4]).1), [17, 18, 19, 20]);

        s.limit = 0;
        s.classes = vec![1];
        assert_eq!(
            data::load(&s).unwrap_err().to_string(),
            format!(
                "dataset.classes needs 1-D integer targets, but {} has targets of Int64 [22, 4]",
                path.display()
            )
        );
    }

    #[test]
    fn the_corpus_stays_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        std::fs::write(&path, noise(1000, 1)).unwrap();
        let ds = data::load(&text_spec(&path, 8)).unwrap();
        let Samples::Windows(w) = &ds.train.samples else {
            panic!("windows")
        };
        assert_eq!(w.kind(), Kind::Uint8);
        assert_eq!(w.size(), [112, 9]);
        // A view of the corpus, not a copy per window.
        assert_eq!(w.stride(), [8, 1]);
    }

    #[test]
    fn short_empty_and_missing_corpora_are_errors_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.txt");
        let p = path.display().to_string();
        let err = |s: &DatasetSpec| data::load(s).unwrap_err().to_string();

        assert_eq!(
            err(&text_spec(&path, 4)),
            format!("dataset not found: {p} does not exist")
        );
        std::fs::write(&path, "").unwrap();
        assert_eq!(err(&text_spec(&path, 4)), format!("{p}: empty text corpus"));
        std::fs::write(&path, "abcd").unwrap();
        assert_eq!(
            err(&text_spec(&path, 4)),
            format!(
                "{p}: a text corpus of 4 bytes is shorter than one sample (5 bytes for context 4)"
            )
        );

        // 20 bytes, test_fraction 0.1: a 2-byte tail.
        std::fs::write(&path, [7u8; 20]).unwrap();
        assert_eq!(
            err(&text_spec(&path, 4)),
            format!("{p}: the held-out test part of the corpus (2 of its 20 bytes, test_fraction 0.1) is shorter than one sample (5 bytes for context 4)")
        );
        let mut s = text_spec(&path, 4);
        s.test_fraction = 0.9;
        assert_eq!(
            err(&s),
            format!("{p}: the training part of the corpus (2 of its 20 bytes, test_fraction 0.9) is shorter than one sample (5 bytes for context 4)")
        );
        s.test_fraction = 1.0;
        assert_eq!(err(&s), "dataset.test_fraction must be in (0, 1) (got 1)");
        assert_eq!(
            err(&text_spec(&path, 0)),
            "dataset.context must be at least 1 for text (bytes per sample)"
        );

        // A test file too short for one window, and an empty directory.
        let test = dir.path().join("t.txt");
        std::fs::write(&test, "abc").unwrap();
        let mut s = text_spec(&path, 4);
        s.test_path = test.display().to_string();
        assert_eq!(
            err(&s),
            format!(
                "{}: a text corpus of 3 bytes is shorter than one sample (5 bytes for context 4)",
                test.display()
            )
        );
        let empty = dir.path().join("empty");
        std::fs::create_dir_all(empty.join("sub")).unwrap();
        s.test_path = empty.display().to_string();
        assert_eq!(err(&s), format!("{}: empty text corpus", empty.display()));
    }
}
