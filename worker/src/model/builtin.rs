//! The built-in networks: the `mlp` and `cnn` of the reference script
//! (shared/bench/peers/ddp_train.py), with its parameter names and PyTorch's
//! default init, sized for the data set's samples and classes.

use ringtrain_common::data_plan::SplitMix64;
use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

/// 784-512-512-C with ReLUs, parameters named `net.1`, `net.3`, `net.5` as in
/// the reference's `nn.Sequential(Flatten, Linear, ReLU, Linear, ReLU, Linear)`.
#[derive(Debug)]
pub struct Mlp {
    l1: nn::Linear,
    l2: nn::Linear,
    l3: nn::Linear,
}

/// conv5x5(C→32)-relu-pool-conv5x5(32→64)-relu-pool-fc(→1024)-relu-fc(→classes),
/// parameters `c1`, `c2`, `f1`, `f2`.
#[derive(Debug)]
pub struct Cnn {
    c1: nn::Conv2D,
    c2: nn::Conv2D,
    f1: nn::Linear,
    f2: nn::Linear,
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

impl Mlp {
    /// For samples of `inputs` values (flattened) and `classes` classes.
    pub fn new(root: &nn::Path, inputs: i64, classes: i64) -> Self {
        let seq = root / "net";
        Self {
            l1: linear(&seq / "1", inputs, 512),
            l2: linear(&seq / "3", 512, 512),
            l3: linear(&seq / "5", 512, classes),
        }
    }
}

/// A built-in network whose forward pass can wait for each layer's
/// parameters: `gate(layer)` is called before the layer's parameters (those
/// named `layer.*`) are first used, and a false answer stops the pass.
pub trait GatedModule: ModuleT + Send {
    fn forward_gated(&self, x: &Tensor, gate: &mut dyn FnMut(&str) -> bool) -> Option<Tensor>;
}

/// `gate(layer)`, then `f()`; None if the gate said stop.
fn after(gate: &mut dyn FnMut(&str) -> bool, layer: &str) -> Option<()> {
    gate(layer).then_some(())
}

impl ModuleT for Mlp {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Tensor {
        let h = self.l1.forward(&x.flatten(1, -1)).relu();
        self.l3.forward(&self.l2.forward(&h).relu())
    }
}

impl GatedModule for Mlp {
    fn forward_gated(&self, x: &Tensor, gate: &mut dyn FnMut(&str) -> bool) -> Option<Tensor> {
        after(gate, "net.1")?;
        let h = self.l1.forward(&x.flatten(1, -1)).relu();
        after(gate, "net.3")?;
        let h = self.l2.forward(&h).relu();
        after(gate, "net.5")?;
        Some(self.l3.forward(&h))
    }
}

impl Cnn {
    /// For images of `channels` × `height` × `width` and `classes` classes.
    pub fn new(root: &nn::Path, channels: i64, height: i64, width: i64, classes: i64) -> Self {
        // Two 2×2 poolings, each rounding down.
        let flat = 64 * (height / 4) * (width / 4);
        Self {
            c1: conv5x5(root / "c1", channels, 32),
            c2: conv5x5(root / "c2", 32, 64),
            f1: linear(root / "f1", flat, 1024),
            f2: linear(root / "f2", 1024, classes),
        }
    }
}

impl ModuleT for Cnn {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Tensor {
        x.apply(&self.c1)
            .relu()
            .max_pool2d_default(2)
            .apply(&self.c2)
            .relu()
            .max_pool2d_default(2)
            .flatten(1, -1)
            .apply(&self.f1)
            .relu()
            .apply(&self.f2)
    }
}

impl GatedModule for Cnn {
    fn forward_gated(&self, x: &Tensor, gate: &mut dyn FnMut(&str) -> bool) -> Option<Tensor> {
        after(gate, "c1")?;
        let h = x.apply(&self.c1).relu().max_pool2d_default(2);
        after(gate, "c2")?;
        let h = h
            .apply(&self.c2)
            .relu()
            .max_pool2d_default(2)
            .flatten(1, -1);
        after(gate, "f1")?;
        let h = h.apply(&self.f1).relu();
        after(gate, "f2")?;
        Some(h.apply(&self.f2))
    }
}

/// PyTorch's default init for the named tensors `params` (name, shape), in
/// order, drawn from a generator seeded with `seed` rather than libtorch's
/// global one (which any thread may draw from meanwhile):
/// - Linear and Conv weights (2+ dims) and their biases: U(-b, b) with
///   b = 1/sqrt(fan_in), fan_in from the layer's weight (kaiming_uniform with
///   a = sqrt(5), as nn.Linear and nn.Conv2d do; tch's defaults differ);
/// - 1-dim weights (normalisation layers): 1; their biases: 0.
pub fn default_init(params: &[(String, Vec<i64>)], seed: u64) -> Vec<Vec<f32>> {
    let mut rng = SplitMix64(seed);
    let weight_of = |name: &str| {
        let layer = name.rsplit_once('.').map_or("", |(l, _)| l);
        params
            .iter()
            .find(|(n, _)| *n == format!("{layer}.weight"))
            .map(|(_, s)| s.clone())
    };
    params
        .iter()
        .map(|(name, shape)| {
            let len = shape.iter().product::<i64>().max(0) as usize;
            let is_bias = name.ends_with("bias");
            let weight = if is_bias {
                weight_of(name)
            } else {
                Some(shape.clone())
            };
            match weight {
                // A normalisation layer: scale 1, shift 0.
                Some(w) if w.len() == 1 => vec![if is_bias { 0.0 } else { 1.0 }; len],
                w => {
                    let fan_in = w.map_or(1, |w| w.iter().skip(1).product::<i64>().max(1));
                    let bound = 1.0 / (fan_in as f32).sqrt();
                    (0..len).map(|_| rng.symmetric(bound)).collect()
                }
            }
        })
        .collect()
}
