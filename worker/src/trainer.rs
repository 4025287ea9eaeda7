//! The training loop of one ring member, on its own thread (all of it is
//! blocking: libtorch and the ring). It talks to the coordinator through the
//! runtime handle.
//!
//! Each step: take this rank's slice of the step's global batch, forward and
//! backward with the loss scaled by 1/global_batch, ring all-reduce (sum) of
//! the flat gradient, which makes it the mean over the global batch whatever
//! the split, SGD on the flat parameters, report (version, hash).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringtrain_common::data_plan::{self, ShardCursor};
use ringtrain_common::jobspec::JobSpec;
use ringtrain_common::metrics::Metrics;
use ringtrain_common::{JobId, Rank, RingGeneration};
use ringtrain_proto as pb;
use ringtrain_proto::worker_control_client::WorkerControlClient;
use tonic::transport::Channel;
use tracing::{info, info_span, warn};

use crate::checkpoint::{self, CheckpointMeta};
use crate::data::{self, Split};
use crate::model::Model;
use crate::optim::Sgd;
use crate::ring::{ReduceOp, Ring, RingEndpoints, RingOptions, RingSpec, TransportKind};

/// What the coordinator asked this worker to do.
#[derive(Clone, Debug)]
pub struct Assignment {
    pub job: JobId,
    pub generation: RingGeneration,
    pub rank: Rank,
    pub members: Vec<String>,
    pub transport: TransportKind,
    pub spec: JobSpec,
    pub start_version: u64,
    pub resume_from: Option<PathBuf>,
    pub checkpoint_dir: PathBuf,
}

pub struct TrainerContext {
    pub worker_id: String,
    pub assignment: Assignment,
    pub client: WorkerControlClient<Channel>,
    pub runtime: tokio::runtime::Handle,
    pub endpoints: RingEndpoints,
    pub cancel: Arc<AtomicBool>,
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
    Ring(#[from] crate::ring::RingError),
    #[error("coordinator: {0}")]
    Coordinator(String),
    #[error("stopped: {0}")]
    Stopped(&'static str),
}

/// All-reduce step ids outside the training steps' range, so the broadcast
/// and evaluation exchanges can never be confused with a gradient step.
const BROADCAST_STEP: u64 = 1 << 62;
const EVAL_STEP: u64 = 1 << 63;

/// Runs the assignment and tells the coordinator how it ended.
pub fn run_and_report(ctx: TrainerContext) {
    let a = &ctx.assignment;
    let span = info_span!("job", id = %a.job, rank = a.rank.0, gen = a.generation.0);
    let _g = span.enter();
    let result = run(&ctx);
    let (version, error) = match &result {
        Ok(v) => (*v, String::new()),
        Err(TrainError::Stopped(why)) => {
            info!(why, "trainer stopped");
            return;
        }
        Err(e) => {
            warn!(error = %e, "training failed");
            (ctx.progress.load(Ordering::Relaxed), e.to_string())
        }
    };
    let mut client = ctx.client.clone();
    let report = pb::FinishReport {
        worker_id: ctx.worker_id.clone(),
        job_id: a.job.to_string(),
        param_version: version,
        error,
    };
    if let Err(e) = ctx.runtime.block_on(client.report_finish(report)) {
        warn!(error = %e.message(), "could not report the end of training");
    }
}

struct Trainer<'a> {
    ctx: &'a TrainerContext,
    client: WorkerControlClient<Channel>,
    ring: Ring,
    model: Model,
    params: Vec<f32>,
    grads: Vec<f32>,
    sgd: Sgd,
    version: u64,
    cursor: ShardCursor,
    test: Split,
}

fn run(ctx: &TrainerContext) -> Result<u64, TrainError> {
    let a = &ctx.assignment;
    let spec = &a.spec;
    tch::set_num_threads(spec.threads as i32);
    let dir = std::path::Path::new(&spec.dataset.path);
    let train = data::load_idx_split(dir, true)?;
    let test = data::load_idx_split(dir, false)?;

    let ring_spec = RingSpec {
        job: a.job,
        generation: a.generation,
        rank: a.rank,
        members: a.members.clone(),
        options: RingOptions {
            transport: a.transport,
            encoding: spec.ring.encoding,
            timeout: Duration::from_secs_f64(spec.ring.timeout_s),
            ..RingOptions::default()
        },
    };
    let ring = ctx
        .runtime
        .block_on(Ring::connect(ring_spec, &ctx.endpoints))?;
    let model = Model::new(spec.model, spec.seed as i64);
    let n = model.num_params();
    let mut params = vec![0f32; n];
    model.params_to_flat(&mut params);
    let mut sgd = Sgd::new(
        spec.optimizer.lr as f32,
        spec.optimizer.momentum as f32,
        spec.optimizer.weight_decay as f32,
    );
    let (mut version, mut cursor) = (0, ShardCursor::default());
    if let Some(dir) = &a.resume_from {
        let (meta, p, m) = checkpoint::load(dir, model.layout())?;
        params = p;
        sgd.momentum_buf = m;
        version = meta.param_version;
        cursor = meta.shard_cursor;
        info!(version, epoch = cursor.epoch, dir = %dir.display(), "resuming from checkpoint");
    }
    let mut t = Trainer {
        ctx,
        client: ctx.client.clone(),
        ring,
        model,
        params,
        grads: vec![0f32; n],
        sgd,
        version,
        cursor,
        test,
    };
    t.broadcast_from_rank0()?;
    t.train(&train)?;
    Ok(t.version)
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
            return Err(TrainError::Stopped("left the job"));
        }
        Ok(())
    }

    /// Makes rank 0's parameters (and momentum) everyone's: the others
    /// contribute zeros to a sum, which is exact.
    fn broadcast_from_rank0(&mut self) -> Result<(), TrainError> {
        let rank0 = self.rank() == 0;
        if !rank0 {
            self.params.fill(0.0);
        }
        self.ring.all_reduce(
            BROADCAST_STEP | self.version,
            &mut self.params,
            ReduceOp::Sum,
        )?;
        // Momentum exists on every rank or none (same spec, same checkpoint).
        if let Some(buf) = self.sgd.momentum_buf.as_mut() {
            if !rank0 {
                buf.fill(0.0);
            }
            self.ring.all_reduce(
                BROADCAST_STEP | (1 << 61) | self.version,
                buf,
                ReduceOp::Sum,
            )?;
        }
        self.model.flat_to_params(&self.params);
        Ok(())
    }

    fn train(&mut self, train: &Split) -> Result<(), TrainError> {
        let spec = self.ctx.assignment.spec.clone();
        let samples = train.len() as u64;
        let (rank, world) = (self.rank(), self.world());
        let global_batch = (spec.batch_size * world) as u64;
        let total = data_plan::total_steps(spec.epochs, spec.max_steps, samples, global_batch);
        let mut perm_epoch = u64::MAX;
        let mut perm: Vec<u32> = Vec::new();
        let job = self.ctx.assignment.job.to_string();
        let labels = [("job", job.as_str())];
        let m = self.ctx.metrics.clone();
        info!(
            total_steps = total,
            world,
            global_batch,
            params = self.params.len(),
            "training"
        );
        while self.version < total {
            self.stop_if_cancelled()?;
            let span = info_span!("step", version = self.version + 1);
            let _g = span.enter();
            let started = Instant::now();
            if perm_epoch != self.cursor.epoch {
                perm = data_plan::epoch_permutation(spec.seed, self.cursor.epoch, train.len());
                perm_epoch = self.cursor.epoch;
            }
            let positions = data_plan::step_positions(self.cursor, global_batch, samples);
            let mine = data_plan::rank_slice(&positions, rank, world);
            let indices: Vec<i64> = mine.clone().map(|p| i64::from(perm[p as usize])).collect();

            let t_data = Instant::now();
            let (x, y) = data::batch(train, &indices);
            let data_s = t_data.elapsed().as_secs_f64();

            let t_fb = Instant::now();
            self.model.zero_grads();
            let scale = 1.0 / (positions.end - positions.start) as f64;
            let loss = self.model.loss_and_backward(&x, &y, scale);
            self.model.grads_to_flat(&mut self.grads);
            let fb_s = t_fb.elapsed().as_secs_f64();

            let t_ar = Instant::now();
            self.ring
                .all_reduce(self.version, &mut self.grads, ReduceOp::Sum)?;
            let ar_s = t_ar.elapsed().as_secs_f64();

            let t_opt = Instant::now();
            self.sgd.step(&mut self.params, &self.grads);
            self.model.flat_to_params(&self.params);
            self.version += 1;
            self.cursor = data_plan::advance(self.cursor, &positions, samples);
            let hash = checkpoint::param_hash(&self.params);
            let opt_s = t_opt.elapsed().as_secs_f64();
            let step_s = started.elapsed().as_secs_f64();
            self.ctx.progress.store(self.version, Ordering::Relaxed);
            tracing::debug!(
                data_s,
                forward_backward_s = fb_s,
                allreduce_s = ar_s,
                optimizer_s = opt_s,
                loss,
                "step done"
            );

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
                (self.grads.len() * 4) as f64,
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
                self.version as f64,
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

            let report = pb::StepReport {
                worker_id: self.ctx.worker_id.clone(),
                job_id: job.clone(),
                ring_generation: self.ctx.assignment.generation.0,
                param_version: self.version,
                param_hash: hash,
                loss,
                samples: indices.len() as u64,
                step_seconds: step_s,
                allreduce_seconds: ar_s,
                epoch: self.cursor.epoch,
                rank: rank as u32,
                total_steps: total,
            };
            let reply = self
                .ctx
                .runtime
                .block_on(self.client.report_step(report))
                .map_err(|e| TrainError::Coordinator(e.message().to_string()))?
                .into_inner();
            if !reply.continue_job {
                return Err(TrainError::Stopped(
                    "the coordinator ended this job or ring",
                ));
            }
            let last = self.version == total;
            if spec.eval_every_steps > 0
                && self.version.is_multiple_of(spec.eval_every_steps)
                && !last
            {
                self.evaluate()?;
            }
            if spec.checkpoint.every_steps > 0
                && self.version.is_multiple_of(spec.checkpoint.every_steps)
                && !last
            {
                self.checkpoint()?;
            }
        }
        self.evaluate()?;
        self.checkpoint()?;
        Ok(())
    }

    /// Each rank scores its slice of the test set; a sum all-reduce of
    /// (correct, loss sum, count) gives every rank the totals.
    fn evaluate(&mut self) -> Result<(), TrainError> {
        let n = self.test.len() as u64;
        let mine = data_plan::rank_slice(&(0..n), self.rank(), self.world());
        let indices: Vec<i64> = mine.map(|i| i as i64).collect();
        let (x, y) = data::batch(&self.test, &indices);
        let (correct, loss_sum) = self.model.evaluate(&x, &y);
        let mut totals = [correct as f32, loss_sum as f32, indices.len() as f32];
        self.ring
            .all_reduce(EVAL_STEP | self.version, &mut totals, ReduceOp::Sum)?;
        let count = f64::from(totals[2]).max(1.0);
        let (accuracy, loss) = (f64::from(totals[0]) / count, f64::from(totals[1]) / count);
        if self.rank() == 0 {
            info!(
                version = self.version,
                test_accuracy = accuracy,
                test_loss = loss,
                "evaluation"
            );
            let report = pb::EvalReport {
                worker_id: self.ctx.worker_id.clone(),
                job_id: self.ctx.assignment.job.to_string(),
                param_version: self.version,
                test_accuracy: accuracy,
                test_loss: loss,
                samples: count as u64,
            };
            self.ctx
                .runtime
                .block_on(self.client.report_eval(report))
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
        let meta = CheckpointMeta {
            job_id: a.job.to_string(),
            param_version: self.version,
            epoch: self.cursor.epoch,
            shard_cursor: self.cursor,
            model: a.spec.model.to_string(),
            num_params: self.params.len(),
            param_hash: checkpoint::param_hash(&self.params),
        };
        let dir = checkpoint::save(
            &a.checkpoint_dir,
            &meta,
            self.model.layout(),
            &self.params,
            self.sgd.momentum_buf.as_deref(),
        )?;
        info!(version = self.version, dir = %dir.display(), "checkpoint saved");
        let report = pb::CheckpointReport {
            worker_id: self.ctx.worker_id.clone(),
            job_id: a.job.to_string(),
            param_version: self.version,
            dir: dir.to_string_lossy().into_owned(),
        };
        self.ctx
            .runtime
            .block_on(self.client.report_checkpoint(report))
            .map_err(|e| TrainError::Coordinator(e.message().to_string()))?;
        Ok(())
    }
}
