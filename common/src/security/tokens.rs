//! Client tokens: a TOML file maps each bearer token to a principal and a
//! role. Tokens are kept only as SHA-256 digests and every entry is compared
//! in constant time, so neither memory nor timing tells a token away.
//!
//! ```toml
//! [[tokens]]
//! token = "9f2c..."        # what the client sends (Authorization: Bearer ...)
//! principal = "alice"      # who the coordinator records as a job's submitter
//! role = "submitter"       # admin | submitter
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a client may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything.
    Admin,
    /// Submit jobs; see, watch and cancel its own; see others' by name and state.
    Submitter,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "admin" => Ok(Role::Admin),
            "submitter" => Ok(Role::Submitter),
            other => Err(format!(
                "unknown role '{}' (admin or submitter)",
                crate::quote(other)
            )),
        }
    }
}

/// An authenticated client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub role: Role,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// Whether this client may see everything of, and cancel, a job
    /// submitted by `owner`.
    pub fn owns(&self, owner: &str) -> bool {
        self.is_admin() || self.name == owner
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("tokens file {path}: {message}")]
    Read { path: String, message: String },
    #[error("tokens file {path}: {message}")]
    Invalid { path: String, message: String },
}

/// One line of the file, as written.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    pub token: String,
    pub principal: String,
    pub role: Role,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensFile {
    #[serde(default)]
    pub tokens: Vec<TokenEntry>,
}

/// The shortest token accepted: shorter ones can be guessed.
pub const MIN_TOKEN_LEN: usize = 16;

/// Tokens by digest.
#[derive(Clone)]
pub struct Tokens {
    entries: Vec<([u8; 32], Principal)>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the digests.
        write!(f, "Tokens({} entries)", self.entries.len())
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Tokens {
    pub fn load(path: &Path) -> Result<Self, TokensError> {
        let text = std::fs::read_to_string(path).map_err(|e| TokensError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::parse(&text).map_err(|message| TokensError::Invalid {
            path: path.display().to_string(),
            message,
        })
    }

    /// Parses a tokens file; refuses short tokens, empty principals and a
    /// token given twice.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: TokensFile = toml::from_str(text).map_err(|e| e.message().to_string())?;
        let mut entries: Vec<([u8; 32], Principal)> = Vec::new();
        for (i, e) in file.tokens.iter().enumerate() {
            let n = i + 1;
            if e.token.len() < MIN_TOKEN_LEN {
                return Err(format!(
                    "token {n} ({}) is shorter than {MIN_TOKEN_LEN} characters",
                    crate::quote(&e.principal)
                ));
            }
            if e.principal.trim().is_empty() {
                return Err(format!("token {n} has an empty principal"));
            }
            let d = digest(&e.token);
            if entries.iter().any(|(other, _)| *other == d) {
                return Err(format!("token {n} is given twice"));
            }
            entries.push((
                d,
                Principal {
                    name: e.principal.clone(),
                    role: e.role,
                },
            ));
        }
        if entries.is_empty() {
            return Err("no [[tokens]] entry: nobody could call the coordinator".into());
        }
        Ok(Self { entries })
    }

    /// The principal of `token`. Compares against every entry, in constant
    /// time each, whether or not one matched earlier.
    pub fn check(&self, token: &str) -> Option<Principal> {
        let d = digest(token);
        let mut found = None;
        for (stored, principal) in &self.entries {
            if bool::from(stored.ct_eq(&d)) {
                found = Some(principal);
            }
        }
        found.cloned()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The token of a request's `authorization: Bearer TOKEN` header.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[[tokens]]
token = "admin-token-0123456789"
principal = "ops"
role = "admin"

[[tokens]]
token = "alice-token-0123456789"
principal = "alice"
role = "submitter"
"#;

    #[test]
    fn tokens_map_to_principals_and_roles() {
        let t = Tokens::parse(FILE).unwrap();
        assert_eq!(t.len(), 2);
        let ops = t.check("admin-token-0123456789").unwrap();
        assert_eq!((ops.name.as_str(), ops.role), ("ops", Role::Admin));
        let alice = t.check("alice-token-0123456789").unwrap();
        assert_eq!(
            (alice.name.as_str(), alice.role),
            ("alice", Role::Submitter)
        );
        assert!(alice.owns("alice") && !alice.owns("bob") && ops.owns("bob"));
    }

    #[test]
    fn a_wrong_or_partial_token_matches_nothing() {
        let t = Tokens::parse(FILE).unwrap();
        for wrong in [
            "",
            "admin-token-012345678",
            "admin-token-01234567890",
            "ADMIN-TOKEN-0123456789",
        ] {
            assert_eq!(t.check(wrong), None, "{wrong}");
        }
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let short = "[[tokens]]\ntoken = \"abc\"\nprincipal = \"x\"\nrole = \"admin\"\n";
        assert!(Tokens::parse(short).unwrap_err().contains("shorter"));
        let role =
            "[[tokens]]\ntoken = \"0123456789abcdefg\"\nprincipal = \"x\"\nrole = \"root\"\n";
        assert!(Tokens::parse(role).unwrap_err().contains("root"));
        let twice = format!("{}\n[[tokens]]\ntoken = \"alice-token-0123456789\"\nprincipal = \"eve\"\nrole = \"admin\"\n", FILE);
        assert!(Tokens::parse(&twice).unwrap_err().contains("twice"));
        assert!(Tokens::parse("").unwrap_err().contains("no [[tokens]]"));
        let extra = "[[tokens]]\ntoken = \"0123456789abcdefg\"\nprincipal = \"x\"\nrole = \"admin\"\nrol = 1\n";
        assert!(Tokens::parse(extra).is_err());
    }

    #[test]
    fn bearer_headers_are_read() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("abc"), None);
    }
}
