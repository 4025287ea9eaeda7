//! Process configuration: defaults, then an optional TOML file, then
//! `RINGTRAIN_<KEY>` environment variables, then command-line flags (via the
//! `config` crate). Unknown keys in the file are errors that name the key.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, Context};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub fn load<T: Serialize + DeserializeOwned + Default>(
    file: Option<&Path>,
    flags: &[(&str, Option<String>)],
) -> anyhow::Result<T> {
    let defaults = config::Config::try_from(&T::default()).context("config defaults")?;
    let known: Vec<String> = toml::Table::try_from(T::default())
        .map(|t| t.keys().cloned().collect())
        .unwrap_or_default();
    let mut builder = config::Config::builder().add_source(defaults);
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let table: toml::Table = toml::from_str(&text)
            .map_err(|e| anyhow!("config file {}: {}", path.display(), e.message()))?;
        if let Some(bad) = table.keys().find(|k| !known.contains(k)) {
            return Err(anyhow!(
                "config file {}: unknown key '{bad}' (known: {})",
                path.display(),
                known.join(", ")
            ));
        }
        builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
    }
    // Only variables naming a known key: RINGTRAIN_LOG_FORMAT and friends
    // belong to other layers.
    let env: HashMap<String, String> = std::env::vars()
        .filter_map(|(k, v)| {
            let key = k.strip_prefix("RINGTRAIN_")?.to_lowercase();
            known
                .contains(&key)
                .then_some((format!("RINGTRAIN_{}", key.to_uppercase()), v))
        })
        .collect();
    builder = builder.add_source(
        config::Environment::with_prefix("RINGTRAIN")
            .source(Some(env))
            .try_parsing(true)
            // RINGTRAIN_DATA_ROOTS=/a:/b, as PATH is written.
            .list_separator(":")
            .with_list_parse_key("data_roots"),
    );
    for (key, value) in flags {
        if let Some(v) = value {
            builder = builder.set_override(*key, v.clone())?;
        }
    }
    builder
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| anyhow!("configuration: {e}"))
}

/// Writes `value` as JSON to `path` atomically, so a reader never sees half a file.
pub fn write_ready_file(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(value)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Resolves when the process gets Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
