//! A decoder-only, byte-level transformer (GPT-2 shaped) for `model = "gpt"`.
//!
//! Token embedding (vocab × dim) plus a learned position embedding
//! (context × dim), `layers` pre-LayerNorm blocks (causal multi-head
//! self-attention with a fused qkv projection, then a GELU MLP of width
//! 4·dim, each added back to the residual stream), a final LayerNorm and an
//! untied linear head to `vocab` logits. No dropout: `train` changes nothing.
//!
//! Parameter names (kept in checkpoints), for block `i`:
//! `tok_emb.weight`, `pos_emb.weight`, `blocks.i.ln1.{weight,bias}`,
//! `blocks.i.attn.qkv.{weight,bias}`, `blocks.i.attn.proj.{weight,bias}`,
//! `blocks.i.ln2.{weight,bias}`, `blocks.i.mlp.fc.{weight,bias}`,
//! `blocks.i.mlp.proj.{weight,bias}`, `ln_f.{weight,bias}`,
//! `head.{weight,bias}`. Linear weights are `[out, in]` as in PyTorch.
//!
//! Parameter count, with V = vocab, C = dim, T = context, L = layers:
//! `V·C + T·C + L·(12·C² + 13·C) + 2·C + C·V + V`.
//!
//! Initial values come from [`init_values`] (seeded, independent of
//! libtorch's global generator); [`Gpt::new`] only creates the variables.

use ringtrain_common::data_plan::SplitMix64;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// The shape of the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GptConfig {
    /// Token ids are `0..vocab` (256 for bytes).
    pub vocab: i64,
    pub layers: i64,
    pub heads: i64,
    /// Width of the residual stream; a multiple of `heads`.
    pub dim: i64,
    /// Longest sequence (rows of the position embedding).
    pub context: i64,
}

#[derive(Debug)]
struct Attention {
    qkv: nn::Linear,
    proj: nn::Linear,
    heads: i64,
}

impl Attention {
    /// `x`: `[B, T, C]` → `[B, T, C]`, position t attending to 0..=t.
    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, t, c) = x.size3().expect("attention input is [B, T, C]");
        let head_dim = c / self.heads;
        // [B, T, 3C] → three [B, H, T, D].
        let qkv = self
            .qkv
            .forward(x)
            .view([b, t, 3, self.heads, head_dim])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        // Scale defaults to 1/sqrt(head_dim); is_causal masks with -inf
        // above the diagonal.
        let y = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            true,
            None,
            false,
        );
        let y = y.transpose(1, 2).contiguous().view([b, t, c]);
        self.proj.forward(&y)
    }
}

#[derive(Debug)]
struct Mlp {
    fc: nn::Linear,
    proj: nn::Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.proj.forward(&self.fc.forward(x).gelu("none"))
    }
}

#[derive(Debug)]
struct Block {
    ln1: nn::LayerNorm,
    attn: Attention,
    ln2: nn::LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn forward(&self, x: &Tensor) -> Tensor {
        let x = x + self.attn.forward(&self.ln1.forward(x));
        &x + self.mlp.forward(&self.ln2.forward(&x))
    }
}

/// The network; its variables live in the `nn::Path` given to [`Gpt::new`].
#[derive(Debug)]
pub struct Gpt {
    cfg: GptConfig,
    device: Device,
    tok_emb: nn::Embedding,
    pos_emb: nn::Embedding,
    blocks: Vec<Block>,
    ln_f: nn::LayerNorm,
    head: nn::Linear,
}

/// Variables are created as constants (matrices 0, LayerNorm weights 1), so
/// building a model draws nothing from libtorch's global generator; the
/// caller then overwrites them with [`init_values`].
fn linear(p: nn::Path, in_dim: i64, out_dim: i64) -> nn::Linear {
    let cfg = nn::LinearConfig {
        ws_init: nn::Init::Const(0.0),
        bs_init: Some(nn::Init::Const(0.0)),
        bias: true,
    };
    nn::linear(p, in_dim, out_dim, cfg)
}

fn embedding(p: nn::Path, num: i64, dim: i64) -> nn::Embedding {
    let cfg = nn::EmbeddingConfig {
        ws_init: nn::Init::Const(0.0),
        ..Default::default()
    };
    nn::embedding(p, num, dim, cfg)
}

fn layer_norm(p: nn::Path, dim: i64) -> nn::LayerNorm {
    nn::layer_norm(p, vec![dim], Default::default())
}

impl Gpt {
    /// Builds the network's variables under `vs`, with constant values
    /// (0, LayerNorm weights 1): overwrite them with [`init_values`].
    ///
    /// Panics on a shape the job spec check rejects (a zero size, or `dim`
    /// not a multiple of `heads`).
    pub fn new(vs: &nn::Path, cfg: &GptConfig) -> Gpt {
        assert!(
            cfg.vocab > 0 && cfg.layers > 0 && cfg.heads > 0 && cfg.dim > 0 && cfg.context > 0,
            "gpt: every size must be at least 1: {cfg:?}"
        );
        assert_eq!(
            cfg.dim % cfg.heads,
            0,
            "gpt: dim must be a multiple of heads: {cfg:?}"
        );
        let c = cfg.dim;
        let blocks = (0..cfg.layers)
            .map(|i| {
                let p = vs / "blocks" / i;
                Block {
                    ln1: layer_norm(&p / "ln1", c),
                    attn: Attention {
                        qkv: linear(&p / "attn" / "qkv", c, 3 * c),
                        proj: linear(&p / "attn" / "proj", c, c),
                        heads: cfg.heads,
                    },
                    ln2: layer_norm(&p / "ln2", c),
                    mlp: Mlp {
                        fc: linear(&p / "mlp" / "fc", c, 4 * c),
                        proj: linear(&p / "mlp" / "proj", 4 * c, c),
                    },
                }
            })
            .collect();
        Gpt {
            cfg: *cfg,
            device: vs.device(),
            tok_emb: embedding(vs / "tok_emb", cfg.vocab, c),
            pos_emb: embedding(vs / "pos_emb", cfg.context, c),
            blocks,
            ln_f: layer_norm(vs / "ln_f", c),
            head: linear(vs / "head", c, cfg.vocab),
        }
    }

    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }
}

impl nn::ModuleT for Gpt {
    /// `x`: `[B, T]` i64 token ids, `T <= context`. Returns logits
    /// `[B, T, vocab]`; position t sees positions 0..=t only.
    fn forward_t(&self, x: &Tensor, _train: bool) -> Tensor {
        let t = x.size()[1];
        debug_assert!(
            t <= self.cfg.context,
            "gpt: sequence of {t} is longer than the context {}",
            self.cfg.context
        );
        let pos = Tensor::arange(t, (Kind::Int64, x.device()));
        let mut h = self.tok_emb.forward(x) + self.pos_emb.forward(&pos);
        for block in &self.blocks {
            h = block.forward(&h);
        }
        self.head.forward(&self.ln_f.forward(&h))
    }
}

/// How a parameter starts, from its name.
fn init_std(name: &str, layers: i64) -> Option<f64> {
    let mut parts = name.rsplit('.');
    let leaf = parts.next().unwrap_or("");
    let module = parts.next().unwrap_or("");
    if leaf == "bias" || module.starts_with("ln") {
        None
    } else if module == "proj" {
        // Residual output projections (attention and MLP), scaled as in
        // GPT-2 so the residual stream's variance does not grow with depth.
        Some(0.02 / (2.0 * layers.max(1) as f64).sqrt())
    } else {
        Some(0.02)
    }
}

/// Standard normals by Box–Muller, two per pair of uniforms.
struct Normals {
    rng: SplitMix64,
    spare: Option<f64>,
}

impl Normals {
    fn next(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        // u1 in (0, 1] so ln(u1) is finite; u2 in [0, 1).
        let u1 = ((self.rng.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64;
        let u2 = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
        self.spare = Some(r * s);
        r * c
    }
}

/// FNV-1a: a stable hash of a parameter's name.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// Seeded initial values for the named parameters (names as the VarStore
/// has them, shapes as [`Gpt::new`] creates them), one vector per entry in
/// the order given: GPT-2 style. Linear and embedding weights ~ N(0, 0.02),
/// the residual output projections (`*.proj.weight`) ~
/// N(0, 0.02/sqrt(2·layers)), biases 0, LayerNorm (`ln*`) weights 1 and
/// biases 0.
///
/// Each parameter draws from its own SplitMix64 stream, seeded from `seed`
/// and its name, so its values do not depend on which other parameters are
/// listed or in what order; nothing comes from libtorch's generator.
pub fn init_values(named_shapes: &[(String, Vec<i64>)], layers: i64, seed: u64) -> Vec<Vec<f32>> {
    named_shapes
        .iter()
        .map(|(name, shape)| {
            let len = shape.iter().product::<i64>().max(0) as usize;
            match init_std(name, layers) {
                None => {
                    let is_ln_weight = name.ends_with(".weight");
                    vec![if is_ln_weight { 1.0 } else { 0.0 }; len]
                }
                Some(std) => {
                    let mut stream = SplitMix64(seed ^ name_hash(name));
                    let mut normals = Normals {
                        rng: SplitMix64(stream.next_u64()),
                        spare: None,
                    };
                    (0..len).map(|_| (std * normals.next()) as f32).collect()
                }
            }
        })
        .collect()
}

/// The byte generation starts from when the prompt is empty.
pub const EMPTY_PROMPT: u8 = b'\n';

/// Samples `tokens` bytes after `prompt`, feeding the model at most the last
/// `context` bytes (capped at the model's own context). With a positive
/// `temperature`, each byte is drawn from softmax(logits / temperature) with
/// a SplitMix64 generator seeded by `seed` (the same seed, the same bytes);
/// otherwise (0, negative or NaN) the most likely byte is taken, the lowest
/// on a tie. An empty prompt starts from [`EMPTY_PROMPT`], which is not part
/// of the result. Returns exactly `tokens` bytes (the generated ones only).
pub fn generate(
    model: &Gpt,
    context: i64,
    prompt: &[u8],
    tokens: usize,
    temperature: f64,
    seed: u64,
) -> Vec<u8> {
    let context = context.clamp(1, model.cfg.context) as usize;
    let mut rng = SplitMix64(seed);
    let mut seq: Vec<u8> = if prompt.is_empty() {
        vec![EMPTY_PROMPT]
    } else {
        prompt.to_vec()
    };
    let start = seq.len();
    tch::no_grad(|| {
        for _ in 0..tokens {
            let window: Vec<i64> = seq[seq.len().saturating_sub(context)..]
                .iter()
                .map(|&b| b as i64)
                .collect();
            let x = Tensor::from_slice(&window)
                .to_device(model.device)
                .unsqueeze(0);
            let logits = nn::ModuleT::forward_t(model, &x, false)
                .get(0)
                .get(-1)
                .to_kind(Kind::Double)
                .to_device(Device::Cpu);
            let logits = Vec::<f64>::try_from(&logits).expect("logits to f64");
            let next = if temperature > 0.0 {
                sample(&logits, temperature, &mut rng)
            } else {
                argmax(&logits)
            };
            seq.push(next as u8);
        }
    });
    seq.split_off(start)
}

fn argmax(logits: &[f64]) -> usize {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best
}

/// One draw from softmax(logits / temperature).
fn sample(logits: &[f64], temperature: f64, rng: &mut SplitMix64) -> usize {
    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = logits
        .iter()
        .map(|&l| ((l - max) / temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    if !(total.is_finite() && total > 0.0) {
        return argmax(logits);
    }
    let mut u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
    for (i, &w) in weights.iter().enumerate() {
        if u < w {
            return i;
        }
        u -= w;
    }
    // Rounding left u past the last weight: the last byte with any weight.
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{ModuleT, OptimizerConfig};

    const SMALL: GptConfig = GptConfig {
        vocab: 256,
        layers: 2,
        heads: 2,
        dim: 16,
        context: 8,
    };

    /// The VarStore's parameters sorted by name, with their shapes.
    fn named_shapes(vs: &nn::VarStore) -> Vec<(String, Vec<i64>)> {
        let mut named: Vec<_> = vs
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.size()))
            .collect();
        named.sort();
        named
    }

    /// A model with `init_values(seed)` copied into its variables.
    fn build(cfg: &GptConfig, seed: u64) -> (nn::VarStore, Gpt) {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Gpt::new(&vs.root(), cfg);
        let named = named_shapes(&vs);
        let values = init_values(&named, cfg.layers, seed);
        let vars = vs.variables();
        tch::no_grad(|| {
            for ((name, shape), v) in named.iter().zip(&values) {
                let mut p = vars[name].shallow_clone();
                p.copy_(&Tensor::from_slice(v).view(shape.as_slice()));
            }
        });
        (vs, model)
    }

    fn bytes(x: &[u8], rows: i64) -> Tensor {
        let v: Vec<i64> = x.iter().map(|&b| b as i64).collect();
        Tensor::from_slice(&v).view([rows, -1])
    }

    #[test]
    fn gpt_logits_have_the_shape_of_the_input() {
        let (_vs, model) = build(&SMALL, 1);
        for t in [1, 5, SMALL.context] {
            let x = Tensor::randint(256, [3, t], (Kind::Int64, Device::Cpu));
            let y = model.forward_t(&x, true);
            assert_eq!(y.size(), [3, t, 256]);
            assert_eq!(y.kind(), Kind::Float);
        }
    }

    #[test]
    fn gpt_parameters_are_named_and_counted_as_designed() {
        let cfg = GptConfig {
            vocab: 256,
            layers: 3,
            heads: 2,
            dim: 8,
            context: 5,
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let _model = Gpt::new(&vs.root(), &cfg);
        let named = named_shapes(&vs);
        let (v, c, t) = (256, 8, 5);
        let mut expect: Vec<(String, Vec<i64>)> = vec![
            ("tok_emb.weight".into(), vec![v, c]),
            ("pos_emb.weight".into(), vec![t, c]),
            ("ln_f.weight".into(), vec![c]),
            ("ln_f.bias".into(), vec![c]),
            ("head.weight".into(), vec![v, c]),
            ("head.bias".into(), vec![v]),
        ];
        for i in 0..3 {
            let b = format!("blocks.{i}");
            expect.extend([
                (format!("{b}.ln1.weight"), vec![c]),
                (format!("{b}.ln1.bias"), vec![c]),
                (format!("{b}.attn.qkv.weight"), vec![3 * c, c]),
                (format!("{b}.attn.qkv.bias"), vec![3 * c]),
                (format!("{b}.attn.proj.weight"), vec![c, c]),
                (format!("{b}.attn.proj.bias"), vec![c]),
                (format!("{b}.ln2.weight"), vec![c]),
                (format!("{b}.ln2.bias"), vec![c]),
                (format!("{b}.mlp.fc.weight"), vec![4 * c, c]),
                (format!("{b}.mlp.fc.bias"), vec![4 * c]),
                (format!("{b}.mlp.proj.weight"), vec![c, 4 * c]),
                (format!("{b}.mlp.proj.bias"), vec![c]),
            ]);
        }
        expect.sort();
        assert_eq!(named, expect);
        let count: i64 = named.iter().map(|(_, s)| s.iter().product::<i64>()).sum();
        let l = 3;
        assert_eq!(
            count,
            v * c + t * c + l * (12 * c * c + 13 * c) + 2 * c + c * v + v
        );
    }

    #[test]
    fn gpt_is_causal() {
        let (_vs, model) = build(&SMALL, 2);
        let t = SMALL.context;
        let x: Vec<u8> = (0..t as u8).map(|i| b'a' + 3 * i).collect();
        let base = model.forward_t(&bytes(&x, 1), false);
        for k in 0..t {
            let mut changed = x.clone();
            changed[k as usize] ^= 0x55;
            let y = model.forward_t(&bytes(&changed, 1), false);
            if k > 0 {
                assert!(
                    y.narrow(1, 0, k).equal(&base.narrow(1, 0, k)),
                    "positions before {k} moved"
                );
            }
            for p in k..t {
                let diff = (y.get(0).get(p) - base.get(0).get(p))
                    .abs()
                    .max()
                    .double_value(&[]);
                assert!(diff > 0.0, "position {p} ignores a change at {k}");
            }
        }
    }

    /// The attention scaled_dot_product_attention computes is the textbook
    /// one: softmax(q·kᵀ/sqrt(d)) masked above the diagonal, times v.
    #[test]
    fn gpt_attention_matches_the_explicit_masked_softmax() {
        let (_vs, model) = build(&SMALL, 3);
        let attn = &model.blocks[0].attn;
        let x = Tensor::randn([2, 6, SMALL.dim], (Kind::Float, Device::Cpu));
        let got = attn.forward(&x);
        let (b, t, c, h) = (2, 6, SMALL.dim, SMALL.heads);
        let d = c / h;
        let qkv = attn.qkv.forward(&x).view([b, t, 3, h, d]);
        let q = qkv.select(2, 0).transpose(1, 2);
        let k = qkv.select(2, 1).transpose(1, 2);
        let v = qkv.select(2, 2).transpose(1, 2);
        let scores = q.matmul(&k.transpose(-2, -1)) / (d as f64).sqrt();
        let mask = Tensor::ones([t, t], (Kind::Bool, Device::Cpu)).triu(1);
        let probs = scores
            .masked_fill(&mask, f64::NEG_INFINITY)
            .softmax(-1, Kind::Float);
        let y = probs
            .matmul(&v)
            .transpose(1, 2)
            .contiguous()
            .view([b, t, c]);
        let want = attn.proj.forward(&y);
        let err = (got - want).abs().max().double_value(&[]);
        assert!(err < 1e-5, "max difference {err}");
    }

    #[test]
    fn gpt_gradients_are_deterministic() {
        let (vs, model) = build(&SMALL, 4);
        let x = Tensor::randint(256, [4, SMALL.context], (Kind::Int64, Device::Cpu));
        let grads = || {
            for p in vs.variables().values() {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            let loss = model
                .forward_t(&x, true)
                .view([-1, 256])
                .cross_entropy_for_logits(&x.view([-1]));
            loss.backward();
            let named = named_shapes(&vs);
            let vars = vs.variables();
            named
                .iter()
                .map(|(n, _)| vars[n].grad().copy())
                .collect::<Vec<_>>()
        };
        let a = grads();
        let b = grads();
        assert!(a.iter().zip(&b).all(|(a, b)| a.equal(b)));
    }

    fn values_of(named: &[(String, Vec<i64>)], values: &[Vec<f32>], name: &str) -> Vec<f32> {
        let i = named.iter().position(|(n, _)| n == name).unwrap();
        values[i].clone()
    }

    fn std_of(v: &[f32]) -> f64 {
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt()
    }

    #[test]
    fn gpt_init_values_are_seeded_and_gpt2_shaped() {
        let cfg = GptConfig {
            vocab: 256,
            layers: 4,
            heads: 4,
            dim: 64,
            context: 32,
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let _model = Gpt::new(&vs.root(), &cfg);
        let named = named_shapes(&vs);

        tch::manual_seed(1);
        let a = init_values(&named, cfg.layers, 7);
        tch::manual_seed(2);
        let _ = Tensor::randn([1000], (Kind::Float, Device::Cpu));
        let b = init_values(&named, cfg.layers, 7);
        assert_eq!(a, b, "libtorch's generator changed the init");
        let c = init_values(&named, cfg.layers, 8);
        assert_ne!(a, c);

        // A parameter's values do not depend on the order of the list.
        let mut reversed = named.clone();
        reversed.reverse();
        let r = init_values(&reversed, cfg.layers, 7);
        for (name, _) in &named {
            assert_eq!(values_of(&named, &a, name), values_of(&reversed, &r, name));
        }

        for ((name, shape), v) in named.iter().zip(&a) {
            assert_eq!(v.len() as i64, shape.iter().product::<i64>(), "{name}");
            if name.ends_with(".bias") {
                assert!(v.iter().all(|&x| x == 0.0), "{name}");
            } else if name.contains("ln") {
                assert!(v.iter().all(|&x| x == 1.0), "{name}");
            } else {
                let want = if name.ends_with(".proj.weight") {
                    0.02 / (2.0 * cfg.layers as f64).sqrt()
                } else {
                    0.02
                };
                let got = std_of(v);
                // 4096+ draws: the sample std is within a few percent.
                assert!(
                    (got / want - 1.0).abs() < 0.05,
                    "{name}: std {got}, want {want}"
                );
            }
        }
        // Two matrices of one shape differ.
        assert_ne!(
            values_of(&named, &a, "blocks.0.attn.qkv.weight"),
            values_of(&named, &a, "blocks.1.attn.qkv.weight")
        );
        let big = values_of(&named, &a, "tok_emb.weight");
        let mean = big.iter().map(|&x| x as f64).sum::<f64>() / big.len() as f64;
        assert!(mean.abs() < 0.001, "mean {mean}");
    }

    #[test]
    fn gpt_learns_a_repeated_string_and_continues_it() {
        let cfg = GptConfig {
            vocab: 256,
            layers: 2,
            heads: 2,
            dim: 32,
            context: 16,
        };
        let (vs, model) = build(&cfg, 5);
        let text = "hello world! ".repeat(20).into_bytes();
        let t = cfg.context as usize;
        // The text repeats every 13 bytes: 13 windows hold every one there is.
        let windows = 13;
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        for i in 0..windows {
            xs.extend_from_slice(&text[i..i + t]);
            ys.extend_from_slice(&text[i + 1..i + t + 1]);
        }
        let x = bytes(&xs, windows as i64);
        let y = bytes(&ys, windows as i64).view([-1]);
        let mut opt = nn::Adam::default().build(&vs, 3e-3).unwrap();
        let mut loss = f64::INFINITY;
        for _ in 0..150 {
            let l = model
                .forward_t(&x, true)
                .view([-1, 256])
                .cross_entropy_for_logits(&y);
            opt.backward_step(&l);
            loss = l.double_value(&[]);
        }
        assert!(loss < 0.5, "cross-entropy {loss} after training");
        let out = generate(&model, cfg.context, b"hello", 7, 0.0, 0);
        assert_eq!(out, b" world!", "{}", String::from_utf8_lossy(&out));
    }

    #[test]
    fn gpt_generate_is_seeded_and_takes_any_prompt() {
        let (_vs, model) = build(&SMALL, 6);
        let a = generate(&model, SMALL.context, b"abc", 12, 1.0, 9);
        let b = generate(&model, SMALL.context, b"abc", 12, 1.0, 9);
        assert_eq!(a.len(), 12);
        assert_eq!(a, b);
        let c = generate(&model, SMALL.context, b"abc", 12, 1.0, 10);
        assert_ne!(a, c, "another seed, the same 12 random bytes");

        // Only the last `context` bytes of a long prompt matter.
        let long: Vec<u8> = (0..40u8).map(|i| b'A' + i % 26).collect();
        let tail = &long[long.len() - SMALL.context as usize..];
        let from_long = generate(&model, SMALL.context, &long, 5, 0.7, 3);
        assert_eq!(from_long.len(), 5);
        assert_eq!(from_long, generate(&model, SMALL.context, tail, 5, 0.7, 3));

        // An empty prompt starts from a newline, not returned.
        let empty = generate(&model, SMALL.context, b"", 4, 0.0, 0);
        assert_eq!(empty, generate(&model, SMALL.context, b"\n", 4, 0.0, 0));
        assert!(generate(&model, SMALL.context, b"x", 0, 1.0, 0).is_empty());
        // A context beyond the model's is capped, not an error.
        assert_eq!(generate(&model, 1000, &long, 3, 0.0, 0).len(), 3);
    }
}
