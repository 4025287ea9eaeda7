//! AdamW on flat parameter vectors, with torch.optim.AdamW's semantics
//! (amsgrad off) in the order of operations of PyTorch's
//! `_single_tensor_adam` with decoupled weight decay, so results agree with
//! PyTorch's to float rounding:
//!
//! ```text
//! p = p * (1 - lr*wd)                       param.mul_(1 - lr * weight_decay)
//! m = lerp(m, g, 1 - b1)                    exp_avg.lerp_(grad, 1 - beta1)
//! v = v*b2 + (1 - b2)*g*g                   exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
//! denom = sqrt(v) / sqrt(1 - b2^t) + eps    (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
//! p = p + (-lr / (1 - b1^t)) * m / denom    param.addcdiv_(exp_avg, denom, value=-step_size)
//! ```
//!
//! The scalars are computed in f64 as PyTorch computes them in Python
//! floats, and enter the f32 arithmetic rounded to f32 as its kernels take
//! them. The remaining differences are PyTorch's: its vectorised kernels
//! fuse some multiply-adds and its f32 sqrt is not always correctly rounded,
//! both of which depend on the CPU it runs on.

use super::{check_state, OptimError};

/// Adam with decoupled weight decay.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    n: usize,
    /// First and second moments: None until the first step (PyTorch creates
    /// them, as zeros, lazily) or until installed by `set_state`.
    exp_avg: Option<Vec<f32>>,
    exp_avg_sq: Option<Vec<f32>>,
}

/// The per-step scalars, as f32 the way PyTorch's kernels receive them.
#[derive(Clone, Copy)]
struct Coefficients {
    /// `1 - lr*wd` (1 without weight decay: exact, as PyTorch's skip).
    decay: f32,
    /// `1 - beta1`, the lerp weight, and `1 - (1 - beta1)`.
    w1: f32,
    one_minus_w1: f32,
    beta2: f32,
    /// `1 - beta2`.
    w2: f32,
    bias_correction2_sqrt: f32,
    eps: f32,
    /// `-lr / (1 - beta1^t)`.
    neg_step_size: f32,
}

impl AdamW {
    pub(super) const STATE_NAMES: &'static [&'static str] = &["exp_avg", "exp_avg_sq"];

    /// For `n` parameters.
    pub fn new(betas: [f64; 2], eps: f64, weight_decay: f64, n: usize) -> Self {
        Self {
            betas,
            eps,
            weight_decay,
            n,
            exp_avg: None,
            exp_avg_sq: None,
        }
    }

    /// One step with learning rate `lr`; `t` (1-based) is the step count
    /// including this one, for the bias corrections.
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f32, t: u64) {
        assert_eq!(params.len(), self.n, "parameter count");
        self.step_range(params, grads, 0, lr, t);
    }

    pub(super) fn state_mut(&mut self) -> Vec<&mut Vec<f32>> {
        self.exp_avg
            .iter_mut()
            .chain(self.exp_avg_sq.iter_mut())
            .collect()
    }

    /// [`AdamW::step`] on parameters `offset..offset + params.len()` only;
    /// stepping disjoint ranges that cover every parameter is the same as
    /// one step (every operation is elementwise).
    pub fn step_range(
        &mut self,
        params: &mut [f32],
        grads: &[f32],
        offset: usize,
        lr: f32,
        t: u64,
    ) {
        assert_eq!(grads.len(), params.len(), "gradient count");
        assert!(offset + params.len() <= self.n, "parameter range");
        assert!(t >= 1, "AdamW's step count starts at 1");
        let [beta1, beta2] = self.betas;
        let lr = f64::from(lr);
        let step = t as f64;
        let bias_correction1 = 1.0 - beta1.powf(step);
        let bias_correction2 = 1.0 - beta2.powf(step);
        let w1 = (1.0 - beta1) as f32;
        let k = Coefficients {
            decay: if self.weight_decay == 0.0 {
                1.0
            } else {
                (1.0 - lr * self.weight_decay) as f32
            },
            w1,
            one_minus_w1: 1.0 - w1,
            beta2: beta2 as f32,
            w2: (1.0 - beta2) as f32,
            bias_correction2_sqrt: bias_correction2.sqrt() as f32,
            eps: self.eps as f32,
            neg_step_size: (-(lr / bias_correction1)) as f32,
        };
        let n = self.n;
        let range = offset..offset + params.len();
        let m = &mut self.exp_avg.get_or_insert_with(|| vec![0.0; n])[range.clone()];
        let v = &mut self.exp_avg_sq.get_or_insert_with(|| vec![0.0; n])[range];
        // ATen's lerp interpolates from the nearer end (weight < 0.5: from m).
        if w1.abs() < 0.5 {
            adamw_loop::<true>(params, grads, m, v, k);
        } else {
            adamw_loop::<false>(params, grads, m, v, k);
        }
    }

    pub(super) fn state(&self) -> Vec<(&'static str, &[f32])> {
        [&self.exp_avg, &self.exp_avg_sq]
            .into_iter()
            .zip(Self::STATE_NAMES)
            .filter_map(|(buf, &name)| Some((name, buf.as_deref()?)))
            .collect()
    }

    pub(super) fn set_state(&mut self, name: &str, values: Vec<f32>) -> Result<(), OptimError> {
        check_state(name, &values, Self::STATE_NAMES, self.n)?;
        if name == Self::STATE_NAMES[0] {
            self.exp_avg = Some(values);
        } else {
            self.exp_avg_sq = Some(values);
        }
        Ok(())
    }

    pub(super) fn clear_state(&mut self) {
        self.exp_avg = None;
        self.exp_avg_sq = None;
    }
}

/// The step's loop over zipped slices (no bounds checks, no branches: it
/// vectorises), one copy per lerp form.
#[inline(always)]
fn adamw_loop<const SMALL_WEIGHT: bool>(
    params: &mut [f32],
    grads: &[f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
    k: Coefficients,
) {
    let state = exp_avg.iter_mut().zip(exp_avg_sq.iter_mut());
    for ((p, &g), (m, v)) in params.iter_mut().zip(grads).zip(state) {
        let decayed = *p * k.decay;
        *m = if SMALL_WEIGHT {
            *m + k.w1 * (g - *m)
        } else {
            g - (g - *m) * k.one_minus_w1
        };
        *v = *v * k.beta2 + k.w2 * g * g;
        let denom = v.sqrt() / k.bias_correction2_sqrt + k.eps;
        *p = decayed + k.neg_step_size * *m / denom;
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::Command;

    use safetensors::tensor::TensorView;
    use safetensors::{Dtype, SafeTensors};
    use tch::nn::OptimizerConfig;
    use tch::{Device, Kind, Tensor};

    use super::*;

    /// One test configuration: hyper-parameters, the initial weights and
    /// each step's gradients.
    struct Case {
        lr: f32,
        betas: [f64; 2],
        eps: f64,
        weight_decay: f64,
        init: Vec<f32>,
        grads: Vec<Vec<f32>>,
    }

    impl Case {
        /// Seeded weights and `steps` gradients over `n` values whose scale
        /// varies by element and step (Adam normalises, so magnitudes matter
        /// only relatively), with some exact zeros.
        fn new(lr: f32, betas: [f64; 2], eps: f64, weight_decay: f64, steps: usize) -> Self {
            let n = 10_007;
            tch::manual_seed(7);
            let init = Tensor::randn([n], (Kind::Float, Device::Cpu));
            let grads = (0..steps)
                .map(|s| {
                    let scale = Tensor::randn([n], (Kind::Float, Device::Cpu)).exp();
                    let mut g = Vec::<f32>::try_from(
                        Tensor::randn([n], (Kind::Float, Device::Cpu))
                            * scale
                            * (0.1 / (1 + s) as f64),
                    )
                    .unwrap();
                    g.iter_mut().step_by(97 + s).for_each(|x| *x = 0.0);
                    g
                })
                .collect();
            Self {
                lr,
                betas,
                eps,
                weight_decay,
                init: Vec::<f32>::try_from(init).unwrap(),
                grads,
            }
        }

        fn optimizer(&self) -> AdamW {
            AdamW::new(self.betas, self.eps, self.weight_decay, self.init.len())
        }

        /// Ours after all the steps: parameters and optimizer.
        fn ours(&self) -> (Vec<f32>, AdamW) {
            let mut opt = self.optimizer();
            let mut p = self.init.clone();
            for (t, g) in self.grads.iter().enumerate() {
                opt.step(&mut p, g, self.lr, t as u64 + 1);
            }
            (p, opt)
        }
    }

    /// max |ours - theirs| / max |theirs|.
    fn rel_diff(ours: &[f32], theirs: &[f32]) -> f64 {
        assert_eq!(ours.len(), theirs.len());
        let scale = theirs.iter().fold(0f64, |m, &v| m.max(f64::from(v).abs()));
        let diff = ours.iter().zip(theirs).fold(0f64, |m, (&a, &b)| {
            m.max((f64::from(a) - f64::from(b)).abs())
        });
        diff / scale
    }

    #[test]
    fn one_step_by_hand() {
        // t = 1: m = 0.1*g, v = 0.001*g², so m/(1-b1) = g, sqrt(v/(1-b2)) = |g|:
        // p = p*(1 - lr*wd) - lr * g / (|g| + eps).
        let mut opt = AdamW::new([0.9, 0.999], 1e-8, 0.1, 3);
        let mut p = vec![1.0f32, -2.0, 0.5];
        opt.step(&mut p, &[0.5, -4.0, 0.0], 0.01, 1);
        let want = [1.0 * 0.999 - 0.01, -2.0 * 0.999 + 0.01, 0.5 * 0.999];
        for (a, b) in p.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        assert_eq!(
            opt.state(),
            [
                ("exp_avg", &[0.05f32, -0.4, 0.0][..]),
                ("exp_avg_sq", &[0.00025f32, 0.016, 0.0][..])
            ]
        );
    }

    /// Same results as libtorch's AdamW (through tch).
    #[test]
    fn matches_libtorch_adamw() {
        for case in [
            Case::new(1e-3, [0.9, 0.999], 1e-8, 0.01, 20),
            Case::new(0.05, [0.3, 0.99], 1e-6, 0.1, 20),
        ] {
            let vs = tch::nn::VarStore::new(Device::Cpu);
            let p = vs.root().var_copy("p", &Tensor::from_slice(&case.init));
            let [b1, b2] = case.betas;
            let mut torch_opt = tch::nn::adamw(b1, b2, case.weight_decay)
                .eps(case.eps)
                .build(&vs, f64::from(case.lr))
                .unwrap();
            for g in &case.grads {
                torch_opt.zero_grad();
                // d/dp of sum(p * g) is g.
                (&p * Tensor::from_slice(g)).sum(Kind::Float).backward();
                torch_opt.step();
            }
            let theirs = Vec::<f32>::try_from(&p.detach()).unwrap();
            let (ours, _) = case.ours();
            let rel = rel_diff(&ours, &theirs);
            eprintln!(
                "AdamW betas {:?} vs libtorch after 20 steps: max rel diff {rel:.3e}",
                case.betas
            );
            assert!(rel <= 1e-5, "{rel}");
            // And it moved: a step is not a no-op on either side.
            assert!(rel_diff(&case.init, &theirs) > 1e-3);
        }
    }

    fn python() -> &'static str {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python")
    }

    /// torch.optim.AdamW (PyTorch's own Python, single-tensor path, as on
    /// CPU) from `case`: its parameters, exp_avg and exp_avg_sq.
    fn pytorch_adamw(case: &Case, dir: &Path) -> Vec<Vec<f32>> {
        let n = case.init.len();
        let grads: Vec<f32> = case.grads.concat();
        let init_bytes: &[u8] = bytemuck::cast_slice(&case.init);
        let grad_bytes: &[u8] = bytemuck::cast_slice(&grads);
        let views = [
            (
                "init",
                TensorView::new(Dtype::F32, vec![n], init_bytes).unwrap(),
            ),
            (
                "grads",
                TensorView::new(Dtype::F32, vec![case.grads.len(), n], grad_bytes).unwrap(),
            ),
        ];
        let input = dir.join("in.safetensors");
        let output = dir.join("out.safetensors");
        std::fs::write(&input, safetensors::serialize(views, None).unwrap()).unwrap();
        let script = "import sys, torch\n\
            from safetensors.torch import load_file, save_file\n\
            t = load_file(sys.argv[1])\n\
            lr, b1, b2, eps, wd = map(float, sys.argv[3:])\n\
            p = t['init'].clone().requires_grad_(True)\n\
            opt = torch.optim.AdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, foreach=False)\n\
            for g in t['grads']:\n\
            \x20   p.grad = g.clone()\n\
            \x20   opt.step()\n\
            s = opt.state[p]\n\
            save_file({'params': p.detach(), 'exp_avg': s['exp_avg'], 'exp_avg_sq': s['exp_avg_sq']}, sys.argv[2])\n";
        let [b1, b2] = case.betas;
        let out = Command::new(python())
            .args(["-c", script])
            .arg(&input)
            .arg(&output)
            .args([f64::from(case.lr), b1, b2, case.eps, case.weight_decay].map(|x| x.to_string()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bytes = std::fs::read(&output).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        ["params", "exp_avg", "exp_avg_sq"]
            .map(|name| {
                let t = st.tensor(name).unwrap();
                assert_eq!((t.dtype(), t.shape()), (Dtype::F32, &[n][..]));
                t.data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect()
            })
            .into()
    }

    /// Same results as torch.optim.AdamW in PyTorch's Python (the .venv's).
    #[test]
    fn matches_pytorch_adamw() {
        let has_torch = Command::new(python())
            .args(["-c", "import torch, safetensors.torch"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !has_torch
            && ringtrain_common::testing::skip(&format!(
                "{} lacks torch or safetensors (scripts/env.sh installs them)",
                python()
            ))
        {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        for case in [
            Case::new(1e-3, [0.9, 0.999], 1e-8, 0.01, 20),
            // The other lerp form (1 - beta1 >= 0.5), no weight decay.
            Case::new(0.05, [0.3, 0.99], 1e-6, 0.0, 20),
        ] {
            let theirs = pytorch_adamw(&case, tmp.path());
            let (ours, opt) = case.ours();
            let state = opt.state();
            let rel = [
                rel_diff(&ours, &theirs[0]),
                rel_diff(state[0].1, &theirs[1]),
                rel_diff(state[1].1, &theirs[2]),
            ];
            eprintln!(
                "AdamW betas {:?} vs torch.optim.AdamW after 20 steps: max rel diff params {:.3e}, exp_avg {:.3e}, exp_avg_sq {:.3e}",
                case.betas, rel[0], rel[1], rel[2]
            );
            assert!(rel.iter().all(|&r| r <= 1e-5), "{rel:?}");
        }
    }

    /// A checkpoint's or a peer's state resumes the run bit for bit.
    #[test]
    fn state_round_trip_resumes_exactly() {
        let case = Case::new(1e-2, [0.9, 0.999], 1e-8, 0.01, 20);
        let mut a = case.optimizer();
        let mut pa = case.init.clone();
        for (t, g) in case.grads[..10].iter().enumerate() {
            a.step(&mut pa, g, case.lr, t as u64 + 1);
        }
        let mut b = case.optimizer();
        for (name, values) in a.state() {
            b.set_state(name, values.to_vec()).unwrap();
        }
        let mut pb = pa.clone();
        for (t, g) in case.grads.iter().enumerate().skip(10) {
            a.step(&mut pa, g, case.lr, t as u64 + 1);
            b.step(&mut pb, g, case.lr, t as u64 + 1);
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&pa), bits(&pb));
        assert_eq!(a, b);
        // Without the state the resumed run differs.
        let mut c = case.optimizer();
        let (mut pc, mut pa2) = (case.init.clone(), case.init.clone());
        let mut a2 = case.optimizer();
        for (t, g) in case.grads[..2].iter().enumerate() {
            a2.step(&mut pa2, g, case.lr, t as u64 + 1);
        }
        pc.copy_from_slice(&pa2);
        a2.step(&mut pa2, &case.grads[2], case.lr, 3);
        c.step(&mut pc, &case.grads[2], case.lr, 3);
        assert_ne!(bits(&pa2), bits(&pc));
    }
}
