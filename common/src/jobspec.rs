//! The job spec: what a user submits (TOML). Unknown keys and bad values are
//! errors that name the key.

use serde::{Deserialize, Serialize};

use crate::wire::{TransportKind, WireEncoding};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub name: String,
    /// `mlp` or `cnn` (as in shared/bench/peers/ddp_train.py).
    pub model: ModelKind,
    pub dataset: DatasetSpec,
    /// Samples per worker per step.
    pub batch_size: usize,
    pub optimizer: OptimizerSpec,
    /// Passes over the training set (0 = bounded by max_steps only).
    #[serde(default)]
    pub epochs: u64,
    /// Stop after this many steps (0 = bounded by epochs only).
    #[serde(default)]
    pub max_steps: u64,
    /// Workers the job starts with.
    pub workers: usize,
    /// Below this many live workers the job pauses (state waiting) instead of
    /// failing (0 = 1).
    #[serde(default)]
    pub min_workers: usize,
    /// Workers that register during the run join up to this many (0 = `workers`).
    #[serde(default)]
    pub max_workers: usize,
    /// Keep the global batch at `workers × batch_size` when the ring shrinks or
    /// grows (each worker's share is rescaled); otherwise the per-worker batch
    /// stays and the global batch follows the ring size.
    #[serde(default)]
    pub keep_global_batch: bool,
    /// Audit: each worker appends the sample ids of every step it completes to
    /// `<checkpoint dir>/../samples/<worker>.jsonl`.
    #[serde(default)]
    pub audit_samples: bool,
    #[serde(default)]
    pub seed: u64,
    /// Evaluate on the test split every N steps (0 = only at the end).
    #[serde(default)]
    pub eval_every_steps: u64,
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
    #[serde(default)]
    pub ring: RingSpecOptions,
    /// libtorch intra-op threads per worker.
    #[serde(default = "one")]
    pub threads: usize,
}

fn one() -> usize {
    1
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Mlp,
    Cnn,
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ModelKind::Mlp => "mlp",
            ModelKind::Cnn => "cnn",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    /// Only `idx` (the MNIST file format, gzipped or not).
    pub format: String,
    /// Directory holding train-/t10k- images and labels.
    pub path: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerSpec {
    /// Only `sgd`.
    pub kind: String,
    pub lr: f64,
    #[serde(default)]
    pub momentum: f64,
    #[serde(default)]
    pub weight_decay: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSpec {
    /// Where checkpoints go; empty = the coordinator's data dir / job id.
    #[serde(default)]
    pub dir: String,
    /// Also checkpoint every N steps (0 = only at the end).
    #[serde(default)]
    pub every_steps: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RingSpecOptions {
    #[serde(default)]
    pub transport: TransportKind,
    #[serde(default)]
    pub encoding: WireEncoding,
    /// Seconds a silent ring neighbour is tolerated.
    #[serde(default = "ten")]
    pub timeout_s: f64,
}

fn ten() -> f64 {
    10.0
}

impl Default for RingSpecOptions {
    fn default() -> Self {
        Self {
            transport: TransportKind::Tcp,
            encoding: WireEncoding::F32,
            timeout_s: ten(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    #[error("job spec: {0}")]
    Parse(String),
    #[error("job spec: {key} {problem}")]
    Invalid { key: &'static str, problem: String },
    #[error("--set {0}: expected KEY=VALUE")]
    BadOverride(String),
}

fn invalid(key: &'static str, problem: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        key,
        problem: problem.into(),
    }
}

impl JobSpec {
    /// Parses TOML, applies `KEY=VALUE` overrides (dotted keys, TOML values;
    /// bare words are taken as strings), and validates.
    pub fn parse(text: &str, overrides: &[String]) -> Result<Self, SpecError> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| SpecError::Parse(one_line(&e)))?;
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        // Round-trip through text so a type error points at a span we can name.
        let text = toml::to_string(&table).map_err(|e| SpecError::Parse(e.to_string()))?;
        let spec: JobSpec =
            toml::from_str(&text).map_err(|e| SpecError::Parse(with_key(&text, &e)))?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn min_workers(&self) -> usize {
        self.min_workers.max(1)
    }

    pub fn max_workers(&self) -> usize {
        self.max_workers.max(self.workers)
    }

    /// The global batch of a step taken by `world` workers.
    pub fn global_batch(&self, world: usize) -> u64 {
        let w = if self.keep_global_batch {
            self.workers
        } else {
            world
        };
        (w * self.batch_size) as u64
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        if self.name.trim().is_empty() {
            return Err(invalid("name", "must not be empty"));
        }
        if self.dataset.format != "idx" {
            return Err(invalid(
                "dataset.format",
                format!("'{}' is not supported (only \"idx\")", self.dataset.format),
            ));
        }
        if self.dataset.path.trim().is_empty() {
            return Err(invalid("dataset.path", "must not be empty"));
        }
        if self.batch_size == 0 {
            return Err(invalid("batch_size", "must be at least 1"));
        }
        if self.workers == 0 {
            return Err(invalid("workers", "must be at least 1"));
        }
        if self.min_workers > self.workers {
            return Err(invalid(
                "min_workers",
                format!(
                    "({}) must not exceed workers ({})",
                    self.min_workers, self.workers
                ),
            ));
        }
        if self.max_workers != 0 && self.max_workers < self.workers {
            return Err(invalid(
                "max_workers",
                format!(
                    "({}) must be at least workers ({})",
                    self.max_workers, self.workers
                ),
            ));
        }
        if self.optimizer.kind != "sgd" {
            return Err(invalid(
                "optimizer.kind",
                format!("'{}' is not supported (only \"sgd\")", self.optimizer.kind),
            ));
        }
        let o = &self.optimizer;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return Err(invalid(
                "optimizer.lr",
                format!("must be a positive number (got {})", o.lr),
            ));
        }
        if !(0.0..1.0).contains(&o.momentum) {
            return Err(invalid(
                "optimizer.momentum",
                format!("must be in [0, 1) (got {})", o.momentum),
            ));
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            return Err(invalid(
                "optimizer.weight_decay",
                format!("must be >= 0 (got {})", o.weight_decay),
            ));
        }
        if self.epochs == 0 && self.max_steps == 0 {
            return Err(invalid("epochs", "or max_steps must be set (both are 0)"));
        }
        if !(self.ring.timeout_s.is_finite() && self.ring.timeout_s > 0.0) {
            return Err(invalid(
                "ring.timeout_s",
                "must be a positive number of seconds",
            ));
        }
        if self.threads == 0 {
            return Err(invalid("threads", "must be at least 1"));
        }
        Ok(())
    }
}

/// toml errors span several lines (with a source excerpt); keep the message one line.
fn one_line(e: &toml::de::Error) -> String {
    let msg = e.message().trim().to_string();
    match e.span() {
        Some(span) => format!("{msg} (at byte {})", span.start),
        None => msg,
    }
}

/// Prefixes a deserialization error with the dotted key at its span.
fn with_key(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().replace('\n', " ");
    let Some(span) = e.span() else { return msg };
    let mut table = String::new();
    let mut offset = 0;
    for line in text.lines() {
        let end = offset + line.len() + 1;
        let t = line.trim();
        if t.starts_with('[') {
            table = t.trim_matches(|c| c == '[' || c == ']').to_string();
        }
        if span.start < end {
            return match t.split_once('=') {
                Some((k, _)) if table.is_empty() => format!("{}: {msg}", k.trim()),
                Some((k, _)) => format!("{table}.{}: {msg}", k.trim()),
                None if !table.is_empty() => format!("{table}: {msg}"),
                None => msg,
            };
        }
        offset = end;
    }
    msg
}

fn apply_override(table: &mut toml::Table, o: &str) -> Result<(), SpecError> {
    let (key, raw) = o
        .split_once('=')
        .ok_or_else(|| SpecError::BadOverride(o.into()))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(SpecError::BadOverride(o.into()));
    }
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.trim().to_string()));
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts
        .pop()
        .ok_or_else(|| SpecError::BadOverride(o.into()))?;
    let mut cur = table;
    for p in parts {
        cur = cur
            .entry(p)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| SpecError::Parse(format!("--set {key}: '{p}' is not a table")))?;
    }
    cur.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub const EXAMPLE: &str = r#"
name = "fmnist"
model = "cnn"
batch_size = 64
workers = 4
epochs = 2
seed = 1
eval_every_steps = 100
[dataset]
format = "idx"
path = "/usr/share/datasets/fashion-mnist"
[optimizer]
kind = "sgd"
lr = 0.05
momentum = 0.9
"#;

    #[test]
    fn the_example_parses_and_overrides_apply() {
        let spec = JobSpec::parse(EXAMPLE, &[]).unwrap();
        assert_eq!(spec.model, ModelKind::Cnn);
        assert_eq!(spec.threads, 1);
        let spec = JobSpec::parse(
            EXAMPLE,
            &[
                "batch_size=16".into(),
                "optimizer.lr=0.1".into(),
                "model=mlp".into(),
            ],
        )
        .unwrap();
        assert_eq!(
            (spec.batch_size, spec.optimizer.lr, spec.model),
            (16, 0.1, ModelKind::Mlp)
        );
        let again = JobSpec::parse(&spec.to_toml(), &[]).unwrap();
        assert_eq!(again, spec);
    }

    #[test]
    fn the_global_batch_follows_the_ring_unless_kept() {
        let spec = JobSpec::parse(EXAMPLE, &[]).unwrap();
        assert_eq!((spec.global_batch(4), spec.global_batch(3)), (256, 192));
        let kept = JobSpec::parse(EXAMPLE, &["keep_global_batch=true".into()]).unwrap();
        assert_eq!((kept.global_batch(4), kept.global_batch(3)), (256, 256));
        assert_eq!((kept.min_workers(), kept.max_workers()), (1, 4));
        let err = JobSpec::parse(EXAMPLE, &["min_workers=5".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("min_workers (5) must not exceed workers (4)"),
            "{err}"
        );
        let err = JobSpec::parse(EXAMPLE, &["max_workers=2".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("max_workers (2) must be at least workers (4)"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let err = JobSpec::parse(EXAMPLE, &["bacth_size=3".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("bacth_size"), "{err}");
        let err = JobSpec::parse(EXAMPLE, &["optimizer.lr=-1".into()])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "job spec: optimizer.lr must be a positive number (got -1)"
        );
        let err = JobSpec::parse(EXAMPLE, &["model=resnet".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("resnet") && err.contains("model"), "{err}");
        let err = JobSpec::parse(EXAMPLE, &["workers=0".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("workers must be at least 1"), "{err}");
        let err = JobSpec::parse(EXAMPLE, &["nonsense".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("KEY=VALUE"), "{err}");
        let err = JobSpec::parse("name = 'x'", &[]).unwrap_err().to_string();
        assert!(err.contains("missing field"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
    }
}
