//! Where each chunk and segment of a flat buffer lies. Pure arithmetic, shared
//! by sender and receiver so both agree without talking.

use std::ops::Range;

/// Splits `len` into `parts` near-equal ranges (the first `len % parts` one longer).
fn balanced(len: usize, parts: usize, i: usize) -> Range<usize> {
    let base = len / parts;
    let rem = len % parts;
    let start = i * base + i.min(rem);
    start..start + base + usize::from(i < rem)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub len: usize,
    pub world: usize,
    /// Every chunk is cut into the same number of segments, so a segment index
    /// means the same step of the pipeline on every chunk.
    pub segments_per_chunk: usize,
}

impl Layout {
    pub fn new(len: usize, world: usize, segment_elems: usize) -> Self {
        let world = world.max(1);
        let max_chunk = len.div_ceil(world);
        let segments_per_chunk = max_chunk.div_ceil(segment_elems.max(1)).max(1);
        Self {
            len,
            world,
            segments_per_chunk,
        }
    }

    pub fn chunk(&self, chunk: usize) -> Range<usize> {
        balanced(self.len, self.world, chunk)
    }

    /// Absolute element range of segment `seg` of chunk `chunk`.
    pub fn segment(&self, chunk: usize, seg: usize) -> Range<usize> {
        let c = self.chunk(chunk);
        let r = balanced(c.len(), self.segments_per_chunk, seg);
        c.start + r.start..c.start + r.end
    }

    pub fn max_segment_len(&self) -> usize {
        self.len
            .div_ceil(self.world)
            .div_ceil(self.segments_per_chunk)
    }

    /// Ring steps in one all-reduce: reduce-scatter then all-gather.
    pub fn ring_steps(&self) -> usize {
        2 * (self.world - 1)
    }

    /// The chunk `rank` sends at ring step `t`; it receives chunk `send_chunk(rank, t + 1)`.
    pub fn send_chunk(&self, rank: usize, t: usize) -> usize {
        (rank + self.world - t % self.world) % self.world
    }

    pub fn recv_chunk(&self, rank: usize, t: usize) -> usize {
        self.send_chunk(rank, t + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_tile_the_buffer_exactly_once() {
        for len in [0, 1, 2, 3, 7, 64, 1000, 1001, 12_345] {
            for world in 1..=8 {
                for seg in [1, 3, 100, 1 << 20] {
                    let l = Layout::new(len, world, seg);
                    let mut seen = vec![0u8; len];
                    for c in 0..world {
                        for s in 0..l.segments_per_chunk {
                            let r = l.segment(c, s);
                            assert!(r.len() <= l.max_segment_len());
                            assert!(r.len() <= seg.max(1) || l.segments_per_chunk == 1);
                            r.for_each(|i| seen[i] += 1);
                        }
                    }
                    assert!(
                        seen.iter().all(|&n| n == 1),
                        "len {len} world {world} seg {seg}"
                    );
                }
            }
        }
    }

    #[test]
    fn after_reduce_scatter_each_rank_owns_the_chunk_it_sends_first_in_all_gather() {
        let l = Layout::new(100, 5, 10);
        for rank in 0..5 {
            let last_reduced = l.recv_chunk(rank, l.world - 2);
            assert_eq!(last_reduced, l.send_chunk(rank, l.world - 1));
            // the left neighbour's all-gather chunk is what we receive next
            assert_eq!(
                l.recv_chunk(rank, l.world - 1),
                l.send_chunk((rank + 4) % 5, l.world - 1)
            );
        }
    }
}
