//! The learning rate of each step: a linear warm-up, then constant, step
//! decay (torch.optim.lr_scheduler.StepLR) or half a cosine
//! (CosineAnnealingLR over the steps after the warm-up), computed in closed
//! form from the step index so a resumed job picks up the same curve.

use ringtrain_common::jobspec::{ScheduleKind, ScheduleSpec};

/// The job's learning-rate schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    kind: ScheduleKind,
    base_lr: f64,
    warmup_steps: u64,
    step_size: u64,
    gamma: f64,
    min_lr: f64,
    total_steps: u64,
}

impl Schedule {
    /// `total_steps`: the job's step count (for cosine).
    pub fn new(spec: &ScheduleSpec, base_lr: f64, total_steps: u64) -> Self {
        Self {
            kind: spec.kind,
            base_lr,
            warmup_steps: spec.warmup_steps,
            // The spec checks step_size > 0 for step decay; never divide by 0.
            step_size: spec.step_size.max(1),
            gamma: if spec.gamma == 0.0 { 0.1 } else { spec.gamma },
            min_lr: spec.min_lr,
            total_steps,
        }
    }

    /// The learning rate of the step with 0-based index `step` (the
    /// parameter version before it).
    ///
    /// Warm-up: `lr * (step + 1) / warmup_steps` for `step < warmup_steps`
    /// (the last warm-up step reaches lr); after it, with `s = step -
    /// warmup_steps`: constant `lr`; step `lr * gamma^(s / step_size)`
    /// (integer division); cosine `min_lr + (lr - min_lr) * (1 + cos(pi *
    /// p)) / 2` with `p = s / max(1, total_steps - warmup_steps)` clamped to
    /// [0, 1] (so the job's last step is just above min_lr, and steps past
    /// the total stay at min_lr).
    pub fn lr(&self, step: u64) -> f64 {
        let lr = self.base_lr;
        if step < self.warmup_steps {
            return lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let s = step - self.warmup_steps;
        match self.kind {
            ScheduleKind::Constant => lr,
            ScheduleKind::Step => lr * self.gamma.powf((s / self.step_size) as f64),
            ScheduleKind::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
                let p = (s as f64 / span as f64).clamp(0.0, 1.0);
                self.min_lr + (lr - self.min_lr) * (1.0 + (std::f64::consts::PI * p).cos()) / 2.0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: ScheduleKind, warmup_steps: u64, total: u64) -> Schedule {
        let spec = ScheduleSpec {
            kind,
            warmup_steps,
            step_size: 10,
            gamma: 0.5,
            min_lr: 0.01,
        };
        Schedule::new(&spec, 0.1, total)
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() <= 1e-12 * b.abs().max(1e-3), "{a} vs {b}");
    }

    #[test]
    fn constant_with_and_without_warmup() {
        let s = schedule(ScheduleKind::Constant, 0, 100);
        for step in [0, 1, 99, 100, 1_000_000] {
            assert_eq!(s.lr(step), 0.1);
        }
        let s = schedule(ScheduleKind::Constant, 4, 100);
        let lrs: Vec<f64> = (0..6).map(|i| s.lr(i)).collect();
        for (a, b) in lrs.iter().zip([0.025, 0.05, 0.075, 0.1, 0.1, 0.1]) {
            close(*a, b);
        }
        assert_eq!(s.lr(3), 0.1, "the last warm-up step reaches lr");
    }

    #[test]
    fn step_decay_at_the_boundaries() {
        let s = schedule(ScheduleKind::Step, 0, 100);
        assert_eq!(s.lr(0), 0.1);
        assert_eq!(s.lr(9), 0.1);
        close(s.lr(10), 0.05);
        close(s.lr(19), 0.05);
        close(s.lr(20), 0.025);
        close(s.lr(35), 0.0125);
        // After a warm-up the decay counts from its end.
        let s = schedule(ScheduleKind::Step, 5, 100);
        close(s.lr(0), 0.02);
        assert_eq!(s.lr(5), 0.1);
        assert_eq!(s.lr(14), 0.1);
        close(s.lr(15), 0.05);
        // gamma 0 means StepLR's default 0.1.
        let spec = ScheduleSpec {
            kind: ScheduleKind::Step,
            step_size: 2,
            ..ScheduleSpec::default()
        };
        let s = Schedule::new(&spec, 1.0, 10);
        assert_eq!((s.lr(1), s.lr(2)), (1.0, 0.1));
        close(s.lr(4), 0.01);
    }

    #[test]
    fn cosine_start_middle_end_and_min_lr() {
        let s = schedule(ScheduleKind::Cosine, 0, 100);
        close(s.lr(0), 0.1);
        close(s.lr(50), 0.055); // halfway: (lr + min_lr) / 2
        close(s.lr(25), 0.01 + 0.09 * (1.0 + 0.5f64.sqrt()) / 2.0);
        // The last step is just above min_lr; from the total on it is min_lr.
        let last = s.lr(99);
        assert!(last > 0.01 && last < 0.0101, "{last}");
        close(
            last,
            0.01 + 0.09 * (1.0 + (std::f64::consts::PI * 0.99).cos()) / 2.0,
        );
        assert_eq!(s.lr(100), 0.01);
        assert_eq!(s.lr(500), 0.01);
        // Decreasing throughout.
        assert!((1..100).all(|i| s.lr(i) < s.lr(i - 1)));

        // With a warm-up the cosine spans the steps after it.
        let s = schedule(ScheduleKind::Cosine, 10, 110);
        close(s.lr(0), 0.01);
        close(s.lr(4), 0.05);
        assert_eq!(s.lr(9), 0.1);
        close(s.lr(10), 0.1);
        close(s.lr(60), 0.055);
        assert_eq!(s.lr(110), 0.01);

        // min_lr 0, and a warm-up as long as the job: no division by zero.
        let spec = ScheduleSpec {
            kind: ScheduleKind::Cosine,
            ..ScheduleSpec::default()
        };
        let s = Schedule::new(&spec, 1.0, 4);
        close(s.lr(2), 0.5);
        assert_eq!(s.lr(4), 0.0);
        let s = schedule(ScheduleKind::Cosine, 10, 10);
        assert_eq!(s.lr(9), 0.1);
        close(s.lr(10), 0.1);
        assert_eq!(s.lr(11), 0.01);
    }
}
