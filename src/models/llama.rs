//! LLaMA-family decoder (LLaMA, SmolLM2, Qwen2): RMSNorm, RoPE ("rotate_half"), SwiGLU,
//! grouped-query attention, optional q/k/v bias (Qwen2) and a tied or untied LM head.
//!
//! Two paths over the same weights:
//! - **Training** ([`Llama::forward`]): the whole `[B, T]` batch through the autograd tape,
//!   causal attention with padding as mask data, logits `[B*T, V]`.
//! - **Inference** ([`Llama::session`], [`LlamaSession`]): prefill the prompts into a KV cache
//!   (`nn::kv_cache` on `ops::kv_cache`), then one token per row and step. Prompts of different lengths are
//!   left-padded; the cache is reordered on the GPU (beam search), and the session implements
//!   [`crate::decode::StepModel`]. [`Llama::generate_greedy`] decodes greedily on top of it.
//!
//! Weights use Hugging Face names and layouts (`model.layers.0.self_attn.q_proj.weight` is
//! `[out, in]`); they load from HF safetensors + config.json ([`Llama::from_hf_dir`]) or from a
//! GGUF file ([`Llama::from_gguf`], dequantized on load, llama.cpp's Q/K row permutation undone
//! by `io::gguf`). Positions follow HF: token t of a (right-padded) training batch has position
//! t; in a session each row counts positions from its first real token.
//!
//! LoRA: [`Llama::apply_lora`] freezes the base model and attaches adapters to the chosen
//! projections (`nn::lora`); [`Llama::export_peft`] writes them in PEFT's layout.

use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;

use anyhow::{anyhow, bail, Context, Result};

use crate::autograd::{self, Param, Tape, Var};
use crate::decode::StepModel;
use crate::gpu::{shape_str, DType, Gpu, Tensor};
use crate::io::gguf::Gguf;
use crate::io::HostTensor;
use crate::nn::kv_cache::KvCache;
use crate::nn::lora::{export_peft, LoraAdapter, LoraConfig, LoraLinear};
use crate::nn::normal_init;
use crate::ops;
use crate::ops::attention::{Mask, MaskKind, MaskSpec};
use crate::ops::kv_cache::{gather_rows, kv_write};

/// Hyper-parameters of a LLaMA-family model.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LlamaConfig {
    /// "llama" or "qwen2" (HF `model_type` / GGUF `general.architecture`).
    pub arch: String,
    pub vocab: usize,
    /// Hidden size.
    pub d: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// SwiGLU inner size.
    pub ffn: usize,
    pub rope_theta: f32,
    pub eps: f32,
    /// LM head shares the token embedding.
    pub tied: bool,
    /// q/k/v projections have biases (Qwen2; LLaMA with `attention_bias`).
    pub qkv_bias: bool,
    /// o_proj has a bias (LLaMA with `attention_bias`).
    pub o_bias: bool,
    /// Trained context length (0 if unknown); informational.
    pub max_positions: usize,
}

impl LlamaConfig {
    /// From GGUF metadata (`<arch>.*` keys, see `io::gguf::Gguf::llama_config`).
    pub fn from_gguf(g: &Gguf) -> Result<LlamaConfig> {
        let c = g.llama_config()?;
        let p = g.path().display();
        if c.arch != "llama" && c.arch != "qwen2" {
            bail!("{p}: unsupported architecture {:?} (supported: llama, qwen2)", c.arch);
        }
        if c.rope_dim != c.head_dim {
            bail!(
                "{p}: partial rotary embeddings (rope dim {} of head dim {}) are not supported",
                c.rope_dim,
                c.head_dim
            );
        }
        let has = |n: &str| g.tensor_info(n).is_ok();
        Ok(LlamaConfig {
            arch: c.arch.clone(),
            vocab: c.vocab_size,
            d: c.n_embd,
            layers: c.n_layer,
            heads: c.n_head,
            kv_heads: c.n_head_kv,
            head_dim: c.head_dim,
            ffn: c.n_ff,
            rope_theta: c.rope_theta,
            eps: c.rms_norm_eps,
            tied: c.tied_embeddings,
            qkv_bias: has("blk.0.attn_q.bias"),
            o_bias: has("blk.0.attn_output.bias"),
            max_positions: c.context_length,
        })
        .and_then(|cfg| cfg.validate(&p.to_string()).map(|_| cfg))
    }

    /// From a Hugging Face `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<LlamaConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
        Self::from_hf_value(&v, &path.display().to_string())
    }

    /// From a parsed HF config (`what` names the source in errors). Reads `rope_theta` at the
    /// top level (transformers 4) or under `rope_parameters` (transformers 5).
    pub fn from_hf_value(v: &serde_json::Value, what: &str) -> Result<LlamaConfig> {
        let arch = v.get("model_type").and_then(|x| x.as_str()).unwrap_or("").to_string();
        if arch != "llama" && arch != "qwen2" {
            bail!("{what}: unknown architecture model_type {arch:?} (supported: llama, qwen2)");
        }
        let u = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .ok_or_else(|| anyhow!("{what}: missing integer {k:?}"))
        };
        let heads = u("num_attention_heads")?;
        let d = u("hidden_size")?;
        let kv_heads = u("num_key_value_heads").unwrap_or(heads);
        let head_dim = match v.get("head_dim").and_then(|x| x.as_u64()) {
            Some(h) => h as usize,
            None => d / heads.max(1),
        };
        let theta = v
            .get("rope_theta")
            .or_else(|| v.get("rope_parameters").and_then(|r| r.get("rope_theta")))
            .and_then(|x| x.as_f64())
            .unwrap_or(10000.0);
        if let Some(rs) = v.get("rope_scaling").filter(|x| !x.is_null()) {
            bail!("{what}: rope_scaling {rs} is not supported");
        }
        if let Some(rt) = v.get("rope_parameters").and_then(|r| r.get("rope_type")).and_then(|x| x.as_str()) {
            if rt != "default" {
                bail!("{what}: rope_type {rt:?} is not supported (only \"default\")");
            }
        }
        if v.get("mlp_bias").and_then(|x| x.as_bool()).unwrap_or(false) {
            bail!("{what}: mlp_bias is not supported");
        }
        if let Some(act) = v.get("hidden_act").and_then(|x| x.as_str()) {
            if act != "silu" {
                bail!("{what}: hidden_act {act:?} is not supported (only silu)");
            }
        }
        let attention_bias = v.get("attention_bias").and_then(|x| x.as_bool()).unwrap_or(false);
        let cfg = LlamaConfig {
            vocab: u("vocab_size")?,
            d,
            layers: u("num_hidden_layers")?,
            heads,
            kv_heads,
            head_dim,
            ffn: u("intermediate_size")?,
            rope_theta: theta as f32,
            eps: v.get("rms_norm_eps").and_then(|x| x.as_f64()).unwrap_or(1e-6) as f32,
            tied: v.get("tie_word_embeddings").and_then(|x| x.as_bool()).unwrap_or(true),
            qkv_bias: arch == "qwen2" || attention_bias,
            o_bias: attention_bias,
            max_positions: u("max_position_embeddings").unwrap_or(0),
            arch,
        };
        cfg.validate(what)?;
        Ok(cfg)
    }

    fn validate(&self, what: &str) -> Result<()> {
        if self.vocab == 0 || self.d == 0 || self.layers == 0 || self.ffn == 0 {
            bail!("{what}: empty model (vocab {}, d {}, layers {}, ffn {})", self.vocab, self.d, self.layers, self.ffn);
        }
        if self.heads == 0 || self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            bail!("{what}: {} heads are not a multiple of {} KV heads", self.heads, self.kv_heads);
        }
        if !self.head_dim.is_multiple_of(4) || self.head_dim > 128 {
            bail!("{what}: head dim {} must be a multiple of 4 and <= 128 (attention kernel)", self.head_dim);
        }
        Ok(())
    }

    /// The HF `config.json` of this configuration (for exporting a model transformers can load).
    pub fn to_hf_json(&self) -> serde_json::Value {
        serde_json::json!({
            "model_type": self.arch,
            "architectures": [if self.arch == "qwen2" { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
            "vocab_size": self.vocab,
            "hidden_size": self.d,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.ffn,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.eps,
            "tie_word_embeddings": self.tied,
            "attention_bias": self.o_bias,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_positions.max(2048),
        })
    }
}

/// One decoder block.
pub struct LlamaLayer {
    pub attn_norm: Rc<Param>,
    pub q: LoraLinear,
    pub k: LoraLinear,
    pub v: LoraLinear,
    pub o: LoraLinear,
    pub ffn_norm: Rc<Param>,
    pub gate: LoraLinear,
    pub up: LoraLinear,
    pub down: LoraLinear,
}

impl LlamaLayer {
    /// (HF module name, projection) for every projection.
    pub fn projections(&self) -> [(&'static str, &LoraLinear); 7] {
        [
            ("self_attn.q_proj", &self.q),
            ("self_attn.k_proj", &self.k),
            ("self_attn.v_proj", &self.v),
            ("self_attn.o_proj", &self.o),
            ("mlp.gate_proj", &self.gate),
            ("mlp.up_proj", &self.up),
            ("mlp.down_proj", &self.down),
        ]
    }
    fn projections_mut(&mut self) -> [(&'static str, &mut LoraLinear); 7] {
        [
            ("self_attn.q_proj", &mut self.q),
            ("self_attn.k_proj", &mut self.k),
            ("self_attn.v_proj", &mut self.v),
            ("self_attn.o_proj", &mut self.o),
            ("mlp.gate_proj", &mut self.gate),
            ("mlp.up_proj", &mut self.up),
            ("mlp.down_proj", &mut self.down),
        ]
    }
}

/// A LLaMA-family causal LM on the GPU.
pub struct Llama {
    pub cfg: LlamaConfig,
    /// `model.embed_tokens.weight` `[V, d]`.
    pub embed: Rc<Param>,
    pub layers: Vec<LlamaLayer>,
    /// `model.norm.weight` `[d]`.
    pub norm: Rc<Param>,
    /// `lm_head.weight` `[V, d]`; None when tied to `embed`.
    pub lm_head: Option<Rc<Param>>,
    gpu: Gpu,
}

/// Where a tensor comes from, for error messages.
struct Source<'a> {
    what: &'a str,
    tensors: &'a BTreeMap<String, HostTensor>,
}

impl Source<'_> {
    fn get(&self, gpu: &Gpu, name: &str, shape: &[usize]) -> Result<Rc<Param>> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| anyhow!("{}: missing tensor {name:?} (expected shape {})", self.what, shape_str(shape)))?;
        if t.shape != shape {
            bail!("{}: tensor {name:?} has shape {}, expected {}", self.what, shape_str(&t.shape), shape_str(shape));
        }
        Ok(Param::new(name, Tensor::from_f32(gpu, &t.data, shape)?))
    }
}

/// RoPE on a `[B, H, T, Dh]` tape value (positions as in `ops::rope`); backward = inverse rotation.
fn rope_var(x: &Var, positions: Option<&Tensor>, theta: f32) -> Result<Var> {
    let y = ops::rope::rope(&x.value, positions, theta, 0)?;
    let pos = positions.cloned();
    Ok(x.tape().record(y, &[x], move |g| Ok(vec![Some(ops::rope::rope_backward(g, pos.as_ref(), theta, 0)?)])))
}

/// `[B, T, H*Dh]` -> `[B, H, T, Dh]` (a view when T = 1).
fn split_heads(x: &Var, heads: usize, hd: usize) -> Result<Var> {
    let (b, t) = (x.shape()[0], x.shape()[1]);
    if t == 1 {
        return x.reshape(&[b, heads, 1, hd]);
    }
    x.reshape(&[b, t, heads, hd])?.permute(&[0, 2, 1, 3])
}

/// `[B, H, T, Dh]` -> `[B, T, H*Dh]`.
fn merge_heads(x: &Var) -> Result<Var> {
    let s = x.shape().to_vec();
    let (b, h, t, hd) = (s[0], s[1], s[2], s[3]);
    if t == 1 {
        return x.reshape(&[b, 1, h * hd]);
    }
    x.permute(&[0, 2, 1, 3])?.reshape(&[b, t, h * hd])
}

impl Llama {
    /// The device the weights live on.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Build from HF-named host tensors (`what` names the source in errors). Missing or
    /// misshaped tensors are errors naming the tensor; unknown extra tensors are ignored.
    pub fn from_tensors(
        gpu: &Gpu,
        cfg: LlamaConfig,
        tensors: &BTreeMap<String, HostTensor>,
        what: &str,
    ) -> Result<Llama> {
        cfg.validate(what)?;
        let s = Source { what, tensors };
        let (d, hd) = (cfg.d, cfg.head_dim);
        let (qd, kvd) = (cfg.heads * hd, cfg.kv_heads * hd);
        let lin = |name: String, out: usize, inp: usize, bias: bool| -> Result<LoraLinear> {
            let w = s.get(gpu, &format!("{name}.weight"), &[out, inp])?;
            let b = if bias { Some(s.get(gpu, &format!("{name}.bias"), &[out])?) } else { None };
            Ok(LoraLinear::new(w, b))
        };
        let mut layers = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let p = format!("model.layers.{l}");
            layers.push(LlamaLayer {
                attn_norm: s.get(gpu, &format!("{p}.input_layernorm.weight"), &[d])?,
                q: lin(format!("{p}.self_attn.q_proj"), qd, d, cfg.qkv_bias)?,
                k: lin(format!("{p}.self_attn.k_proj"), kvd, d, cfg.qkv_bias)?,
                v: lin(format!("{p}.self_attn.v_proj"), kvd, d, cfg.qkv_bias)?,
                o: lin(format!("{p}.self_attn.o_proj"), d, qd, cfg.o_bias)?,
                ffn_norm: s.get(gpu, &format!("{p}.post_attention_layernorm.weight"), &[d])?,
                gate: lin(format!("{p}.mlp.gate_proj"), cfg.ffn, d, false)?,
                up: lin(format!("{p}.mlp.up_proj"), cfg.ffn, d, false)?,
                down: lin(format!("{p}.mlp.down_proj"), d, cfg.ffn, false)?,
            });
        }
        let embed = s.get(gpu, "model.embed_tokens.weight", &[cfg.vocab, d])?;
        let lm_head = if cfg.tied { None } else { Some(s.get(gpu, "lm_head.weight", &[cfg.vocab, d])?) };
        let norm = s.get(gpu, "model.norm.weight", &[d])?;
        Ok(Llama { cfg, embed, layers, norm, lm_head, gpu: gpu.clone() })
    }

    /// Load a GGUF file (llama or qwen2 architecture; F32/F16/BF16/Q8_0/Q4_0/Q4_1 dequantized).
    pub fn from_gguf(gpu: &Gpu, path: impl AsRef<Path>) -> Result<Llama> {
        let path = path.as_ref();
        let g = Gguf::open(path)?;
        let cfg = LlamaConfig::from_gguf(&g)?;
        let tensors = g.hf_tensors()?;
        Self::from_tensors(gpu, cfg, &tensors, &path.display().to_string())
    }

    /// Load a HF checkpoint directory: `config.json` + `model.safetensors`.
    pub fn from_hf_dir(gpu: &Gpu, dir: impl AsRef<Path>) -> Result<Llama> {
        let dir = dir.as_ref();
        let cfg = LlamaConfig::from_hf_json(&dir.join("config.json"))?;
        let st = dir.join("model.safetensors");
        let tensors = crate::io::safetensors::load(&st)?;
        Self::from_tensors(gpu, cfg, &tensors, &st.display().to_string())
    }

    /// Random weights (normal, std 0.02 like HF; norms 1; biases 0), deterministic in `seed`.
    pub fn new_random(gpu: &Gpu, cfg: LlamaConfig, seed: u64) -> Result<Llama> {
        let mut tensors = BTreeMap::new();
        let mut k = seed;
        let mut put = |name: String, shape: &[usize], init: &str| -> Result<()> {
            k += 1;
            let n: usize = shape.iter().product();
            let data = match init {
                "one" => vec![1.0; n],
                "zero" => vec![0.0; n],
                _ => normal_init(k, n, 0.02),
            };
            tensors.insert(name, HostTensor::new(shape, data)?);
            Ok(())
        };
        let (d, hd) = (cfg.d, cfg.head_dim);
        put("model.embed_tokens.weight".into(), &[cfg.vocab, d], "w")?;
        if !cfg.tied {
            put("lm_head.weight".into(), &[cfg.vocab, d], "w")?;
        }
        put("model.norm.weight".into(), &[d], "one")?;
        for l in 0..cfg.layers {
            let p = format!("model.layers.{l}");
            put(format!("{p}.input_layernorm.weight"), &[d], "one")?;
            put(format!("{p}.post_attention_layernorm.weight"), &[d], "one")?;
            for (m, out, inp, bias) in [
                ("self_attn.q_proj", cfg.heads * hd, d, cfg.qkv_bias),
                ("self_attn.k_proj", cfg.kv_heads * hd, d, cfg.qkv_bias),
                ("self_attn.v_proj", cfg.kv_heads * hd, d, cfg.qkv_bias),
                ("self_attn.o_proj", d, cfg.heads * hd, cfg.o_bias),
                ("mlp.gate_proj", cfg.ffn, d, false),
                ("mlp.up_proj", cfg.ffn, d, false),
                ("mlp.down_proj", d, cfg.ffn, false),
            ] {
                put(format!("{p}.{m}.weight"), &[out, inp], "w")?;
                if bias {
                    put(format!("{p}.{m}.bias"), &[out], "zero")?;
                }
            }
        }
        Self::from_tensors(gpu, cfg, &tensors, "random init")
    }

    /// Every parameter by HF name (the tied head is only `model.embed_tokens.weight`; with LoRA
    /// attached, the adapters appear under their PEFT-style names too).
    pub fn named_params(&self) -> BTreeMap<String, Rc<Param>> {
        let mut m = BTreeMap::new();
        let mut add = |p: &Rc<Param>| {
            m.insert(p.name.clone(), p.clone());
        };
        add(&self.embed);
        add(&self.norm);
        if let Some(h) = &self.lm_head {
            add(h);
        }
        for l in &self.layers {
            add(&l.attn_norm);
            add(&l.ffn_norm);
            for (_, p) in l.projections() {
                add(&p.weight);
                if let Some(b) = &p.bias {
                    add(b);
                }
                if let Some(a) = &p.lora {
                    add(&a.a);
                    add(&a.b);
                }
            }
        }
        m
    }

    /// The parameters an optimizer should update: all non-frozen ones.
    pub fn params(&self) -> Vec<Rc<Param>> {
        self.named_params().into_values().filter(|p| !p.frozen.get()).collect()
    }

    /// A causal mask for a right- or left-padded batch: `valid[b][t]` marks real tokens.
    /// Padded keys are invisible; padded queries see nothing (their outputs are zero).
    pub fn padding_mask(gpu: &Gpu, valid: &[Vec<bool>]) -> Result<Mask> {
        let seg: Vec<Vec<i32>> = valid.iter().map(|r| r.iter().map(|&v| if v { 0 } else { -1 }).collect()).collect();
        let tq = seg.first().map(|r| r.len()).unwrap_or(0);
        MaskSpec::from_sequence(MaskKind::Causal, &seg, tq)?.upload(gpu)
    }

    fn check_ids(&self, ids: &Tensor) -> Result<()> {
        if ids.dtype() != DType::U32 || ids.rank() != 2 {
            bail!("llama: ids must be u32 [B, T], got {:?} {}", ids.dtype(), shape_str(ids.shape()));
        }
        Ok(())
    }

    /// One decoder block on `x` `[B, T, d]`. With `cache = Some((cache, layer))` the new keys and
    /// values are written at slot `cache.len` and attention runs over the whole cache.
    fn block(
        &self,
        tape: &Tape,
        l: usize,
        x: &Var,
        mask: &Mask,
        positions: Option<&Tensor>,
        cache: Option<&KvCache>,
    ) -> Result<Var> {
        let c = &self.cfg;
        let layer = &self.layers[l];
        let h = x.rms_norm(&tape.param(&layer.attn_norm), c.eps)?;
        let q = split_heads(&layer.q.forward(tape, &h)?, c.heads, c.head_dim)?;
        let k = split_heads(&layer.k.forward(tape, &h)?, c.kv_heads, c.head_dim)?;
        let v = split_heads(&layer.v.forward(tape, &h)?, c.kv_heads, c.head_dim)?;
        let q = rope_var(&q, positions, c.rope_theta)?;
        let k = rope_var(&k, positions, c.rope_theta)?;
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let a = match cache {
            None => autograd::attention(&q, &k, &v, None, mask, scale)?,
            Some(kv) => {
                kv_write(&kv.k[l], &k.value, kv.len)?;
                kv_write(&kv.v[l], &v.value, kv.len)?;
                let (kc, vc) = (tape.constant(kv.k[l].clone()), tape.constant(kv.v[l].clone()));
                autograd::attention(&q, &kc, &vc, None, mask, scale)?
            }
        };
        let x = x.add(&layer.o.forward(tape, &merge_heads(&a)?)?)?;
        let h = x.rms_norm(&tape.param(&layer.ffn_norm), c.eps)?;
        let f = layer.gate.forward(tape, &h)?.swiglu(&layer.up.forward(tape, &h)?)?;
        x.add(&layer.down.forward(tape, &f)?)
    }

    /// Final norm + LM head: `[..., d]` -> `[..., V]`.
    fn head(&self, tape: &Tape, h: &Var) -> Result<Var> {
        let h = h.rms_norm(&tape.param(&self.norm), self.cfg.eps)?;
        // The head is a linear over the (possibly tied) `[V, d]` table.
        LoraLinear::new(self.lm_head.as_ref().unwrap_or(&self.embed).clone(), None).forward(tape, &h)
    }

    /// Trainable forward: `ids` u32 `[B, T]`, `mask` over `[B, T]` (e.g. [`Llama::padding_mask`]),
    /// optional i32 positions `[T]` or `[B, T]` (default 0..T). Returns logits `[B*T, V]`.
    pub fn forward(&self, tape: &Tape, ids: &Tensor, mask: &Mask, positions: Option<&Tensor>) -> Result<Var> {
        self.check_ids(ids)?;
        let (b, t) = (ids.shape()[0], ids.shape()[1]);
        let mut x = autograd::embedding(&tape.param(&self.embed), ids)?;
        for l in 0..self.layers.len() {
            x = self.block(tape, l, &x, mask, positions, None)?;
        }
        self.head(tape, &x)?.reshape(&[b * t, self.cfg.vocab])
    }

    /// Trainable forward that applies the final norm and LM head only at the flattened
    /// positions `rows` (u32 `[N]`, indices into `B*T`, e.g. a response's positions): logits
    /// `[N, V]`. Same values as those rows of [`Llama::forward`], without the `[B*T, V]` tensor
    /// (which outgrows storage-binding limits at SmolLM2's 49k vocabulary).
    pub fn forward_at(
        &self,
        tape: &Tape,
        ids: &Tensor,
        mask: &Mask,
        positions: Option<&Tensor>,
        rows: &Tensor,
    ) -> Result<Var> {
        self.check_ids(ids)?;
        let (b, t) = (ids.shape()[0], ids.shape()[1]);
        if rows.dtype() != DType::U32 || rows.rank() != 1 {
            bail!("llama forward_at: rows must be u32 [N], got {:?} {}", rows.dtype(), shape_str(rows.shape()));
        }
        let mut x = autograd::embedding(&tape.param(&self.embed), ids)?;
        for l in 0..self.layers.len() {
            x = self.block(tape, l, &x, mask, positions, None)?;
        }
        let h = autograd::embedding(&x.reshape(&[b * t, self.cfg.d])?, rows)?;
        self.head(tape, &h)
    }

    /// Grow the vocabulary by `n` tokens (e.g. item codes): the embedding (and an untied head)
    /// get `n` new rows, each the mean of the existing rows plus normal noise of 0.02 x the rows'
    /// mean standard deviation. Tied models stay tied. Parameters are replaced: rebuild any
    /// optimizer afterwards. Returns the id of the first new token.
    pub fn add_tokens(&mut self, n: usize, seed: u64) -> Result<u32> {
        let first = self.cfg.vocab as u32;
        if n == 0 {
            return Ok(first);
        }
        let grow = |p: &Rc<Param>, seed: u64| -> Result<Rc<Param>> {
            let (v, d) = (p.value.shape()[0], p.value.shape()[1]);
            let mut data = p.value.to_vec_f32()?;
            let mut mean = vec![0f64; d];
            for row in data.chunks(d) {
                for (m, &x) in mean.iter_mut().zip(row) {
                    *m += x as f64 / v as f64;
                }
            }
            let var: f64 =
                data.chunks(d).flat_map(|r| r.iter().zip(&mean).map(|(&x, m)| (x as f64 - m).powi(2))).sum::<f64>()
                    / (v * d) as f64;
            let noise = normal_init(seed, n * d, 0.02 * var.sqrt() as f32);
            for i in 0..n {
                data.extend(mean.iter().zip(&noise[i * d..(i + 1) * d]).map(|(&m, &e)| m as f32 + e));
            }
            let t = Tensor::from_f32(p.value.gpu(), &data, &[v + n, d])?;
            let np = Param::new(p.name.clone(), t);
            np.frozen.set(p.frozen.get());
            Ok(np)
        };
        self.embed = grow(&self.embed, seed)?;
        if let Some(h) = &self.lm_head {
            self.lm_head = Some(grow(h, seed ^ 0xabcd)?);
        }
        self.cfg.vocab += n;
        Ok(first)
    }

    /// Freeze the base model and attach LoRA adapters to the projections `cfg` targets in every
    /// layer. With `f16_base`, frozen projection weights are stored as f16.
    pub fn apply_lora(&mut self, cfg: &LoraConfig, f16_base: bool, seed: u64) -> Result<()> {
        for p in self.named_params().values() {
            p.frozen.set(true);
        }
        for (l, layer) in self.layers.iter_mut().enumerate() {
            for (i, (name, proj)) in layer.projections_mut().into_iter().enumerate() {
                let module = name.rsplit('.').next().unwrap_or(name);
                if cfg.targets(module) {
                    proj.freeze_base(f16_base)?;
                    proj.attach(cfg, seed.wrapping_add((l * 7 + i) as u64 * 7919))?;
                }
            }
        }
        Ok(())
    }

    /// Every attached adapter with its HF module path (`model.layers.0.self_attn.q_proj`).
    pub fn adapters(&self) -> Vec<(String, &LoraAdapter)> {
        let mut v = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            for (name, proj) in layer.projections() {
                if let Some(a) = &proj.lora {
                    v.push((format!("model.layers.{l}.{name}"), a));
                }
            }
        }
        v
    }

    /// Fold every adapter into its base weight (inference).
    pub fn merge_lora(&mut self) -> Result<()> {
        for layer in &mut self.layers {
            for (_, proj) in layer.projections_mut() {
                proj.merge()?;
            }
        }
        Ok(())
    }

    /// Write the adapters in PEFT's layout (`adapter_model.safetensors` + `adapter_config.json`).
    pub fn export_peft(&self, dir: &Path, cfg: &LoraConfig, base_model: &str) -> Result<()> {
        export_peft(dir, cfg, base_model, &self.adapters())
    }

    /// Prefill `prompts` (token ids, each non-empty) into a fresh KV cache of `capacity` slots,
    /// repeated `beams` times per prompt (row r = prompt r / beams). Returns the session and the
    /// next-token logits `[prompts * beams, V]`.
    pub fn session(&self, prompts: &[Vec<u32>], beams: usize, capacity: usize) -> Result<(LlamaSession<'_>, Tensor)> {
        let b = prompts.len();
        if b == 0 || beams == 0 || prompts.iter().any(|p| p.is_empty()) {
            bail!("llama session: need >= 1 non-empty prompt and >= 1 beam (got {b} prompts, {beams} beams)");
        }
        let p = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        if capacity < p {
            bail!("llama session: capacity {capacity} is smaller than the longest prompt ({p} tokens)");
        }
        let vocab = self.cfg.vocab;
        let gpu = &self.gpu;
        let mut ids = Vec::with_capacity(b * p);
        let mut pos = Vec::with_capacity(b * p);
        let mut pads = Vec::with_capacity(b);
        for (r, pr) in prompts.iter().enumerate() {
            if let Some(&bad) = pr.iter().find(|&&t| t as usize >= vocab) {
                bail!("llama session: prompt {r} has token id {bad} outside the vocabulary ({vocab})");
            }
            let pad = p - pr.len();
            pads.push(pad as i32);
            ids.extend(std::iter::repeat_n(0u32, pad).chain(pr.iter().copied()));
            pos.extend((0..p).map(|s| s.saturating_sub(pad) as i32));
        }
        let ids_t = Tensor::from_u32(gpu, &ids, &[b, p])?;
        let pos_t = Tensor::from_i32(gpu, &pos, &[b, p])?;
        // Mask over the whole cache: query slot s of row r sees slots pad_r..=s.
        let mut spec = MaskSpec {
            kind: MaskKind::Causal,
            batch: b,
            tq: p,
            tk: capacity,
            q_seg: Vec::new(),
            q_pos: Vec::new(),
            k_seg: Vec::new(),
            k_pos: Vec::new(),
        };
        for &pad in &pads {
            spec.q_seg.extend((0..p as i32).map(|s| if s < pad { -1 } else { 0 }));
            spec.q_pos.extend(0..p as i32);
            spec.k_seg.extend((0..capacity as i32).map(|s| if s < pad { -1 } else { 0 }));
            spec.k_pos.extend(0..capacity as i32);
        }
        let mask = spec.upload(gpu)?;
        let c = &self.cfg;
        let mut cache = KvCache::new(gpu, c.layers, b, c.kv_heads, capacity, c.head_dim)?;
        cache.row_pad = Tensor::from_i32(gpu, &pads, &[b])?;
        let tape = Tape::no_grad();
        let mut x = autograd::embedding(&tape.param(&self.embed), &ids_t)?;
        for l in 0..self.layers.len() {
            x = self.block(&tape, l, &x, &mask, Some(&pos_t), Some(&cache))?;
        }
        cache.len = p;
        // Last slot of each row -> logits.
        let last: Vec<u32> = (0..b).map(|r| (r * p + p - 1) as u32).collect();
        let h = ops::embedding::gather(&x.value.reshape(&[b * p, c.d])?, &Tensor::from_u32(gpu, &last, &[b])?)?;
        let mut logits = self.head(&tape, &tape.constant(h))?.value;
        if beams > 1 {
            let parents: Vec<u32> = (0..b * beams).map(|r| (r / beams) as u32).collect();
            let pt = Tensor::from_u32(gpu, &parents, &[b * beams])?;
            cache.reorder(&pt)?;
            logits = gather_rows(&logits, &pt)?;
        }
        Ok((LlamaSession { model: self, cache }, logits))
    }

    /// Greedy decoding of `n` tokens after `prompt` (no stop token: exactly `n` ids).
    pub fn generate_greedy(&self, prompt: &[u32], n: usize) -> Result<Vec<u32>> {
        Ok(self.generate_greedy_batch(&[prompt.to_vec()], n)?.remove(0))
    }

    /// Greedy decoding of `n` tokens for each prompt, batched (prompts left-padded).
    pub fn generate_greedy_batch(&self, prompts: &[Vec<u32>], n: usize) -> Result<Vec<Vec<u32>>> {
        let p = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let mut out = vec![Vec::with_capacity(n); prompts.len()];
        if n == 0 {
            return Ok(out);
        }
        let (mut sess, mut logits) = self.session(prompts, 1, p + n)?;
        for step in 0..n {
            let next = argmax_rows(&logits)?;
            for (o, &t) in out.iter_mut().zip(&next) {
                o.push(t);
            }
            if step + 1 < n {
                logits = sess.step(&Tensor::from_u32(&self.gpu, &next, &[next.len()])?)?;
            }
        }
        Ok(out)
    }
}

/// Row-wise argmax of `[R, V]` logits read back to the host (first index on ties, as torch).
pub fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    let v = logits.last_dim();
    let data = logits.to_vec_f32()?;
    Ok(data
        .chunks(v)
        .map(|row| {
            let mut best = 0;
            for (i, &x) in row.iter().enumerate() {
                if x > row[best] {
                    best = i;
                }
            }
            best as u32
        })
        .collect())
}

/// A decoding session: the KV cache of `rows` rows over a model.
pub struct LlamaSession<'m> {
    model: &'m Llama,
    pub cache: KvCache,
}

impl LlamaSession<'_> {
    /// Rows decoded in parallel.
    pub fn rows(&self) -> usize {
        self.cache.rows()
    }
}

impl StepModel for LlamaSession<'_> {
    fn vocab(&self) -> usize {
        self.model.cfg.vocab
    }

    fn step(&mut self, tokens: &Tensor) -> Result<Tensor> {
        let rows = self.rows();
        if tokens.dtype() != DType::U32 || tokens.shape() != [rows] {
            bail!("llama step: tokens must be u32 [{rows}], got {:?} {}", tokens.dtype(), shape_str(tokens.shape()));
        }
        let m = self.model;
        let (mask, pos) = self.cache.step_meta()?;
        let tape = Tape::no_grad();
        let mut x = autograd::embedding(&tape.param(&m.embed), &tokens.reshape(&[rows, 1])?)?;
        for l in 0..m.layers.len() {
            x = m.block(&tape, l, &x, &mask, Some(&pos), Some(&self.cache))?;
        }
        self.cache.len += 1;
        m.head(&tape, &x)?.value.reshape(&[rows, m.cfg.vocab])
    }

    fn reorder(&mut self, parents: &Tensor) -> Result<()> {
        let rows = self.rows();
        if parents.dtype() != DType::U32 || parents.shape() != [rows] {
            bail!(
                "llama reorder: parents must be u32 [{rows}], got {:?} {}",
                parents.dtype(),
                shape_str(parents.shape())
            );
        }
        self.cache.reorder(parents)
    }
}

#[cfg(test)]
mod tests;
