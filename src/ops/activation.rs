//! Standalone activations (`shaders/activation.wgsl`, using the shared
//! `shaders/_act.wgsl`): `forward(x, act)`, `backward(x, dy, act)`, and the
//! fused SwiGLU of LLaMA's FFN, `silu(gate) * up`, with its backward.
//! All tensors f32; outputs have the input's shape.

use anyhow::Result;

use super::elementwise::grid;
use super::Act;
use crate::gpu::{check, DType, Kernel, Params, Tensor};

/// Threads per workgroup (`WG` in the shader); each thread handles one vec4.
const WG: usize = 256;

fn kernel(entry: &'static str) -> Kernel {
    Kernel::new("activation", "activation", entry)
}

/// Every kernel variant in this family.
pub fn kernels() -> Vec<Kernel> {
    ["forward", "backward", "swiglu", "swiglu_backward"].into_iter().map(kernel).collect()
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

fn launch(entry: &'static str, n: usize, act: Act, bufs: &[&Tensor]) -> Result<()> {
    let n4 = n.div_ceil(4);
    let p = Params::new().u(n4).u(act.code() as usize);
    let buffers: Vec<&wgpu::Buffer> = bufs.iter().map(|t| t.buffer()).collect();
    bufs[0].gpu().dispatch(&kernel(entry), p.bytes(), &buffers, grid(n4.div_ceil(WG)))
}

/// `y = act(x)`.
pub fn forward(x: &Tensor, act: Act) -> Result<Tensor> {
    check_f32("activation", &[("x", x)])?;
    let y = Tensor::empty(x.gpu(), x.shape(), DType::F32)?;
    launch("forward", x.numel(), act, &[x, &y])?;
    Ok(y)
}

/// `dx = dy * act'(x)`, where `x` is the forward's input (pre-activation).
pub fn backward(x: &Tensor, dy: &Tensor, act: Act) -> Result<Tensor> {
    check_f32("activation_backward", &[("x", x), ("dy", dy)])?;
    let dx = Tensor::empty(x.gpu(), x.shape(), DType::F32)?;
    launch("backward", x.numel(), act, &[x, dy, &dx])?;
    Ok(dx)
}

/// `y = silu(gate) * up` (LLaMA FFN), gate and up of the same shape.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    check_f32("swiglu", &[("gate", gate), ("up", up)])?;
    let y = Tensor::empty(gate.gpu(), gate.shape(), DType::F32)?;
    launch("swiglu", gate.numel(), Act::Silu, &[gate, up, &y])?;
    Ok(y)
}

/// Backward of `swiglu`: returns `(dgate, dup)` with
/// `dgate = dy * up * silu'(gate)` and `dup = dy * silu(gate)`.
pub fn swiglu_backward(gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    check_f32("swiglu_backward", &[("gate", gate), ("up", up), ("dy", dy)])?;
    let dgate = Tensor::empty(gate.gpu(), gate.shape(), DType::F32)?;
    let dup = Tensor::empty(gate.gpu(), gate.shape(), DType::F32)?;
    launch("swiglu_backward", gate.numel(), Act::Silu, &[gate, up, dy, &dgate, &dup])?;
    Ok((dgate, dup))
}

/// CPU reference of `forward`.
pub fn forward_ref(x: &[f32], act: Act) -> Vec<f32> {
    x.iter().map(|&v| act.apply_f64(v as f64) as f32).collect()
}

/// CPU reference of `swiglu`.
pub fn swiglu_ref(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter().zip(up).map(|(&g, &u)| (Act::Silu.apply_f64(g as f64) * u as f64) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::Gpu;
    use crate::ops::testing::{assert_close, finite_diff, rand_vec};

    const ACTS: [Act; 7] = [Act::None, Act::Relu, Act::Gelu, Act::GeluTanh, Act::Silu, Act::Sigmoid, Act::Tanh];

    fn gpu() -> Gpu {
        Gpu::shared().unwrap()
    }

    /// Random values in [-6, 6) plus large and special magnitudes.
    fn inputs(n: usize, seed: u64) -> Vec<f32> {
        let mut x = rand_vec(seed, n, 6.0);
        let special = [80.0, -80.0, 20.0, -20.0, 1e-3, -1e-3, 0.5];
        for (i, s) in special.iter().enumerate().take(n) {
            x[i] = *s;
        }
        x
    }

    #[test]
    fn forward_matches_reference_incl_large_inputs() {
        let g = gpu();
        for act in ACTS {
            for n in [1, 7, 33, 257] {
                let x = inputs(n, n as u64);
                let y = forward(&Tensor::from_f32(&g, &x, &[n]).unwrap(), act).unwrap().to_vec_f32().unwrap();
                assert!(y.iter().all(|v| v.is_finite()), "{act:?}: non-finite output {y:?}");
                assert_close(&format!("{act:?} n={n}"), &y, &forward_ref(&x, act), 1e-5, 1e-6);
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let g = gpu();
        for act in ACTS {
            for n in [7, 33, 257] {
                let x = inputs(n, 100 + n as u64);
                let dy = rand_vec(200 + n as u64, n, 1.0);
                let tx = Tensor::from_f32(&g, &x, &[n]).unwrap();
                let tdy = Tensor::from_f32(&g, &dy, &[n]).unwrap();
                let dx = backward(&tx, &tdy, act).unwrap().to_vec_f32().unwrap();
                assert!(dx.iter().all(|v| v.is_finite()), "{act:?}: non-finite grad");
                let fd =
                    finite_diff(&x, 1e-4, |xs| xs.iter().zip(&dy).map(|(&v, &d)| act.apply_f64(v) * d as f64).sum());
                assert_close(&format!("{act:?} grad n={n}"), &dx, &fd, 1e-3, 1e-5);
            }
        }
    }

    #[test]
    fn swiglu_forward_and_backward() {
        let g = gpu();
        for n in [1, 7, 33, 257] {
            let gate = inputs(n, n as u64);
            let up = rand_vec(300 + n as u64, n, 2.0);
            let dy = rand_vec(400 + n as u64, n, 1.0);
            let tg = Tensor::from_f32(&g, &gate, &[n]).unwrap();
            let tu = Tensor::from_f32(&g, &up, &[n]).unwrap();
            let tdy = Tensor::from_f32(&g, &dy, &[n]).unwrap();
            let y = swiglu(&tg, &tu).unwrap().to_vec_f32().unwrap();
            assert_close("swiglu", &y, &swiglu_ref(&gate, &up), 1e-5, 1e-6);
            let (dg, du) = swiglu_backward(&tg, &tu, &tdy).unwrap();
            let loss = |gs: &[f64], us: &[f64]| -> f64 {
                (0..n).map(|i| Act::Silu.apply_f64(gs[i]) * us[i] * dy[i] as f64).sum()
            };
            let up64: Vec<f64> = up.iter().map(|&v| v as f64).collect();
            let gate64: Vec<f64> = gate.iter().map(|&v| v as f64).collect();
            let fd_g = finite_diff(&gate, 1e-4, |gs| loss(gs, &up64));
            let fd_u = finite_diff(&up, 1e-4, |us| loss(&gate64, us));
            assert_close("swiglu dgate", &dg.to_vec_f32().unwrap(), &fd_g, 1e-3, 1e-5);
            assert_close("swiglu dup", &du.to_vec_f32().unwrap(), &fd_u, 1e-3, 1e-5);
        }
    }

    #[test]
    fn bad_inputs_name_the_op() {
        let g = gpu();
        let a = Tensor::from_f32(&g, &[0.0; 6], &[2, 3]).unwrap();
        let b = Tensor::from_f32(&g, &[0.0; 6], &[3, 2]).unwrap();
        let e = swiglu(&a, &b).unwrap_err().to_string();
        assert!(e.contains("swiglu") && e.contains("[2, 3]") && e.contains("[3, 2]"), "{e}");
        assert!(backward(&a, &b, Act::Relu).unwrap_err().to_string().contains("activation_backward"));
        assert!(swiglu_backward(&a, &a, &b).unwrap_err().to_string().contains("swiglu_backward"));
        let u = Tensor::from_u32(&g, &[1; 6], &[2, 3]).unwrap();
        assert!(forward(&u, Act::Gelu).unwrap_err().to_string().contains("activation"));
        let empty = Tensor::empty(&g, &[0], DType::F32).unwrap();
        assert!(forward(&empty, Act::Gelu).unwrap_err().to_string().contains("activation"));
    }
}
