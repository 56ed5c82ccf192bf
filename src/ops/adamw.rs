//! AdamW optimizer step and global gradient-norm clipping (`shaders/adamw.wgsl`).
//!
//! One dispatch per parameter tensor updates `param`, `m` and `v` in place
//! (PyTorch `torch.optim.AdamW` semantics: decoupled weight decay
//! `p *= 1 - lr * wd`, bias-corrected moments). For clipping, `grad_norm_sq`
//! reduces the sum of squares of all gradients into a `[1]` GPU tensor that the
//! step kernel reads, so backward and update record into one submission with no
//! readback in between.

use anyhow::{bail, Result};

use crate::gpu::{check, div_ceil, shape_str, DType, Kernel, Params, Tensor};

const WG: usize = 256;
/// Most partial sums one gradient tensor contributes to `grad_norm_sq`.
const MAX_PARTIALS: usize = 512;

fn step_kernel() -> Kernel {
    Kernel::new("adamw", "adamw", "adamw_step")
}
fn partial_kernel() -> Kernel {
    Kernel::new("grad_norm_sq", "adamw", "sumsq_partial")
}
fn finish_kernel() -> Kernel {
    Kernel::new("grad_norm_sq", "adamw", "sumsq_finish")
}

/// Every kernel variant of this family (for naga validation).
pub fn kernels() -> Vec<Kernel> {
    vec![step_kernel(), partial_kernel(), finish_kernel()]
}

fn grid(workgroups: u32) -> [u32; 3] {
    let x = workgroups.min(65535);
    [x, workgroups.div_ceil(x.max(1)), 1]
}

/// AdamW hyperparameters. `Default` is PyTorch's (lr 1e-3, betas 0.9/0.999,
/// eps 1e-8, weight decay 0.01). Weight decay applies to whichever tensors
/// `step` is called on: use a copy with `weight_decay: 0.0` for biases and norm
/// gains if they should not decay. `lr` is read per call, so schedules are the
/// caller's (no GPU state besides m and v).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// Global-norm gradient clipping for one step: the gradient is scaled by
/// `min(1, max_norm / (sqrt(norm_sq[0]) + 1e-6))`.
#[derive(Clone, Copy, Debug)]
pub struct Clip<'a> {
    /// `[1]` f32: sum of squares over all gradients, from `grad_norm_sq`.
    pub norm_sq: &'a Tensor,
    pub max_norm: f32,
}

impl AdamW {
    /// Record one AdamW step for one parameter tensor, updating `param`, `m`
    /// and `v` in place (all f32, same shape as `grad`; `m`, `v` start at zero).
    /// `t` is the 1-based step number, used for bias correction.
    pub fn step(
        &self,
        param: &Tensor,
        grad: &Tensor,
        m: &Tensor,
        v: &Tensor,
        t: u32,
        clip: Option<Clip>,
    ) -> Result<()> {
        const OP: &str = "adamw";
        check::nonempty(OP, &[("param", param)])?;
        for (name, x) in [("param", param), ("grad", grad), ("m", m), ("v", v)] {
            check::dtype(OP, name, x, DType::F32)?;
            check::same_shape(OP, ("param", param), (name, x))?;
        }
        check::same_device(OP, &[param, grad, m, v])?;
        if param.same_buffer(m)
            || param.same_buffer(v)
            || m.same_buffer(v)
            || [param, m, v].iter().any(|x| x.same_buffer(grad))
        {
            bail!("adamw: param, grad, m and v must be distinct tensors (shape {})", shape_str(param.shape()));
        }
        if t == 0 {
            bail!("adamw: step number t is 1-based, got 0 (param {})", shape_str(param.shape()));
        }
        let hp = [self.lr, self.beta1, self.beta2, self.eps, self.weight_decay];
        if hp.iter().any(|x| !x.is_finite()) || !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            bail!("adamw: invalid hyperparameters {self:?} (betas must be in [0, 1))");
        }
        let (clip_on, max_norm, norm_buf) = match clip {
            Some(c) => {
                check::dtype(OP, "clip norm_sq", c.norm_sq, DType::F32)?;
                if c.norm_sq.numel() != 1 {
                    bail!("adamw: clip norm_sq must have one element, got shape {}", shape_str(c.norm_sq.shape()));
                }
                if c.max_norm.is_nan() || c.max_norm <= 0.0 {
                    bail!("adamw: clip max_norm must be > 0, got {}", c.max_norm);
                }
                (1, c.max_norm, c.norm_sq.buffer())
            }
            None => (0, 0.0, grad.buffer()),
        };
        let bc1 = (1.0 - (self.beta1 as f64).powi(t as i32)) as f32;
        let bc2 = (1.0 - (self.beta2 as f64).powi(t as i32)) as f32;
        let n = param.numel();
        let params = Params::new()
            .u(n)
            .u(clip_on)
            .f(self.lr)
            .f(self.beta1)
            .f(self.beta2)
            .f(self.eps)
            .f(self.weight_decay)
            .f(bc1)
            .f(bc2)
            .f(max_norm);
        param.gpu().dispatch(
            &step_kernel(),
            params.bytes(),
            &[param.buffer(), grad.buffer(), m.buffer(), v.buffer(), norm_buf],
            grid(div_ceil(n, WG)),
        )
    }
}

/// Sum of squares of every element of every gradient, as a `[1]` f32 tensor
/// computed on the GPU (deterministic: fixed reduction order). `sqrt` of it is
/// the global L2 norm that `Clip` uses.
pub fn grad_norm_sq(grads: &[&Tensor]) -> Result<Tensor> {
    const OP: &str = "grad_norm_sq";
    let Some(first) = grads.first() else { bail!("grad_norm_sq: no gradient tensors given") };
    check::same_device(OP, grads)?;
    let mut parts = Vec::with_capacity(grads.len());
    let mut total = 0usize;
    for (k, g) in grads.iter().enumerate() {
        check::dtype(OP, &format!("grads[{k}]"), g, DType::F32)?;
        let wgs = div_ceil(g.numel(), WG * 4).clamp(1, MAX_PARTIALS as u32) as usize;
        parts.push((total, wgs));
        total += wgs;
    }
    let gpu = first.gpu();
    let partials = Tensor::empty(gpu, &[total], DType::F32)?;
    for (g, &(offset, wgs)) in grads.iter().zip(&parts) {
        let params = Params::new().u(g.numel()).u(offset);
        gpu.dispatch(&partial_kernel(), params.bytes(), &[g.buffer(), partials.buffer()], [wgs as u32, 1, 1])?;
    }
    let out = Tensor::empty(gpu, &[1], DType::F32)?;
    gpu.dispatch(&finish_kernel(), Params::new().u(total).bytes(), &[partials.buffer(), out.buffer()], [1, 1, 1])?;
    Ok(out)
}

/// CPU reference of one AdamW step on one tensor (f64), in place; `clip_scale`
/// is the factor applied to the gradient (1 without clipping).
pub fn adamw_ref(opt: &AdamW, param: &mut [f64], grad: &[f64], m: &mut [f64], v: &mut [f64], t: u32, clip_scale: f64) {
    let (b1, b2) = (opt.beta1 as f64, opt.beta2 as f64);
    let (lr, eps, wd) = (opt.lr as f64, opt.eps as f64, opt.weight_decay as f64);
    let bc1 = 1.0 - b1.powi(t as i32);
    let bc2 = 1.0 - b2.powi(t as i32);
    for i in 0..param.len() {
        let g = grad[i] * clip_scale;
        m[i] = b1 * m[i] + (1.0 - b1) * g;
        v[i] = b2 * v[i] + (1.0 - b2) * g * g;
        param[i] = param[i] * (1.0 - lr * wd) - lr * (m[i] / bc1) / ((v[i] / bc2).sqrt() + eps);
    }
}

/// CPU reference of the clip factor for a set of gradients (f64).
pub fn clip_scale_ref(grads: &[&[f64]], max_norm: f64) -> f64 {
    let sq: f64 = grads.iter().flat_map(|g| g.iter()).map(|x| x * x).sum();
    (max_norm / (sq.sqrt() + 1e-6)).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::Gpu;
    use crate::ops::testing::{assert_close, rand_vec};

    fn to64(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&v| v as f64).collect()
    }
    fn to32(x: &[f64]) -> Vec<f32> {
        x.iter().map(|&v| v as f32).collect()
    }

    #[test]
    fn grad_norm_sq_matches_cpu_over_many_tensors() {
        let gpu = Gpu::shared().unwrap();
        let sizes = [1usize, 7, 33, 257, 4099, 300_001];
        let data: Vec<Vec<f32>> = sizes.iter().enumerate().map(|(k, &n)| rand_vec(k as u64, n, 1.0)).collect();
        let ts: Vec<Tensor> = data.iter().map(|d| Tensor::from_f32(&gpu, d, &[d.len()]).unwrap()).collect();
        let refs: Vec<&Tensor> = ts.iter().collect();
        let got = grad_norm_sq(&refs).unwrap();
        assert_eq!(got.shape(), &[1]);
        let want: f64 = data.iter().flatten().map(|&x| (x as f64) * (x as f64)).sum();
        assert_close("grad_norm_sq", &[got.to_scalar().unwrap()], &[want as f32], 2e-6, 0.0);
        // Same bits on a second run.
        assert_eq!(got.to_scalar().unwrap().to_bits(), grad_norm_sq(&refs).unwrap().to_scalar().unwrap().to_bits());
    }

    /// Several steps on several tensors against the f64 reference, with the
    /// gradients changing every step; `max_norm` None disables clipping.
    fn run_steps(max_norm: Option<f32>) {
        let gpu = Gpu::shared().unwrap();
        let opt = AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 };
        let sizes = [1usize, 7, 33, 257, 1000];
        let p0: Vec<Vec<f32>> = sizes.iter().enumerate().map(|(k, &n)| rand_vec(100 + k as u64, n, 1.0)).collect();
        let params: Vec<Tensor> = p0.iter().map(|p| Tensor::from_f32(&gpu, p, &[p.len()]).unwrap()).collect();
        let ms: Vec<Tensor> = sizes.iter().map(|&n| Tensor::zeros(&gpu, &[n], DType::F32).unwrap()).collect();
        let vs: Vec<Tensor> = sizes.iter().map(|&n| Tensor::zeros(&gpu, &[n], DType::F32).unwrap()).collect();
        let mut rp: Vec<Vec<f64>> = p0.iter().map(|p| to64(p)).collect();
        let mut rm: Vec<Vec<f64>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
        let mut rv = rm.clone();
        let mut clipped = 0;
        for t in 1..=6u32 {
            let g: Vec<Vec<f32>> = sizes
                .iter()
                .enumerate()
                .map(|(k, &n)| rand_vec(1000 * t as u64 + k as u64, n, 0.5 * t as f32))
                .collect();
            let gt: Vec<Tensor> = g.iter().map(|x| Tensor::from_f32(&gpu, x, &[x.len()]).unwrap()).collect();
            let g64: Vec<Vec<f64>> = g.iter().map(|x| to64(x)).collect();
            let scale = match max_norm {
                Some(c) => clip_scale_ref(&g64.iter().map(|x| &x[..]).collect::<Vec<_>>(), c as f64),
                None => 1.0,
            };
            if scale < 1.0 {
                clipped += 1;
            }
            let norm_sq = grad_norm_sq(&gt.iter().collect::<Vec<_>>()).unwrap();
            for k in 0..sizes.len() {
                let clip = max_norm.map(|c| Clip { norm_sq: &norm_sq, max_norm: c });
                opt.step(&params[k], &gt[k], &ms[k], &vs[k], t, clip).unwrap();
                adamw_ref(&opt, &mut rp[k], &g64[k], &mut rm[k], &mut rv[k], t, scale);
            }
        }
        if let Some(c) = max_norm {
            assert!(clipped >= 3, "clip {c} should bind on most steps (bound on {clipped})");
        }
        for k in 0..sizes.len() {
            let what = format!("adamw clip={max_norm:?} n={}", sizes[k]);
            assert_close(&format!("{what} param"), &params[k].to_vec_f32().unwrap(), &to32(&rp[k]), 1e-5, 1e-6);
            assert_close(&format!("{what} m"), &ms[k].to_vec_f32().unwrap(), &to32(&rm[k]), 1e-5, 1e-7);
            assert_close(&format!("{what} v"), &vs[k].to_vec_f32().unwrap(), &to32(&rv[k]), 1e-5, 1e-8);
        }
    }

    #[test]
    fn matches_cpu_reference_over_steps_without_clipping() {
        run_steps(None);
    }

    #[test]
    fn matches_cpu_reference_over_steps_with_clipping() {
        // Gradient norms here are ~5..30: a 3.0 threshold binds on every step.
        run_steps(Some(3.0));
    }

    #[test]
    fn loose_clip_threshold_changes_nothing() {
        let gpu = Gpu::shared().unwrap();
        let opt = AdamW::default();
        let p = rand_vec(1, 33, 1.0);
        let g = rand_vec(2, 33, 0.1);
        let run = |clip: bool| {
            let pt = Tensor::from_f32(&gpu, &p, &[33]).unwrap();
            let gt = Tensor::from_f32(&gpu, &g, &[33]).unwrap();
            let m = Tensor::zeros(&gpu, &[33], DType::F32).unwrap();
            let v = Tensor::zeros(&gpu, &[33], DType::F32).unwrap();
            let ns = grad_norm_sq(&[&gt]).unwrap();
            opt.step(&pt, &gt, &m, &v, 1, clip.then_some(Clip { norm_sq: &ns, max_norm: 1e3 })).unwrap();
            pt.to_vec_f32().unwrap()
        };
        assert_eq!(run(true), run(false));
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_op() {
        let gpu = Gpu::shared().unwrap();
        let opt = AdamW::default();
        let a = || Tensor::zeros(&gpu, &[7], DType::F32).unwrap();
        let (p, g, m, v) = (a(), a(), a(), a());
        let short = Tensor::zeros(&gpu, &[6], DType::F32).unwrap();
        let e = opt.step(&p, &short, &m, &v, 1, None).unwrap_err().to_string();
        assert!(e.contains("adamw") && e.contains("[6]"), "{e}");
        let e = opt.step(&p, &g, &m, &v, 0, None).unwrap_err().to_string();
        assert!(e.contains("adamw"), "{e}");
        let e = opt.step(&p, &g, &m, &m, 1, None).unwrap_err().to_string();
        assert!(e.contains("adamw") && e.contains("distinct"), "{e}");
        let e = opt.step(&p, &g, &m, &v, 1, Some(Clip { norm_sq: &short, max_norm: 1.0 })).unwrap_err().to_string();
        assert!(e.contains("adamw") && e.contains("norm_sq"), "{e}");
        let bad = AdamW { beta1: 1.0, ..opt };
        assert!(bad.step(&p, &g, &m, &v, 1, None).unwrap_err().to_string().contains("adamw"));
        let e = grad_norm_sq(&[]).unwrap_err().to_string();
        assert!(e.contains("grad_norm_sq"), "{e}");
        let u = Tensor::from_u32(&gpu, &[1], &[1]).unwrap();
        let e = grad_norm_sq(&[&g, &u]).unwrap_err().to_string();
        assert!(e.contains("grad_norm_sq") && e.contains("grads[1]"), "{e}");
    }
}
