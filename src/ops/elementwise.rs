//! Elementwise arithmetic (`shaders/elementwise.wgsl`): binary ops with
//! numpy-style broadcasting, scalar affine maps, in-place `y += alpha * x`
//! (gradient accumulation) and fill. All tensors are f32.
//!
//! Broadcasting aligns shapes on their trailing dimensions; each pair of
//! dimensions must be equal or one of them 1 (`[B, T, C] + [C]`,
//! `[B, T, C] * [B, T, 1]`). The backward of a broadcast operand is
//! `reduce::sum_to_shape(grad, operand_shape)`.

use anyhow::{bail, Result};

use crate::gpu::{check, shape_str, DType, Gpu, Kernel, Params, Tensor};

/// Threads per workgroup of the elementwise kernels (`WG` in the shader).
const WG: usize = 256;

/// Binary elementwise operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
}

impl BinOp {
    /// Op number understood by `shaders/elementwise.wgsl`.
    pub fn code(self) -> u32 {
        match self {
            BinOp::Add => 0,
            BinOp::Sub => 1,
            BinOp::Mul => 2,
            BinOp::Div => 3,
        }
    }
    /// CPU reference.
    pub fn apply_f64(self, a: f64, b: f64) -> f64 {
        match self {
            BinOp::Add => a + b,
            BinOp::Sub => a - b,
            BinOp::Mul => a * b,
            BinOp::Div => a / b,
        }
    }
    fn name(self) -> &'static str {
        match self {
            BinOp::Add => "add",
            BinOp::Sub => "sub",
            BinOp::Mul => "mul",
            BinOp::Div => "div",
        }
    }
}

/// A dispatch grid of `groups` workgroups folded into x and y (at most 65535
/// per dimension); shaders recover the id as `wid.x + wid.y * nwg.x` and
/// bound-check it.
pub(crate) fn grid(groups: usize) -> [u32; 3] {
    const MAX: usize = 65535;
    if groups <= MAX {
        [groups as u32, 1, 1]
    } else {
        [MAX as u32, groups.div_ceil(MAX) as u32, 1]
    }
}

fn kernel(entry: &'static str) -> Kernel {
    Kernel::new("elementwise", "elementwise", entry)
}

/// Every kernel variant in this family.
pub fn kernels() -> Vec<Kernel> {
    ["binary_same", "binary_bcast", "affine", "add_scaled", "fill", "copy"].into_iter().map(kernel).collect()
}

/// Numpy broadcast of two shapes (aligned on trailing dims); `None` if incompatible.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for k in 0..rank {
        let da = if k < rank - a.len() { 1 } else { a[k - (rank - a.len())] };
        let db = if k < rank - b.len() { 1 } else { b[k - (rank - b.len())] };
        out[k] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return None;
        };
    }
    Some(out)
}

/// Row-major strides of `shape` padded on the left to `out` rank, with 0 for
/// broadcast (size-1 or missing) dimensions.
fn bcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let pad = out.len() - shape.len();
    let mut strides = vec![0; out.len()];
    let mut s = 1;
    for k in (0..shape.len()).rev() {
        strides[k + pad] = if shape[k] == 1 && out[k + pad] != 1 { 0 } else { s };
        s *= shape[k];
    }
    strides
}

fn check_f32(op: &str, ts: &[(&str, &Tensor)]) -> Result<()> {
    for (name, t) in ts {
        check::dtype(op, name, t, DType::F32)?;
    }
    Ok(())
}

/// `a op b` with numpy-style broadcasting; the result has the broadcast shape.
pub fn binary(a: &Tensor, b: &Tensor, op: BinOp) -> Result<Tensor> {
    let name = op.name();
    check::nonempty(name, &[("a", a), ("b", b)])?;
    check_f32(name, &[("a", a), ("b", b)])?;
    check::same_device(name, &[a, b])?;
    let Some(out_shape) = broadcast_shape(a.shape(), b.shape()) else {
        bail!("{name}: shapes {} and {} do not broadcast", shape_str(a.shape()), shape_str(b.shape()));
    };
    let gpu = a.gpu();
    let out = Tensor::empty(gpu, &out_shape, DType::F32)?;
    let n = out.numel();
    if a.shape() == b.shape() {
        let n4 = n.div_ceil(4);
        let p = Params::new().u(n4).u(op.code() as usize);
        gpu.dispatch(
            &kernel("binary_same"),
            p.bytes(),
            &[a.buffer(), b.buffer(), out.buffer()],
            grid(n4.div_ceil(WG)),
        )?;
        return Ok(out);
    }
    // Collapse adjacent dims that broadcast the same way in both operands.
    let sa = bcast_strides(a.shape(), &out_shape);
    let sb = bcast_strides(b.shape(), &out_shape);
    let mut dims: Vec<(usize, usize, usize)> = Vec::new(); // (size, a stride, b stride)
    for k in 0..out_shape.len() {
        let (d, xa, xb) = (out_shape[k], sa[k], sb[k]);
        if d == 1 {
            continue;
        }
        if let Some(last) = dims.last_mut() {
            // Merge when the previous (outer) dim is contiguous over this one.
            let merge_a = (last.1 == 0 && xa == 0) || (last.1 != 0 && xa != 0 && last.1 == xa * d);
            let merge_b = (last.2 == 0 && xb == 0) || (last.2 != 0 && xb != 0 && last.2 == xb * d);
            if merge_a && merge_b {
                *last = (last.0 * d, xa, xb);
                continue;
            }
        }
        dims.push((d, xa, xb));
    }
    if dims.is_empty() {
        dims.push((1, 0, 0));
    }
    if dims.len() > 8 {
        bail!(
            "{name}: broadcasting {} with {} needs {} distinct dimensions, more than the 8 supported",
            shape_str(a.shape()),
            shape_str(b.shape()),
            dims.len()
        );
    }
    let mut p = Params::new().u(n).u(dims.len()).u(op.code() as usize).u(0);
    for field in 0..3 {
        for k in 0..8 {
            let v = dims.get(k).map(|d| [d.0, d.1, d.2][field]).unwrap_or(1);
            p = p.u(v);
        }
    }
    gpu.dispatch(&kernel("binary_bcast"), p.bytes(), &[a.buffer(), b.buffer(), out.buffer()], grid(n.div_ceil(WG)))?;
    Ok(out)
}

/// `a + b` (broadcasting).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinOp::Add)
}
/// `a - b` (broadcasting).
pub fn sub(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinOp::Sub)
}
/// `a * b` (broadcasting).
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinOp::Mul)
}
/// `a / b` (broadcasting).
pub fn div(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinOp::Div)
}

/// `x * s`.
pub fn scale(x: &Tensor, s: f32) -> Result<Tensor> {
    affine_named("scale", x, s, 0.0)
}

/// `x * mul + add` with scalar `mul` and `add`.
pub fn affine(x: &Tensor, mul: f32, add: f32) -> Result<Tensor> {
    affine_named("affine", x, mul, add)
}

fn affine_named(op: &str, x: &Tensor, mul: f32, add: f32) -> Result<Tensor> {
    check::nonempty(op, &[("x", x)])?;
    check_f32(op, &[("x", x)])?;
    let y = Tensor::empty(x.gpu(), x.shape(), DType::F32)?;
    let n4 = x.numel().div_ceil(4);
    let p = Params::new().u(n4).f(mul).f(add);
    x.gpu().dispatch(&kernel("affine"), p.bytes(), &[x.buffer(), y.buffer()], grid(n4.div_ceil(WG)))?;
    Ok(y)
}

/// In place `y += alpha * x` (same shapes); used to accumulate gradients.
pub fn add_scaled(y: &Tensor, x: &Tensor, alpha: f32) -> Result<()> {
    let op = "add_scaled";
    check::nonempty(op, &[("y", y), ("x", x)])?;
    check_f32(op, &[("y", y), ("x", x)])?;
    check::same_shape(op, ("y", y), ("x", x))?;
    check::same_device(op, &[y, x])?;
    if y.same_buffer(x) {
        bail!("{op}: y and x share a buffer (shape {}); use scale instead", shape_str(y.shape()));
    }
    let n4 = y.numel().div_ceil(4);
    let p = Params::new().u(n4).f(alpha);
    y.gpu().dispatch(&kernel("add_scaled"), p.bytes(), &[y.buffer(), x.buffer()], grid(n4.div_ceil(WG)))
}

/// In place `x[..] = value`.
pub fn fill(x: &Tensor, value: f32) -> Result<()> {
    check_f32("fill", &[("x", x)])?;
    let n4 = x.numel().div_ceil(4);
    let p = Params::new().u(n4).f(value);
    x.gpu().dispatch(&kernel("fill"), p.bytes(), &[x.buffer()], grid(n4.div_ceil(WG)))
}

/// `y = x` through a shader (vec4 loads and stores): the bandwidth baseline the
/// kernel benchmarks compare against.
pub fn copy_kernel(x: &Tensor) -> Result<Tensor> {
    check_f32("copy_kernel", &[("x", x)])?;
    let y = Tensor::empty(x.gpu(), x.shape(), DType::F32)?;
    let n4 = x.numel().div_ceil(4);
    let p = Params::new().u(n4).f(1.0).f(0.0);
    x.gpu().dispatch(&kernel("copy"), p.bytes(), &[x.buffer(), y.buffer()], grid(n4.div_ceil(WG)))?;
    Ok(y)
}

/// CPU reference of `binary`: returns (out shape, values).
pub fn binary_ref(a: &[f32], a_shape: &[usize], b: &[f32], b_shape: &[usize], op: BinOp) -> (Vec<usize>, Vec<f32>) {
    let out = broadcast_shape(a_shape, b_shape).expect("shapes broadcast");
    let sa = bcast_strides(a_shape, &out);
    let sb = bcast_strides(b_shape, &out);
    let n: usize = out.iter().product();
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        let (mut rem, mut ia, mut ib) = (i, 0, 0);
        for k in (0..out.len()).rev() {
            let c = rem % out[k];
            rem /= out[k];
            ia += c * sa[k];
            ib += c * sb[k];
        }
        v.push(op.apply_f64(a[ia] as f64, b[ib] as f64) as f32);
    }
    (out, v)
}

/// Helper for callers that hold a `Gpu` but no tensor: a filled tensor.
pub fn full(gpu: &Gpu, shape: &[usize], value: f32) -> Result<Tensor> {
    let t = Tensor::empty(gpu, shape, DType::F32)?;
    fill(&t, value)?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::reduce;
    use crate::ops::testing::{assert_close, rand_vec};

    fn gpu() -> Gpu {
        Gpu::shared().unwrap()
    }

    fn check_binary(a_shape: &[usize], b_shape: &[usize], op: BinOp) {
        let g = gpu();
        let na: usize = a_shape.iter().product();
        let nb: usize = b_shape.iter().product();
        let a = rand_vec(1 + na as u64, na, 2.0);
        // Keep divisors away from 0.
        let b: Vec<f32> = rand_vec(7 + nb as u64, nb, 2.0).iter().map(|v| v + 3.0f32.copysign(*v)).collect();
        let ta = Tensor::from_f32(&g, &a, a_shape).unwrap();
        let tb = Tensor::from_f32(&g, &b, b_shape).unwrap();
        let out = binary(&ta, &tb, op).unwrap();
        let (shape, want) = binary_ref(&a, a_shape, &b, b_shape, op);
        assert_eq!(out.shape(), &shape[..], "{a_shape:?} {op:?} {b_shape:?}");
        assert_close(&format!("{a_shape:?} {op:?} {b_shape:?}"), &out.to_vec_f32().unwrap(), &want, 1e-6, 1e-6);
    }

    #[test]
    fn binary_same_shape_all_ops() {
        for op in [BinOp::Add, BinOp::Sub, BinOp::Mul, BinOp::Div] {
            for n in [1, 7, 33, 257, 1031] {
                check_binary(&[n], &[n], op);
            }
            check_binary(&[3, 5, 7], &[3, 5, 7], op);
        }
    }

    #[test]
    fn binary_broadcasting_cases() {
        let cases: &[(&[usize], &[usize])] = &[
            (&[2, 7, 33], &[33]),      // bias over channels
            (&[2, 7, 33], &[2, 7, 1]), // per-row scale
            (&[33], &[2, 7, 33]),      // a broadcasts
            (&[4, 1, 5], &[1, 3, 1]),  // both broadcast
            (&[2, 7, 33], &[7, 1]),    // middle dim
            (&[5, 3], &[1]),           // scalar
            (&[1], &[1]),
            (&[257, 1], &[1, 9]), // outer product
            (&[2, 3, 4, 5, 6], &[3, 1, 5, 1]),
            (&[1, 1, 7], &[7]), // size-1 dims only
        ];
        for (a, b) in cases {
            for op in [BinOp::Add, BinOp::Sub, BinOp::Mul, BinOp::Div] {
                check_binary(a, b, op);
            }
        }
    }

    #[test]
    fn broadcast_shape_rules() {
        assert_eq!(broadcast_shape(&[2, 3, 4], &[4]), Some(vec![2, 3, 4]));
        assert_eq!(broadcast_shape(&[2, 1], &[1, 5]), Some(vec![2, 5]));
        assert_eq!(broadcast_shape(&[2, 3], &[4, 1, 3]), Some(vec![4, 2, 3]));
        assert_eq!(broadcast_shape(&[2, 3], &[2]), None);
    }

    #[test]
    fn bad_inputs_name_the_op() {
        let g = gpu();
        let a = Tensor::from_f32(&g, &[0.0; 6], &[2, 3]).unwrap();
        let b = Tensor::from_f32(&g, &[0.0; 2], &[2]).unwrap();
        let e = binary(&a, &b, BinOp::Mul).unwrap_err().to_string();
        assert!(e.contains("mul") && e.contains("[2, 3]") && e.contains("[2]"), "{e}");
        let e = add_scaled(&a, &b, 1.0).unwrap_err().to_string();
        assert!(e.contains("add_scaled") && e.contains("[2, 3]"), "{e}");
        let empty = Tensor::empty(&g, &[0, 3], DType::F32).unwrap();
        assert!(add(&empty, &a).unwrap_err().to_string().contains("add"));
        let u = Tensor::from_u32(&g, &[1; 6], &[2, 3]).unwrap();
        assert!(sub(&a, &u).unwrap_err().to_string().contains("sub"));
        assert!(scale(&u, 2.0).unwrap_err().to_string().contains("scale"));
        assert!(add_scaled(&a, &a, 1.0).unwrap_err().to_string().contains("add_scaled"));
    }

    #[test]
    fn scale_affine_add_scaled_fill() {
        let g = gpu();
        for n in [1, 7, 33, 257, 4099] {
            let x = rand_vec(n as u64, n, 3.0);
            let y0 = rand_vec(n as u64 + 100, n, 3.0);
            let tx = Tensor::from_f32(&g, &x, &[n]).unwrap();
            let s = scale(&tx, -1.5).unwrap().to_vec_f32().unwrap();
            assert_close("scale", &s, &x.iter().map(|v| v * -1.5).collect::<Vec<_>>(), 1e-6, 0.0);
            let a = affine(&tx, 0.5, 2.0).unwrap().to_vec_f32().unwrap();
            let want: Vec<f32> = x.iter().map(|&v| (v as f64 * 0.5 + 2.0) as f32).collect();
            assert_close("affine", &a, &want, 1e-6, 1e-6);
            let ty = Tensor::from_f32(&g, &y0, &[n]).unwrap();
            add_scaled(&ty, &tx, 0.25).unwrap();
            add_scaled(&ty, &tx, 0.25).unwrap();
            let want: Vec<f32> = y0.iter().zip(&x).map(|(&y, &x)| (y as f64 + 0.5 * x as f64) as f32).collect();
            assert_close("add_scaled", &ty.to_vec_f32().unwrap(), &want, 1e-6, 1e-6);
            fill(&ty, 7.5).unwrap();
            assert_eq!(ty.to_vec_f32().unwrap(), vec![7.5; n]);
        }
        let f = full(&g, &[3, 3], -2.0).unwrap();
        assert_eq!(f.to_vec_f32().unwrap(), vec![-2.0; 9]);
        let c = copy_kernel(&Tensor::from_f32(&g, &[1.0, 2.0, 3.0], &[3]).unwrap()).unwrap();
        assert_eq!(c.to_vec_f32().unwrap(), vec![1.0, 2.0, 3.0]);
    }

    #[test]
    fn broadcast_backward_is_sum_to_shape() {
        // d/d b of sum(dy * (a + b)) for b: [C] broadcast over [B, T, C] is the column sum of dy.
        let g = gpu();
        let (bt, c) = (14, 33);
        let dy = rand_vec(5, bt * c, 1.0);
        let tdy = Tensor::from_f32(&g, &dy, &[2, 7, c]).unwrap();
        let db = reduce::sum_to_shape(&tdy, &[c]).unwrap();
        let mut want = vec![0f64; c];
        for r in 0..bt {
            for j in 0..c {
                want[j] += dy[r * c + j] as f64;
            }
        }
        let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        assert_close("db", &db.to_vec_f32().unwrap(), &want, 1e-5, 1e-5);
    }
}
