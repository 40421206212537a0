//! The dual form's scan over the mini-batches of a chunk (TTT-Linear, Sun et al. 2024, Sec. 2.5), fused into
//! one CPU f32 op with its backward written by hand. Per head and mini-batch i (rows of b tokens):
//!
//! ```text
//! G_i   = ∇_Z ℓ(K_i W_i + b_i)                      inner gradient through the inner LN (eq. 4, Sec. 2.7)
//! Z_i   = Q_i W_i + b_i − S_i G_i                    dual form (Sec. 2.5), S_i = τ ⊙ tril(Q_i K_iᵀ + 1) ⊙ η_sᵀ
//! W_i+1 = W_i − K_iᵀ (η̄ ⊙ G_i),  b_i+1 = b_i − Σ_s η̄_s G_i,s     (eq. 6 summed, η̄ = τ_b η)
//! ```
//!
//! Composed from candle ops these are some fifteen graph nodes per mini-batch and three times as many in the
//! backward, each on a (B,H,b,d) slab; here every head runs its whole scan, forward or backward, as one task
//! of small GEMMs. The state-independent parts (S, the targets, the output LN) stay candle ops around it.
//!
//! Operands (B,H = batch, heads; T = N·b tokens; d = head dim):
//! - `tokens` (B,H,T,3d): the rows [q | k | t] with t = (v − k) − β, the inner loss's shifted target;
//! - `mixing` (B,H,T,b+1): the rows [S | η̄] — token t's dual-form scores against its mini-batch, and its
//!   weight in the state update;
//! - `state` (B,H,d+2,d): W_0 (d rows), b_0, γ (the inner LN's scale).
//!
//! Output (B,H,T+N(d+1),d): the rows Z (T), then W_i, b_i after each mini-batch i = 1…N.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::ttt_ops::{inner_grad_row, inner_grad_row_backward, RowScratch};
use crate::cpu_f32;

/// The scan of whole mini-batches of `mini_batch` tokens; `eps` is the inner LN's.
pub struct DualScan {
    pub mini_batch: usize,
    pub eps: f32,
}

const OP: &str = "ttt dual-form scan";

/// Sizes of one head's scan.
#[derive(Clone, Copy)]
struct Dims {
    /// Tokens, mini-batch size, mini-batches, head dim.
    t: usize,
    m: usize,
    n: usize,
    d: usize,
}

impl Dims {
    fn of(
        op: &DualScan,
        tokens: &[usize],
        mixing: &[usize],
        state: &[usize],
    ) -> Result<(usize, Self)> {
        let &[bsz, h, t, w] = tokens else {
            candle_core::bail!("{OP}: tokens must be (B,H,T,3d), got {tokens:?}")
        };
        let (m, d) = (op.mini_batch, w / 3);
        if w % 3 != 0 || m == 0 || t % m != 0 {
            candle_core::bail!("{OP}: tokens {tokens:?} for mini-batches of {m}");
        }
        if mixing != [bsz, h, t, m + 1] || state != [bsz, h, d + 2, d] {
            candle_core::bail!(
                "{OP}: tokens {tokens:?}, mixing {mixing:?}, state {state:?} do not match"
            );
        }
        Ok((bsz * h, Self { t, m, n: t / m, d }))
    }

    /// Elements per head of each operand and of the output.
    fn tokens(&self) -> usize {
        self.t * 3 * self.d
    }
    fn mixing(&self) -> usize {
        self.t * (self.m + 1)
    }
    fn state(&self) -> usize {
        (self.d + 2) * self.d
    }
    fn out(&self) -> usize {
        (self.t + self.n * (self.d + 1)) * self.d
    }
}

/// c (rows × cols, row stride `ldc`) = [c +] alpha · A B, with A (rows × inner) and B (inner × cols) read
/// through (row stride, column stride) pairs, so transposes are free.
#[allow(clippy::too_many_arguments)]
fn mm(
    c: &mut [f32],
    ldc: usize,
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
    (rows, cols, inner): (usize, usize, usize),
    accumulate: bool,
    alpha: f32,
) {
    let last = |rs: usize, cs: usize, r: usize, c: usize| (r - 1) * rs + (c - 1) * cs;
    assert!(rows > 0 && cols > 0 && inner > 0);
    assert!(last(ldc, 1, rows, cols) < c.len());
    assert!(last(a_rs, a_cs, rows, inner) < a.len());
    assert!(last(b_rs, b_cs, inner, cols) < b.len());
    // SAFETY: every element the product reads or writes lies inside its slice (asserted above), and `c`
    // does not alias `a` or `b` (a unique borrow).
    unsafe {
        gemm::gemm(
            rows,
            cols,
            inner,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Every row of `x` (rows × d, row stride d) set to `row`.
fn fill_rows(x: &mut [f32], row: &[f32]) {
    x.chunks_exact_mut(row.len())
        .for_each(|r| r.copy_from_slice(row));
}

/// Column sums of `x` (rows × d) added into `acc` with factor `alpha`.
fn add_col_sums(acc: &mut [f32], x: &[f32], alpha: f32) {
    for r in x.chunks_exact(acc.len()) {
        acc.iter_mut().zip(r).for_each(|(a, v)| *a += alpha * v);
    }
}

/// One head's buffers for a mini-batch.
struct Work {
    zk: Vec<f32>,
    g: Vec<f32>,
    e: Vec<f32>,
    scratch: RowScratch,
}

impl Work {
    fn new(dims: Dims) -> Self {
        let slab = || vec![0f32; dims.m * dims.d];
        Self {
            zk: slab(),
            g: slab(),
            e: slab(),
            scratch: RowScratch::new(dims.d),
        }
    }

    /// Z_k = K W + b, G = ∇_Z ℓ(Z_k) and E = η̄ ⊙ G for mini-batch rows `tok` (b × 3d) and `mix` (b × (b+1)).
    fn inner_gradient(
        &mut self,
        dims: Dims,
        eps: f32,
        (tok, mix): (&[f32], &[f32]),
        (w, b, gamma): (&[f32], &[f32], &[f32]),
    ) {
        let Dims { m, d, .. } = dims;
        fill_rows(&mut self.zk, b);
        mm(
            &mut self.zk,
            d,
            &tok[d..],
            (3 * d, 1),
            w,
            (d, 1),
            (m, d, d),
            true,
            1.0,
        );
        for s in 0..m {
            let row = s * d..(s + 1) * d;
            let target = &tok[s * 3 * d + 2 * d..][..d];
            inner_grad_row(
                &self.zk[row.clone()],
                target,
                gamma,
                eps,
                &mut self.scratch,
                &mut self.g[row.clone()],
            );
            let eta = mix[s * (m + 1) + m];
            self.e[row.clone()]
                .iter_mut()
                .zip(&self.g[row])
                .for_each(|(e, g)| *e = eta * g);
        }
    }
}

fn forward_head(
    dims: Dims,
    eps: f32,
    tokens: &[f32],
    mixing: &[f32],
    state: &[f32],
    out: &mut [f32],
) {
    let Dims { t, m, n, d } = dims;
    let (w0, rest) = state.split_at(d * d);
    let (b0, gamma) = rest.split_at(d);
    let (mut w, mut b) = (w0.to_vec(), b0.to_vec());
    let (z_out, states) = out.split_at_mut(t * d);
    let mut work = Work::new(dims);
    for i in 0..n {
        let tok = &tokens[i * m * 3 * d..(i + 1) * m * 3 * d];
        let mix = &mixing[i * m * (m + 1)..(i + 1) * m * (m + 1)];
        work.inner_gradient(dims, eps, (tok, mix), (&w, &b, gamma));
        // Z = Q W + b − S G
        let z = &mut z_out[i * m * d..(i + 1) * m * d];
        fill_rows(z, &b);
        mm(z, d, tok, (3 * d, 1), &w, (d, 1), (m, d, d), true, 1.0);
        mm(
            z,
            d,
            mix,
            (m + 1, 1),
            &work.g,
            (d, 1),
            (m, d, m),
            true,
            -1.0,
        );
        // W ← W − Kᵀ E, b ← b − Σ_s E_s
        mm(
            &mut w,
            d,
            &tok[d..],
            (1, 3 * d),
            &work.e,
            (d, 1),
            (d, d, m),
            true,
            -1.0,
        );
        add_col_sums(&mut b, &work.e, -1.0);
        let after = &mut states[i * (d + 1) * d..(i + 1) * (d + 1) * d];
        after[..d * d].copy_from_slice(&w);
        after[d * d..].copy_from_slice(&b);
    }
}

/// One head's backward: given ∂L/∂output (`up`), writes ∂L/∂tokens, ∂L/∂mixing, ∂L/∂state.
#[allow(clippy::too_many_arguments)]
fn backward_head<'a>(
    dims: Dims,
    eps: f32,
    (tokens, mixing, state, out): (&'a [f32], &'a [f32], &'a [f32], &'a [f32]),
    up: &'a [f32],
    d_tokens: &mut [f32],
    d_mixing: &mut [f32],
    d_state: &mut [f32],
) {
    let Dims { t, m, n, d } = dims;
    let (w0, rest) = state.split_at(d * d);
    let (b0, gamma) = rest.split_at(d);
    let (dw0, rest) = d_state.split_at_mut(d * d);
    let (db0, d_gamma) = rest.split_at_mut(d);
    // Where W, b after mini-batch i sit in the output (and in its gradient).
    let after = |i: usize| t * d + i * (d + 1) * d;
    let w_of = |x: &'a [f32], i: usize| &x[after(i)..after(i) + d * d];
    let b_of = |x: &'a [f32], i: usize| &x[after(i) + d * d..after(i) + (d + 1) * d];
    // ∂L/∂W, ∂L/∂b of the state after the last mini-batch; then, going back, of the state after i.
    let (mut dw, mut db) = (w_of(up, n - 1).to_vec(), b_of(up, n - 1).to_vec());
    let mut work = Work::new(dims);
    let (mut de, mut dg, mut dzk) = (vec![0f32; m * d], vec![0f32; m * d], vec![0f32; m * d]);
    for i in (0..n).rev() {
        let tok = &tokens[i * m * 3 * d..(i + 1) * m * 3 * d];
        let mix = &mixing[i * m * (m + 1)..(i + 1) * m * (m + 1)];
        let dtok = &mut d_tokens[i * m * 3 * d..(i + 1) * m * 3 * d];
        let dmix = &mut d_mixing[i * m * (m + 1)..(i + 1) * m * (m + 1)];
        let dz = &up[i * m * d..(i + 1) * m * d];
        // W_i, b_i at the start of mini-batch i: the input state, or the output after mini-batch i − 1.
        let (wi, bi) = match i {
            0 => (w0, b0),
            _ => (w_of(out, i - 1), b_of(out, i - 1)),
        };
        work.inner_gradient(dims, eps, (tok, mix), (wi, bi, gamma));
        // W_i+1 = W_i − Kᵀ E, b_i+1 = b_i − Σ E (dw, db hold ∂L/∂W_i+1, ∂L/∂b_i+1):
        // ∂E = −K ∂W_i+1 − 1 ∂b_i+1ᵀ,  ∂K = −E ∂W_i+1ᵀ.
        fill_rows(&mut de, &db);
        mm(
            &mut de,
            d,
            &tok[d..],
            (3 * d, 1),
            &dw,
            (d, 1),
            (m, d, d),
            true,
            1.0,
        );
        de.iter_mut().for_each(|v| *v = -*v);
        mm(
            &mut dtok[d..],
            3 * d,
            &work.e,
            (d, 1),
            &dw,
            (1, d),
            (m, d, d),
            false,
            -1.0,
        );
        // E = η̄ ⊙ G: ∂η̄_s = ∂E_s · G_s, ∂G = η̄ ⊙ ∂E.
        for s in 0..m {
            let row = s * d..(s + 1) * d;
            let eta = mix[s * (m + 1) + m];
            let (de_s, g_s) = (&de[row.clone()], &work.g[row.clone()]);
            dmix[s * (m + 1) + m] = de_s.iter().zip(g_s).map(|(a, b)| a * b).sum();
            dg[row.clone()]
                .iter_mut()
                .zip(de_s)
                .for_each(|(o, v)| *o = eta * v);
        }
        // Z = Q W_i + b_i − S G: ∂Q = ∂Z W_iᵀ, ∂S = −∂Z Gᵀ, ∂G −= Sᵀ ∂Z, ∂W_i += Qᵀ ∂Z, ∂b_i += Σ ∂Z.
        mm(dtok, 3 * d, dz, (d, 1), wi, (1, d), (m, d, d), false, 1.0);
        mm(
            dmix,
            m + 1,
            dz,
            (d, 1),
            &work.g,
            (1, d),
            (m, m, d),
            false,
            -1.0,
        );
        mm(
            &mut dg,
            d,
            mix,
            (1, m + 1),
            dz,
            (d, 1),
            (m, d, m),
            true,
            -1.0,
        );
        // (∂W_i+1 passes to W_i unchanged: dw, db now accumulate ∂L/∂W_i, ∂L/∂b_i.)
        mm(
            &mut dw,
            d,
            tok,
            (1, 3 * d),
            dz,
            (d, 1),
            (d, d, m),
            true,
            1.0,
        );
        add_col_sums(&mut db, dz, 1.0);
        // G = ∇ℓ(Z_k): ∂Z_k, ∂t and ∂γ row by row (the inner loss's second derivative).
        for s in 0..m {
            let row = s * d..(s + 1) * d;
            let target = &tok[s * 3 * d + 2 * d..][..d];
            let dt = &mut dtok[s * 3 * d + 2 * d..][..d];
            inner_grad_row_backward(
                &work.zk[row.clone()],
                target,
                gamma,
                &dg[row.clone()],
                eps,
                &mut work.scratch,
                &mut dzk[row],
                dt,
                d_gamma,
            );
        }
        // Z_k = K W_i + b_i: ∂K += ∂Z_k W_iᵀ, ∂W_i += Kᵀ ∂Z_k, ∂b_i += Σ ∂Z_k.
        mm(
            &mut dtok[d..],
            3 * d,
            &dzk,
            (d, 1),
            wi,
            (1, d),
            (m, d, d),
            true,
            1.0,
        );
        mm(
            &mut dw,
            d,
            &tok[d..],
            (1, 3 * d),
            &dzk,
            (d, 1),
            (d, d, m),
            true,
            1.0,
        );
        add_col_sums(&mut db, &dzk, 1.0);
        // W_i is also an output (the state after mini-batch i − 1).
        if i > 0 {
            dw.iter_mut()
                .zip(w_of(up, i - 1))
                .for_each(|(a, v)| *a += v);
            db.iter_mut()
                .zip(b_of(up, i - 1))
                .for_each(|(a, v)| *a += v);
        }
    }
    dw0.copy_from_slice(&dw);
    db0.copy_from_slice(&db);
}

impl CustomOp3 for DualScan {
    fn name(&self) -> &'static str {
        "ttt-dual-scan"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (heads, dims) = Dims::of(self, l1.dims(), l2.dims(), l3.dims())?;
        let tokens = cpu_f32::slice(s1, l1, OP)?;
        let mixing = cpu_f32::slice(s2, l2, OP)?;
        let state = cpu_f32::slice(s3, l3, OP)?;
        let mut out = vec![0f32; heads * dims.out()];
        out.par_chunks_mut(dims.out())
            .enumerate()
            .for_each(|(h, out)| {
                forward_head(
                    dims,
                    self.eps,
                    &tokens[h * dims.tokens()..][..dims.tokens()],
                    &mixing[h * dims.mixing()..][..dims.mixing()],
                    &state[h * dims.state()..][..dims.state()],
                    out,
                )
            });
        let l = l1.dims();
        let rows = dims.t + dims.n * (dims.d + 1);
        Ok((
            CpuStorage::F32(out),
            Shape::from((l[0], l[1], rows, dims.d)),
        ))
    }

    fn bwd(
        &self,
        tokens: &Tensor,
        mixing: &Tensor,
        state: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, dims) = Dims::of(self, tokens.dims(), mixing.dims(), state.dims())?;
        let grad = grad.contiguous()?;
        let views = [
            cpu_f32::view(tokens),
            cpu_f32::view(mixing),
            cpu_f32::view(state),
            cpu_f32::view(res),
            cpu_f32::view(&grad),
        ];
        let [tok, mix, st, out, up] = [0, 1, 2, 3, 4].map(|i| views[i].slice(OP));
        let (tok, mix, st, out, up) = (tok?, mix?, st?, out?, up?);
        let mut d_tokens = vec![0f32; tok.len()];
        let mut d_mixing = vec![0f32; mix.len()];
        let mut d_state = vec![0f32; st.len()];
        d_tokens
            .par_chunks_mut(dims.tokens())
            .zip(d_mixing.par_chunks_mut(dims.mixing()))
            .zip(d_state.par_chunks_mut(dims.state()))
            .enumerate()
            .for_each(|(h, ((dt, dm), ds))| {
                fn part(x: &[f32], h: usize, n: usize) -> &[f32] {
                    &x[h * n..(h + 1) * n]
                }
                backward_head(
                    dims,
                    self.eps,
                    (
                        part(tok, h, dims.tokens()),
                        part(mix, h, dims.mixing()),
                        part(st, h, dims.state()),
                        part(out, h, dims.out()),
                    ),
                    part(up, h, dims.out()),
                    dt,
                    dm,
                    ds,
                )
            });
        let dev = tokens.device();
        Ok((
            Some(Tensor::from_vec(d_tokens, tokens.shape(), dev)?),
            Some(Tensor::from_vec(d_mixing, mixing.shape(), dev)?),
            Some(Tensor::from_vec(d_state, state.shape(), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::init::seeded_randn;
    use crate::model::ttt_linear::max_rel_diff;
    use candle_core::{DType, Device, Var, D};

    /// The same scan composed from candle ops (any dtype), output laid out as the fused op's.
    fn composed(
        tokens: &Tensor,
        mixing: &Tensor,
        state: &Tensor,
        m: usize,
        eps: f64,
    ) -> Result<Tensor> {
        let (_, _, t, w) = tokens.dims4()?;
        let d = w / 3;
        let (mut wi, mut bi) = (state.narrow(2, 0, d)?, state.narrow(2, d, 1)?);
        let gamma = state.narrow(2, d + 1, 1)?;
        let (mut zs, mut states) = (Vec::new(), Vec::new());
        for i in 0..t / m {
            let rows = |x: &Tensor, c: usize, n: usize| x.narrow(2, i * m, m)?.narrow(3, c, n);
            let (q, k, target) = (
                rows(tokens, 0, d)?,
                rows(tokens, d, d)?,
                rows(tokens, 2 * d, d)?,
            );
            let (s, eta) = (rows(mixing, 0, m)?, rows(mixing, m, 1)?);
            let zk = k.matmul(&wi)?.broadcast_add(&bi)?;
            let mu = zk.mean_keepdim(D::Minus1)?;
            let c = zk.broadcast_sub(&mu)?;
            let inv = (c.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
            let x = c.broadcast_mul(&inv)?;
            let g = (x.broadcast_mul(&gamma)? - target)?.broadcast_mul(&gamma)?;
            let u = g.broadcast_sub(&g.mean_keepdim(D::Minus1)?)?;
            let u = (u - x.broadcast_mul(&(&g * &x)?.mean_keepdim(D::Minus1)?)?)?;
            let grad = u.broadcast_mul(&inv)?;
            zs.push((q.matmul(&wi)?.broadcast_add(&bi)? - s.matmul(&grad)?)?);
            let e = grad.broadcast_mul(&eta)?;
            wi = (wi - k.t()?.matmul(&e)?)?;
            bi = (bi - e.sum_keepdim(2)?)?;
            states.push(Tensor::cat(&[&wi, &bi], 2)?);
        }
        zs.extend(states);
        Tensor::cat(&zs, 2)
    }

    /// The fused op (f32) against the composed scan (f64): the output and the gradients to all three operands
    /// of a loss that weighs every output row, the intermediate states included.
    #[test]
    fn fused_scan_matches_the_composed_scan() -> Result<()> {
        let dev = Device::Cpu;
        let (bsz, h, m, n, d) = (2, 3, 4, 3, 8);
        let t = m * n;
        let draw = |seed, mean, shape: (usize, usize, usize, usize)| {
            seeded_randn(seed, mean, 0.5, shape, DType::F64, &dev)
        };
        let tokens = draw(1, 0.0, (bsz, h, t, 3 * d))?;
        let mixing = (draw(2, 0.0, (bsz, h, t, m + 1))? * 0.5)?;
        let state = Tensor::cat(
            &[
                &draw(3, 0.0, (bsz, h, d, d))?,
                &draw(4, 0.0, (bsz, h, 1, d))?,
                &draw(5, 1.0, (bsz, h, 1, d))?,
            ],
            2,
        )?;
        let up = draw(6, 0.0, (bsz, h, t + n * (d + 1), d))?;
        let mut got = Vec::new();
        for dtype in [DType::F32, DType::F64] {
            let vars = [&tokens, &mixing, &state].map(|x| {
                x.to_dtype(dtype)
                    .and_then(|x| Var::from_tensor(&x))
                    .expect("var")
            });
            let [a, b, c] = vars.each_ref().map(|v| v.as_tensor());
            let out = match dtype {
                DType::F32 => a.apply_op3(
                    b,
                    c,
                    DualScan {
                        mini_batch: m,
                        eps: 1e-6,
                    },
                )?,
                _ => composed(a, b, c, m, 1e-6)?,
            };
            let grads = (&out * up.to_dtype(dtype)?)?.sum_all()?.backward()?;
            let mut row = vec![out];
            row.extend([a, b, c].map(|x| grads.get(x).expect("gradient").clone()));
            got.push(row);
        }
        for (name, (a, b)) in ["output", "∂tokens", "∂mixing", "∂state"]
            .iter()
            .zip(got[0].iter().zip(&got[1]))
        {
            let r = max_rel_diff(a, b)?;
            assert!(r < 1e-5, "{name}: fused vs composed rel diff {r:e}");
        }
        Ok(())
    }

    #[test]
    fn mismatched_operands_are_refused() -> Result<()> {
        let dev = Device::Cpu;
        let tokens = Tensor::zeros((1, 2, 8, 12), DType::F32, &dev)?;
        let mixing = Tensor::zeros((1, 2, 8, 5), DType::F32, &dev)?;
        let state = Tensor::zeros((1, 2, 6, 4), DType::F32, &dev)?;
        let op = |m| DualScan {
            mini_batch: m,
            eps: 1e-6,
        };
        assert!(tokens.apply_op3(&mixing, &state, op(4)).is_ok());
        let err = tokens.apply_op3(&mixing, &state, op(3)).unwrap_err();
        assert!(err.to_string().contains("mini-batches of 3"), "{err}");
        let err = tokens
            .apply_op3(&mixing.narrow(3, 0, 4)?, &state, op(4))
            .unwrap_err();
        assert!(err.to_string().contains("do not match"), "{err}");
        Ok(())
    }
}
