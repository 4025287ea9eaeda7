use std::collections::HashMap;
use std::path::Path;

use ringtrain_common::jobspec::JobSpec;
use ringtrain_common::testing::MINIMAL_SPEC;
use tch::{Device, Kind, Tensor};

use super::*;

fn spec(sets: &[&str]) -> JobSpec {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    JobSpec::parse(MINIMAL_SPEC, &sets).unwrap()
}

const FMNIST: DataShape = DataShape {
    sample: Vec::new(),
    classes: Some(10),
};

fn fmnist() -> DataShape {
    DataShape {
        sample: vec![1, 28, 28],
        ..FMNIST
    }
}

fn builtin(kind: &str, seed: u64) -> Model {
    let s = spec(&[&format!("model={kind}"), &format!("seed={seed}")]);
    Model::build(&s, &fmnist(), None, None, Device::Cpu).unwrap()
}

fn flat_params(m: &Model) -> Vec<f32> {
    let mut v = vec![0.0; m.num_params()];
    m.params_to_flat(&mut v);
    v
}

fn flat_grads(m: &Model) -> Vec<f32> {
    let mut v = vec![0.0; m.num_params()];
    m.grads_to_flat(&mut v);
    v
}

fn random_batch(n: i64, seed: i64) -> (Tensor, Tensor) {
    tch::manual_seed(seed);
    (
        Tensor::rand([n, 1, 28, 28], (Kind::Float, Device::Cpu)),
        Tensor::randint(10, [n], (Kind::Int64, Device::Cpu)),
    )
}

/// Fresh gradients of `sum of losses / global` for one batch.
fn loss_and_backward(m: &mut Model, x: &Tensor, y: &Tensor, global: u64) -> f64 {
    m.zero_grads();
    m.accumulate_gradients(x, y, global).unwrap()
}

fn names(layout: &ParamLayout) -> Vec<&str> {
    layout.params().iter().map(|p| p.name.as_str()).collect()
}

#[test]
fn parameter_counts_and_names_match_the_reference() {
    let cnn = builtin("cnn", 0);
    assert_eq!(cnn.num_params(), 3_274_634);
    assert_eq!(
        names(cnn.layout()),
        [
            "c1.bias",
            "c1.weight",
            "c2.bias",
            "c2.weight",
            "f1.bias",
            "f1.weight",
            "f2.bias",
            "f2.weight"
        ]
    );
    let shapes: Vec<_> = cnn
        .layout()
        .params()
        .iter()
        .map(|p| p.shape.clone())
        .collect();
    assert_eq!(
        shapes,
        [
            vec![32],
            vec![32, 1, 5, 5],
            vec![64],
            vec![64, 32, 5, 5],
            vec![1024],
            vec![1024, 3136],
            vec![10],
            vec![10, 1024]
        ]
    );
    let mlp = builtin("mlp", 0);
    assert_eq!(mlp.num_params(), 669_706);
    assert_eq!(
        names(mlp.layout()),
        [
            "net.1.bias",
            "net.1.weight",
            "net.3.bias",
            "net.3.weight",
            "net.5.bias",
            "net.5.weight"
        ]
    );
    // Offsets pack the tensors back to back.
    let mut next = 0;
    for p in mlp.layout().params() {
        assert_eq!(p.offset, next);
        next += p.len;
    }
    assert_eq!(next, mlp.layout().total());
}

#[test]
fn built_in_models_fit_the_data_they_are_given() {
    let s = spec(&["model=cnn"]);
    let cifar = DataShape {
        sample: vec![3, 32, 32],
        classes: Some(10),
    };
    let cnn = Model::build(&s, &cifar, None, None, Device::Cpu).unwrap();
    let f1 = cnn
        .layout()
        .params()
        .iter()
        .find(|p| p.name == "f1.weight")
        .unwrap();
    assert_eq!(f1.shape, [1024, 64 * 8 * 8]);
    let c1 = cnn
        .layout()
        .params()
        .iter()
        .find(|p| p.name == "c1.weight")
        .unwrap();
    assert_eq!(c1.shape, [32, 3, 5, 5]);
    let tokens = DataShape {
        sample: vec![16],
        classes: None,
    };
    let err = Model::build(&s, &tokens, None, None, Device::Cpu).unwrap_err();
    assert!(
        err.to_string().contains("images [channels, height, width]"),
        "{err}"
    );
}

#[test]
fn init_follows_pytorch_defaults() {
    let m = builtin("cnn", 3);
    let flat = flat_params(&m);
    for (name, fan_in) in [
        ("c1.bias", 25),
        ("c1.weight", 25),
        ("c2.weight", 800),
        ("f1.weight", 3136),
        ("f2.bias", 1024),
    ] {
        let spec = m.layout().params().iter().find(|p| p.name == name).unwrap();
        let bound = 1.0 / (fan_in as f32).sqrt();
        let vals = &flat[spec.range()];
        let max = vals.iter().fold(0f32, |a, v| a.max(v.abs()));
        assert!(max <= bound, "{name}: {max} > {bound}");
        // Uniform over the whole range, biases included (tch would zero conv biases).
        assert!(max > 0.8 * bound, "{name}: {max} vs {bound}");
    }
}

#[test]
fn same_seed_same_parameters() {
    for kind in ["mlp", "cnn"] {
        let a = flat_params(&builtin(kind, 42));
        // libtorch's global generator plays no part.
        tch::manual_seed(1);
        let _ = Tensor::randn([100], (Kind::Float, Device::Cpu));
        let b = flat_params(&builtin(kind, 42));
        let c = flat_params(&builtin(kind, 43));
        assert!(a == b, "{kind}");
        assert!(a != c, "{kind}");
    }
}

#[test]
fn flat_round_trip() {
    let a = builtin("cnn", 1);
    let mut b = builtin("cnn", 2);
    let flat = flat_params(&a);
    b.flat_to_params(&flat);
    assert!(flat_params(&b) == flat);
    assert!(b.params.iter().all(|p| p.requires_grad()));
    let (x, y) = random_batch(3, 5);
    let (ea, eb) = (
        a.output(&x, &y, false).unwrap(),
        b.output(&x, &y, false).unwrap(),
    );
    assert!(ea.equal(&eb));
}

/// What the fused step writes through `params_memory` is what the model
/// holds and computes with, parameter by parameter, for the built-ins.
#[test]
fn writing_parameter_memory_is_writing_the_parameters() {
    for kind in ["mlp", "cnn"] {
        let mut m = builtin(kind, 1);
        let target = flat_params(&builtin(kind, 2));
        let spans = m.params_memory().expect("plain CPU parameters");
        let mut covered = 0;
        for (range, values) in spans {
            covered += range.len();
            values.copy_from_slice(&target[range]);
        }
        assert_eq!(covered, target.len(), "{kind}");
        assert!(flat_params(&m) == target, "{kind}");
        let (x, y) = random_batch(3, 5);
        let other = builtin(kind, 2);
        let (a, b) = (
            m.output(&x, &y, false).unwrap(),
            other.output(&x, &y, false).unwrap(),
        );
        assert!(a.equal(&b), "{kind}");
    }
}

#[test]
fn gradients_are_finite_and_nonzero() {
    for kind in ["mlp", "cnn"] {
        let mut m = builtin(kind, 0);
        let (x, y) = random_batch(8, 1);
        let loss = loss_and_backward(&mut m, &x, &y, 8);
        // Small logits at init: close to ln(10).
        assert!((1.5..3.5).contains(&loss), "{kind}: loss {loss}");
        let g = flat_grads(&m);
        assert!(g.iter().all(|v| v.is_finite()), "{kind}");
        for spec in m.layout().params() {
            assert!(g[spec.range()].iter().any(|&v| v != 0.0), "{}", spec.name);
        }
    }
}

/// What distributed training relies on: the sum over ranks of gradients of
/// `sum / global_batch` equals the global batch's gradient, and micro-batches
/// accumulate to the same.
#[test]
fn gradients_of_halves_sum_to_the_whole() {
    for kind in ["mlp", "cnn"] {
        let mut m = builtin(kind, 7);
        let (x, y) = random_batch(8, 9);
        let whole_loss = loss_and_backward(&mut m, &x, &y, 8);
        let whole = flat_grads(&m);
        let l1 = loss_and_backward(&mut m, &x.narrow(0, 0, 4), &y.narrow(0, 0, 4), 8);
        let g1 = flat_grads(&m);
        let l2 = loss_and_backward(&mut m, &x.narrow(0, 4, 4), &y.narrow(0, 4, 4), 8);
        let g2 = flat_grads(&m);
        // Accumulated in place: two micro-batches, one step.
        m.zero_grads();
        m.accumulate_gradients(&x.narrow(0, 0, 4), &y.narrow(0, 0, 4), 8)
            .unwrap();
        m.accumulate_gradients(&x.narrow(0, 4, 4), &y.narrow(0, 4, 4), 8)
            .unwrap();
        let acc = flat_grads(&m);
        assert!((whole_loss - (l1 + l2) / 2.0).abs() < 1e-5 * whole_loss);
        let max = whole.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (i, (w, (a, b))) in whole.iter().zip(g1.iter().zip(&g2)).enumerate() {
            let d = (w - (a + b)).abs();
            assert!(d <= 1e-5 * max, "{kind}[{i}]: {w} vs {a} + {b}");
            assert!((w - acc[i]).abs() <= 1e-5 * max, "{kind}[{i}] accumulated");
        }
    }
}

/// Gathers what the gradient hooks hand over.
#[derive(Default)]
struct Hooked {
    order: Vec<usize>,
    grads: HashMap<usize, Vec<f32>>,
}

impl grad_hooks::GradSink for Hooked {
    fn gradient(&mut self, index: usize, grad: &[f32]) {
        self.order.push(index);
        let g = self
            .grads
            .entry(index)
            .or_insert_with(|| vec![0.0; grad.len()]);
        for (a, b) in g.iter_mut().zip(grad) {
            *a += b;
        }
    }
}

/// What the overlapped step relies on: one hook call per parameter and
/// pass, carrying exactly what lands in `.grad`, the last layer first.
#[test]
fn gradient_hooks_hand_over_each_parameters_gradient_as_backward_makes_it() {
    for kind in ["mlp", "cnn"] {
        let mut m = builtin(kind, 3);
        let (x, y) = random_batch(8, 4);
        let mut hooked = Hooked::default();
        m.zero_grads();
        m.accumulate_gradients_into(&x.narrow(0, 0, 4), &y.narrow(0, 0, 4), 8, &mut hooked, None)
            .unwrap();
        m.accumulate_gradients_into(&x.narrow(0, 4, 4), &y.narrow(0, 4, 4), 8, &mut hooked, None)
            .unwrap();
        let n = m.layout().params().len();
        assert_eq!(hooked.order.len(), 2 * n, "{kind}: {:?}", hooked.order);
        // The output layer's gradient comes first, the first layer's last.
        assert!(hooked.order[0] >= n - 2, "{kind}: {:?}", hooked.order);
        assert!(hooked.order[n - 1] <= 1, "{kind}: {:?}", hooked.order);
        let accumulated = flat_grads(&m);
        for (i, spec) in m.layout().params().iter().enumerate() {
            let want = &accumulated[spec.range()];
            let got = &hooked.grads[&i];
            let max = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (w, g) in want.iter().zip(got) {
                assert!(
                    (w - g).abs() <= 1e-6 * max.max(1e-12),
                    "{kind} {}: {w} vs {g}",
                    spec.name
                );
            }
        }
        // Without hooks, nothing is called: they were removed.
        m.zero_grads();
        m.accumulate_gradients(&x, &y, 8).unwrap();
        assert_eq!(hooked.order.len(), 2 * n);
    }
}

#[test]
fn an_empty_batch_adds_nothing() {
    let mut m = builtin("cnn", 0);
    let (x, y) = random_batch(4, 2);
    loss_and_backward(&mut m, &x, &y, 4);
    assert!(flat_grads(&m).iter().any(|&v| v != 0.0));
    let loss = loss_and_backward(&mut m, &x.narrow(0, 0, 0), &y.narrow(0, 0, 0), 4);
    assert_eq!(loss, 0.0);
    assert!(flat_grads(&m).iter().all(|&v| v == 0.0));
    let sums = m.evaluate(&x.narrow(0, 0, 0), &y.narrow(0, 0, 0)).unwrap();
    assert_eq!(sums.count, 0.0);
}

#[test]
fn evaluate_matches_the_training_loss_across_chunks() {
    let mut m = builtin("mlp", 4);
    let (x, y) = random_batch(2500, 6);
    let sums = m.evaluate(&x, &y).unwrap();
    let correct = sums.correct.unwrap();
    assert_eq!(sums.count, 2500.0);
    assert_eq!(correct.fract(), 0.0);
    let want = m
        .output(&x, &y, false)
        .unwrap()
        .argmax(1, false)
        .eq_tensor(&y)
        .sum(Kind::Int64)
        .int64_value(&[]);
    assert_eq!(correct, want as f64);
    let mean = loss_and_backward(&mut m, &x, &y, 2500);
    assert!((sums.loss_sum / 2500.0 - mean).abs() < 1e-5 * mean);
}

#[test]
fn freeze_keeps_parameters_out_of_training_and_reinit_refreshes_them() {
    let s = spec(&["model=cnn", "freeze=[\"c1\", \"c2\"]", "reinit=[\"f2\"]"]);
    let base = builtin("cnn", 0);
    let mut m = Model::build(&s, &fmnist(), None, None, Device::Cpu).unwrap();
    assert_eq!(
        names(m.layout()),
        ["f1.bias", "f1.weight", "f2.bias", "f2.weight"]
    );
    let (x, y) = random_batch(4, 3);
    loss_and_backward(&mut m, &x, &y, 4);
    assert!(m
        .frozen
        .iter()
        .all(|(_, t)| !t.requires_grad() && !t.grad().defined()));
    let dict: HashMap<String, Tensor> = m.state_dict().into_iter().collect();
    let base_dict: HashMap<String, Tensor> = base.state_dict().into_iter().collect();
    assert_eq!(dict.len(), 8, "frozen parameters stay in the state");
    assert!(dict["c1.weight"].equal(&base_dict["c1.weight"]));
    assert!(
        !dict["f2.weight"].equal(&base_dict["f2.weight"]),
        "f2 re-initialised"
    );
    let err = Model::build(
        &spec(&["model=cnn", "freeze=[\"features.0\"]"]),
        &fmnist(),
        None,
        None,
        Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("freeze prefix 'features.0' matches no parameter (parameters: c1.bias"),
        "{err}"
    );
    assert!(under("features.0.weight", "features.0"));
    assert!(!under("features.01.weight", "features.0"));
}

#[test]
fn init_from_loads_by_name_and_shape() {
    let donor = builtin("cnn", 5);
    let weights: HashMap<String, Tensor> = donor.state_dict().into_iter().collect();
    let s = spec(&["model=cnn", "seed=9"]);
    let m = Model::build(
        &s,
        &fmnist(),
        None,
        Some(("w.safetensors", &weights)),
        Device::Cpu,
    )
    .unwrap();
    assert!(flat_params(&m) == flat_params(&donor));

    // A head of another shape: named, with both shapes.
    let mut other = weights
        .iter()
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect::<HashMap<_, _>>();
    other.insert(
        "f2.weight".into(),
        Tensor::zeros([5, 1024], (Kind::Float, Device::Cpu)),
    );
    let err = Model::build(
        &s,
        &fmnist(),
        None,
        Some(("w.safetensors", &other)),
        Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        "w.safetensors: tensor f2.weight is [5, 1024] there, [10, 1024] in the model"
    );
    // ... unless that head is re-initialised.
    let fresh_head = spec(&["model=cnn", "reinit=[\"f2\"]"]);
    Model::build(
        &fresh_head,
        &fmnist(),
        None,
        Some(("w.safetensors", &other)),
        Device::Cpu,
    )
    .unwrap();

    // Missing and extra tensors: errors unless strict = false.
    other.remove("f2.weight");
    other.insert(
        "extra.weight".into(),
        Tensor::zeros([1], (Kind::Float, Device::Cpu)),
    );
    let err = Model::build(
        &s,
        &fmnist(),
        None,
        Some(("w.safetensors", &other)),
        Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        "w.safetensors: has tensor extra.weight, which the model lacks (strict = false skips it)"
    );
    other.remove("extra.weight");
    let err = Model::build(
        &s,
        &fmnist(),
        None,
        Some(("w.safetensors", &other)),
        Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        "w.safetensors: lacks tensor f2.weight (strict = false skips it)"
    );
    let lenient = spec(&["model=cnn", "strict=false"]);
    Model::build(
        &lenient,
        &fmnist(),
        None,
        Some(("w.safetensors", &other)),
        Device::Cpu,
    )
    .unwrap();
}

#[test]
fn an_unknown_device_is_refused_clearly() {
    use ringtrain_common::jobspec::DeviceSpec;
    assert_eq!(device(&DeviceSpec::Cpu).unwrap(), Device::Cpu);
    if tch::Cuda::device_count() == 0 {
        let err = device(&DeviceSpec::Cuda(0)).unwrap_err().to_string();
        assert_eq!(err, "device cuda:0: this worker has no CUDA GPU");
    }
}

/// Exports a TorchScript module with the project's Python (None, after
/// saying so, where it cannot).
fn export(dir: &Path, body: &str) -> Option<Vec<u8>> {
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python");
    let out = dir.join("net.pt");
    // A file, not -c: torch.jit.script reads the classes' source.
    let source = dir.join("export.py");
    std::fs::write(
        &source,
        format!(
            "import sys, torch\nfrom torch import nn\ntorch.manual_seed(0)\n{body}\ntorch.jit.save(torch.jit.script(net), sys.argv[1])\n"
        ),
    )
    .unwrap();
    let run = std::process::Command::new(python)
        .arg(&source)
        .arg(&out)
        .output();
    match run {
        Ok(o) if o.status.success() => Some(std::fs::read(&out).unwrap()),
        Ok(o) => panic!("export failed: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => {
            ringtrain_common::testing::skip(&format!("{python}: {e} (scripts/env.sh makes it)"));
            None
        }
    }
}

const BN_NET: &str = "
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4 * 28 * 28, 10)
    def forward(self, x):
        return self.head(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))
net = Net()
";

fn script_model(bytes: &[u8], sets: &[&str]) -> Result<Model, ModelError> {
    let mut all = vec!["model=net.pt"];
    all.extend(sets);
    Model::build(&spec(&all), &fmnist(), Some(bytes), None, Device::Cpu)
}

#[test]
fn a_torchscript_model_trains_with_its_own_names_and_buffers() {
    let dir = tempfile::tempdir().unwrap();
    let Some(bytes) = export(dir.path(), BN_NET) else {
        return;
    };
    let mut m = script_model(&bytes, &[]).unwrap();
    assert_eq!(
        names(m.layout()),
        [
            "conv.weight",
            "conv.bias",
            "bn.weight",
            "bn.bias",
            "head.weight",
            "head.bias"
        ]
    );
    let buffers: Vec<&str> = m.buffers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        buffers,
        [
            "bn.running_mean",
            "bn.running_var",
            "bn.num_batches_tracked"
        ]
    );
    assert_eq!(
        names(m.buffer_layout()),
        ["bn.running_mean", "bn.running_var"]
    );
    let (x, y) = random_batch(8, 4);
    let before = m.state_hash();
    let mut stats = vec![0f32; m.buffer_layout().total()];
    m.buffers_to_flat(&mut stats);
    assert_eq!(&stats[4..], [1.0; 4], "running_var starts at 1");
    let loss = loss_and_backward(&mut m, &x, &y, 8);
    assert!((1.0..5.0).contains(&loss), "{loss}");
    assert!(flat_grads(&m).iter().any(|&g| g != 0.0));
    assert_ne!(
        m.state_hash(),
        before,
        "training updated the running statistics"
    );
    // Buffers round-trip through the flat vector (what the ring averages).
    let mut after = vec![0f32; stats.len()];
    m.buffers_to_flat(&mut after);
    assert_ne!(after, stats);
    m.flat_to_buffers(&stats);
    let mut back = vec![0f32; stats.len()];
    m.buffers_to_flat(&mut back);
    assert_eq!(back, stats);
    // Dropout: random in training, none in evaluation.
    m.set_training(true).unwrap();
    let t1 = m.output(&x, &y, true).unwrap();
    let t2 = m.output(&x, &y, true).unwrap();
    assert!(!t1.equal(&t2), "dropout in train mode");
    let e1 = m.evaluate(&x, &y).unwrap();
    let e2 = m.evaluate(&x, &y).unwrap();
    assert_eq!(e1, e2, "evaluation runs in eval mode");
    // The state under the model's own names, int counter included.
    let dict: HashMap<String, Tensor> = m.state_dict().into_iter().collect();
    assert_eq!(dict["bn.num_batches_tracked"].kind(), Kind::Int64);
    // One training step and the two forwards of the dropout check.
    assert_eq!(dict["bn.num_batches_tracked"].int64_value(&[]), 3);
}

#[test]
fn bad_torchscript_models_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = script_model(b"not a zip file", &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("net.pt is not a TorchScript module (save it with torch.jit.script"),
        "{err}"
    );
    let Some(bytes) = export(
        dir.path(),
        "net = nn.Sequential(nn.Flatten(), nn.Linear(784, 3))",
    ) else {
        return;
    };
    // Three outputs, but targets up to 9.
    let mut m = script_model(&bytes, &[]).unwrap();
    let (x, y) = random_batch(8, 1);
    let err = m.check(&x, &y).unwrap_err().to_string();
    assert!(
        err.starts_with("the model returned [8, 3] (3 classes) but a target is"),
        "{err}"
    );
    // Inputs of the wrong shape: the forward's own error, with the inputs' shape.
    let wrong = Tensor::rand([8, 3, 5], (Kind::Float, Device::Cpu));
    let err = m.check(&wrong, &y).unwrap_err().to_string();
    assert!(
        err.starts_with("the model's forward failed on a batch of inputs [8, 3, 5]: "),
        "{err}"
    );
    assert!(!err.contains('\n'), "one line: {err}");
    let Some(seq) = export(
        dir.path(),
        "net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.Unflatten(1, (2, 5)))",
    ) else {
        return;
    };
    let mut m = script_model(&seq, &[]).unwrap();
    let err = m.check(&x, &y).unwrap_err().to_string();
    assert!(
        err.starts_with("the model returned [8, 2, 5] for inputs [8, 1, 28, 28]; cross_entropy needs logits [8, C]"),
        "{err}"
    );
}

#[test]
fn a_model_may_compute_its_own_loss() {
    let dir = tempfile::tempdir().unwrap();
    let body = "
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(784, 10)
    def forward(self, x, y):
        return nn.functional.cross_entropy(self.lin(x.flatten(1)), y)
net = Net()
";
    let Some(bytes) = export(dir.path(), body) else {
        return;
    };
    let mut m = script_model(&bytes, &["loss=model"]).unwrap();
    let (x, y) = random_batch(6, 2);
    let loss = loss_and_backward(&mut m, &x, &y, 6);
    assert!((1.5..3.5).contains(&loss), "{loss}");
    let sums = m.evaluate(&x, &y).unwrap();
    assert_eq!(sums.correct, None, "no accuracy for a model's own loss");
    assert_eq!(sums.count, 6.0);
    assert!((sums.loss_sum / 6.0 - loss).abs() < 1e-5);
}
