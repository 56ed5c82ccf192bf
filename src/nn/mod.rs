//! Layers built on `autograd`: each owns its `Param`s and has a `forward` on
//! `Var`s. Weight layouts follow Hugging Face so checkpoints load directly
//! (`Linear.weight` is [out, in]).

pub mod kv_cache;
pub mod lora;
pub mod optim;
pub mod state;

use std::rc::Rc;

use anyhow::Result;
use rand::{Rng, SeedableRng};

use crate::autograd::{Param, Tape, Var};
use crate::gpu::{Gpu, Tensor};
use crate::ops::Act;

/// Deterministic uniform(-bound, bound) initial values.
pub fn uniform_init(seed: u64, n: usize, bound: f32) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-bound..bound)).collect()
}

/// Deterministic normal(0, std) initial values (Box-Muller).
pub fn normal_init(seed: u64, n: usize, std: f32) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let u1: f32 = rng.gen_range(f32::EPSILON..1.0);
            let u2: f32 = rng.gen_range(0.0..1.0);
            std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect()
}

/// y = act(x W^T + b), W: [out, in] (PyTorch/HF layout).
pub struct Linear {
    pub weight: Rc<Param>,
    pub bias: Option<Rc<Param>>,
    pub act: Act,
}

impl Linear {
    /// PyTorch's default init: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias.
    pub fn new(gpu: &Gpu, name: &str, d_in: usize, d_out: usize, bias: bool, act: Act, seed: u64) -> Result<Linear> {
        let bound = 1.0 / (d_in as f32).sqrt();
        let w = Tensor::from_f32(gpu, &uniform_init(seed, d_in * d_out, bound), &[d_out, d_in])?;
        let b = if bias {
            let t = Tensor::from_f32(gpu, &uniform_init(seed ^ 0x9e37, d_out, bound), &[d_out])?;
            Some(Param::new(format!("{name}.bias"), t))
        } else {
            None
        };
        Ok(Linear { weight: Param::new(format!("{name}.weight"), w), bias: b, act })
    }

    pub fn forward(&self, tape: &Tape, x: &Var) -> Result<Var> {
        let w = tape.param(&self.weight);
        let b = self.bias.as_ref().map(|b| tape.param(b));
        x.linear(&w, b.as_ref(), true, self.act)
    }

    pub fn params(&self) -> Vec<Rc<Param>> {
        let mut v = vec![self.weight.clone()];
        v.extend(self.bias.clone());
        v
    }
}

/// LayerNorm over the last axis (weight 1, bias 0 at init).
pub struct LayerNorm {
    pub weight: Rc<Param>,
    pub bias: Rc<Param>,
    pub eps: f32,
}

impl LayerNorm {
    pub fn new(gpu: &Gpu, name: &str, d: usize, eps: f32) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: Param::new(format!("{name}.weight"), Tensor::from_f32(gpu, &vec![1.0; d], &[d])?),
            bias: Param::new(format!("{name}.bias"), Tensor::from_f32(gpu, &vec![0.0; d], &[d])?),
            eps,
        })
    }
    pub fn forward(&self, tape: &Tape, x: &Var) -> Result<Var> {
        x.layer_norm(&tape.param(&self.weight), &tape.param(&self.bias), self.eps)
    }
    pub fn params(&self) -> Vec<Rc<Param>> {
        vec![self.weight.clone(), self.bias.clone()]
    }
}

pub use crate::ops::batchnorm::BnMode;

/// BatchNorm1d over the rows of `[n, c]` inputs (PyTorch's defaults: weight
/// 1, bias 0, running mean 0, running var 1, eps 1e-5, momentum 0.1). The
/// running statistics are state, not parameters: [`BatchNorm1d::buffers`]
/// lists them for checkpoints (`{name}.running_mean`, `{name}.running_var`).
pub struct BatchNorm1d {
    pub weight: Rc<Param>,
    pub bias: Rc<Param>,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub name: String,
    pub eps: f32,
    pub momentum: f32,
}

impl BatchNorm1d {
    pub fn new(gpu: &Gpu, name: &str, c: usize) -> Result<BatchNorm1d> {
        Ok(BatchNorm1d {
            weight: Param::new(format!("{name}.weight"), Tensor::from_f32(gpu, &vec![1.0; c], &[c])?),
            bias: Param::new(format!("{name}.bias"), Tensor::from_f32(gpu, &vec![0.0; c], &[c])?),
            running_mean: Tensor::from_f32(gpu, &vec![0.0; c], &[c])?,
            running_var: Tensor::from_f32(gpu, &vec![1.0; c], &[c])?,
            name: name.to_string(),
            eps: 1e-5,
            momentum: 0.1,
        })
    }

    /// `x: [n, c]` -> `[n, c]`. `Train` also updates the running statistics
    /// (n >= 2 in `Train` / `BatchStats`).
    pub fn forward(&self, tape: &Tape, x: &Var, mode: BnMode) -> Result<Var> {
        let (w, b) = (tape.param(&self.weight), tape.param(&self.bias));
        x.batch_norm(&w, &b, &self.running_mean, &self.running_var, mode, self.momentum, self.eps)
    }

    pub fn params(&self) -> Vec<Rc<Param>> {
        vec![self.weight.clone(), self.bias.clone()]
    }

    /// The running statistics with their checkpoint names.
    pub fn buffers(&self) -> Vec<(String, &Tensor)> {
        vec![
            (format!("{}.running_mean", self.name), &self.running_mean),
            (format!("{}.running_var", self.name), &self.running_var),
        ]
    }
}

/// RMSNorm over the last axis (weight 1 at init).
pub struct RmsNorm {
    pub weight: Rc<Param>,
    pub eps: f32,
}

impl RmsNorm {
    pub fn new(gpu: &Gpu, name: &str, d: usize, eps: f32) -> Result<RmsNorm> {
        Ok(RmsNorm { weight: Param::new(format!("{name}.weight"), Tensor::from_f32(gpu, &vec![1.0; d], &[d])?), eps })
    }
    pub fn forward(&self, tape: &Tape, x: &Var) -> Result<Var> {
        x.rms_norm(&tape.param(&self.weight), self.eps)
    }
}

/// A lookup table [V, D].
pub struct Embedding {
    pub weight: Rc<Param>,
}

impl Embedding {
    /// Normal(0, std) init.
    pub fn new(gpu: &Gpu, name: &str, vocab: usize, d: usize, std: f32, seed: u64) -> Result<Embedding> {
        let t = Tensor::from_f32(gpu, &normal_init(seed, vocab * d, std), &[vocab, d])?;
        Ok(Embedding { weight: Param::new(format!("{name}.weight"), t) })
    }
    /// ids: U32 of any shape -> [..., D].
    pub fn forward(&self, tape: &Tape, ids: &Tensor) -> Result<Var> {
        crate::autograd::embedding(&tape.param(&self.weight), ids)
    }
}

/// Multi-head (grouped-query) attention with separate q/k/v/o projections.
/// x: [B, T, D] -> [B, T, D]. The mask is data (`ops::attention::Mask`).
pub struct MultiHeadAttention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl MultiHeadAttention {
    pub fn new(gpu: &Gpu, name: &str, d: usize, heads: usize, kv_heads: usize, bias: bool, seed: u64) -> Result<Self> {
        anyhow::ensure!(
            d.is_multiple_of(heads) && heads.is_multiple_of(kv_heads),
            "{name}: d_model {d} / heads {heads} / kv heads {kv_heads} do not divide"
        );
        let hd = d / heads;
        Ok(MultiHeadAttention {
            q: Linear::new(gpu, &format!("{name}.q_proj"), d, heads * hd, bias, Act::None, seed)?,
            k: Linear::new(gpu, &format!("{name}.k_proj"), d, kv_heads * hd, bias, Act::None, seed + 1)?,
            v: Linear::new(gpu, &format!("{name}.v_proj"), d, kv_heads * hd, bias, Act::None, seed + 2)?,
            o: Linear::new(gpu, &format!("{name}.o_proj"), heads * hd, d, bias, Act::None, seed + 3)?,
            heads,
            kv_heads,
            head_dim: hd,
        })
    }

    /// [B, T, H*Dh] -> [B, H, T, Dh]
    fn split(x: &Var, heads: usize, hd: usize) -> Result<Var> {
        let s = x.shape();
        x.reshape(&[s[0], s[1], heads, hd])?.permute(&[0, 2, 1, 3])
    }

    /// Attention of queries from `xq` [B, Tq, D] over keys/values from `xkv` [B, Tk, D].
    pub fn forward(&self, tape: &Tape, xq: &Var, xkv: &Var, mask: &crate::ops::attention::Mask) -> Result<Var> {
        let (b, tq) = (xq.shape()[0], xq.shape()[1]);
        let q = Self::split(&self.q.forward(tape, xq)?, self.heads, self.head_dim)?;
        let k = Self::split(&self.k.forward(tape, xkv)?, self.kv_heads, self.head_dim)?;
        let v = Self::split(&self.v.forward(tape, xkv)?, self.kv_heads, self.head_dim)?;
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        let a = crate::autograd::attention(&q, &k, &v, None, mask, scale)?;
        let merged = a.permute(&[0, 2, 1, 3])?.reshape(&[b, tq, self.heads * self.head_dim])?;
        self.o.forward(tape, &merged)
    }

    pub fn params(&self) -> Vec<Rc<Param>> {
        [self.q.params(), self.k.params(), self.v.params(), self.o.params()].concat()
    }
}
