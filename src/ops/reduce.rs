//! Reductions (`shaders/reduce.wgsl`): sum / mean / max along one axis,
//! `sum_all`, `sum_squares` (for gradient norms) and `sum_to_shape` (the
//! reverse of broadcasting). f32 in, f32 out.
//!
//! An axis is reduced by viewing the input as `[outer, len, inner]`. Long axes
//! are split into segments of `SEG` elements, each reduced by one workgroup
//! (shared-memory tree), and the partials reduced again; short non-last axes
//! use one thread per output. No thread loops over more than `SEG` elements.

use anyhow::{bail, Result};

use super::elementwise::grid;
use crate::gpu::{check, shape_str, DType, Kernel, Params, Tensor};

/// Threads per workgroup.
const WG: usize = 64;
/// Longest axis segment one workgroup reduces in one pass.
const SEG: usize = 8192;
/// Longest non-last axis reduced by one thread per output.
const THREAD_LEN: usize = 512;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Sum,
    Max,
    SumSquares,
}

impl Op {
    fn code(self) -> usize {
        match self {
            Op::Sum => 0,
            Op::Max => 1,
            Op::SumSquares => 2,
        }
    }
}

fn kernel(entry: &'static str) -> Kernel {
    Kernel::new("reduce", "reduce", entry).define("WG", format!("{WG}u"))
}

/// Every kernel variant in this family.
pub fn kernels() -> Vec<Kernel> {
    vec![kernel("reduce_wg"), kernel("reduce_thread")]
}

/// Record the reduction of `x` viewed as [outer, len, inner] over `len`;
/// returns [outer * inner] values times `scale` (not applied to max).
fn reduce3(x: &Tensor, outer: usize, len: usize, inner: usize, op: Op, scale: f32) -> Result<Tensor> {
    let gpu = x.gpu();
    let params = |seg: usize, nseg: usize, op: Op, scale: f32| {
        Params::new().u(outer).u(len).u(inner).u(seg).u(nseg).u(op.code()).f(scale).f(f32::NEG_INFINITY)
    };
    if inner > 1 && len <= THREAD_LEN {
        let out = Tensor::empty(gpu, &[outer * inner], DType::F32)?;
        let p = params(len, 1, op, scale);
        gpu.dispatch(
            &kernel("reduce_thread"),
            p.bytes(),
            &[x.buffer(), out.buffer()],
            grid((outer * inner).div_ceil(WG)),
        )?;
        return Ok(out);
    }
    let nseg = len.div_ceil(SEG);
    let seg = len.div_ceil(nseg);
    let out = Tensor::empty(gpu, &[outer * nseg * inner], DType::F32)?;
    let first_scale = if nseg == 1 { scale } else { 1.0 };
    let p = params(seg, nseg, op, first_scale);
    gpu.dispatch(&kernel("reduce_wg"), p.bytes(), &[x.buffer(), out.buffer()], grid(outer * nseg * inner))?;
    if nseg == 1 {
        return Ok(out);
    }
    let next = if op == Op::Max { Op::Max } else { Op::Sum };
    reduce3(&out, outer, nseg, inner, next, scale)
}

fn check_input(op: &str, x: &Tensor) -> Result<()> {
    check::nonempty(op, &[("x", x)])?;
    check::dtype(op, "x", x, DType::F32)
}

fn reduce_axis(name: &str, x: &Tensor, axis: usize, op: Op, mean: bool) -> Result<Tensor> {
    check_input(name, x)?;
    let shape = x.shape();
    if axis >= shape.len() {
        bail!("{name}: axis {axis} out of range for shape {}", shape_str(shape));
    }
    let outer: usize = shape[..axis].iter().product();
    let len = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let scale = if mean { 1.0 / len as f32 } else { 1.0 };
    let out = reduce3(x, outer, len, inner, op, scale)?;
    let mut out_shape: Vec<usize> = shape.to_vec();
    out_shape.remove(axis);
    if out_shape.is_empty() {
        out_shape.push(1);
    }
    out.reshape(&out_shape)
}

/// Sum over `axis`; the result drops that axis (`[A, B, C]`, axis 1 -> `[A, C]`;
/// a 1-D input gives `[1]`).
pub fn sum(x: &Tensor, axis: usize) -> Result<Tensor> {
    reduce_axis("sum", x, axis, Op::Sum, false)
}

/// Mean over `axis`; the result drops that axis.
pub fn mean(x: &Tensor, axis: usize) -> Result<Tensor> {
    reduce_axis("mean", x, axis, Op::Sum, true)
}

/// Maximum over `axis`; the result drops that axis. -inf entries are allowed.
pub fn max(x: &Tensor, axis: usize) -> Result<Tensor> {
    reduce_axis("max", x, axis, Op::Max, false)
}

/// Sum of all elements: a `[1]` tensor.
pub fn sum_all(x: &Tensor) -> Result<Tensor> {
    check_input("sum_all", x)?;
    reduce3(x, 1, x.numel(), 1, Op::Sum, 1.0)?.reshape(&[1])
}

/// Sum of squares of all elements (squared L2 norm): a `[1]` tensor.
pub fn sum_squares(x: &Tensor) -> Result<Tensor> {
    check_input("sum_squares", x)?;
    reduce3(x, 1, x.numel(), 1, Op::SumSquares, 1.0)?.reshape(&[1])
}

/// Sum `g` down to `target` shape: the reverse of broadcasting `target` to
/// `g.shape()` (trailing-aligned; every target dim equals g's or is 1, and
/// missing leading dims are summed away). Returns a tensor of shape `target`.
pub fn sum_to_shape(g: &Tensor, target: &[usize]) -> Result<Tensor> {
    let op = "sum_to_shape";
    check_input(op, g)?;
    let shape = g.shape();
    let bad = || format!("{op}: cannot sum {} down to {}", shape_str(shape), shape_str(target));
    if target.len() > shape.len() {
        // Allow extra leading 1s in the target.
        if target[..target.len() - shape.len()].iter().any(|&d| d != 1) {
            bail!(bad());
        }
        return sum_to_shape(g, &target[target.len() - shape.len()..])?.reshape(target);
    }
    let pad = shape.len() - target.len();
    let mut reduce_flags = Vec::with_capacity(shape.len());
    for k in 0..shape.len() {
        let t = if k < pad { 1 } else { target[k - pad] };
        if t == shape[k] {
            reduce_flags.push(false);
        } else if t == 1 {
            reduce_flags.push(true);
        } else {
            bail!(bad());
        }
    }
    // Merge adjacent dims with the same flag: alternating kept/summed groups.
    let mut groups: Vec<(usize, bool)> = Vec::new();
    for (k, &r) in reduce_flags.iter().enumerate() {
        if shape[k] == 1 {
            continue;
        }
        match groups.last_mut() {
            Some(last) if last.1 == r => last.0 *= shape[k],
            _ => groups.push((shape[k], r)),
        }
    }
    if !groups.iter().any(|g| g.1) {
        return g.duplicate()?.reshape(target);
    }
    let mut cur = g.clone();
    // Sum the groups from the innermost out; each pass removes one group.
    for gi in (0..groups.len()).rev() {
        if !groups[gi].1 {
            continue;
        }
        let outer: usize = groups[..gi].iter().map(|g| g.0).product();
        let len = groups[gi].0;
        let inner: usize = groups[gi + 1..].iter().map(|g| g.0).product();
        cur = reduce3(&cur, outer, len, inner, Op::Sum, 1.0)?;
        groups[gi].0 = 1;
    }
    cur.reshape(target)
}

/// CPU reference: reduce `x` (shape `shape`) over `axis`; `op` is "sum", "mean" or "max".
pub fn reduce_ref(x: &[f32], shape: &[usize], axis: usize, op: &str) -> Vec<f32> {
    let outer: usize = shape[..axis].iter().product();
    let len = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let mut out = Vec::with_capacity(outer * inner);
    for o in 0..outer {
        for i in 0..inner {
            let vals = (0..len).map(|k| x[(o * len + k) * inner + i] as f64);
            let v = match op {
                "sum" => vals.sum::<f64>(),
                "mean" => vals.sum::<f64>() / len as f64,
                "max" => vals.fold(f64::NEG_INFINITY, f64::max),
                _ => panic!("reduce_ref: unknown op {op}"),
            };
            out.push(v as f32);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::Gpu;
    use crate::ops::testing::{assert_close, rand_vec};

    fn gpu() -> Gpu {
        Gpu::shared().unwrap()
    }

    fn check(shape: &[usize], axis: usize) {
        let g = gpu();
        let n: usize = shape.iter().product();
        let x = rand_vec(n as u64 + axis as u64, n, 1.0);
        let t = Tensor::from_f32(&g, &x, shape).unwrap();
        let len = shape[axis] as f32;
        for (name, got) in [("sum", sum(&t, axis)), ("mean", mean(&t, axis)), ("max", max(&t, axis))] {
            let got = got.unwrap();
            let mut want_shape = shape.to_vec();
            want_shape.remove(axis);
            if want_shape.is_empty() {
                want_shape.push(1);
            }
            assert_eq!(got.shape(), &want_shape[..]);
            let want = reduce_ref(&x, shape, axis, name);
            // f32 accumulation over `len` terms of magnitude <= 1.
            let atol = if name == "max" { 0.0 } else { 2e-7 * len.sqrt() + 1e-6 };
            assert_close(&format!("{name} {shape:?} axis {axis}"), &got.to_vec_f32().unwrap(), &want, 1e-5, atol);
        }
    }

    #[test]
    fn last_axis_awkward_lengths() {
        for len in [1, 7, 33, 257, 4099] {
            check(&[3, len], 1);
            check(&[len], 0);
        }
    }

    #[test]
    fn long_axis_takes_two_passes() {
        check(&[2, 20_000], 1);
        check(&[40_000], 0);
    }

    #[test]
    fn non_last_axes() {
        check(&[5, 33, 7], 1); // thread per output
        check(&[7, 33], 0);
        check(&[2, 600, 3], 1); // workgroup per output (len > THREAD_LEN), strided
        check(&[4099, 2], 0);
        check(&[1, 1, 9], 1);
    }

    #[test]
    fn max_handles_neg_inf() {
        let g = gpu();
        let ninf = f32::NEG_INFINITY;
        let t = Tensor::from_f32(&g, &[ninf, ninf, ninf, -3.0, ninf, 2.0], &[2, 3]).unwrap();
        assert_eq!(max(&t, 1).unwrap().to_vec_f32().unwrap(), vec![ninf, 2.0]);
    }

    #[test]
    fn sum_all_and_sum_squares() {
        let g = gpu();
        for n in [1, 7, 33, 257, 4099, 100_003] {
            let x = rand_vec(n as u64, n, 1.0);
            let t = Tensor::from_f32(&g, &x, &[n]).unwrap();
            let want: f64 = x.iter().map(|&v| v as f64).sum();
            let want2: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
            let tol = 1e-6 * (n as f32).sqrt() + 1e-6;
            assert_close("sum_all", &[sum_all(&t).unwrap().to_scalar().unwrap()], &[want as f32], 1e-5, tol);
            assert_close("sum_squares", &[sum_squares(&t).unwrap().to_scalar().unwrap()], &[want2 as f32], 1e-5, tol);
        }
    }

    #[test]
    fn sum_to_shape_cases() {
        let g = gpu();
        let cases: &[(&[usize], &[usize])] = &[
            (&[2, 7, 33], &[33]),
            (&[2, 7, 33], &[2, 7, 1]),
            (&[2, 7, 33], &[7, 1]),
            (&[2, 7, 33], &[1, 7, 1]),
            (&[2, 7, 33], &[2, 1, 33]),
            (&[2, 7, 33], &[2, 7, 33]),
            (&[4, 3], &[1]),
            (&[5], &[1, 1, 5]),
            (&[3, 4, 5, 6], &[4, 1, 6]),
        ];
        for (from, to) in cases {
            let n: usize = from.iter().product();
            let x = rand_vec(n as u64, n, 1.0);
            let t = Tensor::from_f32(&g, &x, from).unwrap();
            let got = sum_to_shape(&t, to).unwrap();
            assert_eq!(got.shape(), *to);
            // Reference: accumulate each element into its broadcast source.
            let tn: usize = to.iter().product();
            let mut want = vec![0f64; tn];
            let rank = from.len().max(to.len());
            let f: Vec<usize> = std::iter::repeat(1).take(rank - from.len()).chain(from.iter().copied()).collect();
            let tt: Vec<usize> = std::iter::repeat(1).take(rank - to.len()).chain(to.iter().copied()).collect();
            for (i, &v) in x.iter().enumerate() {
                let (mut rem, mut ti, mut stride) = (i, 0, 1);
                for k in (0..rank).rev() {
                    let c = rem % f[k];
                    rem /= f[k];
                    if tt[k] != 1 {
                        ti += c * stride;
                    }
                    stride *= tt[k];
                }
                want[ti] += v as f64;
            }
            let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
            assert_close(&format!("sum_to_shape {from:?} -> {to:?}"), &got.to_vec_f32().unwrap(), &want, 1e-5, 1e-5);
        }
    }

    #[test]
    fn bad_inputs_name_the_op() {
        let g = gpu();
        let t = Tensor::from_f32(&g, &[0.0; 6], &[2, 3]).unwrap();
        assert!(sum(&t, 2).unwrap_err().to_string().contains("sum"));
        assert!(max(&t, 5).unwrap_err().to_string().contains("max"));
        let e = sum_to_shape(&t, &[2]).unwrap_err().to_string();
        assert!(e.contains("sum_to_shape") && e.contains("[2, 3]"), "{e}");
        assert!(sum_to_shape(&t, &[2, 2, 3]).unwrap_err().to_string().contains("sum_to_shape"));
        let empty = Tensor::empty(&g, &[0], DType::F32).unwrap();
        assert!(sum_all(&empty).unwrap_err().to_string().contains("sum_all"));
        let u = Tensor::from_u32(&g, &[1; 6], &[2, 3]).unwrap();
        assert!(mean(&u, 0).unwrap_err().to_string().contains("mean"));
    }
}
