//! The training loop of one ring member, on its own thread (all of it is
//! blocking: libtorch and the ring). It talks to the coordinator through the
//! runtime handle.
//!
//! A worker's training state ([`TrainingState`]: model, data, parameters,
//! optimizer state, version, shard cursor) outlives ring generations: when a
//! ring breaks or grows, the trainer leaves the generation, the state waits
//! in the worker's [`StateSlot`], and the next generation's trainer picks it
//! up. Each generation starts with a sync ([`crate::sync`]): members agree on
//! the newest version, and the lowest rank holding it broadcasts parameters,
//! buffers and optimizer state to the others if any is behind.
//!
//! Each step: this rank's slice of the step's global batch, in `accumulate`
//! micro-batches, forward and backward with the loss scaled by
//! 1/global_batch (so the sum over ranks is the mean over the global batch,
//! whatever the split); one ring all-reduce (sum) of the flat gradient; the
//! model's buffers (BatchNorm statistics) averaged through the ring; the
//! gradient clipped to its global norm (every replica holds the same one);
//! the optimizer at the schedule's learning rate; report (version, hash of
//! everything replicas must hold alike).

mod job;
mod metrics;
pub mod overlap;
mod pipeline;
pub mod powersgd;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringtrain_common::data_plan;
use ringtrain_common::jobspec::OnNonFinite;
use ringtrain_common::metrics::Metrics;
use ringtrain_common::telemetry;
use ringtrain_common::worker_api::{
    Assignment, CheckpointReport, EvalReport, FinishReport, RingFailureReport, StepReport,
};
use ringtrain_common::WorkerId;
use ringtrain_proto as pb;
use ringtrain_proto::worker_control_client::WorkerControlClient;
use tonic::transport::Channel;
use tracing::{info, info_span, warn};

pub use self::job::{dry_run, prepare, TrainingState};
use crate::checkpoint::{self, CheckpointMeta};
use crate::data;
use crate::optim::{self, OptimError, Schedule};
use crate::ring::transport::LinkAbort;
use crate::ring::{ReduceOp, Ring, RingEndpoints, RingError, RingOptions, RingSpec};
use crate::sync::{self, Holding, Plan};

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
    #[error("gradient overlap: {0}")]
    Overlap(String),
    #[error("stopped: {0}")]
    Stopped(&'static str),
    #[error("non-finite gradient at step {step}: the all-reduced gradient holds a NaN or an Inf (on_nonfinite = \"fail\"; \"skip_step\" skips such steps)")]
    NonFinite { step: u64 },
    /// A panic in the training code (libtorch errors surface as panics in
    /// parts of tch), with its message's first line.
    #[error("trainer panicked: {0}")]
    Panicked(String),
}

/// All-reduce step ids outside the training steps' range, so the sync,
/// broadcasts, buffer averages and evaluations can never be confused with
/// a gradient step.
const BUFFERS_STEP: u64 = 1 << 61;
const SYNC_STEP: u64 = 1 << 62;
const BROADCAST_PARAMS: u64 = SYNC_STEP + 1;
const BROADCAST_BUFFERS: u64 = SYNC_STEP + 2;
/// The first optimizer state buffer's; the others follow.
const BROADCAST_OPTIMIZER_STATE: u64 = SYNC_STEP + 3;
const EVAL_STEP: u64 = 1 << 63;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Tells the coordinator this member failed the job for good.
pub fn report_failure(
    ctx: &TrainerContext,
    version: ringtrain_common::ParamVersion,
    error: String,
) {
    let a = &ctx.assignment;
    let report = pb::FinishReport::from(&FinishReport {
        worker: ctx.worker_id,
        job: a.job,
        generation: a.generation,
        version,
        error: Some(error),
    });
    let mut client = ctx.client.clone();
    if let Err(e) = ctx.runtime.block_on(client.report_finish(report)) {
        warn!(error = %e.message(), "could not report the failure");
    }
}

/// Runs one generation of the assignment and tells the coordinator how it
/// ended: finished, failed for good, or left because the ring broke.
///
/// A panic in training is caught here and fails the job with its message;
/// the worker lives on and takes new work. The ring stays connected until
/// the failure is reported, so the neighbours see the job fail rather than
/// a broken ring (which the coordinator would re-form, with this member).
pub fn run_and_report(ctx: &TrainerContext) {
    let a = &ctx.assignment;
    let span = info_span!("job", id = %a.job, rank = a.rank.0, gen = a.generation.0);
    let _g = span.enter();
    let mut state = match lock(&ctx.state).take() {
        Some(s) if s.job == a.job => Some(s),
        _ => None,
    };
    let mut ring = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run(ctx, &mut state, &mut ring)
    }))
    .unwrap_or_else(|payload| {
        // A state left half-updated by the panic is not trained on again.
        state = None;
        Err(TrainError::Panicked(crate::panic_payload_message(
            payload.as_ref(),
        )))
    });
    *lock(&ctx.abort) = None;
    let version = state.as_ref().map(|s| s.version).unwrap_or_default();
    let mut client = ctx.client.clone();
    match result {
        Ok(()) => {
            let report = pb::FinishReport::from(&FinishReport {
                worker: ctx.worker_id,
                job: a.job,
                generation: a.generation,
                version,
                error: None,
            });
            if let Err(e) = ctx.runtime.block_on(client.report_finish(report)) {
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
            report_failure(ctx, version, e.to_string());
        }
    }
    drop(ring);
}

/// libtorch intra-op threads for a spec's `threads`: more than the machine's
/// cores only contend, and libtorch refuses what does not fit an i32.
fn intra_op_threads(wanted: usize) -> i32 {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    i32::try_from(wanted.clamp(1, cores)).unwrap_or(1)
}

/// The longest ring timeout a worker uses: deadlines past it would overflow
/// clocks, and a silent neighbour for a day is a dead one.
const MAX_RING_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// A spec's `ring.timeout_s` as a duration, within (0, [`MAX_RING_TIMEOUT`]].
fn ring_timeout(seconds: f64) -> Duration {
    Duration::try_from_secs_f64(seconds)
        .unwrap_or(MAX_RING_TIMEOUT)
        .clamp(Duration::from_millis(1), MAX_RING_TIMEOUT)
}

/// Test-only fault injection: `RINGTRAIN_FAULT_INJECT=trainer_panic_at_step=N`
/// makes this worker's trainer panic as it starts step N of any job. Every
/// panic a job spec could reach is refused by the spec's validation, and a
/// caught panic must still be tested end to end (tests/tests/robustness.rs).
fn panic_at_step() -> Option<u64> {
    static STEP: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *STEP.get_or_init(|| {
        let value = std::env::var("RINGTRAIN_FAULT_INJECT").ok()?;
        let step = value
            .strip_prefix("trainer_panic_at_step=")
            .and_then(|n| n.parse().ok());
        match step {
            Some(n) => warn!(
                step = n,
                "fault injection: the trainer will panic at this step"
            ),
            None => warn!(
                value = %ringtrain_common::quote(&value),
                "RINGTRAIN_FAULT_INJECT not understood (expected trainer_panic_at_step=N); ignored"
            ),
        }
        step
    })
}

fn run(
    ctx: &TrainerContext,
    slot: &mut Option<TrainingState>,
    ring_slot: &mut Option<Ring>,
) -> Result<(), TrainError> {
    let a = &ctx.assignment;
    tch::set_num_threads(intra_op_threads(a.spec.threads));
    // TorchScript runs op by op, as eager PyTorch does: the graph executor's
    // profiling and fusion passes cost more than they gain on these CPU
    // steps (measured: the TorchScript CNN at 0.89x the built-in CNN's
    // samples/s with them, 0.99x without; same results). Per thread.
    let _ = tch::jit::f_set_graph_executor_optimize(false);
    // Dropout differs by rank (as under DDP) and is reproducible.
    tch::manual_seed((a.spec.seed ^ (u64::from(a.rank.0) << 32)) as i64);
    if slot.is_none() {
        let script = ctx
            .runtime
            .block_on(ctx.model_files.get(&a.spec.model))
            .map_err(|e| TrainError::ModelFile(e.to_string()))?;
        *slot = Some(job::fresh(
            a.job,
            &a.spec,
            script.as_deref().map(Vec::as_slice),
        )?);
    }
    let st = slot.as_mut().ok_or(TrainError::Stopped("no state"))?;
    let ring_spec = RingSpec {
        job: a.job,
        generation: a.generation,
        rank: a.rank,
        members: a.members.clone(),
        key: a.ring_key.clone(),
        options: RingOptions {
            transport: a.spec.ring.transport,
            encoding: a.spec.ring.wire_encoding(),
            timeout: ring_timeout(a.spec.ring.timeout_s),
            // Overlapped steps reduce in pieces of a few MiB: finer segments
            // let each ring step forward its data sooner (measured on the
            // lab at 1 Gbit/s, CNN W=4: 1.03x the samples/s of 512 KiB).
            segment_elems: if a.spec.ring.overlap.applies(&a.members) {
                OVERLAP_SEGMENT_ELEMS
            } else {
                RingOptions::default().segment_elems
            },
            ..RingOptions::default()
        },
    };
    let ring = ring_slot.insert(
        ctx.runtime
            .block_on(Ring::connect(ring_spec, &ctx.endpoints))?,
    );
    *lock(&ctx.abort) = ring.abort_handle();
    if ctx.cancel.load(Ordering::SeqCst) {
        return Err(TrainError::Stopped("left before the ring formed"));
    }
    let mut t = Trainer {
        ctx,
        client: ctx.client.clone(),
        ring_slot,
        st,
        pending: None,
        report_in_flight: None,
    };
    t.sync()?;
    let trained = t.train();
    t.abandon_pending();
    // Whatever ended training, the last step's report is answered before
    // anything else is said to the coordinator, so reports arrive in order.
    let settled = t.settle_report();
    trained.and(settled)
}

struct Trainer<'a> {
    ctx: &'a TrainerContext,
    client: WorkerControlClient<Channel>,
    /// The ring; away while a step's reduction thread holds it.
    ring_slot: &'a mut Option<Ring>,
    st: &'a mut TrainingState,
    /// A step whose buckets are still being reduced (see [`pipeline`]).
    pending: Option<pipeline::Pending>,
    /// The last step's report, its answer not awaited yet (see
    /// [`Trainer::settle_report`]).
    report_in_flight: Option<tokio::task::JoinHandle<Result<pb::StepReply, tonic::Status>>>,
}

impl Drop for Trainer<'_> {
    /// Unwinding from a panic with a step pending: take the ring back.
    fn drop(&mut self) {
        self.abandon_pending();
    }
}

/// The ring, unless a step's reduction holds it (a bug, never a peer's doing).
fn ring_of(slot: &mut Option<Ring>) -> Result<&mut Ring, RingError> {
    slot.as_mut()
        .ok_or_else(|| RingError::Broken("the ring is still with a step's reduction".into()))
}

/// How a completed step ended, for its report.
struct Conclusion {
    hash: u64,
    skipped: bool,
    step_s: f64,
    finished_unix_s: f64,
    epoch_after: u64,
    allreduce_bytes: usize,
    total: u64,
}

/// `indices` cut into `parts` balanced micro-batches (some may be empty).
fn micro_batches(indices: &[i64], parts: usize) -> Vec<&[i64]> {
    let parts = parts.max(1);
    let (base, rem) = (indices.len() / parts, indices.len() % parts);
    let mut out = Vec::with_capacity(parts);
    let mut at = 0;
    for i in 0..parts {
        let len = base + usize::from(i < rem);
        out.push(&indices[at..at + len]);
        at += len;
    }
    out
}

/// The wall clock in Unix seconds, as step reports carry it.
fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Ring segment for overlapped steps (see [`run`]).
const OVERLAP_SEGMENT_ELEMS: usize = 32 * 1024;

/// DDP's first bucket: small, so that the first reduce starts early.
const FIRST_BUCKET_BYTES: usize = 1 << 20;

/// The step's forward and backward passes, one per micro-batch; returns the
/// mean loss over this rank's samples. With a `filler`, each pass hands its
/// gradients to it as backward produces them.
fn forward_backward(
    model: &mut crate::model::Model,
    data: &data::Dataset,
    micros: &[&[i64]],
    in_step: u64,
    mut filler: Option<&mut overlap::BucketFiller<'_>>,
    mut gate: Option<&mut dyn crate::model::ForwardGate>,
    data_s: &mut f64,
) -> Result<f64, TrainError> {
    let mut loss_sum = 0.0;
    let mut samples = 0;
    for (i, micro) in micros.iter().enumerate() {
        let t_data = Instant::now();
        let (x, y) = info_span!("data").in_scope(|| data.train.batch(micro));
        *data_s += t_data.elapsed().as_secs_f64();
        // Only the first micro-batch's forward pass waits for parameters.
        let gate = if i == 0 { gate.take() } else { None };
        let loss = match filler.as_deref_mut() {
            Some(f) => {
                let sink = f.pass(i + 1 == micros.len());
                model.accumulate_gradients_into(&x, &y, in_step, sink, gate)?
            }
            None => model.accumulate_gradients(&x, &y, in_step)?,
        };
        loss_sum += loss * micro.len() as f64;
        samples += micro.len();
    }
    Ok(loss_sum / samples.max(1) as f64)
}

/// Parameters one pass of [`step_copy_hash`] takes at a time (256 KiB of
/// f32): small enough that the copy and the hash read them from cache.
const FUSED_ELEMS: usize = 1 << 16;

/// One descent step over the flat parameters, the model's tensors made to
/// match, and the parameters' hash ([`checkpoint::param_hash`]). On the CPU
/// in cache-sized ranges, each updated, copied and hashed in turn, instead
/// of three passes over the whole model in memory.
fn step_copy_hash(st: &mut TrainingState, grads: &[f32], lr: f32, step: u64) -> u64 {
    if st.model.device() != tch::Device::Cpu {
        // A partial copy to a device is a whole parameter's.
        st.optimizer.step(&mut st.params, grads, lr, step);
        st.model.flat_to_params(&st.params);
        return checkpoint::param_hash(&st.params);
    }
    let fresh = st.optimizer.is_fresh();
    // Parameters that are not plain CPU memory take a libtorch copy per piece.
    let mut fallback = st
        .model
        .params_memory()
        .is_none()
        .then(|| (st.model.layout().clone(), st.model.param_handles()));
    let mut memory = st.model.params_memory();
    let mut hasher = checkpoint::ParamHasher::default();
    let n = st.params.len();
    for start in (0..n).step_by(FUSED_ELEMS) {
        let range = start..(start + FUSED_ELEMS).min(n);
        st.optimizer.step_range(
            &mut st.params[range.clone()],
            &grads[range.clone()],
            start,
            lr,
            step,
            fresh,
        );
        match memory.as_mut() {
            Some(spans) => {
                for (span, values) in spans.iter_mut() {
                    let (from, to) = (span.start.max(range.start), span.end.min(range.end));
                    if from < to {
                        values[from - span.start..to - span.start]
                            .copy_from_slice(&st.params[from..to]);
                    }
                }
            }
            None => {
                if let Some((layout, handles)) = fallback.as_mut() {
                    crate::model::copy_range_into_params(layout, handles, &st.params, range.clone())
                }
            }
        }
        hasher.update(&st.params[range]);
    }
    hasher.finish()
}

/// A coordinator's answer, its refusals as training errors.
fn coordinator_answer<T>(answer: Result<T, tonic::Status>) -> Result<T, TrainError> {
    answer.map_err(|e| {
        if e.code() == tonic::Code::FailedPrecondition {
            // Fenced: this worker is no longer in the job's current ring
            // generation, so nothing it does for it counts.
            warn!(reason = %e.message(), "the coordinator refused a report");
            TrainError::Stopped("the coordinator fenced this ring generation")
        } else {
            TrainError::Coordinator(e.message().to_string())
        }
    })
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

    /// A blocking call to the coordinator.
    fn call<T>(
        &self,
        f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, TrainError> {
        coordinator_answer(
            self.ctx
                .runtime
                .block_on(f)
                .map(tonic::Response::into_inner),
        )
    }

    /// Waits for the answer to the last step's report: an error if the
    /// coordinator ended the generation. A step's report goes out as the
    /// step ends and its answer is awaited only before the next step's
    /// all-reduce (or the next call to the coordinator), so the round trip
    /// overlaps the next forward and backward pass; a member told to stop
    /// still stops before the next step changes anything.
    fn settle_report(&mut self) -> Result<(), TrainError> {
        let Some(in_flight) = self.report_in_flight.take() else {
            return Ok(());
        };
        let t_wait = Instant::now();
        let answer = self.ctx.runtime.block_on(in_flight).map_err(|e| {
            TrainError::Coordinator(format!("the step report did not complete: {e}"))
        })?;
        let reply = coordinator_answer(answer)?;
        tracing::debug!(
            report_wait_s = t_wait.elapsed().as_secs_f64(),
            "step report answered"
        );
        if !reply.continue_job {
            return Err(TrainError::Stopped(
                "the coordinator ended this ring generation",
            ));
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
        ring_of(self.ring_slot)?.all_reduce_exact(SYNC_STEP, &mut table, ReduceOp::Sum)?;
        let members = sync::decode(&table, world)?;
        let (source, from) = match sync::plan(&members) {
            Plan::InSync { version } => {
                info!(%version, world, "ring formed; all members hold the newest version");
                return Ok(());
            }
            Plan::Broadcast { source, from } => (source, Some(from)),
            Plan::Fresh => {
                // Nobody has trained yet: every member starts from the same
                // checkpoint or init; rank 0's copy is made everyone's.
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
        let t0 = Instant::now();
        // Zeros from every other rank make each sum an exact copy of the source's.
        if rank != source {
            st.params.fill(0.0);
        }
        ring_of(self.ring_slot)?.all_reduce_exact(
            BROADCAST_PARAMS,
            &mut st.params,
            ReduceOp::Sum,
        )?;
        let mut buffers = if rank == source {
            st.model.exact_buffers()
        } else {
            vec![0f32; st.model.exact_buffer_len()]
        };
        ring_of(self.ring_slot)?.all_reduce_exact(
            BROADCAST_BUFFERS,
            &mut buffers,
            ReduceOp::Sum,
        )?;
        st.model.set_exact_buffers(&buffers)?;
        if has_optimizer_state {
            // Every buffer the optimizer keeps, in its order (the source has
            // them all once it has stepped).
            let n = st.params.len();
            for (i, &name) in st.optimizer.state_names().iter().enumerate() {
                let mut buf = match st.optimizer.state().iter().find(|(s, _)| *s == name) {
                    Some((_, b)) if rank == source => b.to_vec(),
                    _ => vec![0f32; n],
                };
                ring_of(self.ring_slot)?.all_reduce_exact(
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
        let samples = self.st.data.train.len() as u64;
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
        let schedule = Schedule::new(&spec.schedule, spec.optimizer.lr, total);
        let clip = spec.optimizer.clip_grad_norm as f32;
        let skip_nonfinite = spec.on_nonfinite == OnNonFinite::SkipStep;
        let fault_step = panic_at_step();
        let mut perm_epoch = u64::MAX;
        let mut perm: Vec<u32> = Vec::new();
        let recorder = metrics::Recorder::new(&self.ctx.metrics, &self.ctx.assignment);
        let mut grads = vec![0f32; self.st.params.len()];
        let layout = self.st.model.layout().clone();
        // PowerSGD's factors are reduced after backward (they are small);
        // each generation starts its warm start and error feedback afresh.
        let mut powersgd = spec
            .ring
            .compression
            .and_then(|c| c.powersgd_rank())
            .filter(|_| world > 1)
            .map(|r| powersgd::PowerSgd::new(&layout, r, spec.seed ^ self.st.version.0));
        if let Some(p) = &powersgd {
            info!(
                sent = p.sent_elements(),
                of = layout.total(),
                "PowerSGD: elements sent per step"
            );
        }
        // Overlap needs a ring to overlap with.
        let overlap = spec.ring.overlap.applies(&self.ctx.assignment.members);
        let bucket_plan = (overlap && world > 1 && powersgd.is_none()).then(|| {
            Arc::new(overlap::BucketPlan::new(
                &layout,
                FIRST_BUCKET_BYTES / 4,
                (spec.ring.bucket_mb * (1 << 20) as f64 / 4.0) as usize,
            ))
        });
        let mut buffers = vec![0f32; self.st.model.buffer_layout().total()];
        // A step may be left pending (its update finished by the next
        // forward pass) only when the update needs nothing global.
        let pipeline =
            bucket_plan.is_some() && clip == 0.0 && !skip_nonfinite && buffers.is_empty();
        // Bucket buffers: one set being filled, one still being reduced.
        let mut spare: Vec<Vec<Vec<f32>>> = Vec::new();
        let mut audit = self.audit_file()?;
        // Epochs bound the job by data, max_steps by versions: with a ring that
        // changes size, steps per epoch change, so `total` is an estimate.
        let done_at = |version: u64, cursor: data_plan::ShardCursor| {
            (spec.max_steps > 0 && version >= spec.max_steps)
                || (spec.epochs > 0 && cursor.epoch >= spec.epochs)
        };
        let due = |version: u64, every: u64| every > 0 && version.is_multiple_of(every);
        info!(total_steps = total, world, global_batch, version = %self.st.version, pipeline, "training");
        loop {
            // Where the next step starts: after the pending step, if any.
            let (before, cursor) = match &self.pending {
                Some(p) => (p.record.version, p.cursor_after),
                None => (self.st.version.0, self.st.cursor),
            };
            if done_at(before, cursor) {
                break;
            }
            self.stop_if_cancelled()?;
            if bucket_plan.is_some() {
                // Buckets start changing things during backward, the
                // pending step's updates during the forward pass.
                self.settle_report()?;
            }
            let step = before + 1;
            let a = &self.ctx.assignment;
            let job = a.job.to_string();
            let span = info_span!(
                "step",
                version = step,
                job = %job,
                step,
                rank = a.rank.0,
                generation = a.generation.0,
                worker = %self.ctx.worker_id,
            );
            // Every member's step span is a child of one span context made
            // from (job, generation, step): one trace per step, no messages.
            telemetry::set_step_parent(&span, &job, a.generation.0, step);
            let _g = span.enter();
            let started = Instant::now();
            let started_unix_s = unix_seconds();
            if fault_step == Some(step) {
                panic!("fault injection: RINGTRAIN_FAULT_INJECT=trainer_panic_at_step={step}");
            }
            let st = &mut *self.st;
            // The forward pass updates running statistics (BatchNorm): a
            // skipped step puts them back as they were, alike on every
            // replica (they were averaged at the end of the last step).
            let buffers_before = (skip_nonfinite && st.model.exact_buffer_len() > 0)
                .then(|| st.model.exact_buffers());
            if perm_epoch != cursor.epoch {
                perm = data_plan::epoch_permutation(spec.seed, cursor.epoch, st.data.train.len());
                perm_epoch = cursor.epoch;
            }
            let positions = data_plan::step_positions(cursor, global_batch, samples);
            let mine = data_plan::rank_slice(&positions, rank, world);
            let indices: Vec<i64> = mine.clone().map(|p| i64::from(perm[p as usize])).collect();
            let in_step = positions.end - positions.start;
            let cursor_after = data_plan::advance(cursor, &positions, samples);
            let mut record = pipeline::StepRecord {
                version: step,
                epoch_of_step: cursor.epoch,
                audit_ids: audit
                    .is_some()
                    .then(|| positions.clone().map(|p| perm[p as usize]).collect()),
                samples: indices.len(),
                started_unix_s,
                lr: schedule.lr(before),
                ..pipeline::StepRecord::default()
            };

            let micros = micro_batches(&indices, spec.accumulate);
            let mut data_s = 0.0;
            let t_fb = Instant::now();
            crate::ring::engine::take_receive_wait();
            let (loss, comm) = match &bucket_plan {
                // The gradient's buckets are reduced as backward fills them.
                Some(plan) => {
                    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
                    let bucket_buffers = spare.pop().unwrap_or_else(|| plan.new_buffers());
                    let mut filler =
                        overlap::BucketFiller::new(plan, &layout, bucket_buffers, ready_tx);
                    let mut handles = st.model.param_handles();
                    let pending = self.pending.take();
                    let ring = if pending.is_none() {
                        self.ring_slot.take()
                    } else {
                        None
                    };
                    let mut applier = pipeline::Applier {
                        pending,
                        ring,
                        plan,
                        layout: &layout,
                        params: &mut st.params,
                        optimizer: &mut st.optimizer,
                        handles: &mut handles,
                        version: step,
                        ready: Some(ready_rx),
                        span: &span,
                        completed: None,
                        started: None,
                        spare: None,
                        failure: None,
                        apply_s: 0.0,
                    };
                    let fb = info_span!("forward_backward").in_scope(|| {
                        st.model.zero_grads();
                        forward_backward(
                            &mut st.model,
                            &st.data,
                            &micros,
                            in_step,
                            Some(&mut filler),
                            Some(&mut applier),
                            &mut data_s,
                        )
                    });
                    applier.settle();
                    if let Some(ring) = applier.ring.take() {
                        *self.ring_slot = Some(ring);
                    }
                    let completed = applier.completed.take();
                    let inflight = applier.started.take();
                    spare.extend(applier.spare.take());
                    let failure = applier.failure.take();
                    drop(applier);
                    if let Some(c) = &completed {
                        st.version = ringtrain_common::ParamVersion(c.record.version);
                        st.cursor = c.cursor_after;
                        self.ctx.progress.store(st.version.0, Ordering::Relaxed);
                    }
                    let late = filler.late();
                    let failed = match (failure, fb, late) {
                        (Some(f), _, _) => Some(match f {
                            pipeline::Failure::NonFinite(step) => TrainError::NonFinite { step },
                            pipeline::Failure::Overlap(overlap::OverlapError::Ring(e)) => {
                                TrainError::Ring(e)
                            }
                            pipeline::Failure::Overlap(e) => TrainError::Overlap(e.to_string()),
                        }),
                        (None, Err(e), _) => Some(e),
                        (None, Ok(_), true) => Some(TrainError::Overlap(
                            overlap::OverlapError::LateGradient.to_string(),
                        )),
                        (None, Ok(loss), false) => {
                            record.loss = loss;
                            None
                        }
                    };
                    if let Some(e) = failed {
                        // The filler goes first: the reduction's thread may
                        // be waiting for its next bucket.
                        drop(filler);
                        if let Some(inflight) = inflight {
                            *self.ring_slot = inflight.cancel();
                        }
                        return Err(e);
                    }
                    filler.flush();
                    drop(filler);
                    let Some(mut inflight) = inflight else {
                        return Err(TrainError::Overlap("no reduction was started".into()));
                    };
                    record.data_s = data_s;
                    record.forward_backward_s = t_fb.elapsed().as_secs_f64() - data_s;
                    // The step completed during this forward pass reports now.
                    if let Some(c) = completed {
                        let st = &*self.st;
                        let hash = checkpoint::param_hash(&st.params)
                            ^ st.model.state_hash().rotate_left(17);
                        let step_s = c.finished_unix_s - c.record.started_unix_s;
                        let conclusion = Conclusion {
                            hash,
                            skipped: false,
                            step_s,
                            finished_unix_s: c.finished_unix_s,
                            epoch_after: c.cursor_after.epoch,
                            allreduce_bytes: layout.total() * 4,
                            total,
                        };
                        if let Err(e) =
                            self.conclude(&c.record, &conclusion, &recorder, &mut audit, false)
                        {
                            *self.ring_slot = inflight.cancel();
                            return Err(e);
                        }
                    }
                    let st = &mut *self.st;
                    let last_in_line = done_at(step, cursor_after)
                        || due(step, spec.eval_every_steps)
                        || due(step, spec.checkpoint.every_steps)
                        || self.ctx.cancel.load(Ordering::SeqCst);
                    if pipeline && !last_in_line {
                        let fresh = st.optimizer.is_fresh();
                        self.pending = Some(pipeline::Pending::new(
                            record,
                            cursor_after,
                            fresh,
                            inflight,
                            plan.pieces().len(),
                            span.clone(),
                        ));
                        continue;
                    }
                    // This step completes now: every bucket, then the whole
                    // gradient's path below.
                    let t_wait = Instant::now();
                    inflight.waited = std::time::Duration::ZERO;
                    let (ring, reduced) = inflight.finish();
                    *self.ring_slot = ring;
                    let (bucket_buffers, figures) = reduced.map_err(|e| match e {
                        overlap::OverlapError::Ring(e) => TrainError::Ring(e),
                        other => TrainError::Overlap(other.to_string()),
                    })?;
                    for (range, buf) in plan.pieces().iter().zip(&bucket_buffers) {
                        grads[range.clone()].copy_from_slice(buf);
                    }
                    spare.push(bucket_buffers);
                    (record.loss, Some((t_wait.elapsed(), figures)))
                }
                None => {
                    let loss = info_span!("forward_backward").in_scope(|| {
                        st.model.zero_grads();
                        forward_backward(
                            &mut st.model,
                            &st.data,
                            &micros,
                            in_step,
                            None,
                            None,
                            &mut data_s,
                        )
                    })?;
                    st.model.grads_to_flat(&mut grads);
                    record.data_s = data_s;
                    record.forward_backward_s = t_fb.elapsed().as_secs_f64() - data_s;
                    (loss, None)
                }
            };
            record.loss = loss;

            // The last step's report must be answered (go on or stop) before
            // this step changes anything.
            self.settle_report()?;
            let st = &mut *self.st;
            let t_ar = Instant::now();
            let ring = ring_of(self.ring_slot)?;
            let finite = info_span!("allreduce").in_scope(|| {
                // The reduced gradient is bit-identical on every replica (the
                // owner of each chunk keeps exactly what it sends), so every
                // replica takes the same branch from here on.
                let finite = match (&comm, powersgd.as_mut()) {
                    (Some(_), _) => optim::all_finite(&grads),
                    (None, Some(p)) => {
                        p.all_reduce(ring, before, &mut grads)?;
                        optim::all_finite(&grads)
                    }
                    // Checked by the ring as each reduced segment lands.
                    (None, None) => ring.all_reduce_finite(before, &mut grads, ReduceOp::Sum)?,
                };
                if finite && !buffers.is_empty() {
                    // Running statistics: the replicas' mean, exact and alike.
                    st.model.buffers_to_flat(&mut buffers);
                    ring.all_reduce_exact(BUFFERS_STEP | before, &mut buffers, ReduceOp::Mean)?;
                    st.model.flat_to_buffers(&buffers);
                }
                Ok::<_, RingError>(finite)
            })?;
            // With overlap: what the step waited for the buckets after
            // backward, plus the rest.
            record.allreduce_s = t_ar.elapsed().as_secs_f64()
                + comm
                    .as_ref()
                    .map_or(0.0, |(exposed, _)| exposed.as_secs_f64());
            record.ring_wait_s = crate::ring::engine::take_receive_wait().as_secs_f64()
                + comm
                    .as_ref()
                    .map_or(0.0, |(_, f)| f.ring_wait.as_secs_f64());
            if !finite {
                if let Some(p) = powersgd.as_mut() {
                    p.reset_error();
                }
                if !skip_nonfinite {
                    return Err(TrainError::NonFinite { step });
                }
                warn!(
                    step,
                    "non-finite gradient after the all-reduce: step skipped on every replica"
                );
                if let Some(before) = &buffers_before {
                    st.model.set_exact_buffers(before)?;
                }
            }

            let t_opt = Instant::now();
            let lr = record.lr;
            let (hash, grad_norm) = info_span!("optimizer").in_scope(|| {
                // A skipped step leaves parameters and optimizer state as they
                // were; the version, the schedule and the step count `t`
                // (AdamW's bias correction) still move on.
                let updated = finite.then(|| {
                    // Every replica holds the same reduced gradient, so the same norm.
                    let norm = (clip > 0.0).then(|| optim::clip_grad_norm(&mut grads, clip));
                    (norm, step_copy_hash(st, &grads, lr as f32, step))
                });
                let params_hash = match updated {
                    Some((_, hash)) => hash,
                    None => checkpoint::param_hash(&st.params),
                };
                let hash = params_hash ^ st.model.state_hash().rotate_left(17);
                (hash, updated.and_then(|(norm, _)| norm))
            });
            record.optimizer_s = t_opt.elapsed().as_secs_f64();
            st.version = st.version.next();
            st.cursor = cursor_after;
            self.ctx.progress.store(st.version.0, Ordering::Relaxed);
            tracing::debug!(grad_norm, "step updated");
            let conclusion = Conclusion {
                hash,
                skipped: !finite,
                step_s: started.elapsed().as_secs_f64(),
                finished_unix_s: unix_seconds(),
                epoch_after: cursor_after.epoch,
                allreduce_bytes: (grads.len() + buffers.len()) * 4,
                total,
            };
            // The answer is awaited before the next step's all-reduce; but a
            // forward pass changes running statistics, so a model that has
            // them waits now (a member told to stop keeps them as they were).
            let defer_answer = buffers.is_empty() && self.st.model.exact_buffer_len() == 0;
            self.conclude(&record, &conclusion, &recorder, &mut audit, defer_answer)?;
            let last = done_at(step, cursor_after);
            if due(step, spec.eval_every_steps) && !last {
                self.evaluate()?;
            }
            if due(step, spec.checkpoint.every_steps) && !last {
                self.checkpoint()?;
            }
        }
        self.evaluate()?;
        self.checkpoint()?;
        Ok(())
    }

    /// Records a completed step (metrics, the sample audit) and reports it
    /// to the coordinator; an error if the coordinator ends the generation.
    /// With `defer_answer` the answer is awaited by [`Self::settle_report`].
    fn conclude(
        &mut self,
        r: &pipeline::StepRecord,
        c: &Conclusion,
        recorder: &metrics::Recorder,
        audit: &mut Option<std::fs::File>,
        defer_answer: bool,
    ) -> Result<(), TrainError> {
        tracing::debug!(
            version = r.version,
            data_s = r.data_s,
            forward_backward_s = r.forward_backward_s,
            allreduce_s = r.allreduce_s,
            optimizer_s = r.optimizer_s,
            step_s = c.step_s,
            loss = r.loss,
            lr = r.lr,
            "step done"
        );
        if let (Some(f), Some(ids)) = (audit.as_mut(), &r.audit_ids) {
            let mut line =
                serde_json::json!({"version": r.version, "epoch": r.epoch_of_step, "ids": ids})
                    .to_string();
            line.push('\n');
            // One write: a worker killed mid-step leaves whole lines only
            // (`writeln!` writes a line in many pieces).
            f.write_all(line.as_bytes())?;
        }
        recorder.step(&metrics::StepFigures {
            samples: r.samples,
            loss: r.loss,
            version: r.version,
            data_s: r.data_s,
            forward_backward_s: r.forward_backward_s,
            allreduce_s: r.allreduce_s,
            ring_wait_s: r.ring_wait_s,
            optimizer_s: r.optimizer_s,
            step_s: c.step_s,
            allreduce_bytes: c.allreduce_bytes,
            lr: r.lr,
            skipped_nonfinite: c.skipped,
        });
        let a = &self.ctx.assignment;
        let report = StepReport {
            worker: self.ctx.worker_id,
            job: a.job,
            generation: a.generation,
            rank: a.rank,
            version: ringtrain_common::ParamVersion(r.version),
            param_hash: c.hash,
            loss: r.loss,
            samples: r.samples as u64,
            step_seconds: c.step_s,
            allreduce_seconds: r.allreduce_s,
            epoch: c.epoch_after,
            total_steps: c.total,
            skipped_nonfinite: c.skipped,
            started_unix_s: r.started_unix_s,
            finished_unix_s: c.finished_unix_s,
        };
        self.settle_report()?;
        let mut client = self.client.clone();
        let report = pb::StepReport::from(&report);
        self.report_in_flight = Some(self.ctx.runtime.spawn(async move {
            client
                .report_step(report)
                .await
                .map(tonic::Response::into_inner)
        }));
        if !defer_answer {
            self.settle_report()?;
        }
        Ok(())
    }

    /// A step still pending when training stops (an error, or the
    /// generation ends): its reduction is stopped and the ring taken back.
    /// Nothing of it was applied, so the state is the last completed step's.
    fn abandon_pending(&mut self) {
        if let Some(p) = self.pending.take() {
            // After a panic the ring must stay connected until the failure
            // is reported (see `run_and_report`), so the reduction, which
            // every member has all buckets for, runs to its end instead.
            let ring = if std::thread::panicking() {
                p.inflight.finish().0
            } else {
                p.inflight.cancel()
            };
            if let Some(ring) = ring {
                *self.ring_slot = Some(ring);
            }
        }
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
    /// (correct, loss sum, count, ranks with an accuracy) gives every rank
    /// the totals. Nothing to do without a test split.
    fn evaluate(&mut self) -> Result<(), TrainError> {
        self.settle_report()?;
        let n = self.st.data.test.len() as u64;
        if n == 0 {
            return Ok(());
        }
        let mine = data_plan::rank_slice(&(0..n), self.rank(), self.world());
        let indices: Vec<i64> = mine.map(|i| i as i64).collect();
        let (x, y) = self.st.data.test.batch(&indices);
        let sums = self.st.model.evaluate(&x, &y)?;
        let mut totals = [
            sums.correct.unwrap_or(0.0) as f32,
            sums.loss_sum as f32,
            sums.count as f32,
            f32::from(u8::from(sums.correct.is_some())),
        ];
        ring_of(self.ring_slot)?.all_reduce_exact(
            EVAL_STEP | self.st.version.0,
            &mut totals,
            ReduceOp::Sum,
        )?;
        let count = f64::from(totals[2]).max(1.0);
        let accuracy = if totals[3] as usize == self.world() {
            f64::from(totals[0]) / count
        } else {
            f64::NAN
        };
        let loss = f64::from(totals[1]) / count;
        if self.rank() == 0 {
            info!(version = %self.st.version, test_accuracy = accuracy, test_loss = loss, "evaluation");
            let a = &self.ctx.assignment;
            let report = EvalReport {
                worker: self.ctx.worker_id,
                job: a.job,
                generation: a.generation,
                version: self.st.version,
                accuracy,
                loss,
                samples: n,
            };
            self.call(
                self.client
                    .clone()
                    .report_eval(pb::EvalReport::from(&report)),
            )?;
        }
        Ok(())
    }

    /// Rank 0 writes the checkpoint (every replica holds the same state).
    fn checkpoint(&mut self) -> Result<(), TrainError> {
        self.settle_report()?;
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
            model: st.model.description().to_string(),
            num_params: st.params.len(),
            param_hash: checkpoint::param_hash(&st.params),
            optimizer_hash: 0,
            spec: a.spec.to_toml(),
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
        self.call(
            self.client
                .clone()
                .report_checkpoint(pb::CheckpointReport::from(&report)),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use ringtrain_common::wire::WireEncoding;
    use ringtrain_common::{JobId, Rank, RingGeneration};

    use super::{micro_batches, optim, ring_timeout, Duration, ReduceOp, Ring, MAX_RING_TIMEOUT};
    use crate::ring::{tcp, RingEndpoints, RingOptions, RingSpec};

    /// `world` members of a TCP ring in this process.
    async fn ring_of(world: usize, encoding: WireEncoding) -> Vec<Ring> {
        let mut endpoints = Vec::new();
        let mut addrs = Vec::new();
        for _ in 0..world {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addrs.push(listener.local_addr().unwrap().to_string());
            endpoints.push(RingEndpoints {
                tcp: Some(tcp::TcpInbox::serve(listener, std::future::pending()).unwrap()),
                grpc: None,
            });
        }
        let options = RingOptions {
            encoding,
            // Small segments: the values cross many chunks and owners.
            segment_elems: 16,
            ..RingOptions::default()
        };
        let key = ringtrain_common::ring_key::RingKey::random();
        let connects = endpoints.iter().enumerate().map(|(rank, e)| {
            let spec = RingSpec {
                job: JobId(1),
                generation: RingGeneration(1),
                rank: Rank(rank as u32),
                members: addrs.clone(),
                key: key.clone(),
                options: options.clone(),
            };
            Ring::connect(spec, e)
        });
        futures::future::try_join_all(connects).await.unwrap()
    }

    /// The non-finite check runs on the all-reduced gradient, which every
    /// rank holds bit for bit alike (each chunk's owner keeps exactly what
    /// it sends, rounded to the wire encoding): so every rank decides
    /// alike, whichever rank's gradient held the NaN or the Inf, and also
    /// when only the sum overflows, or only the f16 wire does.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_rank_sees_a_nonfinite_reduced_gradient_alike() {
        const LEN: usize = 300;
        let world = 3;
        /// Values put in the ranks' gradients: (rank, index, value).
        type Poison = &'static [(usize, usize, f32)];
        // (poison, wire encoding, finite after the reduce?)
        let cases: [(Poison, WireEncoding, bool); 7] = [
            (&[], WireEncoding::F32, true),
            (&[(1, 5, f32::NAN)], WireEncoding::F32, false),
            (&[(2, 299, f32::NEG_INFINITY)], WireEncoding::Bf16, false),
            (
                &[(0, 100, f32::INFINITY), (2, 100, f32::NEG_INFINITY)],
                WireEncoding::F32,
                false,
            ),
            // Finite on every rank; the sum overflows f32.
            (&[(0, 200, 3e38), (1, 200, 3e38)], WireEncoding::F32, false),
            // Finite in f32, past f16's largest value (65504) on the wire.
            (
                &[(0, 42, 40_000.0), (1, 42, 40_000.0)],
                WireEncoding::F16,
                false,
            ),
            (&[(1, 42, 40_000.0)], WireEncoding::F16, true),
        ];
        for (poison, encoding, finite) in cases {
            let rings = ring_of(world, encoding).await;
            let inputs: Vec<Vec<f32>> = (0..world)
                .map(|rank| {
                    let mut g: Vec<f32> = (0..LEN).map(|i| (i + rank) as f32 * 0.01).collect();
                    for &(r, at, v) in poison {
                        if r == rank {
                            g[at] = v;
                        }
                    }
                    g
                })
                .collect();
            let outs = tokio::task::spawn_blocking(move || {
                let threads: Vec<_> = rings
                    .into_iter()
                    .zip(inputs)
                    .map(|(mut ring, mut g)| {
                        std::thread::spawn(move || {
                            ring.all_reduce(1, &mut g, ReduceOp::Sum).unwrap();
                            g
                        })
                    })
                    .collect();
                threads
                    .into_iter()
                    .map(|t| t.join().unwrap())
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap();
            let bits = |g: &[f32]| g.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            for (rank, g) in outs.iter().enumerate() {
                assert_eq!(
                    bits(g),
                    bits(&outs[0]),
                    "{poison:?} {encoding:?}: rank {rank} differs"
                );
                assert_eq!(
                    optim::all_finite(g),
                    finite,
                    "{poison:?} {encoding:?} rank {rank}"
                );
            }
        }
    }

    #[test]
    fn ring_timeouts_out_of_range_are_clamped_not_panics() {
        assert_eq!(ring_timeout(10.0), Duration::from_secs(10));
        assert_eq!(ring_timeout(1e300), MAX_RING_TIMEOUT);
        assert_eq!(ring_timeout(f64::INFINITY), MAX_RING_TIMEOUT);
        assert_eq!(ring_timeout(0.0), Duration::from_millis(1));
        assert!(ring_timeout(f64::NAN) <= MAX_RING_TIMEOUT);
        assert_eq!(super::intra_op_threads(0), 1);
        assert!(super::intra_op_threads(usize::MAX) >= 1);
    }

    #[test]
    fn micro_batches_cover_the_slice_in_order_and_balance() {
        let idx: Vec<i64> = (0..10).collect();
        let parts = micro_batches(&idx, 3);
        assert_eq!(parts, [&idx[0..4], &idx[4..7], &idx[7..10]]);
        assert_eq!(micro_batches(&idx, 1), [&idx[..]]);
        let few = micro_batches(&idx[..2], 4);
        assert_eq!(
            few.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [1, 1, 0, 0]
        );
    }
}
