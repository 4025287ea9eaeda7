//! The pipelined ring schedule over any [`FrameSender`]/[`FrameReceiver`] pair.
//!
//! Work is cut into *units*: unit `u = t * S + j` is segment `j` of the chunk
//! handled at ring step `t` (S segments per chunk). A sender thread sends
//! units in order while the calling thread receives units in order, so the
//! wire and the summing overlap. Two counters order them:
//! - send unit (t, j), t > 0, forwards what receive unit (t-1, j) produced;
//! - receive unit (t, j) overwrites the chunk that send unit (t+1-world, j)
//!   reads, so it waits for that send. Ring causality already implies this
//!   for well-behaved peers; checking it keeps a misbehaving peer from racing us.
//!
//! Each segment sits behind its own (uncontended) mutex, so the two threads
//! share the buffer without `unsafe`.

use std::cell::Cell;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ringtrain_common::wire::{FrameHeader, Phase, WireEncoding};
use ringtrain_common::Rank;

use super::layout::Layout;
use super::transport::{FrameReceiver, FrameSender, RingLinks};
use super::{RingError, RingSpec};

thread_local! {
    /// Time this thread's ring receiver spent blocked on its left neighbour.
    static RECEIVE_WAIT: Cell<Duration> = const { Cell::new(Duration::ZERO) };
}

/// The time this thread's all-reduces have waited for their left neighbour's
/// frames since the last call (then resets it): each receive's time less the
/// summing and decoding done as its pieces arrive. The receive loop runs on
/// the caller's thread, so ranks sharing a process keep separate figures.
pub fn take_receive_wait() -> Duration {
    RECEIVE_WAIT.with(|w| w.replace(Duration::ZERO))
}

/// What every rank ends up holding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// Sum divided by the world size (gradient averaging).
    Mean,
}

#[derive(Default)]
struct Counters {
    sent: usize,
    received: usize,
    failed: bool,
}

/// Progress shared by the sender and receiver threads.
#[derive(Default)]
struct Progress {
    counters: Mutex<Counters>,
    changed: Condvar,
}

impl Progress {
    fn lock(&self) -> MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait(&self, ready: impl Fn(&Counters) -> bool) -> Result<(), RingError> {
        let mut c = self.lock();
        loop {
            if c.failed {
                return Err(RingError::Aborted);
            }
            if ready(&c) {
                return Ok(());
            }
            c = self.changed.wait(c).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn update(&self, f: impl FnOnce(&mut Counters)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }

    /// Marks the call failed. Returns true if this was the first failure.
    fn fail(&self) -> bool {
        let mut c = self.lock();
        let first = !c.failed;
        c.failed = true;
        drop(c);
        self.changed.notify_all();
        first
    }

    fn failed(&self) -> bool {
        self.lock().failed
    }
}

struct Plan<'a> {
    spec: &'a RingSpec,
    layout: Layout,
    rank: usize,
    step: u64,
    op: ReduceOp,
    encoding: WireEncoding,
}

impl Plan<'_> {
    fn header(
        &self,
        t: usize,
        chunk: usize,
        seg: &std::ops::Range<usize>,
        from: usize,
    ) -> FrameHeader {
        FrameHeader {
            job: self.spec.job,
            generation: self.spec.generation,
            step: self.step,
            phase: if t + 1 < self.layout.world {
                Phase::ReduceScatter
            } else {
                Phase::AllGather
            },
            ring_step: t as u32,
            chunk: chunk as u32,
            offset: seg.start as u64,
            elements: seg.len() as u32,
            encoding: self.encoding,
            from_rank: Rank(from as u32),
        }
    }
}

/// Runs one all-reduce over `links`. Blocking. Returns whether every
/// reduced value is finite: each final segment is checked as it lands,
/// while it is in cache, instead of in another pass over the whole buffer.
pub fn all_reduce(
    spec: &RingSpec,
    links: &mut RingLinks,
    step: u64,
    data: &mut [f32],
    op: ReduceOp,
    encoding: WireEncoding,
) -> Result<bool, RingError> {
    let world = spec.world();
    if world <= 1 || data.is_empty() {
        return Ok(crate::optim::all_finite(data));
    }
    let layout = Layout::new(data.len(), world, spec.options.segment_elems);
    let plan = Plan {
        spec,
        layout,
        rank: spec.rank.index(),
        step,
        op,
        encoding,
    };

    // Split the buffer into per-segment cells, in (chunk, segment) order.
    let mut segments: Vec<Mutex<&mut [f32]>> =
        Vec::with_capacity(world * layout.segments_per_chunk);
    let mut rest = data;
    for c in 0..world {
        for j in 0..layout.segments_per_chunk {
            let (head, tail) = rest.split_at_mut(layout.segment(c, j).len());
            segments.push(Mutex::new(head));
            rest = tail;
        }
    }
    let progress = Progress::default();
    let RingLinks {
        sender,
        receiver,
        abort,
        ..
    } = links;

    super::latency::prefer_prompt_wakeups();
    let (send_result, recv_result) = std::thread::scope(|s| {
        let sending = s.spawn(|| {
            super::latency::prefer_prompt_wakeups();
            let r = send_loop(&plan, &segments, &progress, sender.as_mut());
            if r.is_err() && progress.fail() {
                abort.abort();
            }
            r
        });
        let r = recv_loop(&plan, &segments, &progress, receiver.as_mut());
        if r.is_err() && progress.fail() {
            abort.abort();
        }
        let sent = sending
            .join()
            .unwrap_or_else(|_| Err(RingError::Setup("ring sender thread panicked".into())));
        (sent, r)
    });
    // Report the root cause, not the abort it caused on the other half.
    match (send_result, recv_result) {
        (Ok(()), Ok(finite)) => Ok(finite),
        (Err(RingError::Aborted), Err(e)) | (Err(e), _) => Err(e),
        (Ok(()), Err(e)) => Err(e),
    }
}

fn lock<'a, 'b>(m: &'a Mutex<&'b mut [f32]>) -> MutexGuard<'a, &'b mut [f32]> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Turns a transport error into `Aborted` when the other half failed first
/// (its abort is what broke our I/O).
fn classify(progress: &Progress, e: RingError) -> RingError {
    if progress.failed() {
        RingError::Aborted
    } else {
        e
    }
}

fn send_loop(
    plan: &Plan<'_>,
    segments: &[Mutex<&mut [f32]>],
    progress: &Progress,
    sender: &mut dyn FrameSender,
) -> Result<(), RingError> {
    let l = &plan.layout;
    let s = l.segments_per_chunk;
    let half = plan.encoding != WireEncoding::F32;
    let mut wire = vec![0u16; if half { l.max_segment_len() } else { 0 }];
    for t in 0..l.ring_steps() {
        let chunk = l.send_chunk(plan.rank, t);
        for j in 0..s {
            let unit = t * s + j;
            if t > 0 {
                // Forward only what the previous ring step finished for this segment.
                progress.wait(|c| c.received > unit - s)?;
            }
            let range = l.segment(chunk, j);
            let header = plan.header(t, chunk, &range, plan.rank);
            let cell = lock(&segments[chunk * s + j]);
            let result = if half {
                let w = &mut wire[..range.len()];
                plan.encoding.encode_half(&cell, w);
                drop(cell);
                sender.send(&header, bytemuck::cast_slice(w))
            } else {
                sender.send(&header, bytemuck::cast_slice(&cell[..]))
            };
            result.map_err(|e| classify(progress, e))?;
            progress.update(|c| c.sent = unit + 1);
        }
    }
    Ok(())
}

/// Receives and reduces every unit; returns whether every final value (the
/// chunk this rank owns, once reduced, and each chunk gathered) is finite.
fn recv_loop(
    plan: &Plan<'_>,
    segments: &[Mutex<&mut [f32]>],
    progress: &Progress,
    receiver: &mut dyn FrameReceiver,
) -> Result<bool, RingError> {
    let l = &plan.layout;
    let s = l.segments_per_chunk;
    let world = l.world;
    let left = (plan.rank + world - 1) % world;
    let half = plan.encoding != WireEncoding::F32;
    let mut incoming = vec![0f32; l.max_segment_len()];
    let mut wire = vec![0u16; if half { l.max_segment_len() } else { 0 }];
    let mut finite = true;
    for t in 0..l.ring_steps() {
        let chunk = l.recv_chunk(plan.rank, t);
        let reduce = t + 1 < world;
        for j in 0..s {
            let unit = t * s + j;
            if t + 1 >= world {
                let must_be_sent = (t + 1 - world) * s + j;
                progress.wait(|c| c.sent > must_be_sent)?;
            }
            let range = l.segment(chunk, j);
            let n = range.len();
            let expected = plan.header(t, chunk, &range, left);
            let cell = &segments[chunk * s + j];
            let received = if reduce {
                // Sum each piece into our values as it arrives, while it is in cache.
                let mut mine = lock(cell);
                let mut at = 0;
                let mut working = Duration::ZERO;
                let waiting = Instant::now();
                let r = receiver.recv_pieces(&expected, &mut |bytes| {
                    let summing = Instant::now();
                    let k = if half {
                        let words: &[u16] = bytemuck::cast_slice(bytes);
                        let k = words.len();
                        plan.encoding.decode_half(words, &mut incoming[..k]);
                        add(&mut mine[at..at + k], &incoming[..k]);
                        k
                    } else {
                        let values: &[f32] = bytemuck::cast_slice(bytes);
                        add(&mut mine[at..at + values.len()], values);
                        values.len()
                    };
                    at += k;
                    working += summing.elapsed();
                });
                let waited = waiting.elapsed().saturating_sub(working);
                RECEIVE_WAIT.with(|w| w.set(w.get() + waited));
                r.map(|()| {
                    if t + 2 == world {
                        // This chunk is now fully reduced and ours to broadcast.
                        finalize(&mut mine, plan.op, world, plan.encoding);
                        finite &= crate::optim::all_finite(&mine);
                    }
                })
            } else {
                // All-gather: the final values land straight in place.
                let mut mine = lock(cell);
                let waiting = Instant::now();
                let r = if half {
                    let r = receiver.recv(&expected, bytemuck::cast_slice_mut(&mut wire[..n]));
                    RECEIVE_WAIT.with(|w| w.set(w.get() + waiting.elapsed()));
                    r.map(|()| plan.encoding.decode_half(&wire[..n], &mut mine))
                } else {
                    let r = receiver.recv(&expected, bytemuck::cast_slice_mut(&mut mine[..]));
                    RECEIVE_WAIT.with(|w| w.set(w.get() + waiting.elapsed()));
                    r
                };
                r.map(|()| finite &= crate::optim::all_finite(&mine))
            };
            received.map_err(|e| classify(progress, e))?;
            progress.update(|c| c.received = unit + 1);
        }
    }
    Ok(finite)
}

fn add(into: &mut [f32], values: &[f32]) {
    for (m, x) in into.iter_mut().zip(values) {
        *m += *x;
    }
}

/// Applies the mean and rounds to the wire precision, so the owner keeps
/// exactly what every other rank will decode.
fn finalize(values: &mut [f32], op: ReduceOp, world: usize, encoding: WireEncoding) {
    if op == ReduceOp::Mean {
        let w = world as f32;
        values.iter_mut().for_each(|v| *v /= w);
    }
    encoding.quantize(values);
}
