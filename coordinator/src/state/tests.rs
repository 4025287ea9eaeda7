//! The coordinator's protocol, driven through [`State`]'s methods with a
//! hand-moved clock: no sockets, no sleeps.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use ringtrain_common::jobspec::JobSpec;
use ringtrain_common::worker_api::{
    Assignment, CheckpointReport, EvalReport, FinishReport, Registration, RingFailureReport,
    StepReport,
};
use ringtrain_common::{JobId, JobState, ParamVersion, Rank, RingGeneration, WorkerId};

use super::*;
use crate::scheduler::Timeouts;

pub use ringtrain_common::testing::MINIMAL_SPEC as SPEC;

const T: Timeouts = Timeouts {
    worker: Duration::from_secs(3),
    suspect: Duration::from_millis(600),
};

const JOB: JobId = JobId(0xab);

struct Cluster {
    st: State,
    now: Instant,
}

impl Cluster {
    fn new() -> Self {
        Self {
            st: State::new(T, Counters::default()),
            now: Instant::now(),
        }
    }

    fn advance(&mut self, ms: u64) {
        self.now += Duration::from_millis(ms);
    }

    fn register(&mut self, port: u16) -> (WorkerId, Effects) {
        self.st
            .register_worker(
                self.now,
                Registration {
                    grpc_addr: format!("127.0.0.1:{port}"),
                    ring_addr: format!("127.0.0.1:{}", port + 1),
                    hostname: String::new(),
                    pid: 1,
                },
            )
            .unwrap()
    }

    fn submit(&mut self, sets: &[&str]) -> Effects {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let spec = JobSpec::parse(SPEC, &sets).unwrap();
        self.st.submit(
            self.now,
            JOB,
            spec,
            String::new(),
            "/ckpt".into(),
            SystemTime::now(),
            "alice".into(),
        )
    }

    fn assignment(&mut self, w: WorkerId) -> Option<Assignment> {
        match self.st.heartbeat(self.now, w).0 {
            HeartbeatReply::Assignment(a) => a.map(|a| *a),
            HeartbeatReply::Unknown => panic!("{w} unknown"),
        }
    }

    fn step(&mut self, a: &Assignment, w: WorkerId, v: u64, hash: u64) -> (StepVerdict, Effects) {
        self.try_step(a, w, v, hash).unwrap()
    }

    fn try_step(
        &mut self,
        a: &Assignment,
        w: WorkerId,
        v: u64,
        hash: u64,
    ) -> Result<(StepVerdict, Effects), StateError> {
        self.try_step_skipped(a, w, v, hash, false)
    }

    /// A step report whose step was (or was not) skipped for a non-finite gradient.
    fn step_skipped(
        &mut self,
        a: &Assignment,
        w: WorkerId,
        v: u64,
        hash: u64,
        skipped_nonfinite: bool,
    ) -> (StepVerdict, Effects) {
        self.try_step_skipped(a, w, v, hash, skipped_nonfinite)
            .unwrap()
    }

    fn try_step_skipped(
        &mut self,
        a: &Assignment,
        w: WorkerId,
        v: u64,
        hash: u64,
        skipped_nonfinite: bool,
    ) -> Result<(StepVerdict, Effects), StateError> {
        let r = StepReport {
            worker: w,
            job: a.job,
            generation: a.generation,
            rank: a.rank,
            version: ParamVersion(v),
            param_hash: hash,
            loss: 1.0 + v as f64,
            samples: 8,
            step_seconds: 0.1,
            allreduce_seconds: 0.01,
            epoch: 0,
            total_steps: 5,
            skipped_nonfinite,
            // Rank 1 starts and ends 0.1 s after rank 0.
            started_unix_s: 1000.0 + v as f64 + f64::from(a.rank.0) * 0.1,
            finished_unix_s: 1000.5 + v as f64 + f64::from(a.rank.0) * 0.1,
        };
        self.st.report_step(self.now, &r)
    }

    fn state(&self) -> JobState {
        self.st.snapshot(JOB).unwrap().state
    }

    /// A running two-worker job: the workers and their assignments.
    fn running() -> (Self, [(WorkerId, Assignment); 2]) {
        let mut c = Self::new();
        let (w1, _) = c.register(1000);
        let (w2, _) = c.register(2000);
        c.submit(&[]);
        let a1 = c.assignment(w1).expect("w1 assigned");
        let a2 = c.assignment(w2).expect("w2 assigned");
        (c, [(w1, a1), (w2, a2)])
    }
}

fn kinds(fx: &Effects) -> Vec<EventKind> {
    fx.events.iter().map(|e| e.kind).collect()
}

#[test]
fn a_job_starts_when_enough_workers_register_and_each_learns_its_rank() {
    let mut c = Cluster::new();
    let (w1, fx) = c.register(1000);
    assert_eq!(
        fx.persist,
        vec![PersistOp {
            record: None,
            counters: Counters {
                next_generation: 0,
                next_worker: 1
            },
            durable: true
        }],
        "the worker id counter is on disk before the worker learns its id"
    );
    let fx = c.submit(&[]);
    assert!(fx.persist.iter().all(|p| p.durable) && !fx.persist.is_empty());
    assert_eq!(c.state(), JobState::Pending, "one worker, two wanted");
    let (w2, fx) = c.register(2000);
    assert_eq!(kinds(&fx), [EventKind::State]);
    assert_eq!(
        fx.events[0].message,
        "running: 2 workers (gen 1), global batch 16"
    );
    assert_eq!(c.state(), JobState::Running);
    let a1 = c.assignment(w1).unwrap();
    let a2 = c.assignment(w2).unwrap();
    assert_eq!((a1.rank, a2.rank), (Rank(0), Rank(1)));
    assert_eq!(a1.members, ["127.0.0.1:1001", "127.0.0.1:2001"]);
    assert_eq!(a1.generation, RingGeneration(1));
    assert_eq!(a1.checkpoint_dir, PathBuf::from("/ckpt"));
    assert!(fx.observations.iter().any(|o| matches!(
        o,
        Observation::Census {
            workers_alive: 2,
            ..
        }
    )));
}

#[test]
fn a_version_is_committed_once_every_member_reports_the_same_hash() {
    let (mut c, [(w1, a1), (w2, a2)]) = Cluster::running();
    let (verdict, fx) = c.step(&a1, w1, 1, 0xabc);
    assert_eq!(verdict, StepVerdict::Continue);
    assert!(fx.events.is_empty(), "not committed by one member alone");
    assert_eq!(c.st.snapshot(JOB).unwrap().step, ParamVersion(0));
    let (_, fx) = c.step(&a2, w2, 1, 0xabc);
    assert_eq!(kinds(&fx), [EventKind::Step]);
    let job = c.st.snapshot(JOB).unwrap();
    assert_eq!(job.step, ParamVersion(1));
    assert_eq!(job.loss, 2.0);
    assert_eq!(job.samples_per_s, 160.0, "16 samples in the slowest 0.1 s");
    // The fair clock: the earliest member's start, the latest member's end.
    let (rows, _) = c.st.history(JOB).unwrap();
    assert_eq!(rows.last().and_then(|r| r.wall), Some((1001.0, 1001.6)));
    assert!(matches!(
        fx.observations[..],
        [Observation::StepCompleted { samples: 16, .. }]
    ));
    assert_eq!(fx.persist.len(), 1);
    assert!(!fx.persist[0].durable, "progress is written lazily");
    assert_eq!(c.st.job(JOB).unwrap().history.len(), 1);
}

#[test]
fn a_step_every_member_skipped_is_counted_and_told_to_watchers() {
    let (mut c, [(w1, a1), (w2, a2)]) = Cluster::running();
    c.step(&a1, w1, 1, 7);
    c.step(&a2, w2, 1, 7);
    c.step_skipped(&a1, w1, 2, 7, true);
    let (verdict, fx) = c.step_skipped(&a2, w2, 2, 7, true);
    assert_eq!(verdict, StepVerdict::Continue, "a skipped step is a step");
    assert_eq!(kinds(&fx), [EventKind::Step]);
    assert_eq!(
        fx.events[0].message,
        "step 2 skipped: non-finite gradient (on_nonfinite = \"skip_step\"; its batch counts as consumed)"
    );
    let job = c.st.snapshot(JOB).unwrap();
    assert_eq!((job.step, job.skipped_steps), (ParamVersion(2), 1));
    let record = crate::convert::job_record(c.st.job(JOB).unwrap());
    assert_eq!(record.skipped_steps, 1, "kept across a restart");
}

#[test]
fn replicas_that_diverge_fail_the_job_and_free_the_workers() {
    let (mut c, [(w1, a1), (w2, a2)]) = Cluster::running();
    c.step(&a1, w1, 1, 7);
    c.step(&a2, w2, 1, 7);
    c.step(&a1, w1, 2, 0xabc);
    let (verdict, fx) = c.step(&a2, w2, 2, 0xdef);
    assert_eq!(verdict, StepVerdict::Stop);
    assert_eq!(c.state(), JobState::Failed);
    let error = c.st.snapshot(JOB).unwrap().error;
    assert_eq!(
        error,
        format!(
            "replicas diverged at parameter version 2: worker {w1} has hash 0000000000000abc, worker {w2} (rank 1) has 0000000000000def"
        )
    );
    assert_eq!(kinds(&fx), [EventKind::State]);
    assert!(fx.events[0].job.state.is_terminal());
    assert!(fx.persist.iter().any(|p| p.durable));
    assert_eq!(c.assignment(w1), None, "workers are freed");
    assert_eq!(fx.reports.len(), 1, "the curve is drawn at the end");
}

#[test]
fn reports_from_outside_the_current_generation_change_nothing() {
    let (mut c, [(w1, a1), _]) = Cluster::running();
    let stale = Assignment {
        generation: RingGeneration(0),
        ..a1.clone()
    };
    assert!(matches!(
        c.try_step(&stale, w1, 1, 1),
        Err(StateError::NotMember { .. })
    ));
    assert!(c.st.job(JOB).unwrap().tallies.is_empty(), "nothing tallied");
    let outsider = WorkerId(99);
    let eval = EvalReport {
        worker: outsider,
        job: JOB,
        generation: a1.generation,
        version: ParamVersion(1),
        accuracy: 1.0,
        loss: 0.0,
        samples: 10,
    };
    assert_eq!(
        c.st.report_eval(c.now, &eval).unwrap_err(),
        StateError::NotMember {
            job: JOB,
            worker: outsider,
            generation: a1.generation
        }
    );
    let ckpt = CheckpointReport {
        worker: outsider,
        job: JOB,
        generation: a1.generation,
        version: ParamVersion(1),
        dir: "/elsewhere".into(),
    };
    assert!(c.st.report_checkpoint(c.now, &ckpt).is_err());
    let finish = FinishReport {
        worker: outsider,
        job: JOB,
        generation: a1.generation,
        version: ParamVersion(1),
        error: Some("boom".into()),
    };
    assert!(c.st.report_finish(c.now, &finish).is_err());
    let job = c.st.snapshot(JOB).unwrap();
    assert_eq!((job.state, job.eval), (JobState::Running, None));
    assert_eq!(job.checkpoint_dir, "/ckpt");
    let unknown = EvalReport {
        job: JobId(1),
        ..eval
    };
    assert_eq!(
        c.st.report_eval(c.now, &unknown).unwrap_err(),
        StateError::NoJob(JobId(1))
    );
}

fn eval_report(worker: WorkerId, generation: RingGeneration, accuracy: f64) -> EvalReport {
    EvalReport {
        worker,
        job: JOB,
        generation,
        version: ParamVersion(1),
        accuracy,
        loss: 0.5,
        samples: 100,
    }
}

#[test]
fn an_eval_from_a_non_member_or_a_stale_generation_leaves_the_accuracy() {
    let (mut c, [(w1, a1), _]) = Cluster::running();
    c.st.report_eval(c.now, &eval_report(w1, a1.generation, 0.75))
        .unwrap();
    // (Losses are NaN before the first step: compare what evaluations set.)
    let evals = |c: &Cluster| {
        let h = &c.st.job(JOB).unwrap().history;
        h.iter().map(|r| (r.step, r.eval)).collect::<Vec<_>>()
    };
    let history = evals(&c);
    let outsider = WorkerId(99);
    let e =
        c.st.report_eval(c.now, &eval_report(outsider, a1.generation, 1.0))
            .unwrap_err();
    assert!(matches!(e, StateError::NotMember { .. }));
    let stale = RingGeneration(a1.generation.0 - 1);
    let e =
        c.st.report_eval(c.now, &eval_report(w1, stale, 1.0))
            .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("worker {w1} is not in {stale} of job {JOB}")
    );
    let job = c.st.snapshot(JOB).unwrap();
    assert_eq!(job.eval, Some((0.75, 0.5)));
    assert_eq!(
        evals(&c),
        history,
        "no evaluation reaches the curve from a refused report"
    );
}

#[test]
fn a_checkpoint_from_a_non_member_or_outside_the_jobs_dir_changes_nothing() {
    let (mut c, [(w1, a1), _]) = Cluster::running();
    let ckpt = |worker, generation, dir: &str| CheckpointReport {
        worker,
        job: JOB,
        generation,
        version: ParamVersion(1),
        dir: dir.into(),
    };
    let refusals = [
        ckpt(WorkerId(99), a1.generation, "/ckpt"),
        ckpt(w1, RingGeneration(a1.generation.0 + 1), "/ckpt"),
        ckpt(w1, a1.generation, "/etc/cron.d"),
        ckpt(w1, a1.generation, "/ckpt/../etc"),
        ckpt(w1, a1.generation, "/ckpt-elsewhere"),
    ];
    for r in &refusals {
        let e = c.st.report_checkpoint(c.now, r).unwrap_err();
        assert!(
            matches!(
                e,
                StateError::NotMember { .. } | StateError::OutsideCheckpointDir { .. }
            ),
            "{e}"
        );
    }
    let job = c.st.job(JOB).unwrap();
    assert_eq!(job.checkpoint_dir, "/ckpt");
    assert_eq!(job.checkpoint_version, None, "nothing recorded");
    assert_eq!(job.resume_source(), "", "and nothing to resume from");
    // The member's own directory is taken.
    c.st.report_checkpoint(c.now, &ckpt(w1, a1.generation, "/ckpt"))
        .unwrap();
    assert_eq!(
        c.st.job(JOB).unwrap().checkpoint_version,
        Some(ParamVersion(1))
    );
}

#[test]
fn a_step_from_a_stale_generation_is_refused_and_not_tallied() {
    let (mut c, [(w1, a1), (w2, a2)]) = Cluster::running();
    let old = Assignment {
        generation: RingGeneration(a1.generation.0 - 1),
        ..a2.clone()
    };
    let before = c.st.worker_views(c.now);
    let e = c.try_step(&old, w2, 1, 1).unwrap_err();
    assert!(matches!(e, StateError::NotMember { .. }), "{e}");
    assert_eq!(
        c.st.worker_views(c.now),
        before,
        "the worker's figures stay"
    );
    // The current generation still commits normally.
    c.step(&a1, w1, 1, 7);
    c.step(&a2, w2, 1, 7);
    assert_eq!(c.st.snapshot(JOB).unwrap().step, ParamVersion(1));
}

#[test]
fn evaluations_and_checkpoints_are_recorded_for_the_job() {
    let (mut c, [(w1, a1), (w2, a2)]) = Cluster::running();
    c.step(&a1, w1, 1, 7);
    c.step(&a2, w2, 1, 7);
    let fx =
        c.st.report_eval(
            c.now,
            &EvalReport {
                worker: w1,
                job: JOB,
                generation: a1.generation,
                version: ParamVersion(1),
                accuracy: 0.75,
                loss: 0.5,
                samples: 100,
            },
        )
        .unwrap();
    assert_eq!(kinds(&fx), [EventKind::Eval]);
    assert_eq!(
        fx.events[0].message,
        "step 1: test accuracy 0.7500, test loss 0.5000"
    );
    assert_eq!(c.st.snapshot(JOB).unwrap().eval, Some((0.75, 0.5)));
    let fx =
        c.st.report_checkpoint(
            c.now,
            &CheckpointReport {
                worker: w1,
                job: JOB,
                generation: a1.generation,
                version: ParamVersion(1),
                dir: "/ckpt/v1".into(),
            },
        )
        .unwrap();
    assert_eq!(kinds(&fx), [EventKind::Checkpoint]);
    assert!(fx.persist[0].durable);
    assert_eq!(fx.reports[0].dir, PathBuf::from("/ckpt/v1"));
    // A worker starting afresh resumes from it.
    let job = c.st.job(JOB).unwrap();
    assert_eq!(job.resume_source(), "/ckpt/v1");
}

/// TensorBoard gets what the coordinator commits: the loss over every
/// member's samples, the slowest all-reduce, each evaluation, and a close
/// when the job ends; nothing with `checkpoint.tensorboard = false`.
#[test]
fn committed_steps_and_evaluations_become_tensorboard_scalars() {
    let report =
        |w: WorkerId, a: &Assignment, loss: f64, samples: u64, allreduce: f64| StepReport {
            worker: w,
            job: JOB,
            generation: a.generation,
            rank: a.rank,
            version: ParamVersion(1),
            param_hash: 7,
            loss,
            samples,
            step_seconds: 0.1,
            allreduce_seconds: allreduce,
            epoch: 0,
            total_steps: 5,
            skipped_nonfinite: false,
            started_unix_s: 0.0,
            finished_unix_s: 0.0,
        };
    let (mut c, [(w1, a1), (w2, a2)]) = Cluster::running();
    let (_, fx) =
        c.st.report_step(c.now, &report(w1, &a1, 1.0, 6, 0.03))
            .unwrap();
    assert!(fx.tensorboard.is_empty(), "not committed yet");
    let (_, fx) =
        c.st.report_step(c.now, &report(w2, &a2, 3.0, 2, 0.02))
            .unwrap();
    assert_eq!(
        fx.tensorboard,
        [TensorBoardOp::Scalars {
            job: JOB,
            dir: "/ckpt".into(),
            step: 1,
            values: vec![
                ("loss", 1.5),
                ("samples_per_s", 80.0),
                ("allreduce_s", 0.03)
            ],
            restart: false,
        }]
    );
    let fx =
        c.st.report_eval(c.now, &eval_report(w1, a1.generation, 0.75))
            .unwrap();
    assert_eq!(
        fx.tensorboard,
        [TensorBoardOp::Scalars {
            job: JOB,
            dir: "/ckpt".into(),
            step: 1,
            values: vec![("test_accuracy", 0.75), ("test_loss", 0.5)],
            restart: false,
        }]
    );
    let fx =
        c.st.report_eval(c.now, &eval_report(w1, a1.generation, f64::NAN))
            .unwrap();
    assert!(
        matches!(&fx.tensorboard[..], [TensorBoardOp::Scalars { values, .. }] if values == &[("test_loss", 0.5)]),
        "no accuracy where the model computes its loss: {:?}",
        fx.tensorboard
    );
    // Step 2, then step 2 again (the ring rolled back to version 1): the
    // second time TensorBoard is told to drop the curve from step 2 on.
    let restarts = |c: &mut Cluster| {
        c.st.report_step(
            c.now,
            &StepReport {
                version: ParamVersion(2),
                ..report(w1, &a1, 1.0, 6, 0.03)
            },
        )
        .unwrap();
        let (_, fx) =
            c.st.report_step(
                c.now,
                &StepReport {
                    version: ParamVersion(2),
                    ..report(w2, &a2, 3.0, 2, 0.02)
                },
            )
            .unwrap();
        match &fx.tensorboard[..] {
            [TensorBoardOp::Scalars {
                step: 2, restart, ..
            }] => *restart,
            other => panic!("{other:?}"),
        }
    };
    assert!(!restarts(&mut c), "a new step");
    assert!(restarts(&mut c), "a step redone");
    let (_, fx) = c.st.cancel(c.now, JOB).unwrap();
    assert_eq!(fx.tensorboard, [TensorBoardOp::Close { job: JOB }]);

    let mut c = Cluster::new();
    let (w1, _) = c.register(1000);
    let (w2, _) = c.register(2000);
    c.submit(&["checkpoint.tensorboard=false"]);
    let (a1, a2) = (c.assignment(w1).unwrap(), c.assignment(w2).unwrap());
    c.st.report_step(c.now, &report(w1, &a1, 1.0, 6, 0.03))
        .unwrap();
    let (_, fx) =
        c.st.report_step(c.now, &report(w2, &a2, 3.0, 2, 0.02))
            .unwrap();
    assert_eq!(kinds(&fx), [EventKind::Step]);
    assert!(fx.tensorboard.is_empty(), "turned off");
    let fx =
        c.st.report_eval(c.now, &eval_report(w1, a1.generation, 0.75))
            .unwrap();
    assert!(fx.tensorboard.is_empty(), "turned off");
}

#[test]
fn the_job_succeeds_when_every_member_finishes_and_fails_on_a_members_error() {
    let (mut c, [(w1, a1), (w2, a2)]) = Cluster::running();
    let finish = |w: WorkerId, a: &Assignment, error: Option<&str>| FinishReport {
        worker: w,
        job: JOB,
        generation: a.generation,
        version: ParamVersion(5),
        error: error.map(String::from),
    };
    let fx = c.st.report_finish(c.now, &finish(w1, &a1, None)).unwrap();
    assert!(fx.events.is_empty());
    assert_eq!(c.state(), JobState::Running);
    let fx = c.st.report_finish(c.now, &finish(w2, &a2, None)).unwrap();
    assert_eq!(c.state(), JobState::Succeeded);
    assert_eq!(fx.events[0].message, "succeeded");

    let (mut c, [(w1, a1), _]) = Cluster::running();
    c.st.report_finish(c.now, &finish(w1, &a1, Some("dataset not found")))
        .unwrap();
    assert_eq!(c.state(), JobState::Failed);
    assert_eq!(
        c.st.snapshot(JOB).unwrap().error,
        format!("worker {w1} (rank 0): dataset not found")
    );
}

#[test]
fn a_suspect_that_stays_silent_is_dropped_and_the_ring_re_formed() {
    let (mut c, [(w1, a1), (w2, _)]) = Cluster::running();
    let (w3, _) = c.register(3000);
    // The job wanted 2; w3 idles (max_workers = workers).
    assert_eq!(c.assignment(w3), None);
    c.advance(50);
    let fx =
        c.st.report_ring_failure(
            c.now,
            &RingFailureReport {
                worker: w1,
                job: JOB,
                generation: a1.generation,
                version: ParamVersion(3),
                error: "rank 1 sent nothing for 10s".into(),
                suspect: Some(Rank(1)),
            },
        )
        .unwrap();
    assert!(
        fx.events.is_empty(),
        "first learn whether the suspect lives"
    );
    // w1 and w3 keep heartbeating; w2 stays silent past the suspect timeout.
    for _ in 0..4 {
        c.advance(200);
        c.st.heartbeat(c.now, w1);
        c.st.heartbeat(c.now, w3);
    }
    let job = c.st.snapshot(JOB).unwrap();
    assert_eq!(job.state, JobState::Running);
    assert!(job.generation > a1.generation, "a new generation");
    let old_key = a1.ring_key.clone();
    let a1 = c.assignment(w1).unwrap();
    let a3 = c.assignment(w3).unwrap();
    assert_eq!((a1.rank, a3.rank), (Rank(0), Rank(1)), "w3 took w2's place");
    assert_eq!(a1.ring_key, a3.ring_key, "members share the ring's key");
    assert_ne!(
        a1.ring_key, old_key,
        "a fenced member cannot authenticate to the new generation"
    );
    assert_eq!(c.st.heartbeat(c.now, w2).0, HeartbeatReply::Unknown);
}

#[test]
fn a_ring_grows_at_a_step_boundary() {
    let mut c = Cluster::new();
    let (w1, _) = c.register(1000);
    let (w2, _) = c.register(2000);
    c.submit(&["max_workers=3"]);
    let (a1, a2) = (c.assignment(w1).unwrap(), c.assignment(w2).unwrap());
    c.step(&a1, w1, 1, 7);
    c.step(&a2, w2, 1, 7);
    let (w3, _) = c.register(3000);
    assert_eq!(c.assignment(w3), None, "joins at the next boundary");
    assert_eq!(c.step(&a1, w1, 2, 8).0, StepVerdict::Stop);
    let (verdict, fx) = c.step(&a2, w2, 2, 8);
    assert_eq!(verdict, StepVerdict::Stop);
    assert_eq!(kinds(&fx), [EventKind::Step, EventKind::Workers]);
    let a3 = c.assignment(w3).expect("w3 joined");
    assert_eq!(a3.rank, Rank(2));
    assert_eq!(a3.members.len(), 3);
    assert_eq!(c.st.snapshot(JOB).unwrap().step, ParamVersion(2));
}

#[test]
fn below_min_workers_the_job_waits_and_resumes_when_one_registers() {
    let mut c = Cluster::new();
    let (w1, _) = c.register(1000);
    let (_w2, _) = c.register(2000);
    c.submit(&["min_workers=2"]);
    assert_eq!(c.state(), JobState::Running);
    // w2 dies silently: only w1 heartbeats past the worker timeout.
    for _ in 0..4 {
        c.advance(1000);
        c.st.heartbeat(c.now, w1);
    }
    assert_eq!(c.state(), JobState::Waiting);
    assert_eq!(c.assignment(w1), None, "a waiting job has no ring");
    let (w3, fx) = c.register(3000);
    assert!(kinds(&fx).contains(&EventKind::Workers));
    assert_eq!(c.state(), JobState::Running);
    assert_eq!(c.assignment(w3).unwrap().rank, Rank(1));
}

#[test]
fn a_cancelled_job_ends_once_and_frees_its_workers() {
    let (mut c, [(w1, _), _]) = Cluster::running();
    let (job, fx) = c.st.cancel(c.now, JOB).unwrap();
    assert_eq!(job.state, JobState::Cancelled);
    assert_eq!(kinds(&fx), [EventKind::State]);
    assert_eq!(c.assignment(w1), None);
    assert_eq!(
        c.st.cancel(c.now, JOB).unwrap_err().to_string(),
        format!("job {JOB} already ended (cancelled)")
    );
    assert_eq!(
        c.st.cancel(c.now, JobId(5)).unwrap_err(),
        StateError::NoJob(JobId(5))
    );
}

#[test]
fn a_restarted_coordinator_keeps_its_jobs_waiting_for_their_workers() {
    let (mut c, [(w1, a1), (w2, a2)]) = Cluster::running();
    c.step(&a1, w1, 1, 7);
    c.step(&a2, w2, 1, 7);
    let mut pending = Job::new(
        JobId(2),
        JobSpec::parse(SPEC, &[]).unwrap(),
        String::new(),
        String::new(),
        SystemTime::now(),
    );
    pending.state = JobState::Pending;
    let records = vec![
        crate::convert::job_record(c.st.job(JOB).unwrap()),
        crate::convert::job_record(&pending),
    ];
    let counters = c.st.counters;
    let now = Instant::now();
    let mut st = State::recover(now, T, records, counters, |_| Vec::new());
    assert_eq!(st.snapshot(JOB).unwrap().state, JobState::Waiting);
    assert_eq!(st.snapshot(JOB).unwrap().step, ParamVersion(1));
    assert_eq!(st.snapshot(JobId(2)).unwrap().state, JobState::Pending);
    assert_eq!(st.heartbeat(now, w1).0, HeartbeatReply::Unknown);
    let (w3, _) = st
        .register_worker(
            now,
            Registration {
                grpc_addr: "a:1".into(),
                ring_addr: "a:2".into(),
                hostname: String::new(),
                pid: 1,
            },
        )
        .unwrap();
    assert!(w3 > w2, "worker ids are not reused across restarts");
    // Regrouping: one worker is not enough yet (the job had two).
    assert_eq!(st.snapshot(JOB).unwrap().state, JobState::Waiting);
    let (w4, _) = st
        .register_worker(
            now,
            Registration {
                grpc_addr: "b:1".into(),
                ring_addr: "b:2".into(),
                hostname: String::new(),
                pid: 1,
            },
        )
        .unwrap();
    let generation = st.snapshot(JOB).unwrap().generation;
    assert_eq!(st.snapshot(JOB).unwrap().state, JobState::Running);
    assert!(generation > a1.generation, "newer than before the restart");
    assert!(st.assignment(w4).is_some());
}

#[test]
fn registrations_are_bounded_and_a_worker_registering_again_replaces_itself() {
    let mut c = Cluster::new();
    c.st.limits.max_workers = 3;
    let (w1, _) = c.register(1000);
    c.register(2000);
    // The same addresses again: a restarted worker, not a fourth one.
    for _ in 0..10 {
        c.register(1000);
    }
    let alive = |c: &Cluster| c.st.workers.values().filter(|w| w.alive).count();
    assert_eq!(alive(&c), 2);
    assert!(
        c.st.workers.get(&w1).is_none_or(|w| !w.alive),
        "the old registration is lost (or forgotten to make room)"
    );
    assert!(c.st.workers.len() <= 3, "{} kept", c.st.workers.len());
    c.register(3000);
    let e =
        c.st.register_worker(
            c.now,
            Registration {
                grpc_addr: "127.0.0.1:4000".into(),
                ring_addr: "127.0.0.1:4001".into(),
                hostname: String::new(),
                pid: 1,
            },
        )
        .unwrap_err();
    assert_eq!(e, StateError::TooManyWorkers(3));
    assert_eq!(
        e.to_string(),
        "3 workers are registered already (the coordinator's max_workers)"
    );
}

#[test]
fn a_member_registering_again_leaves_its_ring() {
    let (mut c, [(w1, a1), _]) = Cluster::running();
    c.register(1000); // w1's addresses
    assert!(!c.st.workers[&w1].alive);
    let job = c.st.job(JOB).unwrap();
    assert!(!job.members.contains(&w1), "re-formed without it");
    assert!(job.generation > a1.generation || job.state != JobState::Running);
}

#[test]
fn lost_workers_are_forgotten_after_a_while() {
    let mut c = Cluster::new();
    c.st.limits.forget_lost_workers = Duration::from_secs(60);
    let (w1, _) = c.register(1000);
    c.advance(4_000);
    c.st.tick(c.now);
    assert!(!c.st.workers[&w1].alive, "lost after its timeout");
    c.st.forget_expired(c.now, SystemTime::now());
    assert!(c.st.workers.contains_key(&w1), "listed as lost for a while");
    c.advance(61_000);
    c.st.forget_expired(c.now, SystemTime::now());
    assert!(!c.st.workers.contains_key(&w1), "then forgotten");
}

fn finished_jobs(c: &mut Cluster, n: u64, submitted: SystemTime) {
    for i in 0..n {
        let spec = JobSpec::parse(SPEC, &[]).unwrap();
        c.st.submit(
            c.now,
            JobId(100 + i),
            spec,
            String::new(),
            "/ckpt".into(),
            submitted,
            "alice".into(),
        );
        c.st.cancel(c.now, JobId(100 + i)).unwrap();
    }
}

#[test]
fn finished_jobs_are_kept_by_count_and_age_and_running_ones_always() {
    let mut c = Cluster::new();
    c.st.limits.keep_finished_jobs = 3;
    c.st.limits.keep_finished_for = Duration::from_secs(3600);
    let now = SystemTime::now();
    c.submit(&[]); // pending: never forgotten
    finished_jobs(&mut c, 5, now);
    let fx = c.st.forget_expired(c.now, now);
    assert_eq!(fx.forgotten, [JobId(100), JobId(101)], "the oldest go");
    assert_eq!(fx.persist.len(), 1, "with the counters, for the store");
    assert_eq!(c.st.queue.len(), 4);
    assert!(c.st.job(JOB).is_ok());
    // A day later every finished job is past its age.
    let fx =
        c.st.forget_expired(c.now, now + Duration::from_secs(86_400));
    assert_eq!(fx.forgotten.len(), 3);
    assert_eq!(c.st.queue, [JOB]);
    assert!(c.st.forget_expired(c.now, now).forgotten.is_empty());
}

#[test]
fn jobs_are_listed_a_page_at_a_time_in_submission_order() {
    let mut c = Cluster::new();
    finished_jobs(&mut c, 5, SystemTime::now());
    let first = c.st.snapshots_page(None, 2).unwrap();
    let ids = |p: &JobsPage| p.jobs.iter().map(|j| j.id).collect::<Vec<_>>();
    assert_eq!(ids(&first), [JobId(100), JobId(101)]);
    assert_eq!(first.next, Some(JobId(101)));
    let second = c.st.snapshots_page(first.next, 2).unwrap();
    assert_eq!(ids(&second), [JobId(102), JobId(103)]);
    let last = c.st.snapshots_page(second.next, 2).unwrap();
    assert_eq!((ids(&last), last.next), (vec![JobId(104)], None));
    let exact = c.st.snapshots_page(None, 5).unwrap();
    assert_eq!((exact.jobs.len(), exact.next), (5, None));
    assert_eq!(
        c.st.snapshots_page(Some(JobId(7)), 2).unwrap_err(),
        StateError::NoJob(JobId(7))
    );
}
