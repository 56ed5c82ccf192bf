//! LoRA (Hu et al. 2021) on linear layers, PEFT-compatible.
//!
//! `y = x Wᵀ + b + (alpha / r) · B(A(dropout(x)))` with W `[out, in]` the frozen base weight,
//! A `[r, in]` and B `[out, r]` trainable (PEFT's `lora_A.weight` / `lora_B.weight` layouts).
//! Init as PEFT: A ~ kaiming_uniform(a = sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0, so an
//! attached adapter leaves the output unchanged until trained.
//!
//! The adapter is fused into the base matmul, forward and backward ([`Var::lora_linear`]): a
//! thin matmul makes H = dropout(x) Aᵀ `[N, r]`, and the base matmul kernel adds
//! `scale · H Bᵀ` to its accumulators before the bias (`ops::matmul::LowRank`, every kernel
//! path); the backward's dX = dY W + scale · (dY B) A is one matmul with the same fused term
//! (dropout 0; with dropout the adapter's share goes through the mask apart). The unfused form,
//! base matmul plus two thin matmuls, add and scale, is kept as [`lora_linear_unfused`], the
//! reference of the tests and the benchmark (`examples/lora_bench.rs`).
//! The base weight can be stored as f16 once frozen ([`LoraLinear::freeze_base`]): the matmul
//! widens f16 operands on load (core WGSL `unpack2x16float`), forward and backward.
//! [`LoraLinear::merge`] folds the adapter into W for inference. [`export_peft`] writes
//! `adapter_model.safetensors` + `adapter_config.json` in PEFT's layout, atomically.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::rc::Rc;

use anyhow::{bail, Context, Result};

use crate::autograd::{LoraTerm, Param, Tape, Var};
use crate::gpu::{shape_str, DType, Tensor};
use crate::io::HostTensor;
use crate::ops::Act;

/// Short target names and the module names they stand for (LLaMA / HF naming).
pub const TARGETS: [(&str, &str); 7] = [
    ("q", "q_proj"),
    ("k", "k_proj"),
    ("v", "v_proj"),
    ("o", "o_proj"),
    ("gate", "gate_proj"),
    ("up", "up_proj"),
    ("down", "down_proj"),
];

/// Hyper-parameters of a set of adapters.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f32,
    pub dropout: f32,
    /// Module names (`q_proj`, ..., `down_proj`) that get an adapter.
    pub target_modules: Vec<String>,
}

impl LoraConfig {
    /// `targets`: short names (`q`, `k`, `v`, `o`, `gate`, `up`, `down`) or module names
    /// (`q_proj`, ...); errors on anything else, on r = 0 and on a dropout outside [0, 1).
    pub fn new(r: usize, alpha: f32, dropout: f32, targets: &[&str]) -> Result<LoraConfig> {
        if r == 0 {
            bail!("LoRA: rank r must be >= 1");
        }
        if !(0.0..1.0).contains(&dropout) {
            bail!("LoRA: dropout {dropout} must be in [0, 1)");
        }
        let mut mods = Vec::new();
        for t in targets {
            let m = TARGETS.iter().find(|(s, m)| s == t || m == t).map(|(_, m)| m.to_string());
            match m {
                Some(m) if !mods.contains(&m) => mods.push(m),
                Some(_) => {}
                None => bail!(
                    "LoRA: unknown target {t:?}; expected one of {}",
                    TARGETS.iter().map(|(s, _)| *s).collect::<Vec<_>>().join(", ")
                ),
            }
        }
        if mods.is_empty() {
            bail!("LoRA: no target modules");
        }
        Ok(LoraConfig { r, alpha, dropout, target_modules: mods })
    }

    /// alpha / r.
    pub fn scale(&self) -> f32 {
        self.alpha / self.r as f32
    }

    /// Whether a module (`q_proj`, ...) gets an adapter.
    pub fn targets(&self, module: &str) -> bool {
        self.target_modules.iter().any(|m| m == module)
    }
}

/// The trainable pair of one adapted linear.
pub struct LoraAdapter {
    /// `[r, in]`
    pub a: Rc<Param>,
    /// `[out, r]`
    pub b: Rc<Param>,
    pub scale: f32,
    pub dropout: f32,
    /// Dropout seed and a per-call counter (each forward draws a fresh mask).
    pub seed: u32,
    calls: Cell<u32>,
}

/// `x Wᵀ + b + scale · (dropout(x) Aᵀ) Bᵀ` on the tape (the LoRA forward; `lora` = (A, B, scale,
/// dropout p, seed, offset)), with the adapter fused into the base matmul ([`Var::lora_linear`]).
/// Under a no-grad tape dropout is the identity.
pub fn lora_linear(
    x: &Var,
    w: &Var,
    bias: Option<&Var>,
    lora: Option<(&Var, &Var, f32, f32, u32, u32)>,
) -> Result<Var> {
    match lora {
        None => x.linear(w, bias, true, Act::None),
        Some((a, b, scale, p, seed, offset)) => x.lora_linear(w, bias, LoraTerm { a, b, scale, p, seed, offset }),
    }
}

/// [`lora_linear`] computed the unfused way: the base matmul, then dropout, two thin matmuls, a
/// scale and an add on the tape (the reference of the fused op's tests and benchmark).
pub fn lora_linear_unfused(
    x: &Var,
    w: &Var,
    bias: Option<&Var>,
    lora: Option<(&Var, &Var, f32, f32, u32, u32)>,
) -> Result<Var> {
    let y = x.linear(w, bias, true, Act::None)?;
    let Some((a, b, scale, p, seed, offset)) = lora else {
        return Ok(y);
    };
    let xd = x.dropout(p, seed, offset)?;
    let h = xd.linear(a, None, true, Act::None)?;
    let u = h.linear(b, None, true, Act::None)?;
    y.add(&u.scale(scale)?)
}

/// A linear layer (HF layout, weight `[out, in]`) with an optional LoRA adapter.
pub struct LoraLinear {
    pub weight: Rc<Param>,
    pub bias: Option<Rc<Param>>,
    pub lora: Option<LoraAdapter>,
}

impl LoraLinear {
    pub fn new(weight: Rc<Param>, bias: Option<Rc<Param>>) -> LoraLinear {
        LoraLinear { weight, bias, lora: None }
    }

    pub fn d_in(&self) -> usize {
        self.weight.value.shape()[1]
    }
    pub fn d_out(&self) -> usize {
        self.weight.value.shape()[0]
    }

    /// Attach a fresh adapter (A kaiming-uniform as PEFT, B zeros) named after the weight
    /// (`<prefix>.lora_A.weight`, `<prefix>.lora_B.weight`, prefix = weight name without
    /// `.weight`).
    pub fn attach(&mut self, cfg: &LoraConfig, seed: u64) -> Result<()> {
        let gpu = self.weight.value.gpu().clone();
        let (d_in, d_out, r) = (self.d_in(), self.d_out(), cfg.r);
        let prefix = self.weight.name.strip_suffix(".weight").unwrap_or(&self.weight.name).to_string();
        let bound = 1.0 / (d_in as f32).sqrt();
        let a = Tensor::from_f32(&gpu, &super::uniform_init(seed, r * d_in, bound), &[r, d_in])?;
        let b = Tensor::zeros(&gpu, &[d_out, r], DType::F32)?;
        self.lora = Some(LoraAdapter {
            a: Param::new(format!("{prefix}.lora_A.weight"), a),
            b: Param::new(format!("{prefix}.lora_B.weight"), b),
            scale: cfg.scale(),
            dropout: cfg.dropout,
            seed: (seed as u32) ^ 0x5bd1_e995,
            calls: Cell::new(0),
        });
        Ok(())
    }

    /// Freeze the base weight and bias (no gradients); with `f16`, store the weight as f16
    /// (half the memory; the matmul widens it on load).
    pub fn freeze_base(&mut self, f16: bool) -> Result<()> {
        if f16 && self.weight.value.dtype() == DType::F32 {
            let w = self.weight.value.to_vec_f32()?;
            let t = Tensor::from_f32_as_f16(self.weight.value.gpu(), &w, self.weight.value.shape())?;
            self.weight = Param::new(self.weight.name.clone(), t);
        }
        self.weight.frozen.set(true);
        if let Some(b) = &self.bias {
            b.frozen.set(true);
        }
        Ok(())
    }

    /// y = x Wᵀ + b (+ the adapter). x: `[..., in]` -> `[..., out]`, computed as one
    /// `[N, in]` matmul (leading axes flattened, so a `[B, 1, in]` decoding step is one M = B
    /// product, not B products of one row).
    pub fn forward(&self, tape: &Tape, x: &Var) -> Result<Var> {
        let shape = x.shape().to_vec();
        let d_in = *shape.last().unwrap_or(&0);
        if d_in != self.d_in() {
            bail!("linear {}: input {} does not end in {} features", self.weight.name, shape_str(&shape), self.d_in());
        }
        let n = x.value.numel() / d_in.max(1);
        let x2 = if shape.len() == 2 { x.clone() } else { x.reshape(&[n, d_in])? };
        let bias = self.bias.as_ref().map(|b| tape.param(b));
        let y = match &self.lora {
            // Inference with few rows on a CPU adapter: the register-blocked kernel (8-row tiles,
            // transposed weight read in place) instead of the subgroup kernel (32-row tiles, which
            // would first materialize Wᵀ).
            None if !tape.grad_enabled() && n < crate::ops::matmul::SG_ROWS && x.value.gpu().is_cpu() => {
                let plan = crate::ops::matmul::Plan::with_path(crate::ops::matmul::Path::Register);
                let opts = crate::ops::matmul::MatmulOpts {
                    trans_a: false,
                    trans_b: true,
                    bias: bias.as_ref().map(|b| &b.value),
                    act: Act::None,
                    lowrank: None,
                };
                tape.constant(crate::ops::matmul::matmul_with_plan(&x2.value, &self.weight.value, &opts, &plan)?)
            }
            None => lora_linear(&x2, &tape.param(&self.weight), bias.as_ref(), None)?,
            Some(l) => {
                let (a, b) = (tape.param(&l.a), tape.param(&l.b));
                let call = l.calls.get();
                l.calls.set(call.wrapping_add(1));
                let offset = call.wrapping_mul(x.value.numel() as u32);
                let w = tape.param(&self.weight);
                lora_linear(&x2, &w, bias.as_ref(), Some((&a, &b, l.scale, l.dropout, l.seed, offset)))?
            }
        };
        if shape.len() == 2 {
            return Ok(y);
        }
        let mut out = shape;
        *out.last_mut().unwrap() = self.d_out();
        y.reshape(&out)
    }

    /// Fold the adapter into the weight (`W += scale · B A`, in the weight's dtype) and drop it.
    pub fn merge(&mut self) -> Result<()> {
        let Some(l) = self.lora.take() else { return Ok(()) };
        let ba = crate::ops::matmul::matmul(&l.b.value, &l.a.value, &Default::default())?; // [out, in]
        let w = &self.weight;
        let frozen = w.frozen.get();
        let merged = if w.value.dtype() == DType::F32 {
            let t = w.value.duplicate()?;
            crate::ops::elementwise::add_scaled(&t, &ba, l.scale)?;
            t
        } else {
            let mut host = w.value.to_vec_f32()?;
            for (x, d) in host.iter_mut().zip(ba.to_vec_f32()?) {
                *x += l.scale * d;
            }
            Tensor::from_f32_as_f16(w.value.gpu(), &host, w.value.shape())?
        };
        self.weight = Param::new(w.name.clone(), merged);
        self.weight.frozen.set(frozen);
        Ok(())
    }

    /// The trainable parameters: the adapter's A and B when attached, else weight (and bias).
    pub fn params(&self) -> Vec<Rc<Param>> {
        match &self.lora {
            Some(l) => vec![l.a.clone(), l.b.clone()],
            None => {
                let mut v = vec![self.weight.clone()];
                v.extend(self.bias.clone());
                v
            }
        }
    }
}

/// Write `adapters` (module path as in HF, e.g. `model.layers.0.self_attn.q_proj`, with its
/// adapter) in PEFT's layout into `dir`: `adapter_model.safetensors` holding
/// `base_model.model.<path>.lora_A.weight` `[r, in]` and `.lora_B.weight` `[out, r]` (f32), and
/// `adapter_config.json`. Both files are written atomically.
pub fn export_peft(dir: &Path, cfg: &LoraConfig, base_model: &str, adapters: &[(String, &LoraAdapter)]) -> Result<()> {
    if adapters.is_empty() {
        bail!("export_peft {}: no adapters to export", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tensors = BTreeMap::new();
    for (path, l) in adapters {
        for (part, p) in [("lora_A", &l.a), ("lora_B", &l.b)] {
            let name = format!("base_model.model.{path}.{part}.weight");
            let t = HostTensor::new(p.value.shape(), p.value.to_vec_f32()?)
                .with_context(|| format!("export_peft: tensor {name}"))?;
            if t.shape.len() != 2
                || (part == "lora_A" && t.shape[0] != cfg.r)
                || (part == "lora_B" && t.shape[1] != cfg.r)
            {
                bail!("export_peft: tensor {name} has shape {} for rank {}", shape_str(&t.shape), cfg.r);
            }
            tensors.insert(name, t);
        }
    }
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    crate::io::safetensors::save(
        dir.join("adapter_model.safetensors"),
        &tensors,
        Some(&meta),
        crate::io::safetensors::StoreDtype::F32,
    )?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.target_modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": false,
        "use_dora": false,
        "revision": null
    });
    let path = dir.join("adapter_config.json");
    let text = serde_json::to_string_pretty(&config)?;
    crate::io::atomic_write(&path, |w| Ok(w.write_all(text.as_bytes())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::check::check_gradients;
    use crate::gpu::Gpu;
    use crate::ops::testing::{assert_close, rand_vec};

    #[test]
    fn lora_forward_gradients_match_finite_differences() {
        let gpu = Gpu::shared().unwrap();
        let (n, d_in, d_out, r) = (3, 5, 4, 2);
        let inputs = vec![
            (rand_vec(1, n * d_in, 1.0), vec![n, d_in]),
            (rand_vec(2, d_out * d_in, 0.5), vec![d_out, d_in]),
            (rand_vec(3, d_out, 0.5), vec![d_out]),
            (rand_vec(4, r * d_in, 0.5), vec![r, d_in]),
            (rand_vec(5, d_out * r, 0.5), vec![d_out, r]),
        ];
        check_gradients(
            &gpu,
            &inputs,
            |_, v| lora_linear(&v[0], &v[1], Some(&v[2]), Some((&v[3], &v[4], 1.7, 0.0, 1, 0))),
            1e-2,
            1e-2,
            1e-3,
        )
        .unwrap();
    }

    /// The fused op against the unfused reference: output and the gradients of x, A, B (and of
    /// W and the bias when `train_base`), same dropout mask (seed, offset) on both.
    fn fused_vs_unfused(x_shape: &[usize], d_out: usize, r: usize, p: f32, w_f16: bool, train_base: bool) {
        let gpu = Gpu::shared().unwrap();
        let d_in = *x_shape.last().unwrap();
        let xv = rand_vec(40, x_shape.iter().product(), 1.0);
        let mut wv = rand_vec(41, d_out * d_in, 0.3);
        if w_f16 {
            wv = wv.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
        }
        let (av, bv, biasv) = (rand_vec(42, r * d_in, 0.5), rand_vec(43, d_out * r, 0.5), rand_vec(44, d_out, 0.5));
        let n_out = x_shape.iter().product::<usize>() / d_in * d_out;
        let wout = rand_vec(45, n_out, 1.0);
        let run = |fused: bool| {
            let tape = Tape::new();
            let t = |v: &[f32], s: &[usize]| Tensor::from_f32(&gpu, v, s).unwrap();
            let x = tape.input(t(&xv, x_shape));
            let w_t = if w_f16 {
                Tensor::from_f32_as_f16(&gpu, &wv, &[d_out, d_in]).unwrap()
            } else {
                t(&wv, &[d_out, d_in])
            };
            let (w, bias) = if train_base {
                (tape.input(w_t), tape.input(t(&biasv, &[d_out])))
            } else {
                (tape.constant(w_t), tape.constant(t(&biasv, &[d_out])))
            };
            let a = tape.input(t(&av, &[r, d_in]));
            let b = tape.input(t(&bv, &[d_out, r]));
            let lora = Some((&a, &b, 1.7, p, 11, 5));
            let f = if fused { lora_linear } else { lora_linear_unfused };
            let y = f(&x, &w, Some(&bias), lora).unwrap();
            let mut ys = x_shape.to_vec();
            *ys.last_mut().unwrap() = d_out;
            assert_eq!(y.shape(), ys.as_slice());
            let loss = y.mul(&tape.constant(t(&wout, &ys))).unwrap().sum_all().unwrap();
            let grads = tape.backward(&loss).unwrap();
            let mut out = vec![y.value.to_vec_f32().unwrap()];
            let mut vars = vec![&x, &a, &b];
            if train_base {
                vars.extend([&w, &bias]);
            }
            for v in vars {
                out.push(grads.of(v).expect("a gradient").to_vec_f32().unwrap());
            }
            out
        };
        let (fused, unfused) = (run(true), run(false));
        for (i, name) in ["y", "dx", "dA", "dB", "dW", "dbias"].iter().take(fused.len()).enumerate() {
            let what = format!("{name} x{x_shape:?} out={d_out} r={r} p={p} f16={w_f16}");
            // 1e-5 relative, and 1e-5 of the tensor's largest entry absolute: the two compute the
            // same sums in different orders (e.g. dA sums M rows that largely cancel).
            let max_abs = unfused[i].iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_close(&what, &fused[i], &unfused[i], 1e-5, 1e-5 * max_abs);
        }
    }

    #[test]
    fn fused_matches_unfused_forward_and_gradients() {
        for p in [0.0, 0.3] {
            fused_vs_unfused(&[37, 45], 29, 7, p, false, false);
            fused_vs_unfused(&[2, 9, 45], 70, 16, p, false, true);
            fused_vs_unfused(&[33, 64], 96, 1, p, true, false);
        }
        // Shapes the adapter's kernel choice puts on the texture path (large enough to pay).
        fused_vs_unfused(&[256, 72], 264, 8, 0.1, false, false);
    }

    #[test]
    fn dropout_changes_the_fused_output_only_with_grad() {
        // With p > 0 the training forward differs from the no-grad one (the mask is applied),
        // and the fused op draws the same mask as the unfused one (checked above).
        let gpu = Gpu::shared().unwrap();
        let x = Tensor::from_f32(&gpu, &rand_vec(50, 6 * 10, 1.0), &[6, 10]).unwrap();
        let w = Tensor::from_f32(&gpu, &rand_vec(51, 4 * 10, 0.5), &[4, 10]).unwrap();
        let a = Tensor::from_f32(&gpu, &rand_vec(52, 3 * 10, 0.5), &[3, 10]).unwrap();
        let b = Tensor::from_f32(&gpu, &rand_vec(53, 4 * 3, 0.5), &[4, 3]).unwrap();
        let y = |tape: Tape| {
            let (xv, wv, av, bv) =
                (tape.input(x.clone()), tape.constant(w.clone()), tape.constant(a.clone()), tape.constant(b.clone()));
            lora_linear(&xv, &wv, None, Some((&av, &bv, 2.0, 0.5, 1, 0))).unwrap().value.to_vec_f32().unwrap()
        };
        let (train, infer) = (y(Tape::new()), y(Tape::no_grad()));
        assert!(train.iter().zip(&infer).any(|(a, b)| (a - b).abs() > 1e-3));
    }

    #[test]
    fn adapter_starts_as_identity_then_merge_matches_unmerged() {
        let gpu = Gpu::shared().unwrap();
        let (n, d_in, d_out) = (3, 33, 7);
        let w = Param::new(
            "m.q_proj.weight",
            Tensor::from_f32(&gpu, &rand_vec(1, d_out * d_in, 0.3), &[d_out, d_in]).unwrap(),
        );
        let mut lin = LoraLinear::new(w, None);
        let x = Tensor::from_f32(&gpu, &rand_vec(2, n * d_in, 1.0), &[n, d_in]).unwrap();
        let run = |lin: &LoraLinear| {
            lin.forward(&Tape::no_grad(), &Tape::no_grad().constant(x.clone())).unwrap().value.to_vec_f32().unwrap()
        };
        let base = run(&lin);
        let cfg = LoraConfig::new(4, 8.0, 0.1, &["q", "v"]).unwrap();
        lin.attach(&cfg, 9).unwrap();
        assert_eq!(lin.lora.as_ref().unwrap().a.name, "m.q_proj.lora_A.weight");
        assert_close("B = 0 keeps the output", &run(&lin), &base, 0.0, 0.0);
        // Give B values, compare unmerged vs merged (f32 and f16 base).
        let l = lin.lora.as_ref().unwrap();
        l.b.value.write_f32(&rand_vec(3, d_out * 4, 0.5)).unwrap();
        let unmerged = run(&lin);
        assert!(unmerged.iter().zip(&base).any(|(a, b)| (a - b).abs() > 1e-3));
        let mut lin16 = LoraLinear::new(Param::new("w16", lin.weight.value.duplicate().unwrap()), None);
        lin16.lora = Some(LoraAdapter {
            a: Param::new("a", l.a.value.duplicate().unwrap()),
            b: Param::new("b", l.b.value.duplicate().unwrap()),
            scale: l.scale,
            dropout: 0.0,
            seed: 0,
            calls: Cell::new(0),
        });
        lin.merge().unwrap();
        assert!(lin.lora.is_none());
        assert_close("merged", &run(&lin), &unmerged, 1e-4, 1e-5);
        lin16.freeze_base(true).unwrap();
        assert_eq!(lin16.weight.value.dtype(), DType::F16);
        assert_close("f16 base, unmerged", &run(&lin16), &unmerged, 1e-2, 1e-2);
        lin16.merge().unwrap();
        assert_close("f16 base, merged", &run(&lin16), &unmerged, 1e-2, 1e-2);
    }

    #[test]
    fn config_rejects_bad_targets() {
        assert!(LoraConfig::new(8, 16.0, 0.05, &["q", "up_proj"]).unwrap().targets("up_proj"));
        let e = LoraConfig::new(8, 16.0, 0.0, &["qq"]).unwrap_err().to_string();
        assert!(e.contains("qq"), "{e}");
        assert!(LoraConfig::new(0, 16.0, 0.0, &["q"]).is_err());
        assert!(LoraConfig::new(4, 16.0, 1.5, &["q"]).is_err());
    }
}
