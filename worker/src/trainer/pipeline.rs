//! Steps that overlap across their boundary. With overlap on, a step's
//! gradient buckets are still being reduced when the step ends: the next
//! step's forward pass starts at once, and each bucket's update (the
//! optimizer on its slice of the parameters, then the copy into the model)
//! happens just before the forward pass first uses its parameters. The
//! first layers' buckets fill last in backward but are reduced first (see
//! [`super::overlap::reduce_buckets`]), so the convolutions of the next
//! step run while the large dense layer's gradient is still on the wire.
//!
//! Every replica applies the same reduced slices with the same optimizer,
//! elementwise, so the result is bit for bit what one whole step gives; the
//! step only *completes* (version and cursor move on) once every bucket is
//! applied, before the next backward pass. If a bucket never arrives (a ring
//! failure) or is not finite, the buckets already applied are undone from
//! their backups, so the state left behind is exactly the last completed
//! step's.
//!
//! Only steps whose update needs nothing global are left pending: no
//! gradient clipping (a global norm), no `skip_step` on non-finite
//! gradients (a global check), no buffers to average, and not a step that
//! ends the job or is followed by an evaluation or a checkpoint.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use ringtrain_common::data_plan::ShardCursor;
use tch::Tensor;
use tracing::Span;

use super::overlap::{BucketPlan, InFlight, OverlapError};
use crate::model::{copy_range_into_params, ForwardGate, ParamLayout};
use crate::optim::{self, Optimizer};
use crate::ring::Ring;

/// What a step reports once it is complete.
#[derive(Debug, Clone, Default)]
pub(super) struct StepRecord {
    /// The version the step makes.
    pub version: u64,
    pub epoch_of_step: u64,
    /// The global sample ids of the step (only with `audit_samples`).
    pub audit_ids: Option<Vec<u32>>,
    pub samples: usize,
    pub loss: f64,
    pub data_s: f64,
    pub forward_backward_s: f64,
    pub allreduce_s: f64,
    pub ring_wait_s: f64,
    pub optimizer_s: f64,
    pub started_unix_s: f64,
    pub lr: f64,
}

/// A step whose buckets are still being reduced.
pub(super) struct Pending {
    pub record: StepRecord,
    pub cursor_after: ShardCursor,
    /// Whether the optimizer held no state before this step.
    pub fresh: bool,
    pub inflight: InFlight,
    /// Per piece (see [`BucketPlan::pieces`]): its update is in the
    /// parameters.
    pub applied: Vec<bool>,
    /// What the applied buckets overwrote, until the step is complete.
    backups: Vec<Backup>,
    /// The step's span (open until the step completes), and its optimizer
    /// phase's, from the first piece applied to the last.
    span: Span,
    optimizer_span: Option<Span>,
}

struct Backup {
    piece: usize,
    params: Vec<f32>,
    state: Vec<Vec<f32>>,
}

impl Pending {
    pub fn new(
        record: StepRecord,
        cursor_after: ShardCursor,
        fresh: bool,
        inflight: InFlight,
        pieces: usize,
        span: Span,
    ) -> Self {
        Self {
            record,
            cursor_after,
            fresh,
            inflight,
            applied: vec![false; pieces],
            backups: Vec::new(),
            span,
            optimizer_span: None,
        }
    }
}

/// Why a pending step could not complete.
#[derive(Debug, thiserror::Error)]
pub(super) enum Failure {
    #[error("{0}")]
    Overlap(#[from] OverlapError),
    #[error("non-finite gradient at step {0}")]
    NonFinite(u64),
}

/// A completed step.
pub(super) struct Completed {
    pub record: StepRecord,
    pub cursor_after: ShardCursor,
    pub finished_unix_s: f64,
}

/// The forward gate of a step that follows a pending one: applies the
/// pending step's buckets as the forward pass reaches their layers and
/// completes it before backward; then starts this step's reduction (the
/// ring comes back from the pending step's thread, or from the trainer).
pub(super) struct Applier<'a> {
    pub pending: Option<Pending>,
    /// The ring when no step is pending; the ring again after a failure.
    pub ring: Option<Ring>,
    pub plan: &'a Arc<BucketPlan>,
    pub layout: &'a ParamLayout,
    pub params: &'a mut [f32],
    pub optimizer: &'a mut Optimizer,
    pub handles: &'a mut [Tensor],
    /// This step's version, and where its filler sends buckets.
    pub version: u64,
    pub ready: Option<mpsc::Receiver<(usize, Vec<f32>)>>,
    pub span: &'a Span,
    // What it leaves behind.
    pub completed: Option<Completed>,
    pub started: Option<InFlight>,
    /// The pending step's buffers, free again.
    pub spare: Option<Vec<Vec<f32>>>,
    pub failure: Option<Failure>,
    /// Time spent applying buckets (the optimizer's share of the step).
    pub apply_s: f64,
}

impl Applier<'_> {
    /// Applies piece `p` of the pending step (it has arrived).
    fn apply_piece(&mut self, p: usize) -> Result<(), Failure> {
        let Some(pending) = self.pending.as_mut() else {
            return Ok(());
        };
        let Some(grad) = pending.inflight.piece(p) else {
            return Err(Failure::Overlap(OverlapError::Incomplete));
        };
        let t = Instant::now();
        let phase = pending
            .optimizer_span
            .get_or_insert_with(|| tracing::info_span!(parent: &pending.span, "optimizer"))
            .clone();
        let _g = phase.enter();
        if !optim::all_finite(grad) {
            return Err(Failure::NonFinite(pending.record.version));
        }
        let range = self.plan.pieces()[p].clone();
        let last = pending.applied.iter().filter(|a| !**a).count() == 1;
        if !last {
            pending.backups.push(Backup {
                piece: p,
                params: self.params[range.clone()].to_vec(),
                state: self.optimizer.save_range(range.clone()),
            });
        }
        self.optimizer.step_range(
            &mut self.params[range.clone()],
            grad,
            range.start,
            pending.record.lr as f32,
            pending.record.version,
            pending.fresh,
        );
        copy_range_into_params(self.layout, self.handles, self.params, range);
        pending.applied[p] = true;
        if last {
            pending.backups.clear();
        }
        self.apply_s += t.elapsed().as_secs_f64();
        Ok(())
    }

    /// Makes bucket `b` of the pending step final in the parameters,
    /// applying every piece (of any bucket) that arrives meanwhile, so the
    /// updates mostly happen while the wire is still busy.
    fn apply(&mut self, b: usize) -> bool {
        loop {
            let Some(pending) = self.pending.as_mut() else {
                return true;
            };
            pending.inflight.poll();
            let arrived: Vec<usize> = (0..pending.applied.len())
                .filter(|&p| !pending.applied[p] && pending.inflight.piece(p).is_some())
                .collect();
            if self.plan.pieces_of(b).all(|p| pending.applied[p]) {
                return true;
            }
            for p in arrived {
                if let Err(why) = self.apply_piece(p) {
                    self.fail(Some(why));
                    return false;
                }
            }
            let Some(pending) = self.pending.as_mut() else {
                return true;
            };
            if self.plan.pieces_of(b).all(|p| pending.applied[p]) {
                return true;
            }
            if !pending.inflight.wait_next() {
                self.fail(None);
                return false;
            }
        }
    }

    /// After the forward pass: a pending step still incomplete (the pass
    /// failed on its own before reaching backward) is undone, and its ring
    /// comes back to [`Applier::ring`].
    pub fn settle(&mut self) {
        if self.pending.is_some() {
            self.fail(Some(Failure::Overlap(OverlapError::Incomplete)));
        }
    }

    /// The pending step cannot complete: undo what it applied, stop its
    /// reduction and take the ring back.
    fn fail(&mut self, why: Option<Failure>) {
        let Some(mut p) = self.pending.take() else {
            return;
        };
        for backup in p.backups.drain(..).rev() {
            let range = self.plan.pieces()[backup.piece].clone();
            self.params[range.clone()].copy_from_slice(&backup.params);
            self.optimizer
                .restore_range(range.start, &backup.state, p.fresh);
            copy_range_into_params(self.layout, self.handles, self.params, range);
        }
        p.inflight.abort();
        let (ring, result) = p.inflight.finish();
        self.ring = ring;
        self.failure = Some(match (why, result) {
            (Some(w), _) => w,
            (None, Err(e)) => Failure::Overlap(e),
            (None, Ok(_)) => Failure::Overlap(OverlapError::Incomplete),
        });
    }
}

impl ForwardGate for Applier<'_> {
    fn before_use(&mut self, params: &[usize]) -> bool {
        let mut buckets: Vec<usize> = params
            .iter()
            .filter_map(|&i| self.plan.bucket_of(i))
            .collect();
        buckets.sort_unstable_by(|a, b| b.cmp(a));
        buckets.dedup();
        buckets.into_iter().all(|b| self.apply(b))
    }

    fn before_backward(&mut self) -> bool {
        if self.started.is_some() {
            // A later micro-batch: the step is already under way.
            return true;
        }
        for b in (0..self.plan.len()).rev() {
            if !self.apply(b) {
                return false;
            }
        }
        let ring = match self.pending.take() {
            Some(p) => {
                let waited = p.inflight.waited;
                let (ring, result) = p.inflight.finish();
                match result {
                    Ok((buffers, figures)) => {
                        self.spare = Some(buffers);
                        let mut record = p.record;
                        record.allreduce_s = waited.as_secs_f64();
                        record.ring_wait_s = figures.ring_wait.as_secs_f64();
                        tracing::debug!(rounds = figures.rounds, "bucket agreement rounds");
                        record.optimizer_s = self.apply_s;
                        self.completed = Some(Completed {
                            record,
                            cursor_after: p.cursor_after,
                            finished_unix_s: super::unix_seconds(),
                        });
                        ring
                    }
                    Err(e) => {
                        // Every bucket was applied and reduced alike on
                        // every rank; only the thread's end went wrong.
                        self.ring = ring;
                        self.failure = Some(Failure::Overlap(e));
                        return false;
                    }
                }
            }
            None => self.ring.take(),
        };
        let (Some(ring), Some(ready)) = (ring, self.ready.take()) else {
            self.failure = Some(Failure::Overlap(OverlapError::Incomplete));
            return false;
        };
        self.started = Some(InFlight::start(
            ring,
            self.plan.clone(),
            self.version,
            self.span,
            ready,
        ));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::Sgd;
    use crate::ring::TransportKind;
    use std::time::Duration;
    use tch::Kind;

    const LENS: [usize; 3] = [7, 300, 40];

    fn layout() -> ParamLayout {
        ParamLayout::new(
            LENS.iter()
                .enumerate()
                .map(|(i, &n)| (format!("p{i}"), vec![n as i64])),
        )
    }

    fn record(version: u64) -> StepRecord {
        StepRecord {
            version,
            lr: 0.1,
            ..StepRecord::default()
        }
    }

    fn grad(rank: usize, i: usize) -> f32 {
        ((i * 7 + rank * 3) % 11) as f32 - 5.0
    }

    /// What one rank ends with.
    struct Outcome {
        params: Vec<f32>,
        tensors: Vec<f32>,
        momentum: Option<Vec<f32>>,
        failed: Option<String>,
        ring_back: bool,
    }

    /// Two ranks, a step pending (SGD with momentum, state from an
    /// earlier step); the next forward pass asks for the first layer's
    /// parameters, then (unless `rank 1 quits`) everything. With
    /// `quit_after_first`, rank 1 hands over only the first layer's bucket
    /// and then breaks the ring.
    async fn pending_step(quit_after_first: bool) -> (Vec<Outcome>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let l = layout();
        let total = l.total();
        // Small pieces: the middle parameter spans several.
        let plan = Arc::new(BucketPlan::with_pieces(&l, 41, 1000, 64));
        assert!(plan.len() >= 2 && plan.pieces().len() > plan.len());
        let start: Vec<f32> = (0..total).map(|i| (i % 13) as f32 * 0.25).collect();
        let mut base_opt = Optimizer::Sgd(Sgd::new(0.9, 0.01, false, total));
        let first: Vec<f32> = (0..total).map(|i| (i % 5) as f32).collect();
        let mut warm = start.clone();
        base_opt.step(&mut warm, &first, 0.1, 7);
        let momentum0 = base_opt.state()[0].1.to_vec();
        // The whole step, as one optimizer call on the summed gradient.
        let summed: Vec<f32> = (0..total).map(|i| grad(0, i) + grad(1, i)).collect();
        let mut want = warm.clone();
        let mut whole = base_opt.clone();
        whole.step(&mut want, &summed, 0.1, 8);
        let opts = crate::ring::tests::options(TransportKind::Tcp, 97);
        let rings = crate::ring::tests::ring_of(2, &opts).await;
        let warm2 = warm.clone();
        let outs = crate::ring::tests::on_every_rank(rings, move |rank, ring| {
            let l = layout();
            let (ready_tx, ready_rx) = mpsc::channel();
            let inflight = InFlight::start(ring, plan.clone(), 8, &Span::none(), ready_rx);
            let mut filler =
                super::super::overlap::BucketFiller::new(&plan, &l, plan.new_buffers(), ready_tx);
            let g: Vec<f32> = (0..total).map(|i| grad(rank, i)).collect();
            let sink = filler.pass(true);
            let last_bucket = plan.len() - 1;
            let first_layer = plan.params_of(last_bucket);
            for i in first_layer.clone() {
                sink.gradient(i, &g[l.params()[i].range()]);
            }
            if rank == 1 && quit_after_first {
                drop(filler);
                let mut inflight = inflight;
                // Wait for the first layer's bucket to be reduced, then quit.
                while plan
                    .pieces_of(last_bucket)
                    .any(|p| inflight.piece(p).is_none())
                {
                    assert!(inflight.wait_next());
                }
                let ring = inflight.cancel();
                return Outcome {
                    params: Vec::new(),
                    tensors: Vec::new(),
                    momentum: None,
                    failed: None,
                    ring_back: ring.is_some(),
                };
            }
            for i in (0..LENS.len()).filter(|i| !first_layer.contains(i)) {
                sink.gradient(i, &g[l.params()[i].range()]);
            }
            filler.flush();
            drop(filler);
            let mut params = warm2.clone();
            let mut optimizer = base_opt.clone();
            let mut handles: Vec<Tensor> = l
                .params()
                .iter()
                .map(|s| Tensor::from_slice(&params[s.range()]).to_kind(Kind::Float))
                .collect();
            let (next_tx, next_ready) = mpsc::channel();
            let span = Span::none();
            let mut applier = Applier {
                pending: Some(Pending::new(
                    record(8),
                    ShardCursor::default(),
                    false,
                    inflight,
                    plan.pieces().len(),
                    Span::none(),
                )),
                ring: None,
                plan: &plan,
                layout: &l,
                params: &mut params,
                optimizer: &mut optimizer,
                handles: &mut handles,
                version: 9,
                ready: Some(next_ready),
                span: &span,
                completed: None,
                started: None,
                spare: None,
                failure: None,
                apply_s: 0.0,
            };
            let ok = applier.before_use(&first_layer.clone().collect::<Vec<_>>())
                && applier.before_backward();
            applier.settle();
            let failed = applier.failure.take().map(|f| f.to_string());
            let mut ring_back = applier.ring.take().is_some();
            if let Some(next) = applier.started.take() {
                // The next step's filler is gone (its thread waits no more).
                drop(next_tx);
                ring_back = next.cancel().is_some();
            }
            assert_eq!(ok, failed.is_none());
            drop(applier);
            let mut tensors = vec![0f32; total];
            for (s, t) in l.params().iter().zip(&handles) {
                t.copy_data(&mut tensors[s.range()], s.len);
            }
            let momentum = optimizer.state().first().map(|(_, b)| b.to_vec());
            Outcome {
                params,
                tensors,
                momentum,
                failed,
                ring_back,
            }
        })
        .await;
        assert_ne!(momentum0, vec![0f32; total]);
        (outs, want, warm, momentum0)
    }

    /// Buckets applied piece by piece as the forward pass needs them give
    /// exactly what one optimizer step on the whole summed gradient gives,
    /// in the flat parameters and in the model's tensors.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn updates_applied_piece_by_piece_equal_one_whole_step() {
        let (outs, want, _, _) = pending_step(false).await;
        for (rank, o) in outs.iter().enumerate() {
            assert_eq!(o.failed, None, "rank {rank}");
            let bad: Vec<(usize, f32, f32)> = (0..want.len())
                .filter(|&i| o.params[i] != want[i])
                .map(|i| (i, o.params[i], want[i]))
                .take(5)
                .collect();
            assert!(
                o.params == want,
                "rank {rank}: params {bad:?} of {}",
                want.len()
            );
            assert!(o.tensors == want, "rank {rank}: tensors");
            assert!(o.ring_back, "rank {rank}: ring");
        }
    }

    /// A neighbour that goes away after the first layer's bucket: the
    /// pieces already applied are undone, so parameters, tensors and
    /// optimizer state are exactly the last completed step's, and the ring
    /// comes back (to report the failure).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_ring_failure_mid_update_leaves_the_last_completed_state() {
        let started = std::time::Instant::now();
        let (outs, _, warm, momentum) = pending_step(true).await;
        let o = &outs[0];
        let why = o.failed.as_deref().unwrap_or_default();
        assert!(!why.is_empty(), "rank 0 should fail");
        assert!(o.params == warm, "params restored");
        assert!(o.tensors == warm, "tensors restored");
        assert!(o.momentum.as_ref() == Some(&momentum), "momentum restored");
        assert!(o.ring_back);
        assert!(outs[1].ring_back);
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
