//! Balanced assignment by Sinkhorn-Knopp, in the log domain in f32 on the GPU.
//! WGSL: `shaders/sinkhorn.wgsl`.
//!
//! The algorithm is LETTER's (inherited from LC-Rec's `sinkhorn_algorithm`,
//! which runs in f64): optionally min-max centre the cost `[n, kc]` to [-1, 1]
//! (`center_distance_for_constraint`), `Q = exp(-cost / eps)`, `Q /= sum(Q)`,
//! then `iters` times: normalise rows to sum 1/n, then columns to sum 1/kc;
//! finally `Q *= n` (columns sum to n/kc, rows to ~1), and the assignment is the
//! row argmax. With eps = 0.003 the exponents span about +-333, beyond f32's
//! exp range, so this version keeps log-potentials (`log Q = lk + u + v`) and
//! normalises with two-pass log-sum-exp; see the shader for the layout. The
//! initial global normalisation is a constant factor that the first row
//! normalisation cancels, so it is skipped.

use anyhow::{bail, Result};

use super::{check_finite, fold_grid, matrix};
use crate::gpu::{shape_str, DType, Kernel, Params, Tensor};

const WG: usize = 64;

fn kernel(entry: &'static str) -> Kernel {
    Kernel::new("sinkhorn", "sinkhorn", entry).define("WG", format!("{WG}u"))
}

/// Kernel variants for naga validation.
pub fn kernels() -> Vec<Kernel> {
    ["minmax", "logk", "rows", "cols", "plan", "argmax"].into_iter().map(kernel).collect()
}

/// Sinkhorn options.
#[derive(Clone, Copy, Debug)]
pub struct SinkhornOpts {
    /// Entropic regularisation (temperature of `exp(-cost / epsilon)`).
    pub epsilon: f32,
    /// Number of (row, column) normalisation rounds.
    pub iters: usize,
    /// Min-max centre the cost to [-1, 1] first, as LETTER does.
    pub center: bool,
}

impl SinkhornOpts {
    /// LETTER's last-level settings: eps = 0.003, 50 iterations, centred cost.
    pub fn letter() -> SinkhornOpts {
        SinkhornOpts { epsilon: 0.003, iters: 50, center: true }
    }
}

/// Output of [`sinkhorn`]: `assign: U32 [n]` (row argmax of the plan) and,
/// when asked for, `plan: F32 [n, kc]` (columns sum to n/kc, rows to ~1).
#[derive(Debug)]
pub struct SinkhornOut {
    pub plan: Option<Tensor>,
    pub assign: Tensor,
}

/// Run log-domain Sinkhorn on `cost: [n, kc]`. Checks the cost for NaN/inf
/// (one small readback); everything else is recorded without syncing.
pub fn sinkhorn(cost: &Tensor, opts: SinkhornOpts, want_plan: bool) -> Result<SinkhornOut> {
    let op = "sinkhorn";
    let (n, kc) = matrix(op, "cost", cost)?;
    if !(opts.epsilon > 0.0 && opts.epsilon.is_finite()) {
        bail!("{op}: epsilon must be positive and finite, got {} (cost {})", opts.epsilon, shape_str(cost.shape()));
    }
    if opts.iters == 0 {
        bail!("{op}: iters must be at least 1 (cost {})", shape_str(cost.shape()));
    }
    check_finite(op, "cost", cost)?;
    let gpu = cost.gpu();
    let mm = Tensor::zeros(gpu, &[2], DType::F32)?;
    let lk = Tensor::empty(gpu, &[n, kc], DType::F32)?;
    let u = Tensor::empty(gpu, &[n], DType::F32)?;
    let v = Tensor::zeros(gpu, &[kc], DType::F32)?;
    let (rgrid, rgx) = fold_grid(n.div_ceil(WG));
    let (cgrid, cgx) = fold_grid(kc.div_ceil(WG));
    let params = |gx: usize| Params::new().u(n).u(kc).f(1.0 / opts.epsilon).u(opts.center as usize).u(gx);
    if opts.center {
        gpu.dispatch(&kernel("minmax"), params(1).bytes(), &[cost.buffer(), mm.buffer()], [1, 1, 1])?;
    }
    gpu.dispatch(&kernel("logk"), params(rgx).bytes(), &[cost.buffer(), mm.buffer(), lk.buffer()], rgrid)?;
    let pot = [lk.buffer(), u.buffer(), v.buffer()];
    for _ in 0..opts.iters {
        gpu.dispatch(&kernel("rows"), params(rgx).bytes(), &pot, rgrid)?;
        gpu.dispatch(&kernel("cols"), params(cgx).bytes(), &pot, cgrid)?;
    }
    let assign = Tensor::empty(gpu, &[n], DType::U32)?;
    gpu.dispatch(&kernel("argmax"), params(rgx).bytes(), &[pot[0], pot[1], pot[2], assign.buffer()], rgrid)?;
    let plan = if want_plan {
        let plan = Tensor::empty(gpu, &[n, kc], DType::F32)?;
        let (pgrid, pgx) = fold_grid((n * kc).div_ceil(WG));
        gpu.dispatch(&kernel("plan"), params(pgx).bytes(), &[pot[0], pot[1], pot[2], plan.buffer()], pgrid)?;
        Some(plan)
    } else {
        None
    };
    Ok(SinkhornOut { plan, assign })
}

/// LETTER's min-max centring in f64: (c - middle) / (max - middle + 1e-5).
fn centre_cpu(cost: &[f32], center: bool) -> Vec<f64> {
    let c: Vec<f64> = cost.iter().map(|&v| v as f64).collect();
    if !center {
        return c;
    }
    let lo = c.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = c.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let middle = (hi + lo) / 2.0;
    let amp = hi - middle + 1e-5;
    c.iter().map(|&v| (v - middle) / amp).collect()
}

/// CPU reference, a direct f64 transcription of LC-Rec's `sinkhorn_algorithm`
/// (exp, then alternating normalisations). Overflows/underflows where
/// `cost / eps` leaves f64's exp range (|x| > ~700). Returns the plan `[n, kc]`.
pub fn sinkhorn_cpu_naive(cost: &[f32], n: usize, kc: usize, opts: SinkhornOpts) -> Vec<f64> {
    let c = centre_cpu(cost, opts.center);
    let eps = opts.epsilon as f64;
    let mut q: Vec<f64> = c.iter().map(|&v| (-v / eps).exp()).collect();
    let total: f64 = q.iter().sum();
    q.iter_mut().for_each(|v| *v /= total);
    for _ in 0..opts.iters {
        for i in 0..n {
            let s: f64 = q[i * kc..(i + 1) * kc].iter().sum();
            q[i * kc..(i + 1) * kc].iter_mut().for_each(|v| *v /= s * n as f64);
        }
        for j in 0..kc {
            let s: f64 = (0..n).map(|i| q[i * kc + j]).sum();
            (0..n).for_each(|i| q[i * kc + j] /= s * kc as f64);
        }
    }
    q.iter_mut().for_each(|v| *v *= n as f64);
    q
}

/// CPU reference of the same algorithm in the log domain in f64 (valid for any
/// cost range). Returns the plan `[n, kc]`.
pub fn sinkhorn_cpu(cost: &[f32], n: usize, kc: usize, opts: SinkhornOpts) -> Vec<f64> {
    let c = centre_cpu(cost, opts.center);
    let eps = opts.epsilon as f64;
    let lk: Vec<f64> = c.iter().map(|&v| -v / eps).collect();
    let lse = |vals: &mut dyn Iterator<Item = f64>| {
        let vals: Vec<f64> = vals.collect();
        let m = vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        m + vals.iter().map(|&x| (x - m).exp()).sum::<f64>().ln()
    };
    let mut u = vec![0f64; n];
    let mut v = vec![0f64; kc];
    for _ in 0..opts.iters {
        for i in 0..n {
            u[i] = -(n as f64).ln() - lse(&mut (0..kc).map(|j| lk[i * kc + j] + v[j]));
        }
        for j in 0..kc {
            v[j] = -(kc as f64).ln() - lse(&mut (0..n).map(|i| lk[i * kc + j] + u[i]));
        }
    }
    (0..n * kc).map(|t| (lk[t] + u[t / kc] + v[t % kc] + (n as f64).ln()).exp()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::Gpu;
    use crate::ops::testing::{assert_close, rand_vec};

    fn run(cost: &[f32], n: usize, kc: usize, opts: SinkhornOpts) -> (Vec<f32>, Vec<u32>, Vec<f64>) {
        let gpu = Gpu::shared().unwrap();
        let ct = Tensor::from_f32(&gpu, cost, &[n, kc]).unwrap();
        let out = sinkhorn(&ct, opts, true).unwrap();
        let plan = out.plan.unwrap().to_vec_f32().unwrap();
        let want = sinkhorn_cpu(cost, n, kc, opts);
        let want32: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        assert_close("plan", &plan, &want32, 0.0, 1e-4);
        // Columns sum to n / kc exactly after the last column normalisation.
        for j in 0..kc {
            let s: f64 = (0..n).map(|i| plan[i * kc + j] as f64).sum();
            let t = n as f64 / kc as f64;
            assert!((s - t).abs() <= 1e-4 * t.max(1.0), "column {j} sums to {s}, want {t}");
        }
        // Argmax agrees with the reference plan except on near-ties.
        let assign = out.assign.to_vec_u32().unwrap();
        for i in 0..n {
            let row = &want[i * kc..(i + 1) * kc];
            let best = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let got = row[assign[i] as usize];
            assert!(got >= best - 1e-4 * best.max(1e-30), "row {i}: argmax {} has {got}, best {best}", assign[i]);
        }
        (plan, assign, want)
    }

    #[test]
    fn log_domain_reference_equals_naive_reference() {
        let (n, kc) = (13, 7);
        let cost = rand_vec(1, n * kc, 1.0);
        for opts in [
            SinkhornOpts { epsilon: 0.1, iters: 30, center: false },
            SinkhornOpts { epsilon: 0.003, iters: 50, center: true },
        ] {
            let a = sinkhorn_cpu(&cost, n, kc, opts);
            let b = sinkhorn_cpu_naive(&cost, n, kc, opts);
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-9 * y.abs().max(1e-12) + 1e-200, "{x} vs {y}");
            }
        }
    }

    #[test]
    fn matches_f64_on_moderate_inputs_and_rows_converge() {
        for &(n, kc) in &[(1, 1), (7, 3), (33, 7), (40, 257)] {
            let cost = rand_vec(n as u64 * 7 + kc as u64, n * kc, 1.0);
            let (plan, _, _) = run(&cost, n, kc, SinkhornOpts { epsilon: 0.5, iters: 200, center: false });
            if n > kc {
                // Rows (1 each) only after convergence; kc | n-balanced problems converge fast.
                for i in 0..n {
                    let s: f32 = plan[i * kc..(i + 1) * kc].iter().sum();
                    assert!((s - 1.0).abs() < 1e-3, "row {i} sums to {s}");
                }
            }
        }
    }

    #[test]
    fn matches_f64_where_f32_exp_overflows() {
        // LETTER's regime: centred distances, eps = 0.003: exponents up to ~667.
        let (n, kc) = (257, 64);
        let x = rand_vec(3, n * 4, 1.0);
        let e = rand_vec(4, kc * 4, 1.0);
        let cost: Vec<f32> =
            (0..n * kc).map(|t| (0..4).map(|q| (x[(t / kc) * 4 + q] - e[(t % kc) * 4 + q]).powi(2)).sum()).collect();
        let (_, assign, _) = run(&cost, n, kc, SinkhornOpts::letter());
        // The balanced assignment spreads rows over many codes.
        let mut used: Vec<u32> = assign.clone();
        used.sort();
        used.dedup();
        assert!(used.len() > kc / 2, "only {} codes used", used.len());

        // Costs spanning 1e3 with eps = 5: exponents up to 200 (f32 exp overflows at 88).
        let (n, kc) = (33, 10);
        let cost: Vec<f32> = rand_vec(5, n * kc, 1.0).iter().map(|v| 500.0 + 500.0 * v).collect();
        assert!(cost.iter().cloned().fold(0f32, f32::max) / 5.0 > 150.0);
        run(&cost, n, kc, SinkhornOpts { epsilon: 5.0, iters: 50, center: false });

        // A column far from every row: its potential must grow to ~1e3/eps.
        let mut cost = rand_vec(6, n * kc, 1.0);
        for i in 0..n {
            cost[i * kc + 4] += 300.0;
        }
        run(&cost, n, kc, SinkhornOpts { epsilon: 1.0, iters: 20, center: false });
    }

    #[test]
    fn bad_inputs_are_errors() {
        let gpu = Gpu::shared().unwrap();
        let mut c = rand_vec(1, 12, 1.0);
        let ok = Tensor::from_f32(&gpu, &c, &[3, 4]).unwrap();
        let e = sinkhorn(&ok, SinkhornOpts { epsilon: 0.0, iters: 5, center: false }, false).unwrap_err().to_string();
        assert!(e.contains("sinkhorn") && e.contains("epsilon") && e.contains("[3, 4]"), "{e}");
        let e = sinkhorn(&ok, SinkhornOpts { epsilon: 0.1, iters: 0, center: false }, false).unwrap_err().to_string();
        assert!(e.contains("iters"), "{e}");
        c[7] = f32::NAN;
        let bad = Tensor::from_f32(&gpu, &c, &[3, 4]).unwrap();
        let e = sinkhorn(&bad, SinkhornOpts::letter(), false).unwrap_err().to_string();
        assert!(e.contains("sinkhorn") && e.contains("non-finite") && e.contains("[3, 4]"), "{e}");
        let empty = Tensor::empty(&gpu, &[0, 4], DType::F32).unwrap();
        assert!(sinkhorn(&empty, SinkhornOpts::letter(), false).unwrap_err().to_string().contains("empty"));
    }
}
