//! SGD on flat parameter vectors, with torch.optim.SGD's semantics
//! (dampening 0), so runs are comparable with the reference.

use super::{check_state, OptimError};

/// Stochastic gradient descent with momentum, (L2) weight decay and
/// optionally Nesterov momentum.
#[derive(Clone, Debug, PartialEq)]
pub struct Sgd {
    pub momentum: f32,
    pub weight_decay: f32,
    pub nesterov: bool,
    n: usize,
    /// None until the first step with momentum (PyTorch seeds it with the
    /// first step's gradient rather than zeros); checkpoints carry it.
    momentum_buf: Option<Vec<f32>>,
}

impl Sgd {
    const STATE_NAMES: &'static [&'static str] = &["momentum"];

    /// For `n` parameters.
    pub fn new(momentum: f32, weight_decay: f32, nesterov: bool, n: usize) -> Self {
        Self {
            momentum,
            weight_decay,
            nesterov,
            n,
            momentum_buf: None,
        }
    }

    /// One descent step, in torch.optim.SGD's order of operations:
    /// `d = g + wd*p`; with momentum `buf = d` on the first step, else
    /// `buf = momentum*buf + d`, and then `d = d + momentum*buf` (Nesterov)
    /// or `d = buf`; `p -= lr*d`.
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f32) {
        assert_eq!(params.len(), self.n, "parameter count");
        let fresh = self.momentum_buf.is_none();
        self.step_range(params, grads, 0, lr, fresh);
    }

    /// [`Sgd::step`] on parameters `offset..offset + params.len()` only;
    /// stepping disjoint ranges that cover every parameter is the same as
    /// one step (every operation is elementwise). `fresh`: whether the
    /// optimizer had no state before this step's first range (PyTorch
    /// seeds the momentum with the first step's `d`).
    pub fn step_range(
        &mut self,
        params: &mut [f32],
        grads: &[f32],
        offset: usize,
        lr: f32,
        fresh: bool,
    ) {
        assert_eq!(grads.len(), params.len(), "gradient count");
        assert!(offset + params.len() <= self.n, "parameter range");
        let (wd, mu) = (self.weight_decay, self.momentum);
        // Separate branch-free loops over zipped slices, so each vectorises.
        if mu == 0.0 {
            for (p, &g) in params.iter_mut().zip(grads) {
                *p -= lr * (g + wd * *p);
            }
            return;
        }
        // Allocated once; the first step overwrites it with `d`.
        let n = self.n;
        let buf = self.momentum_buf.get_or_insert_with(|| vec![0.0; n]);
        let buf = &mut buf[offset..offset + params.len()];
        match (fresh, self.nesterov) {
            (true, false) => momentum_step::<true, false>(params, grads, buf, lr, wd, mu),
            (true, true) => momentum_step::<true, true>(params, grads, buf, lr, wd, mu),
            (false, false) => momentum_step::<false, false>(params, grads, buf, lr, wd, mu),
            (false, true) => momentum_step::<false, true>(params, grads, buf, lr, wd, mu),
        }
    }

    pub(super) fn state_mut(&mut self) -> Vec<&mut Vec<f32>> {
        self.momentum_buf.iter_mut().collect()
    }

    pub(super) fn state(&self) -> Vec<(&'static str, &[f32])> {
        match &self.momentum_buf {
            Some(buf) => vec![(Self::STATE_NAMES[0], buf.as_slice())],
            None => Vec::new(),
        }
    }

    pub(super) fn state_names(&self) -> &'static [&'static str] {
        if self.momentum == 0.0 {
            &[]
        } else {
            Self::STATE_NAMES
        }
    }

    pub(super) fn set_state(&mut self, name: &str, values: Vec<f32>) -> Result<(), OptimError> {
        check_state(name, &values, self.state_names(), self.n)?;
        self.momentum_buf = Some(values);
        Ok(())
    }

    pub(super) fn clear_state(&mut self) {
        self.momentum_buf = None;
    }
}

/// The momentum step's loop, one copy per (first step, Nesterov) so none
/// branches inside.
#[inline(always)]
fn momentum_step<const FIRST: bool, const NESTEROV: bool>(
    params: &mut [f32],
    grads: &[f32],
    buf: &mut [f32],
    lr: f32,
    wd: f32,
    mu: f32,
) {
    for ((p, &g), b) in params.iter_mut().zip(grads).zip(buf.iter_mut()) {
        let d = g + wd * *p;
        *b = if FIRST { d } else { mu * *b + d };
        let d = if NESTEROV { d + mu * *b } else { *b };
        *p -= lr * d;
    }
}

#[cfg(test)]
mod tests {
    use tch::nn::OptimizerConfig;
    use tch::{Device, Kind, Tensor};

    use super::*;

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol, "[{i}]: {x} vs {y}");
        }
    }

    #[test]
    fn three_steps_by_hand() {
        let (lr, mu, wd) = (0.1f32, 0.9f32, 0.01f32);
        let mut opt = Sgd::new(mu, wd, false, 2);
        let mut p = vec![1.0f32, -2.0];
        let grads = [[0.5f32, 0.25], [-1.0, 0.0], [0.0, 2.0]];

        // Step 1: buf = g + wd*p.
        // p0: d = 0.5 + 0.01 = 0.51; p = 1 - 0.051 = 0.949
        // p1: d = 0.25 - 0.02 = 0.23; p = -2 - 0.023 = -2.023
        opt.step(&mut p, &grads[0], lr);
        close(&p, &[0.949, -2.023], 1e-6);
        close(opt.momentum_buf.as_deref().unwrap(), &[0.51, 0.23], 1e-6);

        // Step 2: buf = 0.9*buf + g + wd*p.
        // p0: 0.459 + (-1 + 0.00949) = -0.53151; p = 0.949 + 0.053151 = 1.002151
        // p1: 0.207 + (0 - 0.02023) = 0.18677; p = -2.023 - 0.018677 = -2.041677
        opt.step(&mut p, &grads[1], lr);
        close(&p, &[1.002151, -2.041677], 1e-6);
        close(
            opt.momentum_buf.as_deref().unwrap(),
            &[-0.53151, 0.18677],
            1e-6,
        );

        // Step 3.
        // p0: -0.478359 + (0 + 0.01002151) = -0.46833749; p = 1.002151 + 0.046833749 = 1.048984749
        // p1: 0.168093 + (2 - 0.02041677) = 2.14767623; p = -2.041677 - 0.214767623 = -2.256444623
        opt.step(&mut p, &grads[2], lr);
        close(&p, &[1.048_984_7, -2.256_444_6], 1e-6);
    }

    #[test]
    fn without_momentum_keeps_no_buffer() {
        let mut opt = Sgd::new(0.0, 0.1, false, 1);
        let mut p = vec![2.0f32];
        opt.step(&mut p, &[1.0], 0.5);
        // d = 1 + 0.2 = 1.2; p = 2 - 0.6
        close(&p, &[1.4], 1e-7);
        assert!(opt.momentum_buf.is_none());
    }

    #[test]
    fn nesterov_by_hand() {
        let (lr, mu, wd) = (0.1f32, 0.5f32, 0.0f32);
        let mut opt = Sgd::new(mu, wd, true, 1);
        let mut p = vec![1.0f32];
        // Step 1: buf = g = 2; d = g + mu*buf = 3; p = 1 - 0.3.
        opt.step(&mut p, &[2.0], lr);
        close(&p, &[0.7], 1e-7);
        // Step 2: buf = 0.5*2 + 1 = 2; d = 1 + 0.5*2 = 2; p = 0.7 - 0.2.
        opt.step(&mut p, &[1.0], lr);
        close(&p, &[0.5], 1e-7);
        close(opt.momentum_buf.as_deref().unwrap(), &[2.0], 0.0);
    }

    /// Runs ours and libtorch's SGD (what torch.optim.SGD runs) from the same
    /// weights through the same `steps` gradients; returns both results.
    fn against_libtorch(mu: f32, wd: f32, nesterov: bool, steps: usize) -> (Vec<f32>, Vec<f32>) {
        let lr = 0.05f32;
        let n = 1000;
        tch::manual_seed(11);
        let init = Tensor::randn([n], (Kind::Float, Device::Cpu));
        let grads: Vec<Tensor> = (0..steps)
            .map(|_| Tensor::randn([n], (Kind::Float, Device::Cpu)))
            .collect();

        let vs = tch::nn::VarStore::new(Device::Cpu);
        let p = vs.root().var_copy("p", &init);
        let mut torch_opt = tch::nn::sgd(f64::from(mu), 0.0, f64::from(wd), nesterov)
            .build(&vs, f64::from(lr))
            .unwrap();

        let mut ours = Vec::<f32>::try_from(&init).unwrap();
        let mut opt = Sgd::new(mu, wd, nesterov, n as usize);
        for g in &grads {
            torch_opt.zero_grad();
            // d/dp of sum(p * g) is g.
            (&p * g).sum(Kind::Float).backward();
            torch_opt.step();
            opt.step(&mut ours, &Vec::<f32>::try_from(g).unwrap(), lr);
        }
        let theirs = Vec::<f32>::try_from(&p.detach()).unwrap();
        let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = ours
            .iter()
            .zip(&theirs)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!(
            "SGD momentum {mu} wd {wd} nesterov {nesterov} vs libtorch after {steps} steps: max rel diff {:.3e}",
            diff / scale
        );
        (ours, theirs)
    }

    /// Same results as libtorch's own SGD.
    #[test]
    fn matches_libtorch_sgd() {
        let (ours, theirs) = against_libtorch(0.9, 1e-3, false, 3);
        close(&ours, &theirs, 1e-6);
        let (ours, theirs) = against_libtorch(0.0, 1e-3, false, 3);
        close(&ours, &theirs, 1e-6);
    }

    #[test]
    fn matches_libtorch_sgd_with_nesterov() {
        let (ours, theirs) = against_libtorch(0.9, 1e-3, true, 5);
        close(&ours, &theirs, 1e-6);
        let (ours, theirs) = against_libtorch(0.8, 0.0, true, 3);
        close(&ours, &theirs, 1e-6);
    }
}
