//! TTT-Linear's dual form over whole mini-batches (Sun et al. 2024, Sec. 2.5), fused into one CPU f32 op
//! with its backward written by hand. Per head and mini-batch i (b tokens; rows q, k, v of Q, K, V):
//!
//! ```text
//! G_i    = ∇_Z ℓ(K_i W_i + b_i),  ℓ = ½‖LN(Z) − (V_i − K_i)‖²        inner gradient (eq. 4, Sec. 2.7)
//! S_i    = τ ⊙ tril(Q_i K_iᵀ + 1) ⊙ η_sᵀ                            causal, token-index-scaled weights
//! Z_i    = Q_i W_i + b_i − S_i G_i                                  dual form (Sec. 2.5)
//! f(Q_i) = Q_i + LN(Z_i)                                            output of the inner model (eq. 5)
//! W_i+1  = W_i − τ_b K_iᵀ (η ⊙ G_i),  b_i+1 = b_i − τ_b Σ_s η_s G_i,s      (eq. 6 summed)
//! ```
//!
//! Composed from candle ops this is some twenty graph nodes per mini-batch and three times as many in the
//! backward, each on a (B,H,b,d) slab; here every head runs its whole scan, forward or backward, as one task
//! of small GEMMs; the forward records each mini-batch's state and intermediates for the backward.
//!
//! Operands (B,H = batch, heads; T = N·b tokens; d = head dim):
//! - `tokens` (B,H,T,3d): the rows [q | k | v];
//! - `mixing` (B,H,T,2): [η_t | τ_t] — the token's inner learning rate and its token-index scale;
//! - `state` (B,H,d+3,d): W_0 (d rows), b_0, then the inner LN's scale γ and shift β.
//!
//! [`DualScan::apply`] returns f(Q) (B,H,T,d) and the state after the chunk [W_N; b_N] (B,H,d+1,d): two ops
//! sharing one forward, each with its own backward, so training (which drops the state) pays for neither a
//! second scan nor the gradient of an output it never uses.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::ttt_ops::{inner_grad_row, inner_grad_row_backward, moments, RowScratch};
use crate::cpu_f32;

const OP: &str = "ttt dual-form scan";

/// Per head and mini-batch, the state after it and its intermediates ([`MiniBatch`]): what the forward
/// leaves for the backward.
type Record = Arc<Mutex<Option<Vec<f32>>>>;

/// Which of the scan's two results an op instance yields.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Output {
    /// f(Q), (B,H,T,d).
    Mixed,
    /// [W_N; b_N], (B,H,d+1,d).
    State,
}

/// The scan of whole mini-batches of `mini_batch` tokens; `eps` is the inner LN's.
pub struct DualScan {
    mini_batch: usize,
    eps: f32,
    output: Output,
    record: Record,
}

impl DualScan {
    /// f(Q) and the state after the chunk, both differentiable (see the module docs for the operands).
    pub fn apply(
        tokens: &Tensor,
        mixing: &Tensor,
        state: &Tensor,
        mini_batch: usize,
        eps: f32,
    ) -> Result<(Tensor, Tensor)> {
        let record: Record = Arc::default();
        let op = |output| DualScan {
            mini_batch,
            eps,
            output,
            record: record.clone(),
        };
        let mixed = tokens.apply_op3(mixing, state, op(Output::Mixed))?;
        let after = tokens.apply_op3(mixing, state, op(Output::State))?;
        Ok((mixed, after))
    }

    fn record(&self) -> Result<MutexGuard<'_, Option<Vec<f32>>>> {
        self.record
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{OP}: a scan panicked")))
    }

    /// f(Q) and the record of every head.
    fn forward_all(&self, dims: Dims, ops: (&[f32], &[f32], &[f32])) -> (Vec<f32>, Vec<f32>) {
        let heads = ops.2.len() / dims.state();
        let mut mixed = vec![0f32; heads * dims.mixed()];
        let mut record = vec![0f32; heads * dims.record()];
        mixed
            .par_chunks_mut(dims.mixed())
            .zip(record.par_chunks_mut(dims.record()))
            .enumerate()
            .for_each(|(h, (mixed, record))| {
                let (tok, mix, st) = dims.head(h, ops);
                forward_head(dims, self.eps, (tok, mix, st), mixed, record)
            });
        (mixed, record)
    }
}

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
    fn of(mini_batch: usize, tokens: &[usize], mixing: &[usize], state: &[usize]) -> Result<Self> {
        let &[bsz, h, t, w] = tokens else {
            candle_core::bail!("{OP}: tokens must be (B,H,T,3d), got {tokens:?}")
        };
        let (m, d) = (mini_batch, w / 3);
        if w % 3 != 0 || m == 0 || t == 0 || t % m != 0 {
            candle_core::bail!("{OP}: tokens {tokens:?} for mini-batches of {m}");
        }
        if mixing != [bsz, h, t, 2] || state != [bsz, h, d + 3, d] {
            candle_core::bail!(
                "{OP}: tokens {tokens:?}, mixing {mixing:?}, state {state:?} do not match"
            );
        }
        Ok(Self { t, m, n: t / m, d })
    }

    /// Elements per head of each operand, of the two outputs and of the record.
    fn tokens(&self) -> usize {
        self.t * 3 * self.d
    }
    fn mixing(&self) -> usize {
        self.t * 2
    }
    fn state(&self) -> usize {
        (self.d + 3) * self.d
    }
    fn mixed(&self) -> usize {
        self.t * self.d
    }
    fn after(&self) -> usize {
        (self.d + 1) * self.d
    }
    /// One mini-batch's share of the record: the state after it, then its intermediates.
    fn slot(&self) -> usize {
        self.after() + 5 * self.m * self.d + 2 * self.m * self.m
    }
    fn record(&self) -> usize {
        self.n * self.slot()
    }

    /// Head h's part of the three operands.
    fn head<'a>(
        &self,
        h: usize,
        (tok, mix, st): (&'a [f32], &'a [f32], &'a [f32]),
    ) -> Operands<'a> {
        (
            &tok[h * self.tokens()..(h + 1) * self.tokens()],
            &mix[h * self.mixing()..(h + 1) * self.mixing()],
            &st[h * self.state()..(h + 1) * self.state()],
        )
    }
}

type Operands<'a> = (&'a [f32], &'a [f32], &'a [f32]);

/// W (d×d), b, γ, β of a head's state operand.
fn split_state(state: &[f32], d: usize) -> (&[f32], &[f32], &[f32], &[f32]) {
    let (w, rest) = state.split_at(d * d);
    let (b, rest) = rest.split_at(d);
    let (gamma, beta) = rest.split_at(d);
    (w, b, gamma, beta)
}

/// c (rows × cols, row stride `ldc`) += alpha · A B, with A (rows × inner) and B (inner × cols) read
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
            true,
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

/// Every row of `x` (rows × d) set to `row`.
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

/// One mini-batch's intermediate values (b × d slabs, b × b scores).
struct MiniBatch {
    /// The inner loss's target less the LN shift, v − k − β.
    target: Vec<f32>,
    zk: Vec<f32>,
    /// G = ∇_Z ℓ and E = τ_b η ⊙ G.
    g: Vec<f32>,
    e: Vec<f32>,
    /// Q Kᵀ and S.
    qk: Vec<f32>,
    s: Vec<f32>,
    z: Vec<f32>,
    scratch: RowScratch,
}

impl MiniBatch {
    fn new(Dims { m, d, .. }: Dims) -> Self {
        let slab = || vec![0f32; m * d];
        Self {
            target: slab(),
            zk: slab(),
            g: slab(),
            e: slab(),
            qk: vec![0f32; m * m],
            s: vec![0f32; m * m],
            z: slab(),
            scratch: RowScratch::new(d),
        }
    }

    /// Everything of mini-batch rows `tok` (b × 3d), `mix` (b × 2) at the state (w, b) up to f(Q).
    fn run(
        &mut self,
        dims: Dims,
        eps: f32,
        (tok, mix): (&[f32], &[f32]),
        state: (&[f32], &[f32], &[f32], &[f32]),
    ) {
        let Dims { m, d, .. } = dims;
        let (w, b, gamma, beta) = state;
        for (s, row) in tok.chunks_exact(3 * d).enumerate() {
            let target = &mut self.target[s * d..(s + 1) * d];
            for j in 0..d {
                target[j] = row[2 * d + j] - row[d + j] - beta[j];
            }
        }
        // Z_k = K W + b; G = ∇_Z ℓ(Z_k); E = τ_b η ⊙ G.
        fill_rows(&mut self.zk, b);
        mm(
            &mut self.zk,
            d,
            &tok[d..],
            (3 * d, 1),
            w,
            (d, 1),
            (m, d, d),
            1.0,
        );
        let tau_b = mix[2 * (m - 1) + 1];
        for s in 0..m {
            let row = s * d..(s + 1) * d;
            let (zk, target) = (&self.zk[row.clone()], &self.target[row.clone()]);
            inner_grad_row(
                zk,
                target,
                gamma,
                eps,
                &mut self.scratch,
                &mut self.g[row.clone()],
            );
            let eta = tau_b * mix[2 * s];
            let (e, g) = (&mut self.e[row.clone()], &self.g[row]);
            e.iter_mut().zip(g).for_each(|(e, g)| *e = eta * g);
        }
        // S_ts = τ_t (q_t·k_s + 1) η_s for s ≤ t.
        self.qk.fill(0.0);
        mm(
            &mut self.qk,
            m,
            tok,
            (3 * d, 1),
            &tok[d..],
            (1, 3 * d),
            (m, m, d),
            1.0,
        );
        for t in 0..m {
            for s in 0..m {
                self.s[t * m + s] = match s <= t {
                    true => mix[2 * t + 1] * (self.qk[t * m + s] + 1.0) * mix[2 * s],
                    false => 0.0,
                };
            }
        }
        // Z = Q W + b − S G
        fill_rows(&mut self.z, b);
        mm(&mut self.z, d, tok, (3 * d, 1), w, (d, 1), (m, d, d), 1.0);
        mm(
            &mut self.z,
            d,
            &self.s,
            (m, 1),
            &self.g,
            (d, 1),
            (m, d, m),
            -1.0,
        );
    }

    /// The intermediates, in order, for [`Self::load`] (`Dims::slot` less the state).
    fn buffers(&mut self) -> [&mut Vec<f32>; 7] {
        [
            &mut self.target,
            &mut self.zk,
            &mut self.g,
            &mut self.e,
            &mut self.qk,
            &mut self.s,
            &mut self.z,
        ]
    }

    fn save(&mut self, to: &mut [f32]) {
        let mut at = 0;
        for b in self.buffers() {
            to[at..at + b.len()].copy_from_slice(b);
            at += b.len();
        }
    }

    fn load(&mut self, from: &[f32]) {
        let mut at = 0;
        for b in self.buffers() {
            let n = b.len();
            b.copy_from_slice(&from[at..at + n]);
            at += n;
        }
    }

    /// W ← W − Kᵀ E, b ← b − Σ_s E_s.
    fn update(&self, Dims { m, d, .. }: Dims, tok: &[f32], w: &mut [f32], b: &mut [f32]) {
        mm(
            w,
            d,
            &tok[d..],
            (1, 3 * d),
            &self.e,
            (d, 1),
            (d, d, m),
            -1.0,
        );
        add_col_sums(b, &self.e, -1.0);
    }
}

fn forward_head(
    dims: Dims,
    eps: f32,
    (tokens, mixing, state): Operands,
    mixed: &mut [f32],
    record: &mut [f32],
) {
    let Dims { m, n, d, .. } = dims;
    let (w0, b0, gamma, beta) = split_state(state, d);
    let (mut w, mut b) = (w0.to_vec(), b0.to_vec());
    let mut mb = MiniBatch::new(dims);
    for i in 0..n {
        let tok = &tokens[i * m * 3 * d..(i + 1) * m * 3 * d];
        let mix = &mixing[i * m * 2..(i + 1) * m * 2];
        mb.run(dims, eps, (tok, mix), (&w, &b, gamma, beta));
        // f(q) = q + LN(z)
        let out = &mut mixed[i * m * d..(i + 1) * m * d];
        for s in 0..m {
            let (z, q, y) = (
                &mb.z[s * d..(s + 1) * d],
                &tok[s * 3 * d..s * 3 * d + d],
                &mut out[s * d..(s + 1) * d],
            );
            let (mu, r) = moments(z, eps);
            for j in 0..d {
                y[j] = q[j] + gamma[j] * (z[j] - mu) * r + beta[j];
            }
        }
        mb.update(dims, tok, &mut w, &mut b);
        let slot = &mut record[i * dims.slot()..(i + 1) * dims.slot()];
        let (after, saved) = slot.split_at_mut(dims.after());
        after[..d * d].copy_from_slice(&w);
        after[d * d..].copy_from_slice(&b);
        mb.save(saved);
    }
}

/// One head's backward: given ∂L/∂f(Q) (`up_mixed`) or ∂L/∂[W_N; b_N] (`up_state`), writes ∂L/∂tokens,
/// ∂L/∂mixing, ∂L/∂state (all zero on entry).
#[allow(clippy::too_many_arguments)]
fn backward_head(
    dims: Dims,
    eps: f32,
    (tokens, mixing, state): Operands,
    record: &[f32],
    (up_mixed, up_state): (Option<&[f32]>, Option<&[f32]>),
    d_tokens: &mut [f32],
    d_mixing: &mut [f32],
    d_state: &mut [f32],
) {
    let Dims { m, n, d, .. } = dims;
    let (w0, _, gamma, _) = split_state(state, d);
    let (dw0, rest) = d_state.split_at_mut(d * d);
    let (db0, rest) = rest.split_at_mut(d);
    let (d_gamma, d_beta) = rest.split_at_mut(d);
    // ∂L/∂W, ∂L/∂b of the state after the last mini-batch; then, going back, after each earlier one.
    let (mut dw, mut db) = match up_state {
        Some(up) => (up[..d * d].to_vec(), up[d * d..].to_vec()),
        None => (vec![0f32; d * d], vec![0f32; d]),
    };
    let mut mb = MiniBatch::new(dims);
    let slab = || vec![0f32; m * d];
    let (mut de, mut dg, mut dzk, mut dz, mut dt) = (slab(), slab(), slab(), slab(), slab());
    let (mut ds, mut p) = (vec![0f32; m * m], vec![0f32; m * m]);
    for i in (0..n).rev() {
        let tok = &tokens[i * m * 3 * d..(i + 1) * m * 3 * d];
        let mix = &mixing[i * m * 2..(i + 1) * m * 2];
        let dtok = &mut d_tokens[i * m * 3 * d..(i + 1) * m * 3 * d];
        let dmix = &mut d_mixing[i * m * 2..(i + 1) * m * 2];
        // W_i, b_i at the start of mini-batch i: the input state, or the one recorded after i − 1.
        let wi = match i {
            0 => w0,
            _ => &record[(i - 1) * dims.slot()..][..d * d],
        };
        mb.load(&record[i * dims.slot()..(i + 1) * dims.slot()][dims.after()..]);
        let (q, k) = (tok, &tok[d..]);
        // W_i+1 = W_i − Kᵀ E, b_i+1 = b_i − Σ E, with dw, db = ∂L/∂W_i+1, ∂L/∂b_i+1:
        // ∂E = −K ∂W_i+1 − 1 ∂b_i+1ᵀ,  ∂K = −E ∂W_i+1ᵀ.
        fill_rows(&mut de, &db);
        mm(&mut de, d, k, (3 * d, 1), &dw, (d, 1), (m, d, d), 1.0);
        de.iter_mut().for_each(|v| *v = -*v);
        mm(
            &mut dtok[d..],
            3 * d,
            &mb.e,
            (d, 1),
            &dw,
            (1, d),
            (m, d, d),
            -1.0,
        );
        // E = τ_b η ⊙ G: ∂η_s += τ_b ∂E_s·G_s, ∂τ_b += Σ_s η_s ∂E_s·G_s, ∂G = τ_b η ⊙ ∂E.
        let tau_b = mix[2 * (m - 1) + 1];
        let mut d_tau_b = 0f32;
        for s in 0..m {
            let row = s * d..(s + 1) * d;
            let (de_s, g_s) = (&de[row.clone()], &mb.g[row.clone()]);
            let d_eta_bar: f32 = de_s.iter().zip(g_s).map(|(a, b)| a * b).sum();
            dmix[2 * s] += tau_b * d_eta_bar;
            d_tau_b += mix[2 * s] * d_eta_bar;
            let eta = tau_b * mix[2 * s];
            dg[row].iter_mut().zip(de_s).for_each(|(o, v)| *o = eta * v);
        }
        dmix[2 * (m - 1) + 1] += d_tau_b;
        if let Some(up) = up_mixed {
            let dy = &up[i * m * d..(i + 1) * m * d];
            // f(q) = q + γ x̂(z) + β: ∂q += ∂y, ∂γ += ∂y ⊙ x̂, ∂β += ∂y, ∂z = (u − mean u − x̂ mean(u ⊙ x̂)) / σ
            // with u = γ ⊙ ∂y.
            for s in 0..m {
                let row = s * d..(s + 1) * d;
                let (z, dy) = (&mb.z[row.clone()], &dy[row.clone()]);
                let (mu, r) = moments(z, eps);
                let (mut um, mut uxm) = (0f32, 0f32);
                for j in 0..d {
                    let x = (z[j] - mu) * r;
                    let u = gamma[j] * dy[j];
                    um += u;
                    uxm += u * x;
                    d_gamma[j] += dy[j] * x;
                    d_beta[j] += dy[j];
                    dtok[s * 3 * d + j] += dy[j];
                }
                let (um, uxm) = (um / d as f32, uxm / d as f32);
                let dz = &mut dz[row];
                for j in 0..d {
                    let x = (z[j] - mu) * r;
                    dz[j] = (gamma[j] * dy[j] - um - x * uxm) * r;
                }
            }
            // Z = Q W_i + b_i − S G: ∂Q += ∂Z W_iᵀ, ∂S = −∂Z Gᵀ, ∂G −= Sᵀ ∂Z, ∂W_i += Qᵀ ∂Z, ∂b_i += Σ ∂Z.
            // (dw, db pass ∂L/∂W_i+1 on to W_i unchanged: from here on they accumulate ∂L/∂W_i, ∂L/∂b_i.)
            mm(dtok, 3 * d, &dz, (d, 1), wi, (1, d), (m, d, d), 1.0);
            ds.fill(0.0);
            mm(&mut ds, m, &dz, (d, 1), &mb.g, (1, d), (m, m, d), -1.0);
            mm(&mut dg, d, &mb.s, (1, m), &dz, (d, 1), (m, d, m), -1.0);
            mm(&mut dw, d, q, (1, 3 * d), &dz, (d, 1), (d, d, m), 1.0);
            add_col_sums(&mut db, &dz, 1.0);
            // S_ts = τ_t (q_t·k_s + 1) η_s (s ≤ t): with P_ts = ∂S_ts τ_t η_s, ∂Q += P K, ∂K += Pᵀ Q,
            // ∂η_s += Σ_t ∂S_ts τ_t (q_t·k_s + 1), ∂τ_t += Σ_s ∂S_ts (q_t·k_s + 1) η_s.
            for t in 0..m {
                let tau = mix[2 * t + 1];
                let mut d_tau = 0f32;
                for s in 0..m {
                    let a = t * m + s;
                    p[a] = 0.0;
                    if s <= t {
                        let (g, qk1, eta) = (ds[a], mb.qk[a] + 1.0, mix[2 * s]);
                        p[a] = g * tau * eta;
                        dmix[2 * s] += g * tau * qk1;
                        d_tau += g * qk1 * eta;
                    }
                }
                dmix[2 * t + 1] += d_tau;
            }
            mm(dtok, 3 * d, &p, (m, 1), k, (3 * d, 1), (m, d, m), 1.0);
            mm(
                &mut dtok[d..],
                3 * d,
                &p,
                (1, m),
                q,
                (3 * d, 1),
                (m, d, m),
                1.0,
            );
        }
        // G = ∇ℓ(Z_k; v − k − β, γ), row by row (the inner loss's second derivative): ∂Z_k, ∂target, ∂γ;
        // then ∂v += ∂target, ∂k −= ∂target, ∂β −= Σ ∂target.
        for s in 0..m {
            let row = s * d..(s + 1) * d;
            let (zk, target, up) = (
                &mb.zk[row.clone()],
                &mb.target[row.clone()],
                &dg[row.clone()],
            );
            let (dzk, dt) = (&mut dzk[row.clone()], &mut dt[row]);
            inner_grad_row_backward(
                zk,
                target,
                gamma,
                up,
                eps,
                &mut mb.scratch,
                dzk,
                dt,
                d_gamma,
            );
            let dtok = &mut dtok[s * 3 * d..(s + 1) * 3 * d];
            for j in 0..d {
                dtok[2 * d + j] += dt[j];
                dtok[d + j] -= dt[j];
                d_beta[j] -= dt[j];
            }
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
            1.0,
        );
        mm(&mut dw, d, k, (1, 3 * d), &dzk, (d, 1), (d, d, m), 1.0);
        add_col_sums(&mut db, &dzk, 1.0);
    }
    dw0.copy_from_slice(&dw);
    db0.copy_from_slice(&db);
}

impl CustomOp3 for DualScan {
    fn name(&self) -> &'static str {
        match self.output {
            Output::Mixed => "ttt-dual-scan",
            Output::State => "ttt-dual-scan-state",
        }
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
        let dims = Dims::of(self.mini_batch, l1.dims(), l2.dims(), l3.dims())?;
        let ops = (
            cpu_f32::slice(s1, l1, OP)?,
            cpu_f32::slice(s2, l2, OP)?,
            cpu_f32::slice(s3, l3, OP)?,
        );
        let (bsz, h) = (l1.dims()[0], l1.dims()[1]);
        let mut record = self.record()?;
        match self.output {
            Output::Mixed => {
                let (mixed, rec) = self.forward_all(dims, ops);
                *record = Some(rec);
                Ok((
                    CpuStorage::F32(mixed),
                    Shape::from((bsz, h, dims.t, dims.d)),
                ))
            }
            Output::State => {
                // The Mixed op of the same scan has run first (see `apply`); on its own this one runs it.
                let rec = match &mut *record {
                    Some(rec) => rec,
                    empty => empty.insert(self.forward_all(dims, ops).1),
                };
                let last = (dims.n - 1) * dims.slot();
                let after: Vec<f32> = rec
                    .chunks_exact(dims.record())
                    .flat_map(|r| r[last..last + dims.after()].iter().copied())
                    .collect();
                Ok((
                    CpuStorage::F32(after),
                    Shape::from((bsz, h, dims.d + 1, dims.d)),
                ))
            }
        }
    }

    fn bwd(
        &self,
        tokens: &Tensor,
        mixing: &Tensor,
        state: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = Dims::of(self.mini_batch, tokens.dims(), mixing.dims(), state.dims())?;
        let grad = grad.contiguous()?;
        let views = [tokens, mixing, state, &grad].map(cpu_f32::view);
        let [tok, mix, st, up] = [0, 1, 2, 3].map(|i| views[i].slice(OP));
        let (ops, up) = ((tok?, mix?, st?), up?);
        let record = self.record()?;
        let Some(record) = record.as_ref() else {
            candle_core::bail!("{OP}: backward without a forward")
        };
        let mut d_tokens = vec![0f32; ops.0.len()];
        let mut d_mixing = vec![0f32; ops.1.len()];
        let mut d_state = vec![0f32; ops.2.len()];
        d_tokens
            .par_chunks_mut(dims.tokens())
            .zip(d_mixing.par_chunks_mut(dims.mixing()))
            .zip(d_state.par_chunks_mut(dims.state()))
            .enumerate()
            .for_each(|(h, ((dt, dm), ds))| {
                let rec = &record[h * dims.record()..(h + 1) * dims.record()];
                let up = match self.output {
                    Output::Mixed => (Some(&up[h * dims.mixed()..(h + 1) * dims.mixed()]), None),
                    Output::State => (None, Some(&up[h * dims.after()..(h + 1) * dims.after()])),
                };
                backward_head(dims, self.eps, dims.head(h, ops), rec, up, dt, dm, ds)
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

    /// x̂ = (x − μ)/σ over the last dim and 1/σ, composed.
    fn normalize(x: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
        let c = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let inv = (c.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        Ok((c.broadcast_mul(&inv)?, inv))
    }

    /// The same scan composed from candle ops (any dtype): f(Q) and [W_N; b_N].
    fn composed(
        tokens: &Tensor,
        mixing: &Tensor,
        state: &Tensor,
        m: usize,
        eps: f64,
    ) -> Result<(Tensor, Tensor)> {
        let (_, _, t, w) = tokens.dims4()?;
        let d = w / 3;
        let (mut wi, mut bi) = (state.narrow(2, 0, d)?, state.narrow(2, d, 1)?);
        let (gamma, beta) = (state.narrow(2, d + 1, 1)?, state.narrow(2, d + 2, 1)?);
        let mask = Tensor::tril2(m, tokens.dtype(), tokens.device())?;
        let mut ys = Vec::new();
        for i in 0..t / m {
            let rows = |x: &Tensor, c: usize, n: usize| x.narrow(2, i * m, m)?.narrow(3, c, n);
            let (q, k, v) = (
                rows(tokens, 0, d)?,
                rows(tokens, d, d)?,
                rows(tokens, 2 * d, d)?,
            );
            let (eta, tau) = (rows(mixing, 0, 1)?, rows(mixing, 1, 1)?);
            let target = (v - &k)?.broadcast_sub(&beta)?;
            let (x, inv) = normalize(&k.matmul(&wi)?.broadcast_add(&bi)?, eps)?;
            let g = (x.broadcast_mul(&gamma)? - target)?.broadcast_mul(&gamma)?;
            let u = g.broadcast_sub(&g.mean_keepdim(D::Minus1)?)?;
            let u = (u - x.broadcast_mul(&(&g * &x)?.mean_keepdim(D::Minus1)?)?)?;
            let grad = u.broadcast_mul(&inv)?;
            let s = (q.matmul(&k.t()?)? + 1.0)?
                .broadcast_mul(&mask)?
                .broadcast_mul(&eta.transpose(2, 3)?)?
                .broadcast_mul(&tau)?;
            let z = (q.matmul(&wi)?.broadcast_add(&bi)? - s.matmul(&grad)?)?;
            let lnz = normalize(&z, eps)?
                .0
                .broadcast_mul(&gamma)?
                .broadcast_add(&beta)?;
            ys.push((q + lnz)?);
            let e = grad
                .broadcast_mul(&eta)?
                .broadcast_mul(&tau.narrow(2, m - 1, 1)?)?;
            wi = (wi - k.t()?.matmul(&e)?)?;
            bi = (bi - e.sum_keepdim(2)?)?;
        }
        Ok((Tensor::cat(&ys, 2)?, Tensor::cat(&[&wi, &bi], 2)?))
    }

    /// The fused op (f32) against the composed scan (f64): both outputs and the gradients to all three
    /// operands of a loss on both (each output's backward runs).
    #[test]
    fn fused_scan_matches_the_composed_scan() -> Result<()> {
        let dev = Device::Cpu;
        let (bsz, h, m, n, d) = (2, 3, 4, 3, 8);
        let t = m * n;
        let draw = |seed, mean, shape: (usize, usize, usize, usize)| {
            seeded_randn(seed, mean, 0.5, shape, DType::F64, &dev)
        };
        let tokens = draw(1, 0.0, (bsz, h, t, 3 * d))?;
        let mixing = draw(2, 0.3, (bsz, h, t, 2))?;
        let state = Tensor::cat(
            &[
                &draw(3, 0.0, (bsz, h, d, d))?,
                &draw(4, 0.0, (bsz, h, 1, d))?,
                &draw(5, 1.0, (bsz, h, 1, d))?,
                &draw(6, 0.0, (bsz, h, 1, d))?,
            ],
            2,
        )?;
        let up_mixed = draw(7, 0.0, (bsz, h, t, d))?;
        let up_state = draw(8, 0.0, (bsz, h, d + 1, d))?;
        let mut got = Vec::new();
        for dtype in [DType::F32, DType::F64] {
            let vars = [&tokens, &mixing, &state].map(|x| {
                x.to_dtype(dtype)
                    .and_then(|x| Var::from_tensor(&x))
                    .expect("var")
            });
            let [a, b, c] = vars.each_ref().map(|v| v.as_tensor());
            let (y, after) = match dtype {
                DType::F32 => DualScan::apply(a, b, c, m, 1e-6)?,
                _ => composed(a, b, c, m, 1e-6)?,
            };
            let loss = ((&y * up_mixed.to_dtype(dtype)?)?.sum_all()?
                + (&after * up_state.to_dtype(dtype)?)?.sum_all()?)?;
            let grads = loss.backward()?;
            let mut row = vec![y, after];
            row.extend([a, b, c].map(|x| grads.get(x).expect("gradient").clone()));
            got.push(row);
        }
        let names = ["f(Q)", "state", "∂tokens", "∂mixing", "∂state"];
        for (name, (a, b)) in names.iter().zip(got[0].iter().zip(&got[1])) {
            let r = max_rel_diff(a, b)?;
            assert!(r < 1e-5, "{name}: fused vs composed rel diff {r:e}");
        }
        Ok(())
    }

    #[test]
    fn mismatched_operands_are_refused() -> Result<()> {
        let dev = Device::Cpu;
        let tokens = Tensor::zeros((1, 2, 8, 12), DType::F32, &dev)?;
        let mixing = Tensor::zeros((1, 2, 8, 2), DType::F32, &dev)?;
        let state = Tensor::zeros((1, 2, 7, 4), DType::F32, &dev)?;
        assert!(DualScan::apply(&tokens, &mixing, &state, 4, 1e-6).is_ok());
        let err = DualScan::apply(&tokens, &mixing, &state, 3, 1e-6).unwrap_err();
        assert!(err.to_string().contains("mini-batches of 3"), "{err}");
        let err = DualScan::apply(&tokens, &mixing.narrow(3, 0, 1)?, &state, 4, 1e-6).unwrap_err();
        assert!(err.to_string().contains("do not match"), "{err}");
        Ok(())
    }
}
