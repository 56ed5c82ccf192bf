//! Row-wise L2 normalization (`shaders/l2norm.wgsl`), forward and backward:
//! `y = x / max(||x||, eps)` over the last axis, as torch's `F.normalize(p=2)` and
//! sentence-transformers' `Normalize` (eps 1e-12). `x: [..., C]` is treated as
//! `[rows, C]`; the forward also returns `nrm: [rows] = ||x||` for the backward.

use anyhow::{bail, Result};

use super::elementwise::grid;
use crate::gpu::{check, shape_str, DType, Kernel, Params, Tensor};

/// Invocations per workgroup (`WG` in the shader); one invocation per row.
const WG: usize = 64;

fn kernel(entry: &'static str) -> Kernel {
    Kernel::new("l2norm", "l2norm", entry)
}

/// Every kernel variant in this family.
pub fn kernels() -> Vec<Kernel> {
    vec![kernel("forward"), kernel("backward")]
}

/// Output of [`l2_normalize`].
#[derive(Debug)]
pub struct L2NormOut {
    /// `[..., C]`, the input's shape.
    pub y: Tensor,
    /// `[rows]`: the unclamped row norms ||x||.
    pub nrm: Tensor,
}

fn params(x: &Tensor, eps: f32) -> Params {
    Params::new().u(x.rows()).u(x.last_dim()).f(eps)
}

fn check_eps(op: &str, eps: f32) -> Result<()> {
    if !(eps > 0.0 && eps.is_finite()) {
        bail!("{op}: eps must be a positive finite number, got {eps}");
    }
    Ok(())
}

/// `y = x / max(||x||, eps)` per row of the last axis.
pub fn l2_normalize(x: &Tensor, eps: f32) -> Result<L2NormOut> {
    const OP: &str = "l2_normalize";
    check::nonempty(OP, &[("x", x)])?;
    check::dtype(OP, "x", x, DType::F32)?;
    check_eps(OP, eps)?;
    let gpu = x.gpu();
    let y = Tensor::empty(gpu, x.shape(), DType::F32)?;
    let nrm = Tensor::empty(gpu, &[x.rows()], DType::F32)?;
    gpu.dispatch(
        &kernel("forward"),
        params(x, eps).bytes(),
        &[x.buffer(), y.buffer(), nrm.buffer()],
        grid(x.rows().div_ceil(WG)),
    )?;
    Ok(L2NormOut { y, nrm })
}

/// Backward of [`l2_normalize`] from its output `y`, row norms `nrm` and the output
/// gradient `dy`: `dx = (dy - y <y, dy>) / ||x||`, or `dy / eps` where the clamp was active.
pub fn l2_normalize_backward(y: &Tensor, nrm: &Tensor, dy: &Tensor, eps: f32) -> Result<Tensor> {
    const OP: &str = "l2_normalize_backward";
    check::nonempty(OP, &[("y", y), ("dy", dy)])?;
    check::dtype(OP, "y", y, DType::F32)?;
    check::dtype(OP, "nrm", nrm, DType::F32)?;
    check::dtype(OP, "dy", dy, DType::F32)?;
    check::same_shape(OP, ("y", y), ("dy", dy))?;
    check::same_device(OP, &[y, nrm, dy])?;
    check_eps(OP, eps)?;
    if nrm.numel() != y.rows() {
        bail!("{OP}: nrm has shape {} but y {} has {} rows", shape_str(nrm.shape()), shape_str(y.shape()), y.rows());
    }
    let dx = Tensor::empty(y.gpu(), y.shape(), DType::F32)?;
    y.gpu().dispatch(
        &kernel("backward"),
        params(y, eps).bytes(),
        &[y.buffer(), dy.buffer(), nrm.buffer(), dx.buffer()],
        grid(y.rows().div_ceil(WG)),
    )?;
    Ok(dx)
}

/// CPU reference (f64) over rows of length `cols`: (y, norms).
pub fn l2_normalize_ref(x: &[f64], cols: usize, eps: f64) -> (Vec<f64>, Vec<f64>) {
    let mut y = Vec::with_capacity(x.len());
    let mut norms = Vec::new();
    for row in x.chunks(cols) {
        let n = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        let d = n.max(eps);
        y.extend(row.iter().map(|v| v / d));
        norms.push(n);
    }
    (y, norms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::Gpu;
    use crate::ops::testing::{assert_close, finite_diff, rand_vec};

    fn to64(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| x as f64).collect()
    }

    #[test]
    fn forward_matches_cpu_at_awkward_sizes() {
        let gpu = Gpu::shared().unwrap();
        for (i, &(rows, cols)) in [(1, 1), (1, 7), (7, 33), (33, 384), (257, 5), (65, 16)].iter().enumerate() {
            let x = rand_vec(10 + i as u64, rows * cols, 2.0);
            let xt = Tensor::from_f32(&gpu, &x, &[rows, cols]).unwrap();
            let out = l2_normalize(&xt, 1e-12).unwrap();
            let (y, n) = l2_normalize_ref(&to64(&x), cols, 1e-12);
            let f = |v: Vec<f64>| v.into_iter().map(|a| a as f32).collect::<Vec<_>>();
            assert_close(&format!("y {rows}x{cols}"), &out.y.to_vec_f32().unwrap(), &f(y), 1e-5, 1e-6);
            assert_close(&format!("nrm {rows}x{cols}"), &out.nrm.to_vec_f32().unwrap(), &f(n), 1e-5, 1e-6);
        }
    }

    #[test]
    fn zero_row_stays_zero_and_clamp_is_used() {
        let gpu = Gpu::shared().unwrap();
        // Row 0 is all zeros (norm 0 < eps): output 0, gradient dy / eps.
        let x = [0.0, 0.0, 0.0, 3.0, 4.0, 0.0];
        let xt = Tensor::from_f32(&gpu, &x, &[2, 3]).unwrap();
        let out = l2_normalize(&xt, 0.5).unwrap();
        assert_close("y", &out.y.to_vec_f32().unwrap(), &[0.0, 0.0, 0.0, 0.6, 0.8, 0.0], 1e-6, 1e-7);
        let dy = Tensor::from_f32(&gpu, &[1.0, -2.0, 0.5, 1.0, 0.0, 0.0], &[2, 3]).unwrap();
        let dx = l2_normalize_backward(&out.y, &out.nrm, &dy, 0.5).unwrap().to_vec_f32().unwrap();
        // Row 1: (dy - y <y,dy>) / 5 with <y,dy> = 0.6.
        let want = [2.0, -4.0, 1.0, (1.0 - 0.36) / 5.0, (0.0 - 0.48) / 5.0, 0.0];
        assert_close("dx", &dx, &want, 1e-5, 1e-6);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let gpu = Gpu::shared().unwrap();
        for (i, &(rows, cols)) in [(1, 1), (3, 7), (33, 5), (2, 384)].iter().enumerate() {
            let x = rand_vec(40 + i as u64, rows * cols, 1.5);
            let w = rand_vec(80 + i as u64, rows * cols, 1.0);
            let xt = Tensor::from_f32(&gpu, &x, &[rows, cols]).unwrap();
            let out = l2_normalize(&xt, 1e-12).unwrap();
            let dy = Tensor::from_f32(&gpu, &w, &[rows, cols]).unwrap();
            let dx = l2_normalize_backward(&out.y, &out.nrm, &dy, 1e-12).unwrap().to_vec_f32().unwrap();
            let num = finite_diff(&x, 1e-6, |xs| {
                let (y, _) = l2_normalize_ref(xs, cols, 1e-12);
                y.iter().zip(&w).map(|(a, &b)| a * b as f64).sum()
            });
            assert_close(&format!("dx {rows}x{cols}"), &dx, &num, 1e-3, 1e-4);
        }
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_op() {
        let gpu = Gpu::shared().unwrap();
        let x = Tensor::from_f32(&gpu, &[1.0; 6], &[2, 3]).unwrap();
        let e = l2_normalize(&x, 0.0).unwrap_err().to_string();
        assert!(e.contains("l2_normalize") && e.contains("eps"), "{e}");
        let ids = Tensor::from_u32(&gpu, &[1; 6], &[2, 3]).unwrap();
        assert!(l2_normalize(&ids, 1e-12).unwrap_err().to_string().contains("l2_normalize"));
        let out = l2_normalize(&x, 1e-12).unwrap();
        let bad_dy = Tensor::from_f32(&gpu, &[1.0; 4], &[2, 2]).unwrap();
        let e = l2_normalize_backward(&out.y, &out.nrm, &bad_dy, 1e-12).unwrap_err().to_string();
        assert!(e.contains("l2_normalize_backward"), "{e}");
        let bad_n = Tensor::from_f32(&gpu, &[1.0; 3], &[3]).unwrap();
        let e = l2_normalize_backward(&out.y, &bad_n, &out.y, 1e-12).unwrap_err().to_string();
        assert!(e.contains("nrm") && e.contains("[3]"), "{e}");
    }
}
