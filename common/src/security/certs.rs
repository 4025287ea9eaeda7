//! `ringtrain certs init`: a cluster CA, one certificate per role signed by
//! it, and an admin bearer token. Private keys and tokens are written 0600.

use std::io::Write;
use std::path::{Path, PathBuf};

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use super::tls::CertRole;
use super::tokens::{Role, TokenEntry, TokensFile};

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const TOKEN_FILE: &str = "token";
pub const TOKENS_FILE: &str = "tokens.toml";
/// The principal of the admin token `init` makes.
pub const ADMIN_PRINCIPAL: &str = "admin";

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("{0} already holds a CA (ca.pem): pass --force to replace it and every certificate signed by it")]
    Exists(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("making certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CertsError + '_ {
    move |source| CertsError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `bytes` to `path`, readable by the owner only when `secret`.
fn write(path: &Path, bytes: &[u8], secret: bool) -> Result<(), CertsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mode = if secret { 0o600 } else { 0o644 };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))
}

/// A fresh random token (256 bits, hex).
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What `init` wrote.
#[derive(Debug)]
pub struct Made {
    pub dir: PathBuf,
    pub files: Vec<String>,
}

/// Makes `dir` a TLS dir: `ca.pem`/`ca.key`, `coordinator`, `worker` and
/// `client` certificates and keys, the admin token in `token` and the tokens
/// file `tokens.toml`. Server certificates name localhost, 127.0.0.1 and
/// every one of `hosts`. Refuses to replace a CA unless `force`.
pub fn init(dir: &Path, hosts: &[String], force: bool) -> Result<Made, CertsError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    if dir.join(CA_CERT).exists() && !force {
        return Err(CertsError::Exists(dir.display().to_string()));
    }
    for h in hosts {
        if h.is_empty()
            || h.len() > 253
            || h.contains(['/', ':', ' ']) && h.parse::<std::net::IpAddr>().is_err()
        {
            return Err(CertsError::Invalid(format!(
                "--host '{}' is not a host name or IP address",
                crate::quote(h)
            )));
        }
    }
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "ringtrain cluster CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;
    let mut files = Vec::new();
    let mut put = |name: &str, bytes: &[u8], secret: bool| -> Result<(), CertsError> {
        write(&dir.join(name), bytes, secret)?;
        files.push(name.to_string());
        Ok(())
    };
    put(CA_CERT, ca_cert.pem().as_bytes(), false)?;
    put(CA_KEY, ca_key.serialize_pem().as_bytes(), true)?;

    let mut server_names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into()];
    for h in hosts {
        if !server_names.contains(h) {
            server_names.push(h.clone());
        }
    }
    for role in CertRole::ALL {
        // Clients are never servers: their certificate names only the role.
        let mut names = vec![role.identity_name().to_string()];
        if role != CertRole::Client {
            names.extend(server_names.iter().cloned());
        }
        let mut params = CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("ringtrain {role}"));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = match role {
            CertRole::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            // Coordinator and workers both serve and dial each other.
            _ => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
        let stem = role.file_stem();
        put(&format!("{stem}.pem"), cert.pem().as_bytes(), false)?;
        put(&format!("{stem}.key"), key.serialize_pem().as_bytes(), true)?;
    }

    let token = new_token();
    put(TOKEN_FILE, format!("{token}\n").as_bytes(), true)?;
    let tokens = TokensFile {
        tokens: vec![TokenEntry {
            token,
            principal: ADMIN_PRINCIPAL.into(),
            role: Role::Admin,
        }],
    };
    let text = format!(
        "# Bearer tokens the coordinator accepts: each maps to a principal and a\n\
         # role (admin | submitter). Add one with `ringtrain certs add-token`.\n{}",
        toml::to_string(&tokens).map_err(|e| CertsError::Invalid(e.to_string()))?
    );
    put(TOKENS_FILE, text.as_bytes(), true)?;
    Ok(Made {
        dir: dir.to_path_buf(),
        files,
    })
}

/// Adds a new token for `principal` with `role` to `dir/tokens.toml`;
/// returns the token (the coordinator reads the file when it starts).
pub fn add_token(dir: &Path, principal: &str, role: Role) -> Result<String, CertsError> {
    if principal.trim().is_empty() || principal.len() > 128 {
        return Err(CertsError::Invalid(
            "a principal is 1 to 128 characters".into(),
        ));
    }
    let path = dir.join(TOKENS_FILE);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let mut file: TokensFile = toml::from_str(&text)
        .map_err(|e| CertsError::Invalid(format!("{}: {}", path.display(), e.message())))?;
    let token = new_token();
    file.tokens.push(TokenEntry {
        token: token.clone(),
        principal: principal.into(),
        role,
    });
    let out = toml::to_string(&file).map_err(|e| CertsError::Invalid(e.to_string()))?;
    let tmp = path.with_extension("toml.tmp");
    write(&tmp, out.as_bytes(), true)?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::{tls::cert_role, Tokens};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_writes_every_file_with_private_keys_0600() {
        let dir = tempfile::tempdir().unwrap();
        let made = init(dir.path(), &["node7".into()], false).unwrap();
        for f in [
            "ca.pem",
            "ca.key",
            "coordinator.pem",
            "coordinator.key",
            "worker.pem",
            "worker.key",
            "client.pem",
            "client.key",
            "token",
            "tokens.toml",
        ] {
            assert!(made.files.contains(&f.to_string()), "{f}");
            let mode = std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            let secret = f.ends_with(".key") || f.starts_with("token");
            assert_eq!(mode, if secret { 0o600 } else { 0o644 }, "{f}");
        }
        // The admin token in `token` is the one in tokens.toml.
        let token = crate::security::default_token(dir.path()).unwrap();
        let tokens = Tokens::load(&dir.path().join(TOKENS_FILE)).unwrap();
        assert!(tokens.check(&token).unwrap().is_admin());
        // Each certificate names its role, and only its role.
        for role in CertRole::ALL {
            let pem = std::fs::read(dir.path().join(format!("{}.pem", role.file_stem()))).unwrap();
            let der = CertificateDer::from_pem_slice(&pem).unwrap();
            assert_eq!(cert_role(&der), Some(role));
        }
        // The rustls settings load.
        let tls = crate::security::TlsDir::open(dir.path()).unwrap();
        tls.rustls_server_config(CertRole::Worker).unwrap();
        tls.rustls_client_config(CertRole::Worker).unwrap();
    }

    #[test]
    fn an_existing_ca_is_kept_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &[], false).unwrap();
        let before = std::fs::read(dir.path().join(CA_CERT)).unwrap();
        let e = init(dir.path(), &[], false).unwrap_err().to_string();
        assert!(e.contains("--force"), "{e}");
        assert_eq!(std::fs::read(dir.path().join(CA_CERT)).unwrap(), before);
        init(dir.path(), &[], true).unwrap();
        assert_ne!(std::fs::read(dir.path().join(CA_CERT)).unwrap(), before);
    }

    #[test]
    fn an_added_token_is_a_submitter() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &[], false).unwrap();
        let t = add_token(dir.path(), "alice", Role::Submitter).unwrap();
        let tokens = Tokens::load(&dir.path().join(TOKENS_FILE)).unwrap();
        let p = tokens.check(&t).unwrap();
        assert_eq!((p.name.as_str(), p.role), ("alice", Role::Submitter));
        assert_eq!(tokens.len(), 2);
    }
}
