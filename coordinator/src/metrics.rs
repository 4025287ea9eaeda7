//! The coordinator's Prometheus metrics: each [`Observation`] a change of
//! state makes, counted under its metric names (the names users' dashboards
//! rely on live here and nowhere else).

use ringtrain_common::metrics::Metrics;

use crate::state::Observation;

pub fn record(m: &Metrics, observation: &Observation) {
    match observation {
        Observation::StepCompleted {
            job,
            samples,
            loss,
            samples_per_s,
            generation,
            workers,
        } => {
            let id = job.to_string();
            let l = [("job", id.as_str())];
            m.inc(
                "ringtrain_job_steps_total",
                "Steps completed by every replica.",
                &l,
                1.0,
            );
            m.inc(
                "ringtrain_job_samples_total",
                "Training samples consumed.",
                &l,
                *samples as f64,
            );
            m.set(
                "ringtrain_job_loss",
                "Mean training loss of the last step.",
                &l,
                *loss,
            );
            m.set(
                "ringtrain_job_samples_per_second",
                "Training throughput of the last step.",
                &l,
                *samples_per_s,
            );
            m.set(
                "ringtrain_job_ring_generation",
                "Current ring generation.",
                &l,
                generation.0 as f64,
            );
            m.set(
                "ringtrain_job_workers",
                "Workers in the job's ring.",
                &l,
                *workers as f64,
            );
        }
        Observation::Evaluated {
            job,
            accuracy,
            loss,
        } => {
            let id = job.to_string();
            let l = [("job", id.as_str())];
            m.set(
                "ringtrain_job_test_accuracy",
                "Test accuracy of the last evaluation.",
                &l,
                *accuracy,
            );
            m.set(
                "ringtrain_job_test_loss",
                "Test loss of the last evaluation.",
                &l,
                *loss,
            );
        }
        Observation::Census {
            workers_alive,
            jobs,
        } => {
            m.set(
                "ringtrain_workers_alive",
                "Workers heartbeating.",
                &[],
                *workers_alive as f64,
            );
            for (state, n) in jobs {
                m.set(
                    "ringtrain_jobs",
                    "Jobs by state.",
                    &[("state", state.as_str())],
                    *n as f64,
                );
            }
        }
    }
}
