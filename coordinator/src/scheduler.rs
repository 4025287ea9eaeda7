//! Scheduling decisions as pure functions of the state and `now`, so they
//! are tested without sockets or sleeps. The service applies them.

use std::time::{Duration, Instant};

use ringtrain_common::{JobId, WorkerId};

use crate::state::{JobState, State};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The worker has not heartbeaten within the timeout.
    WorkerLost { worker: WorkerId },
    /// Form a ring for a pending job from these idle workers (rank order).
    Start { job: JobId, members: Vec<WorkerId> },
}

/// Decides what to do now. Lost workers first, so a job never starts on a
/// worker that is already gone.
pub fn decide(now: Instant, state: &State, worker_timeout: Duration) -> Vec<Decision> {
    let mut out = Vec::new();
    let lost: Vec<WorkerId> = state
        .workers
        .values()
        .filter(|w| w.alive && now.saturating_duration_since(w.last_heartbeat) > worker_timeout)
        .map(|w| w.id)
        .collect();
    out.extend(lost.iter().map(|&worker| Decision::WorkerLost { worker }));

    let mut idle: Vec<WorkerId> = state
        .workers
        .values()
        .filter(|w| w.alive && w.job.is_none() && !lost.contains(&w.id))
        .map(|w| w.id)
        .collect();
    for id in &state.queue {
        let Some(job) = state.jobs.get(id) else {
            continue;
        };
        if job.state != JobState::Pending {
            continue;
        }
        let wanted = job.spec.workers;
        if idle.len() < wanted {
            // Strict FIFO: a big job at the head is not starved by small ones.
            break;
        }
        let members: Vec<WorkerId> = idle.drain(..wanted).collect();
        out.push(Decision::Start { job: *id, members });
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use ringtrain_common::jobspec::JobSpec;
    use ringtrain_common::RingGeneration;
    use tokio::sync::broadcast;

    use super::*;
    use crate::state::{Job, Worker};

    fn spec(workers: usize) -> JobSpec {
        JobSpec::parse(
            r#"name = "t"
model = "mlp"
batch_size = 8
workers = 1
max_steps = 5
[dataset]
format = "idx"
path = "/data"
[optimizer]
kind = "sgd"
lr = 0.1
"#,
            &[format!("workers={workers}")],
        )
        .unwrap()
    }

    fn add_job(st: &mut State, id: u64, workers: usize) {
        let (events, _) = broadcast::channel(4);
        let spec = spec(workers);
        st.jobs.insert(
            JobId(id),
            Job {
                id: JobId(id),
                spec_toml: spec.to_toml(),
                spec,
                resume_from: String::new(),
                start_version: 0,
                checkpoint_dir: String::new(),
                state: JobState::Pending,
                error: String::new(),
                submitted: SystemTime::now(),
                members: vec![],
                generation: RingGeneration(0),
                step: 0,
                total_steps: 0,
                epoch: 0,
                loss: f64::NAN,
                samples_per_s: 0.0,
                eval: None,
                tallies: Default::default(),
                finished: Default::default(),
                events,
            },
        );
        st.queue.push(JobId(id));
    }

    fn add_worker(st: &mut State, id: u64, last: Instant) {
        st.workers.insert(
            WorkerId(id),
            Worker {
                id: WorkerId(id),
                grpc_addr: format!("w{id}"),
                ring_addr: format!("w{id}"),
                last_heartbeat: last,
                alive: true,
                job: None,
                last_step: 0,
                samples_per_s: 0.0,
            },
        );
    }

    #[test]
    fn a_job_starts_once_enough_workers_are_idle() {
        let now = Instant::now();
        let mut st = State::default();
        add_job(&mut st, 1, 3);
        add_worker(&mut st, 1, now);
        add_worker(&mut st, 2, now);
        assert_eq!(decide(now, &st, Duration::from_secs(3)), vec![]);
        add_worker(&mut st, 3, now);
        assert_eq!(
            decide(now, &st, Duration::from_secs(3)),
            vec![Decision::Start {
                job: JobId(1),
                members: vec![WorkerId(1), WorkerId(2), WorkerId(3)]
            }]
        );
    }

    #[test]
    fn silent_workers_are_lost_and_not_scheduled() {
        let start = Instant::now();
        let now = start + Duration::from_secs(10);
        let mut st = State::default();
        add_job(&mut st, 1, 2);
        add_worker(&mut st, 1, start); // silent for 10 s
        add_worker(&mut st, 2, now);
        add_worker(&mut st, 3, now);
        assert_eq!(
            decide(now, &st, Duration::from_secs(3)),
            vec![
                Decision::WorkerLost {
                    worker: WorkerId(1)
                },
                Decision::Start {
                    job: JobId(1),
                    members: vec![WorkerId(2), WorkerId(3)]
                }
            ]
        );
    }

    #[test]
    fn jobs_start_in_submission_order() {
        let now = Instant::now();
        let mut st = State::default();
        add_job(&mut st, 1, 2);
        add_job(&mut st, 2, 1);
        add_worker(&mut st, 1, now);
        // Job 1 needs two workers; job 2 must wait behind it.
        assert_eq!(decide(now, &st, Duration::from_secs(3)), vec![]);
    }
}
