//! Quantized token tables for the packed CPU path, where the embedding and the output head are most of a
//! small model's bytes once the block linears are ternary:
//! - [`Int8Matrix`], the output head: int8 with one f32 scale per row (absmax / 127), a quarter of its f32
//!   bytes; each int8 row is dotted with the f32 hidden state (rounding: at most half a step per weight).
//! - [`Int6Rows`], the input embedding: 6-bit codes in groups of 32 with an f16 scale per group
//!   (absmax / 31), 6.5 bits per weight; only the rows of the tokens fed are dequantized.

use rayon::prelude::*;

/// Below this many weight×token products a head product runs on one thread.
const PAR_MIN_WORK: usize = 1 << 16;

/// A rows × cols matrix of int8 with a scale per row.
pub struct Int8Matrix {
    rows: usize,
    cols: usize,
    q: Vec<i8>,
    scale: Vec<f32>,
}

impl Int8Matrix {
    /// Quantize a row-major f32 matrix, row by row.
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(w.len(), rows * cols, "matrix size");
        let mut q = Vec::with_capacity(rows * cols);
        let mut scale = Vec::with_capacity(rows);
        for row in w.chunks_exact(cols.max(1)).take(rows) {
            let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = if max > 0.0 { max / 127.0 } else { 1.0 };
            q.extend(
                row.iter()
                    .map(|v| (v / s).round().clamp(-127.0, 127.0) as i8),
            );
            scale.push(s);
        }
        Self {
            rows,
            cols,
            q,
            scale,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn bytes(&self) -> usize {
        self.q.len() + 4 * self.scale.len()
    }

    /// Row `r`, dequantized, appended to `out`.
    pub fn push_row(&self, r: usize, out: &mut Vec<f32>) {
        let s = self.scale[r];
        out.extend(
            self.q[r * self.cols..(r + 1) * self.cols]
                .iter()
                .map(|&v| v as f32 * s),
        );
    }

    /// y = W x for `t` rows of x (t × cols) into `out` (t × rows).
    pub fn forward(&self, x: &[f32], t: usize, out: &mut [f32]) {
        assert_eq!(x.len(), t * self.cols);
        assert_eq!(out.len(), t * self.rows);
        if t == 0 || self.rows == 0 {
            return;
        }
        let mut by_row = vec![0f32; self.rows * t];
        let threads = rayon::current_num_threads();
        if self.rows * self.cols * t < PAR_MIN_WORK || threads == 1 {
            self.rows_into(x, t, 0, &mut by_row);
        } else {
            let rows_per_task = self.rows.div_ceil(threads * 4).max(8);
            by_row
                .par_chunks_mut(rows_per_task * t)
                .enumerate()
                .for_each(|(i, chunk)| self.rows_into(x, t, i * rows_per_task, chunk));
        }
        for (r, ys) in by_row.chunks_exact(t).enumerate() {
            for (n, y) in ys.iter().enumerate() {
                out[n * self.rows + r] = *y;
            }
        }
    }

    fn rows_into(&self, x: &[f32], t: usize, first: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { self.rows_into_avx2(x, t, first, out) };
        }
        self.rows_into_portable(x, t, first, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows_into_avx2(&self, x: &[f32], t: usize, first: usize, out: &mut [f32]) {
        self.rows_into_portable(x, t, first, out)
    }

    #[inline(always)]
    fn rows_into_portable(&self, x: &[f32], t: usize, first: usize, out: &mut [f32]) {
        let cols = self.cols;
        for (i, ys) in out.chunks_exact_mut(t).enumerate() {
            let r = first + i;
            let w = &self.q[r * cols..(r + 1) * cols];
            for (n, y) in ys.iter_mut().enumerate() {
                *y = dot_i8(w, &x[n * cols..(n + 1) * cols]) * self.scale[r];
            }
        }
    }
}

/// Values per scale of [`Int6Rows`].
pub const INT6_GROUP: usize = 32;
/// Bytes of one group's codes (32 codes × 6 bits).
const INT6_GROUP_BYTES: usize = INT6_GROUP * 6 / 8;

/// A rows × cols table of 6-bit codes (code = q + 32, q in -31..=31; four codes in three bytes) with an f16
/// scale (absmax / 31) per group of [`INT6_GROUP`] values of a row: 6.5 bits per weight.
pub struct Int6Rows {
    rows: usize,
    cols: usize,
    codes: Vec<u8>,
    scale: Vec<half::f16>,
}

impl Int6Rows {
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(w.len(), rows * cols, "matrix size");
        let groups = cols.div_ceil(INT6_GROUP);
        let mut codes = Vec::with_capacity(rows * groups * INT6_GROUP_BYTES);
        let mut scale = Vec::with_capacity(rows * groups);
        for row in w.chunks_exact(cols.max(1)).take(rows) {
            for group in row.chunks(INT6_GROUP) {
                let max = group.iter().fold(0f32, |m, v| m.max(v.abs()));
                let s = half::f16::from_f32(if max > 0.0 { max / 31.0 } else { 1.0 });
                let inv = 1.0 / s.to_f32();
                scale.push(s);
                let mut q = [32u32; INT6_GROUP];
                for (c, v) in q.iter_mut().zip(group) {
                    *c = ((v * inv).round().clamp(-31.0, 31.0) as i32 + 32) as u32;
                }
                for four in q.chunks_exact(4) {
                    let bits = four[0] | four[1] << 6 | four[2] << 12 | four[3] << 18;
                    codes.extend_from_slice(&bits.to_le_bytes()[..3]);
                }
            }
        }
        Self {
            rows,
            cols,
            codes,
            scale,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn bytes(&self) -> usize {
        self.codes.len() + 2 * self.scale.len()
    }

    /// Row `r`, dequantized, appended to `out`.
    pub fn push_row(&self, r: usize, out: &mut Vec<f32>) {
        let groups = self.cols.div_ceil(INT6_GROUP);
        let first = r * groups;
        let mut left = self.cols;
        for g in first..first + groups {
            let s = self.scale[g].to_f32();
            let bytes = &self.codes[g * INT6_GROUP_BYTES..(g + 1) * INT6_GROUP_BYTES];
            for three in bytes.chunks_exact(3) {
                let bits = u32::from_le_bytes([three[0], three[1], three[2], 0]);
                for k in 0..4 {
                    if left == 0 {
                        return;
                    }
                    out.push((((bits >> (6 * k)) & 63) as i32 - 32) as f32 * s);
                    left -= 1;
                }
            }
        }
    }
}

/// Σ w·x with 16 interleaved partial sums (vectorised by the compiler), then the tail.
#[inline(always)]
fn dot_i8(w: &[i8], x: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let (cw, cx) = (w.chunks_exact(L), x.chunks_exact(L));
    let (rw, rx) = (cw.remainder(), cx.remainder());
    for (a, b) in cw.zip(cx) {
        for l in 0..L {
            acc[l] += a[l] as f32 * b[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (a, b) in rw.iter().zip(rx) {
        s += *a as f32 * b;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int6_rows_round_to_half_a_step_of_their_group() {
        let (rows, cols) = (5, 70);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01 * (1 + i % 3) as f32)
            .collect();
        let t = Int6Rows::quantize(&w, rows, cols);
        assert_eq!(t.bytes(), rows * 3 * (24 + 2));
        for r in 0..rows {
            let mut row = Vec::new();
            t.push_row(r, &mut row);
            assert_eq!(row.len(), cols);
            for (c, (a, b)) in row.iter().zip(&w[r * cols..(r + 1) * cols]).enumerate() {
                let step = t.scale[r * 3 + c / INT6_GROUP].to_f32();
                assert!(
                    (a - b).abs() <= step * 0.5 + 1e-5,
                    "row {r} col {c}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn int8_rows_and_products_follow_the_f32_matrix() {
        let (rows, cols, t) = (300, 70, 3);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01)
            .collect();
        let m = Int8Matrix::quantize(&w, rows, cols);
        assert_eq!(m.bytes(), rows * cols + 4 * rows);
        // Each dequantized weight is within half a step of the original.
        let mut row = Vec::new();
        m.push_row(7, &mut row);
        let step = m.scale[7];
        for (a, b) in row.iter().zip(&w[7 * cols..8 * cols]) {
            assert!((a - b).abs() <= step * 0.5 + 1e-6, "{a} vs {b}");
        }
        let x: Vec<f32> = (0..t * cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut y = vec![0f32; t * rows];
        m.forward(&x, t, &mut y);
        for n in 0..t {
            for r in 0..rows {
                let mut deq = Vec::new();
                m.push_row(r, &mut deq);
                let exact: f32 = deq.iter().zip(&x[n * cols..]).map(|(a, b)| a * b).sum();
                assert!(
                    (y[n * rows + r] - exact).abs() < 1e-4,
                    "{} vs {exact}",
                    y[n * rows + r]
                );
                let f: f32 = w[r * cols..(r + 1) * cols]
                    .iter()
                    .zip(&x[n * cols..])
                    .map(|(a, b)| a * b)
                    .sum();
                // |Σ (ŵ − w) x| ≤ Σ |ŵ − w| |x| ≤ cols · step/2 (|x| ≤ 1).
                assert!((y[n * rows + r] - f).abs() <= 0.5 * cols as f32 * m.scale[r] + 1e-5);
            }
        }
    }
}
