//! SGD on flat parameter vectors, with torch.optim.SGD's semantics
//! (dampening 0, no Nesterov), so runs are comparable with the reference.

/// Stochastic gradient descent with momentum and (L2) weight decay.
#[derive(Clone, Debug, PartialEq)]
pub struct Sgd {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    /// None until the first step with momentum (PyTorch seeds it with the
    /// first step's gradient rather than zeros); checkpoints carry it.
    pub momentum_buf: Option<Vec<f32>>,
}

impl Sgd {
    pub fn new(lr: f32, momentum: f32, weight_decay: f32) -> Self {
        Self {
            lr,
            momentum,
            weight_decay,
            momentum_buf: None,
        }
    }

    /// One descent step: `d = g + wd*p`; with momentum `buf = d` on the
    /// first step, else `buf = momentum*buf + d`, and `d = buf`; `p -= lr*d`.
    pub fn step(&mut self, params: &mut [f32], grads: &[f32]) {
        assert_eq!(params.len(), grads.len(), "parameter and gradient lengths");
        let (lr, wd, mu) = (self.lr, self.weight_decay, self.momentum);
        // Separate branch-free loops over zipped slices, so each vectorises.
        if mu == 0.0 {
            for (p, &g) in params.iter_mut().zip(grads) {
                *p -= lr * (g + wd * *p);
            }
            return;
        }
        match &mut self.momentum_buf {
            Some(buf) => {
                assert_eq!(buf.len(), params.len(), "momentum buffer length");
                for ((p, &g), b) in params.iter_mut().zip(grads).zip(buf.iter_mut()) {
                    *b = mu * *b + (g + wd * *p);
                    *p -= lr * *b;
                }
            }
            None => {
                let mut buf = vec![0.0; params.len()];
                for ((p, &g), b) in params.iter_mut().zip(grads).zip(buf.iter_mut()) {
                    *b = g + wd * *p;
                    *p -= lr * *b;
                }
                self.momentum_buf = Some(buf);
            }
        }
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
        let mut opt = Sgd::new(lr, mu, wd);
        let mut p = vec![1.0f32, -2.0];
        let grads = [[0.5f32, 0.25], [-1.0, 0.0], [0.0, 2.0]];

        // Step 1: buf = g + wd*p.
        // p0: d = 0.5 + 0.01 = 0.51; p = 1 - 0.051 = 0.949
        // p1: d = 0.25 - 0.02 = 0.23; p = -2 - 0.023 = -2.023
        opt.step(&mut p, &grads[0]);
        close(&p, &[0.949, -2.023], 1e-6);
        close(opt.momentum_buf.as_deref().unwrap(), &[0.51, 0.23], 1e-6);

        // Step 2: buf = 0.9*buf + g + wd*p.
        // p0: 0.459 + (-1 + 0.00949) = -0.53151; p = 0.949 + 0.053151 = 1.002151
        // p1: 0.207 + (0 - 0.02023) = 0.18677; p = -2.023 - 0.018677 = -2.041677
        opt.step(&mut p, &grads[1]);
        close(&p, &[1.002151, -2.041677], 1e-6);
        close(
            opt.momentum_buf.as_deref().unwrap(),
            &[-0.53151, 0.18677],
            1e-6,
        );

        // Step 3.
        // p0: -0.478359 + (0 + 0.01002151) = -0.46833749; p = 1.002151 + 0.046833749 = 1.048984749
        // p1: 0.168093 + (2 - 0.02041677) = 2.14767623; p = -2.041677 - 0.214767623 = -2.256444623
        opt.step(&mut p, &grads[2]);
        close(&p, &[1.048_984_7, -2.256_444_6], 1e-6);
    }

    #[test]
    fn without_momentum_keeps_no_buffer() {
        let mut opt = Sgd::new(0.5, 0.0, 0.1);
        let mut p = vec![2.0f32];
        opt.step(&mut p, &[1.0]);
        // d = 1 + 0.2 = 1.2; p = 2 - 0.6
        close(&p, &[1.4], 1e-7);
        assert!(opt.momentum_buf.is_none());
    }

    /// Same results as libtorch's own SGD (what torch.optim.SGD runs).
    #[test]
    fn matches_libtorch_sgd() {
        let (lr, mu, wd) = (0.05f32, 0.9f32, 1e-3f32);
        let n = 1000;
        tch::manual_seed(11);
        let init = Tensor::randn([n], (Kind::Float, Device::Cpu));
        let grads: Vec<Tensor> = (0..3)
            .map(|_| Tensor::randn([n], (Kind::Float, Device::Cpu)))
            .collect();

        let vs = tch::nn::VarStore::new(Device::Cpu);
        let p = vs.root().var_copy("p", &init);
        let mut torch_opt = tch::nn::sgd(f64::from(mu), 0.0, f64::from(wd), false)
            .build(&vs, f64::from(lr))
            .unwrap();

        let mut ours = Vec::<f32>::try_from(&init).unwrap();
        let mut opt = Sgd::new(lr, mu, wd);
        for g in &grads {
            torch_opt.zero_grad();
            // d/dp of sum(p * g) is g.
            (&p * g).sum(Kind::Float).backward();
            torch_opt.step();
            opt.step(&mut ours, &Vec::<f32>::try_from(g).unwrap());
        }
        let theirs = Vec::<f32>::try_from(&p.detach()).unwrap();
        close(&ours, &theirs, 1e-6);
    }
}
