//! The training loop of one ring member, on its own thread (all of it is
//! blocking: libtorch and the ring). It talks to the coordinator through the
//! runtime handle.
//!
//! A worker's training state ([`TrainingState`]: parameters, optimizer state,
//! version, shard cursor, model and data) outlives ring generations: when a
//! ring breaks or grows, the trainer leaves the generation, the state waits
//! in the worker's [`StateSlot`], and the next generation's trainer picks it
//! up. Each generation starts with a sync ([`crate::sync`]): members agree on
//! the newest version, and the lowest rank holding it broadcasts parameters
//! and optimizer state to the others if any is behind.
//!
//! Each step: take this rank's slice of the step's global batch, forward and
//! backward with the loss scaled by 1/global_batch, ring all-reduce (sum) of
//! the flat gradient, which makes it the mean over the global batch whatever
//! the split, the optimizer on the flat parameters, report (version, hash).

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
use crate::optim::{OptimError, Optimizer};
use crate::ring::transport::LinkAbort;
use crate::ring::{ReduceOp, Ring, RingEndpoints, RingError, RingOptions, RingSpec};
use crate::sync::{self, Holding, Plan};
use ringtrain_common::jobspec::JobSpec;

/// A worker's training state for one job, kept between ring generations.
pub struct TrainingState {
    pub job: JobId,
    model: Model,
    train: Split,
    test: Split,
    params: Vec<f32>,
    optimizer: Optimizer,
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
    /// Where the job's TorchScript file comes from.
    pub model_files: Arc<crate::model_files::ModelFiles>,
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
    #[error("{0}")]
    Model(#[from] crate::model::ModelError),
    #[error("{0}")]
    ModelFile(String),
    #[error("{0}")]
    Optimizer(#[from] OptimError),
    #[error("stopped: {0}")]
    Stopped(&'static str),
}

/// All-reduce step ids outside the training steps' range, so the sync,
/// broadcasts and evaluations can never be confused with a gradient step.
const SYNC_STEP: u64 = 1 << 62;
const BROADCAST_PARAMS: u64 = SYNC_STEP + 1;
/// The first optimizer state buffer's; the others follow.
const BROADCAST_OPTIMIZER_STATE: u64 = SYNC_STEP + 2;
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

/// The data and model a job trains, as its spec says, with the bytes of its
/// TorchScript file if it has one (blocking: reads files).
pub(crate) fn prepare(
    spec: &JobSpec,
    script: Option<&[u8]>,
) -> Result<(Model, Split, Split), TrainError> {
    let dir = std::path::Path::new(&spec.dataset.path);
    let train = data::load_idx_split(dir, true)?;
    let test = data::load_idx_split(dir, false)?;
    let shape = crate::model::DataShape {
        sample: vec![1, 28, 28],
        classes: Some(10),
    };
    let device = crate::model::device(&spec.device)?;
    let init_from = if spec.init_from.is_empty() {
        None
    } else {
        let file = checkpoint::weights_file(std::path::Path::new(&spec.init_from));
        Some((
            format!("init_from {}", file.display()),
            checkpoint::read_safetensors(&file)?,
        ))
    };
    let init = init_from.as_ref().map(|(origin, t)| (origin.as_str(), t));
    let model = Model::build(spec, &shape, script, init, device)?;
    Ok((model, train, test))
}

/// What a dry run checks before a job is accepted: the model builds on the
/// job's data and one forward on a few training samples gives what the loss
/// needs.
pub fn dry_run(spec: &JobSpec, script: Option<&[u8]>) -> Result<(), TrainError> {
    let (mut model, train, _) = prepare(spec, script)?;
    let n = train.len().min(spec.batch_size).min(8) as i64;
    let indices: Vec<i64> = (0..n).collect();
    let (x, y) = data::batch(&train, &indices);
    model.check(&x, &y)?;
    Ok(())
}

fn fresh_state(a: &Assignment, script: Option<&[u8]>) -> Result<TrainingState, TrainError> {
    let spec = &a.spec;
    let (model, train, test) = prepare(spec, script)?;
    let mut params = vec![0f32; model.num_params()];
    model.params_to_flat(&mut params);
    let optimizer = Optimizer::new(&spec.optimizer, params.len());
    Ok(TrainingState {
        job: a.job,
        model,
        train,
        test,
        params,
        optimizer,
        version: ParamVersion(0),
        cursor: ShardCursor::default(),
        agreed: false,
    })
}

fn run(ctx: &TrainerContext, slot: &mut Option<TrainingState>) -> Result<(), TrainError> {
    let a = &ctx.assignment;
    tch::set_num_threads(a.spec.threads as i32);
    if slot.is_none() {
        let script = ctx
            .runtime
            .block_on(ctx.model_files.get(&a.spec.model))
            .map_err(|e| TrainError::ModelFile(e.to_string()))?;
        *slot = Some(fresh_state(a, script.as_deref().map(Vec::as_slice))?);
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
            has_optimizer_state: !st.optimizer.state().is_empty(),
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
                    let states = st.optimizer.state_names();
                    let c = checkpoint::load(dir, st.model.layout(), states)?;
                    let origin = dir.display().to_string();
                    st.model.load_state(&c.model, &origin, false, &|_| false)?;
                    st.params = c.params;
                    st.optimizer.clear_state();
                    for (name, values) in c.optimizer {
                        st.optimizer.set_state(&name, values)?;
                    }
                    st.version = c.meta.param_version;
                    st.cursor = c.meta.shard_cursor;
                    info!(version = %st.version, dir = %dir.display(), "starting from checkpoint");
                }
                (0, None)
            }
        };
        let has_optimizer_state = match &from {
            Some(from) => from.has_optimizer_state,
            None => !st.optimizer.state().is_empty(),
        };
        if rank != source {
            st.params.fill(0.0);
        }
        let t0 = Instant::now();
        // Zeros from every other rank make the sum an exact copy of the source's.
        self.ring
            .all_reduce_exact(BROADCAST_PARAMS, &mut st.params, ReduceOp::Sum)?;
        if has_optimizer_state {
            // Every buffer the optimizer keeps, in its order (the source has
            // them all once it has stepped).
            let n = st.params.len();
            for (i, &name) in st.optimizer.state_names().iter().enumerate() {
                let mut buf = match st.optimizer.state().iter().find(|(s, _)| *s == name) {
                    Some((_, b)) if rank == source => b.to_vec(),
                    _ => vec![0f32; n],
                };
                self.ring.all_reduce_exact(
                    BROADCAST_OPTIMIZER_STATE + i as u64,
                    &mut buf,
                    ReduceOp::Sum,
                )?;
                st.optimizer.set_state(name, buf)?;
            }
        } else {
            st.optimizer.clear_state();
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

            let (x, y) = info_span!("data").in_scope(|| data::batch(&st.train, &indices));
            let t_fb = Instant::now();
            let loss = info_span!("forward_backward").in_scope(|| {
                st.model.zero_grads();
                let loss = st
                    .model
                    .accumulate_gradients(&x, &y, positions.end - positions.start);
                st.model.grads_to_flat(&mut grads);
                loss
            });
            let loss = loss?;
            let fb_s = t_fb.elapsed().as_secs_f64();

            let t_ar = Instant::now();
            info_span!("allreduce").in_scope(|| {
                self.ring
                    .all_reduce(st.version.0, &mut grads, ReduceOp::Sum)
            })?;
            let ar_s = t_ar.elapsed().as_secs_f64();

            let hash = info_span!("optimizer").in_scope(|| {
                // The spec's learning rate until the schedule is wired in;
                // t = the version after this step.
                let lr = spec.optimizer.lr as f32;
                st.optimizer
                    .step(&mut st.params, &grads, lr, st.version.0 + 1);
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
        let (x, y) = data::batch(&self.st.test, &indices);
        let sums = self.st.model.evaluate(&x, &y)?;
        let mut totals = [
            sums.correct.unwrap_or(0.0) as f32,
            sums.loss_sum as f32,
            sums.count as f32,
        ];
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
            optimizer_hash: 0,
        };
        let optimizer = st.optimizer.state();
        let dir = checkpoint::save(
            &a.checkpoint_dir,
            &meta,
            &st.model.state_dict(),
            st.model.layout(),
            &st.params,
            &optimizer,
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
