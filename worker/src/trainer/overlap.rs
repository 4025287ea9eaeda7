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
use crate::ring::transport::LinkAbort;
use crate::ring::{ReduceOp, Ring, RingError};

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
    /// The buckets cut into pieces of at most `piece` elements, bucket 0's
    /// first, each bucket's from its start: the unit of a ring call, of a
    /// buffer and of an update.
    pieces: Vec<Range<usize>>,
    /// For each bucket: its pieces (indices into `pieces`).
    pieces_of_bucket: Vec<Range<usize>>,
}

impl BucketPlan {
    /// Buckets of whole parameters from the last one back; a bucket closes
    /// once it holds at least its cap of elements: `first_cap` for bucket 0
    /// (so the first reduce starts early), `cap` after it. DDP's rule, with
    /// its default caps of 1 MiB and 25 MiB.
    pub fn new(layout: &ParamLayout, first_cap: usize, cap: usize) -> Self {
        Self::with_pieces(layout, first_cap, cap, CHUNK_ELEMS)
    }

    /// [`BucketPlan::new`] with pieces of at most `piece` elements.
    pub fn with_pieces(layout: &ParamLayout, first_cap: usize, cap: usize, piece: usize) -> Self {
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
        let piece = piece.max(1);
        let mut pieces = Vec::new();
        let mut pieces_of_bucket = Vec::new();
        for r in &ranges {
            let first = pieces.len();
            let mut at = r.start;
            loop {
                let end = (at + piece).min(r.end);
                pieces.push(at..end);
                at = end;
                if at >= r.end {
                    break;
                }
            }
            pieces_of_bucket.push(first..pieces.len());
        }
        Self {
            ranges,
            bucket_of_param,
            params_in_bucket,
            pieces,
            pieces_of_bucket,
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

    /// The parameters (indices into the layout) of bucket `b`: contiguous.
    pub fn params_of(&self, b: usize) -> Range<usize> {
        let first = self.bucket_of_param.iter().position(|&x| x == b);
        match first {
            Some(i) => i..i + self.params_in_bucket[b],
            None => 0..0,
        }
    }

    /// The bucket that parameter `index` belongs to.
    pub fn bucket_of(&self, index: usize) -> Option<usize> {
        self.bucket_of_param.get(index).copied()
    }

    /// Every piece's flat range (see [`BucketPlan::pieces_of`]).
    pub fn pieces(&self) -> &[Range<usize>] {
        &self.pieces
    }

    /// The pieces of bucket `b` (indices into [`BucketPlan::pieces`]).
    pub fn pieces_of(&self, b: usize) -> Range<usize> {
        self.pieces_of_bucket.get(b).cloned().unwrap_or(0..0)
    }

    /// A zeroed buffer per piece, of its length.
    pub fn new_buffers(&self) -> Vec<Vec<f32>> {
        self.pieces.iter().map(|r| vec![0.0; r.len()]).collect()
    }
}

/// A call id of the step's `seq`-th ring call: the step's version with the
/// sequence number in the bits above any version (and below the sync,
/// buffer and eval ids). Every rank makes the same calls in the same order,
/// so the same numbers.
pub fn call_id(version: u64, seq: u64) -> u64 {
    debug_assert!(version < 1 << BUCKET_SHIFT && seq < 1 << 20);
    version | (seq << BUCKET_SHIFT)
}

/// Elements per ring call when a bucket is reduced in pieces: small enough
/// that a bucket of earlier layers (which the next forward pass needs
/// first) can cut in within a few milliseconds of wire time, large enough
/// that each call's fixed costs stay small.
pub const CHUNK_ELEMS: usize = 512 * 1024;

/// Which bucket to reduce next: the highest-numbered one (earliest layers:
/// the next forward pass needs them first) that every rank holds and that
/// is not done yet.
pub fn next_bucket(agreed: &[bool], done: &[bool]) -> Option<usize> {
    (0..agreed.len()).rev().find(|&b| agreed[b] && !done[b])
}

/// What an overlapped step measured.
#[derive(Debug, Default, Clone)]
pub struct CommFigures {
    /// Time the communication thread spent waiting on its left neighbour.
    pub ring_wait: Duration,
    /// Agreement rounds the step took (see [`reduce_buckets`]).
    pub rounds: u64,
}

/// Writes gradients into the pieces' buffers and hands a bucket's pieces
/// over once its last parameter is in; the step's passes feed it through
/// [`BucketFiller::pass`].
pub struct BucketFiller<'p> {
    plan: &'p BucketPlan,
    layout: &'p ParamLayout,
    /// Each piece's buffer until it is handed over.
    slots: Vec<Option<Vec<f32>>>,
    /// Parameters of each bucket still to come in the last micro-batch.
    missing: Vec<usize>,
    /// Whether a parameter's gradient has been written this step.
    written: Vec<bool>,
    /// Whether this pass is the step's last micro-batch.
    last_pass: bool,
    ready: mpsc::Sender<(usize, Vec<f32>)>,
    /// A gradient for a bucket already sent, or of the wrong length.
    late: bool,
}

impl<'p> BucketFiller<'p> {
    /// Fills `buffers` (one per piece, of the piece's length, from
    /// [`BucketPlan::new_buffers`]) and sends each bucket's pieces to
    /// `ready` once its last parameter is in.
    pub fn new(
        plan: &'p BucketPlan,
        layout: &'p ParamLayout,
        buffers: Vec<Vec<f32>>,
        ready: mpsc::Sender<(usize, Vec<f32>)>,
    ) -> Self {
        assert_eq!(buffers.len(), plan.pieces.len(), "one buffer per piece");
        Self {
            plan,
            layout,
            slots: buffers.into_iter().map(Some).collect(),
            missing: plan.params_in_bucket.clone(),
            written: vec![false; layout.params().len()],
            last_pass: false,
            ready,
            late: false,
        }
    }

    /// The sink for one backward pass; `last`: the step's last micro-batch
    /// (only then do buckets fill up and go).
    pub fn pass(&mut self, last: bool) -> &mut dyn GradSink {
        self.last_pass = last;
        self
    }

    /// Whether a gradient came late or malformed (the step must fail).
    pub fn late(&self) -> bool {
        self.late
    }

    fn send(&mut self, bucket: usize) {
        for p in self.plan.pieces_of(bucket) {
            if let Some(buf) = self.slots[p].take() {
                // The communication thread is gone only after a ring error,
                // which the step reports once backward ends.
                let _ = self.ready.send((p, buf));
            }
        }
    }

    /// Calls `f(piece buffer, offset in it, offset in values, length)` for
    /// every piece overlapping the flat range `r` of bucket `b`; false if a
    /// piece was already handed over.
    fn each_piece(
        &mut self,
        b: usize,
        r: Range<usize>,
        mut f: impl FnMut(&mut [f32], usize, usize, usize),
    ) -> bool {
        let mut whole = true;
        for p in self.plan.pieces_of(b) {
            let pr = self.plan.pieces[p].clone();
            let (start, end) = (pr.start.max(r.start), pr.end.min(r.end));
            if start >= end {
                continue;
            }
            match self.slots[p].as_deref_mut() {
                Some(buf) => f(buf, start - pr.start, start - r.start, end - start),
                None => whole = false,
            }
        }
        whole
    }

    /// After the last pass: every parameter without a gradient is zero,
    /// and every bucket not yet sent goes now.
    pub fn flush(&mut self) {
        for i in 0..self.layout.params().len() {
            if !self.written[i] {
                let b = self.plan.bucket_of_param[i];
                let r = self.layout.params()[i].range();
                self.each_piece(b, r, |buf, at, _, len| buf[at..at + len].fill(0.0));
            }
        }
        for b in 0..self.plan.len() {
            self.send(b);
        }
    }
}

impl GradSink for BucketFiller<'_> {
    fn gradient(&mut self, index: usize, grad: &[f32]) {
        let (Some(spec), Some(&b)) = (
            self.layout.params().get(index),
            self.plan.bucket_of_param.get(index),
        ) else {
            return;
        };
        let r = spec.range();
        if grad.len() != r.len() {
            // Not this parameter's shape: leave it to the flush's zeros and
            // say so through `late` (the step fails rather than train on it).
            self.late = true;
            return;
        }
        let add = self.written[index];
        let whole = self.each_piece(b, r, |buf, at, from, len| {
            let (dst, src) = (&mut buf[at..at + len], &grad[from..from + len]);
            if add {
                for (d, g) in dst.iter_mut().zip(src) {
                    *d += g;
                }
            } else {
                dst.copy_from_slice(src);
            }
        });
        if !whole {
            self.late = true;
            return;
        }
        self.written[index] = true;
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
    #[error("the step's backward pass ended before handing over every bucket")]
    Incomplete,
}

/// The most agreement rounds one step can take with honest members: one
/// before each piece until every bucket is agreed, one per bucket that gets
/// agreed, and one per bucket each rank comes to hold (a round that agrees
/// nothing needs some rank with something new to offer).
pub fn max_rounds(plan: &BucketPlan, world: usize) -> u64 {
    (plan.pieces.len() + plan.len() * (world + 1) + 1) as u64
}

/// The communication thread's loop: all-reduces the pieces that arrive on
/// `ready` (sum, in place) and sends each back on `reduced` once done.
///
/// Ranks finish their buckets at different times, and the ring needs every
/// rank to make the same calls in the same order. So the ranks agree on
/// which buckets all of them hold with a tiny all-reduce of flags (a
/// *round*), and decide what to reduce next from agreed facts only
/// ([`next_bucket`]): the same decision everywhere. Buckets go piece by
/// piece, with a round before each piece until every bucket is agreed, so a
/// bucket of earlier layers that fills up late still cuts in ahead of the
/// rest of a large one. Returns Ok(None) if `ready` closed before every
/// bucket came (backward failed).
pub fn reduce_buckets(
    ring: &mut Ring,
    plan: &BucketPlan,
    version: u64,
    ready: &mpsc::Receiver<(usize, Vec<f32>)>,
    reduced: &mpsc::Sender<(usize, Vec<f32>)>,
) -> Result<Option<CommFigures>, RingError> {
    let n = plan.len();
    let world = ring.spec().world();
    let mut held: Vec<Option<Vec<f32>>> = (0..plan.pieces.len()).map(|_| None).collect();
    let mut agreed = vec![false; n];
    let mut done = vec![false; n];
    // Per bucket: its next piece to reduce.
    let mut next_piece: Vec<usize> = (0..n).map(|b| plan.pieces_of(b).start).collect();
    let mut seq = 0u64;
    let mut rounds = 0u64;
    // What this rank held at its last round.
    let mut offered = vec![false; n];
    let max_rounds = max_rounds(plan, world);
    let take = |held: &mut Vec<Option<Vec<f32>>>, (p, buf): (usize, Vec<f32>)| {
        if let Some(slot) = held.get_mut(p) {
            *slot = Some(buf);
        }
    };
    // A bucket is held once all its pieces not yet reduced are here.
    let holds = |held: &[Option<Vec<f32>>], b: usize, from: usize| {
        (from..plan.pieces_of(b).end).all(|p| held[p].is_some())
    };
    while done.iter().any(|d| !d) {
        while let Ok(item) = ready.try_recv() {
            take(&mut held, item);
        }
        if agreed.iter().any(|a| !a) {
            let holding: Vec<bool> = (0..n)
                .map(|b| done[b] || holds(&held, b, next_piece[b]))
                .collect();
            if next_bucket(&agreed, &done).is_none() {
                // Nothing agreed to do. Join a round only with something new
                // to offer, or holding every bucket still open (then only the
                // others can bring progress); otherwise wait for this rank's
                // own next bucket. So ranks holding different buckets do not
                // spin through rounds that cannot agree, and every round
                // still ends: a rank waiting here grows until one holds.
                let new = (0..n).any(|b| !agreed[b] && holding[b] && !offered[b]);
                let all = (0..n).all(|b| agreed[b] || holding[b]);
                if !(new || all) {
                    match ready.recv() {
                        Ok(item) => take(&mut held, item),
                        Err(_) => return Ok(None),
                    }
                    continue;
                }
            }
            // Honest rounds are bounded (see `max_rounds`): a peer that keeps
            // them going is refused rather than followed forever.
            if rounds >= max_rounds {
                return Err(RingError::Setup(format!(
                    "bucket agreement did not settle in {max_rounds} rounds (a member keeps withholding its buckets)"
                )));
            }
            let mut flags: Vec<f32> = holding.iter().map(|&h| f32::from(u8::from(h))).collect();
            offered.clone_from(&holding);
            ring.all_reduce_exact(call_id(version, seq), &mut flags, ReduceOp::Sum)?;
            seq += 1;
            rounds += 1;
            for (a, f) in agreed.iter_mut().zip(&flags) {
                *a = *a || *f as usize == world;
            }
        }
        let Some(b) = next_bucket(&agreed, &done) else {
            continue;
        };
        let p = next_piece[b];
        let Some(mut buf) = held[p].take() else {
            // Agreed means every rank holds it, this one included.
            return Err(RingError::Setup(format!("bucket {b} agreed but not held")));
        };
        if !buf.is_empty() {
            ring.all_reduce(call_id(version, seq), &mut buf, ReduceOp::Sum)?;
            seq += 1;
        }
        let _ = reduced.send((p, buf));
        next_piece[b] += 1;
        if next_piece[b] >= plan.pieces_of(b).end {
            done[b] = true;
        }
    }
    Ok(Some(CommFigures {
        ring_wait: Duration::ZERO,
        rounds,
    }))
}

/// How the communication thread ended: the ring, and how the reduction went.
type CommEnd = (Ring, Result<Option<CommFigures>, RingError>);

/// The reduced pieces (one buffer each) and what the reduction measured.
pub type Reduced = (Vec<Vec<f32>>, CommFigures);

/// A step's buckets being reduced on their own thread, which owns the ring
/// meanwhile. Take pieces as they are reduced ([`InFlight::poll`],
/// [`InFlight::wait_next`], [`InFlight::piece`]), then [`InFlight::finish`]
/// to get the ring and the buffers back.
pub struct InFlight {
    handle: Option<std::thread::JoinHandle<CommEnd>>,
    reduced: mpsc::Receiver<(usize, Vec<f32>)>,
    got: Vec<Option<Vec<f32>>>,
    abort: Option<std::sync::Arc<dyn LinkAbort>>,
    /// Set once the thread has ended: the ring and how it went.
    ended: Option<(Option<Ring>, Result<CommFigures, OverlapError>)>,
    /// Time spent blocked in [`InFlight::wait_next`] and [`InFlight::finish`].
    pub waited: Duration,
}

impl InFlight {
    /// Starts the thread for the step of `version`, reducing the buckets
    /// that the step's [`BucketFiller`] sends to `ready_rx`.
    pub fn start(
        mut ring: Ring,
        plan: std::sync::Arc<BucketPlan>,
        version: u64,
        span: &Span,
        ready_rx: mpsc::Receiver<(usize, Vec<f32>)>,
    ) -> Self {
        let (reduced_tx, reduced_rx) = mpsc::channel();
        let abort = ring.abort_handle();
        let n = plan.pieces().len();
        let comm_span = tracing::info_span!(parent: span, "allreduce", buckets = plan.len());
        let handle = std::thread::Builder::new()
            .name("ringtrain-comm".into())
            .spawn(move || {
                let _g = comm_span.enter();
                crate::ring::latency::prefer_prompt_wakeups();
                crate::ring::engine::take_receive_wait();
                let r = reduce_buckets(&mut ring, &plan, version, &ready_rx, &reduced_tx);
                let wait = crate::ring::engine::take_receive_wait();
                let r = r.map(|f| {
                    f.map(|mut f| {
                        f.ring_wait = wait;
                        f
                    })
                });
                (ring, r)
            });
        let mut me = Self {
            handle: None,
            reduced: reduced_rx,
            got: (0..n).map(|_| None).collect(),
            abort,
            ended: None,
            waited: Duration::ZERO,
        };
        match handle {
            Ok(h) => me.handle = Some(h),
            Err(e) => {
                me.ended = Some((
                    None,
                    Err(OverlapError::Panicked(format!(
                        "could not start the communication thread: {e}"
                    ))),
                ))
            }
        }
        me
    }

    fn join(&mut self) {
        if self.ended.is_some() {
            return;
        }
        let Some(h) = self.handle.take() else {
            return;
        };
        self.ended = Some(match h.join() {
            Ok((ring, Ok(Some(f)))) => (Some(ring), Ok(f)),
            Ok((ring, Ok(None))) => (Some(ring), Err(OverlapError::Incomplete)),
            Ok((ring, Err(e))) => (Some(ring), Err(OverlapError::Ring(e))),
            Err(payload) => (
                None,
                Err(OverlapError::Panicked(crate::panic_payload_message(
                    payload.as_ref(),
                ))),
            ),
        });
    }

    /// Takes in the pieces reduced so far, without blocking.
    pub fn poll(&mut self) {
        while let Ok((i, buf)) = self.reduced.try_recv() {
            if let Some(slot) = self.got.get_mut(i) {
                *slot = Some(buf);
            }
        }
    }

    /// Blocks until one more piece is reduced; false if the reduction
    /// ended without it ([`InFlight::finish`] says why).
    pub fn wait_next(&mut self) -> bool {
        let t = Instant::now();
        let got = match self.reduced.recv() {
            Ok((i, buf)) => {
                if let Some(slot) = self.got.get_mut(i) {
                    *slot = Some(buf);
                }
                true
            }
            Err(_) => false,
        };
        self.waited += t.elapsed();
        got
    }

    /// Piece `p`, reduced (this rank's sum), once it is here.
    pub fn piece(&self, p: usize) -> Option<&[f32]> {
        self.got.get(p).and_then(|g| g.as_deref())
    }

    /// Breaks the ring so that the thread stops at once (a failed step).
    pub fn abort(&self) {
        if let Some(a) = &self.abort {
            a.abort();
        }
    }

    /// Waits for every bucket; returns the ring (unless the thread
    /// panicked with it) and, on success, the reduced buffers.
    pub fn finish(mut self) -> (Option<Ring>, Result<Reduced, OverlapError>) {
        while self.got.iter().any(Option::is_none) {
            if !self.wait_next() {
                break;
            }
        }
        let t = Instant::now();
        self.join();
        self.waited += t.elapsed();
        let (ring, figures) = self
            .ended
            .take()
            .unwrap_or((None, Err(OverlapError::Incomplete)));
        let result = match figures {
            Err(e) => Err(e),
            Ok(f) => {
                let bufs: Option<Vec<Vec<f32>>> = self.got.iter_mut().map(Option::take).collect();
                bufs.map(|b| (b, f)).ok_or(OverlapError::Incomplete)
            }
        };
        (ring, result)
    }

    /// Aborts the reduction and returns the ring (unless the thread
    /// panicked). The step's [`BucketFiller`] must be gone first: a thread
    /// waiting for its next bucket only stops when the filler's sender does.
    pub fn cancel(mut self) -> Option<Ring> {
        self.abort();
        self.join();
        self.ended.take().and_then(|(ring, _)| ring)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::TransportKind;
    use std::sync::Arc;

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
        assert_eq!(
            (plan.params_of(0), plan.params_of(1), plan.params_of(2)),
            (4..6, 1..4, 0..1)
        );
        // One bucket when the cap exceeds everything; one per parameter with
        // a cap of one element.
        let whole = BucketPlan::new(&l, 1000, 1000);
        assert_eq!((whole.len(), whole.ranges()[0].clone()), (1, 0..157));
        assert_eq!(BucketPlan::new(&l, 1, 1).len(), 6);
    }

    #[test]
    fn call_ids_stay_apart_from_each_other_and_from_other_calls() {
        assert_eq!(call_id(17, 0), 17);
        assert_ne!(call_id(17, 1), call_id(18, 0));
        assert!(call_id((1 << 40) - 1, (1 << 20) - 1) < 1 << 61);
    }

    #[test]
    fn the_earliest_layers_agreed_bucket_goes_first() {
        // Bucket 2 holds the first layers: the next forward needs it first.
        assert_eq!(next_bucket(&[true, true, true], &[false; 3]), Some(2));
        assert_eq!(
            next_bucket(&[true, false, true], &[false, false, true]),
            Some(0)
        );
        assert_eq!(
            next_bucket(&[true, false, false], &[true, false, false]),
            None
        );
    }

    /// Runs one step's reduction on every rank of a 3-rank ring: each rank
    /// feeds its parameters in its own order over two passes (one parameter
    /// gets no gradient in the last), with pauses, so ranks hold different
    /// buckets at different times. Returns each rank's reduced flat gradient
    /// and the expected sum.
    async fn reduce_on_three_ranks(
        lens: &'static [usize],
        first_cap: usize,
        cap: usize,
        pause_rank: usize,
    ) -> (Vec<Vec<f32>>, Vec<f32>) {
        let l = layout(lens);
        let plan = Arc::new(BucketPlan::new(&l, first_cap, cap));
        let world = 3;
        let opts = crate::ring::tests::options(TransportKind::Tcp, 97);
        let rings = crate::ring::tests::ring_of(world, &opts).await;
        // Integer values: every summation order is exact.
        let grad = move |rank: usize, param: usize, pass: usize| -> Vec<f32> {
            (0..lens[param])
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
        let outs = crate::ring::tests::on_every_rank(rings, move |rank, ring| {
            let (ready_tx, ready_rx) = mpsc::channel();
            let inflight = InFlight::start(ring, plan.clone(), 5, &Span::none(), ready_rx);
            let mut filler = BucketFiller::new(&plan, &l, plan.new_buffers(), ready_tx);
            for pass in 0..2 {
                let sink = filler.pass(pass == 1);
                // Each rank its own order; one rank dawdles over each.
                let mut order: Vec<usize> = (0..lens.len()).rev().collect();
                order.rotate_left(rank);
                for p in order {
                    if rank == pause_rank {
                        std::thread::sleep(Duration::from_millis(3));
                    }
                    if !(pass == 1 && p == skipped) {
                        sink.gradient(p, &grad(rank, p, pass));
                    }
                }
            }
            filler.flush();
            assert!(!filler.late());
            drop(filler);
            let (ring, result) = inflight.finish();
            assert!(ring.is_some());
            let (buffers, figures) = result.expect("reduce");
            assert!(
                figures.rounds <= max_rounds(&plan, 3),
                "rank {rank}: {} rounds",
                figures.rounds
            );
            let mut flat = vec![f32::NAN; l.total()];
            for (range, buf) in plan.pieces().iter().zip(&buffers) {
                flat[range.clone()].copy_from_slice(buf);
            }
            flat
        })
        .await;
        (outs, expected)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn buckets_reduced_during_backward_give_the_whole_sum_on_every_rank() {
        const LENS: [usize; 6] = [3, 1000, 17, 250, 1, 64];
        for pause_rank in [0, 2] {
            let (outs, expected) = reduce_on_three_ranks(&LENS, 20, 300, pause_rank).await;
            for (rank, out) in outs.iter().enumerate() {
                assert_eq!(out, &expected, "rank {rank}");
            }
        }
    }

    /// A bucket larger than a chunk goes in pieces, and buckets of one
    /// element (fewer than ranks) agree and reduce too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_buckets_go_in_pieces_and_tiny_ones_still_reduce() {
        static LENS: [usize; 4] = [1, CHUNK_ELEMS * 2 + 5, 1, 2];
        let (outs, expected) = reduce_on_three_ranks(&LENS, 1, 1, 1).await;
        for (rank, out) in outs.iter().enumerate() {
            assert!(out == &expected, "rank {rank}");
        }
    }

    /// A member that keeps joining rounds without ever holding its buckets
    /// (lying, not silent) is refused once the rounds pass what honest
    /// members could need, with an error saying so.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_member_that_never_agrees_is_refused_after_the_honest_bound() {
        let l = layout(&[10, 10]);
        let plan = Arc::new(BucketPlan::new(&l, 1, 1));
        let bound = max_rounds(&plan, 2);
        let opts = crate::ring::tests::options(TransportKind::Tcp, 97);
        let rings = crate::ring::tests::ring_of(2, &opts).await;
        let outs = crate::ring::tests::on_every_rank(rings, move |rank, mut ring| {
            if rank == 1 {
                // Answers every round with "holding nothing".
                let mut seq = 0;
                while ring
                    .all_reduce_exact(call_id(5, seq), &mut [0.0, 0.0], ReduceOp::Sum)
                    .is_ok()
                {
                    seq += 1;
                }
                return (seq, String::new());
            }
            let (ready_tx, ready_rx) = mpsc::channel();
            let (reduced_tx, _reduced_rx) = mpsc::channel();
            let mut filler = BucketFiller::new(&plan, &l, plan.new_buffers(), ready_tx);
            filler.flush();
            drop(filler);
            let r = reduce_buckets(&mut ring, &plan, 5, &ready_rx, &reduced_tx);
            (0, r.err().map(|e| e.to_string()).unwrap_or_default())
        })
        .await;
        assert!(outs[0].1.contains("did not settle"), "{}", outs[0].1);
        assert_eq!(outs[1].0, bound, "rounds answered before the refusal");
    }

    /// A failed backward ends the step at once: cancelling aborts the
    /// ring rather than wait for buckets that never come, and hands the
    /// ring back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_reduction_returns_at_once_with_the_ring() {
        let l = layout(&[10, 10]);
        let plan = Arc::new(BucketPlan::new(&l, 1, 1));
        let opts = crate::ring::tests::options(TransportKind::Tcp, 97);
        let mut rings = crate::ring::tests::ring_of(2, &opts).await;
        let ring = rings.remove(0);
        let started = Instant::now();
        let ring = tokio::task::spawn_blocking(move || {
            let (ready_tx, ready_rx) = mpsc::channel();
            let inflight = InFlight::start(ring, plan.clone(), 1, &Span::none(), ready_rx);
            let mut filler = BucketFiller::new(&plan, &l, plan.new_buffers(), ready_tx);
            // Bucket 0 goes (its round blocks: the neighbour never joins).
            filler.pass(true).gradient(1, &[1.0; 10]);
            inflight.cancel()
        })
        .await
        .expect("join");
        assert!(ring.is_some());
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        drop(rings);
    }
}
