//! Confining the paths a peer names to the directories a cluster allows.
//!
//! A path is resolved the way the file system would: made absolute,
//! symlinks followed (the nearest existing ancestor is canonicalised and the
//! rest appended, so a directory that does not exist yet can be checked),
//! and a `..` in the part that does not exist is refused rather than trusted.
//! Then it must lie inside one of the roots (or be one).

use std::path::{Component, Path, PathBuf};

use crate::quote;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("{key}: '{path}' is outside the allowed directories ({roots})")]
    Outside {
        key: &'static str,
        path: String,
        roots: String,
    },
    #[error("{key}: '{path}' cannot be resolved: {reason}")]
    Unresolvable {
        key: &'static str,
        path: String,
        reason: String,
    },
}

impl PathError {
    /// The spec key (or request field) the path came from.
    pub fn key(&self) -> &'static str {
        match self {
            PathError::Outside { key, .. } | PathError::Unresolvable { key, .. } => key,
        }
    }
}

/// `path` as the file system resolves it (see the module docs).
pub fn resolve(path: &Path) -> std::io::Result<PathBuf> {
    let absolute = std::path::absolute(path)?;
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    let canonical = loop {
        match existing.canonicalize() {
            Ok(c) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // A dangling symlink would be followed when written to.
                if existing.symlink_metadata().is_ok() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("{} is a symlink to nothing", existing.display()),
                    ));
                }
                // No file name: the missing part ends in `..`, which cannot
                // be resolved without guessing what the directory would be.
                let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "'..' after a directory that does not exist",
                    ));
                };
                rest.push(name.to_owned());
                existing = parent;
            }
            Err(e) => return Err(e),
        }
    };
    let mut out = canonical;
    out.extend(rest.into_iter().rev());
    Ok(out)
}

/// Resolves every root once (they need not exist yet), dropping duplicates.
pub fn resolve_roots(roots: &[PathBuf]) -> std::io::Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = Vec::new();
    for r in roots {
        let r = resolve(r)?;
        if !out.contains(&r) {
            out.push(r);
        }
    }
    Ok(out)
}

/// `path` (from `key`) resolved, if it lies inside one of `roots` (already
/// resolved, see [`resolve_roots`]).
pub fn confine(key: &'static str, path: &str, roots: &[PathBuf]) -> Result<PathBuf, PathError> {
    let resolved = resolve(Path::new(path)).map_err(|e| PathError::Unresolvable {
        key,
        path: quote(path).into_owned(),
        reason: e.to_string(),
    })?;
    if roots.iter().any(|r| resolved.starts_with(r)) {
        Ok(resolved)
    } else {
        Err(PathError::Outside {
            key,
            path: quote(path).into_owned(),
            roots: roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

/// Whether `path` lies inside `root` (or is it), by components, with no
/// `..` or `.` to trick a prefix test: for paths already resolved.
pub fn lexically_inside(path: &Path, root: &Path) -> bool {
    path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        && path.starts_with(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_inside_a_root_pass_and_escapes_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir_all(root.join("data")).unwrap();
        std::fs::create_dir_all(tmp.path().join("secret")).unwrap();
        let roots = resolve_roots(std::slice::from_ref(&root)).unwrap();
        let s = |p: &Path| p.to_str().unwrap().to_string();

        assert!(confine("k", &s(&root.join("data")), &roots).is_ok());
        // Not there yet: checked through its nearest existing ancestor.
        assert!(confine("k", &s(&root.join("new/ckpt")), &roots).is_ok());
        assert!(confine("k", &s(&root), &roots).is_ok(), "the root itself");

        let e = confine("dataset.path", &s(&tmp.path().join("secret")), &roots).unwrap_err();
        assert_eq!(e.key(), "dataset.path");
        assert!(e.to_string().starts_with("dataset.path: '"), "{e}");
        assert!(
            e.to_string().contains("outside the allowed directories"),
            "{e}"
        );

        // `..` through an existing directory resolves out of the root.
        let up = format!("{}/data/../../secret", s(&root));
        assert!(matches!(
            confine("k", &up, &roots),
            Err(PathError::Outside { .. })
        ));
        // `..` inside a part that does not exist is refused outright.
        let missing = format!("{}/nothere/../../secret/x", s(&root));
        assert!(confine("k", &missing, &roots).is_err());
        // A prefix of a name is not a parent.
        let sibling = format!("{}-evil", s(&root));
        assert!(confine("k", &sibling, &roots).is_err());
    }

    #[test]
    fn a_symlink_out_of_a_root_is_followed_and_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(tmp.path().join("secret")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("secret"), root.join("link")).unwrap();
        let roots = resolve_roots(std::slice::from_ref(&root)).unwrap();
        let via_link = root.join("link/new-dir");
        let e = confine("checkpoint.dir", via_link.to_str().unwrap(), &roots).unwrap_err();
        assert!(matches!(
            e,
            PathError::Outside {
                key: "checkpoint.dir",
                ..
            }
        ));
        std::os::unix::fs::symlink(tmp.path().join("secret/none"), root.join("dangling")).unwrap();
        let dangling = root.join("dangling");
        assert!(confine("k", dangling.to_str().unwrap(), &roots).is_err());
    }

    #[test]
    fn a_long_path_is_quoted_short() {
        let long = format!("/{}", "x".repeat(100_000));
        let e = confine("k", &long, &[PathBuf::from("/nonexistent-root")]).unwrap_err();
        assert!(e.to_string().len() < 400, "{}", e.to_string().len());
    }

    #[test]
    fn lexical_containment_ignores_dot_dot_tricks() {
        assert!(lexically_inside(Path::new("/a/b/c"), Path::new("/a/b")));
        assert!(lexically_inside(Path::new("/a/b"), Path::new("/a/b")));
        assert!(!lexically_inside(Path::new("/a/b/../x"), Path::new("/a/b")));
        assert!(!lexically_inside(Path::new("/a/bc"), Path::new("/a/b")));
        assert!(!lexically_inside(Path::new("a/b"), Path::new("a")));
    }
}
