//! The network a job trains, whatever it is (a built-in `mlp`, `cnn` or
//! `gpt`, or a TorchScript module the user brought), and everything the
//! trainer does with it: forward and backward with the job's loss, its
//! trained parameters and their gradients as one flat f32 vector (what the
//! ring all-reduces and the optimizer updates), its buffers (averaged across
//! replicas every step), its state under the model's own names (checkpoints,
//! `init_from`), and evaluation.
//!
//! Parameters fall in two groups: *trained* ones (in [`ParamLayout`] order,
//! flattened for the ring) and *frozen* ones (`freeze`: no gradient, not in
//! the ring, still checkpointed).

pub mod builtin;
pub mod gpt;
pub mod grad_hooks;
pub mod script;

use std::collections::HashMap;

use ringtrain_common::jobspec::{JobSpec, LossKind, ModelKind, ModelSource};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Reduction, Tensor};

use self::gpt::{Gpt, GptConfig};
use self::script::{ScriptError, ScriptModule};

/// Rows per forward pass in [`Model::evaluate`], as in the reference script.
const EVAL_BATCH: i64 = 1000;

/// One tensor's place in a flat vector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<i64>,
    pub offset: usize,
    pub len: usize,
}

impl ParamSpec {
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len
    }
}

/// Tensors in a fixed order, packed back to back into one flat vector.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParamLayout {
    params: Vec<ParamSpec>,
    total: usize,
}

impl ParamLayout {
    /// Packs the tensors in the order given.
    pub fn new(named_shapes: impl IntoIterator<Item = (String, Vec<i64>)>) -> Self {
        let mut total = 0;
        let params = named_shapes
            .into_iter()
            .map(|(name, shape)| {
                let len = shape.iter().product::<i64>().max(0) as usize;
                let spec = ParamSpec {
                    name,
                    shape,
                    offset: total,
                    len,
                };
                total += len;
                spec
            })
            .collect();
        Self { params, total }
    }

    pub fn params(&self) -> &[ParamSpec] {
        &self.params
    }

    /// Elements of the flat vector.
    pub fn total(&self) -> usize {
        self.total
    }
}

/// Why a model cannot be built, loaded or run. Each is one line naming the
/// file, tensor, prefix or shapes involved.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{source_name} is not a TorchScript module (save it with torch.jit.script or torch.jit.trace, then torch.jit.save): {message}")]
    NotScript {
        source_name: String,
        message: String,
    },
    #[error("TorchScript model: {0}")]
    Script(#[from] ScriptError),
    #[error("the model's forward failed on a batch of inputs {inputs:?}: {message}")]
    Forward { inputs: Vec<i64>, message: String },
    #[error("{0}")]
    Output(String),
    #[error("parameter {name} is {kind:?}; ringtrain trains f32 parameters")]
    ParamKind { name: String, kind: Kind },
    #[error("{key} prefix '{prefix}' matches no parameter (parameters: {known})")]
    NoMatch {
        key: &'static str,
        prefix: String,
        known: String,
    },
    #[error("{origin}: {problem}")]
    State { origin: String, problem: String },
    #[error("{0}")]
    Data(String),
    #[error("device {0}: {1}")]
    Device(String, String),
    #[error("the forward pass was stopped while waiting for its parameters")]
    Gated,
    #[error("the model has no trainable parameters (everything is frozen?)")]
    NothingToTrain,
}

fn script_error(e: ScriptError, inputs: &Tensor) -> ModelError {
    ModelError::Forward {
        inputs: inputs.size(),
        message: first_line(&e.0),
    }
}

/// libtorch's messages run over many lines (with a C++ backtrace); the first
/// one says what happened.
fn first_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
        .to_string()
}

/// True when `name` is `prefix` or lies under it (`features.0` matches
/// `features.0.weight`, not `features.01.weight`).
pub fn under(name: &str, prefix: &str) -> bool {
    name == prefix
        || name
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('.') || prefix.ends_with('.'))
}

enum Net {
    /// A tch network over the VarStore the model owns.
    Builtin(Box<dyn builtin::GatedModule>),
    /// The built-in transformer (kept as itself: `generate` samples from it).
    Gpt(Box<Gpt>),
    Script(ScriptModule),
}

/// Lets a forward pass wait until parameters are final: the trainer
/// finishes the last step's update of a layer just before the next forward
/// pass reaches it (see `crate::trainer`).
pub trait ForwardGate {
    /// Before the forward pass first uses the trained parameters `params`
    /// (indices into [`Model::layout`]). False: stop the pass (the gate
    /// keeps the reason).
    fn before_use(&mut self, params: &[usize]) -> bool;
    /// After the forward pass, before backward: every parameter must be
    /// final by the time this returns true.
    fn before_backward(&mut self) -> bool;
}

/// What the data set tells the model it will see.
#[derive(Clone, Debug)]
pub struct DataShape {
    /// One sample's inputs, e.g. [1, 28, 28] or [context].
    pub sample: Vec<i64>,
    /// For class targets: how many classes.
    pub classes: Option<i64>,
}

/// Sums over a batch (or a whole split) that evaluation reports.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EvalSums {
    pub loss_sum: f64,
    /// Correct predictions (None where the loss is the model's own).
    pub correct: Option<f64>,
    /// What the loss and accuracy are averaged over: samples, or tokens for
    /// sequence outputs.
    pub count: f64,
}

/// A network and its tensors, on one device.
pub struct Model {
    description: String,
    net: Net,
    /// Owns the built-in networks' variables.
    _vs: Option<nn::VarStore>,
    device: Device,
    loss: LossKind,
    /// Trained parameters: layout and tensors in the same order.
    layout: ParamLayout,
    params: Vec<Tensor>,
    /// Parameters kept fixed (`freeze`).
    frozen: Vec<(String, Tensor)>,
    /// Every buffer (running statistics, counters), by name.
    buffers: Vec<(String, Tensor)>,
    /// The floating-point buffers, averaged across replicas each step.
    float_buffers: ParamLayout,
    training: Option<bool>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("model", &self.description)
            .field("trained", &self.layout.total())
            .finish_non_exhaustive()
    }
}

/// The device a spec names, checked against this machine.
pub fn device(spec: &ringtrain_common::jobspec::DeviceSpec) -> Result<Device, ModelError> {
    use ringtrain_common::jobspec::DeviceSpec;
    match *spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(n) => {
            let available = tch::Cuda::device_count().max(0) as usize;
            if n < available {
                Ok(Device::Cuda(n))
            } else {
                let why = if available == 0 {
                    "this worker has no CUDA GPU".to_string()
                } else {
                    format!("this worker has {available} CUDA GPU(s)")
                };
                Err(ModelError::Device(format!("cuda:{n}"), why))
            }
        }
    }
}

impl Model {
    /// Builds the job's network for data of `shape` on `device`: a built-in
    /// one with its seeded init, or the TorchScript module in `script` (the
    /// bytes of its .pt file) with the weights it was saved with; then
    /// `init_from` (given as named tensors), `reinit` and `freeze` as the
    /// spec says.
    pub fn build(
        spec: &JobSpec,
        shape: &DataShape,
        script: Option<&[u8]>,
        init_from: Option<(&str, &HashMap<String, Tensor>)>,
        device: Device,
    ) -> Result<Model, ModelError> {
        let (net, vs, description) = match &spec.model {
            ModelSource::Builtin(kind) => {
                let vs = nn::VarStore::new(device);
                let net = builtin_net(*kind, &vs.root(), spec, shape)?;
                (net, Some(vs), kind.to_string())
            }
            source => {
                let bytes = script.ok_or_else(|| ModelError::NotScript {
                    source_name: source.to_string(),
                    message: "the model file was not provided".into(),
                })?;
                let module =
                    ScriptModule::load(bytes, device).map_err(|e| ModelError::NotScript {
                        source_name: source.to_string(),
                        message: first_line(&e.0),
                    })?;
                (Net::Script(module), None, source.to_string())
            }
        };
        let (mut named_params, buffers) = match (&net, &vs) {
            (Net::Script(m), _) => (m.named_parameters()?, m.named_buffers()?),
            (_, Some(vs)) => {
                let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
                named.sort_by(|a, b| a.0.cmp(&b.0));
                (named, Vec::new())
            }
            (_, None) => unreachable!("built-in networks own a VarStore"),
        };
        for (name, t) in &named_params {
            if t.kind() != Kind::Float {
                return Err(ModelError::ParamKind {
                    name: name.clone(),
                    kind: t.kind(),
                });
            }
        }
        // Built-ins start from their seeded init; TorchScript models from
        // the weights in their file.
        if let ModelSource::Builtin(_) = &spec.model {
            let shapes: Vec<(String, Vec<i64>)> = named_params
                .iter()
                .map(|(n, t)| (n.clone(), t.size()))
                .collect();
            let values = builtin::default_init(&shapes, spec.seed);
            assign(&mut named_params, &values, device);
        }
        let mut model = Model {
            description,
            net,
            _vs: vs,
            device,
            loss: spec.loss,
            layout: ParamLayout::default(),
            params: Vec::new(),
            frozen: Vec::new(),
            buffers,
            float_buffers: ParamLayout::default(),
            training: None,
        };
        model.float_buffers = ParamLayout::new(
            model
                .buffers
                .iter()
                .filter(|(_, t)| t.is_floating_point())
                .map(|(n, t)| (n.clone(), t.size())),
        );
        // Every parameter trained until `freeze` says otherwise.
        model.layout = ParamLayout::new(named_params.iter().map(|(n, t)| (n.clone(), t.size())));
        model.params = named_params.into_iter().map(|(_, t)| t).collect();
        if let Some((origin, tensors)) = init_from {
            let skip = |name: &str| spec.reinit.iter().any(|p| under(name, p));
            model.load_state(tensors, origin, !spec.strict, &skip)?;
        }
        model.reinit(&spec.reinit, spec.seed ^ 0x5EED_0F4E_1A17)?;
        model.freeze(&spec.freeze)?;
        if model.layout.total() == 0 {
            return Err(ModelError::NothingToTrain);
        }
        Ok(model)
    }

    /// Every parameter name, trained and frozen (for error messages).
    fn param_names(&self) -> Vec<String> {
        self.layout
            .params()
            .iter()
            .map(|p| p.name.clone())
            .chain(self.frozen.iter().map(|(n, _)| n.clone()))
            .collect()
    }

    fn known(&self) -> String {
        let names = self.param_names();
        let shown: Vec<&str> = names.iter().take(12).map(String::as_str).collect();
        let more = names.len().saturating_sub(shown.len());
        if more > 0 {
            format!("{}, … {more} more", shown.join(", "))
        } else {
            shown.join(", ")
        }
    }

    /// Fresh values (PyTorch's default init) for parameters under `prefixes`.
    fn reinit(&mut self, prefixes: &[String], seed: u64) -> Result<(), ModelError> {
        for prefix in prefixes {
            let hits: Vec<usize> = (0..self.params.len())
                .filter(|&i| under(&self.layout.params()[i].name, prefix))
                .collect();
            if hits.is_empty() {
                return Err(ModelError::NoMatch {
                    key: "reinit",
                    prefix: prefix.clone(),
                    known: self.known(),
                });
            }
            let shapes: Vec<(String, Vec<i64>)> = self
                .layout
                .params()
                .iter()
                .map(|p| (p.name.clone(), p.shape.clone()))
                .collect();
            let values = builtin::default_init(&shapes, seed);
            tch::no_grad(|| {
                for i in hits {
                    let v = Tensor::from_slice(&values[i])
                        .view(self.layout.params()[i].shape.as_slice())
                        .to_device(self.device);
                    self.params[i].copy_(&v);
                }
            });
        }
        Ok(())
    }

    /// Moves parameters under `prefixes` out of training.
    fn freeze(&mut self, prefixes: &[String]) -> Result<(), ModelError> {
        if prefixes.is_empty() {
            return Ok(());
        }
        for prefix in prefixes {
            if !self.layout.params().iter().any(|p| under(&p.name, prefix)) {
                return Err(ModelError::NoMatch {
                    key: "freeze",
                    prefix: prefix.clone(),
                    known: self.known(),
                });
            }
        }
        let mut kept = Vec::new();
        let params = std::mem::take(&mut self.params);
        for (spec, mut t) in self.layout.params().iter().zip(params) {
            if prefixes.iter().any(|p| under(&spec.name, p)) {
                t = t.set_requires_grad(false);
                self.frozen.push((spec.name.clone(), t));
            } else {
                kept.push((spec.name.clone(), t));
            }
        }
        self.layout = ParamLayout::new(kept.iter().map(|(n, t)| (n.clone(), t.size())));
        self.params = kept.into_iter().map(|(_, t)| t).collect();
        Ok(())
    }

    /// The built-in transformer, for sampling.
    pub fn gpt(&self) -> Option<&Gpt> {
        match &self.net {
            Net::Gpt(g) => Some(g),
            _ => None,
        }
    }

    pub fn description(&self) -> &str {
        &self.description
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn num_params(&self) -> usize {
        self.layout.total()
    }

    /// The trained parameters, in flat order.
    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    /// The floating-point buffers, in flat order (empty for the built-ins).
    pub fn buffer_layout(&self) -> &ParamLayout {
        &self.float_buffers
    }

    fn set_training(&mut self, train: bool) -> Result<(), ModelError> {
        if self.training != Some(train) {
            if let Net::Script(m) = &mut self.net {
                m.set_train(train)?;
            }
            self.training = Some(train);
        }
        Ok(())
    }

    /// The raw output for a batch.
    fn output(&self, x: &Tensor, y: &Tensor, train: bool) -> Result<Tensor, ModelError> {
        match &self.net {
            Net::Builtin(net) => Ok(net.forward_t(x, train)),
            Net::Gpt(net) => Ok(net.forward_t(x, train)),
            Net::Script(m) => {
                let out = match self.loss {
                    LossKind::CrossEntropy => m.forward(&[x]),
                    LossKind::Model => m.forward(&[x, y]),
                };
                out.map_err(|e| script_error(e, x))
            }
        }
    }

    /// The summed loss of a batch, the count it sums over, and the correct
    /// predictions (classification), checking the output's shape.
    fn loss_sum(
        &self,
        out: &Tensor,
        x: &Tensor,
        y: &Tensor,
    ) -> Result<(Tensor, f64, Option<Tensor>), ModelError> {
        let n = y.size().first().copied().unwrap_or(0);
        match self.loss {
            LossKind::Model => {
                if out.numel() != 1 {
                    return Err(ModelError::Output(format!(
                        "loss = \"model\": forward(inputs {:?}, targets {:?}) returned {:?}, expected a scalar loss",
                        x.size(),
                        y.size(),
                        out.size()
                    )));
                }
                // The model's mean over its batch, summed back.
                Ok((out.reshape([]) * n as f64, n as f64, None))
            }
            LossKind::CrossEntropy => {
                let (o, t) = (out.size(), y.size());
                let classes = o.last().copied().unwrap_or(0);
                let shape_ok = o.len() == t.len() + 1 && o[..t.len()] == t[..] && classes > 0;
                let prob_targets = y.is_floating_point() && o == t;
                if !(shape_ok || prob_targets) {
                    let mut want = t.clone();
                    want.push(-1);
                    return Err(ModelError::Output(format!(
                        "the model returned {o:?} for inputs {:?}; cross_entropy needs logits {} (targets {t:?})",
                        x.size(),
                        format!("{want:?}").replace("-1", "C")
                    )));
                }
                if shape_ok && !y.is_floating_point() && y.numel() > 0 {
                    let top = y.max().int64_value(&[]);
                    let low = y.min().int64_value(&[]);
                    if top >= classes || low < 0 {
                        return Err(ModelError::Output(format!(
                            "the model returned {o:?} ({classes} classes) but a target is {}",
                            if low < 0 { low } else { top }
                        )));
                    }
                }
                let logits = out.reshape([-1, classes]);
                let count = logits.size()[0] as f64;
                let target = if prob_targets {
                    y.reshape([-1, classes])
                } else {
                    y.reshape([-1])
                };
                let sum =
                    logits.cross_entropy_loss::<Tensor>(&target, None, Reduction::Sum, -100, 0.0);
                let correct = (!prob_targets)
                    .then(|| logits.argmax(1, false).eq_tensor(&target).sum(Kind::Int64));
                Ok((sum, count, correct))
            }
        }
    }

    /// One forward in evaluation mode on a batch, checking what the model
    /// returns: the dry run before a job is accepted.
    pub fn check(&mut self, x: &Tensor, y: &Tensor) -> Result<(), ModelError> {
        self.set_training(false)?;
        let (x, y) = (x.to_device(self.device), y.to_device(self.device));
        tch::no_grad(|| {
            let out = self.output(&x, &y, false)?;
            self.loss_sum(&out, &x, &y).map(|_| ())
        })
    }

    /// Adds the gradients of `sum of the batch's losses / global` (in train
    /// mode) to the trained parameters' gradients, and returns the batch's
    /// mean loss. `global` counts what the whole step's loss is averaged
    /// over, in samples; for sequence outputs each sample counts its
    /// positions. An empty batch adds nothing and returns 0.
    pub fn accumulate_gradients(
        &mut self,
        x: &Tensor,
        y: &Tensor,
        global: u64,
    ) -> Result<f64, ModelError> {
        self.accumulate_gated(x, y, global, None)
    }

    /// The trained parameters (indices into the layout) named `layer.*`.
    fn layer_params(&self, layer: &str) -> Vec<usize> {
        (0..self.layout.params().len())
            .filter(|&i| under(&self.layout.params()[i].name, layer))
            .collect()
    }

    fn accumulate_gated(
        &mut self,
        x: &Tensor,
        y: &Tensor,
        global: u64,
        mut gate: Option<&mut dyn ForwardGate>,
    ) -> Result<f64, ModelError> {
        let n = y.size().first().copied().unwrap_or(0);
        if n == 0 {
            // Nothing to compute, but the parameters are still made final.
            if let Some(g) = gate {
                if !g.before_backward() {
                    return Err(ModelError::Gated);
                }
            }
            return Ok(0.0);
        }
        self.set_training(true)?;
        let (x, y) = (x.to_device(self.device), y.to_device(self.device));
        let out = match (&self.net, gate.as_deref_mut()) {
            (_, None) => self.output(&x, &y, true)?,
            // The built-ins wait layer by layer.
            (Net::Builtin(net), Some(g)) => net
                .forward_gated(&x, &mut |layer| g.before_use(&self.layer_params(layer)))
                .ok_or(ModelError::Gated)?,
            // Others wait for everything first.
            (_, Some(g)) => {
                let all: Vec<usize> = (0..self.layout.params().len()).collect();
                if !g.before_use(&all) {
                    return Err(ModelError::Gated);
                }
                self.output(&x, &y, true)?
            }
        };
        let (sum, count, _) = self.loss_sum(&out, &x, &y)?;
        if let Some(g) = gate {
            if !g.before_backward() {
                return Err(ModelError::Gated);
            }
        }
        // Per-sample count (positions per sample for sequences).
        let per_sample = count / n as f64;
        (&sum / (global as f64 * per_sample)).backward();
        Ok(sum.double_value(&[]) / count)
    }

    /// Drops every trained parameter's gradient (`.grad = None`), so the
    /// next backward hands gradients over instead of adding them to zeros.
    pub fn zero_grads(&mut self) {
        for p in &mut self.params {
            if grad_hooks::clear_grad(p).is_err() {
                p.zero_grad();
            }
        }
    }

    /// [`Model::accumulate_gradients`], with each trained parameter's
    /// gradient from this pass handed to `sink` as backward produces it
    /// (index: the parameter's place in [`Model::layout`]).
    pub fn accumulate_gradients_into(
        &mut self,
        x: &Tensor,
        y: &Tensor,
        global: u64,
        sink: &mut dyn grad_hooks::GradSink,
        gate: Option<&mut dyn ForwardGate>,
    ) -> Result<f64, ModelError> {
        // Shallow clones share the parameters' autograd state, so their
        // hooks are the parameters' hooks.
        let params: Vec<Tensor> = self.params.iter().map(Tensor::shallow_clone).collect();
        grad_hooks::with_hooks(&params, sink, || self.accumulate_gated(x, y, global, gate))?
    }

    /// Handles on the trained parameters (shallow clones: same storage),
    /// for [`copy_range_into_params`] while the model itself is busy.
    pub fn param_handles(&self) -> Vec<Tensor> {
        self.params.iter().map(Tensor::shallow_clone).collect()
    }

    /// The trained parameters' own memory, each with its flat range, when
    /// every one is a contiguous f32 CPU tensor and no two share memory
    /// (else None). The fused descent step writes each range straight into
    /// it: a libtorch call per piece costs microseconds, and a step writes
    /// each 256 KiB range into one or two parameters.
    #[allow(unsafe_code)]
    pub fn params_memory(&mut self) -> Option<Vec<(std::ops::Range<usize>, &mut [f32])>> {
        let mut spans = Vec::with_capacity(self.params.len());
        for (spec, p) in self.layout.params().iter().zip(&self.params) {
            let plain = p.device() == Device::Cpu
                && p.kind() == Kind::Float
                && p.is_contiguous()
                && p.numel() == spec.len
                && (p.data_ptr() as usize).is_multiple_of(std::mem::align_of::<f32>());
            if !plain {
                return None;
            }
            spans.push((p.data_ptr() as usize, spec.range()));
        }
        // Tied weights would give two slices over one memory.
        let mut starts: Vec<(usize, usize)> = spans.iter().map(|(a, r)| (*a, r.len())).collect();
        starts.sort_unstable();
        if starts.windows(2).any(|w| w[0].0 + w[0].1 * 4 > w[1].0) {
            return None;
        }
        Some(
            spans
                .into_iter()
                .map(|(at, range)| {
                    if range.is_empty() {
                        // An empty tensor's data pointer may be null.
                        return (range, &mut [][..]);
                    }
                    // SAFETY: `at` is the aligned data of a contiguous f32 CPU
                    // tensor of `range.len()` elements, checked above, whose storage
                    // `self.params` keeps alive for the borrow of `self`; no
                    // two parameters overlap (checked), and libtorch touches
                    // them only through `self`, which this borrow holds.
                    let values =
                        unsafe { std::slice::from_raw_parts_mut(at as *mut f32, range.len()) };
                    (range, values)
                })
                .collect(),
        )
    }

    /// Sums over the split's rows, in evaluation mode, [`EVAL_BATCH`] rows at a time.
    pub fn evaluate(&mut self, x: &Tensor, y: &Tensor) -> Result<EvalSums, ModelError> {
        self.set_training(false)?;
        let n = y.size().first().copied().unwrap_or(0);
        let mut sums = EvalSums::default();
        tch::no_grad(|| {
            for start in (0..n).step_by(EVAL_BATCH as usize) {
                let len = EVAL_BATCH.min(n - start);
                let xb = x.narrow(0, start, len).to_device(self.device);
                let yb = y.narrow(0, start, len).to_device(self.device);
                let out = self.output(&xb, &yb, false)?;
                let (sum, count, correct) = self.loss_sum(&out, &xb, &yb)?;
                sums.loss_sum += sum.double_value(&[]);
                sums.count += count;
                if let Some(c) = correct {
                    *sums.correct.get_or_insert(0.0) += c.int64_value(&[]) as f64;
                }
            }
            Ok::<_, ModelError>(())
        })?;
        if self.loss == LossKind::Model {
            sums.correct = None;
        }
        Ok(sums)
    }

    /// Copies the trained parameters into `out` (`layout().total()` elements).
    pub fn params_to_flat(&self, out: &mut [f32]) {
        to_flat(&self.layout, &self.params, out);
    }

    /// Overwrites the trained parameters with `flat`, in place: the tensors
    /// keep their identity and `requires_grad`.
    pub fn flat_to_params(&mut self, flat: &[f32]) {
        from_flat(&self.layout, &mut self.params, flat, self.device);
    }

    /// Copies the gradients into `out`, zeros for a parameter without one.
    pub fn grads_to_flat(&self, out: &mut [f32]) {
        assert_eq!(out.len(), self.layout.total(), "flat gradient length");
        for (spec, p) in self.layout.params().iter().zip(&self.params) {
            let g = p.grad();
            if g.defined() {
                g.copy_data(&mut out[spec.range()], spec.len);
            } else {
                out[spec.range()].fill(0.0);
            }
        }
    }

    fn float_buffer_tensors(&self) -> Vec<&Tensor> {
        self.buffers
            .iter()
            .filter(|(_, t)| t.is_floating_point())
            .map(|(_, t)| t)
            .collect()
    }

    /// The floating-point buffers as f32 (`buffer_layout().total()` elements).
    pub fn buffers_to_flat(&self, out: &mut [f32]) {
        assert_eq!(out.len(), self.float_buffers.total(), "flat buffer length");
        for (spec, t) in self
            .float_buffers
            .params()
            .iter()
            .zip(self.float_buffer_tensors())
        {
            t.to_kind(Kind::Float)
                .copy_data(&mut out[spec.range()], spec.len);
        }
    }

    /// Overwrites the floating-point buffers with `flat`.
    pub fn flat_to_buffers(&mut self, flat: &[f32]) {
        assert_eq!(flat.len(), self.float_buffers.total(), "flat buffer length");
        let src = Tensor::from_slice(flat).to_device(self.device);
        tch::no_grad(|| {
            for (spec, (_, t)) in self.float_buffers.params().iter().zip(
                self.buffers
                    .iter_mut()
                    .filter(|(_, t)| t.is_floating_point()),
            ) {
                let part = src.narrow(0, spec.offset as i64, spec.len as i64);
                t.copy_(&part.view(spec.shape.as_slice()).to_kind(t.kind()));
            }
        });
    }

    /// Values in every buffer's exact state (floating-point ones as f32,
    /// integer ones as three 24-bit pieces each).
    pub fn exact_buffer_len(&self) -> usize {
        self.buffers
            .iter()
            .map(|(_, t)| {
                let n = t.numel();
                if t.is_floating_point() {
                    n
                } else {
                    n * crate::sync::PIECES
                }
            })
            .sum()
    }

    /// Every buffer, integer counters included, in a form an exact
    /// all-reduce carries unchanged (for the sync that brings a new member
    /// up to date).
    pub fn exact_buffers(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.exact_buffer_len());
        for (_, t) in &self.buffers {
            let cpu = t.to_device(Device::Cpu).contiguous().flatten(0, -1);
            if t.is_floating_point() {
                out.extend(Vec::<f32>::try_from(&cpu.to_kind(Kind::Float)).unwrap_or_default());
            } else {
                for v in Vec::<i64>::try_from(&cpu.to_kind(Kind::Int64)).unwrap_or_default() {
                    let mut pieces = [0f32; crate::sync::PIECES];
                    crate::sync::encode_u64(&mut pieces, v as u64);
                    out.extend(pieces);
                }
            }
        }
        out
    }

    /// Overwrites every buffer with what [`Model::exact_buffers`] gave.
    pub fn set_exact_buffers(&mut self, values: &[f32]) -> Result<(), crate::sync::SyncError> {
        if values.len() != self.exact_buffer_len() {
            return Err(crate::sync::SyncError::new(format!(
                "{} buffer values for {}",
                values.len(),
                self.exact_buffer_len()
            )));
        }
        let mut at = 0;
        let device = self.device;
        tch::no_grad(|| {
            for (_, t) in &mut self.buffers {
                let n = t.numel();
                let shape = t.size();
                let src = if t.is_floating_point() {
                    let v = Tensor::from_slice(&values[at..at + n]);
                    at += n;
                    v
                } else {
                    let mut ints = Vec::with_capacity(n);
                    for p in
                        values[at..at + n * crate::sync::PIECES].chunks_exact(crate::sync::PIECES)
                    {
                        ints.push(crate::sync::decode_u64(p)? as i64);
                    }
                    at += n * crate::sync::PIECES;
                    Tensor::from_slice(&ints)
                };
                t.copy_(
                    &src.view(shape.as_slice())
                        .to_kind(t.kind())
                        .to_device(device),
                );
            }
            Ok(())
        })
    }

    /// A hash of everything replicas must hold alike besides the trained
    /// parameters: frozen parameters and every buffer.
    pub fn state_hash(&self) -> u64 {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for (name, t) in self.frozen.iter().chain(&self.buffers) {
            h.update(name.as_bytes());
            h.update(&tensor_bytes(t));
        }
        h.digest()
    }

    /// Every tensor of the model under its own name: trained parameters,
    /// frozen parameters, buffers (what `state_dict()` holds in PyTorch).
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        self.layout
            .params()
            .iter()
            .map(|p| p.name.clone())
            .zip(self.params.iter().map(Tensor::shallow_clone))
            .chain(
                self.frozen
                    .iter()
                    .map(|(n, t)| (n.clone(), t.shallow_clone())),
            )
            .chain(
                self.buffers
                    .iter()
                    .map(|(n, t)| (n.clone(), t.shallow_clone())),
            )
            .collect()
    }

    /// Copies `tensors` (by name and shape) into the model. With `lenient`,
    /// names missing on either side are skipped; otherwise the first is an
    /// error. `skip` names tensors to leave as they are. A shape mismatch is
    /// always an error naming both shapes.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        origin: &str,
        lenient: bool,
        skip: &dyn Fn(&str) -> bool,
    ) -> Result<(), ModelError> {
        let problem = |problem: String| ModelError::State {
            origin: origin.to_string(),
            problem,
        };
        let mut targets: Vec<(String, Tensor)> = self.state_dict();
        targets.retain(|(n, _)| !skip(n));
        if !lenient {
            let mut extra: Vec<&String> = tensors
                .keys()
                .filter(|k| !skip(k) && !targets.iter().any(|(n, _)| n == *k))
                .collect();
            extra.sort();
            if let Some(name) = extra.first() {
                return Err(problem(format!(
                    "has tensor {name}, which the model lacks (strict = false skips it)"
                )));
            }
        }
        tch::no_grad(|| {
            for (name, mut dst) in targets {
                let Some(src) = tensors.get(&name) else {
                    if lenient {
                        continue;
                    }
                    return Err(problem(format!(
                        "lacks tensor {name} (strict = false skips it)"
                    )));
                };
                if src.size() != dst.size() {
                    return Err(problem(format!(
                        "tensor {name} is {:?} there, {:?} in the model",
                        src.size(),
                        dst.size()
                    )));
                }
                dst.copy_(&src.to_device(self.device).to_kind(dst.kind()));
            }
            Ok(())
        })
    }
}

/// The bytes of a tensor's values (CPU, contiguous).
pub fn tensor_bytes(t: &Tensor) -> Vec<u8> {
    let t = t.to_device(Device::Cpu).contiguous();
    let n = t.numel() * t.kind().elt_size_in_bytes();
    let mut out = vec![0u8; n];
    t.copy_data_u8(&mut out, t.numel());
    out
}

fn to_flat(layout: &ParamLayout, tensors: &[Tensor], out: &mut [f32]) {
    assert_eq!(out.len(), layout.total(), "flat length");
    for (spec, t) in layout.params().iter().zip(tensors) {
        t.copy_data(&mut out[spec.range()], spec.len);
    }
}

/// Copies the flat range `range` of `flat` (trained parameters in layout
/// order) into the parameters' tensors (`tensors` in layout order; handles
/// from [`Model::param_handles`] will do); a range may cover parts of
/// parameters.
pub fn copy_range_into_params(
    layout: &ParamLayout,
    tensors: &mut [Tensor],
    flat: &[f32],
    range: std::ops::Range<usize>,
) {
    tch::no_grad(|| {
        for (spec, t) in layout.params().iter().zip(tensors.iter_mut()) {
            let r = spec.range();
            let (start, end) = (r.start.max(range.start), r.end.min(range.end));
            if start >= end {
                continue;
            }
            let whole = |t: &mut Tensor| {
                let part = &flat[r.clone()];
                match borrowed_f32(part, &spec.shape) {
                    Ok(src) if t.device() == Device::Cpu => t.copy_(&src),
                    _ => t.copy_(
                        &Tensor::from_slice(part)
                            .view(spec.shape.as_slice())
                            .to_device(t.device()),
                    ),
                }
            };
            if start == r.start && end == r.end {
                whole(t);
                continue;
            }
            let part = &flat[start..end];
            let len = (end - start) as i64;
            match (t.f_view([-1]), borrowed_f32(part, &[len])) {
                (Ok(v), Ok(src)) if t.device() == Device::Cpu => {
                    v.narrow(0, (start - r.start) as i64, len).copy_(&src)
                }
                // Not a plain CPU tensor: the whole parameter, as far as it
                // is updated (the rest follows with its last piece).
                _ => whole(t),
            }
        }
    });
}

fn from_flat(layout: &ParamLayout, tensors: &mut [Tensor], flat: &[f32], device: Device) {
    assert_eq!(flat.len(), layout.total(), "flat length");
    if device == Device::Cpu {
        // One copy per parameter straight from `flat`: no staging tensor
        // (a fresh allocation of the whole model every step, page faults
        // included, then a second copy).
        tch::no_grad(|| {
            for (spec, t) in layout.params().iter().zip(tensors.iter_mut()) {
                let part = &flat[spec.range()];
                match borrowed_f32(part, &spec.shape) {
                    Ok(src) => t.copy_(&src),
                    Err(_) => t.copy_(&Tensor::from_slice(part).view(spec.shape.as_slice())),
                }
            }
        });
        return;
    }
    let src = Tensor::from_slice(flat).to_device(device);
    tch::no_grad(|| {
        for (spec, t) in layout.params().iter().zip(tensors.iter_mut()) {
            let part = src.narrow(0, spec.offset as i64, spec.len as i64);
            t.copy_(&part.view(spec.shape.as_slice()));
        }
    });
}

/// A CPU tensor of `shape` over `values`, without a copy. Only for reading
/// (as the source of a `copy_`) while `values` is borrowed: the tensor must
/// be dropped before `values` is, which every caller does at once.
#[allow(unsafe_code)]
fn borrowed_f32(values: &[f32], shape: &[i64]) -> Result<Tensor, tch::TchError> {
    if shape.iter().product::<i64>() != values.len() as i64 {
        return Err(tch::TchError::Shape(format!(
            "{} values for shape {shape:?}",
            values.len()
        )));
    }
    // SAFETY: `values` is valid, initialised f32 for its whole length, which
    // matches `shape`; the tensor only reads it and does not outlive the
    // borrow (see above).
    unsafe { Tensor::f_from_blob(values.as_ptr().cast(), shape, &[], Kind::Float, Device::Cpu) }
}

/// Copies per-tensor values into the named tensors (in order).
fn assign(named: &mut [(String, Tensor)], values: &[Vec<f32>], device: Device) {
    tch::no_grad(|| {
        for ((_, t), v) in named.iter_mut().zip(values) {
            let src = Tensor::from_slice(v)
                .view(t.size().as_slice())
                .to_device(device);
            t.copy_(&src);
        }
    });
}

fn builtin_net(
    kind: ModelKind,
    root: &nn::Path,
    spec: &JobSpec,
    shape: &DataShape,
) -> Result<Net, ModelError> {
    let classes = || {
        shape.classes.ok_or_else(|| {
            ModelError::Data(format!(
                "model {kind} classifies, but the data set's targets are not classes"
            ))
        })
    };
    Ok(match kind {
        ModelKind::Mlp => {
            let inputs = shape.sample.iter().product::<i64>();
            Net::Builtin(Box::new(builtin::Mlp::new(root, inputs, classes()?)))
        }
        ModelKind::Cnn => {
            let [c, h, w] = shape.sample[..] else {
                return Err(ModelError::Data(format!(
                    "model cnn takes images [channels, height, width], not samples of shape {:?}",
                    shape.sample
                )));
            };
            Net::Builtin(Box::new(builtin::Cnn::new(root, c, h, w, classes()?)))
        }
        ModelKind::Gpt => {
            let m = &spec.model_config;
            let context = if m.context == 0 {
                spec.dataset.context
            } else {
                m.context
            };
            let cfg = GptConfig {
                vocab: 256,
                layers: m.layers as i64,
                heads: m.heads as i64,
                dim: m.dim as i64,
                context: context as i64,
            };
            Net::Gpt(Box::new(Gpt::new(root, &cfg)))
        }
    })
}

#[cfg(test)]
mod tests;
