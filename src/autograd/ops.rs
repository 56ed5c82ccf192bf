//! Differentiable ops on `Var`s: each calls the forward kernel and records a
//! backward closure built from the backward kernels in `ops`.

use anyhow::{bail, Result};

use super::tape::Var;
use crate::gpu::{shape_str, Tensor};
use crate::ops::{self, Act};

/// Sum a broadcast gradient back to the shape of the operand it came from.
fn unbroadcast(g: Tensor, shape: &[usize]) -> Result<Tensor> {
    if g.shape() == shape {
        Ok(g)
    } else {
        ops::reduce::sum_to_shape(&g, shape)
    }
}

/// The adapter of [`Var::lora_linear`]: A `[r, in]`, B `[out, r]` (PEFT's `lora_A` / `lora_B`
/// layouts), scale = alpha / r, and inverted dropout on the adapter's input with probability
/// `p` and the counter-based mask of `ops::dropout` (`seed`, `offset`).
#[derive(Clone, Copy)]
pub struct LoraTerm<'a> {
    pub a: &'a Var,
    pub b: &'a Var,
    pub scale: f32,
    pub p: f32,
    pub seed: u32,
    pub offset: u32,
}

impl Var {
    fn binary(&self, other: &Var, op: ops::elementwise::BinOp) -> Result<Var> {
        use ops::elementwise::{binary, BinOp};
        let y = binary(&self.value, &other.value, op)?;
        let (a, b) = (self.value.clone(), other.value.clone());
        let (wa, wb) = (self.requires_grad(), other.requires_grad());
        Ok(self.tape.record(y, &[self, other], move |g| {
            let (ga, gb) = match op {
                BinOp::Add => (wa.then(|| g.clone()), wb.then(|| g.clone())),
                BinOp::Sub => (wa.then(|| g.clone()), if wb { Some(ops::elementwise::scale(g, -1.0)?) } else { None }),
                BinOp::Mul => (
                    if wa { Some(binary(g, &b, BinOp::Mul)?) } else { None },
                    if wb { Some(binary(g, &a, BinOp::Mul)?) } else { None },
                ),
                BinOp::Div => {
                    // d(a/b)/da = 1/b ; d(a/b)/db = -a/b^2
                    let ga = if wa { Some(binary(g, &b, BinOp::Div)?) } else { None };
                    let gb = if wb {
                        let t = binary(&binary(g, &a, BinOp::Mul)?, &binary(&b, &b, BinOp::Mul)?, BinOp::Div)?;
                        Some(ops::elementwise::scale(&t, -1.0)?)
                    } else {
                        None
                    };
                    (ga, gb)
                }
            };
            Ok(vec![
                ga.map(|t| unbroadcast(t, a.shape())).transpose()?,
                gb.map(|t| unbroadcast(t, b.shape())).transpose()?,
            ])
        }))
    }

    /// Elementwise sum with broadcasting.
    pub fn add(&self, other: &Var) -> Result<Var> {
        self.binary(other, ops::elementwise::BinOp::Add)
    }
    /// Elementwise difference with broadcasting.
    pub fn sub(&self, other: &Var) -> Result<Var> {
        self.binary(other, ops::elementwise::BinOp::Sub)
    }
    /// Elementwise product with broadcasting.
    pub fn mul(&self, other: &Var) -> Result<Var> {
        self.binary(other, ops::elementwise::BinOp::Mul)
    }
    /// Elementwise quotient with broadcasting.
    pub fn div(&self, other: &Var) -> Result<Var> {
        self.binary(other, ops::elementwise::BinOp::Div)
    }

    /// x * s for a scalar s.
    pub fn scale(&self, s: f32) -> Result<Var> {
        let y = ops::elementwise::scale(&self.value, s)?;
        Ok(self.tape.record(y, &[self], move |g| Ok(vec![Some(ops::elementwise::scale(g, s)?)])))
    }

    /// Zero-copy reshape.
    pub fn reshape(&self, shape: &[usize]) -> Result<Var> {
        let y = self.value.reshape(shape)?;
        let orig = self.value.shape().to_vec();
        Ok(self.tape.record(y, &[self], move |g| Ok(vec![Some(g.reshape(&orig)?)])))
    }

    /// Elementwise activation.
    pub fn act(&self, act: Act) -> Result<Var> {
        let y = ops::activation::forward(&self.value, act)?;
        let x = self.value.clone();
        Ok(self.tape.record(y, &[self], move |g| Ok(vec![Some(ops::activation::backward(&x, g, act)?)])))
    }

    /// silu(gate) * up (LLaMA's SwiGLU), `self` is the gate.
    pub fn swiglu(&self, up: &Var) -> Result<Var> {
        let y = ops::activation::swiglu(&self.value, &up.value)?;
        let (gate, upv) = (self.value.clone(), up.value.clone());
        Ok(self.tape.record(y, &[self, up], move |g| {
            let (dg, du) = ops::activation::swiglu_backward(&gate, &upv, g)?;
            Ok(vec![Some(dg), Some(du)])
        }))
    }

    /// act(self @ w + bias) with `w` [K, N] (or [N, K] when `trans_w`), fused
    /// on the GPU. `self` may be [M, K] or [B, M, K].
    pub fn linear(&self, w: &Var, bias: Option<&Var>, trans_w: bool, act: Act) -> Result<Var> {
        use ops::matmul::{matmul, matmul_backward, MatmulOpts};
        // Keep the pre-activation for the activation's backward.
        let pre = matmul(
            &self.value,
            &w.value,
            &MatmulOpts {
                trans_a: false,
                trans_b: trans_w,
                bias: bias.map(|b| &b.value),
                act: Act::None,
                lowrank: None,
            },
        )?;
        let y = if act == Act::None { pre.clone() } else { ops::activation::forward(&pre, act)? };
        let (x, wv) = (self.value.clone(), w.value.clone());
        let (need_x, need_w, need_b) =
            (self.requires_grad(), w.requires_grad(), bias.map(|b| b.requires_grad()).unwrap_or(false));
        let has_bias = bias.is_some();
        let mut inputs: Vec<&Var> = vec![self, w];
        if let Some(b) = bias {
            inputs.push(b);
        }
        Ok(self.tape.record(y, &inputs, move |g| {
            let dpre = if act == Act::None { g.clone() } else { ops::activation::backward(&pre, g, act)? };
            let (dx, dw, db) = matmul_backward(&x, &wv, &dpre, false, trans_w, need_x, need_w, need_b)?;
            let mut out = vec![dx, dw];
            if has_bias {
                out.push(db);
            }
            Ok(out)
        }))
    }

    /// LoRA linear with the adapter fused into the base matmul kernel:
    /// `x Wᵀ + bias + scale · (dropout(x) Aᵀ) Bᵀ` (see [`LoraTerm`]). `self` (x) is `[M, in]` or
    /// `[..., in]` (leading axes flattened), W `[out, in]` (f32, or f16 when frozen), bias `[out]`.
    ///
    /// Forward: H = dropout(x) Aᵀ `[M, r]` (a thin matmul), then one matmul computes
    /// `x Wᵀ + bias + scale · H Bᵀ` with the rank-r term summed inside the kernel
    /// (`ops::matmul::LowRank`). Backward, for dY `[M, out]`: G = scale · dY B `[M, r]`,
    /// dB = scale · dYᵀ H, dA = Gᵀ dropout(x), and dX = dY W + G A as one matmul with the same
    /// fused term when dropout is off; with dropout the adapter's share G A goes through the
    /// mask, so it is computed apart and added (dX = dY W + dropout'(G A)). dW and dbias are
    /// computed only when they want gradients (the base is usually frozen). Under a no-grad
    /// tape dropout is the identity.
    pub fn lora_linear(&self, w: &Var, bias: Option<&Var>, l: LoraTerm) -> Result<Var> {
        use ops::matmul::{matmul, matmul_backward, LowRank, MatmulOpts};
        const OP: &str = "lora_linear";
        let shape = self.shape().to_vec();
        let (wv, av, bv) = (w.value.clone(), l.a.value.clone(), l.b.value.clone());
        let d_in = *shape.last().unwrap_or(&0);
        if shape.len() < 2 || wv.rank() != 2 || wv.shape()[1] != d_in {
            bail!(
                "{OP}: x {} does not fit W {} (expected [..., in] and [out, in])",
                shape_str(&shape),
                shape_str(wv.shape())
            );
        }
        let d_out = wv.shape()[0];
        let r = av.shape().first().copied().unwrap_or(0);
        if av.shape() != [r, d_in] || bv.shape() != [d_out, r] {
            bail!(
                "{OP}: adapter A {} and B {} do not fit W {} (expected A [r, {d_in}], B [{d_out}, r])",
                shape_str(av.shape()),
                shape_str(bv.shape()),
                shape_str(wv.shape())
            );
        }
        let m = self.value.numel() / d_in.max(1);
        let x2 = self.value.reshape(&[m, d_in])?;
        let drop = l.p > 0.0 && self.tape.grad_enabled();
        let xd = if drop { ops::dropout::dropout(&x2, l.p, l.seed, l.offset)? } else { x2.clone() };
        let h = matmul(&xd, &av, &MatmulOpts { trans_b: true, ..Default::default() })?; // [M, r]
        let fused = LowRank { h: &h, f: &bv, f_trans: false, scale: l.scale };
        let opts =
            MatmulOpts { trans_b: true, bias: bias.map(|b| &b.value), lowrank: Some(fused), ..Default::default() };
        let y = matmul(&x2, &wv, &opts)?;
        let mut out_shape = shape.clone();
        *out_shape.last_mut().unwrap() = d_out;
        let y = y.reshape(&out_shape)?;

        let (need_x, need_w, need_a, need_b) =
            (self.requires_grad(), w.requires_grad(), l.a.requires_grad(), l.b.requires_grad());
        let need_bias = bias.map(|b| b.requires_grad()).unwrap_or(false);
        let has_bias = bias.is_some();
        let mut inputs: Vec<&Var> = vec![self, w, l.a, l.b];
        if let Some(b) = bias {
            inputs.push(b);
        }
        let (scale, p, seed, offset) = (l.scale, l.p, l.seed, l.offset);
        Ok(self.tape.record(y, &inputs, move |g| {
            let g2 = g.reshape(&[m, d_out])?;
            let plain = MatmulOpts::default();
            // G = scale · dY B: [M, r].
            let gs =
                if need_x || need_a { Some(ops::elementwise::scale(&matmul(&g2, &bv, &plain)?, scale)?) } else { None };
            let dx = match (&gs, need_x) {
                (Some(gs), true) if !drop => {
                    // dY W + G A in one kernel: A [r, in] is F stored [r, N].
                    let lr = LowRank { h: gs, f: &av, f_trans: true, scale: 1.0 };
                    Some(matmul(&g2, &wv, &MatmulOpts { lowrank: Some(lr), ..Default::default() })?)
                }
                (Some(gs), true) => {
                    let dx = matmul(&g2, &wv, &plain)?;
                    let dxd = ops::dropout::dropout_backward(&matmul(gs, &av, &plain)?, p, seed, offset)?;
                    ops::elementwise::add_scaled(&dx, &dxd, 1.0)?;
                    Some(dx)
                }
                _ => None,
            };
            let da = match (&gs, need_a) {
                (Some(gs), true) => Some(matmul(gs, &xd, &MatmulOpts { trans_a: true, ..Default::default() })?),
                _ => None,
            };
            let db = if need_b {
                let t = matmul(&g2, &h, &MatmulOpts { trans_a: true, ..Default::default() })?; // [out, r]
                Some(ops::elementwise::scale(&t, scale)?)
            } else {
                None
            };
            let (_, dw, dbias) = if need_w || need_bias {
                matmul_backward(&x2, &wv, &g2, false, true, false, need_w, need_bias)?
            } else {
                (None, None, None)
            };
            let mut out = vec![dx.map(|t| t.reshape(&shape)).transpose()?, dw, da, db];
            if has_bias {
                out.push(dbias);
            }
            Ok(out)
        }))
    }

    /// Batched or plain matrix product with optional transposes (no bias).
    pub fn matmul(&self, other: &Var, trans_a: bool, trans_b: bool) -> Result<Var> {
        use ops::matmul::{matmul, matmul_backward, MatmulOpts};
        let y = matmul(&self.value, &other.value, &MatmulOpts { trans_a, trans_b, ..Default::default() })?;
        let (a, b) = (self.value.clone(), other.value.clone());
        let (na, nb) = (self.requires_grad(), other.requires_grad());
        Ok(self.tape.record(y, &[self, other], move |g| {
            let (da, db, _) = matmul_backward(&a, &b, g, trans_a, trans_b, na, nb, false)?;
            Ok(vec![da, db])
        }))
    }

    /// Softmax over the last axis.
    pub fn softmax(&self) -> Result<Var> {
        let y = ops::softmax::softmax(&self.value)?;
        let yy = y.clone();
        Ok(self.tape.record(y, &[self], move |g| Ok(vec![Some(ops::softmax::softmax_backward(&yy, g)?)])))
    }

    /// Log-softmax over the last axis.
    pub fn log_softmax(&self) -> Result<Var> {
        let y = ops::softmax::log_softmax(&self.value)?;
        let yy = y.clone();
        Ok(self.tape.record(y, &[self], move |g| Ok(vec![Some(ops::softmax::log_softmax_backward(&yy, g)?)])))
    }

    /// Sum of all elements, as a [1] value.
    pub fn sum_all(&self) -> Result<Var> {
        let y = ops::reduce::sum_all(&self.value)?;
        let shape = self.value.shape().to_vec();
        Ok(self.tape.record(y, &[self], move |g| {
            // Broadcast the scalar gradient back: zeros + g.
            let z = Tensor::zeros(g.gpu(), &shape, crate::gpu::DType::F32)?;
            Ok(vec![Some(ops::elementwise::add(&z, &g.reshape(&[1])?)?)])
        }))
    }

    /// Mean of all elements, as a [1] value.
    pub fn mean_all(&self) -> Result<Var> {
        let n = self.value.numel();
        if n == 0 {
            bail!("mean_all of an empty tensor {}", shape_str(self.value.shape()));
        }
        self.sum_all()?.scale(1.0 / n as f32)
    }
}

/// Rows of `table` [V, D] picked by `ids` (U32, any shape) -> [..ids shape, D].
pub fn embedding(table: &Var, ids: &Tensor) -> Result<Var> {
    let flat = ids.reshape(&[ids.numel()])?;
    let y = ops::embedding::gather(&table.value, &flat)?;
    let mut shape = ids.shape().to_vec();
    shape.push(table.value.last_dim());
    let y = y.reshape(&shape)?;
    let vocab = table.value.shape()[0];
    let d = table.value.last_dim();
    Ok(table.tape.record(y, &[table], move |g| {
        let g2 = g.reshape(&[flat.numel(), d])?;
        Ok(vec![Some(ops::embedding::scatter_add(&g2, &flat, vocab)?)])
    }))
}

/// `embedding` with ids given as a prebuilt `IdCsr` (e.g. `IdCsr::from_host`, built
/// on the CPU in well under a millisecond): the backward reuses it instead of
/// sorting the ids on the GPU, and one CSR can serve several tables.
/// Output: `csr.ids.shape() + [D]`.
pub fn embedding_csr(table: &Var, csr: &ops::embedding::IdCsr) -> Result<Var> {
    let ids = &csr.ids;
    if csr.vocab != table.value.shape()[0] {
        bail!(
            "embedding_csr: the ids' CSR is for {} rows but the table is {}",
            csr.vocab,
            shape_str(table.value.shape())
        );
    }
    let flat = ids.reshape(&[ids.numel()])?;
    let y = ops::embedding::gather(&table.value, &flat)?;
    let mut shape = ids.shape().to_vec();
    shape.push(table.value.last_dim());
    let y = y.reshape(&shape)?;
    let d = table.value.last_dim();
    let csr = csr.clone();
    Ok(table.tape.record(y, &[table], move |g| {
        let g2 = g.reshape(&[flat.numel(), d])?;
        Ok(vec![Some(ops::embedding::scatter_add_csr(&g2, &csr)?)])
    }))
}

/// Options of `cross_entropy`, owned so the backward pass can keep them.
#[derive(Clone, Debug)]
pub struct CeOptions {
    pub ignore_index: i32,
    /// Temperature: the loss is computed on logits / tau.
    pub tau: f32,
    /// Optional additive logit mask, [V] or [N, V].
    pub mask: Option<Tensor>,
}

impl Default for CeOptions {
    fn default() -> Self {
        CeOptions { ignore_index: -100, tau: 1.0, mask: None }
    }
}

/// Mean cross-entropy of `logits` [N, V] against I32 `targets` [N] (rows equal
/// to `ignore_index` excluded), as a [1] value.
pub fn cross_entropy(logits: &Var, targets: &Tensor, o: &CeOptions) -> Result<Var> {
    use ops::cross_entropy::{cross_entropy as ce, cross_entropy_backward, CrossEntropyOpts};
    let logits2 = logits.value.reshape(&[logits.value.rows(), logits.value.last_dim()])?;
    let t = targets.reshape(&[targets.numel()])?;
    let opts = CrossEntropyOpts { ignore_index: o.ignore_index, tau: o.tau, mask: o.mask.as_ref() };
    let fwd = ce(&logits2, &t, &opts)?;
    let loss = fwd.loss.clone();
    let o = o.clone();
    let shape = logits.value.shape().to_vec();
    Ok(logits.tape.record(loss, &[logits], move |g| {
        let opts = CrossEntropyOpts { ignore_index: o.ignore_index, tau: o.tau, mask: o.mask.as_ref() };
        let d = cross_entropy_backward(&logits2, &t, &fwd, &opts, Some(g))?;
        Ok(vec![Some(d.reshape(&shape)?)])
    }))
}

impl Var {
    /// Inverted dropout with a counter-based mask (`seed`, `offset` make it
    /// reproducible; the backward pass recomputes the mask). Identity when `p == 0`.
    pub fn dropout(&self, p: f32, seed: u32, offset: u32) -> Result<Var> {
        if p == 0.0 || !self.tape.grad_enabled() {
            return Ok(self.clone());
        }
        let y = ops::dropout::dropout(&self.value, p, seed, offset)?;
        Ok(self.tape.record(y, &[self], move |g| Ok(vec![Some(ops::dropout::dropout_backward(g, p, seed, offset)?)])))
    }

    /// RMSNorm over the last axis with a [C] weight.
    pub fn rms_norm(&self, weight: &Var, eps: f32) -> Result<Var> {
        let out = ops::norm::rms_norm(&self.value, &weight.value, eps)?;
        let (x, w, rstd) = (self.value.clone(), weight.value.clone(), out.rstd);
        Ok(self.tape.record(out.y, &[self, weight], move |g| {
            let gr = ops::norm::rms_norm_backward(&x, &w, &rstd, g)?;
            Ok(vec![Some(gr.dx), Some(gr.dweight)])
        }))
    }

    /// LayerNorm over the last axis with [C] weight and bias.
    pub fn layer_norm(&self, weight: &Var, bias: &Var, eps: f32) -> Result<Var> {
        let out = ops::norm::layer_norm(&self.value, &weight.value, &bias.value, eps)?;
        let (x, w, mean, rstd) = (self.value.clone(), weight.value.clone(), out.mean, out.rstd);
        Ok(self.tape.record(out.y, &[self, weight, bias], move |g| {
            let gr = ops::norm::layer_norm_backward(&x, &w, &mean, &rstd, g)?;
            Ok(vec![Some(gr.dx), Some(gr.dweight), gr.dbias])
        }))
    }
}

impl Var {
    /// BatchNorm1d of `self: [n, c]` with affine `gamma`, `beta: [c]` and the
    /// running statistics `running_mean`, `running_var: [c]` (state, not
    /// parameters: updated in place in `BnMode::Train`, used in `BnMode::Eval`).
    /// The mode is explicit, independent of the tape's grad mode, so a
    /// no-grad tape can still normalize with batch statistics.
    #[allow(clippy::too_many_arguments)]
    pub fn batch_norm(
        &self,
        gamma: &Var,
        beta: &Var,
        running_mean: &Tensor,
        running_var: &Tensor,
        mode: ops::batchnorm::BnMode,
        momentum: f32,
        eps: f32,
    ) -> Result<Var> {
        use ops::batchnorm::{batch_norm, batch_norm_backward, BnMode};
        let out = batch_norm(&self.value, &gamma.value, &beta.value, running_mean, running_var, mode, momentum, eps)?;
        let (x, g, mean, var) = (self.value.clone(), gamma.value.clone(), out.mean, out.var);
        let batch = mode != BnMode::Eval;
        Ok(self.tape.record(out.y, &[self, gamma, beta], move |dy| {
            let gr = batch_norm_backward(&x, &g, &mean, &var, dy, eps, batch)?;
            Ok(vec![Some(gr.dx), Some(gr.dgamma), Some(gr.dbeta)])
        }))
    }
}

impl Var {
    /// Axis permutation (rank <= 4); output axis a is input axis perm[a].
    pub fn permute(&self, perm: &[usize]) -> Result<Var> {
        let y = ops::permute::permute(&self.value, perm)?;
        let inv = ops::permute::inverse(perm);
        Ok(self.tape.record(y, &[self], move |g| Ok(vec![Some(ops::permute::permute(g, &inv)?)])))
    }
}

/// Fused masked attention. q [B, Hq, Tq, Dh], k/v [B, Hkv, Tk, Dh], optional
/// additive bias [Hq, Tq, Tk]; see `ops::attention` for the mask encoding.
pub fn attention(
    q: &Var,
    k: &Var,
    v: &Var,
    bias: Option<&Var>,
    mask: &ops::attention::Mask,
    scale: f32,
) -> Result<Var> {
    let fwd = ops::attention::attention(&q.value, &k.value, &v.value, bias.map(|b| &b.value), mask, scale)?;
    let (qv, kv, vv) = (q.value.clone(), k.value.clone(), v.value.clone());
    let bv = bias.map(|b| b.value.clone());
    let want_dbias = bias.map(|b| b.requires_grad()).unwrap_or(false);
    let (out, lse) = (fwd.out.clone(), fwd.lse);
    let mask = mask.clone();
    let mut inputs = vec![q, k, v];
    if let Some(b) = bias {
        inputs.push(b);
    }
    Ok(q.tape.record(fwd.out, &inputs, move |g| {
        let gr =
            ops::attention::attention_backward(g, &qv, &kv, &vv, &out, &lse, bv.as_ref(), &mask, scale, want_dbias)?;
        let mut v = vec![Some(gr.dq), Some(gr.dk), Some(gr.dv)];
        if bv.is_some() {
            v.push(gr.dbias);
        }
        Ok(v)
    }))
}

impl Var {
    /// Row-wise dot products: self [B, D], m [B, K, D] -> [B, K] (`ops::rowdot`), e.g. BPR scores.
    pub fn rowdot(&self, m: &Var) -> Result<Var> {
        let y = ops::rowdot::rowdot(&self.value, &m.value)?;
        let (a, mm) = (self.value.clone(), m.value.clone());
        let (na, nm) = (self.requires_grad(), m.requires_grad());
        Ok(self.tape.record(y, &[self, m], move |g| {
            let (da, dm) = ops::rowdot::rowdot_backward(&a, &mm, g, na, nm)?;
            Ok(vec![da, dm])
        }))
    }

    /// Sparse x dense: y = A x with `a` a device CSR (constant), x [cols, D].
    pub fn spmm(&self, a: &ops::spmm::Csr) -> Result<Var> {
        let y = a.a.matmul(&self.value)?;
        let a = a.clone();
        Ok(self.tape.record(y, &[self], move |g| Ok(vec![Some(a.at.matmul(g)?)])))
    }
}
