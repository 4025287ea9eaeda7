//! The two models of the reference script (shared/bench/peers/ddp_train.py),
//! with the same architecture, parameter names and init distributions, and
//! their parameters and gradients exchanged as one flat f32 vector (what the
//! ring all-reduce, the optimizer and checkpoints work on).

use ringtrain_common::data_plan::SplitMix64;
use ringtrain_common::jobspec::ModelKind;
use tch::nn::{self, Module};
use tch::{Device, Kind, Reduction, Tensor};

/// Rows per forward pass in [`Model::evaluate`], as in the reference script.
const EVAL_BATCH: i64 = 1000;

/// One parameter tensor's place in the flat vector.
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

/// The parameters in a fixed order, packed back to back into one flat vector.
#[derive(Clone, Debug, PartialEq, Eq)]
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
                let len = shape.iter().product::<i64>() as usize;
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

struct Cnn {
    c1: nn::Conv2D,
    c2: nn::Conv2D,
    f1: nn::Linear,
    f2: nn::Linear,
}

enum Net {
    Cnn(Box<Cnn>),
    Mlp {
        l1: nn::Linear,
        l2: nn::Linear,
        l3: nn::Linear,
    },
}

/// A model on the CPU with its parameters in [`ParamLayout`] order.
pub struct Model {
    kind: ModelKind,
    // Owns the variables; `params` are shallow clones of them.
    _vs: nn::VarStore,
    net: Net,
    layout: ParamLayout,
    params: Vec<Tensor>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("kind", &self.kind)
            .field("num_params", &self.num_params())
            .finish_non_exhaustive()
    }
}

fn linear(p: nn::Path, i: i64, o: i64) -> nn::Linear {
    let zero = nn::Init::Const(0.0);
    nn::linear(
        p,
        i,
        o,
        nn::LinearConfig {
            ws_init: zero,
            bs_init: Some(zero),
            bias: true,
        },
    )
}

fn conv5x5(p: nn::Path, i: i64, o: i64) -> nn::Conv2D {
    let zero = nn::Init::Const(0.0);
    nn::conv2d(
        p,
        i,
        o,
        5,
        nn::ConvConfig {
            padding: 2,
            ws_init: zero,
            bs_init: zero,
            ..Default::default()
        },
    )
}

/// PyTorch's default init for Linear and Conv2d (kaiming_uniform with a=sqrt(5)
/// for weights, then the same bound for biases): U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
/// fan_in from the layer's weight. (tch's defaults differ: ReLU gain, zero
/// conv bias.) Drawn from our own seeded generator rather than libtorch's
/// global one, which any other thread may draw from meanwhile.
fn torch_default_init(layout: &ParamLayout, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64(seed);
    let mut flat = vec![0.0f32; layout.total()];
    for spec in layout.params() {
        let layer = spec.name.rsplit_once('.').map_or("", |(l, _)| l);
        let fan_in = layout
            .params()
            .iter()
            .find(|w| w.name == format!("{layer}.weight"))
            .map_or(1, |w| w.shape.iter().skip(1).product::<i64>());
        let bound = 1.0 / (fan_in as f32).sqrt();
        for v in &mut flat[spec.range()] {
            *v = rng.symmetric(bound);
        }
    }
    flat
}

impl Model {
    /// Builds `kind` with PyTorch's default init drawn from a generator
    /// seeded with `seed`: every rank building with one seed starts identical,
    /// whatever other threads do with libtorch's global generator.
    pub fn new(kind: ModelKind, seed: i64) -> Model {
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        // Parameter names as in the reference script's state_dict.
        let net = match kind {
            ModelKind::Cnn => Net::Cnn(Box::new(Cnn {
                c1: conv5x5(&root / "c1", 1, 32),
                c2: conv5x5(&root / "c2", 32, 64),
                f1: linear(&root / "f1", 3136, 1024),
                f2: linear(&root / "f2", 1024, 10),
            })),
            ModelKind::Mlp | ModelKind::Gpt => {
                let seq = &root / "net";
                Net::Mlp {
                    l1: linear(&seq / "1", 784, 512),
                    l2: linear(&seq / "3", 512, 512),
                    l3: linear(&seq / "5", 512, 10),
                }
            }
        };
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let layout = ParamLayout::new(named.iter().map(|(n, t)| (n.clone(), t.size())));
        let params = named.into_iter().map(|(_, t)| t).collect();
        let init = torch_default_init(&layout, seed as u64);
        let mut model = Model {
            kind,
            _vs: vs,
            net,
            layout,
            params,
        };
        model.flat_to_params(&init);
        model
    }

    pub fn kind(&self) -> ModelKind {
        self.kind
    }

    /// Logits `[N, 10]` for images `[N, 1, 28, 28]`. Neither model has
    /// dropout or batch norm, so `train` changes nothing today.
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let _ = train;
        match &self.net {
            Net::Cnn(cnn) => x
                .apply(&cnn.c1)
                .relu()
                .max_pool2d_default(2)
                .apply(&cnn.c2)
                .relu()
                .max_pool2d_default(2)
                .flatten(1, -1)
                .apply(&cnn.f1)
                .relu()
                .apply(&cnn.f2),
            Net::Mlp { l1, l2, l3 } => {
                let h = l1.forward(&x.flatten(1, -1)).relu();
                l3.forward(&l2.forward(&h).relu())
            }
        }
    }

    pub fn num_params(&self) -> usize {
        self.layout.total()
    }

    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    /// Copies the parameters into `out` (`layout().total()` elements).
    pub fn params_to_flat(&self, out: &mut [f32]) {
        assert_eq!(out.len(), self.layout.total(), "flat parameter length");
        for (spec, p) in self.layout.params.iter().zip(&self.params) {
            p.copy_data(&mut out[spec.range()], spec.len);
        }
    }

    /// Overwrites the parameters with `flat` (`layout().total()` elements), in
    /// place: the tensors keep their identity and `requires_grad`.
    pub fn flat_to_params(&mut self, flat: &[f32]) {
        assert_eq!(flat.len(), self.layout.total(), "flat parameter length");
        let src = Tensor::from_slice(flat);
        tch::no_grad(|| {
            for (spec, p) in self.layout.params.iter().zip(self.params.iter_mut()) {
                let part = src.narrow(0, spec.offset as i64, spec.len as i64);
                p.copy_(&part.view(spec.shape.as_slice()));
            }
        });
    }

    /// Copies the gradients into `out`, zeros for a parameter without one.
    pub fn grads_to_flat(&self, out: &mut [f32]) {
        assert_eq!(out.len(), self.layout.total(), "flat gradient length");
        for (spec, p) in self.layout.params.iter().zip(&self.params) {
            let g = p.grad();
            if g.defined() {
                g.copy_data(&mut out[spec.range()], spec.len);
            } else {
                out[spec.range()].fill(0.0);
            }
        }
    }

    pub fn zero_grads(&mut self) {
        for p in &mut self.params {
            p.zero_grad();
        }
    }

    /// Replaces the gradients with those of `scale * sum of the batch's
    /// cross-entropy losses`, and returns the batch's mean loss (unscaled).
    ///
    /// With `scale = 1 / global_batch` on every rank, the sum of the ranks'
    /// gradients is the gradient of the mean loss over the global batch.
    /// An empty batch (a rank whose slice of a short last step is empty)
    /// leaves zero gradients and returns 0.0, so it adds nothing to the sum.
    pub fn loss_and_backward(&mut self, images: &Tensor, labels: &Tensor, scale: f64) -> f64 {
        self.zero_grads();
        let n = labels.size().first().copied().unwrap_or(0);
        if n == 0 {
            return 0.0;
        }
        let logits = self.forward(images, true);
        let sum = logits.cross_entropy_loss::<Tensor>(labels, None, Reduction::Sum, -100, 0.0);
        (&sum * scale).backward();
        sum.double_value(&[]) / n as f64
    }

    /// Correct predictions and the summed cross-entropy loss over the set,
    /// without gradients, [`EVAL_BATCH`] rows at a time.
    pub fn evaluate(&self, images: &Tensor, labels: &Tensor) -> (f64, f64) {
        let n = labels.size().first().copied().unwrap_or(0);
        tch::no_grad(|| {
            let (mut correct, mut loss) = (0i64, 0.0f64);
            for start in (0..n).step_by(EVAL_BATCH as usize) {
                let len = EVAL_BATCH.min(n - start);
                let x = images.narrow(0, start, len);
                let y = labels.narrow(0, start, len);
                let logits = self.forward(&x, false);
                correct += logits
                    .argmax(1, false)
                    .eq_tensor(&y)
                    .sum(Kind::Int64)
                    .int64_value(&[]);
                loss += logits
                    .cross_entropy_loss::<Tensor>(&y, None, Reduction::Sum, -100, 0.0)
                    .double_value(&[]);
            }
            (correct as f64, loss)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn parameter_counts_and_names_match_the_reference() {
        let cnn = Model::new(ModelKind::Cnn, 0);
        assert_eq!(cnn.num_params(), 3_274_634);
        let names: Vec<_> = cnn
            .layout()
            .params()
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(
            names,
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

        let mlp = Model::new(ModelKind::Mlp, 0);
        assert_eq!(mlp.num_params(), 669_706);
        let names: Vec<_> = mlp
            .layout()
            .params()
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(
            names,
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
    fn init_follows_pytorch_defaults() {
        let m = Model::new(ModelKind::Cnn, 3);
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
        for kind in [ModelKind::Mlp, ModelKind::Cnn] {
            let a = flat_params(&Model::new(kind, 42));
            // libtorch's global generator plays no part.
            tch::manual_seed(1);
            let _ = Tensor::randn([100], (Kind::Float, Device::Cpu));
            let b = flat_params(&Model::new(kind, 42));
            let c = flat_params(&Model::new(kind, 43));
            assert!(a == b, "{kind}");
            assert!(a != c, "{kind}");
        }
    }

    #[test]
    fn flat_round_trip() {
        let a = Model::new(ModelKind::Cnn, 1);
        let mut b = Model::new(ModelKind::Cnn, 2);
        let flat = flat_params(&a);
        b.flat_to_params(&flat);
        assert!(flat_params(&b) == flat);
        assert!(b.params.iter().all(|p| p.requires_grad()));
        let (x, _) = random_batch(3, 5);
        let (ya, yb) = (a.forward(&x, false), b.forward(&x, false));
        assert!(ya.equal(&yb));
    }

    #[test]
    fn gradients_are_finite_and_nonzero() {
        for kind in [ModelKind::Mlp, ModelKind::Cnn] {
            let mut m = Model::new(kind, 0);
            let (x, y) = random_batch(8, 1);
            let loss = m.loss_and_backward(&x, &y, 1.0 / 8.0);
            // Small logits at init: close to ln(10).
            assert!((1.5..3.5).contains(&loss), "{kind}: loss {loss}");
            let g = flat_grads(&m);
            assert!(g.iter().all(|v| v.is_finite()), "{kind}");
            assert!(g.iter().any(|&v| v != 0.0), "{kind}");
            // Every parameter tensor gets a gradient.
            for spec in m.layout().params() {
                assert!(g[spec.range()].iter().any(|&v| v != 0.0), "{}", spec.name);
            }
        }
    }

    /// What distributed training relies on: the sum over ranks of
    /// `scale = 1/global_batch` gradients equals the global batch's gradient.
    #[test]
    fn gradients_of_halves_sum_to_the_whole() {
        for kind in [ModelKind::Mlp, ModelKind::Cnn] {
            let mut m = Model::new(kind, 7);
            let (x, y) = random_batch(8, 9);
            let whole_loss = m.loss_and_backward(&x, &y, 1.0 / 8.0);
            let whole = flat_grads(&m);
            let l1 = m.loss_and_backward(&x.narrow(0, 0, 4), &y.narrow(0, 0, 4), 1.0 / 8.0);
            let g1 = flat_grads(&m);
            let l2 = m.loss_and_backward(&x.narrow(0, 4, 4), &y.narrow(0, 4, 4), 1.0 / 8.0);
            let g2 = flat_grads(&m);
            assert!((whole_loss - (l1 + l2) / 2.0).abs() < 1e-5 * whole_loss);
            let max = whole.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (i, (w, (a, b))) in whole.iter().zip(g1.iter().zip(&g2)).enumerate() {
                let d = (w - (a + b)).abs();
                assert!(d <= 1e-5 * max, "{kind}[{i}]: {w} vs {a} + {b}");
            }
        }
    }

    #[test]
    fn empty_batch_gives_zero_gradients_and_zero_loss() {
        let mut m = Model::new(ModelKind::Cnn, 0);
        let (x, y) = random_batch(4, 2);
        m.loss_and_backward(&x, &y, 0.25);
        assert!(flat_grads(&m).iter().any(|&v| v != 0.0));
        let loss = m.loss_and_backward(&x.narrow(0, 0, 0), &y.narrow(0, 0, 0), 0.25);
        assert_eq!(loss, 0.0);
        assert!(flat_grads(&m).iter().all(|&v| v == 0.0));
        // A fresh model with no gradient yet.
        let mut fresh = Model::new(ModelKind::Mlp, 0);
        assert_eq!(
            fresh.loss_and_backward(&x.narrow(0, 0, 0), &y.narrow(0, 0, 0), 1.0),
            0.0
        );
        assert!(flat_grads(&fresh).iter().all(|&v| v == 0.0));
        assert_eq!(
            fresh.evaluate(&x.narrow(0, 0, 0), &y.narrow(0, 0, 0)),
            (0.0, 0.0)
        );
    }

    #[test]
    fn gradients_replace_rather_than_accumulate() {
        let mut m = Model::new(ModelKind::Mlp, 0);
        let (x, y) = random_batch(4, 3);
        m.loss_and_backward(&x, &y, 1.0);
        let once = flat_grads(&m);
        m.loss_and_backward(&x, &y, 1.0);
        assert!(flat_grads(&m) == once);
        m.zero_grads();
        assert!(flat_grads(&m).iter().all(|&v| v == 0.0));
    }

    #[test]
    fn evaluate_matches_the_training_loss_across_chunks() {
        let mut m = Model::new(ModelKind::Mlp, 4);
        let (x, y) = random_batch(2500, 6);
        let (correct, loss_sum) = m.evaluate(&x, &y);
        assert!((0.0..=2500.0).contains(&correct));
        assert_eq!(correct.fract(), 0.0);
        let logits = m.forward(&x, false);
        let want = logits
            .argmax(1, false)
            .eq_tensor(&y)
            .sum(Kind::Int64)
            .int64_value(&[]);
        assert_eq!(correct, want as f64);
        let mean = m.loss_and_backward(&x, &y, 1.0);
        assert!(
            (loss_sum / 2500.0 - mean).abs() < 1e-5 * mean,
            "{loss_sum} {mean}"
        );
    }

    #[test]
    fn model_can_move_to_a_trainer_thread() {
        fn send<T: Send>() {}
        send::<Model>();
    }
}
