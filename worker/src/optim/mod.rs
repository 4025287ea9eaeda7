//! Optimizers and learning-rate schedules on flat f32 parameter vectors,
//! with PyTorch's semantics so runs are comparable with the reference:
//! [`Sgd`] (torch.optim.SGD), [`AdamW`] (torch.optim.AdamW), gradient
//! clipping ([`clip_grad_norm`], torch.nn.utils.clip_grad_norm_) and the
//! job's learning-rate [`Schedule`].
//!
//! The learning rate comes with each step (from the schedule), and so does
//! the step count `t` (the parameter version after the step), so an
//! optimizer's state is only its buffers: [`Optimizer::state`] names them
//! for checkpoints and the sync broadcast, and [`Optimizer::set_state`]
//! installs them again; a resumed job then continues bit for bit.

mod adamw;
mod schedule;
mod sgd;

use ringtrain_common::jobspec::{OptimizerKind, OptimizerSpec};

pub use adamw::AdamW;
pub use schedule::Schedule;
pub use sgd::Sgd;

/// A state buffer that does not fit the optimizer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptimError {
    #[error("optimizer state {name:?} is unknown to this optimizer (it keeps {known:?})")]
    UnknownState {
        name: String,
        known: &'static [&'static str],
    },
    #[error("optimizer state {name:?} has {got} values, the model has {want} parameters")]
    WrongLength {
        name: String,
        got: usize,
        want: usize,
    },
}

/// The job's optimizer.
#[derive(Clone, Debug, PartialEq)]
pub enum Optimizer {
    Sgd(Sgd),
    AdamW(AdamW),
}

impl Optimizer {
    /// For `n` parameters.
    pub fn new(spec: &OptimizerSpec, n: usize) -> Self {
        match spec.kind {
            OptimizerKind::Sgd => Self::Sgd(Sgd::new(
                spec.momentum as f32,
                spec.weight_decay() as f32,
                spec.nesterov,
                n,
            )),
            OptimizerKind::Adamw => {
                Self::AdamW(AdamW::new(spec.betas, spec.eps, spec.weight_decay(), n))
            }
        }
    }

    /// One step with learning rate `lr` (from the schedule); `t` is the
    /// number of steps taken including this one (1-based; AdamW's bias
    /// correction uses it; it is the parameter version after the step, so a
    /// resumed job continues exactly).
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f32, t: u64) {
        match self {
            Self::Sgd(o) => o.step(params, grads, lr),
            Self::AdamW(o) => o.step(params, grads, lr, t),
        }
    }

    /// Whether the optimizer holds no state yet (before its first step, or
    /// SGD without momentum): what [`Self::step_range`] needs to know.
    pub fn is_fresh(&self) -> bool {
        self.state().is_empty()
    }

    /// [`Self::step`] on parameters `offset..offset + params.len()` only
    /// (`grads` theirs). Stepping disjoint ranges that together cover every
    /// parameter, in any order, gives exactly what one step gives: every
    /// operation is elementwise. `fresh`: what [`Self::is_fresh`] said
    /// before the step's first range.
    pub fn step_range(
        &mut self,
        params: &mut [f32],
        grads: &[f32],
        offset: usize,
        lr: f32,
        t: u64,
        fresh: bool,
    ) {
        match self {
            Self::Sgd(o) => o.step_range(params, grads, offset, lr, fresh),
            Self::AdamW(o) => o.step_range(params, grads, offset, lr, t),
        }
    }

    /// A copy of every state buffer's values in `range` (to undo a
    /// [`Self::step_range`] with [`Self::restore_range`]).
    pub fn save_range(&self, range: std::ops::Range<usize>) -> Vec<Vec<f32>> {
        self.state()
            .iter()
            .map(|(_, b)| b[range.clone()].to_vec())
            .collect()
    }

    /// Puts back what [`Self::save_range`] saved at `offset`; with
    /// `fresh`, the optimizer goes back to holding no state at all.
    pub fn restore_range(&mut self, offset: usize, saved: &[Vec<f32>], fresh: bool) {
        if fresh {
            self.clear_state();
            return;
        }
        let bufs = match self {
            Self::Sgd(o) => o.state_mut(),
            Self::AdamW(o) => o.state_mut(),
        };
        for (buf, values) in bufs.into_iter().zip(saved) {
            buf[offset..offset + values.len()].copy_from_slice(values);
        }
    }

    /// The state buffers by name: SGD with momentum `[("momentum", buf)]`,
    /// AdamW `[("exp_avg", m), ("exp_avg_sq", v)]`; empty before the first
    /// step (PyTorch creates them lazily) and for SGD without momentum.
    pub fn state(&self) -> Vec<(&'static str, &[f32])> {
        match self {
            Self::Sgd(o) => o.state(),
            Self::AdamW(o) => o.state(),
        }
    }

    /// The names [`Self::state`] uses once there is state.
    pub fn state_names(&self) -> &'static [&'static str] {
        match self {
            Self::Sgd(o) => o.state_names(),
            Self::AdamW(_) => AdamW::STATE_NAMES,
        }
    }

    /// Installs one state buffer (from a checkpoint or a peer); an unknown
    /// name or a wrong length is an error.
    pub fn set_state(&mut self, name: &str, values: Vec<f32>) -> Result<(), OptimError> {
        match self {
            Self::Sgd(o) => o.set_state(name, values),
            Self::AdamW(o) => o.set_state(name, values),
        }
    }

    /// Drops all state (as before the first step).
    pub fn clear_state(&mut self) {
        match self {
            Self::Sgd(o) => o.clear_state(),
            Self::AdamW(o) => o.clear_state(),
        }
    }
}

/// Checks a buffer for [`Optimizer::set_state`]: `name` must be one of
/// `known` and `values` must hold `n` numbers.
fn check_state(
    name: &str,
    values: &[f32],
    known: &'static [&'static str],
    n: usize,
) -> Result<(), OptimError> {
    if !known.contains(&name) {
        return Err(OptimError::UnknownState {
            name: name.to_owned(),
            known,
        });
    }
    if values.len() != n {
        return Err(OptimError::WrongLength {
            name: name.to_owned(),
            got: values.len(),
            want: n,
        });
    }
    Ok(())
}

/// Scales `grads` in place so their global L2 norm is at most `max_norm`
/// (torch.nn.utils.clip_grad_norm_: coefficient `max_norm / (norm + 1e-6)`,
/// applied only when < 1); returns the norm before clipping.
///
/// The sum of squares is accumulated in f64 (in eight lanes, so it
/// vectorises and does not depend on the thread count), which is at least
/// as accurate as PyTorch's f32 reduction; the coefficient and the scaling
/// are f32 as in PyTorch.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f32) -> f32 {
    let norm = l2_norm(grads);
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g *= coef;
        }
    }
    norm
}

/// True when every value is finite (no NaN, no ±Inf). Checked on the
/// all-reduced gradient, which every replica holds bit for bit alike, so
/// every replica gets the same answer.
pub fn all_finite(x: &[f32]) -> bool {
    // NaN and ±Inf are the values whose exponent bits are all set. A
    // branch-free OR over a block vectorizes; blocks still end the scan
    // early once one is found.
    const EXPONENT: u32 = 0x7f80_0000;
    x.chunks(4096).all(|block| {
        block.iter().fold(0u32, |seen, v| {
            seen | u32::from(v.to_bits() & EXPONENT == EXPONENT)
        }) == 0
    })
}

/// The L2 norm of `x`, summed in f64.
fn l2_norm(x: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut acc = [0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            let v = f64::from(v);
            *a += v * v;
        }
    }
    for (a, &v) in acc.iter_mut().zip(rest) {
        let v = f64::from(v);
        *a += v * v;
    }
    acc.iter().sum::<f64>().sqrt() as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringtrain_common::jobspec::JobSpec;

    /// Stepping disjoint ranges in any order (as overlapped steps do, piece
    /// by piece) equals one whole step, bit for bit, for every optimizer
    /// setting, from a fresh state and from a warm one; and a saved range
    /// restores exactly.
    #[test]
    fn stepping_ranges_in_any_order_equals_one_whole_step() {
        let n = 1000;
        let spec = |kv: &[&str]| {
            let base =
                "name = \"t\"\nmodel = \"mlp\"\nbatch_size = 8\nworkers = 1\nmax_steps = 1\n[dataset]\nformat = \"idx\"\npath = \"/x\"\n[optimizer]\nlr = 0.05\n";
            let kv: Vec<String> = kv.iter().map(|s| s.to_string()).collect();
            JobSpec::parse(base, &kv).expect("spec").optimizer
        };
        let settings = [
            spec(&["optimizer.kind=sgd", "optimizer.momentum=0"]),
            spec(&[
                "optimizer.kind=sgd",
                "optimizer.momentum=0.9",
                "optimizer.weight_decay=0.01",
            ]),
            spec(&[
                "optimizer.kind=sgd",
                "optimizer.momentum=0.9",
                "optimizer.nesterov=true",
            ]),
            spec(&["optimizer.kind=adamw", "optimizer.weight_decay=0.1"]),
        ];
        let grads = |seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 31 + seed * 7) % 23) as f32 * 0.1 - 1.1)
                .collect()
        };
        let ranges = [600..1000, 0..17, 17..600];
        for setting in &settings {
            let mut whole = Optimizer::new(setting, n);
            let mut pieces = whole.clone();
            let mut p_whole: Vec<f32> = (0..n).map(|i| (i % 9) as f32 * 0.3).collect();
            let mut p_pieces = p_whole.clone();
            for t in 1..=3u64 {
                let g = grads(t as usize);
                whole.step(&mut p_whole, &g, 0.05, t);
                let fresh = pieces.is_fresh();
                for r in ranges.clone() {
                    if t == 2 && r.start == 17 {
                        // Saved and restored: nothing changes.
                        let saved = pieces.save_range(r.clone());
                        let before = p_pieces[r.clone()].to_vec();
                        pieces.step_range(
                            &mut p_pieces[r.clone()],
                            &g[r.clone()],
                            r.start,
                            0.05,
                            t,
                            fresh,
                        );
                        p_pieces[r.clone()].copy_from_slice(&before);
                        pieces.restore_range(r.start, &saved, fresh);
                    }
                    pieces.step_range(
                        &mut p_pieces[r.clone()],
                        &g[r.clone()],
                        r.start,
                        0.05,
                        t,
                        fresh,
                    );
                }
                assert!(p_pieces == p_whole, "{setting:?} step {t}");
                assert!(pieces == whole, "{setting:?} step {t}: state");
            }
        }
    }

    #[test]
    fn all_finite_sees_every_nan_and_inf_and_nothing_else() {
        let mut x = vec![1.5f32; 10_000];
        x[17] = f32::MAX;
        x[18] = f32::MIN_POSITIVE / 2.0; // subnormal: finite
        x[19] = -0.0;
        assert!(all_finite(&x));
        assert!(all_finite(&[]));
        for bad in [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, 4095, 4096, 9_999] {
                let mut y = x.clone();
                y[at] = bad;
                assert!(!all_finite(&y), "{bad} at {at}");
            }
        }
    }

    /// A spec as the job file's `[optimizer]` gives it, with its defaults.
    fn spec(kind: OptimizerKind, momentum: f64) -> OptimizerSpec {
        OptimizerSpec {
            kind,
            lr: 0.1,
            momentum,
            weight_decay: None,
            nesterov: false,
            betas: [0.9, 0.999],
            eps: 1e-8,
            clip_grad_norm: 0.0,
        }
    }

    #[test]
    fn builds_the_spec_kind_with_its_state_names() {
        let sgd = Optimizer::new(&spec(OptimizerKind::Sgd, 0.9), 3);
        assert!(matches!(&sgd, Optimizer::Sgd(s) if s.momentum == 0.9 && s.weight_decay == 0.0));
        assert_eq!(sgd.state_names(), ["momentum"]);
        let plain = Optimizer::new(&spec(OptimizerKind::Sgd, 0.0), 3);
        assert!(plain.state_names().is_empty());
        let adamw = Optimizer::new(&spec(OptimizerKind::Adamw, 0.0), 3);
        // torch.optim.AdamW's defaults.
        assert!(matches!(&adamw, Optimizer::AdamW(a)
            if a.betas == [0.9, 0.999] && a.eps == 1e-8 && a.weight_decay == 0.01));
        assert_eq!(adamw.state_names(), ["exp_avg", "exp_avg_sq"]);
    }

    #[test]
    fn state_is_empty_until_the_first_step_and_after_clear() {
        for (kind, momentum) in [(OptimizerKind::Sgd, 0.9), (OptimizerKind::Adamw, 0.0)] {
            let mut opt = Optimizer::new(&spec(kind, momentum), 2);
            assert!(opt.state().is_empty());
            let mut p = vec![1.0, 2.0];
            opt.step(&mut p, &[0.5, -0.5], 0.1, 1);
            let names: Vec<_> = opt.state().iter().map(|(n, _)| *n).collect();
            assert_eq!(names, opt.state_names(), "{kind:?}");
            assert!(opt.state().iter().all(|(_, b)| b.len() == 2));
            opt.clear_state();
            assert!(opt.state().is_empty());
        }
        // SGD without momentum never has state.
        let mut opt = Optimizer::new(&spec(OptimizerKind::Sgd, 0.0), 1);
        opt.step(&mut [1.0], &[1.0], 0.1, 1);
        assert!(opt.state().is_empty());
    }

    #[test]
    fn set_state_rejects_unknown_names_and_wrong_lengths() {
        let mut adamw = Optimizer::new(&spec(OptimizerKind::Adamw, 0.0), 3);
        let e = adamw.set_state("momentum", vec![0.0; 3]).unwrap_err();
        assert_eq!(
            e,
            OptimError::UnknownState {
                name: "momentum".into(),
                known: &["exp_avg", "exp_avg_sq"]
            }
        );
        assert_eq!(
            e.to_string(),
            "optimizer state \"momentum\" is unknown to this optimizer (it keeps [\"exp_avg\", \"exp_avg_sq\"])"
        );
        let e = adamw.set_state("exp_avg_sq", vec![0.0; 4]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "optimizer state \"exp_avg_sq\" has 4 values, the model has 3 parameters"
        );
        assert!(adamw.state().is_empty(), "a rejected buffer is not kept");
        adamw.set_state("exp_avg", vec![1.0; 3]).unwrap();
        assert_eq!(adamw.state(), [("exp_avg", &[1.0f32; 3][..])]);

        let mut sgd = Optimizer::new(&spec(OptimizerKind::Sgd, 0.5), 2);
        assert!(matches!(
            sgd.set_state("exp_avg", vec![0.0; 2]),
            Err(OptimError::UnknownState { .. })
        ));
        assert!(matches!(
            sgd.set_state("momentum", vec![0.0; 1]),
            Err(OptimError::WrongLength {
                got: 1,
                want: 2,
                ..
            })
        ));
        sgd.set_state("momentum", vec![0.25, 0.5]).unwrap();
        assert_eq!(sgd.state(), [("momentum", &[0.25f32, 0.5][..])]);
        // Without momentum SGD keeps nothing, so "momentum" is unknown too.
        let mut plain = Optimizer::new(&spec(OptimizerKind::Sgd, 0.0), 2);
        assert!(matches!(
            plain.set_state("momentum", vec![0.0; 2]),
            Err(OptimError::UnknownState { known: [], .. })
        ));
    }

    #[test]
    fn clip_grad_norm_by_hand() {
        // |(3, 4)| = 5; max 1: coef = 1 / (5 + 1e-6).
        let mut g = vec![3.0f32, 4.0];
        assert_eq!(clip_grad_norm(&mut g, 1.0), 5.0);
        let coef = 1.0f32 / (5.0 + 1e-6);
        assert_eq!(g, [3.0 * coef, 4.0 * coef]);
        assert!((l2_norm(&g) - 1.0).abs() < 1e-6);

        // Below the max nothing changes (coef >= 1), not even by rounding;
        // exactly at it the 1e-6 makes coef just below 1, as in PyTorch.
        let mut g = vec![3.0f32, 4.0];
        assert_eq!(clip_grad_norm(&mut g, 5.00001), 5.0);
        assert_eq!(g, [3.0, 4.0]);
        assert_eq!(clip_grad_norm(&mut g, 5.0), 5.0);
        let coef = 5.0f32 / (5.0 + 1e-6);
        assert!(coef < 1.0);
        assert_eq!(g, [3.0 * coef, 4.0 * coef]);
        let mut g = vec![0.1f32, -0.2, 0.3];
        let before = g.clone();
        clip_grad_norm(&mut g, 100.0);
        assert_eq!(g, before);

        // Zero gradients stay zero; the norm over many values (tail included).
        let mut z = vec![0.0f32; 5];
        assert_eq!(clip_grad_norm(&mut z, 1.0), 0.0);
        assert_eq!(z, [0.0; 5]);
        let mut ones = vec![1.0f32; 1027];
        let norm = clip_grad_norm(&mut ones, 0.5);
        assert!((norm - 1027f32.sqrt()).abs() < 1e-5);
        assert!((l2_norm(&ones) - 0.5).abs() < 1e-6);
        assert!(ones.iter().all(|&v| v == ones[0]));
    }

    /// The same scaling as torch.nn.utils.clip_grad_norm_ (libtorch's
    /// norm; its f32 reduction and our f64 one agree to rounding).
    #[test]
    fn clip_grad_norm_matches_torch() {
        use tch::{Device, Kind, Tensor};
        tch::manual_seed(5);
        for (scale, max_norm) in [(1.0, 3.0f32), (0.01, 3.0), (10.0, 0.5)] {
            let t = Tensor::randn([10_001], (Kind::Float, Device::Cpu)) * scale;
            let theirs_norm = t.norm().double_value(&[]) as f32;
            let coef = (Tensor::from(max_norm) / (t.norm() + 1e-6)).clamp_max(1.0);
            let theirs = Vec::<f32>::try_from(&t * coef).unwrap();
            let mut ours = Vec::<f32>::try_from(&t).unwrap();
            let norm = clip_grad_norm(&mut ours, max_norm);
            assert!(
                (norm - theirs_norm).abs() <= 1e-6 * theirs_norm,
                "{norm} vs {theirs_norm}"
            );
            let max = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in ours.iter().zip(&theirs) {
                assert!((a - b).abs() <= 1e-6 * max, "{a} vs {b}");
            }
        }
    }
}
