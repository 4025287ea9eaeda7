//! Who may call what. Over TLS the handshake already required a certificate
//! signed by the cluster CA; here the client API also wants a client
//! certificate and a bearer token (whose role decides what it may do), and
//! the worker API a worker certificate. In the clear (`--insecure`) every
//! caller is an admin: that is what `--insecure` gives up.

use ringtrain_common::security::tls::peer_is;
use ringtrain_common::security::tokens::bearer;
use ringtrain_common::security::{CertRole, Principal, Role, Tokens, Transport};
use ringtrain_proto as pb;
use tonic::{Request, Status};

/// The coordinator's transport and, over TLS, its tokens.
#[derive(Clone, Debug)]
pub struct Security {
    pub transport: Transport,
    pub tokens: Option<Tokens>,
}

impl Security {
    /// No checks (plaintext, every caller an admin): `--insecure` and tests
    /// of the service that call it directly.
    pub fn open() -> Self {
        Self {
            transport: Transport::Insecure,
            tokens: None,
        }
    }

    /// The principal calling the client API.
    pub fn client<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        let Some(tokens) = &self.tokens else {
            return Ok(Principal {
                name: String::new(),
                role: Role::Admin,
            });
        };
        if let Err(role) = peer_is(&self.transport, request, CertRole::Client) {
            return Err(Status::permission_denied(format!(
                "the client API takes a client certificate, not {}",
                role.map_or("this one".to_string(), |r| format!("a {r} certificate"))
            )));
        }
        let header = request.metadata().get("authorization").ok_or_else(|| {
            Status::unauthenticated(
                "no token: pass --token or set RINGTRAIN_TOKEN (default: the TLS dir's token file)",
            )
        })?;
        let token = header.to_str().ok().and_then(bearer).ok_or_else(|| {
            Status::unauthenticated("the authorization header is not 'Bearer TOKEN'")
        })?;
        tokens
            .check(token)
            .ok_or_else(|| Status::unauthenticated("unknown token"))
    }

    /// Refuses a worker-API call from anything but a worker certificate.
    pub fn worker<T>(&self, request: &Request<T>) -> Result<(), Status> {
        peer_is(&self.transport, request, CertRole::Worker).map_err(|role| {
            Status::permission_denied(format!(
                "the worker API takes a worker certificate, not {}",
                role.map_or("this one".to_string(), |r| format!("a {r} certificate"))
            ))
        })
    }
}

/// Refuses `who` anything but the name and state of a job it did not submit.
pub fn require_owner(who: &Principal, owner: &str, job: &str) -> Result<(), Status> {
    if who.owns(owner) {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "job {job} belongs to another submitter: only its name and state are visible to you"
        )))
    }
}

/// What a submitter sees of another's job in a listing: its name and state.
pub fn redact(s: pb::JobStatus) -> pb::JobStatus {
    pb::JobStatus {
        job_id: s.job_id,
        name: s.name,
        state: s.state,
        ..Default::default()
    }
}
