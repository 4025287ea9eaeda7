//! The job spec: what a user submits (TOML). Unknown keys and bad values are
//! errors that name the key.

use serde::{Deserialize, Serialize};

use crate::wire::{TransportKind, WireEncoding};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub name: String,
    /// A built-in model (`mlp`, `cnn` as in shared/bench/peers/ddp_train.py,
    /// `gpt`), or a TorchScript file (`net.pt`; `sha256:HEX` once uploaded).
    pub model: ModelSource,
    /// How the loss is computed: `cross_entropy` of the model's logits and
    /// the targets, or `model` (`forward(inputs, targets)` returns the loss).
    #[serde(default)]
    pub loss: LossKind,
    /// Settings of a built-in model (`gpt`: layers, heads, dim, context).
    #[serde(default)]
    pub model_config: ModelConfig,
    /// `cpu`, `cuda` or `cuda:N`.
    #[serde(default)]
    pub device: DeviceSpec,
    pub dataset: DatasetSpec,
    /// Samples per worker per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per step (gradient accumulation): one all-reduce per
    /// step, a global batch of workers × batch_size × accumulate.
    #[serde(default = "one")]
    pub accumulate: usize,
    pub optimizer: OptimizerSpec,
    #[serde(default)]
    pub schedule: ScheduleSpec,
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
    /// Start from these weights (a `.safetensors` file, or a checkpoint
    /// directory), matched by name and shape.
    #[serde(default)]
    pub init_from: String,
    /// With `init_from`: a tensor missing on either side is an error (true),
    /// or skipped (false).
    #[serde(default = "yes")]
    pub strict: bool,
    /// Parameters whose names start with one of these stay fixed: no
    /// gradient, not in the ring's buffer.
    #[serde(default)]
    pub freeze: Vec<String>,
    /// Parameters whose names start with one of these start fresh (after
    /// `init_from`), e.g. a new head.
    #[serde(default)]
    pub reinit: Vec<String>,
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
    #[serde(default)]
    pub ring: RingSpecOptions,
    /// libtorch intra-op threads per worker.
    #[serde(default = "one")]
    pub threads: usize,
    /// What a step does when the all-reduced gradient holds a NaN or an Inf.
    #[serde(default)]
    pub on_nonfinite: OnNonFinite,
}

fn one() -> usize {
    1
}

fn yes() -> bool {
    true
}

/// The built-in models.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Mlp,
    Cnn,
    /// Decoder-only byte-level transformer.
    Gpt,
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ModelKind::Mlp => "mlp",
            ModelKind::Cnn => "cnn",
            ModelKind::Gpt => "gpt",
        })
    }
}

/// Where a job's network comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ModelSource {
    Builtin(ModelKind),
    /// A TorchScript file on the workers' file system.
    ScriptFile(String),
    /// A TorchScript file uploaded to the coordinator, by SHA-256.
    ScriptBlob(BlobId),
}

/// The SHA-256 of a blob the coordinator stores, printed `sha256:HEX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId(pub [u8; 32]);

impl std::fmt::Display for BlobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("sha256:")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for BlobId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("'{}' is not a sha256:<64 hex digits> id", crate::quote(s));
        let hex = s.strip_prefix("sha256:").ok_or_else(bad)?;
        if hex.len() != 64 || !hex.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(BlobId(out))
    }
}

impl ModelSource {
    pub fn builtin(&self) -> Option<ModelKind> {
        match self {
            ModelSource::Builtin(k) => Some(*k),
            _ => None,
        }
    }

    pub fn is_script(&self) -> bool {
        !matches!(self, ModelSource::Builtin(_))
    }
}

impl TryFrom<String> for ModelSource {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "mlp" => Ok(Self::Builtin(ModelKind::Mlp)),
            "cnn" => Ok(Self::Builtin(ModelKind::Cnn)),
            "gpt" => Ok(Self::Builtin(ModelKind::Gpt)),
            blob if blob.starts_with("sha256:") => blob.parse().map(Self::ScriptBlob),
            path if path.ends_with(".pt") || path.ends_with(".pth") => Ok(Self::ScriptFile(s)),
            other => Err(format!(
                "unknown model '{}' (mlp, cnn, gpt, or a TorchScript file ending in .pt)",
                crate::quote(other)
            )),
        }
    }
}

impl From<ModelSource> for String {
    fn from(m: ModelSource) -> String {
        m.to_string()
    }
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSource::Builtin(k) => k.fmt(f),
            ModelSource::ScriptFile(p) => f.write_str(p),
            ModelSource::ScriptBlob(b) => b.fmt(f),
        }
    }
}

/// What a step does when the all-reduced gradient holds a NaN or an Inf.
/// Every replica checks the same reduced buffer, so all decide alike.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnNonFinite {
    /// Fail the job, naming the step. The default: in f32 training a
    /// non-finite gradient means divergence or bad data, which a user wants
    /// to hear about at once, not after hours of skipped steps.
    #[default]
    Fail,
    /// Skip the update on every replica, as torch.amp's GradScaler does:
    /// parameters, buffers and optimizer state stay as they were; the step
    /// still counts (version, schedule) and its batch counts as consumed.
    SkipStep,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// Cross-entropy of logits `[N, C]` (or `[N, T, C]`) and class targets.
    #[default]
    CrossEntropy,
    /// `forward(inputs, targets)` returns the (mean) loss itself.
    Model,
}

/// Settings of the built-in transformer (ignored by other models).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub layers: usize,
    pub heads: usize,
    pub dim: usize,
    /// Longest sequence (0 = the text data set's context).
    pub context: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            layers: 4,
            heads: 4,
            dim: 128,
            context: 0,
        }
    }
}

/// Where tensors live while training.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl TryFrom<String> for DeviceSpec {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| {
                    format!(
                        "unknown device '{}' (cpu, cuda or cuda:N)",
                        crate::quote(other)
                    )
                }),
        }
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        match d {
            DeviceSpec::Cpu => "cpu".into(),
            DeviceSpec::Cuda(n) => format!("cuda:{n}"),
        }
    }
}

/// Data set file formats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// MNIST's IDX files (gzipped or plain): `train-*`/`t10k-*` in `path`.
    #[default]
    Idx,
    /// Tensors `inputs` and `targets` (any shape and dtype) in one file.
    Safetensors,
    /// A byte-level corpus: a text file or a folder of them.
    Text,
    /// CIFAR-10's binary batches (`data_batch_*.bin`, `test_batch.bin`).
    Cifar,
}

impl std::fmt::Display for DataFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DataFormat::Idx => "idx",
            DataFormat::Safetensors => "safetensors",
            DataFormat::Text => "text",
            DataFormat::Cifar => "cifar",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    pub format: DataFormat,
    /// idx, cifar: a directory; safetensors: a file; text: a file or a
    /// directory of them.
    pub path: String,
    /// The test split: safetensors, text: a file of its own (optional).
    #[serde(default)]
    pub test_path: String,
    /// text: bytes of context per sample (each sample predicts the next byte
    /// at every position).
    #[serde(default)]
    pub context: usize,
    /// text without `test_path`: the share of the corpus held out at its end.
    #[serde(default = "tenth")]
    pub test_fraction: f64,
    /// Keep only samples of these classes (both splits).
    #[serde(default)]
    pub classes: Vec<i64>,
    /// Keep only the first N training samples (after `classes`; 0 = all).
    #[serde(default)]
    pub limit: usize,
}

fn tenth() -> f64 {
    0.1
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    #[default]
    Sgd,
    Adamw,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerSpec {
    pub kind: OptimizerKind,
    pub lr: f64,
    /// sgd.
    #[serde(default)]
    pub momentum: f64,
    /// sgd: L2 added to the gradient; adamw: decoupled (default 0.01, as
    /// torch.optim.AdamW).
    #[serde(default)]
    pub weight_decay: Option<f64>,
    /// sgd with momentum.
    #[serde(default)]
    pub nesterov: bool,
    /// adamw.
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    /// adamw.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Scale the reduced gradient so its global L2 norm is at most this
    /// (0 = off).
    #[serde(default)]
    pub clip_grad_norm: f64,
}

fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}

fn default_eps() -> f64 {
    1e-8
}

impl OptimizerSpec {
    pub fn weight_decay(&self) -> f64 {
        self.weight_decay.unwrap_or(match self.kind {
            OptimizerKind::Sgd => 0.0,
            OptimizerKind::Adamw => 0.01,
        })
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    #[default]
    Constant,
    /// lr × gamma every `step_size` steps.
    Step,
    /// Half a cosine from lr to `min_lr` over the job's steps.
    Cosine,
}

/// The learning rate over the job's steps: a linear warm-up from 0, then
/// the kind's curve.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleSpec {
    pub kind: ScheduleKind,
    pub warmup_steps: u64,
    /// step.
    pub step_size: u64,
    /// step (0 = 0.1).
    pub gamma: f64,
    /// cosine.
    pub min_lr: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSpec {
    /// Where checkpoints go; empty = the coordinator's data dir / job id.
    #[serde(default)]
    pub dir: String,
    /// Also checkpoint every N steps (0 = only at the end).
    #[serde(default)]
    pub every_steps: u64,
    /// The coordinator writes the job's scalars (loss, samples/s, all-reduce
    /// seconds, test accuracy and loss) as TensorBoard event files in the
    /// checkpoint directory.
    #[serde(default = "yes")]
    pub tensorboard: bool,
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        Self {
            dir: String::new(),
            every_steps: 0,
            tensorboard: true,
        }
    }
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
    /// Reduce the gradient in buckets while the backward pass still runs
    /// (as DDP does), instead of all of it after: `true`, `false`, or
    /// "auto" (the default): on unless every member is on one host, where
    /// the all-reduce costs CPU time rather than wire time and overlapping
    /// it only makes it contend with the backward pass.
    #[serde(default)]
    pub overlap: Overlap,
    /// Size of each gradient bucket after the first (1 MiB), in MiB.
    #[serde(default = "default_bucket_mb")]
    pub bucket_mb: f64,
    /// The gradient's form on the wire: "none" (exact f32, the default),
    /// "bf16" or "fp16" (half the bytes; sums are still taken in f32; the
    /// same as `encoding`), or "powersgd:R" (low-rank factors with error
    /// feedback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,
}

fn default_bucket_mb() -> f64 {
    25.0
}

/// `ring.overlap`: true, false or "auto".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Overlap {
    Always(bool),
    #[default]
    #[serde(with = "auto_word")]
    Auto,
}

mod auto_word {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("auto")
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<(), D::Error> {
        match String::deserialize(d)?.as_str() {
            "auto" => Ok(()),
            _ => Err(serde::de::Error::custom("expected true, false or \"auto\"")),
        }
    }
}

impl Overlap {
    /// Whether a ring of `members` (their ring addresses, host:port)
    /// overlaps; every member decides alike from the same list.
    pub fn applies(self, members: &[String]) -> bool {
        match self {
            Self::Always(on) => on,
            Self::Auto => {
                let host = |m: &String| -> String {
                    m.rsplit_once(':')
                        .map_or(m.as_str(), |(h, _)| h)
                        .to_string()
                };
                members.first().is_some_and(|first| {
                    let first = host(first);
                    members.iter().any(|m| host(m) != first)
                })
            }
        }
    }
}

/// Gradient compression on the ring (`ring.compression`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Compression {
    /// Exact f32.
    None,
    Bf16,
    Fp16,
    /// PowerSGD (Vogels et al., 2019): each weight matrix's gradient sent as
    /// two rank-`rank` factors, with error feedback; other tensors exact.
    PowerSgd {
        rank: u32,
    },
}

/// The largest PowerSGD rank accepted: past it the factors stop saving bytes
/// on any layer worth compressing.
pub const MAX_POWERSGD_RANK: u32 = 64;

impl Compression {
    /// The encoding of what travels: half for bf16/fp16, f32 otherwise
    /// (PowerSGD's factors are small and sent exactly).
    pub fn encoding(self) -> WireEncoding {
        match self {
            Self::None | Self::PowerSgd { .. } => WireEncoding::F32,
            Self::Bf16 => WireEncoding::Bf16,
            Self::Fp16 => WireEncoding::F16,
        }
    }

    pub fn powersgd_rank(self) -> Option<usize> {
        match self {
            Self::PowerSgd { rank } => Some(rank as usize),
            _ => None,
        }
    }
}

impl TryFrom<String> for Compression {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "none" => Ok(Self::None),
            "bf16" => Ok(Self::Bf16),
            "fp16" | "f16" => Ok(Self::Fp16),
            other => match other.strip_prefix("powersgd:").map(str::parse::<u32>) {
                Some(Ok(rank)) if (1..=MAX_POWERSGD_RANK).contains(&rank) => {
                    Ok(Self::PowerSgd { rank })
                }
                Some(_) => Err(format!(
                    "powersgd takes a rank within 1..={MAX_POWERSGD_RANK} (got '{}')",
                    crate::quote(other)
                )),
                None => Err(format!(
                    "unknown compression '{}' (expected none, bf16, fp16 or powersgd:RANK)",
                    crate::quote(other)
                )),
            },
        }
    }
}

impl From<Compression> for String {
    fn from(c: Compression) -> String {
        match c {
            Compression::None => "none".into(),
            Compression::Bf16 => "bf16".into(),
            Compression::Fp16 => "fp16".into(),
            Compression::PowerSgd { rank } => format!("powersgd:{rank}"),
        }
    }
}

impl RingSpecOptions {
    /// What the gradient travels as: `compression` if set, else `encoding`.
    pub fn wire_encoding(&self) -> WireEncoding {
        self.compression
            .map_or(self.encoding, Compression::encoding)
    }
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
            overlap: Overlap::Auto,
            bucket_mb: default_bucket_mb(),
            compression: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    #[error("job spec: {0}")]
    Parse(String),
    #[error("job spec: {key} {problem}")]
    Invalid { key: &'static str, problem: String },
    #[error("--set {}: expected KEY=VALUE", crate::quote(.0))]
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

    /// The global batch of a step taken by `world` workers (all micro-batches).
    pub fn global_batch(&self, world: usize) -> u64 {
        let w = if self.keep_global_batch {
            self.workers
        } else {
            world
        };
        (w * self.batch_size * self.accumulate.max(1)) as u64
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        self.validate_bounds()?;
        if self.name.trim().is_empty() {
            return Err(invalid("name", "must not be empty"));
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
        let o = &self.optimizer;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return Err(invalid(
                "optimizer.lr",
                format!("must be a positive number (got {})", short(o.lr)),
            ));
        }
        if !(0.0..1.0).contains(&o.momentum) {
            return Err(invalid(
                "optimizer.momentum",
                format!("must be in [0, 1) (got {})", short(o.momentum)),
            ));
        }
        if !(o.weight_decay().is_finite() && o.weight_decay() >= 0.0) {
            return Err(invalid(
                "optimizer.weight_decay",
                format!("must be >= 0 (got {})", short(o.weight_decay())),
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
        if !(self.ring.bucket_mb.is_finite()
            && self.ring.bucket_mb >= 0.001
            && self.ring.bucket_mb <= 1024.0)
        {
            return Err(invalid(
                "ring.bucket_mb",
                format!(
                    "must be within 0.001..=1024 MiB (got {})",
                    short(self.ring.bucket_mb)
                ),
            ));
        }
        if let Some(c) = self.ring.compression {
            if self.ring.encoding != WireEncoding::F32
                && (self.ring.encoding != c.encoding() || c.powersgd_rank().is_some())
            {
                return Err(invalid(
                    "ring.compression",
                    "and ring.encoding disagree: set only one of them",
                ));
            }
        }
        if self.threads == 0 {
            return Err(invalid("threads", "must be at least 1"));
        }
        self.validate_training()
    }
}

/// Upper bounds on what a spec may ask of the cluster, so a submission
/// cannot make a worker allocate, loop or wait without end. Generous for
/// real jobs; a cluster narrows `workers` further by its own `max_workers`.
pub mod limits {
    /// Characters in a job's name.
    pub const NAME_CHARS: usize = 128;
    /// Bytes in any path of a spec (Linux's PATH_MAX).
    pub const PATH_BYTES: usize = 4096;
    pub const WORKERS: usize = 1024;
    pub const THREADS: usize = 256;
    pub const RING_TIMEOUT_S: f64 = 3600.0;
    pub const BATCH_SIZE: usize = 1 << 16;
    pub const ACCUMULATE: usize = 1 << 12;
    pub const EPOCHS: u64 = 100_000;
    pub const STEPS: u64 = 1_000_000_000;
    /// Bytes of context per text sample, and the transformer's sequence.
    pub const CONTEXT: usize = 1 << 16;
    pub const LAYERS: usize = 256;
    pub const HEADS: usize = 256;
    pub const DIM: usize = 1 << 14;
    /// Parameters of the built-in transformer (about 12·layers·dim²): 4 G
    /// f32s is 16 GB per replica, before the optimizer's state.
    pub const GPT_PARAMS: u64 = 4 << 30;
    /// Entries in `freeze`, `reinit` and `dataset.classes`.
    pub const LIST_ENTRIES: usize = 4096;
    /// Characters of one `freeze` or `reinit` prefix.
    pub const PREFIX_CHARS: usize = 256;
}

/// A number as an error message quotes it: 1e300, not 301 digits.
fn short(x: f64) -> String {
    if x != 0.0 && !(1e-4..1e9).contains(&x.abs()) {
        format!("{x:e}")
    } else {
        format!("{x}")
    }
}

fn at_most<T: PartialOrd + std::fmt::Display>(
    key: &'static str,
    value: T,
    limit: T,
) -> Result<(), SpecError> {
    if value > limit {
        return Err(invalid(
            key,
            format!("must be at most {limit} (got {value})"),
        ));
    }
    Ok(())
}

impl JobSpec {
    /// Upper bounds (see [`limits`]); errors name the key and the limit and
    /// never echo a long value.
    fn validate_bounds(&self) -> Result<(), SpecError> {
        let name_chars = self.name.chars().count();
        if name_chars > limits::NAME_CHARS {
            return Err(invalid(
                "name",
                format!(
                    "must be at most {} characters (got {name_chars}: '{}')",
                    limits::NAME_CHARS,
                    crate::quote(&self.name)
                ),
            ));
        }
        let model_path = match &self.model {
            ModelSource::ScriptFile(p) => p.as_str(),
            _ => "",
        };
        for (key, path) in [
            ("dataset.path", self.dataset.path.as_str()),
            ("dataset.test_path", self.dataset.test_path.as_str()),
            ("checkpoint.dir", self.checkpoint.dir.as_str()),
            ("init_from", self.init_from.as_str()),
            ("model", model_path),
        ] {
            if path.len() > limits::PATH_BYTES {
                return Err(invalid(
                    key,
                    format!(
                        "must be at most {} bytes (got {}: '{}')",
                        limits::PATH_BYTES,
                        path.len(),
                        crate::quote(path)
                    ),
                ));
            }
        }
        at_most("workers", self.workers, limits::WORKERS)?;
        at_most("max_workers", self.max_workers, limits::WORKERS)?;
        at_most("threads", self.threads, limits::THREADS)?;
        // NaN compares false: the positivity check below refuses it.
        if self.ring.timeout_s > limits::RING_TIMEOUT_S {
            return Err(invalid(
                "ring.timeout_s",
                format!(
                    "must be at most {} seconds (got {})",
                    limits::RING_TIMEOUT_S,
                    short(self.ring.timeout_s)
                ),
            ));
        }
        at_most("batch_size", self.batch_size, limits::BATCH_SIZE)?;
        at_most("accumulate", self.accumulate, limits::ACCUMULATE)?;
        at_most("epochs", self.epochs, limits::EPOCHS)?;
        at_most("max_steps", self.max_steps, limits::STEPS)?;
        at_most(
            "schedule.warmup_steps",
            self.schedule.warmup_steps,
            limits::STEPS,
        )?;
        at_most("dataset.context", self.dataset.context, limits::CONTEXT)?;
        let m = &self.model_config;
        at_most("model_config.layers", m.layers, limits::LAYERS)?;
        at_most("model_config.heads", m.heads, limits::HEADS)?;
        at_most("model_config.dim", m.dim, limits::DIM)?;
        at_most("model_config.context", m.context, limits::CONTEXT)?;
        let gpt_params = 12 * m.layers as u64 * (m.dim as u64).pow(2);
        if self.model.builtin() == Some(ModelKind::Gpt) && gpt_params > limits::GPT_PARAMS {
            return Err(invalid(
                "model_config",
                format!(
                    "asks for about {gpt_params} parameters (12 x layers x dim^2), at most {}",
                    limits::GPT_PARAMS
                ),
            ));
        }
        for (key, list) in [("freeze", &self.freeze), ("reinit", &self.reinit)] {
            at_most(key, list.len(), limits::LIST_ENTRIES).map_err(|_| {
                invalid(
                    key,
                    format!("must have at most {} entries", limits::LIST_ENTRIES),
                )
            })?;
            if let Some(p) = list
                .iter()
                .find(|p| p.chars().count() > limits::PREFIX_CHARS)
            {
                return Err(invalid(
                    key,
                    format!(
                        "prefixes must be at most {} characters (got '{}')",
                        limits::PREFIX_CHARS,
                        crate::quote(p)
                    ),
                ));
            }
        }
        if self.dataset.classes.len() > limits::LIST_ENTRIES {
            return Err(invalid(
                "dataset.classes",
                format!("must have at most {} entries", limits::LIST_ENTRIES),
            ));
        }
        Ok(())
    }

    /// The checks of what a job trains with: model, data, optimizer, schedule.
    fn validate_training(&self) -> Result<(), SpecError> {
        let d = &self.dataset;
        if d.format == DataFormat::Text && d.context == 0 {
            return Err(invalid(
                "dataset.context",
                "must be set for text (bytes per sample)",
            ));
        }
        if d.format != DataFormat::Text && d.context != 0 {
            return Err(invalid(
                "dataset.context",
                format!("applies to text data only, not {}", d.format),
            ));
        }
        if !(d.test_fraction > 0.0 && d.test_fraction < 1.0) {
            return Err(invalid(
                "dataset.test_fraction",
                format!("must be in (0, 1) (got {})", short(d.test_fraction)),
            ));
        }
        if let Some(c) = d.classes.iter().find(|&&c| c < 0) {
            return Err(invalid("dataset.classes", format!("{c} is not a class")));
        }
        if self.accumulate == 0 {
            return Err(invalid("accumulate", "must be at least 1"));
        }
        if self.model.builtin() == Some(ModelKind::Gpt) {
            let m = &self.model_config;
            if m.layers == 0 || m.heads == 0 || m.dim == 0 {
                return Err(invalid(
                    "model_config",
                    "layers, heads and dim must be at least 1",
                ));
            }
            if !m.dim.is_multiple_of(m.heads) {
                return Err(invalid(
                    "model_config.dim",
                    format!("({}) must be a multiple of heads ({})", m.dim, m.heads),
                ));
            }
            if d.format != DataFormat::Text {
                return Err(invalid(
                    "dataset.format",
                    format!("gpt trains on text, not {}", d.format),
                ));
            }
            if m.context != 0 && m.context < d.context {
                return Err(invalid(
                    "model_config.context",
                    format!(
                        "({}) is shorter than dataset.context ({})",
                        m.context, d.context
                    ),
                ));
            }
        }
        if self.loss == LossKind::Model && !self.model.is_script() {
            return Err(invalid(
                "loss",
                "\"model\" needs a TorchScript model whose forward returns the loss",
            ));
        }
        for (key, prefixes) in [("freeze", &self.freeze), ("reinit", &self.reinit)] {
            if let Some(p) = prefixes.iter().find(|p| p.is_empty()) {
                return Err(invalid(
                    key,
                    format!("\"{p}\": an empty prefix would match every parameter"),
                ));
            }
        }
        let o = &self.optimizer;
        match o.kind {
            OptimizerKind::Sgd => {
                if o.nesterov && o.momentum == 0.0 {
                    return Err(invalid("optimizer.nesterov", "needs momentum > 0"));
                }
            }
            OptimizerKind::Adamw => {
                if o.momentum != 0.0 || o.nesterov {
                    return Err(invalid(
                        "optimizer.momentum",
                        "applies to sgd, not adamw (see betas)",
                    ));
                }
                if let Some(b) = o.betas.iter().find(|b| !(0.0..1.0).contains(*b)) {
                    return Err(invalid(
                        "optimizer.betas",
                        format!("must be in [0, 1) (got {})", short(*b)),
                    ));
                }
                if !(o.eps.is_finite() && o.eps > 0.0) {
                    return Err(invalid(
                        "optimizer.eps",
                        format!("must be a positive number (got {})", short(o.eps)),
                    ));
                }
            }
        }
        if !(o.clip_grad_norm.is_finite() && o.clip_grad_norm >= 0.0) {
            return Err(invalid(
                "optimizer.clip_grad_norm",
                format!("must be >= 0 (got {})", short(o.clip_grad_norm)),
            ));
        }
        let s = &self.schedule;
        if s.kind == ScheduleKind::Step && s.step_size == 0 {
            return Err(invalid(
                "schedule.step_size",
                "must be set for kind = \"step\"",
            ));
        }
        if !(s.gamma.is_finite() && s.gamma >= 0.0) {
            return Err(invalid(
                "schedule.gamma",
                format!("must be >= 0 (got {})", short(s.gamma)),
            ));
        }
        if !(s.min_lr.is_finite() && s.min_lr >= 0.0 && s.min_lr <= o.lr) {
            return Err(invalid(
                "schedule.min_lr",
                format!("must be in [0, optimizer.lr] (got {})", short(s.min_lr)),
            ));
        }
        Ok(())
    }
}

/// toml errors span several lines (with a source excerpt); keep the message one line.
fn one_line(e: &toml::de::Error) -> String {
    let msg = crate::quote_message(&e.message().trim().replace('\n', " "));
    match e.span() {
        Some(span) => format!("{msg} (at byte {})", span.start),
        None => msg,
    }
}

/// Prefixes a deserialization error with the dotted key at its span.
fn with_key(text: &str, e: &toml::de::Error) -> String {
    let msg = crate::quote_message(&e.message().trim().replace('\n', " "));
    let Some(span) = e.span() else { return msg };
    let mut table = String::new();
    let mut offset = 0;
    for line in text.lines() {
        let end = offset + line.len() + 1;
        let t = line.trim();
        if t.starts_with('[') {
            table = crate::quote(t.trim_matches(|c| c == '[' || c == ']')).into_owned();
        }
        if span.start < end {
            return match t.split_once('=') {
                Some((k, _)) if table.is_empty() => format!("{}: {msg}", crate::quote(k.trim())),
                Some((k, _)) => format!("{table}.{}: {msg}", crate::quote(k.trim())),
                None if !table.is_empty() => format!("{table}: {msg}"),
                None => msg,
            };
        }
        offset = end;
    }
    msg
}

/// Dotted parts an override's key may have (spec keys have at most two).
const MAX_KEY_PARTS: usize = 8;

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
    // Every spec key has at most two parts (`optimizer.lr`): a deeper one
    // is a mistake, and a very deep one would overflow the stack of
    // whatever walks the nested tables it makes.
    if parts.len() > MAX_KEY_PARTS {
        return Err(SpecError::Parse(format!(
            "--set {}: nested deeper than any spec key",
            crate::quote(key)
        )));
    }
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
        assert_eq!(spec.model, ModelSource::Builtin(ModelKind::Cnn));
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
            (spec.batch_size, spec.optimizer.lr, spec.model.clone()),
            (16, 0.1, ModelSource::Builtin(ModelKind::Mlp))
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
    fn tensorboard_is_on_unless_the_checkpoint_section_turns_it_off() {
        let spec = JobSpec::parse(EXAMPLE, &[]).unwrap();
        assert!(spec.checkpoint.tensorboard, "no [checkpoint] section");
        let dir_only = format!("{EXAMPLE}[checkpoint]\ndir = \"/ckpt\"\n");
        assert!(
            JobSpec::parse(&dir_only, &[])
                .unwrap()
                .checkpoint
                .tensorboard
        );
        let off = JobSpec::parse(EXAMPLE, &["checkpoint.tensorboard=false".into()]).unwrap();
        assert!(!off.checkpoint.tensorboard);
        let again = JobSpec::parse(&off.to_toml(), &[]).unwrap();
        assert_eq!(again, off, "round trip keeps it off");
        let err = JobSpec::parse(EXAMPLE, &["checkpoint.tensorbaord=false".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("tensorbaord"), "{err}");
        let err = JobSpec::parse(EXAMPLE, &["checkpoint.tensorboard=3".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("checkpoint.tensorboard"), "{err}");
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

    #[test]
    fn compression_names_a_wire_encoding_or_powersgd_with_a_rank() {
        let parse = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            JobSpec::parse(EXAMPLE, &sets)
        };
        let bf16 = parse(&["ring.compression=bf16"]).unwrap();
        assert_eq!(bf16.ring.wire_encoding(), WireEncoding::Bf16);
        let psgd = parse(&["ring.compression=powersgd:4"]).unwrap();
        assert_eq!(
            psgd.ring.compression.and_then(Compression::powersgd_rank),
            Some(4)
        );
        assert_eq!(psgd.ring.wire_encoding(), WireEncoding::F32);
        assert_eq!(JobSpec::parse(&psgd.to_toml(), &[]).unwrap(), psgd);
        let default = parse(&[]).unwrap();
        assert_eq!(default.ring.wire_encoding(), WireEncoding::F32);
        assert_eq!(default.ring.overlap, Overlap::Auto);
        let on = parse(&["ring.overlap=true"]).unwrap();
        assert_eq!(on.ring.overlap, Overlap::Always(true));
        assert_eq!(JobSpec::parse(&default.to_toml(), &[]).unwrap(), default);
        assert_eq!(JobSpec::parse(&on.to_toml(), &[]).unwrap(), on);
        let e = parse(&["ring.overlap=sometimes"]).unwrap_err().to_string();
        assert!(e.contains("ring.overlap"), "{e}");
        // Auto: on across hosts, off when every member is on one.
        let m = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(!Overlap::Auto.applies(&m(&["127.0.0.1:1", "127.0.0.1:2"])));
        assert!(Overlap::Auto.applies(&m(&["10.0.0.1:1", "10.0.0.2:1"])));
        assert!(Overlap::Auto.applies(&m(&["[::1]:1", "[::2]:1"])));
        assert!(!Overlap::Auto.applies(&m(&["[::1]:1", "[::1]:2"])));
        assert!(Overlap::Always(true).applies(&m(&["127.0.0.1:1", "127.0.0.1:2"])));
        for (bad, says) in [
            ("ring.compression=powersgd:0", "rank within 1..=64"),
            ("ring.compression=powersgd:x", "rank within 1..=64"),
            ("ring.compression=topk", "unknown compression 'topk'"),
            ("ring.bucket_mb=0", "ring.bucket_mb"),
        ] {
            let e = parse(&[bad]).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let e = parse(&["ring.compression=bf16", "ring.encoding=f16"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("set only one"), "{e}");
    }

    #[test]
    fn models_devices_and_training_options_parse_and_round_trip() {
        let spec = JobSpec::parse(
            EXAMPLE,
            &[
                "model=nets/resnet.pt".into(),
                "loss=model".into(),
                "device=cuda:1".into(),
                "optimizer.kind=adamw".into(),
                "optimizer.momentum=0".into(),
                "schedule.kind=cosine".into(),
                "schedule.warmup_steps=10".into(),
                "accumulate=4".into(),
                "freeze=[\"c1\", \"c2\"]".into(),
            ],
        )
        .unwrap();
        assert_eq!(spec.model, ModelSource::ScriptFile("nets/resnet.pt".into()));
        assert_eq!(spec.device, DeviceSpec::Cuda(1));
        assert_eq!(
            spec.optimizer.weight_decay(),
            0.01,
            "torch.optim.AdamW's default"
        );
        assert_eq!(spec.global_batch(4), 4 * 64 * 4);
        assert_eq!(JobSpec::parse(&spec.to_toml(), &[]).unwrap(), spec);
        let blob = format!("sha256:{}", "ab".repeat(32));
        let spec = JobSpec::parse(EXAMPLE, &[format!("model={blob}")]).unwrap();
        assert_eq!(spec.model.to_string(), blob);
    }

    #[test]
    fn on_nonfinite_fails_by_default_and_names_its_choices() {
        let spec = JobSpec::parse(EXAMPLE, &[]).unwrap();
        assert_eq!(spec.on_nonfinite, OnNonFinite::Fail);
        let spec = JobSpec::parse(EXAMPLE, &["on_nonfinite=skip_step".into()]).unwrap();
        assert_eq!(spec.on_nonfinite, OnNonFinite::SkipStep);
        assert_eq!(JobSpec::parse(&spec.to_toml(), &[]).unwrap(), spec);
        let err = JobSpec::parse(EXAMPLE, &["on_nonfinite=ignore".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("on_nonfinite") && err.contains("`fail` or `skip_step`"),
            "{err}"
        );
    }

    #[test]
    fn bad_training_options_name_the_key() {
        let err = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            JobSpec::parse(EXAMPLE, &sets).unwrap_err().to_string()
        };
        assert!(err(&["device=tpu"]).contains("unknown device 'tpu' (cpu, cuda or cuda:N)"));
        assert!(err(&["model=resnet"]).contains("unknown model 'resnet'"));
        assert!(err(&["model=sha256:12"]).contains("sha256:<64 hex digits>"));
        assert!(err(&["loss=model"]).contains("loss \"model\" needs a TorchScript model"));
        assert!(err(&["dataset.format=text"]).contains("dataset.context must be set"));
        assert!(err(&["optimizer.nesterov=true", "optimizer.momentum=0"])
            .contains("nesterov needs momentum"));
        assert!(err(&["schedule.kind=step"]).contains("schedule.step_size must be set"));
        assert!(err(&["model=gpt"]).contains("gpt trains on text"));
        assert!(err(&["freeze=[\"\"]"]).contains("freeze"));
        assert!(err(&["accumulate=0"]).contains("accumulate must be at least 1"));
    }

    #[test]
    fn values_past_their_bounds_are_refused_naming_key_and_limit() {
        let err = |sets: &[String]| JobSpec::parse(EXAMPLE, sets).unwrap_err().to_string();
        let e = err(&["ring.timeout_s=1e300".into()]);
        assert_eq!(
            e,
            "job spec: ring.timeout_s must be at most 3600 seconds (got 1e300)"
        );
        assert!(err(&["ring.timeout_s=nan".into()]).contains("ring.timeout_s"));
        assert_eq!(
            err(&["threads=2147483648".into()]),
            "job spec: threads must be at most 256 (got 2147483648)"
        );
        assert!(err(&["workers=100000".into()]).contains("workers must be at most 1024"));
        assert!(err(&["batch_size=10000000".into()]).contains("batch_size must be at most"));
        assert!(err(&["epochs=1000000000".into()]).contains("epochs must be at most"));
        assert!(err(&["max_steps=99999999999".into()]).contains("max_steps must be at most"));
        let gpt = [
            "model=gpt".to_string(),
            "dataset.format=text".into(),
            "dataset.context=64".into(),
            "model_config.dim=16384".into(),
            "model_config.heads=128".into(),
            "model_config.layers=256".into(),
        ];
        assert!(
            err(&gpt).contains("model_config asks for about"),
            "{}",
            err(&gpt)
        );
        // A long name is refused, and quoted short.
        let e = err(&[format!("name={}", "n".repeat(900_000))]);
        assert!(
            e.contains("name must be at most 128 characters (got 900000"),
            "{}",
            &e[..200]
        );
        assert!(e.len() < 300, "{}", e.len());
        let e = err(&[format!("dataset.path=/{}", "p".repeat(100_000))]);
        assert!(
            e.contains("dataset.path must be at most 4096 bytes"),
            "{}",
            &e[..200]
        );
        assert!(e.len() < 300, "{}", e.len());
        // An unknown key of 100 KB is named, not echoed whole.
        let e = JobSpec::parse(&format!("{} = 1\n{EXAMPLE}", "k".repeat(100_000)), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown field `kkk"),
            "{}",
            &e[..200.min(e.len())]
        );
        assert!(e.len() < 600, "{}", e.len());
        // At the limit is fine.
        JobSpec::parse(
            EXAMPLE,
            &["threads=256".into(), "ring.timeout_s=3600".into()],
        )
        .unwrap();
    }
}
