//! Scheduling decisions as pure functions of the state and `now`, so they
//! are tested without sockets or sleeps. The service applies them.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use ringtrain_common::{JobId, JobState, WorkerId};

use crate::state::{Job, State};

#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// A worker silent this long is lost.
    pub worker: Duration,
    /// A worker named by a ring failure and silent this long since is lost:
    /// a dead neighbour is confirmed in a few heartbeat intervals, not the
    /// full timeout.
    pub suspect: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The worker has not heartbeaten within the timeout.
    WorkerLost { worker: WorkerId },
    /// Form the first ring of a pending job from these idle workers (rank order).
    Start { job: JobId, members: Vec<WorkerId> },
    /// Form a new ring generation now (members lost, ring failed, or resuming).
    Reform { job: JobId, members: Vec<WorkerId> },
    /// Too few live workers: pause, keeping the survivors.
    Pause {
        job: JobId,
        survivors: Vec<WorkerId>,
    },
    /// Idle workers can join: let the members stop at the next step boundary.
    Drain { job: JobId, joiners: Vec<WorkerId> },
}

fn lost_workers(now: Instant, st: &State, t: Timeouts) -> HashSet<WorkerId> {
    let mut lost: HashSet<WorkerId> = st
        .workers
        .values()
        .filter(|w| {
            w.alive && (w.replaced || now.saturating_duration_since(w.last_heartbeat) > t.worker)
        })
        .map(|w| w.id)
        .collect();
    for job in st.jobs.values() {
        for (&id, &since) in &job.suspects {
            let Some(w) = st.workers.get(&id) else {
                continue;
            };
            if w.alive
                && w.last_heartbeat < since
                && now.saturating_duration_since(since) > t.suspect
            {
                lost.insert(id);
            }
        }
    }
    lost
}

/// True once every suspect of a failed ring is either lost or has
/// heartbeaten since it was named.
fn suspects_resolved(job: &Job, st: &State, lost: &HashSet<WorkerId>) -> bool {
    job.suspects.iter().all(|(id, since)| {
        lost.contains(id)
            || st
                .workers
                .get(id)
                .is_none_or(|w| !w.alive || w.last_heartbeat >= *since)
    })
}

/// Decides what to do now. Lost workers first, so no ring is formed with a
/// worker that is already gone. Jobs are served in submission order.
pub fn decide(now: Instant, st: &State, t: Timeouts) -> Vec<Decision> {
    let mut out = Vec::new();
    let lost = lost_workers(now, st, t);
    let mut lost_sorted: Vec<WorkerId> = lost.iter().copied().collect();
    lost_sorted.sort();
    out.extend(
        lost_sorted
            .iter()
            .map(|&worker| Decision::WorkerLost { worker }),
    );

    let mut idle: Vec<WorkerId> = st
        .workers
        .values()
        .filter(|w| w.alive && w.job.is_none() && !lost.contains(&w.id))
        .map(|w| w.id)
        .collect();
    // Strict FIFO: once a pending job cannot start, idle workers are kept for
    // it (no later job starts or grows with them), so a big job is not starved.
    let mut head_blocked = false;
    for id in &st.queue {
        let Some(job) = st.jobs.get(id) else { continue };
        let (min, max) = (job.spec.min_workers(), job.spec.max_workers());
        match job.state {
            JobState::Pending if head_blocked => {}
            JobState::Pending if idle.len() >= job.spec.workers => {
                let members: Vec<WorkerId> = idle.drain(..job.spec.workers).collect();
                out.push(Decision::Start { job: *id, members });
            }
            JobState::Pending => head_blocked = true,
            JobState::Running | JobState::Waiting => {
                let live: Vec<WorkerId> = job
                    .members
                    .iter()
                    .copied()
                    .filter(|w| !lost.contains(w))
                    .collect();
                let joiners: Vec<WorkerId> = job
                    .drain
                    .iter()
                    .flat_map(|d| d.joiners.iter().copied())
                    .filter(|w| !lost.contains(w))
                    .collect();
                let member_lost = live.len() != job.members.len();
                if job.ring_failed && !member_lost && !suspects_resolved(job, st, &lost) {
                    continue; // wait to learn whether the suspect is dead
                }
                let broken = member_lost || job.ring_failed;
                if broken || job.state == JobState::Waiting {
                    let regrouping = job.regroup_until.is_some_and(|until| now < until);
                    let need = if regrouping { job.spec.workers } else { min };
                    let mut members = live.clone();
                    members.extend(joiners);
                    let room = max.saturating_sub(members.len());
                    let take = room.min(idle.len());
                    let candidates: Vec<WorkerId> = members
                        .iter()
                        .copied()
                        .chain(idle[..take].iter().copied())
                        .collect();
                    if candidates.len() >= need {
                        idle.drain(..take);
                        out.push(Decision::Reform {
                            job: *id,
                            members: candidates,
                        });
                    } else if job.state == JobState::Running || member_lost {
                        out.push(Decision::Pause {
                            job: *id,
                            survivors: live,
                        });
                    }
                } else if !head_blocked
                    && job.drain.is_none()
                    && !idle.is_empty()
                    && job.members.len() < max
                {
                    let take = (max - job.members.len()).min(idle.len());
                    let joiners: Vec<WorkerId> = idle.drain(..take).collect();
                    out.push(Decision::Drain { job: *id, joiners });
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use ringtrain_common::jobspec::JobSpec;

    use super::*;
    use crate::state::{Job, Worker};

    const T: Timeouts = Timeouts {
        worker: Duration::from_secs(3),
        suspect: Duration::from_millis(600),
    };

    fn spec(workers: usize) -> JobSpec {
        JobSpec::parse(
            ringtrain_common::testing::MINIMAL_SPEC,
            &[format!("workers={workers}")],
        )
        .unwrap()
    }

    fn add_job(st: &mut State, id: u64, workers: usize) {
        let job = Job::new(
            JobId(id),
            spec(workers),
            String::new(),
            String::new(),
            SystemTime::now(),
        );
        st.jobs.insert(JobId(id), job);
        st.queue.push(JobId(id));
    }

    /// A running job on `members`, with min/max workers set.
    fn add_running(st: &mut State, id: u64, members: &[u64], min: usize, max: usize) {
        let mut s = spec(members.len());
        s.min_workers = min;
        s.max_workers = max;
        let mut job = Job::new(
            JobId(id),
            s,
            String::new(),
            String::new(),
            SystemTime::now(),
        );
        job.state = JobState::Running;
        job.members = members.iter().map(|&m| WorkerId(m)).collect();
        st.jobs.insert(JobId(id), job);
        st.queue.push(JobId(id));
        for m in members {
            if let Some(w) = st.workers.get_mut(&WorkerId(*m)) {
                w.job = Some(JobId(id));
            }
        }
    }

    fn add_worker(st: &mut State, id: u64, last: Instant) {
        st.workers.insert(
            WorkerId(id),
            Worker {
                id: WorkerId(id),
                replaced: false,
                grpc_addr: format!("w{id}"),
                ring_addr: format!("w{id}"),
                last_heartbeat: last,
                alive: true,
                job: None,
                last_step: Default::default(),
                samples_per_s: 0.0,
            },
        );
    }

    #[test]
    fn a_job_starts_once_enough_workers_are_idle() {
        let now = Instant::now();
        let mut st = State::new(T, Default::default());
        add_job(&mut st, 1, 3);
        add_worker(&mut st, 1, now);
        add_worker(&mut st, 2, now);
        assert_eq!(decide(now, &st, T), vec![]);
        add_worker(&mut st, 3, now);
        assert_eq!(
            decide(now, &st, T),
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
        let mut st = State::new(T, Default::default());
        add_job(&mut st, 1, 2);
        add_worker(&mut st, 1, start); // silent for 10 s
        add_worker(&mut st, 2, now);
        add_worker(&mut st, 3, now);
        assert_eq!(
            decide(now, &st, T),
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
        let mut st = State::new(T, Default::default());
        add_job(&mut st, 1, 2);
        add_job(&mut st, 2, 1);
        add_worker(&mut st, 1, now);
        // Job 1 needs two workers; job 2 must wait behind it.
        assert_eq!(decide(now, &st, T), vec![]);
    }

    fn ids(v: &[u64]) -> Vec<WorkerId> {
        v.iter().map(|&i| WorkerId(i)).collect()
    }

    #[test]
    fn a_lost_member_re_forms_the_ring_from_the_survivors() {
        let start = Instant::now();
        let now = start + Duration::from_secs(5);
        let mut st = State::new(T, Default::default());
        for w in 1..=4 {
            add_worker(&mut st, w, if w == 3 { start } else { now });
        }
        add_running(&mut st, 1, &[1, 2, 3, 4], 1, 4);
        assert_eq!(
            decide(now, &st, T),
            vec![
                Decision::WorkerLost {
                    worker: WorkerId(3)
                },
                Decision::Reform {
                    job: JobId(1),
                    members: ids(&[1, 2, 4])
                }
            ]
        );
    }

    #[test]
    fn a_suspect_named_by_a_ring_failure_is_lost_after_the_short_timeout() {
        let t0 = Instant::now();
        let mut st = State::new(T, Default::default());
        for w in 1..=3 {
            add_worker(&mut st, w, t0);
        }
        add_running(&mut st, 1, &[1, 2, 3], 1, 3);
        let job = st.jobs.get_mut(&JobId(1)).unwrap();
        job.ring_failed = true;
        job.suspects
            .insert(WorkerId(2), t0 + Duration::from_millis(10));
        // Right after the report: wait for the suspect to show it is alive.
        assert_eq!(decide(t0 + Duration::from_millis(100), &st, T), vec![]);
        // The others keep heartbeating; the suspect stays silent past 600 ms.
        let later = t0 + Duration::from_millis(700);
        for w in [1, 3] {
            st.workers.get_mut(&WorkerId(w)).unwrap().last_heartbeat = later;
        }
        assert_eq!(
            decide(later, &st, T),
            vec![
                Decision::WorkerLost {
                    worker: WorkerId(2)
                },
                Decision::Reform {
                    job: JobId(1),
                    members: ids(&[1, 3])
                }
            ]
        );
    }

    #[test]
    fn a_suspect_that_heartbeats_is_kept_and_the_ring_retried() {
        let t0 = Instant::now();
        let mut st = State::new(T, Default::default());
        for w in 1..=2 {
            add_worker(&mut st, w, t0);
        }
        add_running(&mut st, 1, &[1, 2], 1, 2);
        let job = st.jobs.get_mut(&JobId(1)).unwrap();
        job.ring_failed = true;
        job.suspects.insert(WorkerId(2), t0);
        st.workers.get_mut(&WorkerId(2)).unwrap().last_heartbeat = t0 + Duration::from_millis(200);
        assert_eq!(
            decide(t0 + Duration::from_millis(250), &st, T),
            vec![Decision::Reform {
                job: JobId(1),
                members: ids(&[1, 2])
            }]
        );
    }

    #[test]
    fn below_min_workers_the_job_pauses_and_resumes_when_workers_come() {
        let start = Instant::now();
        let now = start + Duration::from_secs(5);
        let mut st = State::new(T, Default::default());
        add_worker(&mut st, 1, now);
        add_worker(&mut st, 2, start);
        add_running(&mut st, 1, &[1, 2], 2, 2);
        assert_eq!(
            decide(now, &st, T),
            vec![
                Decision::WorkerLost {
                    worker: WorkerId(2)
                },
                Decision::Pause {
                    job: JobId(1),
                    survivors: ids(&[1])
                }
            ]
        );
        // Applied: the job waits with its survivor; a new worker arrives.
        st.workers.get_mut(&WorkerId(2)).unwrap().alive = false;
        let job = st.jobs.get_mut(&JobId(1)).unwrap();
        job.state = JobState::Waiting;
        job.members = ids(&[1]);
        assert_eq!(decide(now, &st, T), vec![]);
        add_worker(&mut st, 5, now);
        assert_eq!(
            decide(now, &st, T),
            vec![Decision::Reform {
                job: JobId(1),
                members: ids(&[1, 5])
            }]
        );
    }

    #[test]
    fn idle_workers_join_a_running_job_up_to_max_workers() {
        let now = Instant::now();
        let mut st = State::new(T, Default::default());
        for w in 1..=5 {
            add_worker(&mut st, w, now);
        }
        add_running(&mut st, 1, &[1, 2], 1, 3);
        assert_eq!(
            decide(now, &st, T),
            vec![Decision::Drain {
                job: JobId(1),
                joiners: ids(&[3])
            }]
        );
    }
}
