//! Security of every connection: mutual TLS with a cluster CA ([`tls`]),
//! bearer tokens with roles for clients ([`tokens`]), and the certificates
//! and tokens `ringtrain certs init` makes ([`certs`]).
//!
//! A process runs either with a TLS dir or, only when asked explicitly, in
//! the clear ([`Transport::from_flags`]): there is no silent default.

pub mod certs;
pub mod tls;
pub mod tokens;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

pub use tls::{CertRole, TlsDir, TlsError};
pub use tokens::{Principal, Role, Tokens, TokensError};

/// The one-line error of a process started with neither option.
pub const NEITHER_GIVEN: &str = "no transport security chosen: pass --tls-dir DIR (or set RINGTRAIN_TLS_DIR; make one with `ringtrain certs init DIR`), or --insecure to run in the clear";

/// How a process's connections are made: mutual TLS from a TLS dir, or
/// plaintext (only by an explicit `--insecure`).
#[derive(Clone, Debug)]
pub enum Transport {
    Tls(Arc<TlsDir>),
    Insecure,
}

impl Transport {
    /// From `--tls-dir` / `--insecure`: exactly one must be given. An empty
    /// path counts as not given (config files and env use "" for none).
    pub fn from_flags(tls_dir: Option<&Path>, insecure: bool) -> Result<Self, TlsError> {
        let tls_dir = tls_dir.filter(|p| !p.as_os_str().is_empty());
        match (tls_dir, insecure) {
            (Some(dir), false) => Ok(Self::Tls(Arc::new(TlsDir::open(dir)?))),
            (None, true) => {
                tracing::warn!("--insecure: connections are neither encrypted nor authenticated");
                Ok(Self::Insecure)
            }
            (Some(_), true) => Err(TlsError::Conflict),
            (None, false) => Err(TlsError::NotChosen),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(_))
    }

    pub fn tls_dir(&self) -> Option<&TlsDir> {
        match self {
            Self::Tls(dir) => Some(dir),
            Self::Insecure => None,
        }
    }

    /// A gRPC endpoint for `addr` (`HOST:PORT` or a URL of either scheme):
    /// `https` with this process's certificate (`role`) and the cluster CA,
    /// or `http` in the clear. The server's certificate must name the role
    /// `server` plays (addresses are what peers advertise, so the role is
    /// what counts), or with None the host of `addr`.
    pub fn endpoint(
        &self,
        addr: &str,
        role: CertRole,
        server: Option<CertRole>,
    ) -> Result<tonic::transport::Endpoint, TlsError> {
        let hostport = addr
            .split_once("://")
            .map_or(addr, |(_, rest)| rest)
            .trim_end_matches('/');
        let scheme = if self.is_tls() { "https" } else { "http" };
        let url = format!("{scheme}://{hostport}");
        let endpoint = tonic::transport::Endpoint::from_shared(url)
            .map_err(|_| TlsError::BadAddress(crate::quote(addr).into_owned()))?;
        match self {
            Self::Insecure => Ok(endpoint),
            Self::Tls(dir) => {
                let mut tls = dir.client_tls(role)?;
                if let Some(server) = server {
                    tls = tls.domain_name(server.identity_name());
                }
                endpoint
                    .tls_config(tls)
                    .map_err(|e| TlsError::Config(e.to_string()))
            }
        }
    }

    /// `builder` serving TLS with `role`'s certificate, every client required
    /// to present a certificate signed by the cluster CA; unchanged when
    /// insecure.
    pub fn server(
        &self,
        builder: tonic::transport::Server,
        role: CertRole,
    ) -> Result<tonic::transport::Server, TlsError> {
        match self {
            Self::Insecure => Ok(builder),
            Self::Tls(dir) => builder
                .tls_config(dir.server_tls(role)?)
                .map_err(|e| TlsError::Config(e.to_string())),
        }
    }
}

static PROCESS_TRANSPORT: OnceLock<Transport> = OnceLock::new();

/// Sets the transport of this process once (the worker does at start), for
/// code far from the command line: the ring's gRPC dialer and server.
pub fn install(transport: Transport) {
    let _ = PROCESS_TRANSPORT.set(transport);
}

/// The transport [`install`]ed, else plaintext (benchmarks and tests of the
/// data plane run in one process and install nothing).
pub fn process_transport() -> Transport {
    PROCESS_TRANSPORT
        .get()
        .cloned()
        .unwrap_or(Transport::Insecure)
}

/// `DIR/token`, the admin token `certs init` writes, when it is there.
pub fn default_token(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(certs::TOKEN_FILE)).ok()?;
    let token = text.trim();
    (!token.is_empty()).then(|| token.to_string())
}

/// A path from a config value, None when empty.
pub fn non_empty(path: &str) -> Option<PathBuf> {
    (!path.is_empty()).then(|| PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neither_option_is_an_error_naming_both() {
        let e = Transport::from_flags(None, false).unwrap_err().to_string();
        assert!(e.contains("--tls-dir") && e.contains("--insecure"), "{e}");
        assert!(!e.contains('\n'));
        let empty = Transport::from_flags(Some(Path::new("")), false).unwrap_err();
        assert!(matches!(empty, TlsError::NotChosen));
        let both = Transport::from_flags(Some(Path::new("/x")), true).unwrap_err();
        assert!(matches!(both, TlsError::Conflict), "{both}");
        assert!(Transport::from_flags(None, true).is_ok());
    }

    #[test]
    fn a_missing_tls_dir_is_named() {
        let e = Transport::from_flags(Some(Path::new("/no/such/dir")), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/no/such/dir"), "{e}");
    }
}
