//! Quantization kernels: nearest codeword (argmin / top-k), k-means (GPU Lloyd
//! with deterministic centroid updates), size-constrained k-means (LETTER's
//! diversity clusters) and log-domain Sinkhorn (LETTER's balanced last-level
//! assignment). Each family is a file pair like `ops`: launcher + CPU
//! reference + tests, with its WGSL in `shaders/`.

use anyhow::{bail, Result};

use crate::gpu::{self, check, div_ceil, DType, Kernel, Params, Tensor};

pub mod constrained;
pub mod kmeans;
pub mod nearest;
pub mod sinkhorn;

/// Every kernel variant of the quant families (validated by naga in
/// `ops::tests`).
pub fn kernels() -> Vec<Kernel> {
    let mut v = vec![finite_kernel()];
    v.extend(nearest::kernels());
    v.extend(kmeans::kernels());
    v.extend(sinkhorn::kernels());
    v
}

fn finite_kernel() -> Kernel {
    Kernel::new("quant::check_finite", "quant_check", "count_nonfinite").define("WG", "256u")
}

/// Err (naming `op`, the operand and its shape) if the f32 tensor `t` holds a
/// NaN or an infinity. Runs on the GPU and reads back one word, so it syncs.
pub fn check_finite(op: &str, name: &str, t: &Tensor) -> Result<()> {
    check::dtype(op, name, t, DType::F32)?;
    let n = t.numel();
    if n == 0 {
        return Ok(());
    }
    let gpu = t.gpu();
    let count = Tensor::zeros(gpu, &[1], DType::U32)?;
    // Each invocation strides over the tensor; 256 workgroups are plenty.
    let groups = div_ceil(n, 256).min(256);
    let stride = groups as usize * 256;
    gpu.dispatch(
        &finite_kernel(),
        Params::new().u(n).u(stride).bytes(),
        &[t.buffer(), count.buffer()],
        [groups, 1, 1],
    )?;
    let bad = count.to_vec_u32()?[0];
    if bad > 0 {
        bail!("{op}: {name} of shape {} holds {bad} non-finite values (NaN or inf)", gpu::shape_str(t.shape()));
    }
    Ok(())
}

/// Host-side version of [`check_finite`] for data not yet on the GPU.
pub fn check_finite_host(op: &str, name: &str, data: &[f32], shape: &[usize]) -> Result<()> {
    let bad = data.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        bail!("{op}: {name} of shape {} holds {bad} non-finite values (NaN or inf)", gpu::shape_str(shape));
    }
    Ok(())
}

/// Err unless `t` is a non-empty rank-2 f32 tensor; returns (rows, cols).
pub(crate) fn matrix(op: &str, name: &str, t: &Tensor) -> Result<(usize, usize)> {
    check::dtype(op, name, t, DType::F32)?;
    if t.rank() != 2 {
        bail!("{op}: {name} must be a matrix [rows, cols], got shape {}", gpu::shape_str(t.shape()));
    }
    check::nonempty(op, &[(name, t)])?;
    Ok((t.shape()[0], t.shape()[1]))
}

/// A 1-D grid of `groups` workgroups folded into (x, y) under the 65535 limit;
/// returns (grid, groups_x).
pub(crate) fn fold_grid(groups: usize) -> ([u32; 3], usize) {
    let gx = groups.clamp(1, 65535);
    let gy = groups.div_ceil(gx);
    ([gx as u32, gy as u32, 1], gx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::Gpu;

    #[test]
    fn check_finite_flags_nan_and_inf() {
        let gpu = Gpu::shared().unwrap();
        let mut v = vec![1.0f32; 1000];
        let ok = Tensor::from_f32(&gpu, &v, &[10, 100]).unwrap();
        check_finite("op", "x", &ok).unwrap();
        v[777] = f32::NAN;
        v[3] = f32::NEG_INFINITY;
        let bad = Tensor::from_f32(&gpu, &v, &[10, 100]).unwrap();
        let e = check_finite("kmeans", "x", &bad).unwrap_err().to_string();
        assert!(e.contains("kmeans") && e.contains("[10, 100]") && e.contains("2 non-finite"), "{e}");
        let e = check_finite_host("nearest", "x", &v, &[10, 100]).unwrap_err().to_string();
        assert!(e.contains("nearest") && e.contains("2 non-finite"), "{e}");
    }
}
