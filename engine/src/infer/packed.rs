//! Packed ternary matrices and the integer kernels that multiply by them.
//!
//! BitNet b1.58 (Ma et al. 2024, arXiv 2402.17764) weights take three values {-1, 0, +1}·γ, so a trained
//! BitLinear is stored here quantized once (the same absmean quantisation as training,
//! [`crate::model::bit_linear::ternary_quantize`]) at 2 bits per weight, and multiplied without any float
//! multiply-accumulate: activations are quantized per token to int8 (absmax, as
//! [`crate::model::bit_linear::quantize_activations`]) and the dot product is an integer sum, scaled once by
//! `γ · s_x` at the end. This is the "I2_S" scheme of bitnet.cpp (Wang et al. 2024, "1-bit AI Infra",
//! arXiv 2410.16144): the 2-bit code of a weight is `w + 1 ∈ {0, 1, 2}`, so an unsigned×signed byte dot
//! product (`vpmaddubsw` on AVX2, `vpdpbusd` on AVX-512 VNNI) gives `Σ (w+1)·x`, and `Σ w·x = Σ (w+1)·x − Σ x`.
//!
//! Layout: each row is padded to a multiple of [`BLOCK`] = 256 weights; a block takes 64 bytes, and byte `j`
//! of a block holds the weights at block offsets `j`, `j+64`, `j+128`, `j+192` in its bits 7–6, 5–4, 3–2,
//! 1–0. Unpacking is then one shift and one mask per 64 weights (AVX-512: the mask alone, the power-of-4
//! factor divided out of the integer sum at the end), and the four code vectors line up with four
//! contiguous 64-byte (or, for AVX2, 2×32-byte) slices of the activations. 256 weights take 64 bytes: 1/16
//! of their f32 size.
//!
//! Kernels: portable scalar, AVX2, AVX-512 VNNI, picked at run time with `is_x86_feature_detected!`
//! (override with `BITLLAMA_KERNEL=scalar|avx2|avx512`). All compute the same exact integer dot products.
//! A decode step (one token) walks 4 rows at a time (independent accumulator chains, software prefetch two
//! tiles ahead — the kernel is memory-bound); a prompt walks 4 tokens at a time per row (codes unpacked once
//! for 4 tokens). Rows are split over the rayon pool when a product is big enough to pay for it.

use std::sync::OnceLock;

use rayon::prelude::*;

use crate::model::QuantEps;

/// Weights per packed block.
pub const BLOCK: usize = 256;
/// Bytes per packed block (2 bits per weight).
pub const BLOCK_BYTES: usize = BLOCK / 4;

/// Below this many weight×token products a matrix product runs on one thread.
const PAR_MIN_WORK: usize = 1 << 18;

/// An integer dot-product kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Portable Rust, any CPU.
    Scalar,
    /// x86-64 AVX2: `vpmaddubsw` + `vpmaddwd`, 32 codes per instruction.
    Avx2,
    /// x86-64 AVX-512 VNNI: `vpdpbusd`, 64 codes per instruction.
    Avx512Vnni,
}

impl Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512Vnni => "avx512vnni",
        }
    }

    /// Every kernel this CPU can run, the portable one first.
    pub fn available() -> Vec<Kernel> {
        [Kernel::Scalar, Kernel::Avx2, Kernel::Avx512Vnni]
            .into_iter()
            .filter(|k| k.runs_here())
            .collect()
    }

    /// Whether this CPU has the instructions the kernel needs (std caches the answer: cheap).
    fn runs_here(self) -> bool {
        match self {
            Kernel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The fastest kernel this CPU runs (or the one `BITLLAMA_KERNEL` names, if available). Cached.
    pub fn detect() -> Kernel {
        static DETECTED: OnceLock<Kernel> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            let available = Kernel::available();
            if let Ok(want) = std::env::var("BITLLAMA_KERNEL") {
                let want = want.trim().to_ascii_lowercase();
                if let Some(k) = available
                    .iter()
                    .find(|k| k.name() == want || (want == "avx512" && **k == Kernel::Avx512Vnni))
                {
                    return *k;
                }
                tracing::warn!(
                    "BITLLAMA_KERNEL={want} is not available on this CPU; using the best one"
                );
            }
            *available.last().expect("scalar is always available")
        })
    }

    /// Raw sums Σ_c code_rc · x_nc for every row of `codes` (rows × `row_bytes`) and every token of `q`
    /// (t × `row_bytes * 4`), into `out` (rows × t).
    fn rows(self, codes: &[u8], row_bytes: usize, q: &[i8], t: usize, out: &mut [i32]) {
        assert!(
            row_bytes > 0 && row_bytes.is_multiple_of(BLOCK_BYTES),
            "packed row length"
        );
        assert_eq!(q.len(), t * row_bytes * 4, "activation rows");
        assert_eq!(codes.len() / row_bytes * t, out.len(), "output size");
        assert_eq!(codes.len() % row_bytes, 0, "whole rows");
        // The variants are public: a caller may name one this CPU lacks. Refuse rather than run it.
        assert!(
            self.runs_here(),
            "the {} kernel needs instructions this CPU does not have (see Kernel::available)",
            self.name()
        );
        match self {
            Kernel::Scalar => rows_scalar(codes, row_bytes, q, t, out),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU reports AVX2 (checked above); sizes checked above.
            Kernel::Avx2 => unsafe { x86::rows_avx2(codes, row_bytes, q, t, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU reports AVX-512 F/BW/VNNI (checked above); sizes checked above.
            Kernel::Avx512Vnni => unsafe { x86::rows_avx512(codes, row_bytes, q, t, out) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => rows_scalar(codes, row_bytes, q, t, out),
        }
    }
}

/// The portable kernel: the definition every SIMD kernel must reproduce exactly.
fn rows_scalar(codes: &[u8], row_bytes: usize, q: &[i8], t: usize, out: &mut [i32]) {
    let stride = row_bytes * 4;
    for (row, o) in codes.chunks_exact(row_bytes).zip(out.chunks_exact_mut(t)) {
        for (n, x) in q.chunks_exact(stride).enumerate() {
            let mut acc = 0i32;
            for (block, x) in row.chunks_exact(BLOCK_BYTES).zip(x.chunks_exact(BLOCK)) {
                for (j, &byte) in block.iter().enumerate() {
                    acc += ((byte >> 6) & 3) as i32 * x[j] as i32
                        + ((byte >> 4) & 3) as i32 * x[j + 64] as i32
                        + ((byte >> 2) & 3) as i32 * x[j + 128] as i32
                        + (byte & 3) as i32 * x[j + 192] as i32;
                }
            }
            o[n] = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{BLOCK, BLOCK_BYTES};
    use std::arch::x86_64::*;

    /// Walk `out` (rows × t) in tiles: 4 tokens × 1 row while at least 4 tokens remain (the unpacked codes
    /// are reused for 4 tokens), then 1 token × 4 rows (4 independent accumulator chains for decoding).
    macro_rules! tiled_rows {
        ($tile:ident, $codes:ident, $row_bytes:ident, $q:ident, $t:ident, $out:ident) => {{
            let stride = $row_bytes * 4;
            let blocks = $row_bytes / BLOCK_BYTES;
            let rows = $out.len() / $t;
            let row = |r: usize| $codes.as_ptr().add(r * $row_bytes);
            // Software prefetch two 4-row tiles ahead in the (contiguous) code stream.
            let pf = 8 * $row_bytes;
            let tok = |n: usize| $q.as_ptr().add(n * stride);
            let mut n = 0;
            while n + 4 <= $t {
                for r in 0..rows {
                    let d = $tile::<1, 4>(
                        [row(r)],
                        [tok(n), tok(n + 1), tok(n + 2), tok(n + 3)],
                        blocks,
                        pf,
                    );
                    $out[r * $t + n..r * $t + n + 4].copy_from_slice(&d[0]);
                }
                n += 4;
            }
            while n < $t {
                let mut r = 0;
                while r + 4 <= rows {
                    let d = $tile::<4, 1>(
                        [row(r), row(r + 1), row(r + 2), row(r + 3)],
                        [tok(n)],
                        blocks,
                        pf,
                    );
                    for k in 0..4 {
                        $out[(r + k) * $t + n] = d[k][0];
                    }
                    r += 4;
                }
                while r < rows {
                    $out[r * $t + n] = $tile::<1, 1>([row(r)], [tok(n)], blocks, pf)[0][0];
                    r += 1;
                }
                n += 1;
            }
        }};
    }

    /// AVX-512 VNNI tile of R rows × N tokens. Per 64-byte block, the codes of shift s are isolated by a
    /// mask alone, `v & (3 << 2(3−s))` = 4^(3−s)·code, and go through `vpdpbusd` (u8×i8, 4 products summed
    /// into an i32 lane, |lane| ≤ 192·128·4 per block) against 64 contiguous activations; one accumulator
    /// per shift, divided exactly by 4^(3−s) at the end. No shifts in the inner loop.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile_avx512<const R: usize, const N: usize>(
        codes: [*const u8; R],
        xs: [*const i8; N],
        blocks: usize,
        pf: usize,
    ) -> [[i32; N]; R] {
        let masks = [
            _mm512_set1_epi8(0xC0u8 as i8),
            _mm512_set1_epi8(0x30),
            _mm512_set1_epi8(0x0C),
            _mm512_set1_epi8(0x03),
        ];
        let mut acc = [[[_mm512_setzero_si512(); 4]; N]; R];
        for b in 0..blocks {
            let mut v = [_mm512_setzero_si512(); R];
            for r in 0..R {
                let p = codes[r].add(b * BLOCK_BYTES);
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(pf) as *const i8);
                v[r] = _mm512_loadu_si512(p as *const __m512i);
            }
            for s in 0..4 {
                let mut x = [_mm512_setzero_si512(); N];
                for n in 0..N {
                    x[n] = _mm512_loadu_si512(xs[n].add(b * BLOCK + 64 * s) as *const __m512i);
                }
                for r in 0..R {
                    let c = _mm512_and_si512(v[r], masks[s]);
                    for n in 0..N {
                        acc[r][n][s] = _mm512_dpbusd_epi32(acc[r][n][s], c, x[n]);
                    }
                }
            }
        }
        let mut out = [[0i32; N]; R];
        for r in 0..R {
            for n in 0..N {
                let a = &acc[r][n];
                // 64·Σc0x + 16·Σc1x + 4·Σc2x + Σc3x, each sum exact, so the shifts are exact divisions.
                out[r][n] = (_mm512_reduce_add_epi32(a[0]) >> 6)
                    + (_mm512_reduce_add_epi32(a[1]) >> 4)
                    + (_mm512_reduce_add_epi32(a[2]) >> 2)
                    + _mm512_reduce_add_epi32(a[3]);
            }
        }
        out
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn rows_avx512(
        codes: &[u8],
        row_bytes: usize,
        q: &[i8],
        t: usize,
        out: &mut [i32],
    ) {
        tiled_rows!(tile_avx512, codes, row_bytes, q, t, out)
    }

    /// AVX2 tile: per 32 code bytes, shifted/masked code vectors × activation slices through `vpmaddubsw`
    /// (u8×i8 → i16 pairs; |sum| ≤ 8·2·2·128 = 4096 per block, no saturation), then `vpmaddwd` to i32.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn tile_avx2<const R: usize, const N: usize>(
        codes: [*const u8; R],
        xs: [*const i8; N],
        blocks: usize,
        pf: usize,
    ) -> [[i32; N]; R] {
        let mask = _mm256_set1_epi8(3);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_si256(); N]; R];
        for b in 0..blocks {
            for c in &codes {
                _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(b * BLOCK_BYTES + pf) as *const i8);
            }
            let mut p = [[_mm256_setzero_si256(); N]; R];
            for h in 0..2 {
                let mut v = [_mm256_setzero_si256(); R];
                for r in 0..R {
                    v[r] = _mm256_loadu_si256(
                        codes[r].add(b * BLOCK_BYTES + 32 * h) as *const __m256i
                    );
                }
                for s in 0..4 {
                    let mut x = [_mm256_setzero_si256(); N];
                    for n in 0..N {
                        x[n] = _mm256_loadu_si256(
                            xs[n].add(b * BLOCK + 64 * s + 32 * h) as *const __m256i
                        );
                    }
                    for r in 0..R {
                        let shifted = match s {
                            0 => _mm256_srli_epi16::<6>(v[r]),
                            1 => _mm256_srli_epi16::<4>(v[r]),
                            2 => _mm256_srli_epi16::<2>(v[r]),
                            _ => v[r],
                        };
                        let c = _mm256_and_si256(shifted, mask);
                        for n in 0..N {
                            p[r][n] = _mm256_add_epi16(p[r][n], _mm256_maddubs_epi16(c, x[n]));
                        }
                    }
                }
            }
            for r in 0..R {
                for n in 0..N {
                    acc[r][n] = _mm256_add_epi32(acc[r][n], _mm256_madd_epi16(p[r][n], ones));
                }
            }
        }
        let mut out = [[0i32; N]; R];
        for r in 0..R {
            for n in 0..N {
                let mut lanes = [0i32; 8];
                _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, acc[r][n]);
                out[r][n] = lanes.iter().sum();
            }
        }
        out
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn rows_avx2(
        codes: &[u8],
        row_bytes: usize,
        q: &[i8],
        t: usize,
        out: &mut [i32],
    ) {
        tiled_rows!(tile_avx2, codes, row_bytes, q, t, out)
    }
}

/// The int8 scale s = max|x| / 127 of one token's activations, max|x| guarded as the model's BitLinear
/// guards it (the same arithmetic as the training forward pass).
pub fn act_scale(row: &[f32], eps: QuantEps) -> f32 {
    let absmax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
    (eps.guard(absmax as f64) / 127.0) as f32
}

/// Fake quantisation in f32: every row of `cols` values replaced by its int8 level × s (what the training
/// forward pass multiplies by; the f32 path of a ternary model).
pub fn fake_quantize(x: &[f32], cols: usize, eps: QuantEps) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(cols.max(1)) {
        let s = act_scale(row, eps);
        out.extend(row.iter().map(|v| (v / s).round().clamp(-128.0, 127.0) * s));
    }
    out
}

/// Activations quantized per token to int8 (BitNet eq. 4–5): x̃ = Clip(round(x / s), −128, 127) with
/// s = (max|x| + ε) / 127, rows padded with zeros to the packed row length.
#[derive(Debug, Clone, Default)]
pub struct QuantizedActs {
    /// t × stride int8 values.
    pub q: Vec<i8>,
    /// Per token: the scale s.
    pub scale: Vec<f32>,
    /// Per token: Σ x̃ (to turn Σ (w+1)·x̃ into Σ w·x̃).
    pub sum: Vec<i32>,
    pub stride: usize,
}

impl QuantizedActs {
    /// Quantize `t` rows of `cols` floats (`x.len() == t * cols`), padding each to `stride`.
    pub fn quantize(x: &[f32], t: usize, cols: usize, stride: usize, eps: QuantEps) -> Self {
        assert_eq!(x.len(), t * cols);
        assert!(stride >= cols);
        let mut q = vec![0i8; t * stride];
        let mut scale = Vec::with_capacity(t);
        let mut sum = Vec::with_capacity(t);
        // The same arithmetic as the training forward pass (BitLinear's fused fake quantisation on CPU), so
        // the integer codes agree with the training model's.
        for (row, qrow) in x.chunks_exact(cols.max(1)).zip(q.chunks_exact_mut(stride)) {
            let s = act_scale(row, eps);
            let mut total = 0i32;
            for (o, v) in qrow.iter_mut().zip(row) {
                let level = (v / s).round().clamp(-128.0, 127.0) as i8;
                *o = level;
                total += level as i32;
            }
            scale.push(s);
            sum.push(total);
        }
        Self {
            q,
            scale,
            sum,
            stride,
        }
    }

    pub fn tokens(&self) -> usize {
        self.scale.len()
    }

    #[cfg(test)]
    fn row(&self, i: usize) -> &[i8] {
        &self.q[i * self.stride..(i + 1) * self.stride]
    }
}

/// A ternary matrix (rows × cols, y = W x) at 2 bits per weight, with one scale per row (γ of the matrix it
/// came from; rows of several matrices sharing an input may be stacked into one, e.g. Q, K, V).
#[derive(Debug, Clone, PartialEq)]
pub struct PackedTernary {
    rows: usize,
    cols: usize,
    /// Bytes per packed row: cols rounded up to a multiple of [`BLOCK`], / 4.
    row_bytes: usize,
    codes: Vec<u8>,
    row_scale: Vec<f32>,
    /// How the activations' scale is guarded (the model's `quant_eps`).
    eps: QuantEps,
}

/// Most columns a packed matrix may have: the AVX-512 kernel's i32 sums (64 × 2 × 127 per 4 columns)
/// stay exact below this.
pub const MAX_COLS: usize = 1 << 19;

/// Bytes per packed row of `cols` weights.
pub fn packed_row_bytes(cols: usize) -> usize {
    cols.div_ceil(BLOCK).max(1) * BLOCK_BYTES
}

impl PackedTernary {
    /// Pack a matrix of ternary values (-1, 0, +1 as floats, row-major rows × cols) with scale γ.
    pub fn from_ternary(values: &[f32], rows: usize, cols: usize, gamma: f32) -> Self {
        assert_eq!(values.len(), rows * cols, "ternary matrix size");
        assert!(
            cols < MAX_COLS,
            "{cols} columns: packed matrices hold fewer than {MAX_COLS}"
        );
        let row_bytes = packed_row_bytes(cols);
        // Code 1 (weight 0) everywhere, so padding contributes nothing even against non-zero activations.
        let mut codes = vec![0b0101_0101u8; rows * row_bytes];
        for (r, row) in values.chunks_exact(cols.max(1)).enumerate().take(rows) {
            let out = &mut codes[r * row_bytes..(r + 1) * row_bytes];
            for (c, &v) in row.iter().enumerate() {
                let code = (v.round().clamp(-1.0, 1.0) as i32 + 1) as u8;
                let (byte, shift) = Self::position(c);
                out[byte] = (out[byte] & !(3 << shift)) | (code << shift);
            }
        }
        Self {
            rows,
            cols,
            row_bytes,
            codes,
            row_scale: vec![gamma; rows],
            eps: QuantEps::Clamp,
        }
    }

    /// The same matrix, quantizing its activations with the guard `eps` (the model's `quant_eps`).
    pub fn with_eps(mut self, eps: QuantEps) -> Self {
        self.eps = eps;
        self
    }

    /// A packed matrix read back from its codes (as written by [`PackedTernary::codes`]); checks the size
    /// and that every code is 0, 1 or 2.
    pub fn from_codes(
        codes: Vec<u8>,
        rows: usize,
        cols: usize,
        gamma: f32,
    ) -> Result<Self, String> {
        if cols >= MAX_COLS {
            return Err(format!(
                "{cols} columns: packed matrices hold fewer than {MAX_COLS}"
            ));
        }
        let row_bytes = packed_row_bytes(cols);
        if codes.len() != rows * row_bytes {
            return Err(format!(
                "{} packed bytes for a {rows}×{cols} matrix (want {})",
                codes.len(),
                rows * row_bytes
            ));
        }
        if codes.iter().any(|b| {
            (0..4).any(|s| (b >> (2 * s)) & 3 == 3) // code 3 means nothing
        }) {
            return Err("invalid 2-bit code 3 in packed weights".into());
        }
        if !gamma.is_finite() {
            return Err(format!("scale {gamma} is not finite"));
        }
        Ok(Self {
            rows,
            cols,
            row_bytes,
            codes,
            row_scale: vec![gamma; rows],
            eps: QuantEps::Clamp,
        })
    }

    /// Quantize latent weights (out, in) exactly as the training forward pass does and pack them.
    pub fn from_weight(w: &candle_core::Tensor, eps: QuantEps) -> candle_core::Result<Self> {
        let (rows, cols) = w.dims2()?;
        let (q, gamma) = crate::model::bit_linear::ternary_quantize(w, eps)?;
        let values: Vec<f32> = q
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        Ok(Self::from_ternary(&values, rows, cols, gamma as f32).with_eps(eps))
    }

    /// (byte within the row, bit shift) of column `c`.
    fn position(c: usize) -> (usize, u32) {
        let (block, off) = (c / BLOCK, c % BLOCK);
        (block * BLOCK_BYTES + off % 64, 6 - 2 * (off / 64) as u32)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes per packed row.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// The packed codes, rows × row_bytes.
    pub fn codes(&self) -> &[u8] {
        &self.codes
    }

    /// Per-row scales γ.
    pub fn row_scales(&self) -> &[f32] {
        &self.row_scale
    }

    /// Bytes held in memory (codes + scales).
    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * self.row_scale.len()
    }

    /// The ternary values, rows × cols, as floats.
    pub fn ternary_values(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            let row = &self.codes[r * self.row_bytes..(r + 1) * self.row_bytes];
            for c in 0..self.cols {
                let (byte, shift) = Self::position(c);
                out.push(((row[byte] >> shift) & 3) as f32 - 1.0);
            }
        }
        out
    }

    /// γ·W̃ as a dense f32 matrix (what a float engine would hold).
    pub fn dequantized(&self) -> Vec<f32> {
        let mut v = self.ternary_values();
        for (row, s) in v.chunks_exact_mut(self.cols.max(1)).zip(&self.row_scale) {
            for x in row {
                *x *= s;
            }
        }
        v
    }

    /// Stack the rows of matrices with the same column count (e.g. Q, K, V sharing one input).
    pub fn stack(parts: &[PackedTernary]) -> Self {
        let cols = parts[0].cols;
        assert!(
            parts.iter().all(|p| p.cols == cols),
            "stacked matrices differ in columns"
        );
        assert!(
            parts.iter().all(|p| p.eps == parts[0].eps),
            "stacked matrices differ in their quantiser guard"
        );
        Self {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols,
            row_bytes: parts[0].row_bytes,
            codes: parts.iter().flat_map(|p| p.codes.iter().copied()).collect(),
            row_scale: parts
                .iter()
                .flat_map(|p| p.row_scale.iter().copied())
                .collect(),
            eps: parts[0].eps,
        }
    }

    /// Exact integer products Σ_c w_rc · x̃_tc, rows × tokens (row-major by row).
    pub fn matmul_i32(&self, kernel: Kernel, acts: &QuantizedActs) -> Vec<i32> {
        assert_eq!(
            acts.stride,
            self.row_bytes * 4,
            "activations padded for another matrix"
        );
        let t = acts.tokens();
        let mut out = vec![0i32; self.rows * t];
        if t == 0 || self.rows == 0 {
            return out;
        }
        let work = self.rows * self.row_bytes * 4 * t;
        let threads = rayon::current_num_threads();
        if work < PAR_MIN_WORK || threads == 1 {
            self.rows_i32(kernel, acts, 0, &mut out);
        } else {
            let rows_per_task = self.rows.div_ceil(threads * 2).max(8);
            out.par_chunks_mut(rows_per_task * t)
                .enumerate()
                .for_each(|(i, chunk)| self.rows_i32(kernel, acts, i * rows_per_task, chunk));
        }
        out
    }

    /// Rows `first..first + out.len()/t` into `out` (row-major by row).
    fn rows_i32(&self, kernel: Kernel, acts: &QuantizedActs, first: usize, out: &mut [i32]) {
        let t = acts.tokens();
        let rows = out.len() / t;
        let codes = &self.codes[first * self.row_bytes..(first + rows) * self.row_bytes];
        kernel.rows(codes, self.row_bytes, &acts.q, t, out);
        for o in out.chunks_exact_mut(t) {
            for (v, s) in o.iter_mut().zip(&acts.sum) {
                *v -= s;
            }
        }
    }

    /// y = W x for `t` rows of x (t × cols) into `out` (t × rows): int8 activations, integer dot products,
    /// one float scale per (token, row) at the end.
    pub fn forward(&self, x: &[f32], t: usize, out: &mut [f32]) {
        self.forward_with(Kernel::detect(), x, t, out)
    }

    /// [`PackedTernary::forward`] with a chosen kernel.
    pub fn forward_with(&self, kernel: Kernel, x: &[f32], t: usize, out: &mut [f32]) {
        assert_eq!(out.len(), t * self.rows);
        let acts = QuantizedActs::quantize(x, t, self.cols, self.row_bytes * 4, self.eps);
        let dots = self.matmul_i32(kernel, &acts);
        for (r, (d, g)) in dots.chunks_exact(t.max(1)).zip(&self.row_scale).enumerate() {
            for (n, v) in d.iter().enumerate() {
                out[n * self.rows + r] = *v as f32 * (acts.scale[n] * g);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::bit_linear::BitLinear;
    use crate::model::WeightKind;
    use candle_core::{DType, Device, Module};
    use candle_nn::VarMap;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random_acts(t: usize, cols: usize, seed: u64) -> QuantizedActs {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let x: Vec<f32> = (0..t * cols).map(|_| rng.gen_range(-3.0..3.0)).collect();
        QuantizedActs::quantize(&x, t, cols, packed_row_bytes(cols) * 4, QuantEps::Clamp)
    }

    fn random_ternary(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..rows * cols)
            .map(|_| rng.gen_range(-1i32..=1) as f32)
            .collect()
    }

    #[test]
    fn pack_unpack_roundtrip_and_size() {
        for (rows, cols) in [(3, 1), (5, 100), (4, 256), (2, 300), (7, 513)] {
            let v = random_ternary(rows, cols, (rows * cols) as u64);
            let p = PackedTernary::from_ternary(&v, rows, cols, 0.5);
            assert_eq!(p.ternary_values(), v);
            assert_eq!(p.codes().len(), rows * cols.div_ceil(BLOCK) * 64);
            let back = PackedTernary::from_codes(p.codes().to_vec(), rows, cols, 0.5).unwrap();
            assert_eq!(back, p);
        }
        assert!(PackedTernary::from_codes(vec![0xff; 64], 1, 10, 1.0).is_err());
        assert!(PackedTernary::from_codes(vec![0x55; 63], 1, 10, 1.0).is_err());
    }

    /// Every kernel gives exactly the integer dot products of the definition Σ w·x̃.
    #[test]
    fn simd_kernels_equal_scalar_exactly() {
        let kernels = Kernel::available();
        for (rows, cols, t) in [
            (9, 256, 1),
            (17, 100, 3),
            (33, 768, 5),
            (8, 1000, 4),
            (3, 7, 9),
        ] {
            let v = random_ternary(rows, cols, 11 + cols as u64);
            let p = PackedTernary::from_ternary(&v, rows, cols, 1.0);
            let acts = random_acts(t, cols, 5 + t as u64);
            // Direct definition.
            let mut want = vec![0i32; rows * t];
            for r in 0..rows {
                for n in 0..t {
                    want[r * t + n] = (0..cols)
                        .map(|c| v[r * cols + c] as i32 * acts.row(n)[c] as i32)
                        .sum();
                }
            }
            for k in &kernels {
                assert_eq!(
                    p.matmul_i32(*k, &acts),
                    want,
                    "{} {rows}x{cols} t={t}",
                    k.name()
                );
            }
        }
        // Extreme activations (−128 everywhere, all +1 weights) stay exact.
        let p = PackedTernary::from_ternary(&vec![1.0; 2 * 2048], 2, 2048, 1.0);
        let acts = QuantizedActs {
            q: vec![-128; 2048],
            scale: vec![1.0],
            sum: vec![-128 * 2048],
            stride: 2048,
        };
        for k in &kernels {
            assert_eq!(
                p.matmul_i32(*k, &acts),
                vec![-128 * 2048; 2],
                "{}",
                k.name()
            );
        }
        eprintln!("kernels tested: {:?}", kernels);
    }

    #[test]
    fn large_products_split_over_threads_give_the_same_result() {
        let (rows, cols, t) = (300, 1024, 3);
        let p = PackedTernary::from_ternary(&random_ternary(rows, cols, 3), rows, cols, 1.0);
        let acts = random_acts(t, cols, 4);
        assert!(rows * cols * t >= PAR_MIN_WORK);
        let mut serial = vec![0; rows * t];
        p.rows_i32(Kernel::Scalar, &acts, 0, &mut serial);
        for k in Kernel::available() {
            assert_eq!(p.matmul_i32(k, &acts), serial);
        }
    }

    /// The packed kernel reproduces BitLinear::forward (ternary weights, int8 activations).
    #[test]
    fn packed_forward_equals_bit_linear() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for (i, (out_dim, in_dim, t)) in [
            (16, 32, 1),
            (48, 100, 3),
            (64, 256, 2),
            (40, 300, 7),
            (24, 768, 4),
        ]
        .into_iter()
        .enumerate()
        {
            let varmap = VarMap::new();
            let vb = crate::model::init::seeded_var_builder(&varmap, 7, DType::F32, &dev);
            let lin = BitLinear::new(in_dim, out_dim, WeightKind::Ternary, 0.05, vb.pp("l"))?;
            let x =
                (crate::model::init::seeded_randn(112, 0.0, 1.0, (t, in_dim), DType::F32, &dev)?
                    * (1.0 + i as f64))?;
            let want: Vec<f32> = lin.forward(&x)?.flatten_all()?.to_vec1()?;
            let p = PackedTernary::from_weight(lin.weight(), lin.quant_eps())?;
            let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for k in Kernel::available() {
                let mut got = vec![0f32; t * out_dim];
                p.forward_with(k, &xs, t, &mut got);
                let diff = got
                    .iter()
                    .zip(&want)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    diff <= 1e-5 * scale,
                    "{} {out_dim}x{in_dim}: max diff {diff} (scale {scale})",
                    k.name()
                );
            }
            // The dequantized matrix is the training model's effective weight (up to the STE's rounding).
            let eff: Vec<f32> = lin.effective_weight()?.flatten_all()?.to_vec1()?;
            for (a, b) in p.dequantized().iter().zip(&eff) {
                assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3), "{a} vs {b}");
            }
        }
        Ok(())
    }

    #[test]
    fn stacked_rows_keep_their_own_scales() {
        let a = PackedTernary::from_ternary(&random_ternary(3, 40, 1), 3, 40, 0.5);
        let b = PackedTernary::from_ternary(&random_ternary(2, 40, 2), 2, 40, 2.0);
        let s = PackedTernary::stack(&[a.clone(), b.clone()]);
        let x: Vec<f32> = (0..80).map(|i| (i as f32 * 0.37).sin()).collect();
        let (mut ya, mut yb, mut ys) = (vec![0.0; 6], vec![0.0; 4], vec![0.0; 10]);
        a.forward(&x, 2, &mut ya);
        b.forward(&x, 2, &mut yb);
        s.forward(&x, 2, &mut ys);
        for n in 0..2 {
            assert_eq!(&ys[n * 5..n * 5 + 3], &ya[n * 3..n * 3 + 3]);
            assert_eq!(&ys[n * 5 + 3..n * 5 + 5], &yb[n * 2..n * 2 + 2]);
        }
    }
}
