//! PowerSGD gradient compression (Vogels, Karimireddy and Jaggi, 2019;
//! PyTorch's `powerSGD_hook`), for `ring.compression = "powersgd:R"`.
//!
//! Each weight matrix's gradient M (a parameter of two or more dimensions,
//! seen as rows x the rest, where rank-R factors are smaller than M) is sent
//! as two thin factors instead of itself:
//!
//! 1. M = this rank's gradient + its error feedback (what earlier steps'
//!    approximations left out);
//! 2. P = sum over ranks of M Q (one all-reduce, with every tensor that is
//!    not compressed, exactly), Q being the last step's;
//! 3. P is orthonormalised (Gram-Schmidt);
//! 4. Q = sum over ranks of Mᵀ P (a second all-reduce);
//! 5. the reduced gradient is P Qᵀ, and this rank's error is M - P Qᵀ / W.
//!
//! Replicas stay bit-identical: steps 3 and 5 run here in plain Rust loops
//! on reduced (identical) inputs; only the local products M Q and Mᵀ P use
//! libtorch, and the ring makes their sums identical everywhere. Q starts
//! from the same seeded values on every rank, and the error feedback is
//! each rank's own; both start afresh with each ring generation.

use std::ops::Range;

use tch::{Kind, Tensor};

use super::overlap::call_id;
use crate::model::ParamLayout;
use crate::ring::{ReduceOp, Ring, RingError};

/// One compressed matrix: its place in the flat gradient, its shape, and
/// where its factors live in the flat P and Q vectors.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Matrix {
    range: Range<usize>,
    rows: usize,
    cols: usize,
    /// Offset of its P (rows x rank) among the P factors.
    p_at: usize,
    /// Offset of its Q (cols x rank) among the Q factors, and of its error
    /// (rows x cols) among the errors.
    q_at: usize,
    e_at: usize,
}

pub struct PowerSgd {
    rank: usize,
    matrices: Vec<Matrix>,
    /// Ranges of the flat gradient sent exactly (biases, small tensors).
    exact: Vec<Range<usize>>,
    exact_len: usize,
    p_len: usize,
    /// Every matrix's Q, kept from step to step (warm start).
    q: Vec<f32>,
    /// This rank's error feedback, per compressed element.
    error: Vec<f32>,
    /// Scratch: the exact elements and every P; then every Q.
    first: Vec<f32>,
    second: Vec<f32>,
}

impl PowerSgd {
    /// Plans the compression of `layout`'s gradient at `rank`, with Q drawn
    /// from `seed` (the same on every member).
    pub fn new(layout: &ParamLayout, rank: usize, seed: u64) -> Self {
        let rank = rank.max(1);
        let (mut matrices, mut exact) = (Vec::new(), Vec::new());
        let (mut p_len, mut q_len, mut e_len, mut exact_len) = (0, 0, 0, 0);
        for p in layout.params() {
            let rows = p.shape.first().copied().unwrap_or(1).max(1) as usize;
            let cols = p.len / rows;
            // Compress only where the factors are smaller than the matrix,
            // as PyTorch's hook does.
            if p.shape.len() >= 2 && rows * cols == p.len && rank * (rows + cols) < p.len {
                matrices.push(Matrix {
                    range: p.range(),
                    rows,
                    cols,
                    p_at: p_len,
                    q_at: q_len,
                    e_at: e_len,
                });
                p_len += rows * rank;
                q_len += cols * rank;
                e_len += p.len;
            } else {
                exact.push(p.range());
                exact_len += p.len;
            }
        }
        let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
        let q = (0..q_len).map(|_| uniform(&mut state)).collect();
        Self {
            rank,
            matrices,
            exact,
            exact_len,
            p_len,
            q,
            error: vec![0.0; e_len],
            first: vec![0.0; exact_len + p_len],
            second: vec![0.0; q_len],
        }
    }

    /// Elements that travel per step, against the whole gradient's.
    pub fn sent_elements(&self) -> usize {
        self.exact_len + self.p_len + self.q.len()
    }

    /// Forgets the error feedback (after a skipped, non-finite step, so a
    /// NaN does not live on in it).
    pub fn reset_error(&mut self) {
        self.error.fill(0.0);
    }

    /// Replaces `grads` (this rank's gradient) with the compressed sum over
    /// every rank; two ring all-reduces (ids `version` and its bucket 1).
    pub fn all_reduce(
        &mut self,
        ring: &mut Ring,
        version: u64,
        grads: &mut [f32],
    ) -> Result<(), RingError> {
        let world = ring.spec().world() as f32;
        let r = self.rank;
        // 1-2: M with its error feedback; the exact part and every M Q.
        let mut at = 0;
        for range in &self.exact {
            self.first[at..at + range.len()].copy_from_slice(&grads[range.clone()]);
            at += range.len();
        }
        let mut ms = Vec::with_capacity(self.matrices.len());
        for m in &self.matrices {
            let g = &mut grads[m.range.clone()];
            let e = &self.error[m.e_at..m.e_at + m.range.len()];
            for (g, e) in g.iter_mut().zip(e) {
                *g += e;
            }
            let mt = Tensor::from_slice(g).view([m.rows as i64, m.cols as i64]);
            let q = Tensor::from_slice(&self.q[m.q_at..m.q_at + m.cols * r])
                .view([m.cols as i64, r as i64]);
            let p = mt.matmul(&q).to_kind(Kind::Float).contiguous();
            let dst = &mut self.first[self.exact_len + m.p_at..][..m.rows * r];
            p.copy_data(dst, m.rows * r);
            ms.push(mt);
        }
        ring.all_reduce_exact(call_id(version, 0), &mut self.first, ReduceOp::Sum)?;
        let mut at = 0;
        for range in &self.exact {
            grads[range.clone()].copy_from_slice(&self.first[at..at + range.len()]);
            at += range.len();
        }
        // 3-4: orthonormal P, then every Mᵀ P.
        for (m, mt) in self.matrices.iter().zip(&ms) {
            let p = &mut self.first[self.exact_len + m.p_at..][..m.rows * r];
            orthonormalize(p, m.rows, r);
            let pt = Tensor::from_slice(p).view([m.rows as i64, r as i64]);
            let q = mt.tr().matmul(&pt).to_kind(Kind::Float).contiguous();
            q.copy_data(&mut self.second[m.q_at..m.q_at + m.cols * r], m.cols * r);
        }
        ring.all_reduce_exact(call_id(version, 1), &mut self.second, ReduceOp::Sum)?;
        self.q.copy_from_slice(&self.second);
        // 5: the reduced gradient P Qᵀ, and what it leaves of this rank's M.
        // Row by row with Qᵀ's rows contiguous, so the inner loops vectorise;
        // the same order of operations on every rank.
        let mut qt = Vec::new();
        for m in &self.matrices {
            let p = &self.first[self.exact_len + m.p_at..][..m.rows * r];
            let q = &self.q[m.q_at..m.q_at + m.cols * r];
            qt.clear();
            qt.extend((0..r).flat_map(|k| (0..m.cols).map(move |j| q[j * r + k])));
            let g = &mut grads[m.range.clone()];
            let e = &mut self.error[m.e_at..m.e_at + m.range.len()];
            let mut row = vec![0f32; m.cols];
            for i in 0..m.rows {
                row.fill(0.0);
                for k in 0..r {
                    let pik = p[i * r + k];
                    for (x, qk) in row.iter_mut().zip(&qt[k * m.cols..(k + 1) * m.cols]) {
                        *x += pik * qk;
                    }
                }
                let at = i * m.cols;
                for ((g, e), approx) in g[at..at + m.cols]
                    .iter_mut()
                    .zip(&mut e[at..at + m.cols])
                    .zip(&row)
                {
                    *e = *g - approx / world;
                    *g = *approx;
                }
            }
        }
        Ok(())
    }
}

/// Gram-Schmidt on the `cols` columns of the row-major `rows x cols`
/// matrix `a`, in place, projecting twice ("twice is enough") so that the
/// columns are orthogonal to working precision. A column with nothing of
/// its own left (the gradient's rank is below R) becomes zero rather than
/// normalised rounding noise, which would not be orthogonal to the others.
fn orthonormalize(a: &mut [f32], rows: usize, cols: usize) {
    let norm = |a: &[f32], c: usize| {
        (0..rows)
            .map(|i| a[i * cols + c] * a[i * cols + c])
            .sum::<f32>()
            .sqrt()
    };
    for c in 0..cols {
        let before = norm(a, c);
        for _ in 0..2 {
            for prev in 0..c {
                let dot: f32 = (0..rows)
                    .map(|i| a[i * cols + c] * a[i * cols + prev])
                    .sum();
                for i in 0..rows {
                    a[i * cols + c] -= dot * a[i * cols + prev];
                }
            }
        }
        let after = norm(a, c);
        let scale = if after > 1e-4 * before && after > 0.0 {
            1.0 / after
        } else {
            0.0
        };
        for i in 0..rows {
            a[i * cols + c] *= scale;
        }
    }
}

/// Uniform in [-1, 1) from a splitmix64 state: the same on every rank and
/// platform, unlike a library's generator.
fn uniform(state: &mut u64) -> f32 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::TransportKind;

    fn layout(shapes: &[&[i64]]) -> ParamLayout {
        ParamLayout::new(
            shapes
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("p{i}"), s.to_vec())),
        )
    }

    #[test]
    fn only_matrices_the_factors_shrink_are_compressed() {
        let l = layout(&[&[64, 100], &[64], &[3, 3], &[32, 1, 5, 5]]);
        let p = PowerSgd::new(&l, 4, 1);
        let shapes: Vec<(usize, usize)> = p.matrices.iter().map(|m| (m.rows, m.cols)).collect();
        // 3x3: 4*(3+3) = 24 > 9, sent exactly; a conv kernel is rows x the rest.
        assert_eq!(shapes, vec![(64, 100), (32, 25)]);
        assert_eq!(p.exact_len, 64 + 9);
        assert_eq!(p.sent_elements(), 64 + 9 + 4 * (64 + 32) + 4 * (100 + 25));
    }

    #[test]
    fn orthonormalized_columns_are_unit_and_orthogonal() {
        let (rows, cols) = (50, 4);
        let mut state = 3;
        let mut a: Vec<f32> = (0..rows * cols).map(|_| uniform(&mut state)).collect();
        orthonormalize(&mut a, rows, cols);
        for c in 0..cols {
            for d in 0..cols {
                let dot: f32 = (0..rows).map(|i| a[i * cols + c] * a[i * cols + d]).sum();
                let want = if c == d { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-4, "({c},{d}): {dot}");
            }
        }
    }

    /// Every rank ends with the same gradient; exact tensors are exact sums;
    /// a gradient of rank 1 (an outer product, the same direction on every
    /// rank) comes through whole; and with error feedback, what a matrix
    /// loses in one step is sent in the next.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compressed_sums_are_identical_on_every_rank_and_error_feedback_catches_up() {
        let world = 3;
        let l = layout(&[&[40, 30], &[40]]);
        let opts = crate::ring::tests::options(TransportKind::Tcp, 97);
        let rings = crate::ring::tests::ring_of(world, &opts).await;
        let outs = crate::ring::tests::on_every_rank(rings, move |rank, mut ring| {
            let mut c = PowerSgd::new(&l, 2, 9);
            // Step 1: rank-1 gradients u vᵀ scaled per rank.
            let u: Vec<f32> = (0..40).map(|i| (i % 7) as f32 - 3.0).collect();
            let v: Vec<f32> = (0..30).map(|j| (j % 5) as f32 - 2.0).collect();
            let mut g = vec![0f32; l.total()];
            for i in 0..40 {
                for j in 0..30 {
                    g[i * 30 + j] = u[i] * v[j] * (rank + 1) as f32;
                }
            }
            for (k, b) in g[1200..].iter_mut().enumerate() {
                *b = (k + rank) as f32;
            }
            c.all_reduce(&mut ring, 1, &mut g).expect("reduce");
            // Step 2: a full-rank gradient; then two zero steps
            // that only send what error feedback kept back.
            let mut sum_sent = vec![0f32; 1200];
            let full: Vec<f32> = (0..1200)
                .map(|k| ((k * 31 + rank * 7) % 23) as f32 - 11.0)
                .collect();
            let mut steps = Vec::new();
            for step in 0..10 {
                let mut g2 = vec![0f32; l.total()];
                if step == 0 {
                    g2[..1200].copy_from_slice(&full);
                }
                c.all_reduce(&mut ring, 2 + step, &mut g2).expect("reduce");
                for (s, x) in sum_sent.iter_mut().zip(&g2[..1200]) {
                    *s += x;
                }
                steps.push(g2);
            }
            (g, steps, sum_sent)
        })
        .await;
        for (g, steps, _) in &outs[1..] {
            assert_eq!(g, &outs[0].0, "replicas identical");
            assert_eq!(steps, &outs[0].1, "replicas identical");
        }
        let (g, _, sum_sent) = &outs[0];
        // Rank 1 (an outer product) comes through whole: 6 u vᵀ.
        for i in 0..40 {
            for j in 0..30 {
                let want = 6.0 * ((i % 7) as f32 - 3.0) * ((j % 5) as f32 - 2.0);
                assert!(
                    (g[i * 30 + j] - want).abs() < 1e-3 * 36.0,
                    "[{i},{j}] {} vs {want}",
                    g[i * 30 + j]
                );
            }
        }
        for (k, b) in g[1200..].iter().enumerate() {
            assert_eq!(*b, (3 * k + 3) as f32, "bias {k} exact");
        }
        // The full-rank matrix: after a few steps of error feedback, what was
        // sent adds up to the true sum much better than one step's rank-2 cut
        // (about half the error after 10 steps).
        let truth: Vec<f32> = (0..1200)
            .map(|k| {
                (0..world)
                    .map(|r| ((k * 31 + r * 7) % 23) as f32 - 11.0)
                    .sum()
            })
            .collect();
        let err = |x: &[f32]| -> f32 {
            x.iter()
                .zip(&truth)
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f32>()
                .sqrt()
        };
        let first_step = &outs[0].1[0][..1200];
        let norm = err(&vec![0.0; 1200]);
        assert!(
            err(first_step) > 0.3 * norm,
            "rank 2 cannot hold it in one step"
        );
        assert!(
            err(sum_sent) < 0.6 * err(first_step),
            "{} vs {}",
            err(sum_sent),
            err(first_step)
        );
    }
}
