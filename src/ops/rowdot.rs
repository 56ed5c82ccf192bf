//! Row-wise dot products (`shaders/rowdot.wgsl`), forward and backward:
//! `s[b, k] = <a[b, :], m[b, k, :]>` for `a: [B, D]`, `m: [B, K, D]`, `s: [B, K]`.
//! This is how BPR scores a batch of (user, positive, negative) triples
//! (K = 2): O(B K D) work, one invocation per output, where a batched
//! `[B,1,D] x [B,K,D]^T` matmul would pad every 1-row product to a full tile.

use anyhow::{bail, Result};

use super::elementwise::grid;
use crate::gpu::{check, shape_str, DType, Kernel, Params, Tensor};

/// Invocations per workgroup (`WG` in the shader).
const WG: usize = 64;

fn kernel(entry: &'static str) -> Kernel {
    // Every index is below B*K*D, B*D or B*K, bounds the launchers check against the tensors.
    Kernel::new("rowdot", "rowdot", entry).trusted(true)
}

/// Every kernel variant in this family.
pub fn kernels() -> Vec<Kernel> {
    vec![kernel("forward"), kernel("backward_a"), kernel("backward_m")]
}

/// Checks `a: [B, D]` f32 and `m: [B, K, D]` f32 on one device; returns (B, K, D).
fn dims(op: &str, a: &Tensor, m: &Tensor) -> Result<(usize, usize, usize)> {
    check::dtype(op, "a", a, DType::F32)?;
    check::dtype(op, "m", m, DType::F32)?;
    check::same_device(op, &[a, m])?;
    if a.rank() != 2 || m.rank() != 3 || m.shape()[0] != a.shape()[0] || m.shape()[2] != a.shape()[1] {
        bail!("{op}: expected a [B, D] and m [B, K, D], got a {} and m {}", shape_str(a.shape()), shape_str(m.shape()));
    }
    Ok((m.shape()[0], m.shape()[1], m.shape()[2]))
}

fn params(b: usize, k: usize, d: usize) -> Params {
    Params::new().u(b).u(k).u(d)
}

/// `s[b, k] = <a[b, :], m[b, k, :]>`: a [B, D], m [B, K, D] -> s [B, K].
pub fn rowdot(a: &Tensor, m: &Tensor) -> Result<Tensor> {
    const OP: &str = "rowdot";
    let (b, k, d) = dims(OP, a, m)?;
    let s = Tensor::zeros(a.gpu(), &[b, k], DType::F32)?;
    if b * k == 0 || d == 0 {
        return Ok(s);
    }
    a.gpu().dispatch(
        &kernel("forward"),
        params(b, k, d).bytes(),
        &[a.buffer(), m.buffer(), s.buffer()],
        grid((b * k).div_ceil(WG)),
    )?;
    Ok(s)
}

/// Backward of [`rowdot`] from the output gradient `g: [B, K]`:
/// `da = sum_k g[b, k] m[b, k, :]` ([B, D]) and `dm[b, k, :] = g[b, k] a[b, :]` ([B, K, D]),
/// each computed only when asked for.
pub fn rowdot_backward(
    a: &Tensor,
    m: &Tensor,
    g: &Tensor,
    need_a: bool,
    need_m: bool,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    const OP: &str = "rowdot_backward";
    let (b, k, d) = dims(OP, a, m)?;
    check::dtype(OP, "g", g, DType::F32)?;
    check::same_device(OP, &[a, g])?;
    if g.shape() != [b, k] {
        bail!("{OP}: gradient g is {} but the scores are [{b}, {k}]", shape_str(g.shape()));
    }
    let gpu = a.gpu();
    let da = if need_a {
        let da = Tensor::zeros(gpu, &[b, d], DType::F32)?;
        if b * d > 0 && k > 0 {
            gpu.dispatch(
                &kernel("backward_a"),
                params(b, k, d).bytes(),
                &[g.buffer(), m.buffer(), da.buffer()],
                grid((b * d).div_ceil(WG)),
            )?;
        }
        Some(da)
    } else {
        None
    };
    let dm = if need_m {
        let dm = Tensor::zeros(gpu, &[b, k, d], DType::F32)?;
        if b * k * d > 0 {
            gpu.dispatch(
                &kernel("backward_m"),
                params(b, k, d).bytes(),
                &[g.buffer(), a.buffer(), dm.buffer()],
                grid((b * k * d).div_ceil(WG)),
            )?;
        }
        Some(dm)
    } else {
        None
    };
    Ok((da, dm))
}

/// CPU reference (f64 accumulation): a [B, D], m [B, K, D] -> s [B, K].
pub fn rowdot_ref(a: &[f32], m: &[f32], b: usize, k: usize, d: usize) -> Vec<f32> {
    let mut s = vec![0f32; b * k];
    for bi in 0..b {
        for ki in 0..k {
            let row = &m[(bi * k + ki) * d..(bi * k + ki + 1) * d];
            s[bi * k + ki] =
                row.iter().zip(&a[bi * d..(bi + 1) * d]).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>() as f32;
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::check::check_gradients;
    use crate::gpu::Gpu;
    use crate::ops::testing::{assert_close, finite_diff, rand_vec};

    #[test]
    fn forward_and_backward_match_reference_at_awkward_sizes() {
        let gpu = Gpu::shared().unwrap();
        for (i, &(b, k, d)) in [(1, 1, 1), (7, 2, 5), (33, 3, 64), (257, 2, 33), (65, 1, 7)].iter().enumerate() {
            let a = rand_vec(1 + i as u64, b * d, 1.0);
            let m = rand_vec(100 + i as u64, b * k * d, 1.0);
            let g = rand_vec(200 + i as u64, b * k, 1.0);
            let at = Tensor::from_f32(&gpu, &a, &[b, d]).unwrap();
            let mt = Tensor::from_f32(&gpu, &m, &[b, k, d]).unwrap();
            let s = rowdot(&at, &mt).unwrap().to_vec_f32().unwrap();
            assert_close(&format!("rowdot {b}x{k}x{d}"), &s, &rowdot_ref(&a, &m, b, k, d), 1e-5, 1e-5);
            // Gradients of sum(g * s) by finite differences of the reference.
            let obj_a = |x: &[f64]| -> f64 {
                let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
                rowdot_ref(&xf, &m, b, k, d).iter().zip(&g).map(|(&s, &w)| s as f64 * w as f64).sum()
            };
            let obj_m = |x: &[f64]| -> f64 {
                let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
                rowdot_ref(&a, &xf, b, k, d).iter().zip(&g).map(|(&s, &w)| s as f64 * w as f64).sum()
            };
            let gt = Tensor::from_f32(&gpu, &g, &[b, k]).unwrap();
            let (da, dm) = rowdot_backward(&at, &mt, &gt, true, true).unwrap();
            // The objective is linear in each operand, so central differences are exact up to rounding.
            assert_close("rowdot da", &da.unwrap().to_vec_f32().unwrap(), &finite_diff(&a, 1e-2, obj_a), 1e-3, 1e-3);
            assert_close("rowdot dm", &dm.unwrap().to_vec_f32().unwrap(), &finite_diff(&m, 1e-2, obj_m), 1e-3, 1e-3);
        }
    }

    #[test]
    fn autograd_rowdot_passes_gradient_check() {
        let gpu = Gpu::shared().unwrap();
        let (b, k, d) = (5, 2, 7);
        let inputs = vec![(rand_vec(3, b * d, 1.0), vec![b, d]), (rand_vec(4, b * k * d, 1.0), vec![b, k, d])];
        check_gradients(&gpu, &inputs, |_, v| v[0].rowdot(&v[1]), 1e-2, 1e-2, 1e-3).unwrap();
    }

    #[test]
    fn bad_shapes_are_errors_naming_the_op() {
        let gpu = Gpu::shared().unwrap();
        let a = Tensor::from_f32(&gpu, &[0.0; 6], &[2, 3]).unwrap();
        let m = Tensor::from_f32(&gpu, &[0.0; 8], &[2, 1, 4]).unwrap();
        let e = rowdot(&a, &m).unwrap_err().to_string();
        assert!(e.contains("rowdot") && e.contains("[2, 3]") && e.contains("[2, 1, 4]"), "{e}");
        let m = Tensor::from_f32(&gpu, &[0.0; 12], &[2, 2, 3]).unwrap();
        let g = Tensor::from_f32(&gpu, &[0.0; 2], &[2, 1]).unwrap();
        let e = rowdot_backward(&a, &m, &g, true, true).unwrap_err().to_string();
        assert!(e.contains("rowdot_backward") && e.contains("[2, 1]"), "{e}");
        let ids = Tensor::from_u32(&gpu, &[0; 6], &[2, 3]).unwrap();
        assert!(rowdot(&ids, &m).is_err());
    }
}
