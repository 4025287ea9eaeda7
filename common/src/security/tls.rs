//! A TLS dir (what `ringtrain certs init` writes) turned into TLS settings:
//! tonic's for the gRPC services, plain rustls's for raw TCP links. Every
//! side presents a certificate signed by the cluster CA and checks the
//! other's; which role a peer plays is read from its certificate
//! ([`peer_role`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use super::certs::CA_CERT;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}", super::NEITHER_GIVEN)]
    NotChosen,
    #[error("--tls-dir and --insecure contradict each other: pass only one")]
    Conflict,
    #[error("TLS dir {dir}: {file} is missing (make the dir with `ringtrain certs init DIR`)")]
    Missing { dir: String, file: String },
    #[error("TLS dir {dir}: cannot read {file}: {message}")]
    Unreadable {
        dir: String,
        file: String,
        message: String,
    },
    #[error("TLS settings: {0}")]
    Config(String),
    #[error("'{0}' is not a gRPC address (expected HOST:PORT or http(s)://HOST:PORT)")]
    BadAddress(String),
}

/// The part a certificate gives its holder. Each certificate names its role
/// as a DNS name (`worker.ringtrain.internal`), so a service can tell a
/// worker from a client after the CA has vouched for both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertRole {
    Coordinator,
    Worker,
    Client,
}

impl CertRole {
    pub const ALL: [CertRole; 3] = [CertRole::Coordinator, CertRole::Worker, CertRole::Client];

    /// The stem of its files: `worker.pem`, `worker.key`.
    pub fn file_stem(self) -> &'static str {
        match self {
            CertRole::Coordinator => "coordinator",
            CertRole::Worker => "worker",
            CertRole::Client => "client",
        }
    }

    /// The DNS name in its certificate that marks the role.
    pub fn identity_name(self) -> &'static str {
        match self {
            CertRole::Coordinator => "coordinator.ringtrain.internal",
            CertRole::Worker => "worker.ringtrain.internal",
            CertRole::Client => "client.ringtrain.internal",
        }
    }
}

impl std::fmt::Display for CertRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.file_stem())
    }
}

/// A directory holding `ca.pem` and some of `ROLE.pem`/`ROLE.key`: a
/// process needs only the CA and its own role's pair.
#[derive(Clone, Debug)]
pub struct TlsDir {
    dir: PathBuf,
}

fn ring_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsDir {
    /// A TLS dir whose CA certificate is there (role files are checked when
    /// they are used).
    pub fn open(dir: &Path) -> Result<Self, TlsError> {
        let this = Self {
            dir: std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf()),
        };
        this.read(CA_CERT)?;
        Ok(this)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn read(&self, file: &str) -> Result<Vec<u8>, TlsError> {
        let path = self.dir.join(file);
        std::fs::read(&path).map_err(|e| {
            let dir = self.dir.display().to_string();
            if e.kind() == std::io::ErrorKind::NotFound {
                TlsError::Missing {
                    dir,
                    file: file.into(),
                }
            } else {
                TlsError::Unreadable {
                    dir,
                    file: file.into(),
                    message: e.to_string(),
                }
            }
        })
    }

    fn bad(&self, file: &str, message: impl ToString) -> TlsError {
        TlsError::Unreadable {
            dir: self.dir.display().to_string(),
            file: file.into(),
            message: message.to_string(),
        }
    }

    fn identity_pem(&self, role: CertRole) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
        let stem = role.file_stem();
        Ok((
            self.read(&format!("{stem}.pem"))?,
            self.read(&format!("{stem}.key"))?,
        ))
    }

    /// tonic client settings: trust only the cluster CA, present `role`'s
    /// certificate.
    pub fn client_tls(&self, role: CertRole) -> Result<ClientTlsConfig, TlsError> {
        let (cert, key) = self.identity_pem(role)?;
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.read(CA_CERT)?))
            .identity(Identity::from_pem(cert, key)))
    }

    /// tonic server settings: present `role`'s certificate, require every
    /// client to present one signed by the cluster CA.
    pub fn server_tls(&self, role: CertRole) -> Result<ServerTlsConfig, TlsError> {
        let (cert, key) = self.identity_pem(role)?;
        Ok(ServerTlsConfig::new()
            .identity(Identity::from_pem(cert, key))
            .client_ca_root(Certificate::from_pem(self.read(CA_CERT)?)))
    }

    fn roots(&self) -> Result<rustls::RootCertStore, TlsError> {
        let pem = self.read(CA_CERT)?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| self.bad(CA_CERT, e))?;
            roots.add(cert).map_err(|e| self.bad(CA_CERT, e))?;
        }
        if roots.is_empty() {
            return Err(self.bad(CA_CERT, "no certificate in it"));
        }
        Ok(roots)
    }

    fn identity_der(
        &self,
        role: CertRole,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let (cert_file, key_file) = (
            format!("{}.pem", role.file_stem()),
            format!("{}.key", role.file_stem()),
        );
        let (cert, key) = self.identity_pem(role)?;
        let chain = CertificateDer::pem_slice_iter(&cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.bad(&cert_file, e))?;
        let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| self.bad(&key_file, e))?;
        Ok((chain, key))
    }

    /// Plain rustls server settings for a raw TCP link: `role`'s
    /// certificate, and a client certificate signed by the CA required.
    pub fn rustls_server_config(
        &self,
        role: CertRole,
    ) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let config = |e: rustls::Error| TlsError::Config(e.to_string());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(self.roots()?),
            ring_provider(),
        )
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
        let (chain, key) = self.identity_der(role)?;
        let server = rustls::ServerConfig::builder_with_provider(ring_provider())
            .with_safe_default_protocol_versions()
            .map_err(config)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(config)?;
        Ok(Arc::new(server))
    }

    /// Plain rustls client settings for a raw TCP link: trust only the CA,
    /// present `role`'s certificate. Connect with the server name of the
    /// role the peer must play, e.g. `CertRole::Worker.identity_name()`.
    pub fn rustls_client_config(
        &self,
        role: CertRole,
    ) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let config = |e: rustls::Error| TlsError::Config(e.to_string());
        let (chain, key) = self.identity_der(role)?;
        let client = rustls::ClientConfig::builder_with_provider(ring_provider())
            .with_safe_default_protocol_versions()
            .map_err(config)?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(chain, key)
            .map_err(config)?;
        Ok(Arc::new(client))
    }
}

/// The role named by a peer certificate (already verified against the CA by
/// the TLS handshake), if any.
pub fn cert_role(cert: &CertificateDer<'_>) -> Option<CertRole> {
    let cert = webpki::EndEntityCert::try_from(cert).ok()?;
    CertRole::ALL.into_iter().find(|role| {
        ServerName::try_from(role.identity_name())
            .is_ok_and(|name| cert.verify_is_valid_for_subject_name(&name).is_ok())
    })
}

/// The role of the peer of a gRPC request over TLS; None in the clear or
/// without a role-marked certificate.
pub fn peer_role<T>(request: &tonic::Request<T>) -> Option<CertRole> {
    let certs = request.peer_certs()?;
    certs.first().and_then(cert_role)
}

/// Whether `request` may go on when a service wants `wanted`: always in the
/// clear (`--insecure` gives that up), else only from that role's peer.
pub fn peer_is<T>(
    transport: &super::Transport,
    request: &tonic::Request<T>,
    wanted: CertRole,
) -> Result<(), Option<CertRole>> {
    if !transport.is_tls() {
        return Ok(());
    }
    match peer_role(request) {
        Some(role) if role == wanted => Ok(()),
        other => Err(other),
    }
}
