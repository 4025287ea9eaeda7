//! Reducing the gradient while the backward pass is still running, as DDP
//! does: the flat gradient is cut into buckets of whole parameters, in
//! reverse layout order (the order backward tends to finish them); a hook on
//! each parameter writes its gradient straight into its place in the flat
//! gradient, and once a bucket's last parameter is in, the bucket goes to a
//! communication thread that all-reduces it in place while libtorch works
//! on earlier layers.
//!
//! Every rank reduces the buckets in the same fixed order (0, 1, ...),
//! whatever order its hooks fire in, so the ring's calls always match.
//! Parameters that got no gradient in the last pass are written (zeros, or
//! what earlier micro-batches left) when backward ends, and their buckets
//! go then. The result is the same flat sum as reducing the whole gradient
//! at once: each element is summed across ranks in the same ring order.

use std::ops::Range;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tracing::Span;

use crate::model::grad_hooks::GradSink;
use crate::model::ParamLayout;
use crate::ring::{ReduceOp, Ring, RingError};

/// A bucket's all-reduce call id: the step's id with the bucket index in the
/// bits above any parameter version (and below the sync, buffer and eval ids).
pub fn bucket_step_id(version: u64, bucket: usize) -> u64 {
    debug_assert!(version < 1 << BUCKET_SHIFT);
    version | ((bucket as u64) << BUCKET_SHIFT)
}
const BUCKET_SHIFT: u32 = 40;

/// How the flat gradient is cut into buckets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketPlan {
    /// Flat ranges, bucket 0 first: contiguous, disjoint, covering the
    /// whole gradient from its end backwards.
    ranges: Vec<Range<usize>>,
    /// For each parameter (layout order): its bucket.
    bucket_of_param: Vec<usize>,
    /// For each bucket: how many parameters it holds.
    params_in_bucket: Vec<usize>,
}

impl BucketPlan {
    /// Buckets of whole parameters from the last one back; a bucket closes
    /// once it holds at least its cap of elements: `first_cap` for bucket 0
    /// (so the first reduce starts early), `cap` after it. DDP's rule, with
    /// its default caps of 1 MiB and 25 MiB.
    pub fn new(layout: &ParamLayout, first_cap: usize, cap: usize) -> Self {
        let n = layout.params().len();
        let mut bucket_of_param = vec![0; n];
        let mut ranges = Vec::new();
        let mut params_in_bucket = Vec::new();
        let mut end = layout.total();
        let mut count = 0;
        for (i, p) in layout.params().iter().enumerate().rev() {
            bucket_of_param[i] = ranges.len();
            count += 1;
            let cap = if ranges.is_empty() { first_cap } else { cap };
            let start = p.range().start;
            if end - start >= cap.max(1) || i == 0 {
                ranges.push(start..end);
                params_in_bucket.push(count);
                end = start;
                count = 0;
            }
        }
        Self {
            ranges,
            bucket_of_param,
            params_in_bucket,
        }
    }

    /// How many buckets (at least one for a non-empty gradient).
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn ranges(&self) -> &[Range<usize>] {
        &self.ranges
    }
}

/// What an overlapped step measured.
#[derive(Debug, Default)]
pub struct CommFigures {
    /// From the end of backward to the last bucket reduced: the all-reduce
    /// time the step could not hide.
    pub exposed: Duration,
    /// Time the communication thread spent waiting on its left neighbour.
    pub ring_wait: Duration,
}

/// Writes gradients into the flat buffer and hands finished buckets over;
/// the step's passes feed it through [`BucketFiller::pass`].
pub struct BucketFiller<'g, 'p> {
    plan: &'p BucketPlan,
    layout: &'p ParamLayout,
    /// Each bucket's slice of the flat gradient until it is handed over.
    slots: Vec<Option<&'g mut [f32]>>,
    /// Parameters of each bucket still to come in the last micro-batch.
    missing: Vec<usize>,
    /// Whether a parameter's gradient has been written this step.
    written: Vec<bool>,
    /// Whether this pass is the step's last micro-batch.
    last_pass: bool,
    ready: mpsc::Sender<(usize, &'g mut [f32])>,
    /// A gradient for a bucket already sent, or of the wrong length.
    late: bool,
}

impl BucketFiller<'_, '_> {
    /// The sink for one backward pass; `last`: the step's last micro-batch
    /// (only then do buckets fill up and go).
    pub fn pass(&mut self, last: bool) -> &mut dyn GradSink {
        self.last_pass = last;
        self
    }

    fn send(&mut self, bucket: usize) {
        if let Some(slice) = self.slots[bucket].take() {
            // The communication thread is gone only after a ring error,
            // which the step reports once backward ends.
            let _ = self.ready.send((bucket, slice));
        }
    }

    /// After the last pass: every parameter without a gradient is zero,
    /// and every bucket not yet sent goes now.
    fn flush(&mut self) {
        for (i, spec) in self.layout.params().iter().enumerate() {
            if !self.written[i] {
                let b = self.plan.bucket_of_param[i];
                let base = self.plan.ranges[b].start;
                if let Some(slice) = self.slots[b].as_deref_mut() {
                    let r = spec.range();
                    slice[r.start - base..r.end - base].fill(0.0);
                }
            }
        }
        for b in 0..self.plan.len() {
            self.send(b);
        }
    }
}

impl GradSink for BucketFiller<'_, '_> {
    fn gradient(&mut self, index: usize, grad: &[f32]) {
        let (Some(spec), Some(&b)) = (
            self.layout.params().get(index),
            self.plan.bucket_of_param.get(index),
        ) else {
            return;
        };
        let base = self.plan.ranges[b].start;
        let Some(slice) = self.slots[b].as_deref_mut() else {
            self.late = true;
            return;
        };
        let r = spec.range();
        let dst = &mut slice[r.start - base..r.end - base];
        if grad.len() != dst.len() {
            // Not this parameter's shape: leave it to the flush's zeros and
            // say so through `late` (the step fails rather than train on it).
            self.late = true;
            return;
        }
        if self.written[index] {
            for (d, g) in dst.iter_mut().zip(grad) {
                *d += g;
            }
        } else {
            dst.copy_from_slice(grad);
            self.written[index] = true;
        }
        if self.last_pass {
            self.missing[b] = self.missing[b].saturating_sub(1);
            if self.missing[b] == 0 {
                self.send(b);
            }
        }
    }
}

/// Why an overlapped step failed.
#[derive(Debug, thiserror::Error)]
pub enum OverlapError {
    #[error("{0}")]
    Ring(#[from] RingError),
    #[error("a gradient arrived after its bucket was sent, or with the wrong length")]
    LateGradient,
    #[error("the communication thread panicked: {0}")]
    Panicked(String),
}

/// Runs `backward` (the step's forward and backward passes, each fed to
/// the [`BucketFiller`]) while the buckets of `grads` are all-reduced as
/// they fill. On success `grads` holds the reduced gradient. Returns what
/// `backward` returned and how the reduction went; when `backward` fails,
/// the ring is aborted so that the reduction stops at once.
pub fn reduce_during_backward<T, E>(
    ring: &mut Ring,
    plan: &BucketPlan,
    layout: &ParamLayout,
    grads: &mut [f32],
    version: u64,
    span: &Span,
    backward: impl FnOnce(&mut BucketFiller<'_, '_>) -> Result<T, E>,
) -> (Result<T, E>, Result<CommFigures, OverlapError>) {
    assert_eq!(grads.len(), layout.total(), "flat gradient length");
    // Cut the flat gradient into its buckets' slices (bucket 0 is the last).
    let mut slots: Vec<Option<&mut [f32]>> = (0..plan.len()).map(|_| None).collect();
    let mut rest = &mut grads[..];
    for (b, range) in plan.ranges.iter().enumerate().rev() {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(range.end - range.start);
        slots[b] = Some(head);
        rest = tail;
    }
    let abort = ring.abort_handle();
    let (ready_tx, ready_rx) = mpsc::channel::<(usize, &mut [f32])>();
    let buckets = plan.len();
    std::thread::scope(|s| {
        let comm_span = tracing::info_span!(parent: span, "allreduce", buckets);
        let comm = s.spawn(move || {
            let _g = comm_span.enter();
            crate::ring::engine::take_receive_wait();
            let mut waiting: Vec<Option<&mut [f32]>> = (0..buckets).map(|_| None).collect();
            let mut last_done = Instant::now();
            for b in 0..buckets {
                while waiting[b].is_none() {
                    match ready_rx.recv() {
                        Ok((i, slice)) => waiting[i] = Some(slice),
                        // Backward failed and sent no more.
                        Err(_) => return Ok(None),
                    }
                }
                if let Some(slice) = waiting[b].take() {
                    ring.all_reduce(bucket_step_id(version, b), slice, ReduceOp::Sum)?;
                }
                last_done = Instant::now();
            }
            Ok::<_, RingError>(Some((last_done, crate::ring::engine::take_receive_wait())))
        });
        let mut filler = BucketFiller {
            plan,
            layout,
            slots,
            missing: plan.params_in_bucket.clone(),
            written: vec![false; layout.params().len()],
            last_pass: false,
            ready: ready_tx,
            late: false,
        };
        let result = backward(&mut filler);
        if result.is_ok() {
            filler.flush();
        } else if let Some(abort) = &abort {
            abort.abort();
        }
        let late = filler.late;
        drop(filler);
        let backward_done = Instant::now();
        let comm = match comm.join() {
            Ok(Ok(Some((last_done, ring_wait)))) if !late => Ok(CommFigures {
                exposed: last_done.saturating_duration_since(backward_done),
                ring_wait,
            }),
            Ok(Ok(_)) => Err(OverlapError::LateGradient),
            Ok(Err(e)) => Err(OverlapError::Ring(e)),
            Err(payload) => Err(OverlapError::Panicked(crate::panic_payload_message(
                payload.as_ref(),
            ))),
        };
        (result, comm)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::TransportKind;

    fn layout(lens: &[usize]) -> ParamLayout {
        ParamLayout::new(
            lens.iter()
                .enumerate()
                .map(|(i, &n)| (format!("p{i}"), vec![n as i64])),
        )
    }

    #[test]
    fn buckets_cover_the_gradient_from_its_end_in_whole_parameters() {
        let l = layout(&[5, 100, 3, 40, 2, 7]);
        let plan = BucketPlan::new(&l, 8, 50);
        // From the end: [7] is under 8, [2,7]=9 closes bucket 0; then
        // [40]=40 < 50, +3 = 43, +100 closes; [5] is what is left.
        let want: Vec<Range<usize>> = vec![148..157, 5..148, 0..5];
        assert_eq!(plan.ranges(), &want[..]);
        assert_eq!(plan.params_in_bucket, vec![2, 3, 1]);
        assert_eq!(plan.bucket_of_param, vec![2, 1, 1, 1, 0, 0]);
        // One bucket when the cap exceeds everything; one per parameter with
        // a cap of one element.
        let whole = BucketPlan::new(&l, 1000, 1000);
        assert_eq!((whole.len(), whole.ranges()[0].clone()), (1, 0..157));
        assert_eq!(BucketPlan::new(&l, 1, 1).len(), 6);
    }

    #[test]
    fn bucket_ids_stay_apart_from_each_other_and_from_other_calls() {
        assert_eq!(bucket_step_id(17, 0), 17);
        assert_ne!(bucket_step_id(17, 1), bucket_step_id(18, 0));
        assert!(bucket_step_id((1 << 40) - 1, 4095) < 1 << 61);
    }

    /// Every rank feeds its parameters in its own order over two passes,
    /// and leaves one parameter without a gradient in the last: the result
    /// is the exact sum of what each rank accumulated, on every rank.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn buckets_reduced_during_backward_give_the_whole_sum_on_every_rank() {
        const LENS: [usize; 6] = [3, 1000, 17, 250, 1, 64];
        let lens = LENS;
        let l = layout(&lens);
        let plan = BucketPlan::new(&l, 20, 300);
        assert!(plan.len() >= 3);
        let world = 3;
        let opts = crate::ring::tests::options(TransportKind::Tcp, 97);
        let rings = crate::ring::tests::ring_of(world, &opts).await;
        // Integer values: every summation order is exact.
        let grad = |rank: usize, param: usize, pass: usize| -> Vec<f32> {
            (0..LENS[param])
                .map(|i| ((i * 3 + rank * 5 + param * 11 + pass) % 17) as f32 - 8.0)
                .collect()
        };
        let skipped = 2; // no gradient for p2 in the last pass on any rank
        let mut expected = vec![0f32; l.total()];
        for rank in 0..world {
            for (p, spec) in l.params().iter().enumerate() {
                for pass in 0..2 {
                    if pass == 1 && p == skipped {
                        continue;
                    }
                    for (e, g) in expected[spec.range()].iter_mut().zip(grad(rank, p, pass)) {
                        *e += g;
                    }
                }
            }
        }
        let outs = crate::ring::tests::on_every_rank(rings, move |rank, mut ring| {
            let mut grads = vec![f32::NAN; l.total()];
            let (r, comm) = reduce_during_backward(
                &mut ring,
                &plan,
                &l,
                &mut grads,
                5,
                &Span::none(),
                |filler| {
                    for pass in 0..2 {
                        let sink = filler.pass(pass == 1);
                        // Each rank its own order.
                        let mut order: Vec<usize> = (0..lens.len()).rev().collect();
                        order.rotate_left(rank);
                        for p in order {
                            if !(pass == 1 && p == skipped) {
                                sink.gradient(p, &grad(rank, p, pass));
                            }
                        }
                    }
                    Ok::<_, ()>(())
                },
            );
            r.expect("backward");
            comm.expect("reduce");
            grads
        })
        .await;
        for (rank, out) in outs.iter().enumerate() {
            assert_eq!(out, &expected, "rank {rank}");
        }
    }

    /// A failed backward ends the step with its own error at once: the
    /// ring is aborted, not left waiting for buckets that never come.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_backward_returns_its_error_without_waiting_for_the_ring() {
        let l = layout(&[10, 10]);
        let plan = BucketPlan::new(&l, 1, 1);
        let opts = crate::ring::tests::options(TransportKind::Tcp, 97);
        let mut rings = crate::ring::tests::ring_of(2, &opts).await;
        let mut ring = rings.remove(0);
        let started = Instant::now();
        let (r, _comm) = tokio::task::spawn_blocking(move || {
            let mut grads = vec![0f32; 20];
            reduce_during_backward(&mut ring, &plan, &l, &mut grads, 1, &Span::none(), |f| {
                // Bucket 0 goes (its reduce blocks: the neighbour never joins).
                f.pass(true).gradient(1, &[1.0; 10]);
                Err::<(), _>("forward failed")
            })
        })
        .await
        .expect("join");
        assert_eq!(r, Err("forward failed"));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        drop(rings);
    }
}
