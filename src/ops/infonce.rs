//! In-batch InfoNCE (`shaders/infonce.wgsl`): row i of `a` should match row i
//! of `b`; the other rows of `b` are its negatives.
//!
//! `loss = mean_i [ logsumexp_j(<a_i, b_j> / T) - <a_i, b_i> / T ]` for
//! `a: [B, D]`, `b: [M, D]` with `M >= B` (rows `B..M` of `b` are extra
//! negatives, usually `M == B`). The op does **not** normalize: it scores raw
//! inner products, which is LETTER's collaborative regularizer exactly
//! (`L_CF`: `a` = quantized embeddings ẑ, `b` = CF embeddings h, T = 1, one
//! direction; h is frozen there, so its gradient `db` may be dropped). For a
//! cosine-similarity InfoNCE (SimCLR/CLIP style), L2-normalize the rows first
//! and pass the temperature (e.g. 0.07); for a symmetric loss call it twice
//! with the operands swapped.
//!
//! Forward: one workgroup per row of `a` with an online max/sum over the M
//! scores (no `[B, M]` matrix). Backward materializes the `[B, M]` score
//! gradient (B * M * 4 bytes must fit one storage binding) and forms
//! `da = G b`, `db = Gᵀ a` with one invocation per output element.

use anyhow::{bail, Result};

use crate::gpu::{check, div_ceil, shape_str, DType, Kernel, Params, Tensor};

const WG: usize = 256;

fn k_rows() -> Kernel {
    Kernel::new("infonce", "infonce", "nce_rows")
}
fn k_mean() -> Kernel {
    Kernel::new("infonce", "infonce", "nce_mean")
}
fn k_grad() -> Kernel {
    Kernel::new("infonce_backward", "infonce", "nce_grad_scores")
}
fn k_da() -> Kernel {
    Kernel::new("infonce_backward", "infonce", "nce_da")
}
fn k_db() -> Kernel {
    Kernel::new("infonce_backward", "infonce", "nce_db")
}

/// Every kernel variant of this family (for naga validation).
pub fn kernels() -> Vec<Kernel> {
    vec![k_rows(), k_mean(), k_grad(), k_da(), k_db()]
}

fn grid(workgroups: u32) -> [u32; 3] {
    let x = workgroups.min(65535);
    [x, workgroups.div_ceil(x.max(1)), 1]
}

/// Results of `infonce`; `lse` is what the backward needs.
#[derive(Clone, Debug)]
pub struct InfoNce {
    /// `[1]` mean loss over the B rows.
    pub loss: Tensor,
    /// `[B]` per-row loss.
    pub loss_rows: Tensor,
    /// `[B]` logsumexp of each row's scores.
    pub lse: Tensor,
}

/// (B, M, D) after validation.
fn validate(op: &str, a: &Tensor, b: &Tensor, temperature: f32) -> Result<(usize, usize, usize)> {
    check::nonempty(op, &[("a", a), ("b", b)])?;
    check::dtype(op, "a", a, DType::F32)?;
    check::dtype(op, "b", b, DType::F32)?;
    check::same_device(op, &[a, b])?;
    if a.rank() != 2 || b.rank() != 2 || a.shape()[1] != b.shape()[1] || b.shape()[0] < a.shape()[0] {
        bail!(
            "{op}: need a [B, D] and b [M, D] with M >= B, got a {} and b {}",
            shape_str(a.shape()),
            shape_str(b.shape())
        );
    }
    if !(temperature > 0.0 && temperature.is_finite()) {
        bail!("{op}: temperature must be finite and > 0, got {temperature} (a {})", shape_str(a.shape()));
    }
    let (bn, m, d) = (a.shape()[0], b.shape()[0], a.shape()[1]);
    if bn * m > u32::MAX as usize - WG || m * d > u32::MAX as usize - WG {
        bail!("{op}: a {} x b {} too large for one launch", shape_str(a.shape()), shape_str(b.shape()));
    }
    Ok((bn, m, d))
}

/// In-batch InfoNCE loss of `a` ([B, D]) against `b` ([M, D], M >= B) with
/// positives on the diagonal, scores `<a_i, b_j> / temperature` (no
/// normalization by the op; see the module doc).
pub fn infonce(a: &Tensor, b: &Tensor, temperature: f32) -> Result<InfoNce> {
    const OP: &str = "infonce";
    let (bn, m, d) = validate(OP, a, b, temperature)?;
    let gpu = a.gpu();
    let loss_rows = Tensor::empty(gpu, &[bn], DType::F32)?;
    let lse = Tensor::empty(gpu, &[bn], DType::F32)?;
    let loss = Tensor::empty(gpu, &[1], DType::F32)?;
    let p = Params::new().u(bn).u(m).u(d).f(1.0 / temperature);
    gpu.dispatch(&k_rows(), p.bytes(), &[a.buffer(), b.buffer(), loss_rows.buffer(), lse.buffer()], grid(bn as u32))?;
    gpu.dispatch(&k_mean(), p.bytes(), &[loss_rows.buffer(), loss.buffer()], [1, 1, 1])?;
    Ok(InfoNce { loss, loss_rows, lse })
}

/// Gradients `(da [B, D], db [M, D])` of `dloss * fwd.loss` (`dloss`: `[1]`
/// f32, `None` = 1); `fwd` must come from `infonce(a, b, temperature)`.
pub fn infonce_backward(
    a: &Tensor,
    b: &Tensor,
    temperature: f32,
    fwd: &InfoNce,
    dloss: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "infonce_backward";
    let (bn, m, d) = validate(OP, a, b, temperature)?;
    if fwd.lse.numel() != bn {
        bail!("{OP}: forward results (lse {}) do not match a {}", shape_str(fwd.lse.shape()), shape_str(a.shape()));
    }
    let gpu = a.gpu();
    let one;
    let dloss = match dloss {
        Some(t) => {
            check::dtype(OP, "dloss", t, DType::F32)?;
            if t.numel() != 1 {
                bail!("{OP}: dloss must have one element, got {}", shape_str(t.shape()));
            }
            t
        }
        None => {
            one = Tensor::scalar(gpu, 1.0)?;
            &one
        }
    };
    let g = Tensor::empty(gpu, &[bn, m], DType::F32)?;
    let da = Tensor::empty(gpu, &[bn, d], DType::F32)?;
    let db = Tensor::empty(gpu, &[m, d], DType::F32)?;
    let p = Params::new().u(bn).u(m).u(d).f(1.0 / temperature);
    let pb = p.bytes();
    gpu.dispatch(
        &k_grad(),
        pb,
        &[a.buffer(), b.buffer(), fwd.lse.buffer(), dloss.buffer(), g.buffer()],
        grid(div_ceil(bn * m, WG)),
    )?;
    gpu.dispatch(&k_da(), pb, &[g.buffer(), b.buffer(), da.buffer()], grid(div_ceil(bn * d, WG)))?;
    gpu.dispatch(&k_db(), pb, &[g.buffer(), a.buffer(), db.buffer()], grid(div_ceil(m * d, WG)))?;
    Ok((da, db))
}

/// CPU reference (f64): the mean InfoNCE loss of a [B, D] against b [M, D].
pub fn infonce_ref(a: &[f64], b: &[f64], bn: usize, m: usize, d: usize, temperature: f64) -> f64 {
    let mut total = 0.0;
    for i in 0..bn {
        let s: Vec<f64> =
            (0..m).map(|j| (0..d).map(|c| a[i * d + c] * b[j * d + c]).sum::<f64>() / temperature).collect();
        let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = mx + s.iter().map(|&x| (x - mx).exp()).sum::<f64>().ln();
        total += lse - s[i];
    }
    total / bn as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::Gpu;
    use crate::ops::testing::{assert_close, finite_diff, rand_vec};

    fn to64(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&v| v as f64).collect()
    }

    #[test]
    fn forward_matches_cpu_at_awkward_sizes() {
        let gpu = Gpu::shared().unwrap();
        let cases = [
            (1usize, 1usize, 1usize, 1.0f32),
            (7, 7, 33, 1.0),
            (33, 40, 7, 0.5),
            (257, 257, 5, 1.0),
            (5, 300, 3, 0.07),
        ];
        for (k, &(bn, m, d, t)) in cases.iter().enumerate() {
            let a = rand_vec(k as u64, bn * d, 1.0);
            let b = rand_vec(100 + k as u64, m * d, 1.0);
            let at = Tensor::from_f32(&gpu, &a, &[bn, d]).unwrap();
            let bt = Tensor::from_f32(&gpu, &b, &[m, d]).unwrap();
            let out = infonce(&at, &bt, t).unwrap();
            assert_eq!(out.loss.shape(), &[1]);
            let want = infonce_ref(&to64(&a), &to64(&b), bn, m, d, t as f64);
            assert_close(
                &format!("infonce B={bn} M={m} D={d} T={t}"),
                &[out.loss.to_scalar().unwrap()],
                &[want as f32],
                2e-5,
                1e-6,
            );
        }
    }

    /// LETTER's L_CF form: raw inner products, T = 1, a 32-d batch of 1024 is
    /// the paper's size; 64 rows keep the f64 reference quick.
    #[test]
    fn letter_cf_form_matches_reference_and_gradients() {
        let gpu = Gpu::shared().unwrap();
        let (bn, d) = (64, 32);
        let a = rand_vec(7, bn * d, 0.5);
        let b = rand_vec(8, bn * d, 0.5);
        let at = Tensor::from_f32(&gpu, &a, &[bn, d]).unwrap();
        let bt = Tensor::from_f32(&gpu, &b, &[bn, d]).unwrap();
        let out = infonce(&at, &bt, 1.0).unwrap();
        let (a64, b64) = (to64(&a), to64(&b));
        let want = infonce_ref(&a64, &b64, bn, bn, d, 1.0);
        assert_close("infonce letter", &[out.loss.to_scalar().unwrap()], &[want as f32], 1e-5, 1e-6);
        let (da, _db) = infonce_backward(&at, &bt, 1.0, &out, None).unwrap();
        let fd = finite_diff(&a, 1e-4, |x| infonce_ref(x, &b64, bn, bn, d, 1.0));
        assert_close("infonce letter da (FD)", &da.to_vec_f32().unwrap(), &fd, 2e-3, 2e-6);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let gpu = Gpu::shared().unwrap();
        for &(bn, m, d, t) in &[(5usize, 5usize, 3usize, 0.5f32), (3, 7, 4, 2.0), (1, 1, 2, 1.0)] {
            let a = rand_vec(20 + bn as u64, bn * d, 1.0);
            let b = rand_vec(30 + m as u64, m * d, 1.0);
            let at = Tensor::from_f32(&gpu, &a, &[bn, d]).unwrap();
            let bt = Tensor::from_f32(&gpu, &b, &[m, d]).unwrap();
            let out = infonce(&at, &bt, t).unwrap();
            let dl = Tensor::scalar(&gpu, 0.6).unwrap();
            let (da, db) = infonce_backward(&at, &bt, t, &out, Some(&dl)).unwrap();
            assert_eq!((da.shape(), db.shape()), (&[bn, d][..], &[m, d][..]));
            let (a64, b64) = (to64(&a), to64(&b));
            let fa = finite_diff(&a, 1e-4, |x| 0.6 * infonce_ref(x, &b64, bn, m, d, t as f64));
            let fb = finite_diff(&b, 1e-4, |x| 0.6 * infonce_ref(&a64, x, bn, m, d, t as f64));
            let what = format!("infonce B={bn} M={m} D={d} T={t}");
            assert_close(&format!("{what} da"), &da.to_vec_f32().unwrap(), &fa, 1e-3, 1e-5);
            assert_close(&format!("{what} db"), &db.to_vec_f32().unwrap(), &fb, 1e-3, 1e-5);
        }
    }

    #[test]
    fn large_scores_stay_finite() {
        // Scores up to ~1e3 / 0.05: the online logsumexp must not overflow.
        let gpu = Gpu::shared().unwrap();
        let (bn, d) = (9, 4);
        let a = rand_vec(40, bn * d, 15.0);
        let b = rand_vec(41, bn * d, 15.0);
        let at = Tensor::from_f32(&gpu, &a, &[bn, d]).unwrap();
        let bt = Tensor::from_f32(&gpu, &b, &[bn, d]).unwrap();
        let out = infonce(&at, &bt, 0.05).unwrap();
        let want = infonce_ref(&to64(&a), &to64(&b), bn, bn, d, 0.05);
        assert_close("infonce large scores", &[out.loss.to_scalar().unwrap()], &[want as f32], 1e-4, 1e-3);
        let (da, db) = infonce_backward(&at, &bt, 0.05, &out, None).unwrap();
        assert!(da.to_vec_f32().unwrap().iter().chain(&db.to_vec_f32().unwrap()).all(|x| x.is_finite()));
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_op() {
        let gpu = Gpu::shared().unwrap();
        let a = Tensor::from_f32(&gpu, &[0.0; 12], &[4, 3]).unwrap();
        let b_short = Tensor::from_f32(&gpu, &[0.0; 9], &[3, 3]).unwrap();
        let b_wide = Tensor::from_f32(&gpu, &[0.0; 16], &[4, 4]).unwrap();
        let e = infonce(&a, &b_short, 1.0).unwrap_err().to_string();
        assert!(e.contains("infonce") && e.contains("[3, 3]"), "{e}");
        let e = infonce(&a, &b_wide, 1.0).unwrap_err().to_string();
        assert!(e.contains("infonce") && e.contains("[4, 4]"), "{e}");
        let e = infonce(&a, &a, 0.0).unwrap_err().to_string();
        assert!(e.contains("infonce") && e.contains("temperature"), "{e}");
        let out = infonce(&a, &a, 1.0).unwrap();
        let e = infonce_backward(&a, &a, 1.0, &out, Some(&a)).unwrap_err().to_string();
        assert!(e.contains("infonce_backward") && e.contains("dloss"), "{e}");
        let u = Tensor::from_u32(&gpu, &[0; 12], &[4, 3]).unwrap();
        assert!(infonce(&u, &a, 1.0).unwrap_err().to_string().contains("infonce"));
    }
}
