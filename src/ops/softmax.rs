//! Softmax and log-softmax over the last axis (`shaders/softmax.wgsl`),
//! forward and backward. f32, any shape `[..., C]` treated as `[rows, C]`.
//!
//! Numerically stable: the row max is subtracted (kept online with the sum, so
//! the forward reads each element twice and writes it once). Masked entries may
//! be -inf or a large negative number such as -1e30. A row whose entries are
//! *all* -inf is defined to give zeros from both `softmax` and `log_softmax`
//! (no distribution; finite, so a zero-weighted loss on it stays finite). The
//! backward of such a row is only meaningful with `dy = 0` there (then dx = 0).
//! A row of all -1e30 is an ordinary row: softmax gives the uniform distribution.

use anyhow::Result;

use super::elementwise::grid;
use crate::gpu::{check, DType, Gpu, Kernel, Params, Tensor};

/// Threads per workgroup of the streaming kernels (one workgroup per row).
pub const WG: usize = 64;
/// Largest number of vec4s per thread the register-cached forward keeps (GPUs).
const MAX_PER: usize = 16;
/// The same on CPU adapters, whose workgroups are one SIMD batch of 8 lanes
/// (lavapipe took ~1 minute to compile the 256 variant).
const MAX_PER_CPU: usize = 128;

/// Threads per workgroup of `forward_sg`: one 8-lane subgroup (matmul::SG_LANES).
const SG_WG: usize = 8;

fn kernel(entry: &'static str, wg: usize, per: usize, aligned: bool) -> Kernel {
    let shader = if entry == "forward_sg" { "softmax_sg" } else { "softmax" };
    Kernel::new("softmax", shader, entry)
        .define("WG", format!("{wg}u"))
        .define("ALIGNED", aligned)
        .define("PER", format!("{per}u"))
}

#[cfg(test)]
thread_local! {
    /// Tests force the CPU (`Some(true)`) or GPU (`Some(false)`) row shapes.
    pub(crate) static FORCE_CPU_SHAPES: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Whether to use the row-kernel shapes tuned for CPU adapters (lavapipe):
/// there shared memory and barriers cost far more than registers, so a row is
/// handled by 8 threads (one SIMD batch) holding up to 128 vec4s each.
pub(crate) fn cpu_shapes(gpu: &Gpu) -> bool {
    #[cfg(test)]
    if let Some(v) = FORCE_CPU_SHAPES.with(|f| f.get()) {
        return v;
    }
    gpu.is_cpu()
}

/// Workgroup size and vec4s per thread of the register-cached forward for rows
/// of `cols` elements, or `None` when the row is too long to keep in registers.
pub(crate) fn cached_shape(cpu: bool, cols: usize) -> Option<(usize, usize)> {
    let c4 = cols.div_ceil(4);
    if cpu {
        let per = c4.div_ceil(8).next_power_of_two();
        return (per <= MAX_PER_CPU).then_some((8, per));
    }
    let wg = c4.next_power_of_two().clamp(32, 128);
    let per = c4.div_ceil(wg).next_power_of_two();
    (per <= MAX_PER).then_some((wg, per))
}

/// (workgroup size, vec4s per thread) of every register-cached variant.
pub(crate) fn cached_variants() -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    for (wgs, max_per) in [(&[32usize, 64, 128][..], MAX_PER), (&[8][..], MAX_PER_CPU)] {
        for &wg in wgs {
            let mut per = 1;
            while per <= max_per {
                v.push((wg, per));
                per *= 2;
            }
        }
    }
    v
}

/// Every kernel variant in this family.
pub fn kernels() -> Vec<Kernel> {
    let mut v = Vec::new();
    for aligned in [true, false] {
        v.push(kernel("forward", WG, 1, aligned));
        v.push(kernel("backward", WG, 1, aligned));
        v.push(kernel("forward_sg", SG_WG, 1, aligned));
        for (wg, per) in cached_variants() {
            v.push(kernel("forward_cached", wg, per, aligned));
        }
    }
    v
}

fn check_f32(op: &str, ts: &[(&str, &Tensor)]) -> Result<()> {
    check::nonempty(op, ts)?;
    for (name, t) in ts {
        check::dtype(op, name, t, DType::F32)?;
    }
    for w in ts.windows(2) {
        check::same_shape(op, w[0], w[1])?;
    }
    check::same_device(op, &ts.iter().map(|t| t.1).collect::<Vec<_>>())
}

fn params(t: &Tensor, op: usize) -> Params {
    Params::new().u(t.rows()).u(t.last_dim()).u(op).f(f32::NEG_INFINITY)
}

fn forward(name: &str, x: &Tensor, op: usize) -> Result<Tensor> {
    check_f32(name, &[("x", x)])?;
    let y = Tensor::empty(x.gpu(), x.shape(), DType::F32)?;
    let aligned = x.last_dim().is_multiple_of(4);
    let k = if cpu_shapes(x.gpu()) && crate::ops::matmul::subgroup_kernel_ok(x.gpu()) {
        // CPU adapter with 8-lane subgroups: one subgroup per row, no barriers.
        kernel("forward_sg", SG_WG, 1, aligned)
    } else {
        match cached_shape(cpu_shapes(x.gpu()), x.last_dim()) {
            Some((wg, per)) => kernel("forward_cached", wg, per, aligned),
            None => kernel("forward", WG, 1, aligned),
        }
    };
    x.gpu().dispatch(&k, params(x, op).bytes(), &[x.buffer(), y.buffer()], grid(x.rows()))?;
    Ok(y)
}

fn backward(name: &str, y: &Tensor, dy: &Tensor, op: usize) -> Result<Tensor> {
    check_f32(name, &[("y", y), ("dy", dy)])?;
    let dx = Tensor::empty(y.gpu(), y.shape(), DType::F32)?;
    let k = kernel("backward", WG, 1, y.last_dim().is_multiple_of(4));
    y.gpu().dispatch(&k, params(y, op).bytes(), &[y.buffer(), dy.buffer(), dx.buffer()], grid(y.rows()))?;
    Ok(dx)
}

/// `y = softmax(x)` over the last axis.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    forward("softmax", x, 0)
}

/// `y = log_softmax(x) = x - logsumexp(x)` over the last axis.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    forward("log_softmax", x, 1)
}

/// Backward of `softmax` from its output `y`: `dx = y * (dy - sum(y * dy))` per row.
pub fn softmax_backward(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    backward("softmax_backward", y, dy, 0)
}

/// Backward of `log_softmax` from its output `y`: `dx = dy - exp(y) * sum(dy)` per row.
pub fn log_softmax_backward(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    backward("log_softmax_backward", y, dy, 1)
}

/// CPU reference (f64 per row) of softmax (`log = false`) or log-softmax over
/// rows of length `cols`, with the all -inf row convention above.
pub fn softmax_ref(x: &[f32], cols: usize, log: bool) -> Vec<f32> {
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    softmax_ref64(&x64, cols, log).iter().map(|&v| v as f32).collect()
}

fn softmax_ref64(x: &[f64], cols: usize, log: bool) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(cols) {
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        if m == f64::NEG_INFINITY {
            out.extend(std::iter::repeat_n(0.0, cols));
            continue;
        }
        let s: f64 = row.iter().map(|&v| (v - m).exp()).sum();
        for &v in row {
            out.push(if log { v - m - s.ln() } else { (v - m).exp() / s });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::Gpu;
    use crate::ops::testing::{assert_close, finite_diff, rand_vec};

    fn gpu() -> Gpu {
        Gpu::shared().unwrap()
    }

    #[test]
    fn forward_matches_reference() {
        for cpu in [false, true] {
            FORCE_CPU_SHAPES.with(|f| f.set(Some(cpu)));
            forward_matches_reference_with();
        }
    }

    fn forward_matches_reference_with() {
        let g = gpu();
        for (rows, cols) in [(1, 1), (3, 7), (2, 33), (5, 257), (2, 4099), (4, 64), (1, 4096)] {
            let x = rand_vec((rows * cols) as u64, rows * cols, 8.0);
            let t = Tensor::from_f32(&g, &x, &[rows, cols]).unwrap();
            let y = softmax(&t).unwrap().to_vec_f32().unwrap();
            assert_close(&format!("softmax {rows}x{cols}"), &y, &softmax_ref(&x, cols, false), 1e-5, 1e-7);
            let l = log_softmax(&t).unwrap().to_vec_f32().unwrap();
            assert_close(&format!("log_softmax {rows}x{cols}"), &l, &softmax_ref(&x, cols, true), 1e-5, 1e-5);
        }
    }

    #[test]
    fn kernel_choice_covers_cached_and_streaming() {
        assert_eq!(cached_shape(false, 1), Some((32, 1)));
        assert_eq!(cached_shape(false, 4096), Some((128, 8)));
        assert_eq!(cached_shape(false, 8192), Some((128, 16)));
        assert_eq!(cached_shape(false, 9000), None); // tested above through the streaming kernel
        assert_eq!(cached_shape(true, 4096), Some((8, 128)));
        assert_eq!(cached_shape(true, 4097), None);
        for cpu in [false, true] {
            for cols in [1, 7, 33, 257, 4096] {
                assert!(cached_variants().contains(&cached_shape(cpu, cols).unwrap()));
            }
        }
    }

    #[test]
    fn large_and_masked_values() {
        for cpu in [false, true] {
            FORCE_CPU_SHAPES.with(|f| f.set(Some(cpu)));
            large_and_masked_values_with();
        }
    }

    fn large_and_masked_values_with() {
        let g = gpu();
        let ninf = f32::NEG_INFINITY;
        for cols in [7usize, 8, 33, 9001] {
            let mut x = rand_vec(cols as u64, 4 * cols, 3.0);
            // row 0: huge offsets (overflow without max subtraction)
            for v in &mut x[..cols] {
                *v += 1000.0;
            }
            // row 1: all -inf but one; row 2: all -1e30 but one; row 3: all -inf.
            for c in 0..cols {
                if c != cols / 2 {
                    x[cols + c] = ninf;
                    x[2 * cols + c] = -1e30;
                }
                x[3 * cols + c] = ninf;
            }
            let t = Tensor::from_f32(&g, &x, &[4, cols]).unwrap();
            let y = softmax(&t).unwrap().to_vec_f32().unwrap();
            assert!(y.iter().all(|v| v.is_finite()), "softmax non-finite: {y:?}");
            assert_close("softmax masked", &y, &softmax_ref(&x, cols, false), 1e-5, 1e-7);
            assert_eq!(y[cols + cols / 2], 1.0);
            assert_eq!(&y[3 * cols..], &vec![0.0; cols][..], "all-masked row must give zeros");
            let l = log_softmax(&t).unwrap().to_vec_f32().unwrap();
            assert!(l.iter().all(|v| !v.is_nan()), "log_softmax NaN: {l:?}");
            assert_close("log_softmax masked", &l, &softmax_ref(&x, cols, true), 1e-5, 1e-5);
            // Backward of the masked rows stays finite (dy = 0 on the all-masked row).
            let mut dy = rand_vec(9, 4 * cols, 1.0);
            dy[3 * cols..].iter_mut().for_each(|v| *v = 0.0);
            let tdy = Tensor::from_f32(&g, &dy, &[4, cols]).unwrap();
            let ty = Tensor::from_f32(&g, &y, &[4, cols]).unwrap();
            let dx = softmax_backward(&ty, &tdy).unwrap().to_vec_f32().unwrap();
            assert!(dx.iter().all(|v| v.is_finite()));
            let tl = Tensor::from_f32(&g, &l, &[4, cols]).unwrap();
            let dx = log_softmax_backward(&tl, &tdy).unwrap().to_vec_f32().unwrap();
            assert!(dx.iter().all(|v| v.is_finite()));
            assert_eq!(&dx[3 * cols..], &vec![0.0; cols][..]);
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let g = gpu();
        for (rows, cols) in [(1, 1), (3, 7), (2, 33), (2, 64), (1, 257)] {
            let n = rows * cols;
            let x = rand_vec(n as u64 + 1, n, 3.0);
            let dy = rand_vec(n as u64 + 2, n, 1.0);
            let tx = Tensor::from_f32(&g, &x, &[rows, cols]).unwrap();
            let tdy = Tensor::from_f32(&g, &dy, &[rows, cols]).unwrap();
            for log in [false, true] {
                let y = if log { log_softmax(&tx) } else { softmax(&tx) }.unwrap();
                let dx = if log { log_softmax_backward(&y, &tdy) } else { softmax_backward(&y, &tdy) };
                let dx = dx.unwrap().to_vec_f32().unwrap();
                let fd = finite_diff(&x, 1e-4, |xs| {
                    softmax_ref64(xs, cols, log).iter().zip(&dy).map(|(a, &b)| a * b as f64).sum()
                });
                assert_close(
                    &format!("{} backward {rows}x{cols}", if log { "log_softmax" } else { "softmax" }),
                    &dx,
                    &fd,
                    1e-3,
                    1e-5,
                );
            }
        }
    }

    #[test]
    fn bad_inputs_name_the_op() {
        let g = gpu();
        let a = Tensor::from_f32(&g, &[0.0; 6], &[2, 3]).unwrap();
        let b = Tensor::from_f32(&g, &[0.0; 6], &[3, 2]).unwrap();
        let e = softmax_backward(&a, &b).unwrap_err().to_string();
        assert!(e.contains("softmax_backward") && e.contains("[2, 3]") && e.contains("[3, 2]"), "{e}");
        assert!(log_softmax_backward(&a, &b).unwrap_err().to_string().contains("log_softmax_backward"));
        let u = Tensor::from_u32(&g, &[1; 6], &[2, 3]).unwrap();
        assert!(softmax(&u).unwrap_err().to_string().contains("softmax"));
        let empty = Tensor::empty(&g, &[3, 0], DType::F32).unwrap();
        assert!(log_softmax(&empty).unwrap_err().to_string().contains("log_softmax"));
    }
}
