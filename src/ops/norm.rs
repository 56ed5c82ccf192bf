//! RMSNorm (LLaMA) and LayerNorm (BERT) over the last axis
//! (`shaders/norm.wgsl`), forward and backward. f32; `x: [..., C]` is treated
//! as `[rows, C]`; `weight`, `bias: [C]`.
//!
//! The forwards also return the per-row statistics the backwards need
//! (`rstd = 1 / sqrt(mean(x^2) + eps)` or `1 / sqrt(var(x) + eps)`, and the row
//! mean for LayerNorm; `[rows]`). The backwards compute dx per row (one
//! workgroup per row) and dweight / dbias as column sums: one thread per column
//! and segment of `SEG_ROWS` rows writes partial sums `[nseg, C]`, then
//! `reduce::sum` over the segments; no float atomics.

use anyhow::{bail, Result};

use super::elementwise::grid;
use super::reduce;
use super::softmax::{cached_shape, cached_variants, cpu_shapes};
use crate::gpu::{check, div_ceil, shape_str, DType, Kernel, Params, Tensor};

/// Threads per workgroup (row kernels: one workgroup per row).
pub const WG: usize = 64;
/// Rows per partial column sum in the dweight kernel.
const SEG_ROWS: usize = 256;

const RMS: usize = 0;
const LAYER: usize = 1;

/// Rows per workgroup of the register-cached forward when there are many rows
/// (w and b are then read once per this many rows).
const CACHED_ROWS: usize = 8;
/// Threads per workgroup of `forward_sg`: one 8-lane subgroup (matmul::SG_LANES).
const SG_WG: usize = 8;

fn kernel(entry: &'static str, aligned: bool) -> Kernel {
    kernel_sized(entry, WG, 1, 1, aligned)
}

fn kernel_sized(entry: &'static str, wg: usize, per: usize, rows: usize, aligned: bool) -> Kernel {
    // The subgroup kernel lives in its own module (norm_sg.wgsl = norm.wgsl + forward_sg), so
    // adapters without subgroups never compile subgroup built-ins.
    let shader = if entry == "forward_sg" { "norm_sg" } else { "norm" };
    Kernel::new("norm", shader, entry)
        .define("WG", format!("{wg}u"))
        .define("ALIGNED", aligned)
        .define("PER", format!("{per}u"))
        .define("ROWS", format!("{rows}u"))
}

/// The forward for `x` and its grid: register-cached (x read once) when the
/// row fits (same shapes as softmax's), else streaming (x read twice).
fn forward_kernel(x: &Tensor) -> (Kernel, [u32; 3]) {
    let (rows, cols) = (x.rows(), x.last_dim());
    let aligned = cols % 4 == 0;
    if cpu_shapes(x.gpu()) && crate::ops::matmul::subgroup_kernel_ok(x.gpu()) {
        // CPU adapter with 8-lane subgroups: one subgroup per row (faster than the
        // register-cached kernel there: no private arrays, no barriers).
        return (kernel_sized("forward_sg", SG_WG, 1, 1, aligned), grid(rows));
    }
    match cached_shape(cpu_shapes(x.gpu()), cols) {
        Some((wg, per)) => {
            let r = if rows >= 64 * CACHED_ROWS { CACHED_ROWS } else { 1 };
            (kernel_sized("forward_cached", wg, per, r, aligned), grid(rows.div_ceil(r)))
        }
        None => (kernel("forward", aligned), grid(rows)),
    }
}

/// Every kernel variant in this family.
pub fn kernels() -> Vec<Kernel> {
    let mut v = Vec::new();
    for aligned in [true, false] {
        v.push(kernel("forward", aligned));
        v.push(kernel("backward", aligned));
        v.push(kernel_sized("forward_sg", SG_WG, 1, 1, aligned));
        for (wg, per) in cached_variants() {
            for rows in [1, CACHED_ROWS] {
                v.push(kernel_sized("forward_cached", wg, per, rows, aligned));
            }
        }
    }
    v.push(kernel("dweight", false));
    v
}

/// Output of `rms_norm`.
pub struct RmsNormOut {
    /// `[..., C]`, the input's shape.
    pub y: Tensor,
    /// `[rows]`: 1 / sqrt(mean(x^2) + eps).
    pub rstd: Tensor,
}

/// Output of `layer_norm`.
pub struct LayerNormOut {
    /// `[..., C]`, the input's shape.
    pub y: Tensor,
    /// `[rows]`: row means.
    pub mean: Tensor,
    /// `[rows]`: 1 / sqrt(var + eps), biased variance.
    pub rstd: Tensor,
}

/// Gradients of a normalization.
pub struct NormGrads {
    /// `[..., C]`.
    pub dx: Tensor,
    /// `[C]`.
    pub dweight: Tensor,
    /// `[C]`; `None` for RMSNorm.
    pub dbias: Option<Tensor>,
}

fn check_common(op: &str, x: &Tensor, params: &[(&str, &Tensor)], rows: &[(&str, &Tensor)]) -> Result<()> {
    check::nonempty(op, &[("x", x)])?;
    check::dtype(op, "x", x, DType::F32)?;
    let c = x.last_dim();
    for (name, t) in params {
        check::dtype(op, name, t, DType::F32)?;
        if t.shape() != [c] {
            bail!(
                "{op}: {name} has shape {} but x has shape {} (want [{c}])",
                shape_str(t.shape()),
                shape_str(x.shape())
            );
        }
    }
    for (name, t) in rows {
        check::dtype(op, name, t, DType::F32)?;
        if t.numel() != x.rows() {
            bail!(
                "{op}: {name} has shape {} but x has shape {} ({} rows)",
                shape_str(t.shape()),
                shape_str(x.shape()),
                x.rows()
            );
        }
    }
    let mut all: Vec<&Tensor> = vec![x];
    all.extend(params.iter().chain(rows).map(|t| t.1));
    check::same_device(op, &all)
}

fn params(x: &Tensor, mode: usize, eps: f32) -> Params {
    Params::new().u(x.rows()).u(x.last_dim()).u(mode).f(eps).u(SEG_ROWS)
}

/// RMSNorm: `y = x / sqrt(mean(x^2) + eps) * weight` over the last axis.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<RmsNormOut> {
    check_common("rms_norm", x, &[("weight", weight)], &[])?;
    let gpu = x.gpu();
    let y = Tensor::empty(gpu, x.shape(), DType::F32)?;
    let rstd = Tensor::empty(gpu, &[x.rows()], DType::F32)?;
    let unused_mean = Tensor::empty(gpu, &[1], DType::F32)?;
    let (k, groups) = forward_kernel(x);
    let bufs = [x.buffer(), weight.buffer(), weight.buffer(), y.buffer(), unused_mean.buffer(), rstd.buffer()];
    gpu.dispatch(&k, params(x, RMS, eps).bytes(), &bufs, groups)?;
    Ok(RmsNormOut { y, rstd })
}

/// LayerNorm: `y = (x - mean) / sqrt(var + eps) * weight + bias` over the last
/// axis (biased variance, as PyTorch).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<LayerNormOut> {
    check_common("layer_norm", x, &[("weight", weight), ("bias", bias)], &[])?;
    let gpu = x.gpu();
    let y = Tensor::empty(gpu, x.shape(), DType::F32)?;
    let mean = Tensor::empty(gpu, &[x.rows()], DType::F32)?;
    let rstd = Tensor::empty(gpu, &[x.rows()], DType::F32)?;
    let (k, groups) = forward_kernel(x);
    let bufs = [x.buffer(), weight.buffer(), bias.buffer(), y.buffer(), mean.buffer(), rstd.buffer()];
    gpu.dispatch(&k, params(x, LAYER, eps).bytes(), &bufs, groups)?;
    Ok(LayerNormOut { y, mean, rstd })
}

/// Column sums of dy * xhat (and of dy for LayerNorm) over all rows.
fn dweight(x: &Tensor, dy: &Tensor, mean: &Tensor, rstd: &Tensor, mode: usize) -> Result<(Tensor, Option<Tensor>)> {
    let gpu = x.gpu();
    let (rows, c) = (x.rows(), x.last_dim());
    let nseg = rows.div_ceil(SEG_ROWS);
    let dw = Tensor::empty(gpu, &[nseg, c], DType::F32)?;
    let db_shape = if mode == LAYER { vec![nseg, c] } else { vec![1] };
    let db = Tensor::empty(gpu, &db_shape, DType::F32)?;
    let bufs = [x.buffer(), dy.buffer(), mean.buffer(), rstd.buffer(), dw.buffer(), db.buffer()];
    gpu.dispatch(&kernel("dweight", false), params(x, mode, 0.0).bytes(), &bufs, [div_ceil(c, WG), nseg as u32, 1])?;
    let finish = |t: Tensor| {
        if nseg == 1 {
            t.reshape(&[c])
        } else {
            reduce::sum(&t, 0)
        }
    };
    let dw = finish(dw)?;
    let db = if mode == LAYER { Some(finish(db)?) } else { None };
    Ok((dw, db))
}

/// Backward of `rms_norm` given its input `x`, `weight`, the forward's `rstd`
/// and the output gradient `dy`: dx, dweight (dbias is `None`).
pub fn rms_norm_backward(x: &Tensor, weight: &Tensor, rstd: &Tensor, dy: &Tensor) -> Result<NormGrads> {
    let op = "rms_norm_backward";
    check_common(op, x, &[("weight", weight)], &[("rstd", rstd)])?;
    check::same_shape(op, ("x", x), ("dy", dy))?;
    check::dtype(op, "dy", dy, DType::F32)?;
    let gpu = x.gpu();
    let dx = Tensor::empty(gpu, x.shape(), DType::F32)?;
    let k = kernel("backward", x.last_dim().is_multiple_of(4));
    let bufs = [x.buffer(), weight.buffer(), dy.buffer(), rstd.buffer(), rstd.buffer(), dx.buffer()];
    gpu.dispatch(&k, params(x, RMS, 0.0).bytes(), &bufs, grid(x.rows()))?;
    let (dweight, _) = dweight(x, dy, rstd, rstd, RMS)?;
    Ok(NormGrads { dx, dweight, dbias: None })
}

/// Backward of `layer_norm` given its input `x`, `weight`, the forward's `mean`
/// and `rstd`, and the output gradient `dy`: dx, dweight, dbias.
pub fn layer_norm_backward(
    x: &Tensor,
    weight: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
) -> Result<NormGrads> {
    let op = "layer_norm_backward";
    check_common(op, x, &[("weight", weight)], &[("mean", mean), ("rstd", rstd)])?;
    check::same_shape(op, ("x", x), ("dy", dy))?;
    check::dtype(op, "dy", dy, DType::F32)?;
    let gpu = x.gpu();
    let dx = Tensor::empty(gpu, x.shape(), DType::F32)?;
    let k = kernel("backward", x.last_dim().is_multiple_of(4));
    let bufs = [x.buffer(), weight.buffer(), dy.buffer(), mean.buffer(), rstd.buffer(), dx.buffer()];
    gpu.dispatch(&k, params(x, LAYER, 0.0).bytes(), &bufs, grid(x.rows()))?;
    let (dweight, dbias) = dweight(x, dy, mean, rstd, LAYER)?;
    Ok(NormGrads { dx, dweight, dbias })
}

/// CPU reference (f64): RMSNorm (`bias = None`, `layer = false`) or LayerNorm
/// over rows of length `w.len()`. Returns (y, mean, rstd); mean is 0 for RMSNorm.
pub fn norm_ref(x: &[f64], w: &[f64], b: Option<&[f64]>, eps: f64, layer: bool) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let c = w.len();
    let (mut y, mut means, mut rstds) = (Vec::with_capacity(x.len()), Vec::new(), Vec::new());
    for row in x.chunks(c) {
        let mean = if layer { row.iter().sum::<f64>() / c as f64 } else { 0.0 };
        let ms = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / c as f64;
        let rstd = 1.0 / (ms + eps).sqrt();
        for k in 0..c {
            y.push((row[k] - mean) * rstd * w[k] + b.map_or(0.0, |b| b[k]));
        }
        means.push(mean);
        rstds.push(rstd);
    }
    (y, means, rstds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::Gpu;
    use crate::ops::testing::{assert_close, finite_diff, rand_vec};

    fn gpu() -> Gpu {
        Gpu::shared().unwrap()
    }

    fn f64s(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| x as f64).collect()
    }
    fn f32s(v: &[f64]) -> Vec<f32> {
        v.iter().map(|&x| x as f32).collect()
    }

    // (515, 36): several rows per workgroup (>= 64 * CACHED_ROWS rows) with a partial last group;
    // 4096: the largest CPU register-cached row; 8192, 9000: streaming on CPU.
    const SHAPES: [(usize, usize); 12] = [
        (1, 1),
        (3, 7),
        (2, 33),
        (5, 64),
        (3, 257),
        (2, 4099),
        (300, 12), // one row per workgroup
        (515, 36),
        (520, 7),
        (2, 4096),
        (2, 8192),
        (1, 9000),
    ];

    #[test]
    fn forward_matches_reference() {
        for cpu in [false, true] {
            crate::ops::softmax::FORCE_CPU_SHAPES.with(|f| f.set(Some(cpu)));
            forward_matches_reference_with();
        }
    }

    fn forward_matches_reference_with() {
        let g = gpu();
        for (rows, c) in SHAPES {
            let n = rows * c;
            // An offset makes the LayerNorm variance a small difference of large terms.
            let x: Vec<f32> = rand_vec(n as u64, n, 2.0).iter().map(|v| v + 3.0).collect();
            let w = rand_vec(c as u64 + 1, c, 1.5);
            let b = rand_vec(c as u64 + 2, c, 1.0);
            let (tx, tw, tb) = (
                Tensor::from_f32(&g, &x, &[rows, c]).unwrap(),
                Tensor::from_f32(&g, &w, &[c]).unwrap(),
                Tensor::from_f32(&g, &b, &[c]).unwrap(),
            );
            let out = rms_norm(&tx, &tw, 1e-5).unwrap();
            let (y, _, r) = norm_ref(&f64s(&x), &f64s(&w), None, 1e-5, false);
            assert_close(&format!("rms y {rows}x{c}"), &out.y.to_vec_f32().unwrap(), &f32s(&y), 1e-5, 1e-5);
            assert_close(&format!("rms rstd {rows}x{c}"), &out.rstd.to_vec_f32().unwrap(), &f32s(&r), 1e-5, 0.0);
            let out = layer_norm(&tx, &tw, &tb, 1e-5).unwrap();
            let (y, m, r) = norm_ref(&f64s(&x), &f64s(&w), Some(&f64s(&b)), 1e-5, true);
            // rstd of a near-constant 1-column row is 1/sqrt(eps): compare relative.
            assert_close(&format!("ln y {rows}x{c}"), &out.y.to_vec_f32().unwrap(), &f32s(&y), 1e-4, 1e-4);
            assert_close(&format!("ln mean {rows}x{c}"), &out.mean.to_vec_f32().unwrap(), &f32s(&m), 1e-5, 1e-6);
            assert_close(&format!("ln rstd {rows}x{c}"), &out.rstd.to_vec_f32().unwrap(), &f32s(&r), 1e-4, 0.0);
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let g = gpu();
        for (rows, c) in [(1, 1), (3, 7), (2, 33), (4, 64), (1, 257), (600, 3)] {
            let n = rows * c;
            let x = rand_vec(n as u64 + 5, n, 2.0);
            let w = rand_vec(c as u64 + 6, c, 1.5);
            let b = rand_vec(c as u64 + 7, c, 1.0);
            let dy = rand_vec(n as u64 + 8, n, 1.0);
            let (tx, tw, tb, tdy) = (
                Tensor::from_f32(&g, &x, &[rows, c]).unwrap(),
                Tensor::from_f32(&g, &w, &[c]).unwrap(),
                Tensor::from_f32(&g, &b, &[c]).unwrap(),
                Tensor::from_f32(&g, &dy, &[rows, c]).unwrap(),
            );
            let eps = 1e-5;
            let loss = |x: &[f64], w: &[f64], b: &[f64], layer: bool| -> f64 {
                let (y, _, _) = norm_ref(x, w, if layer { Some(b) } else { None }, eps, layer);
                y.iter().zip(&dy).map(|(a, &d)| a * d as f64).sum()
            };
            let (x64, w64, b64) = (f64s(&x), f64s(&w), f64s(&b));
            for layer in [false, true] {
                let grads = if layer {
                    let o = layer_norm(&tx, &tw, &tb, eps as f32).unwrap();
                    layer_norm_backward(&tx, &tw, &o.mean, &o.rstd, &tdy).unwrap()
                } else {
                    let o = rms_norm(&tx, &tw, eps as f32).unwrap();
                    rms_norm_backward(&tx, &tw, &o.rstd, &tdy).unwrap()
                };
                let what = format!("{} {rows}x{c}", if layer { "layer_norm" } else { "rms_norm" });
                // Single-column LayerNorm rows are constant: dx = 0 and FD agrees.
                let fd_x = finite_diff(&x, 1e-5, |xs| loss(xs, &w64, &b64, layer));
                assert_close(&format!("{what} dx"), &grads.dx.to_vec_f32().unwrap(), &fd_x, 2e-3, 2e-4);
                let fd_w = finite_diff(&w, 1e-5, |ws| loss(&x64, ws, &b64, layer));
                assert_close(&format!("{what} dweight"), &grads.dweight.to_vec_f32().unwrap(), &fd_w, 1e-3, 1e-4);
                assert_eq!(grads.dweight.shape(), &[c]);
                if layer {
                    let fd_b = finite_diff(&b, 1e-5, |bs| loss(&x64, &w64, bs, layer));
                    let db = grads.dbias.as_ref().unwrap();
                    assert_eq!(db.shape(), &[c]);
                    assert_close(&format!("{what} dbias"), &db.to_vec_f32().unwrap(), &fd_b, 1e-3, 1e-4);
                } else {
                    assert!(grads.dbias.is_none());
                }
            }
        }
    }

    #[test]
    fn bad_inputs_name_the_op() {
        let g = gpu();
        let x = Tensor::from_f32(&g, &[0.0; 6], &[2, 3]).unwrap();
        let w2 = Tensor::from_f32(&g, &[1.0; 2], &[2]).unwrap();
        let w3 = Tensor::from_f32(&g, &[1.0; 3], &[3]).unwrap();
        let e = rms_norm(&x, &w2, 1e-5).err().unwrap().to_string();
        assert!(e.contains("rms_norm") && e.contains("[2]") && e.contains("[2, 3]"), "{e}");
        let e = layer_norm(&x, &w3, &w2, 1e-5).err().unwrap().to_string();
        assert!(e.contains("layer_norm") && e.contains("bias"), "{e}");
        let r3 = Tensor::from_f32(&g, &[1.0; 3], &[3]).unwrap();
        let e = rms_norm_backward(&x, &w3, &r3, &x).err().unwrap().to_string();
        assert!(e.contains("rms_norm_backward") && e.contains("rstd"), "{e}");
        let r2 = Tensor::from_f32(&g, &[1.0; 2], &[2]).unwrap();
        let dy = Tensor::from_f32(&g, &[0.0; 6], &[3, 2]).unwrap();
        let e = layer_norm_backward(&x, &w3, &r2, &r2, &dy).err().unwrap().to_string();
        assert!(e.contains("layer_norm_backward") && e.contains("dy"), "{e}");
        let empty = Tensor::empty(&g, &[0, 3], DType::F32).unwrap();
        assert!(rms_norm(&empty, &w3, 1e-5).err().unwrap().to_string().contains("rms_norm"));
    }
}
