//! The worker's Prometheus metrics of training steps (names users'
//! dashboards rely on).

use ringtrain_common::metrics::{Metrics, Phase};
use ringtrain_common::worker_api::Assignment;

/// What one step measured.
pub struct StepFigures {
    pub samples: usize,
    pub loss: f64,
    pub version: u64,
    pub data_s: f64,
    pub forward_backward_s: f64,
    pub allreduce_s: f64,
    /// Of `allreduce_s`, the time the ring receiver waited on its neighbour.
    pub ring_wait_s: f64,
    pub optimizer_s: f64,
    pub step_s: f64,
    pub allreduce_bytes: usize,
    pub lr: f64,
    /// The reduced gradient was not finite and the step was skipped.
    pub skipped_nonfinite: bool,
}

pub struct Recorder {
    metrics: Metrics,
    job: String,
    generation: f64,
}

impl Recorder {
    pub fn new(metrics: &Metrics, a: &Assignment) -> Self {
        Self {
            metrics: metrics.clone(),
            job: a.job.to_string(),
            generation: a.generation.0 as f64,
        }
    }

    pub fn step(&self, f: &StepFigures) {
        let m = &self.metrics;
        m.observe_step(f.step_s);
        m.observe_phase(Phase::Data, f.data_s);
        m.observe_phase(Phase::ForwardBackward, f.forward_backward_s);
        m.observe_phase(Phase::Allreduce, f.allreduce_s);
        m.observe_phase(Phase::Optimizer, f.optimizer_s);
        m.observe_ring_wait(f.ring_wait_s);
        let l = [("job", self.job.as_str())];
        m.inc(
            "ringtrain_worker_steps_total",
            "Training steps taken.",
            &l,
            1.0,
        );
        if f.skipped_nonfinite {
            m.inc(
                "ringtrain_worker_steps_skipped_total",
                "Training steps skipped on every replica for a non-finite (NaN or Inf) reduced gradient (on_nonfinite = \"skip_step\"); their samples count as processed.",
                &l,
                1.0,
            );
        }
        m.inc(
            "ringtrain_worker_samples_total",
            "Training samples processed by this worker.",
            &l,
            f.samples as f64,
        );
        m.inc(
            "ringtrain_allreduce_seconds_total",
            "Seconds spent in ring all-reduce.",
            &l,
            f.allreduce_s,
        );
        m.inc(
            "ringtrain_allreduce_bytes_total",
            "Gradient (and buffer) bytes all-reduced: trained parameters only, frozen ones stay out.",
            &l,
            f.allreduce_bytes as f64,
        );
        m.inc(
            "ringtrain_forward_backward_seconds_total",
            "Seconds in forward and backward passes.",
            &l,
            f.forward_backward_s,
        );
        m.inc(
            "ringtrain_data_seconds_total",
            "Seconds gathering batches.",
            &l,
            f.data_s,
        );
        m.inc(
            "ringtrain_optimizer_seconds_total",
            "Seconds in the optimizer step.",
            &l,
            f.optimizer_s,
        );
        m.set(
            "ringtrain_worker_loss",
            "Training loss of the last local batch.",
            &l,
            f.loss,
        );
        m.set(
            "ringtrain_worker_learning_rate",
            "Learning rate of the last step.",
            &l,
            f.lr,
        );
        m.set(
            "ringtrain_worker_param_version",
            "Parameter version held.",
            &l,
            f.version as f64,
        );
        m.set(
            "ringtrain_ring_generation",
            "Ring generation this worker is in.",
            &l,
            self.generation,
        );
        if f.step_s > 0.0 {
            m.set(
                "ringtrain_worker_samples_per_second",
                "Samples per second of the last step.",
                &l,
                f.samples as f64 / f.step_s,
            );
        }
    }
}
