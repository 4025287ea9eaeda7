//! `ringtrain certs init DIR` and `ringtrain certs add-token DIR`.

use std::path::PathBuf;

use anyhow::Context;
use ringtrain_common::security::{certs, Role};

#[derive(clap::Subcommand)]
pub enum CertsCommand {
    /// Make a cluster CA, coordinator/worker/client certificates signed by it,
    /// an admin token (DIR/token) and the tokens file (DIR/tokens.toml).
    Init(InitArgs),
    /// Add a client token to DIR/tokens.toml and print it (restart the
    /// coordinator to take it in).
    AddToken(AddTokenArgs),
}

#[derive(clap::Args)]
pub struct InitArgs {
    /// Where the files go (created).
    pub dir: PathBuf,
    /// A host name or IP the coordinator or workers are reached by
    /// (besides localhost and 127.0.0.1); repeat for each.
    #[arg(long = "host", value_name = "NAME")]
    pub hosts: Vec<String>,
    /// Replace an existing CA (every certificate it signed stops working).
    #[arg(long, conflicts_with = "if_missing")]
    pub force: bool,
    /// Leave an existing CA alone and succeed (a one-shot init service that
    /// runs at every `up`).
    #[arg(long)]
    pub if_missing: bool,
}

#[derive(clap::Args)]
pub struct AddTokenArgs {
    /// A TLS dir made by `certs init`.
    pub dir: PathBuf,
    /// Who the token stands for (recorded as the submitter of its jobs).
    #[arg(long)]
    pub principal: String,
    /// admin or submitter.
    #[arg(long, default_value = "submitter")]
    pub role: String,
}

pub fn run(cmd: CertsCommand) -> anyhow::Result<()> {
    match cmd {
        CertsCommand::Init(a) => {
            if a.if_missing && a.dir.join(certs::CA_CERT).exists() {
                println!("{} already holds a CA: left as it is", a.dir.display());
                return Ok(());
            }
            let made = certs::init(&a.dir, &a.hosts, a.force)?;
            println!("wrote {} in {}", made.files.join(", "), made.dir.display());
            println!(
                "give workers ca.pem, worker.pem and worker.key; clients ca.pem, client.pem, client.key and a token"
            );
            Ok(())
        }
        CertsCommand::AddToken(a) => {
            let role: Role = a.role.parse().map_err(anyhow::Error::msg)?;
            let token = certs::add_token(&a.dir, &a.principal, role)
                .with_context(|| format!("adding a token to {}", a.dir.display()))?;
            println!("{token}");
            Ok(())
        }
    }
}
