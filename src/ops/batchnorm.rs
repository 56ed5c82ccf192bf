//! BatchNorm1d over the rows of `x: [n, c]` (`shaders/batchnorm.wgsl`), as
//! PyTorch's `nn.BatchNorm1d` on 2-D input: per column j,
//! `y = (x - mean_j) / sqrt(var_j + eps) * gamma_j + beta_j`.
//!
//! - [`BnMode::Train`]: mean / var are the batch's (biased variance), and the
//!   running statistics are updated in place with momentum m:
//!   `rm = (1 - m) rm + m mean`, `rv = (1 - m) rv + m var * n / (n - 1)`
//!   (unbiased, as PyTorch). Needs n >= 2.
//! - [`BnMode::BatchStats`]: batch statistics, running statistics untouched.
//! - [`BnMode::Eval`]: the running statistics, any n >= 1.
//!
//! Column statistics and the backward's column sums use one thread per column
//! looping over the rows (the batches here are a few hundred rows); the
//! normalization and dx are one thread per element. f32 throughout.

use anyhow::{bail, Result};

use super::elementwise::grid;
use crate::gpu::{check, div_ceil, shape_str, DType, Kernel, Params, Tensor};

/// Threads per workgroup (all kernels).
const WG: usize = 64;

/// Where the normalization statistics come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BnMode {
    /// Batch statistics, and update the running statistics (training).
    #[default]
    Train,
    /// Batch statistics without touching the running statistics.
    BatchStats,
    /// Running statistics (evaluation / inference).
    Eval,
}

fn kernel(entry: &'static str) -> Kernel {
    Kernel::new("batchnorm", "batchnorm", entry)
}

/// Every kernel variant of this family (for naga validation).
pub fn kernels() -> Vec<Kernel> {
    ["stats", "running", "apply", "bwd_sums", "bwd_dx"].into_iter().map(kernel).collect()
}

/// Output of [`batch_norm`].
pub struct BnOut {
    /// `[n, c]`.
    pub y: Tensor,
    /// `[c]`: the statistics used (batch mean / biased var, or the running ones).
    pub mean: Tensor,
    pub var: Tensor,
}

/// Gradients of [`batch_norm`].
pub struct BnGrads {
    /// `[n, c]`.
    pub dx: Tensor,
    /// `[c]` each.
    pub dgamma: Tensor,
    pub dbeta: Tensor,
}

fn params(n: usize, c: usize, batch_stats: bool, eps: f32, momentum: f32) -> Params {
    Params::new().u(n).u(c).u(batch_stats as usize).f(eps).f(momentum)
}

/// Validate `x: [n, c]` f32 and the `[c]` per-column tensors; returns (n, c).
fn check_inputs(op: &str, x: &Tensor, cols: &[(&str, &Tensor)]) -> Result<(usize, usize)> {
    check::nonempty(op, &[("x", x)])?;
    check::dtype(op, "x", x, DType::F32)?;
    if x.rank() != 2 {
        bail!("{op}: x must be [n, c], got {}", shape_str(x.shape()));
    }
    let (n, c) = (x.shape()[0], x.shape()[1]);
    if n * c > u32::MAX as usize - WG {
        bail!("{op}: x {} has too many elements for one launch", shape_str(x.shape()));
    }
    for (name, t) in cols {
        check::dtype(op, name, t, DType::F32)?;
        if t.shape() != [c] {
            bail!("{op}: {name} has shape {} but x is {} (want [{c}])", shape_str(t.shape()), shape_str(x.shape()));
        }
    }
    let mut all: Vec<&Tensor> = vec![x];
    all.extend(cols.iter().map(|t| t.1));
    check::same_device(op, &all)?;
    Ok((n, c))
}

/// Batch statistics of `x: [n, c]`: per-column mean and biased variance, `[c]` each.
pub fn batch_stats(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let (n, c) = check_inputs("batch_norm::batch_stats", x, &[])?;
    let gpu = x.gpu();
    let mean = Tensor::empty(gpu, &[c], DType::F32)?;
    let var = Tensor::empty(gpu, &[c], DType::F32)?;
    let p = params(n, c, true, 0.0, 0.0);
    gpu.dispatch(&kernel("stats"), p.bytes(), &[x.buffer(), mean.buffer(), var.buffer()], [div_ceil(c, WG), 1, 1])?;
    Ok((mean, var))
}

/// Normalize `x: [n, c]` with the given per-column statistics (`var` is a
/// variance, not its inverse square root) and affine `gamma`, `beta`.
pub fn apply(x: &Tensor, mean: &Tensor, var: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
    let op = "batch_norm::apply";
    let (n, c) = check_inputs(op, x, &[("mean", mean), ("var", var), ("gamma", gamma), ("beta", beta)])?;
    let gpu = x.gpu();
    let y = Tensor::empty(gpu, x.shape(), DType::F32)?;
    let bufs = [x.buffer(), mean.buffer(), var.buffer(), gamma.buffer(), beta.buffer(), y.buffer()];
    gpu.dispatch(&kernel("apply"), params(n, c, true, eps, 0.0).bytes(), &bufs, grid((n * c).div_ceil(WG)))?;
    Ok(y)
}

/// BatchNorm1d forward of `x: [n, c]` with affine `gamma`, `beta` and running
/// statistics `running_mean`, `running_var` (`[c]` each; written in place in
/// [`BnMode::Train`]). Training (n < 2 rows) is an error, as in PyTorch.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    mode: BnMode,
    momentum: f32,
    eps: f32,
) -> Result<BnOut> {
    let op = "batch_norm";
    let (n, c) = check_inputs(
        op,
        x,
        &[("gamma", gamma), ("beta", beta), ("running_mean", running_mean), ("running_var", running_var)],
    )?;
    if !(eps > 0.0 && eps.is_finite()) {
        bail!("{op}: eps = {eps} must be finite and > 0");
    }
    if mode == BnMode::Eval {
        let y = apply(x, running_mean, running_var, gamma, beta, eps)?;
        return Ok(BnOut { y, mean: running_mean.clone(), var: running_var.clone() });
    }
    if n < 2 {
        bail!(
            "{op}: batch statistics need at least 2 rows, x has shape {} (use eval mode for single rows)",
            shape_str(x.shape())
        );
    }
    let (mean, var) = batch_stats(x)?;
    if mode == BnMode::Train {
        if !(0.0..=1.0).contains(&momentum) {
            bail!("{op}: momentum {momentum} must be in [0, 1]");
        }
        let bufs = [mean.buffer(), var.buffer(), running_mean.buffer(), running_var.buffer()];
        x.gpu().dispatch(
            &kernel("running"),
            params(n, c, true, eps, momentum).bytes(),
            &bufs,
            [div_ceil(c, WG), 1, 1],
        )?;
    }
    let y = apply(x, &mean, &var, gamma, beta, eps)?;
    Ok(BnOut { y, mean, var })
}

/// Backward of [`batch_norm`] given its input `x`, `gamma`, the statistics it
/// used (`mean`, `var` of [`BnOut`]) and `dy`. `batch_stats`: whether those
/// were the batch's own (then dx flows through them too) or fixed (Eval).
pub fn batch_norm_backward(
    x: &Tensor,
    gamma: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    dy: &Tensor,
    eps: f32,
    batch_stats: bool,
) -> Result<BnGrads> {
    let op = "batch_norm_backward";
    let (n, c) = check_inputs(op, x, &[("gamma", gamma), ("mean", mean), ("var", var)])?;
    check::dtype(op, "dy", dy, DType::F32)?;
    check::same_shape(op, ("x", x), ("dy", dy))?;
    let gpu = x.gpu();
    let dgamma = Tensor::empty(gpu, &[c], DType::F32)?;
    let dbeta = Tensor::empty(gpu, &[c], DType::F32)?;
    let p = params(n, c, batch_stats, eps, 0.0);
    let bufs = [x.buffer(), dy.buffer(), mean.buffer(), var.buffer(), dgamma.buffer(), dbeta.buffer()];
    gpu.dispatch(&kernel("bwd_sums"), p.bytes(), &bufs, [div_ceil(c, WG), 1, 1])?;
    let dx = Tensor::empty(gpu, x.shape(), DType::F32)?;
    let bufs = [
        x.buffer(),
        dy.buffer(),
        mean.buffer(),
        var.buffer(),
        gamma.buffer(),
        dgamma.buffer(),
        dbeta.buffer(),
        dx.buffer(),
    ];
    gpu.dispatch(&kernel("bwd_dx"), p.bytes(), &bufs, grid((n * c).div_ceil(WG)))?;
    Ok(BnGrads { dx, dgamma, dbeta })
}

/// CPU reference (f64) of the batch statistics of `x: [n, c]`: (mean, biased var).
pub fn batch_stats_ref(x: &[f64], c: usize) -> (Vec<f64>, Vec<f64>) {
    let n = x.len() / c;
    let mut mean = vec![0.0; c];
    let mut var = vec![0.0; c];
    for j in 0..c {
        mean[j] = (0..n).map(|i| x[i * c + j]).sum::<f64>() / n as f64;
        var[j] = (0..n).map(|i| (x[i * c + j] - mean[j]).powi(2)).sum::<f64>() / n as f64;
    }
    (mean, var)
}

/// CPU reference (f64) of the normalization with given statistics.
pub fn apply_ref(x: &[f64], mean: &[f64], var: &[f64], gamma: &[f64], beta: &[f64], eps: f64) -> Vec<f64> {
    let c = mean.len();
    x.iter()
        .enumerate()
        .map(|(e, &v)| {
            let j = e % c;
            (v - mean[j]) / (var[j] + eps).sqrt() * gamma[j] + beta[j]
        })
        .collect()
}

/// CPU reference (f64) of the running-statistics update of one training step
/// on `n` rows with batch (mean, biased var); returns (running_mean, running_var).
pub fn running_ref(rm: &[f64], rv: &[f64], mean: &[f64], var: &[f64], n: usize, momentum: f64) -> (Vec<f64>, Vec<f64>) {
    let m = momentum;
    let unb = n as f64 / (n as f64 - 1.0);
    (
        rm.iter().zip(mean).map(|(r, b)| (1.0 - m) * r + m * b).collect(),
        rv.iter().zip(var).map(|(r, b)| (1.0 - m) * r + m * b * unb).collect(),
    )
}

/// CPU reference (f64) of the training-mode forward (batch statistics).
pub fn batch_norm_ref(x: &[f64], gamma: &[f64], beta: &[f64], eps: f64) -> Vec<f64> {
    let (mean, var) = batch_stats_ref(x, gamma.len());
    apply_ref(x, &mean, &var, gamma, beta, eps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::Gpu;
    use crate::ops::testing::{assert_close, finite_diff, rand_vec};

    fn f64s(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| x as f64).collect()
    }
    fn f32s(v: &[f64]) -> Vec<f32> {
        v.iter().map(|&x| x as f32).collect()
    }

    /// x with a per-column offset and scale so the statistics differ by column.
    fn data(seed: u64, n: usize, c: usize) -> Vec<f32> {
        rand_vec(seed, n * c, 1.0)
            .iter()
            .enumerate()
            .map(|(e, v)| v * (0.05 + (e % c) as f32 * 0.3) + (e % c) as f32 * 0.7 - 2.0)
            .collect()
    }

    #[test]
    fn train_and_eval_match_cpu_reference_at_awkward_shapes() {
        let gpu = Gpu::shared().unwrap();
        let eps = 1e-5;
        for (k, &(n, c)) in [(2usize, 1usize), (7, 3), (33, 5), (257, 65), (9, 130)].iter().enumerate() {
            let x = data(k as u64, n, c);
            let gamma = rand_vec(100 + k as u64, c, 2.0);
            let beta = rand_vec(200 + k as u64, c, 1.0);
            let rm0 = rand_vec(300 + k as u64, c, 0.5);
            let rv0: Vec<f32> = rand_vec(400 + k as u64, c, 0.5).iter().map(|v| v + 1.0).collect();
            let t = |v: &[f32], s: &[usize]| Tensor::from_f32(&gpu, v, s).unwrap();
            let (xt, gt, bt) = (t(&x, &[n, c]), t(&gamma, &[c]), t(&beta, &[c]));
            let (rmt, rvt) = (t(&rm0, &[c]), t(&rv0, &[c]));
            let what = format!("n={n} c={c}");

            // Train: batch statistics, running stats updated.
            let out = batch_norm(&xt, &gt, &bt, &rmt, &rvt, BnMode::Train, 0.1, eps).unwrap();
            let (xs, gs, bs) = (f64s(&x), f64s(&gamma), f64s(&beta));
            let want = batch_norm_ref(&xs, &gs, &bs, eps as f64);
            assert_close(&format!("{what} y"), &out.y.to_vec_f32().unwrap(), &f32s(&want), 1e-4, 1e-4);
            let (mean, var) = batch_stats_ref(&xs, c);
            assert_close(&format!("{what} mean"), &out.mean.to_vec_f32().unwrap(), &f32s(&mean), 1e-5, 1e-5);
            assert_close(&format!("{what} var"), &out.var.to_vec_f32().unwrap(), &f32s(&var), 1e-4, 1e-6);
            let (rm, rv) = running_ref(&f64s(&rm0), &f64s(&rv0), &mean, &var, n, 0.1);
            assert_close(&format!("{what} running_mean"), &rmt.to_vec_f32().unwrap(), &f32s(&rm), 1e-5, 1e-6);
            assert_close(&format!("{what} running_var"), &rvt.to_vec_f32().unwrap(), &f32s(&rv), 1e-4, 1e-6);

            // BatchStats: same y, running stats untouched.
            let out2 = batch_norm(&xt, &gt, &bt, &rmt, &rvt, BnMode::BatchStats, 0.1, eps).unwrap();
            assert_eq!(out2.y.to_vec_f32().unwrap(), out.y.to_vec_f32().unwrap());
            assert_close(&format!("{what} running_mean kept"), &rmt.to_vec_f32().unwrap(), &f32s(&rm), 1e-5, 1e-6);

            // Eval: the running statistics, also for a single row.
            let ev = batch_norm(&xt, &gt, &bt, &rmt, &rvt, BnMode::Eval, 0.1, eps).unwrap();
            let want = apply_ref(&xs, &rm, &rv, &gs, &bs, eps as f64);
            assert_close(&format!("{what} eval y"), &ev.y.to_vec_f32().unwrap(), &f32s(&want), 1e-4, 1e-4);
            let one = batch_norm(&t(&x[..c], &[1, c]), &gt, &bt, &rmt, &rvt, BnMode::Eval, 0.1, eps).unwrap();
            assert_close(&format!("{what} eval row 0"), &one.y.to_vec_f32().unwrap(), &f32s(&want[..c]), 1e-4, 1e-4);
        }
    }

    #[test]
    fn train_output_has_zero_mean_unit_variance_for_tiny_inputs() {
        // LightGCN-like scale (variance ~0.035) comes out at unit scale.
        let gpu = Gpu::shared().unwrap();
        let (n, c) = (512, 67);
        let x: Vec<f32> = rand_vec(5, n * c, 0.32).iter().map(|v| v + 0.01).collect();
        let t = |v: &[f32], s: &[usize]| Tensor::from_f32(&gpu, v, s).unwrap();
        let (g, b) = (t(&vec![1.0; c], &[c]), t(&vec![0.0; c], &[c]));
        let (rm, rv) = (t(&vec![0.0; c], &[c]), t(&vec![1.0; c], &[c]));
        let y =
            batch_norm(&t(&x, &[n, c]), &g, &b, &rm, &rv, BnMode::Train, 0.1, 1e-5).unwrap().y.to_vec_f32().unwrap();
        let (mean, var) = batch_stats_ref(&f64s(&y), c);
        assert!(mean.iter().all(|m| m.abs() < 1e-4), "{mean:?}");
        assert!(var.iter().all(|v| (v - 1.0).abs() < 1e-2), "{var:?}");
    }

    #[test]
    fn backward_matches_finite_differences() {
        let gpu = Gpu::shared().unwrap();
        let eps = 1e-5;
        for &(n, c) in &[(2usize, 3usize), (7, 5), (13, 66)] {
            let x = data(7, n, c);
            let gamma = rand_vec(8, c, 2.0);
            let beta = rand_vec(9, c, 1.0);
            let dy = rand_vec(10, n * c, 1.0);
            let rm = rand_vec(11, c, 0.5);
            let rv: Vec<f32> = rand_vec(12, c, 0.5).iter().map(|v| v + 1.0).collect();
            let t = |v: &[f32], s: &[usize]| Tensor::from_f32(&gpu, v, s).unwrap();
            let (xt, gt, bt, dyt) = (t(&x, &[n, c]), t(&gamma, &[c]), t(&beta, &[c]), t(&dy, &[n, c]));
            let (gs, bs, dys) = (f64s(&gamma), f64s(&beta), f64s(&dy));
            let dot = |y: Vec<f64>| y.iter().zip(&dys).map(|(a, b)| a * b).sum::<f64>();
            let what = format!("n={n} c={c}");

            // Batch statistics.
            let out = batch_norm(&xt, &gt, &bt, &t(&rm, &[c]), &t(&rv, &[c]), BnMode::BatchStats, 0.1, eps).unwrap();
            let g = batch_norm_backward(&xt, &gt, &out.mean, &out.var, &dyt, eps, true).unwrap();
            let xs = f64s(&x);
            let want_dx = finite_diff(&x, 1e-4, |xx| dot(batch_norm_ref(xx, &gs, &bs, eps as f64)));
            let want_dg = finite_diff(&gamma, 1e-4, |gg| dot(batch_norm_ref(&xs, gg, &bs, eps as f64)));
            let want_db = finite_diff(&beta, 1e-4, |bb| dot(batch_norm_ref(&xs, &gs, bb, eps as f64)));
            assert_close(&format!("{what} dx"), &g.dx.to_vec_f32().unwrap(), &want_dx, 2e-3, 2e-4);
            assert_close(&format!("{what} dgamma"), &g.dgamma.to_vec_f32().unwrap(), &want_dg, 1e-3, 1e-4);
            assert_close(&format!("{what} dbeta"), &g.dbeta.to_vec_f32().unwrap(), &want_db, 1e-3, 1e-4);

            // Fixed (running) statistics.
            let (rms, rvs) = (f64s(&rm), f64s(&rv));
            let g = batch_norm_backward(&xt, &gt, &t(&rm, &[c]), &t(&rv, &[c]), &dyt, eps, false).unwrap();
            let want_dx = finite_diff(&x, 1e-4, |xx| dot(apply_ref(xx, &rms, &rvs, &gs, &bs, eps as f64)));
            let want_dg = finite_diff(&gamma, 1e-4, |gg| dot(apply_ref(&xs, &rms, &rvs, gg, &bs, eps as f64)));
            assert_close(&format!("{what} eval dx"), &g.dx.to_vec_f32().unwrap(), &want_dx, 1e-3, 1e-4);
            assert_close(&format!("{what} eval dgamma"), &g.dgamma.to_vec_f32().unwrap(), &want_dg, 1e-3, 1e-4);
        }
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_tensor() {
        let gpu = Gpu::shared().unwrap();
        let t = |v: &[f32], s: &[usize]| Tensor::from_f32(&gpu, v, s).unwrap();
        let c = 3;
        let (g, b, rm, rv) = (t(&[1.0; 3], &[c]), t(&[0.0; 3], &[c]), t(&[0.0; 3], &[c]), t(&[1.0; 3], &[c]));
        let one = t(&[1.0, 2.0, 3.0], &[1, c]);
        for mode in [BnMode::Train, BnMode::BatchStats] {
            let e = batch_norm(&one, &g, &b, &rm, &rv, mode, 0.1, 1e-5).err().unwrap().to_string();
            assert!(e.contains("batch_norm") && e.contains("at least 2 rows") && e.contains("[1, 3]"), "{e}");
        }
        assert!(batch_norm(&one, &g, &b, &rm, &rv, BnMode::Eval, 0.1, 1e-5).is_ok());
        let x = t(&[0.0; 12], &[4, c]);
        let wrong = t(&[1.0; 4], &[4]);
        let e = batch_norm(&x, &g, &b, &rm, &wrong, BnMode::Train, 0.1, 1e-5).err().unwrap().to_string();
        assert!(e.contains("running_var") && e.contains("[4]") && e.contains("[3]"), "{e}");
        let e = batch_norm(&t(&[0.0; 12], &[2, 2, 3]), &g, &b, &rm, &rv, BnMode::Eval, 0.1, 1e-5).err().unwrap();
        assert!(e.to_string().contains("[n, c]"), "{e}");
        let e = batch_norm(&x, &g, &b, &rm, &rv, BnMode::Train, 1.5, 1e-5).err().unwrap().to_string();
        assert!(e.contains("momentum 1.5"), "{e}");
        let e = batch_norm_backward(&x, &g, &rm, &rv, &t(&[0.0; 9], &[3, c]), 1e-5, true).err().unwrap().to_string();
        assert!(e.contains("batch_norm_backward") && e.contains("dy"), "{e}");
    }
}
