//! The training loop of one ring member, on its own thread (all of it is
//! blocking: libtorch and the ring). It talks to the coordinator through the
//! runtime handle.
//!
//! A worker's training state ([`TrainingState`]: parameters, momentum,
//! version, shard cursor, model and data) outlives ring generations: when a
//! ring breaks or grows, the trainer leaves the generation, the state waits
//! in the worker's [`StateSlot`], and the next generation's trainer picks it
//! up. Each generation starts with a sync ([`crate::sync`]): members agree on
//! the newest version, and the lowest rank holding it broadcasts parameters
//! and momentum to the others if any is behind.
//!
//! Each step: take this rank's slice of the step's global batch, forward and
//! backward with the loss scaled by 1/global_batch, ring all-reduce (sum) of
//! the flat gradient, which makes it the mean over the global batch whatever
//! the split, SGD on the flat parameters, report (version, hash).

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringtrain_common::data_plan::{self, ShardCursor};
use ringtrain_common::metrics::Metrics;
use ringtrain_common::worker_api::{
    Assignment, CheckpointReport, EvalReport, FinishReport, RingFailureReport, StepReport,
};
use ringtrain_common::{JobId, ParamVersion, WorkerId};
use ringtrain_proto as pb;
use ringtrain_proto::worker_control_client::WorkerControlClient;
use tonic::transport::Channel;
use tracing::{info, info_span, warn};

use crate::checkpoint::{self, CheckpointMeta};
use crate::data::{self, Split};
use crate::model::Model;
use crate::optim::Sgd;
use crate::ring::transport::LinkAbort;
use crate::ring::{ReduceOp, Ring, RingEndpoints, RingError, RingOptions, RingSpec};
use crate::sync::{self, Holding, Plan};

/// A worker's training state for one job, kept between ring generations.
pub struct TrainingState {
    pub job: JobId,
    model: Model,
    train: Split,
    test: Split,
    params: Vec<f32>,
    sgd: Sgd,
    version: ParamVersion,
    cursor: ShardCursor,
    /// False until the first sync: `params` is only this worker's seeded init.
    agreed: bool,
}

/// Where a worker's [`TrainingState`] waits between generations.
pub type StateSlot = Arc<Mutex<Option<TrainingState>>>;

/// Lets the service break the current ring when it leaves a generation.
pub type AbortSlot = Arc<Mutex<Option<Arc<dyn LinkAbort>>>>;

pub struct TrainerContext {
    pub worker_id: WorkerId,
    pub assignment: Assignment,
    pub client: WorkerControlClient<Channel>,
    pub runtime: tokio::runtime::Handle,
    pub endpoints: RingEndpoints,
    pub cancel: Arc<AtomicBool>,
    pub abort: AbortSlot,
    pub state: StateSlot,
    pub metrics: Metrics,
    /// Parameter version reached, for heartbeats.
    pub progress: Arc<AtomicU64>,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Data(#[from] data::DataError),
    #[error("{0}")]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error("{0}")]
    Ring(#[from] RingError),
    #[error("coordinator: {0}")]
    Coordinator(String),
    #[error("sample audit: {0}")]
    Audit(#[from] std::io::Error),
    #[error("{0}")]
    Sync(#[from] sync::SyncError),
    #[error("stopped: {0}")]
    Stopped(&'static str),
}

/// All-reduce step ids outside the training steps' range, so the sync,
/// broadcasts and evaluations can never be confused with a gradient step.
const SYNC_STEP: u64 = 1 << 62;
const BROADCAST_PARAMS: u64 = SYNC_STEP + 1;
const BROADCAST_MOMENTUM: u64 = SYNC_STEP + 2;
const EVAL_STEP: u64 = 1 << 63;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs one generation of the assignment and tells the coordinator how it
/// ended: finished, failed for good, or left because the ring broke.
pub fn run_and_report(ctx: TrainerContext) {
    let a = &ctx.assignment;
    let span = info_span!("job", id = %a.job, rank = a.rank.0, gen = a.generation.0);
    let _g = span.enter();
    let mut state = match lock(&ctx.state).take() {
        Some(s) if s.job == a.job => Some(s),
        _ => None,
    };
    let result = run(&ctx, &mut state);
    *lock(&ctx.abort) = None;
    let version = state.as_ref().map(|s| s.version).unwrap_or_default();
    let mut client = ctx.client.clone();
    let finish = |error: Option<String>| {
        pb::FinishReport::from(&FinishReport {
            worker: ctx.worker_id,
            job: a.job,
            generation: a.generation,
            version,
            error,
        })
    };
    match result {
        Ok(()) => {
            if let Err(e) = ctx.runtime.block_on(client.report_finish(finish(None))) {
                warn!(error = %e.message(), "could not report the end of training");
            }
        }
        Err(TrainError::Stopped(why)) => {
            info!(why, %version, "left the ring generation");
            *lock(&ctx.state) = state;
        }
        Err(TrainError::Ring(e)) if !ctx.cancel.load(Ordering::SeqCst) => {
            warn!(error = %e, %version, "ring failed; waiting for the next generation");
            let report = RingFailureReport {
                worker: ctx.worker_id,
                job: a.job,
                generation: a.generation,
                version,
                error: e.to_string(),
                suspect: e.peer().map(|p| p.rank),
            };
            *lock(&ctx.state) = state;
            let sent = ctx
                .runtime
                .block_on(client.report_ring_failure(pb::RingFailureReport::from(&report)));
            if let Err(e) = sent {
                warn!(error = %e.message(), "could not report the ring failure");
            }
        }
        Err(TrainError::Ring(_)) | Err(TrainError::Coordinator(_)) => {
            // Aborted on purpose, or the coordinator is away: keep the state
            // for the next assignment.
            *lock(&ctx.state) = state;
        }
        Err(e) => {
            warn!(error = %e, "training failed");
            if let Err(e) = ctx
                .runtime
                .block_on(client.report_finish(finish(Some(e.to_string()))))
            {
                warn!(error = %e.message(), "could not report the failure");
            }
        }
    }
}

fn fresh_state(a: &Assignment) -> Result<TrainingState, TrainError> {
    let spec = &a.spec;
    let data::Dataset { train, test } = data::load(&spec.dataset)?;
    let kind = spec.model.builtin().ok_or(TrainError::Stopped(
        "this worker trains built-in models only",
    ))?;
    let model = Model::new(kind, spec.seed as i64);
    let mut params = vec![0f32; model.num_params()];
    model.params_to_flat(&mut params);
    let sgd = Sgd::new(
        spec.optimizer.lr as f32,
        spec.optimizer.momentum as f32,
        spec.optimizer.weight_decay() as f32,
    );
    Ok(TrainingState {
        job: a.job,
        model,
        train,
        test,
        params,
        sgd,
        version: ParamVersion(0),
        cursor: ShardCursor::default(),
        agreed: false,
    })
}

fn run(ctx: &TrainerContext, slot: &mut Option<TrainingState>) -> Result<(), TrainError> {
    let a = &ctx.assignment;
    tch::set_num_threads(a.spec.threads as i32);
    if slot.is_none() {
        *slot = Some(fresh_state(a)?);
    }
    let st = slot.as_mut().ok_or(TrainError::Stopped("no state"))?;
    let ring_spec = RingSpec {
        job: a.job,
        generation: a.generation,
        rank: a.rank,
        members: a.members.clone(),
        options: RingOptions {
            transport: a.spec.ring.transport,
            encoding: a.spec.ring.encoding,
            timeout: Duration::from_secs_f64(a.spec.ring.timeout_s),
            ..RingOptions::default()
        },
    };
    let ring = ctx
        .runtime
        .block_on(Ring::connect(ring_spec, &ctx.endpoints))?;
    *lock(&ctx.abort) = ring.abort_handle();
    if ctx.cancel.load(Ordering::SeqCst) {
        return Err(TrainError::Stopped("left before the ring formed"));
    }
    let mut t = Trainer {
        ctx,
        client: ctx.client.clone(),
        ring,
        st,
    };
    t.sync()?;
    t.train()
}

struct Trainer<'a> {
    ctx: &'a TrainerContext,
    client: WorkerControlClient<Channel>,
    ring: Ring,
    st: &'a mut TrainingState,
}

impl Trainer<'_> {
    fn rank(&self) -> usize {
        self.ctx.assignment.rank.index()
    }

    fn world(&self) -> usize {
        self.ctx.assignment.members.len()
    }

    fn stop_if_cancelled(&self) -> Result<(), TrainError> {
        if self.ctx.cancel.load(Ordering::SeqCst) {
            return Err(TrainError::Stopped("the coordinator moved this worker"));
        }
        Ok(())
    }

    /// Agrees on the state every member starts this generation from (see
    /// [`crate::sync`]).
    fn sync(&mut self) -> Result<(), TrainError> {
        let (rank, world) = (self.rank(), self.world());
        let st = &mut *self.st;
        let mine = Holding {
            trained: st.agreed,
            version: st.version,
            cursor: st.cursor,
            has_optimizer_state: st.sgd.momentum_buf.is_some(),
        };
        let mut table = sync::encode(&mine, rank, world);
        self.ring
            .all_reduce_exact(SYNC_STEP, &mut table, ReduceOp::Sum)?;
        let members = sync::decode(&table, world)?;
        let (source, from) = match sync::plan(&members) {
            Plan::InSync { version } => {
                info!(%version, world, "ring formed; all members hold the newest version");
                return Ok(());
            }
            Plan::Broadcast { source, from } => (source, Some(from)),
            Plan::Fresh => {
                // Nobody has trained yet: every member starts from the same
                // checkpoint or seeded init; rank 0's copy is made everyone's.
                if let Some(dir) = &self.ctx.assignment.resume_from {
                    let (meta, params, momentum) = checkpoint::load(dir, st.model.layout())?;
                    st.params = params;
                    st.sgd.momentum_buf = momentum;
                    st.version = meta.param_version;
                    st.cursor = meta.shard_cursor;
                    info!(version = %st.version, dir = %dir.display(), "starting from checkpoint");
                }
                (0, None)
            }
        };
        let has_optimizer_state = match &from {
            Some(from) => from.has_optimizer_state,
            None => st.sgd.momentum_buf.is_some(),
        };
        if rank != source {
            st.params.fill(0.0);
        }
        let t0 = Instant::now();
        // Zeros from every other rank make the sum an exact copy of the source's.
        self.ring
            .all_reduce_exact(BROADCAST_PARAMS, &mut st.params, ReduceOp::Sum)?;
        if has_optimizer_state {
            let n = st.params.len();
            let buf = st.sgd.momentum_buf.get_or_insert_with(|| vec![0f32; n]);
            if rank != source {
                buf.fill(0.0);
            }
            self.ring
                .all_reduce_exact(BROADCAST_MOMENTUM, buf, ReduceOp::Sum)?;
        } else {
            st.sgd.momentum_buf = None;
        }
        if let Some(from) = from {
            st.version = from.version;
            st.cursor = from.cursor;
        }
        st.model.flat_to_params(&st.params);
        st.agreed = true;
        self.ctx.progress.store(st.version.0, Ordering::Relaxed);
        info!(
            version = %st.version,
            source_rank = source,
            world,
            seconds = t0.elapsed().as_secs_f64(),
            "state synced from a peer"
        );
        Ok(())
    }

    fn train(&mut self) -> Result<(), TrainError> {
        let spec = self.ctx.assignment.spec.clone();
        let samples = self.st.train.len() as u64;
        let (rank, world) = (self.rank(), self.world());
        let global_batch = spec.global_batch(world);
        let total = data_plan::total_steps(
            spec.epochs,
            spec.max_steps,
            samples,
            spec.global_batch(spec.workers),
        );
        if global_batch != spec.global_batch(spec.workers) {
            warn!(
                global_batch,
                world,
                configured = spec.global_batch(spec.workers),
                "ring size differs from the spec: the effective global batch changed"
            );
        }
        let mut perm_epoch = u64::MAX;
        let mut perm: Vec<u32> = Vec::new();
        let job = self.ctx.assignment.job.to_string();
        let labels = [("job", job.as_str())];
        let m = self.ctx.metrics.clone();
        let mut grads = vec![0f32; self.st.params.len()];
        let mut audit = self.audit_file()?;
        // Epochs bound the job by data, max_steps by versions: with a ring that
        // changes size, steps per epoch change, so `total` is an estimate.
        let done = |st: &TrainingState| {
            (spec.max_steps > 0 && st.version.0 >= spec.max_steps)
                || (spec.epochs > 0 && st.cursor.epoch >= spec.epochs)
        };
        info!(
            total_steps = total,
            world,
            global_batch,
            version = %self.st.version,
            "training"
        );
        while !done(self.st) {
            self.stop_if_cancelled()?;
            let span = info_span!("step", version = self.st.version.next().0);
            let _g = span.enter();
            let started = Instant::now();
            let st = &mut *self.st;
            if perm_epoch != st.cursor.epoch {
                perm = data_plan::epoch_permutation(spec.seed, st.cursor.epoch, st.train.len());
                perm_epoch = st.cursor.epoch;
            }
            let positions = data_plan::step_positions(st.cursor, global_batch, samples);
            let mine = data_plan::rank_slice(&positions, rank, world);
            let indices: Vec<i64> = mine.clone().map(|p| i64::from(perm[p as usize])).collect();

            let (x, y) = info_span!("data").in_scope(|| st.train.batch(&indices));
            let t_fb = Instant::now();
            let loss = info_span!("forward_backward").in_scope(|| {
                let scale = 1.0 / (positions.end - positions.start) as f64;
                let loss = st.model.loss_and_backward(&x, &y, scale);
                st.model.grads_to_flat(&mut grads);
                loss
            });
            let fb_s = t_fb.elapsed().as_secs_f64();

            let t_ar = Instant::now();
            info_span!("allreduce").in_scope(|| {
                self.ring
                    .all_reduce(st.version.0, &mut grads, ReduceOp::Sum)
            })?;
            let ar_s = t_ar.elapsed().as_secs_f64();

            let hash = info_span!("optimizer").in_scope(|| {
                st.sgd.step(&mut st.params, &grads);
                st.model.flat_to_params(&st.params);
                checkpoint::param_hash(&st.params)
            });
            st.version = st.version.next();
            let epoch_of_step = st.cursor.epoch;
            st.cursor = data_plan::advance(st.cursor, &positions, samples);
            let step_s = started.elapsed().as_secs_f64();
            self.ctx.progress.store(st.version.0, Ordering::Relaxed);
            tracing::debug!(
                forward_backward_s = fb_s,
                allreduce_s = ar_s,
                loss,
                "step done"
            );
            if let Some(f) = audit.as_mut() {
                let ids: Vec<u32> = positions.clone().map(|p| perm[p as usize]).collect();
                let line = serde_json::json!({"version": st.version.0, "epoch": epoch_of_step, "ids": ids});
                writeln!(f, "{line}")?;
            }

            m.inc(
                "ringtrain_worker_steps_total",
                "Training steps taken.",
                &labels,
                1.0,
            );
            m.inc(
                "ringtrain_worker_samples_total",
                "Training samples processed by this worker.",
                &labels,
                indices.len() as f64,
            );
            m.inc(
                "ringtrain_allreduce_seconds_total",
                "Seconds spent in ring all-reduce.",
                &labels,
                ar_s,
            );
            m.inc(
                "ringtrain_allreduce_bytes_total",
                "Gradient bytes all-reduced.",
                &labels,
                (grads.len() * 4) as f64,
            );
            m.inc(
                "ringtrain_forward_backward_seconds_total",
                "Seconds in forward and backward passes.",
                &labels,
                fb_s,
            );
            m.set(
                "ringtrain_worker_loss",
                "Training loss of the last local batch.",
                &labels,
                loss,
            );
            m.set(
                "ringtrain_worker_param_version",
                "Parameter version held.",
                &labels,
                st.version.0 as f64,
            );
            m.set(
                "ringtrain_ring_generation",
                "Ring generation this worker is in.",
                &labels,
                self.ctx.assignment.generation.0 as f64,
            );
            if step_s > 0.0 {
                m.set(
                    "ringtrain_worker_samples_per_second",
                    "Samples per second of the last step.",
                    &labels,
                    indices.len() as f64 / step_s,
                );
            }

            let report = StepReport {
                worker: self.ctx.worker_id,
                job: self.ctx.assignment.job,
                generation: self.ctx.assignment.generation,
                rank: self.ctx.assignment.rank,
                version: st.version,
                param_hash: hash,
                loss,
                samples: indices.len() as u64,
                step_seconds: step_s,
                allreduce_seconds: ar_s,
                epoch: st.cursor.epoch,
                total_steps: total,
            };
            let version = st.version.0;
            let reply = self
                .ctx
                .runtime
                .block_on(self.client.report_step(pb::StepReport::from(&report)))
                .map_err(|e| TrainError::Coordinator(e.message().to_string()))?
                .into_inner();
            if !reply.continue_job {
                return Err(TrainError::Stopped(
                    "the coordinator ended this ring generation",
                ));
            }
            let last = done(self.st);
            if spec.eval_every_steps > 0 && version.is_multiple_of(spec.eval_every_steps) && !last {
                self.evaluate()?;
            }
            if spec.checkpoint.every_steps > 0
                && version.is_multiple_of(spec.checkpoint.every_steps)
                && !last
            {
                self.checkpoint()?;
            }
        }
        self.evaluate()?;
        self.checkpoint()?;
        Ok(())
    }

    /// With `audit_samples`, the file this worker appends its steps' sample ids to.
    fn audit_file(&self) -> Result<Option<std::fs::File>, TrainError> {
        let a = &self.ctx.assignment;
        if !a.spec.audit_samples {
            return Ok(None);
        }
        let dir = a
            .checkpoint_dir
            .parent()
            .map(|p| p.join("samples"))
            .unwrap_or_else(|| PathBuf::from("samples"));
        std::fs::create_dir_all(&dir)?;
        let name = format!("{}-{}.jsonl", std::process::id(), self.ctx.worker_id);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(name))?;
        Ok(Some(f))
    }

    /// Each rank scores its slice of the test set; a sum all-reduce of
    /// (correct, loss sum, count) gives every rank the totals.
    fn evaluate(&mut self) -> Result<(), TrainError> {
        let n = self.st.test.len() as u64;
        let mine = data_plan::rank_slice(&(0..n), self.rank(), self.world());
        let indices: Vec<i64> = mine.map(|i| i as i64).collect();
        let (x, y) = self.st.test.batch(&indices);
        let (correct, loss_sum) = self.st.model.evaluate(&x, &y);
        let mut totals = [correct as f32, loss_sum as f32, indices.len() as f32];
        self.ring
            .all_reduce_exact(EVAL_STEP | self.st.version.0, &mut totals, ReduceOp::Sum)?;
        let count = f64::from(totals[2]).max(1.0);
        let (accuracy, loss) = (f64::from(totals[0]) / count, f64::from(totals[1]) / count);
        if self.rank() == 0 {
            info!(
                version = %self.st.version,
                test_accuracy = accuracy,
                test_loss = loss,
                "evaluation"
            );
            let a = &self.ctx.assignment;
            let report = EvalReport {
                worker: self.ctx.worker_id,
                job: a.job,
                generation: a.generation,
                version: self.st.version,
                accuracy,
                loss,
                samples: count as u64,
            };
            self.ctx
                .runtime
                .block_on(self.client.report_eval(pb::EvalReport::from(&report)))
                .map_err(|e| TrainError::Coordinator(e.message().to_string()))?;
        }
        Ok(())
    }

    /// Rank 0 writes the checkpoint (every replica holds the same state).
    fn checkpoint(&mut self) -> Result<(), TrainError> {
        if self.rank() != 0 {
            return Ok(());
        }
        let a = &self.ctx.assignment;
        let st = &*self.st;
        let meta = CheckpointMeta {
            job_id: a.job.to_string(),
            param_version: st.version,
            epoch: st.cursor.epoch,
            shard_cursor: st.cursor,
            model: a.spec.model.to_string(),
            num_params: st.params.len(),
            param_hash: checkpoint::param_hash(&st.params),
        };
        let dir = checkpoint::save(
            &a.checkpoint_dir,
            &meta,
            st.model.layout(),
            &st.params,
            st.sgd.momentum_buf.as_deref(),
        )?;
        info!(version = %st.version, dir = %dir.display(), "checkpoint saved");
        let report = CheckpointReport {
            worker: self.ctx.worker_id,
            job: a.job,
            generation: a.generation,
            version: st.version,
            dir,
        };
        self.ctx
            .runtime
            .block_on(
                self.client
                    .report_checkpoint(pb::CheckpointReport::from(&report)),
            )
            .map_err(|e| TrainError::Coordinator(e.message().to_string()))?;
        Ok(())
    }
}
