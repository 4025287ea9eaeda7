//! The directories a submission may name (see [`ringtrain_common::paths`]):
//! data under the data roots, checkpoints under the checkpoint roots. Every
//! path of a spec is checked, and replaced by what it resolves to, so the
//! workers read and write exactly what was checked. Blocking (file system).

use std::path::PathBuf;

use ringtrain_common::jobspec::{JobSpec, ModelSource};
use ringtrain_common::paths::{confine, PathError};

/// Resolved roots (see [`crate::config::CoordinatorConfig`]).
#[derive(Clone, Debug, Default)]
pub struct Roots {
    pub data: Vec<PathBuf>,
    pub checkpoints: Vec<PathBuf>,
}

/// Where a confined submission reads and writes.
#[derive(Debug, PartialEq)]
pub struct Confined {
    pub resume_from: String,
    pub checkpoint_dir: String,
}

fn text(p: PathBuf) -> String {
    p.to_string_lossy().into_owned()
}

/// Checks and resolves every path of `spec` and `resume_from`; a job
/// without a checkpoint dir of its own writes to `default_checkpoint_dir`.
pub fn submission(
    spec: &mut JobSpec,
    resume_from: &str,
    default_checkpoint_dir: PathBuf,
    roots: &Roots,
) -> Result<Confined, PathError> {
    let data = |key, path: &mut String| -> Result<(), PathError> {
        if !path.is_empty() {
            *path = text(confine(key, path, &roots.data)?);
        }
        Ok(())
    };
    data("dataset.path", &mut spec.dataset.path)?;
    data("dataset.test_path", &mut spec.dataset.test_path)?;
    data("init_from", &mut spec.init_from)?;
    if let ModelSource::ScriptFile(path) = &mut spec.model {
        data("model", path)?;
    }
    let mut resume = resume_from.to_string();
    data("resume_from", &mut resume)?;
    let checkpoint_dir = if spec.checkpoint.dir.is_empty() {
        default_checkpoint_dir
    } else {
        let dir = confine("checkpoint.dir", &spec.checkpoint.dir, &roots.checkpoints)?;
        spec.checkpoint.dir = text(dir.clone());
        dir
    };
    Ok(Confined {
        resume_from: resume,
        checkpoint_dir: text(checkpoint_dir),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringtrain_common::paths::resolve_roots;
    use ringtrain_common::testing::MINIMAL_SPEC;

    fn setup() -> (tempfile::TempDir, Roots) {
        let tmp = tempfile::tempdir().unwrap();
        for d in ["data/set", "ckpt/mine", "outside"] {
            std::fs::create_dir_all(tmp.path().join(d)).unwrap();
        }
        let roots = Roots {
            data: resolve_roots(&[tmp.path().join("data"), tmp.path().join("ckpt")]).unwrap(),
            checkpoints: resolve_roots(&[tmp.path().join("ckpt")]).unwrap(),
        };
        (tmp, roots)
    }

    fn spec(sets: &[String]) -> JobSpec {
        JobSpec::parse(MINIMAL_SPEC, sets).unwrap()
    }

    #[test]
    fn every_path_of_a_spec_must_be_inside_its_roots_and_the_error_names_the_key() {
        let (tmp, roots) = setup();
        let p = |s: &str| tmp.path().join(s).to_str().unwrap().to_string();
        let default_dir = tmp.path().join("ckpt/job/checkpoint");
        let mut ok = spec(&[
            format!("dataset.path={}", p("data/set")),
            format!("checkpoint.dir={}", p("ckpt/mine/../run1")),
            format!("init_from={}", p("ckpt/old")),
        ]);
        let c = submission(&mut ok, &p("ckpt/old"), default_dir.clone(), &roots).unwrap();
        assert!(
            c.checkpoint_dir.ends_with("/ckpt/run1"),
            "{}",
            c.checkpoint_dir
        );
        assert_eq!(
            ok.checkpoint.dir, c.checkpoint_dir,
            "the spec names it resolved"
        );

        for (set, key) in [
            (format!("dataset.path={}", p("outside")), "dataset.path"),
            (
                format!("dataset.test_path={}", p("outside/t")),
                "dataset.test_path",
            ),
            ("dataset.path=/etc".to_string(), "dataset.path"),
            (
                format!("checkpoint.dir={}", p("data/set")),
                "checkpoint.dir",
            ),
            (
                format!("checkpoint.dir={}", p("ckpt/../outside")),
                "checkpoint.dir",
            ),
            (format!("init_from={}", p("outside")), "init_from"),
            (format!("model={}", p("outside/net.pt")), "model"),
        ] {
            let mut s = spec(&[format!("dataset.path={}", p("data/set")), set.clone()]);
            let e = submission(&mut s, "", default_dir.clone(), &roots).unwrap_err();
            assert_eq!(e.key(), key, "{set}: {e}");
        }
        let mut s = spec(&[format!("dataset.path={}", p("data/set"))]);
        let e = submission(&mut s, "/root", default_dir, &roots).unwrap_err();
        assert_eq!(e.key(), "resume_from");
    }
}
