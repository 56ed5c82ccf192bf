//! Rotary position embedding (`shaders/rope.wgsl`), LLaMA / Hugging Face "rotate_half"
//! convention: the head dim is split into halves `[x1, x2]` and, with
//! `a_d = pos * theta^(-2d/Dh)` for `d < Dh/2`,
//! `y = [x1 cos a - x2 sin a, x2 cos a + x1 sin a]`.
//!
//! x: `[B, H, T, Dh]` row-major (the attention layout), Dh even. The position of token t of
//! batch row b is `offset + t`, or `offset + positions[b, t]` when a positions tensor (i32,
//! `[T]` shared or `[B, T]`) is given: SETRec's item-shared position ids, or `offset` = cache
//! length when decoding. The backward is the inverse rotation (the rotation is orthogonal).
//! `inv_freq` is computed on the host in f64 and rounded to f32 (HF computes it in f32; the
//! two agree to 1 ulp); angles are `f32(pos) * inv_freq` as in HF.

use anyhow::{bail, Result};

use crate::gpu::{check, div_ceil, shape_str, DType, Kernel, Params, Tensor};

const OP: &str = "rope";
const WG: u32 = 64;

fn kernel(entry: &'static str) -> Kernel {
    Kernel::new(OP, "rope", entry).define("WG", format!("{WG}u"))
}

/// Every rope kernel variant (for naga validation).
pub fn kernels() -> Vec<Kernel> {
    vec![kernel("rope"), kernel("rope_inplace")]
}

/// `theta^(-2d/dh)` for d in 0..dh/2, as f32.
pub fn inv_freq(dh: usize, theta: f32) -> Vec<f32> {
    (0..dh / 2).map(|d| (theta as f64).powf(-((2 * d) as f64) / dh as f64) as f32).collect()
}

fn launch(
    x: &Tensor,
    out: Option<&Tensor>,
    positions: Option<&Tensor>,
    theta: f32,
    offset: i32,
    sgn: f32,
) -> Result<()> {
    check::nonempty(OP, &[("x", x)])?;
    check::dtype(OP, "x", x, DType::F32)?;
    if x.rank() != 4 || !x.shape()[3].is_multiple_of(2) {
        bail!("{OP}: x must be [B, H, T, Dh] with Dh even, got {}", shape_str(x.shape()));
    }
    if !(theta > 1.0) {
        bail!("{OP}: theta must be > 1, got {theta} (x {})", shape_str(x.shape()));
    }
    let (b, h, t, dh) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let gpu = x.gpu();
    let mut bstride = 0;
    if let Some(pt) = positions {
        check::dtype(OP, "positions", pt, DType::I32)?;
        check::same_device(OP, &[x, pt])?;
        if pt.shape() == [b, t] {
            bstride = t;
        } else if pt.shape() != [t] {
            bail!(
                "{OP}: positions must be [T] or [B, T] for x {}, got {}",
                shape_str(x.shape()),
                shape_str(pt.shape())
            );
        }
    }
    let freq = Tensor::from_f32(gpu, &inv_freq(dh, theta), &[dh / 2])?;
    let dummy;
    let pos_t = match positions {
        Some(pt) => pt,
        None => {
            dummy = Tensor::zeros(gpu, &[1], DType::I32)?;
            &dummy
        }
    };
    let n = b * h * t * (dh / 2);
    let groups = div_ceil(n, WG as usize);
    let gx = groups.min(65535);
    let p =
        Params::new().u(b).u(h).u(t).u(dh).u(positions.is_some() as usize).u(bstride).i(offset).f(sgn).u(gx as usize);
    let grid = [gx, groups.div_ceil(gx), 1];
    match out {
        Some(y) => {
            gpu.dispatch(&kernel("rope"), p.bytes(), &[x.buffer(), pos_t.buffer(), freq.buffer(), y.buffer()], grid)
        }
        None => gpu.dispatch(&kernel("rope_inplace"), p.bytes(), &[x.buffer(), pos_t.buffer(), freq.buffer()], grid),
    }
}

/// Rotate q or k `[B, H, T, Dh]` out of place. `positions`: optional i32 `[T]` or `[B, T]`;
/// position = `offset` + (positions or t).
pub fn rope(x: &Tensor, positions: Option<&Tensor>, theta: f32, offset: i32) -> Result<Tensor> {
    let y = Tensor::empty(x.gpu(), x.shape(), DType::F32)?;
    launch(x, Some(&y), positions, theta, offset, 1.0)?;
    Ok(y)
}

/// Rotate `x` in place (see `rope`).
pub fn rope_inplace(x: &Tensor, positions: Option<&Tensor>, theta: f32, offset: i32) -> Result<()> {
    launch(x, None, positions, theta, offset, 1.0)
}

/// Backward of `rope`: dx = inverse rotation of dy (same positions).
pub fn rope_backward(dy: &Tensor, positions: Option<&Tensor>, theta: f32, offset: i32) -> Result<Tensor> {
    let dx = Tensor::empty(dy.gpu(), dy.shape(), DType::F32)?;
    launch(dy, Some(&dx), positions, theta, offset, -1.0)?;
    Ok(dx)
}

/// In-place backward of `rope` (see `rope_backward`).
pub fn rope_backward_inplace(dy: &Tensor, positions: Option<&Tensor>, theta: f32, offset: i32) -> Result<()> {
    launch(dy, None, positions, theta, offset, -1.0)
}

/// CPU reference. `pos[b * t + ti]` is the full position of each token (offset added). The
/// angle is formed in f32 exactly as HF does (`f32(pos) * f32(inv_freq)`), the rest in f64.
pub fn rope_ref(x: &[f64], pos: &[i64], shape: [usize; 4], theta: f64) -> Vec<f64> {
    let [b, h, t, dh] = shape;
    let half = dh / 2;
    let mut y = vec![0.0; x.len()];
    for bi in 0..b {
        for hi in 0..h {
            for ti in 0..t {
                let row = ((bi * h + hi) * t + ti) * dh;
                let p = pos[bi * t + ti] as f32;
                for d in 0..half {
                    let a = (p * theta.powf(-((2 * d) as f64) / dh as f64) as f32) as f64;
                    let (s, c) = a.sin_cos();
                    let (x1, x2) = (x[row + d], x[row + d + half]);
                    y[row + d] = x1 * c - x2 * s;
                    y[row + d + half] = x2 * c + x1 * s;
                }
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::Gpu;
    use crate::ops::testing::{assert_close, finite_diff, rand_vec};

    fn f64v(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&v| v as f64).collect()
    }

    #[test]
    fn forward_matches_reference_with_offsets_and_positions() {
        let gpu = Gpu::shared().unwrap();
        for &(b, h, t, dh, theta, offset) in
            &[(1, 1, 1, 2, 10000.0, 0), (2, 3, 7, 8, 10000.0, 5), (2, 2, 33, 64, 1e6, 0), (1, 2, 65, 128, 1e4, 500)]
        {
            let shape = [b, h, t, dh];
            let x = rand_vec(t as u64, b * h * t * dh, 1.0);
            let xt = Tensor::from_f32(&gpu, &x, &shape).unwrap();
            let pos: Vec<i64> = (0..b).flat_map(|_| (0..t).map(|ti| (offset + ti) as i64)).collect();
            let want: Vec<f32> = rope_ref(&f64v(&x), &pos, shape, theta).iter().map(|&v| v as f32).collect();
            let y = rope(&xt, None, theta as f32, offset as i32).unwrap();
            assert_close(&format!("rope {shape:?}"), &y.to_vec_f32().unwrap(), &want, 1e-4, 2e-5);
            rope_inplace(&xt, None, theta as f32, offset as i32).unwrap();
            assert_close(&format!("rope inplace {shape:?}"), &xt.to_vec_f32().unwrap(), &want, 1e-4, 2e-5);

            // Per-token positions [B, T] (item-shared, like SETRec) plus an offset.
            let ids: Vec<i32> = (0..b * t).map(|i| ((i % t) / 3 + i / t) as i32).collect();
            let pt = Tensor::from_i32(&gpu, &ids, &[b, t]).unwrap();
            let pos: Vec<i64> = ids.iter().map(|&p| p as i64 + offset as i64).collect();
            let want: Vec<f32> = rope_ref(&f64v(&x), &pos, shape, theta).iter().map(|&v| v as f32).collect();
            let xt = Tensor::from_f32(&gpu, &x, &shape).unwrap();
            let y = rope(&xt, Some(&pt), theta as f32, offset as i32).unwrap();
            assert_close(&format!("rope positions {shape:?}"), &y.to_vec_f32().unwrap(), &want, 1e-4, 2e-5);
        }
    }

    #[test]
    fn decode_offset_equals_slice_of_prefill() {
        let gpu = Gpu::shared().unwrap();
        let (t, dh) = (9, 16);
        let x = rand_vec(3, t * dh, 1.0);
        let full =
            rope(&Tensor::from_f32(&gpu, &x, &[1, 1, t, dh]).unwrap(), None, 1e4, 0).unwrap().to_vec_f32().unwrap();
        let last = Tensor::from_f32(&gpu, &x[(t - 1) * dh..], &[1, 1, 1, dh]).unwrap();
        let dec = rope(&last, None, 1e4, (t - 1) as i32).unwrap().to_vec_f32().unwrap();
        assert_close("decode step", &dec, &full[(t - 1) * dh..], 1e-6, 1e-6);
    }

    #[test]
    fn backward_matches_finite_differences_and_inverts() {
        let gpu = Gpu::shared().unwrap();
        let shape = [2, 2, 7, 8];
        let n = 2 * 2 * 7 * 8;
        let x = rand_vec(7, n, 1.0);
        let dy = rand_vec(8, n, 1.0);
        let ids: Vec<i32> = vec![0, 1, 1, 1, 2, 2, 3];
        let pos: Vec<i64> = (0..2).flat_map(|_| ids.iter().map(|&p| p as i64 + 3)).collect();
        let fd = finite_diff(&x, 1e-6, |xs| {
            rope_ref(xs, &pos, shape, 1e4).iter().zip(&dy).map(|(a, &b)| a * b as f64).sum()
        });
        let pt = Tensor::from_i32(&gpu, &ids, &[7]).unwrap();
        let dyt = Tensor::from_f32(&gpu, &dy, &shape).unwrap();
        let dx = rope_backward(&dyt, Some(&pt), 1e4, 3).unwrap();
        assert_close("rope dx vs fd", &dx.to_vec_f32().unwrap(), &fd, 1e-3, 1e-4);
        rope_backward_inplace(&dyt, Some(&pt), 1e4, 3).unwrap();
        assert_close("rope dx inplace", &dyt.to_vec_f32().unwrap(), &fd, 1e-3, 1e-4);
        // Backward of forward is the identity.
        let xt = Tensor::from_f32(&gpu, &x, &shape).unwrap();
        let back = rope_backward(&rope(&xt, None, 1e4, 0).unwrap(), None, 1e4, 0).unwrap();
        assert_close("inverse", &back.to_vec_f32().unwrap(), &x, 1e-5, 1e-6);
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_op() {
        let gpu = Gpu::shared().unwrap();
        let x = Tensor::zeros(&gpu, &[1, 2, 4, 8], DType::F32).unwrap();
        let odd = Tensor::zeros(&gpu, &[1, 2, 4, 7], DType::F32).unwrap();
        let e = |r: Result<Tensor>| {
            let s = r.err().expect("expected an error").to_string();
            assert!(s.contains("rope"), "{s}");
        };
        e(rope(&odd, None, 1e4, 0));
        e(rope(&Tensor::zeros(&gpu, &[2, 4, 8], DType::F32).unwrap(), None, 1e4, 0));
        e(rope(&Tensor::zeros(&gpu, &[1, 2, 0, 8], DType::F32).unwrap(), None, 1e4, 0));
        e(rope(&x, None, 0.5, 0));
        e(rope(&x, Some(&Tensor::zeros(&gpu, &[5], DType::I32).unwrap()), 1e4, 0));
        e(rope(&x, Some(&Tensor::zeros(&gpu, &[4], DType::F32).unwrap()), 1e4, 0));
    }
}
