//! Cross-entropy for large vocabularies (`shaders/cross_entropy.wgsl`): one
//! workgroup per row with an online max/sum reduction, `ignore_index`, a label
//! temperature tau (the loss is taken on `logits / tau`, as LETTER's
//! ranking-guided loss does) and an optional additive logit mask.
//!
//! Row r's scaled logits are `z_j = logits[r, j] / tau + mask_j`: the mask is
//! added after the temperature, so `-1e9` or `-inf` entries mean "disallowed"
//! whatever tau is. The target of a non-ignored row must not be masked (its loss
//! would be infinite). A target outside `[0, V)` that is not `ignore_index`
//! gives a NaN row loss (so a bad batch shows up in the loss) and a zero
//! gradient row; nothing is read out of bounds.
//!
//! The mean over non-ignored rows is reduced on the GPU into a `[1]` tensor
//! (0 when every row is ignored), so a training step needs no readback.

use anyhow::{bail, Result};

use crate::gpu::{check, div_ceil, shape_str, DType, Kernel, Params, Tensor};

fn k_rows() -> Kernel {
    Kernel::new("cross_entropy", "cross_entropy", "ce_rows")
}
fn k_mean() -> Kernel {
    Kernel::new("cross_entropy", "cross_entropy", "ce_mean")
}
fn k_backward() -> Kernel {
    Kernel::new("cross_entropy_backward", "cross_entropy", "ce_backward")
}

/// Every kernel variant of this family (for naga validation).
pub fn kernels() -> Vec<Kernel> {
    vec![k_rows(), k_mean(), k_backward()]
}

fn grid(workgroups: u32) -> [u32; 3] {
    let x = workgroups.min(65535);
    [x, workgroups.div_ceil(x.max(1)), 1]
}

/// Options of `cross_entropy`.
#[derive(Clone, Copy, Debug)]
pub struct CrossEntropyOpts<'a> {
    /// Rows whose target equals this contribute nothing (PyTorch's -100 by default).
    pub ignore_index: i32,
    /// Label temperature: the loss is computed on `logits / tau` (> 0; 1 = plain CE).
    pub tau: f32,
    /// Additive mask on the scaled logits, f32 `[V]` (shared by all rows) or
    /// `[N, V]` (same shape as logits); e.g. -inf or -1e9 for disallowed tokens.
    pub mask: Option<&'a Tensor>,
}

impl Default for CrossEntropyOpts<'_> {
    fn default() -> Self {
        CrossEntropyOpts { ignore_index: -100, tau: 1.0, mask: None }
    }
}

/// Results of `cross_entropy`; `lse` and `count` are what the backward needs.
#[derive(Clone, Debug)]
pub struct CrossEntropy {
    /// `[N]` per-row loss, 0 on ignored rows.
    pub loss_rows: Tensor,
    /// `[1]` mean of `loss_rows` over non-ignored rows (0 if there are none).
    pub loss: Tensor,
    /// `[N]` logsumexp of each row's scaled, masked logits (0 on ignored rows).
    pub lse: Tensor,
    /// `[1]` number of non-ignored rows, as f32.
    pub count: Tensor,
}

/// Validated geometry: (rows N, vocab V, mask mode 0/1/2).
fn validate(op: &str, logits: &Tensor, targets: &Tensor, opts: &CrossEntropyOpts) -> Result<(usize, usize, u32)> {
    check::nonempty(op, &[("logits", logits), ("targets", targets)])?;
    check::dtype(op, "logits", logits, DType::F32)?;
    check::dtype(op, "targets", targets, DType::I32)?;
    check::same_device(op, &[logits, targets])?;
    let (n, v) = (logits.rows(), logits.last_dim());
    if logits.rank() < 2 {
        bail!("{op}: logits must be [N, V], got {}", shape_str(logits.shape()));
    }
    if targets.numel() != n {
        bail!(
            "{op}: targets {} must have one entry per logits row (logits {})",
            shape_str(targets.shape()),
            shape_str(logits.shape())
        );
    }
    if n * v > u32::MAX as usize - 256 {
        bail!("{op}: logits {} too large for one launch", shape_str(logits.shape()));
    }
    if !(opts.tau > 0.0 && opts.tau.is_finite()) {
        bail!("{op}: tau must be finite and > 0, got {} (logits {})", opts.tau, shape_str(logits.shape()));
    }
    let mode = match opts.mask {
        None => 0,
        Some(m) => {
            check::dtype(op, "mask", m, DType::F32)?;
            check::same_device(op, &[logits, m])?;
            if m.numel() == v && m.rank() == 1 {
                1
            } else if m.numel() == n * v && m.last_dim() == v {
                2
            } else {
                bail!(
                    "{op}: mask {} must be [V] or [N, V] for logits {}",
                    shape_str(m.shape()),
                    shape_str(logits.shape())
                );
            }
        }
    };
    Ok((n, v, mode))
}

fn params(n: usize, v: usize, opts: &CrossEntropyOpts, mode: u32) -> Params {
    Params::new().u(n).u(v).i(opts.ignore_index).u(mode as usize).f(1.0 / opts.tau)
}

/// Cross-entropy of `logits` (f32 `[N, V]`, or `[.., V]` flattened to rows)
/// against `targets` (I32, N entries): per-row losses and their mean over
/// non-ignored rows, both on the GPU.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, opts: &CrossEntropyOpts) -> Result<CrossEntropy> {
    const OP: &str = "cross_entropy";
    let (n, v, mode) = validate(OP, logits, targets, opts)?;
    let gpu = logits.gpu();
    let loss_rows = Tensor::empty(gpu, &[n], DType::F32)?;
    let lse = Tensor::empty(gpu, &[n], DType::F32)?;
    let loss = Tensor::empty(gpu, &[1], DType::F32)?;
    let count = Tensor::empty(gpu, &[1], DType::F32)?;
    let mask = opts.mask.unwrap_or(logits);
    let p = params(n, v, opts, mode);
    gpu.dispatch(
        &k_rows(),
        p.bytes(),
        &[logits.buffer(), targets.buffer(), mask.buffer(), loss_rows.buffer(), lse.buffer()],
        grid(n as u32),
    )?;
    gpu.dispatch(
        &k_mean(),
        p.bytes(),
        &[loss_rows.buffer(), targets.buffer(), loss.buffer(), count.buffer()],
        [1, 1, 1],
    )?;
    Ok(CrossEntropy { loss_rows, loss, lse, count })
}

/// Gradient of the mean loss (`fwd.loss`) with respect to `logits`, times
/// `dloss` (`[1]` f32 upstream gradient; `None` = 1): `dlogits[r] = dloss / (tau
/// * count) * (softmax(z_r) - onehot(target_r))`, zero on ignored rows. `fwd`
/// must come from `cross_entropy` on the same inputs and options.
pub fn cross_entropy_backward(
    logits: &Tensor,
    targets: &Tensor,
    fwd: &CrossEntropy,
    opts: &CrossEntropyOpts,
    dloss: Option<&Tensor>,
) -> Result<Tensor> {
    const OP: &str = "cross_entropy_backward";
    let (n, v, mode) = validate(OP, logits, targets, opts)?;
    if fwd.lse.numel() != n || fwd.count.numel() != 1 {
        bail!(
            "{OP}: forward results (lse {}) do not match logits {}",
            shape_str(fwd.lse.shape()),
            shape_str(logits.shape())
        );
    }
    let gpu = logits.gpu();
    let one;
    let dloss = match dloss {
        Some(d) => {
            check::dtype(OP, "dloss", d, DType::F32)?;
            if d.numel() != 1 {
                bail!("{OP}: dloss must have one element, got {}", shape_str(d.shape()));
            }
            d
        }
        None => {
            one = Tensor::scalar(gpu, 1.0)?;
            &one
        }
    };
    let dlogits = Tensor::empty(gpu, logits.shape(), DType::F32)?;
    let mask = opts.mask.unwrap_or(logits);
    let blocks = div_ceil(v, 256) as usize;
    gpu.dispatch(
        &k_backward(),
        params(n, v, opts, mode).bytes(),
        &[
            logits.buffer(),
            targets.buffer(),
            mask.buffer(),
            fwd.lse.buffer(),
            fwd.count.buffer(),
            dloss.buffer(),
            dlogits.buffer(),
        ],
        grid(u32::try_from(n * blocks)?),
    )?;
    Ok(dlogits)
}

/// CPU reference (f64): per-row losses and their mean over non-ignored rows.
/// `mask` is `[V]` or `[N, V]` (told apart by length).
pub fn cross_entropy_ref(
    logits: &[f64],
    n: usize,
    v: usize,
    targets: &[i32],
    ignore: i32,
    tau: f64,
    mask: Option<&[f64]>,
) -> (Vec<f64>, f64) {
    let mut rows = vec![0.0; n];
    let mut count = 0usize;
    for r in 0..n {
        if targets[r] == ignore {
            continue;
        }
        count += 1;
        let z: Vec<f64> = (0..v)
            .map(|j| {
                let mk = match mask {
                    None => 0.0,
                    Some(m) if m.len() == v => m[j],
                    Some(m) => m[r * v + j],
                };
                logits[r * v + j] / tau + mk
            })
            .collect();
        let mx = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = mx + z.iter().map(|&x| (x - mx).exp()).sum::<f64>().ln();
        rows[r] = lse - z[targets[r] as usize];
    }
    let mean = rows.iter().sum::<f64>() / count.max(1) as f64;
    (rows, mean)
}

/// CPU reference of the analytic gradient of the mean loss (f64).
pub fn cross_entropy_backward_ref(
    logits: &[f64],
    n: usize,
    v: usize,
    targets: &[i32],
    ignore: i32,
    tau: f64,
    mask: Option<&[f64]>,
) -> Vec<f64> {
    let count = targets.iter().filter(|&&t| t != ignore).count().max(1) as f64;
    let mut g = vec![0.0; n * v];
    for r in 0..n {
        if targets[r] == ignore {
            continue;
        }
        let z: Vec<f64> = (0..v)
            .map(|j| {
                let mk = match mask {
                    None => 0.0,
                    Some(m) if m.len() == v => m[j],
                    Some(m) => m[r * v + j],
                };
                logits[r * v + j] / tau + mk
            })
            .collect();
        let mx = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = z.iter().map(|&x| (x - mx).exp()).sum();
        for j in 0..v {
            let p = (z[j] - mx).exp() / s - if j == targets[r] as usize { 1.0 } else { 0.0 };
            g[r * v + j] = p / (tau * count);
        }
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::Gpu;
    use crate::ops::testing::{assert_close, finite_diff, rand_vec};
    use rand::{Rng, SeedableRng};

    fn to64(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&v| v as f64).collect()
    }
    fn to32(x: &[f64]) -> Vec<f32> {
        x.iter().map(|&v| v as f32).collect()
    }
    /// Targets in [0, v), with roughly `ignore_frac` of rows set to -100.
    fn rand_targets(seed: u64, n: usize, v: usize, ignore_frac: f64) -> Vec<i32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| if rng.gen::<f64>() < ignore_frac { -100 } else { rng.gen_range(0..v as i32) }).collect()
    }

    /// Forward (rows + mean) and backward against the f64 references.
    fn check_case(n: usize, v: usize, tau: f32, mask: Option<(Vec<f32>, Vec<usize>)>, seed: u64) {
        let gpu = Gpu::shared().unwrap();
        let logits = rand_vec(seed, n * v, 4.0);
        let mut targets = rand_targets(seed + 1, n, v, 0.25);
        let mask_t = mask.as_ref().map(|(m, shape)| Tensor::from_f32(&gpu, m, shape).unwrap());
        let mask64 = mask.as_ref().map(|(m, _)| to64(m));
        if let Some(m) = &mask64 {
            // Keep targets on allowed tokens.
            for (r, t) in targets.iter_mut().enumerate() {
                if *t >= 0 {
                    let allowed = |j: usize| if m.len() == v { m[j] } else { m[r * v + j] } > -1e8;
                    *t = (0..v).map(|k| (*t as usize + k) % v).find(|&j| allowed(j)).unwrap() as i32;
                }
            }
        }
        let lt = Tensor::from_f32(&gpu, &logits, &[n, v]).unwrap();
        let tt = Tensor::from_i32(&gpu, &targets, &[n]).unwrap();
        let opts = CrossEntropyOpts { ignore_index: -100, tau, mask: mask_t.as_ref() };
        let out = cross_entropy(&lt, &tt, &opts).unwrap();
        let l64 = to64(&logits);
        let (rows, mean) = cross_entropy_ref(&l64, n, v, &targets, -100, tau as f64, mask64.as_deref());
        let what = format!("cross_entropy n={n} v={v} tau={tau} mask={}", mask.is_some());
        assert_close(&format!("{what} rows"), &out.loss_rows.to_vec_f32().unwrap(), &to32(&rows), 2e-5, 2e-5);
        assert_close(&format!("{what} mean"), &[out.loss.to_scalar().unwrap()], &[mean as f32], 2e-5, 2e-5);
        let dl = Tensor::scalar(&gpu, 0.75).unwrap();
        let g = cross_entropy_backward(&lt, &tt, &out, &opts, Some(&dl)).unwrap();
        assert_eq!(g.shape(), &[n, v]);
        let want: Vec<f32> = cross_entropy_backward_ref(&l64, n, v, &targets, -100, tau as f64, mask64.as_deref())
            .iter()
            .map(|&x| (0.75 * x) as f32)
            .collect();
        assert_close(&format!("{what} dlogits"), &g.to_vec_f32().unwrap(), &want, 1e-4, 1e-7);
    }

    #[test]
    fn matches_cpu_at_awkward_sizes() {
        for (k, &(n, v)) in [(1usize, 1usize), (7, 33), (33, 257), (5, 1000), (3, 7)].iter().enumerate() {
            check_case(n, v, 1.0, None, 10 + k as u64);
        }
    }

    #[test]
    fn large_vocabulary_rows() {
        // SmolLM2's vocabulary: 49,152 columns per row.
        check_case(3, 49_152, 1.0, None, 20);
        check_case(2, 33_100, 0.5, None, 21);
    }

    #[test]
    fn more_rows_than_one_grid_dimension() {
        // 70,000 rows > 65,535 workgroups: the row grid folds into y.
        check_case(70_000, 2, 1.0, None, 25);
    }

    #[test]
    fn temperature_and_masks() {
        let v = 257;
        // [V] mask with -inf and -1e9 entries.
        let vm: Vec<f32> = (0..v)
            .map(|j| {
                if j % 3 == 0 {
                    f32::NEG_INFINITY
                } else if j % 7 == 0 {
                    -1e9
                } else {
                    0.0
                }
            })
            .collect();
        check_case(9, v, 0.3, Some((vm, vec![v])), 30);
        // [N, V] mask mixing penalties and bans.
        let n = 7;
        let nm: Vec<f32> = rand_vec(31, n * v, 1.0).iter().map(|&x| if x > 0.6 { -1e9 } else { x }).collect();
        check_case(n, v, 2.0, Some((nm, vec![n, v])), 32);
    }

    #[test]
    fn ignored_rows_and_all_ignored_batch() {
        let gpu = Gpu::shared().unwrap();
        let (n, v) = (4, 9);
        let logits = Tensor::from_f32(&gpu, &rand_vec(40, n * v, 3.0), &[n, v]).unwrap();
        let targets = Tensor::from_i32(&gpu, &[-1; 4], &[n]).unwrap();
        let opts = CrossEntropyOpts { ignore_index: -1, ..Default::default() };
        let out = cross_entropy(&logits, &targets, &opts).unwrap();
        assert_eq!(out.loss.to_scalar().unwrap(), 0.0);
        assert_eq!(out.count.to_scalar().unwrap(), 0.0);
        assert_eq!(out.loss_rows.to_vec_f32().unwrap(), vec![0.0; n]);
        let g = cross_entropy_backward(&logits, &targets, &out, &opts, None).unwrap().to_vec_f32().unwrap();
        assert_eq!(g, vec![0.0; n * v]);
        // A custom ignore index: rows with target 5 are ignored, target -100 is not special.
        let t2 = Tensor::from_i32(&gpu, &[5, 2, 5, 0], &[n]).unwrap();
        let opts5 = CrossEntropyOpts { ignore_index: 5, ..Default::default() };
        let out = cross_entropy(&logits, &t2, &opts5).unwrap();
        assert_eq!(out.count.to_scalar().unwrap(), 2.0);
        let rows = out.loss_rows.to_vec_f32().unwrap();
        assert!(rows[0] == 0.0 && rows[2] == 0.0 && rows[1] > 0.0 && rows[3] > 0.0);
        let g = cross_entropy_backward(&logits, &t2, &out, &opts5, None).unwrap().to_vec_f32().unwrap();
        assert!(g[..v].iter().all(|&x| x == 0.0) && g[2 * v..3 * v].iter().all(|&x| x == 0.0));
        assert!((g[v..2 * v].iter().sum::<f32>()).abs() < 1e-6); // softmax - onehot sums to 0
    }

    #[test]
    fn invalid_target_gives_nan_loss_without_oob_reads() {
        let gpu = Gpu::shared().unwrap();
        let logits = Tensor::from_f32(&gpu, &rand_vec(41, 2 * 5, 1.0), &[2, 5]).unwrap();
        let targets = Tensor::from_i32(&gpu, &[1, 5], &[2]).unwrap();
        let opts = CrossEntropyOpts::default();
        let out = cross_entropy(&logits, &targets, &opts).unwrap();
        let rows = out.loss_rows.to_vec_f32().unwrap();
        assert!(rows[0].is_finite() && rows[1].is_nan(), "{rows:?}");
        assert!(out.loss.to_scalar().unwrap().is_nan());
        let g = cross_entropy_backward(&logits, &targets, &out, &opts, None).unwrap().to_vec_f32().unwrap();
        assert!(g[5..].iter().all(|&x| x == 0.0));
    }

    #[test]
    fn backward_matches_finite_differences() {
        let gpu = Gpu::shared().unwrap();
        let (n, v, tau) = (5, 13, 0.7f32);
        let logits = rand_vec(50, n * v, 2.0);
        let targets = vec![3, -100, 0, 12, 7];
        let mask: Vec<f32> = (0..v).map(|j| if j == 5 { f32::NEG_INFINITY } else { 0.1 * j as f32 }).collect();
        let lt = Tensor::from_f32(&gpu, &logits, &[n, v]).unwrap();
        let tt = Tensor::from_i32(&gpu, &targets, &[n]).unwrap();
        let mt = Tensor::from_f32(&gpu, &mask, &[v]).unwrap();
        let opts = CrossEntropyOpts { ignore_index: -100, tau, mask: Some(&mt) };
        let out = cross_entropy(&lt, &tt, &opts).unwrap();
        let dl = Tensor::scalar(&gpu, -1.3).unwrap();
        let got = cross_entropy_backward(&lt, &tt, &out, &opts, Some(&dl)).unwrap().to_vec_f32().unwrap();
        let m64 = to64(&mask);
        let want =
            finite_diff(&logits, 1e-4, |x| -1.3 * cross_entropy_ref(x, n, v, &targets, -100, tau as f64, Some(&m64)).1);
        assert_close("cross_entropy dlogits (FD)", &got, &want, 1e-3, 1e-5);
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_op() {
        let gpu = Gpu::shared().unwrap();
        let logits = Tensor::from_f32(&gpu, &[0.0; 12], &[3, 4]).unwrap();
        let t3 = Tensor::from_i32(&gpu, &[0; 3], &[3]).unwrap();
        let t2 = Tensor::from_i32(&gpu, &[0; 2], &[2]).unwrap();
        let tu = Tensor::from_u32(&gpu, &[0; 3], &[3]).unwrap();
        let d = CrossEntropyOpts::default();
        let e = cross_entropy(&logits, &t2, &d).unwrap_err().to_string();
        assert!(e.contains("cross_entropy") && e.contains("[2]") && e.contains("[3, 4]"), "{e}");
        let e = cross_entropy(&logits, &tu, &d).unwrap_err().to_string();
        assert!(e.contains("cross_entropy") && e.contains("targets"), "{e}");
        let bad_mask = Tensor::from_f32(&gpu, &[0.0; 5], &[5]).unwrap();
        let e = cross_entropy(&logits, &t3, &CrossEntropyOpts { mask: Some(&bad_mask), ..d }).unwrap_err().to_string();
        assert!(e.contains("cross_entropy") && e.contains("mask [5]"), "{e}");
        let e = cross_entropy(&logits, &t3, &CrossEntropyOpts { tau: 0.0, ..d }).unwrap_err().to_string();
        assert!(e.contains("cross_entropy") && e.contains("tau"), "{e}");
        let out = cross_entropy(&logits, &t3, &d).unwrap();
        let other = Tensor::from_f32(&gpu, &[0.0; 8], &[2, 4]).unwrap();
        let e = cross_entropy_backward(&other, &t2, &out, &d, None).unwrap_err().to_string();
        assert!(e.contains("cross_entropy_backward"), "{e}");
        let e = cross_entropy_backward(&logits, &t3, &out, &d, Some(&logits)).unwrap_err().to_string();
        assert!(e.contains("cross_entropy_backward") && e.contains("dloss"), "{e}");
    }
}
