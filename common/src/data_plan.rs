//! Which training samples each step uses. Pure functions shared by the
//! coordinator and the workers.
//!
//! Each epoch is a seeded permutation of the training set. A step takes the
//! next `global_batch` positions of it from the shard cursor, and rank r of a
//! ring of w takes the r-th balanced slice of those positions. So the samples
//! of a step depend on the global batch, not on how it is split, and every
//! sample is used exactly once per epoch (the last step of an epoch is
//! smaller rather than dropped).

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// Position in the training data: the epoch and how far into its permutation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardCursor {
    pub epoch: u64,
    pub position: u64,
}

/// The positions of the epoch's permutation that the step at `cursor` uses.
pub fn step_positions(cursor: ShardCursor, global_batch: u64, samples: u64) -> Range<u64> {
    let end = (cursor.position + global_batch).min(samples);
    cursor.position..end
}

/// The cursor after a step that used `positions`.
pub fn advance(cursor: ShardCursor, positions: &Range<u64>, samples: u64) -> ShardCursor {
    if positions.end >= samples {
        ShardCursor {
            epoch: cursor.epoch + 1,
            position: 0,
        }
    } else {
        ShardCursor {
            epoch: cursor.epoch,
            position: positions.end,
        }
    }
}

/// Rank `rank`'s balanced slice of a step's positions.
pub fn rank_slice(positions: &Range<u64>, rank: usize, world: usize) -> Range<u64> {
    let len = positions.end - positions.start;
    let (w, r) = (world.max(1) as u64, rank as u64);
    let base = len / w;
    let rem = len % w;
    let start = positions.start + r * base + r.min(rem);
    start..start + base + u64::from(r < rem)
}

/// Steps in one epoch with a fixed global batch.
pub fn steps_per_epoch(samples: u64, global_batch: u64) -> u64 {
    samples.div_ceil(global_batch.max(1))
}

/// The job's total steps: `max_steps` if set, else epochs × steps per epoch,
/// whichever is smaller when both are set.
pub fn total_steps(epochs: u64, max_steps: u64, samples: u64, global_batch: u64) -> u64 {
    let by_epochs = epochs * steps_per_epoch(samples, global_batch);
    match (epochs, max_steps) {
        (0, m) => m,
        (_, 0) => by_epochs,
        (_, m) => m.min(by_epochs),
    }
}

/// SplitMix64: tiny, seedable, the same on every machine. Used for data
/// order and parameter init, which must not depend on libtorch's global
/// generator (any thread may draw from it).
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-bound, bound).
    pub fn symmetric(&mut self, bound: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        bound * (2.0 * unit - 1.0)
    }
}

/// The sample order of `epoch` (Fisher–Yates with a seeded generator).
pub fn epoch_permutation(seed: u64, epoch: u64, samples: usize) -> Vec<u32> {
    let mut rng = SplitMix64(seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03));
    let mut perm: Vec<u32> = (0..samples as u32).collect();
    for i in (1..samples).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        perm.swap(i, j);
    }
    perm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sample_is_used_once_per_epoch_whatever_the_world() {
        let samples = 1003u64;
        for world in 1..=5usize {
            let batch = 16u64;
            let mut seen = vec![0u32; samples as usize];
            let mut cursor = ShardCursor::default();
            let perm = epoch_permutation(7, 0, samples as usize);
            while cursor.epoch == 0 {
                let pos = step_positions(cursor, batch * world as u64, samples);
                for r in 0..world {
                    for p in rank_slice(&pos, r, world) {
                        seen[perm[p as usize] as usize] += 1;
                    }
                }
                cursor = advance(cursor, &pos, samples);
            }
            assert!(seen.iter().all(|&n| n == 1), "world {world}");
        }
    }

    #[test]
    fn a_step_uses_the_same_samples_however_the_global_batch_is_split() {
        let cursor = ShardCursor {
            epoch: 0,
            position: 128,
        };
        // 1 worker x 64 and 4 workers x 16, as their specs compute it.
        let spec = |workers: usize, batch: usize| {
            crate::jobspec::JobSpec::parse(
                crate::jobspec::tests::EXAMPLE,
                &[format!("workers={workers}"), format!("batch_size={batch}")],
            )
            .unwrap()
        };
        let one = step_positions(cursor, spec(1, 64).global_batch(1), 60_000);
        let four = step_positions(cursor, spec(4, 16).global_batch(4), 60_000);
        assert_eq!(one, 128..192);
        assert_eq!(four, 128..192);
        // The four slices are disjoint and together the whole step, in order.
        let slices: Vec<Range<u64>> = (0..4).map(|r| rank_slice(&four, r, 4)).collect();
        assert_eq!(slices, [128..144, 144..160, 160..176, 176..192]);
        // An uneven split stays balanced and complete.
        let odd: Vec<Range<u64>> = (0..3).map(|r| rank_slice(&(0..10), r, 3)).collect();
        assert_eq!(odd, [0..4, 4..7, 7..10]);
    }

    #[test]
    fn permutations_are_seeded_and_differ_per_epoch() {
        let a = epoch_permutation(1, 0, 100);
        assert_eq!(a, epoch_permutation(1, 0, 100));
        assert_ne!(a, epoch_permutation(1, 1, 100));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<u32>>());
    }

    #[test]
    fn total_steps_honours_both_bounds() {
        assert_eq!(steps_per_epoch(60_000, 256), 235);
        assert_eq!(total_steps(2, 0, 60_000, 256), 470);
        assert_eq!(total_steps(2, 20, 60_000, 256), 20);
        assert_eq!(total_steps(0, 60, 60_000, 256), 60);
    }
}
