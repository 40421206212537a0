//! Dense f32 matrices for inference: the output head, linears of `weights = "float"` models, and the f32
//! baseline of `engine bench-generate` (ternary weights held as γ·W̃ in f32, as a float engine would).
//!
//! y = W x row by row: each row is streamed once per call and dotted with up to four tokens at a time (FMA
//! kernels for AVX-512 / AVX2 chosen at run time, a portable one elsewhere), rows split over the rayon pool. The summation order does not depend on how many tokens are in a call, so
//! a prompt processed at once and token by token give bit-identical results.

use std::sync::{Arc, OnceLock};

use rayon::prelude::*;

/// Below this many weight×token products a matrix product runs on one thread.
const PAR_MIN_WORK: usize = 1 << 16;
/// Partial sums per dot product.
const LANES: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// Every kernel this CPU runs, the portable one first.
fn available_isas() -> Vec<Isa> {
    let mut v = vec![Isa::Portable];
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            v.push(Isa::Avx2Fma);
        }
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
            v.push(Isa::Avx512);
        }
    }
    v
}

fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        *available_isas()
            .last()
            .expect("portable is always available")
    })
}

/// Portable dot products of one row with N token rows, in a fixed order: LANES interleaved partial sums,
/// the tail, then a fixed pairwise reduction.
fn dots<const N: usize>(w: &[f32], xs: [&[f32]; N]) -> [f32; N] {
    let mut acc = [[0f32; LANES]; N];
    let chunks = w.len() / LANES;
    for (c, wc) in w.chunks_exact(LANES).enumerate() {
        for n in 0..N {
            let xc = &xs[n][c * LANES..(c + 1) * LANES];
            for l in 0..LANES {
                acc[n][l] += wc[l] * xc[l];
            }
        }
    }
    let mut out = [0f32; N];
    for n in 0..N {
        let mut a = acc[n];
        for (l, i) in (chunks * LANES..w.len()).enumerate() {
            a[l] += w[i] * xs[n][i];
        }
        let mut width = LANES / 2;
        while width > 0 {
            for l in 0..width {
                a[l] += a[l + width];
            }
            width /= 2;
        }
        out[n] = a[0];
    }
    out
}

/// Every row of `w` (rows × cols) against the `t` tokens of `x` into `out` (rows × t), four tokens at a
/// time then one, with the dot-product kernel `$dots` (inlined into the caller's target features).
macro_rules! walk_rows {
    ($dots:ident, $w:ident, $cols:ident, $x:ident, $t:ident, $out:ident) => {{
        let tok = |n: usize| &$x[n * $cols..(n + 1) * $cols];
        for (w, o) in $w.chunks_exact($cols).zip($out.chunks_exact_mut($t)) {
            let mut n = 0;
            while n + 4 <= $t {
                let d = $dots::<4>(w, [tok(n), tok(n + 1), tok(n + 2), tok(n + 3)]);
                o[n..n + 4].copy_from_slice(&d);
                n += 4;
            }
            while n < $t {
                o[n] = $dots::<1>(w, [tok(n)])[0];
                n += 1;
            }
        }
    }};
}

fn rows_portable(w: &[f32], cols: usize, x: &[f32], t: usize, out: &mut [f32]) {
    walk_rows!(dots, w, cols, x, t, out)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Σ of the scalar tail (elements past the last full vector), in index order.
    #[inline(always)]
    fn tail(w: &[f32], x: &[f32], from: usize) -> f32 {
        let mut s = 0f32;
        for i in from..w.len() {
            s += w[i] * x[i];
        }
        s
    }

    /// AVX-512: two 16-lane FMA accumulators per token (32 floats per step), a 16-float step, a scalar
    /// tail; the weight vectors are loaded once for all N tokens.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn dots_avx512<const N: usize>(w: &[f32], xs: [&[f32]; N]) -> [f32; N] {
        let n = w.len();
        let wp = w.as_ptr();
        let mut a0 = [_mm512_setzero_ps(); N];
        let mut a1 = [_mm512_setzero_ps(); N];
        let mut i = 0;
        while i + 32 <= n {
            let w0 = _mm512_loadu_ps(wp.add(i));
            let w1 = _mm512_loadu_ps(wp.add(i + 16));
            for k in 0..N {
                let xp = xs[k].as_ptr();
                a0[k] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp.add(i)), a0[k]);
                a1[k] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(i + 16)), a1[k]);
            }
            i += 32;
        }
        if i + 16 <= n {
            let w0 = _mm512_loadu_ps(wp.add(i));
            for k in 0..N {
                a0[k] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xs[k].as_ptr().add(i)), a0[k]);
            }
            i += 16;
        }
        let mut out = [0f32; N];
        for k in 0..N {
            out[k] = _mm512_reduce_add_ps(_mm512_add_ps(a0[k], a1[k])) + tail(w, xs[k], i);
        }
        out
    }

    /// AVX2 + FMA: the same scheme with 8-lane vectors.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dots_avx2<const N: usize>(w: &[f32], xs: [&[f32]; N]) -> [f32; N] {
        let n = w.len();
        let wp = w.as_ptr();
        let mut a0 = [_mm256_setzero_ps(); N];
        let mut a1 = [_mm256_setzero_ps(); N];
        let mut i = 0;
        while i + 16 <= n {
            let w0 = _mm256_loadu_ps(wp.add(i));
            let w1 = _mm256_loadu_ps(wp.add(i + 8));
            for k in 0..N {
                let xp = xs[k].as_ptr();
                a0[k] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp.add(i)), a0[k]);
                a1[k] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(i + 8)), a1[k]);
            }
            i += 16;
        }
        if i + 8 <= n {
            let w0 = _mm256_loadu_ps(wp.add(i));
            for k in 0..N {
                a0[k] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xs[k].as_ptr().add(i)), a0[k]);
            }
            i += 8;
        }
        let mut out = [0f32; N];
        for k in 0..N {
            let v = _mm256_add_ps(a0[k], a1[k]);
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), v);
            let s = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
                + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
            out[k] = s + tail(w, xs[k], i);
        }
        out
    }

    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn rows_avx512(w: &[f32], cols: usize, x: &[f32], t: usize, out: &mut [f32]) {
        walk_rows!(dots_avx512, w, cols, x, t, out)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rows_avx2(w: &[f32], cols: usize, x: &[f32], t: usize, out: &mut [f32]) {
        walk_rows!(dots_avx2, w, cols, x, t, out)
    }
}

/// `walk_rows` with the kernel of `isa`.
fn rows_dispatch(isa: Isa, w: &[f32], cols: usize, x: &[f32], t: usize, out: &mut [f32]) {
    assert!(cols > 0 && w.len().is_multiple_of(cols));
    assert_eq!(x.len(), t * cols);
    assert_eq!(out.len(), w.len() / cols * t);
    match isa {
        Isa::Portable => rows_portable(w, cols, x, t, out),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: selected only when the CPU reports AVX2 and FMA; sizes checked above.
        Isa::Avx2Fma => unsafe { x86::rows_avx2(w, cols, x, t, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: selected only when the CPU reports AVX-512F and FMA; sizes checked above.
        Isa::Avx512 => unsafe { x86::rows_avx512(w, cols, x, t, out) },
    }
}

/// A dense row-major f32 matrix (rows × cols), shareable (a tied embedding is also the head).
#[derive(Debug, Clone, PartialEq)]
pub struct FloatMatrix {
    rows: usize,
    cols: usize,
    w: Arc<[f32]>,
}

impl FloatMatrix {
    pub fn new(w: Vec<f32>, rows: usize, cols: usize) -> Self {
        assert_eq!(w.len(), rows * cols, "matrix size");
        Self {
            rows,
            cols,
            w: w.into(),
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn data(&self) -> &[f32] {
        &self.w
    }

    /// Row `r`.
    pub fn row(&self, r: usize) -> &[f32] {
        &self.w[r * self.cols..(r + 1) * self.cols]
    }

    pub fn bytes(&self) -> usize {
        4 * self.w.len()
    }

    /// Stack the rows of matrices with the same column count.
    pub fn stack(parts: &[FloatMatrix]) -> Self {
        let cols = parts[0].cols;
        assert!(
            parts.iter().all(|p| p.cols == cols),
            "stacked matrices differ in columns"
        );
        let w: Vec<f32> = parts.iter().flat_map(|p| p.w.iter().copied()).collect();
        Self::new(w, parts.iter().map(|p| p.rows).sum(), cols)
    }

    /// y = W x for `t` rows of x (t × cols) into `out` (t × rows).
    pub fn forward(&self, x: &[f32], t: usize, out: &mut [f32]) {
        self.forward_isa(isa(), x, t, out)
    }

    fn forward_isa(&self, isa: Isa, x: &[f32], t: usize, out: &mut [f32]) {
        assert_eq!(x.len(), t * self.cols);
        assert_eq!(out.len(), t * self.rows);
        if t == 0 || self.rows == 0 {
            return;
        }
        // Row-major by row first (each task owns whole rows), transposed into `out` at the end.
        let mut by_row = vec![0f32; self.rows * t];
        let threads = rayon::current_num_threads();
        if self.rows * self.cols * t < PAR_MIN_WORK || threads == 1 {
            self.rows_into(isa, x, t, 0, &mut by_row);
        } else {
            let rows_per_task = self.rows.div_ceil(threads * 4).max(8);
            by_row
                .par_chunks_mut(rows_per_task * t)
                .enumerate()
                .for_each(|(i, chunk)| self.rows_into(isa, x, t, i * rows_per_task, chunk));
        }
        for (r, ys) in by_row.chunks_exact(t).enumerate() {
            for (n, y) in ys.iter().enumerate() {
                out[n * self.rows + r] = *y;
            }
        }
    }

    fn rows_into(&self, isa: Isa, x: &[f32], t: usize, first: usize, out: &mut [f32]) {
        let rows = out.len() / t;
        let w = &self.w[first * self.cols..(first + rows) * self.cols];
        rows_dispatch(isa, w, self.cols, x, t, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_and_is_independent_of_token_grouping() {
        for (rows, cols, t) in [(5, 3, 1), (70, 100, 6), (33, 257, 9), (300, 512, 5)] {
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
                .collect();
            let x: Vec<f32> = (0..t * cols).map(|i| (i as f32 * 0.31).sin()).collect();
            let m = FloatMatrix::new(w.clone(), rows, cols);
            for isa in available_isas() {
                let mut all = vec![0f32; t * rows];
                m.forward_isa(isa, &x, t, &mut all);
                for n in 0..t {
                    let mut one = vec![0f32; rows];
                    m.forward_isa(isa, &x[n * cols..(n + 1) * cols], 1, &mut one);
                    assert_eq!(
                        &all[n * rows..(n + 1) * rows],
                        &one[..],
                        "{isa:?} token {n}"
                    );
                    for r in 0..rows {
                        let naive: f64 = (0..cols)
                            .map(|c| w[r * cols + c] as f64 * x[n * cols + c] as f64)
                            .sum();
                        assert!(
                            (one[r] as f64 - naive).abs() < 1e-4,
                            "{isa:?}: {} vs {naive}",
                            one[r]
                        );
                    }
                }
            }
        }
    }
}
