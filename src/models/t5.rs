//! T5 encoder-decoder (TIGER size), trainable from scratch, with a KV-cached incremental
//! decoder for beam search.
//!
//! Semantics follow Hugging Face `T5ForConditionalGeneration` with `feed_forward_proj = "relu"`
//! and tied embeddings (letter.spec.md §2.4):
//! - no biases; T5 RMSNorm (no mean-centering) before every sublayer and once more at the end
//!   of each stack;
//! - attention logits are **not** scaled by 1/sqrt(d_kv);
//! - a relative position bias (`relative_attention_bias`, `[buckets, heads]`) computed in
//!   layer 0 of each stack and shared by all its layers: bidirectional buckets in the encoder,
//!   causal ones in the decoder; cross-attention has none;
//! - the LM head is the shared embedding, applied to the decoder output scaled by
//!   `d_model^-0.5`.
//!
//! Dropout (`T5Config::dropout`) is applied where HF applies it on hidden states (after the
//! embeddings, on each sublayer output before the residual add, after the FFN's ReLU, after
//! each stack's final norm). HF also drops attention probabilities; the fused attention kernel
//! never materializes them, so that one is left out (a deliberate, documented difference that
//! only matters in training mode).
//!
//! Layouts: hidden states `[B, T, d_model]`; per-head tensors `[B, H, T, d_kv]`; weights in
//! the HF layout (`Linear.weight` is `[out, in]`), under HF tensor names (`named_params`).
//!
//! Inference: [`T5::encode`] runs the encoder once; [`T5::decode_session`] prepares an
//! incremental decoder over `rows = batch * beams` rows (row `r = b * beams + k` reads user
//! `b`'s encoder output) that implements [`crate::decode::StepModel`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::rc::Rc;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::autograd::{embedding, Param, Tape, Var};
use crate::decode::StepModel;
use crate::gpu::{check, shape_str, DType, Gpu, Tensor};
use crate::io::safetensors::{SafeTensorsFile, StoreDtype};
use crate::io::HostTensor;
use crate::nn::normal_init;
use crate::ops::attention::{Mask, MaskKind, MaskSpec};
use crate::ops::matmul::{matmul, MatmulOpts};
use crate::ops::relbias::{self, RelBiasCfg};
use crate::ops::{self, Act};

/// Sizes and special tokens of a T5 model. Field names are genrec's; `from_hf_json` reads
/// a Hugging Face `config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct T5Config {
    pub vocab: usize,
    pub d_model: usize,
    /// Size of one attention head (`d_kv` in HF); a multiple of 4, at most 128.
    pub d_kv: usize,
    pub heads: usize,
    pub d_ff: usize,
    pub enc_layers: usize,
    pub dec_layers: usize,
    /// Relative position buckets (even; at most `ops::relbias::MAX_BUCKETS`).
    pub rel_buckets: usize,
    pub rel_max_distance: usize,
    /// Dropout probability in training mode.
    pub dropout: f32,
    /// RMSNorm epsilon.
    pub eps: f32,
    pub pad_id: u32,
    pub eos_id: u32,
    pub decoder_start_id: u32,
}

impl T5Config {
    /// TIGER's configuration (letter.spec.md §2.4): 4+4 layers, d_model 128, 6 heads x 64,
    /// FFN 1024 (ReLU), 32 buckets / max distance 128, dropout 0.1, eps 1e-6, pad 0, eos 1,
    /// decoder start 0.
    pub fn tiger(vocab: usize) -> T5Config {
        T5Config {
            vocab,
            d_model: 128,
            d_kv: 64,
            heads: 6,
            d_ff: 1024,
            enc_layers: 4,
            dec_layers: 4,
            rel_buckets: 32,
            rel_max_distance: 128,
            dropout: 0.1,
            eps: 1e-6,
            pad_id: 0,
            eos_id: 1,
            decoder_start_id: 0,
        }
    }

    /// Width of the concatenated heads (`heads * d_kv`).
    pub fn inner(&self) -> usize {
        self.heads * self.d_kv
    }

    /// Check that the sizes are usable by the kernels.
    pub fn validate(&self) -> Result<()> {
        let c = self;
        if c.vocab == 0 || c.d_model == 0 || c.heads == 0 || c.d_ff == 0 || c.enc_layers == 0 || c.dec_layers == 0 {
            bail!("T5Config: sizes must be positive: {c:?}");
        }
        if c.d_kv == 0 || !c.d_kv.is_multiple_of(4) || c.d_kv > 128 {
            bail!("T5Config: d_kv {} must be a positive multiple of 4, at most 128", c.d_kv);
        }
        if c.rel_buckets < 4 || !c.rel_buckets.is_multiple_of(2) || c.rel_buckets > relbias::MAX_BUCKETS {
            bail!("T5Config: rel_buckets {} must be even, in 4..={}", c.rel_buckets, relbias::MAX_BUCKETS);
        }
        if c.rel_max_distance == 0 {
            bail!("T5Config: rel_max_distance must be positive");
        }
        if !(0.0..1.0).contains(&c.dropout) {
            bail!("T5Config: dropout {} must be in [0, 1)", c.dropout);
        }
        for (n, id) in [("pad_id", c.pad_id), ("eos_id", c.eos_id), ("decoder_start_id", c.decoder_start_id)] {
            if id as usize >= c.vocab {
                bail!("T5Config: {n} {id} is outside the vocabulary of {}", c.vocab);
            }
        }
        Ok(())
    }

    /// Read a Hugging Face T5 `config.json` (text). Only the ReLU FFN and tied embeddings
    /// are supported; other variants are errors.
    pub fn from_hf_json(text: &str) -> Result<T5Config> {
        let v: serde_json::Value = serde_json::from_str(text).context("T5 config.json: not valid JSON")?;
        let get = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .with_context(|| format!("T5 config.json: missing or non-integer {k:?}"))
        };
        let getf = |k: &str, d: f64| v.get(k).and_then(|x| x.as_f64()).unwrap_or(d) as f32;
        let ff = v.get("feed_forward_proj").and_then(|x| x.as_str()).unwrap_or("relu");
        if ff != "relu" {
            bail!("T5 config.json: feed_forward_proj {ff:?} is not supported (only \"relu\")");
        }
        if v.get("tie_word_embeddings").and_then(|x| x.as_bool()) == Some(false) {
            bail!("T5 config.json: untied embeddings (tie_word_embeddings false) are not supported");
        }
        let enc_layers = get("num_layers")?;
        let cfg = T5Config {
            vocab: get("vocab_size")?,
            d_model: get("d_model")?,
            d_kv: get("d_kv")?,
            heads: get("num_heads")?,
            d_ff: get("d_ff")?,
            enc_layers,
            dec_layers: get("num_decoder_layers").unwrap_or(enc_layers),
            rel_buckets: get("relative_attention_num_buckets").unwrap_or(32),
            rel_max_distance: get("relative_attention_max_distance").unwrap_or(128),
            dropout: getf("dropout_rate", 0.1),
            eps: getf("layer_norm_epsilon", 1e-6),
            pad_id: get("pad_token_id").unwrap_or(0) as u32,
            eos_id: get("eos_token_id").unwrap_or(1) as u32,
            decoder_start_id: get("decoder_start_token_id").unwrap_or(0) as u32,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn enc_bias(&self) -> RelBiasCfg {
        RelBiasCfg { bidirectional: true, num_buckets: self.rel_buckets, max_distance: self.rel_max_distance }
    }
    fn dec_bias(&self) -> RelBiasCfg {
        RelBiasCfg { bidirectional: false, num_buckets: self.rel_buckets, max_distance: self.rel_max_distance }
    }
}

/// q/k/v `[inner, d_model]`, o `[d_model, inner]`.
#[derive(Clone)]
struct AttnW {
    q: Rc<Param>,
    k: Rc<Param>,
    v: Rc<Param>,
    o: Rc<Param>,
}

#[derive(Clone)]
struct EncLayer {
    ln_attn: Rc<Param>,
    attn: AttnW,
    ln_ff: Rc<Param>,
    /// `[d_ff, d_model]`
    wi: Rc<Param>,
    /// `[d_model, d_ff]`
    wo: Rc<Param>,
}

#[derive(Clone)]
struct DecLayer {
    ln_self: Rc<Param>,
    self_attn: AttnW,
    ln_cross: Rc<Param>,
    cross: AttnW,
    ln_ff: Rc<Param>,
    wi: Rc<Param>,
    wo: Rc<Param>,
}

/// The model. Cloning is cheap and shares the parameters.
#[derive(Clone)]
pub struct T5 {
    pub cfg: T5Config,
    gpu: Gpu,
    /// `[vocab, d_model]`: input embeddings of both stacks and the LM head.
    shared: Rc<Param>,
    enc: Vec<EncLayer>,
    /// `[rel_buckets, heads]`
    enc_rel: Rc<Param>,
    enc_norm: Rc<Param>,
    dec: Vec<DecLayer>,
    dec_rel: Rc<Param>,
    dec_norm: Rc<Param>,
}

/// One training/evaluation batch.
#[derive(Clone, Debug)]
pub struct T5Batch {
    /// u32 `[B, S]`, padding = `pad_id`.
    pub enc_ids: Tensor,
    /// `[B][S]`: false at padding positions (masked as keys in encoder self-attention and
    /// cross-attention). Every row needs at least one valid token.
    pub enc_valid: Vec<Vec<bool>>,
    /// u32 `[B, T]`: the labels shifted right, starting with `decoder_start_id`.
    pub dec_in: Tensor,
}

impl T5Batch {
    /// A batch from host rows: encoder rows padded (at the end) to the longest with `pad_id`,
    /// decoder inputs likewise. Ids are checked against the vocabulary.
    pub fn new(gpu: &Gpu, cfg: &T5Config, enc: &[Vec<u32>], dec_in: &[Vec<u32>]) -> Result<T5Batch> {
        if enc.is_empty() || enc.len() != dec_in.len() {
            bail!("T5Batch: {} encoder rows and {} decoder rows (need the same, >= 1)", enc.len(), dec_in.len());
        }
        let s = enc.iter().map(|r| r.len()).max().unwrap_or(0);
        let t = dec_in.iter().map(|r| r.len()).max().unwrap_or(0);
        if let Some(b) = enc.iter().position(|r| r.is_empty()) {
            bail!("T5Batch: encoder row {b} is empty");
        }
        if t == 0 {
            bail!("T5Batch: decoder inputs are empty");
        }
        let pad = |rows: &[Vec<u32>], n: usize| -> Vec<u32> {
            rows.iter().flat_map(|r| r.iter().copied().chain(std::iter::repeat(cfg.pad_id)).take(n)).collect()
        };
        let b = enc.len();
        let enc_ids = ops::embedding::ids_from_host(gpu, "T5Batch encoder ids", &pad(enc, s), &[b, s], cfg.vocab)?;
        let dec = ops::embedding::ids_from_host(gpu, "T5Batch decoder ids", &pad(dec_in, t), &[b, t], cfg.vocab)?;
        let enc_valid = enc.iter().map(|r| (0..s).map(|j| j < r.len()).collect()).collect();
        Ok(T5Batch { enc_ids, enc_valid, dec_in: dec })
    }

    /// A batch and its targets from (encoder row, label row) pairs: decoder inputs are the
    /// labels shifted right (`[decoder_start, l0, l1, ...]`); targets are i32 `[B * T]`, the
    /// labels padded with -100 (ignored by `autograd::cross_entropy`'s default options).
    pub fn from_labels(gpu: &Gpu, cfg: &T5Config, enc: &[Vec<u32>], labels: &[Vec<u32>]) -> Result<(T5Batch, Tensor)> {
        let t = labels.iter().map(|r| r.len()).max().unwrap_or(0);
        let dec_in: Vec<Vec<u32>> = labels
            .iter()
            .map(|r| std::iter::once(cfg.decoder_start_id).chain(r.iter().copied()).take(r.len()).collect())
            .collect();
        let batch = T5Batch::new(gpu, cfg, enc, &dec_in)?;
        let tgt: Vec<i32> =
            labels.iter().flat_map(|r| (0..t).map(|j| r.get(j).map(|&x| x as i32).unwrap_or(-100))).collect();
        let targets = Tensor::from_i32(gpu, &tgt, &[tgt.len()])?;
        Ok((batch, targets))
    }

    fn check(&self, cfg: &T5Config) -> Result<(usize, usize, usize)> {
        const OP: &str = "T5 forward";
        check::dtype(OP, "enc_ids", &self.enc_ids, DType::U32)?;
        check::dtype(OP, "dec_in", &self.dec_in, DType::U32)?;
        let (es, ds) = (self.enc_ids.shape(), self.dec_in.shape());
        if es.len() != 2 || ds.len() != 2 || es[0] != ds[0] || es[0] == 0 || es[1] == 0 || ds[1] == 0 {
            bail!("{OP}: enc_ids {} and dec_in {} must be [B, S] and [B, T]", shape_str(es), shape_str(ds));
        }
        check_valid(OP, &self.enc_valid, es[0], es[1])?;
        let _ = cfg;
        Ok((es[0], es[1], ds[1]))
    }
}

fn check_valid(op: &str, valid: &[Vec<bool>], b: usize, s: usize) -> Result<()> {
    if valid.len() != b || valid.iter().any(|r| r.len() != s) {
        bail!("{op}: enc_valid must be [B = {b}][S = {s}] flags, got {} rows", valid.len());
    }
    if let Some(row) = valid.iter().position(|r| !r.iter().any(|&x| x)) {
        bail!("{op}: encoder row {row} has no valid token");
    }
    Ok(())
}

/// The encoder's output for a batch, computed once per batch by [`T5::encode`].
#[derive(Clone, Debug)]
pub struct EncoderOutput {
    /// `[B, S, d_model]` (after the final norm).
    pub hidden: Tensor,
    /// `[B][S]` valid-token flags (padding keys are masked in cross-attention).
    pub valid: Vec<Vec<bool>>,
}

impl EncoderOutput {
    pub fn batch(&self) -> usize {
        self.hidden.shape()[0]
    }
    pub fn seq_len(&self) -> usize {
        self.hidden.shape()[1]
    }
}

/// Dropout on hidden states with disjoint counter ranges per call (one seed per forward).
struct Dropper {
    p: f32,
    seed: u32,
    offset: std::cell::Cell<u32>,
}

impl Dropper {
    fn apply(&self, x: &Var) -> Result<Var> {
        if self.p == 0.0 {
            return Ok(x.clone());
        }
        let off = self.offset.get();
        self.offset.set(off.wrapping_add(x.value.numel() as u32));
        x.dropout(self.p, self.seed, off)
    }
}

/// The relative position bias `[H, Tq, Tk]` from the bucket table `[buckets, H]` (a `Var`, so
/// the table learns; the backward is `ops::relbias::relbias_backward`).
fn relbias_var(table: &Var, q_pos: &Tensor, k_pos: &Tensor, cfg: RelBiasCfg) -> Result<Var> {
    let y = relbias::relbias(&table.value, q_pos, k_pos, cfg)?;
    let (qp, kp) = (q_pos.clone(), k_pos.clone());
    Ok(table.tape().record(y, &[table], move |g| Ok(vec![Some(relbias::relbias_backward(g, &qp, &kp, cfg)?)])))
}

/// `x W^T` for a weight `[out, in]` (no autograd).
fn lin(x: &Tensor, w: &Param, act: Act) -> Result<Tensor> {
    matmul(x, &w.value, &MatmulOpts { trans_a: false, trans_b: true, bias: None, act, lowrank: None })
}

/// A parameter maker: (HF name, shape, init std) -> parameter.
type NewParam<'a> = dyn FnMut(String, &[usize], f32) -> Result<Rc<Param>> + 'a;

fn seed_of(seed: u64, idx: usize) -> u64 {
    seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add((idx as u64).wrapping_mul(0x2545_f491_4f6c_dd1d).wrapping_add(1))
}

impl T5 {
    /// A model with HF T5's initialization (`initializer_factor` 1): shared ~ N(0, 1),
    /// q ~ N(0, (d_model d_kv)^-1/2), k/v ~ N(0, d_model^-1/2), o ~ N(0, (H d_kv)^-1/2),
    /// wi ~ N(0, d_model^-1/2), wo ~ N(0, d_ff^-1/2), relative bias ~ N(0, d_model^-1/2), norms 1.
    pub fn new(gpu: &Gpu, cfg: T5Config, seed: u64) -> Result<T5> {
        cfg.validate()?;
        let mut idx = 0usize;
        let mut normal = |name: String, shape: &[usize], std: f32| -> Result<Rc<Param>> {
            idx += 1;
            let n = shape.iter().product();
            Ok(Param::new(name, Tensor::from_f32(gpu, &normal_init(seed_of(seed, idx), n, std), shape)?))
        };
        let ones = |name: String| -> Result<Rc<Param>> {
            Ok(Param::new(name, Tensor::from_f32(gpu, &vec![1.0; cfg.d_model], &[cfg.d_model])?))
        };
        let (d, inner, ff) = (cfg.d_model, cfg.inner(), cfg.d_ff);
        let df = d as f32;
        let shared = normal("shared.weight".into(), &[cfg.vocab, d], 1.0)?;
        let attn = |pre: &str, normal: &mut NewParam| {
            Ok::<_, anyhow::Error>(AttnW {
                q: normal(format!("{pre}.q.weight"), &[inner, d], (df * cfg.d_kv as f32).powf(-0.5))?,
                k: normal(format!("{pre}.k.weight"), &[inner, d], df.powf(-0.5))?,
                v: normal(format!("{pre}.v.weight"), &[inner, d], df.powf(-0.5))?,
                o: normal(format!("{pre}.o.weight"), &[d, inner], (inner as f32).powf(-0.5))?,
            })
        };
        let mut enc = Vec::new();
        for i in 0..cfg.enc_layers {
            let p = format!("encoder.block.{i}.layer");
            enc.push(EncLayer {
                ln_attn: ones(format!("{p}.0.layer_norm.weight"))?,
                attn: attn(&format!("{p}.0.SelfAttention"), &mut normal)?,
                ln_ff: ones(format!("{p}.1.layer_norm.weight"))?,
                wi: normal(format!("{p}.1.DenseReluDense.wi.weight"), &[ff, d], df.powf(-0.5))?,
                wo: normal(format!("{p}.1.DenseReluDense.wo.weight"), &[d, ff], (ff as f32).powf(-0.5))?,
            });
        }
        let enc_rel = normal(
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight".into(),
            &[cfg.rel_buckets, cfg.heads],
            df.powf(-0.5),
        )?;
        let mut dec = Vec::new();
        for i in 0..cfg.dec_layers {
            let p = format!("decoder.block.{i}.layer");
            dec.push(DecLayer {
                ln_self: ones(format!("{p}.0.layer_norm.weight"))?,
                self_attn: attn(&format!("{p}.0.SelfAttention"), &mut normal)?,
                ln_cross: ones(format!("{p}.1.layer_norm.weight"))?,
                cross: attn(&format!("{p}.1.EncDecAttention"), &mut normal)?,
                ln_ff: ones(format!("{p}.2.layer_norm.weight"))?,
                wi: normal(format!("{p}.2.DenseReluDense.wi.weight"), &[ff, d], df.powf(-0.5))?,
                wo: normal(format!("{p}.2.DenseReluDense.wo.weight"), &[d, ff], (ff as f32).powf(-0.5))?,
            });
        }
        let dec_rel = normal(
            "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight".into(),
            &[cfg.rel_buckets, cfg.heads],
            df.powf(-0.5),
        )?;
        Ok(T5 {
            gpu: gpu.clone(),
            shared,
            enc,
            enc_rel,
            enc_norm: ones("encoder.final_layer_norm.weight".into())?,
            dec,
            dec_rel,
            dec_norm: ones("decoder.final_layer_norm.weight".into())?,
            cfg,
        })
    }

    /// Every parameter under its Hugging Face name, in HF's `named_parameters` order.
    pub fn named_params(&self) -> Vec<(String, Rc<Param>)> {
        let mut v: Vec<Rc<Param>> = vec![self.shared.clone()];
        let attn = |a: &AttnW| [a.q.clone(), a.k.clone(), a.v.clone(), a.o.clone()];
        for (i, l) in self.enc.iter().enumerate() {
            v.extend(attn(&l.attn));
            if i == 0 {
                v.push(self.enc_rel.clone());
            }
            v.extend([l.ln_attn.clone(), l.wi.clone(), l.wo.clone(), l.ln_ff.clone()]);
        }
        v.push(self.enc_norm.clone());
        for (i, l) in self.dec.iter().enumerate() {
            v.extend(attn(&l.self_attn));
            if i == 0 {
                v.push(self.dec_rel.clone());
            }
            v.push(l.ln_self.clone());
            v.extend(attn(&l.cross));
            v.extend([l.ln_cross.clone(), l.wi.clone(), l.wo.clone(), l.ln_ff.clone()]);
        }
        v.push(self.dec_norm.clone());
        v.into_iter().map(|p| (p.name.clone(), p)).collect()
    }

    /// Every parameter (for the optimizer).
    pub fn params(&self) -> Vec<Rc<Param>> {
        self.named_params().into_iter().map(|(_, p)| p).collect()
    }

    /// Number of scalar parameters (the tied embedding counted once).
    pub fn num_params(&self) -> usize {
        self.params().iter().map(|p| p.value.numel()).sum()
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Overwrite the parameters from a name -> tensor map (HF names). `source` names the file
    /// in errors. Missing, unknown and misshaped tensors are errors; HF's tied copies of the
    /// embedding (`encoder.embed_tokens.weight`, `decoder.embed_tokens.weight`,
    /// `lm_head.weight`) are accepted when equal to `shared.weight`, and HF's unused
    /// `decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight` is ignored.
    pub fn load_tensors(&self, tensors: &BTreeMap<String, HostTensor>, source: &str) -> Result<()> {
        let named = self.named_params();
        let known: BTreeSet<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
        const TIED: [&str; 3] = ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"];
        const IGNORED: &str = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight";
        let missing: Vec<&str> = known.iter().copied().filter(|n| !tensors.contains_key(*n)).collect();
        if !missing.is_empty() {
            bail!("{source}: {} T5 tensor(s) missing: {}", missing.len(), list(&missing));
        }
        let extra: Vec<&str> = tensors
            .keys()
            .map(|s| s.as_str())
            .filter(|n| !known.contains(n) && !TIED.contains(n) && *n != IGNORED)
            .collect();
        if !extra.is_empty() {
            bail!("{source}: {} unexpected tensor(s) for this T5 config: {}", extra.len(), list(&extra));
        }
        for (name, p) in &named {
            let t = &tensors[name];
            if t.shape != p.value.shape() {
                bail!(
                    "{source}: tensor {name:?} has shape {}, expected {} (config {:?})",
                    shape_str(&t.shape),
                    shape_str(p.value.shape()),
                    self.cfg
                );
            }
        }
        let shared = &tensors["shared.weight"];
        for n in TIED {
            if let Some(t) = tensors.get(n) {
                if t.shape != shared.shape || t.data != shared.data {
                    bail!("{source}: tensor {n:?} differs from shared.weight; untied T5 embeddings are not supported");
                }
            }
        }
        for (name, p) in &named {
            p.value.write_f32(&tensors[name].data).with_context(|| format!("{source}: loading {name:?}"))?;
        }
        Ok(())
    }

    /// Load parameters from a safetensors file with HF names (see `load_tensors`).
    pub fn load_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let f = SafeTensorsFile::open(path)?;
        let mut map = BTreeMap::new();
        for name in f.names() {
            let (dt, _) = f.dtype_shape(&name)?;
            if !matches!(dt.as_str(), "F32" | "F16" | "BF16") {
                bail!("{}: tensor {name:?} has dtype {dt}, expected a float tensor", path.display());
            }
            map.insert(name.clone(), f.get(&name)?);
        }
        self.load_tensors(&map, &path.display().to_string())
    }

    /// All parameters on the host, by HF name.
    pub fn to_host(&self) -> Result<BTreeMap<String, HostTensor>> {
        self.named_params()
            .into_iter()
            .map(|(n, p)| Ok((n, HostTensor::new(p.value.shape(), p.value.to_vec_f32()?)?)))
            .collect()
    }

    /// Write the parameters as f32 safetensors (HF names) with the config as JSON in the
    /// metadata entry `genrec_t5_config` (atomic write).
    pub fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        let mut md = HashMap::new();
        md.insert("genrec_t5_config".to_string(), serde_json::to_string(&self.cfg)?);
        crate::io::safetensors::save(path, &self.to_host()?, Some(&md), StoreDtype::F32)
    }

    /// Build a model from a file written by `save_safetensors`.
    pub fn from_safetensors(gpu: &Gpu, path: impl AsRef<Path>) -> Result<T5> {
        let path = path.as_ref();
        let f = SafeTensorsFile::open(path)?;
        let md = f.metadata();
        let cfg: T5Config = match (md.get("genrec_t5_config"), md.get("config")) {
            (Some(j), _) => {
                serde_json::from_str(j).with_context(|| format!("{}: bad genrec_t5_config", path.display()))?
            }
            (None, Some(j)) => {
                T5Config::from_hf_json(j).with_context(|| format!("{}: metadata config", path.display()))?
            }
            (None, None) => bail!("{}: no T5 config in the safetensors metadata", path.display()),
        };
        let m = T5::new(gpu, cfg, 0)?;
        m.load_safetensors(path)?;
        Ok(m)
    }

    /// Attention of `xq` `[B, Tq, d]` over `xkv` `[B, Tk, d]` -> `[B, Tq, d]` (unscaled logits).
    fn attend(&self, tape: &Tape, a: &AttnW, xq: &Var, xkv: &Var, bias: Option<&Var>, mask: &Mask) -> Result<Var> {
        let (b, tq, tk) = (xq.shape()[0], xq.shape()[1], xkv.shape()[1]);
        let (h, dk) = (self.cfg.heads, self.cfg.d_kv);
        let split = |x: Var, t: usize| x.reshape(&[b, t, h, dk])?.permute(&[0, 2, 1, 3]);
        let q = split(xq.linear(&tape.param(&a.q), None, true, Act::None)?, tq)?;
        let k = split(xkv.linear(&tape.param(&a.k), None, true, Act::None)?, tk)?;
        let v = split(xkv.linear(&tape.param(&a.v), None, true, Act::None)?, tk)?;
        let o = crate::autograd::attention(&q, &k, &v, bias, mask, 1.0)?;
        let o = o.permute(&[0, 2, 1, 3])?.reshape(&[b, tq, h * dk])?;
        o.linear(&tape.param(&a.o), None, true, Act::None)
    }

    /// wo(dropout(relu(wi x))).
    fn ffn(&self, tape: &Tape, wi: &Rc<Param>, wo: &Rc<Param>, x: &Var, drop: &Dropper) -> Result<Var> {
        let h = x.linear(&tape.param(wi), None, true, Act::Relu)?;
        drop.apply(&h)?.linear(&tape.param(wo), None, true, Act::None)
    }

    fn encoder_stack(
        &self,
        tape: &Tape,
        shared: &Var,
        ids: &Tensor,
        valid: &[Vec<bool>],
        drop: &Dropper,
    ) -> Result<Var> {
        let (b, s) = (ids.shape()[0], ids.shape()[1]);
        check_valid("T5 encoder", valid, b, s)?;
        let gpu = &self.gpu;
        let eps = self.cfg.eps;
        let mask = MaskSpec::full(s, s).pad_keys(valid)?.upload(gpu)?;
        let pos = relbias::positions(gpu, 0, s)?;
        let bias = relbias_var(&tape.param(&self.enc_rel), &pos, &pos, self.cfg.enc_bias())?;
        let mut x = drop.apply(&embedding(shared, ids)?)?;
        for l in &self.enc {
            let h = x.rms_norm(&tape.param(&l.ln_attn), eps)?;
            let a = self.attend(tape, &l.attn, &h, &h, Some(&bias), &mask)?;
            x = x.add(&drop.apply(&a)?)?;
            let h = x.rms_norm(&tape.param(&l.ln_ff), eps)?;
            let f = self.ffn(tape, &l.wi, &l.wo, &h, drop)?;
            x = x.add(&drop.apply(&f)?)?;
        }
        drop.apply(&x.rms_norm(&tape.param(&self.enc_norm), eps)?)
    }

    /// Teacher-forced training/evaluation forward: logits `[B * T, vocab]` for the decoder
    /// inputs of `batch`. `train` turns dropout on (with `seed`); the loss is left to the
    /// caller (`autograd::cross_entropy` with ignore index and temperature).
    pub fn forward(&self, tape: &Tape, batch: &T5Batch, train: bool, seed: u32) -> Result<Var> {
        let (b, s, t) = batch.check(&self.cfg)?;
        let _ = s;
        let gpu = &self.gpu;
        let eps = self.cfg.eps;
        let p = if train { self.cfg.dropout } else { 0.0 };
        let drop = Dropper { p, seed, offset: std::cell::Cell::new(0) };
        let shared = tape.param(&self.shared);
        let enc = self.encoder_stack(tape, &shared, &batch.enc_ids, &batch.enc_valid, &drop)?;

        let self_mask = MaskSpec::causal(t, t)?.upload(gpu)?;
        let cross_mask = MaskSpec::cross(t, &batch.enc_valid)?.upload(gpu)?;
        let pos = relbias::positions(gpu, 0, t)?;
        let bias = relbias_var(&tape.param(&self.dec_rel), &pos, &pos, self.cfg.dec_bias())?;
        let mut y = drop.apply(&embedding(&shared, &batch.dec_in)?)?;
        for l in &self.dec {
            let h = y.rms_norm(&tape.param(&l.ln_self), eps)?;
            let a = self.attend(tape, &l.self_attn, &h, &h, Some(&bias), &self_mask)?;
            y = y.add(&drop.apply(&a)?)?;
            let h = y.rms_norm(&tape.param(&l.ln_cross), eps)?;
            let a = self.attend(tape, &l.cross, &h, &enc, None, &cross_mask)?;
            y = y.add(&drop.apply(&a)?)?;
            let h = y.rms_norm(&tape.param(&l.ln_ff), eps)?;
            let f = self.ffn(tape, &l.wi, &l.wo, &h, &drop)?;
            y = y.add(&drop.apply(&f)?)?;
        }
        let y = drop.apply(&y.rms_norm(&tape.param(&self.dec_norm), eps)?)?;
        let y = y.scale((self.cfg.d_model as f32).powf(-0.5))?.reshape(&[b * t, self.cfg.d_model])?;
        y.linear(&shared, None, true, Act::None)
    }

    /// Run the encoder once (inference, no dropout): ids u32 `[B, S]`, `valid` `[B][S]`.
    pub fn encode(&self, enc_ids: &Tensor, valid: &[Vec<bool>]) -> Result<EncoderOutput> {
        check::dtype("T5 encode", "enc_ids", enc_ids, DType::U32)?;
        if enc_ids.rank() != 2 || enc_ids.numel() == 0 {
            bail!("T5 encode: enc_ids must be [B, S], got {}", shape_str(enc_ids.shape()));
        }
        let tape = Tape::no_grad();
        let drop = Dropper { p: 0.0, seed: 0, offset: std::cell::Cell::new(0) };
        let shared = tape.param(&self.shared);
        let hidden = self.encoder_stack(&tape, &shared, enc_ids, valid, &drop)?.value;
        Ok(EncoderOutput { hidden, valid: valid.to_vec() })
    }

    /// An incremental decoding session over `rows = batch * beams` rows for at most `max_len`
    /// steps; row `r = b * beams + k` attends to user `b`'s encoder output. Cross-attention
    /// keys/values are computed here once (per user, shared by its beams); self-attention
    /// caches `[rows, heads, max_len, d_kv]` per layer live on the GPU.
    pub fn decode_session(&self, enc: &EncoderOutput, beams: usize, max_len: usize) -> Result<T5DecodeSession> {
        T5DecodeSession::new(self, enc, beams, max_len)
    }
}

fn list(names: &[&str]) -> String {
    let shown: Vec<&str> = names.iter().copied().take(6).collect();
    format!("{shown:?}{}", if names.len() > 6 { " ..." } else { "" })
}

/// Incremental decoder state (see [`T5::decode_session`]). Implements [`StepModel`]: `step`
/// feeds one token per row (u32 `[rows]` on the GPU) and returns logits `[rows, vocab]`;
/// `reorder` makes new row `r` continue old row `parents[r]`. Parents must stay within the
/// beams of the same user (`b * beams .. (b + 1) * beams`), as beam search does: each row keeps
/// reading its own user's encoder output. A reorder is applied lazily, fused into the next
/// step's cache append (one gather per cache per step, all on the GPU).
pub struct T5DecodeSession {
    model: T5,
    batch: usize,
    beams: usize,
    max_len: usize,
    /// Steps taken (the next token goes to position `t`).
    t: usize,
    /// Per decoder layer: self-attention caches `[rows, H, max_len, d_kv]`.
    self_k: Vec<Tensor>,
    self_v: Vec<Tensor>,
    /// A spare cache-shaped tensor: reorders write into it and swap it with the cache.
    spare: Tensor,
    /// Parents of a reorder not yet applied (a private copy).
    pending: Option<Tensor>,
    /// Per decoder layer: cross-attention keys/values `[B, H, S, d_kv]`.
    cross_k: Vec<Tensor>,
    cross_v: Vec<Tensor>,
    /// Queries = the `beams` rows of a user, keys = that user's valid encoder tokens.
    cross_mask: Mask,
    /// Per step t: causal mask of the query at position t over the `max_len` cache slots.
    step_mask: Vec<Mask>,
    /// Per step t: decoder relative bias `[H, 1, max_len]` of query position t.
    step_bias: Vec<Tensor>,
    /// Final decoder norm weight times `d_model^-0.5` (the LM head's input scaling folded in).
    final_norm: Tensor,
}

impl T5DecodeSession {
    fn new(model: &T5, enc: &EncoderOutput, beams: usize, max_len: usize) -> Result<T5DecodeSession> {
        const OP: &str = "T5 decode_session";
        let cfg = &model.cfg;
        let hs = enc.hidden.shape();
        if hs.len() != 3 || hs[2] != cfg.d_model {
            bail!("{OP}: encoder output must be [B, S, d_model = {}], got {}", cfg.d_model, shape_str(hs));
        }
        if beams == 0 || max_len == 0 {
            bail!("{OP}: beams ({beams}) and max_len ({max_len}) must be positive");
        }
        let (b, s) = (hs[0], hs[1]);
        check_valid(OP, &enc.valid, b, s)?;
        let gpu = model.gpu.clone();
        let (h, dk) = (cfg.heads, cfg.d_kv);
        let rows = b * beams;
        let flat = enc.hidden.reshape(&[b * s, cfg.d_model])?;
        let mut cross_k = Vec::new();
        let mut cross_v = Vec::new();
        for l in &model.dec {
            for (w, out) in [(&l.cross.k, &mut cross_k), (&l.cross.v, &mut cross_v)] {
                let x = lin(&flat, w, Act::None)?.reshape(&[b, s, h, dk])?;
                out.push(ops::permute::permute(&x, &[0, 2, 1, 3])?);
            }
        }
        let cross_mask = MaskSpec::cross(beams, &enc.valid)?.upload(&gpu)?;
        let mut step_mask = Vec::new();
        let mut step_bias = Vec::new();
        let k_pos = relbias::positions(&gpu, 0, max_len)?;
        for t in 0..max_len {
            let spec = MaskSpec::new(
                MaskKind::Causal,
                1,
                1,
                max_len,
                vec![0],
                vec![t as i32],
                vec![0; max_len],
                (0..max_len as i32).collect(),
            )?;
            step_mask.push(spec.upload(&gpu)?);
            let q_pos = relbias::positions(&gpu, t as i32, 1)?;
            step_bias.push(relbias::relbias(&model.dec_rel.value, &q_pos, &k_pos, cfg.dec_bias())?);
        }
        let shape = [rows, h, max_len, dk];
        let zeros = || Tensor::zeros(&gpu, &shape, DType::F32);
        let self_k = (0..cfg.dec_layers).map(|_| zeros()).collect::<Result<Vec<_>>>()?;
        let self_v = (0..cfg.dec_layers).map(|_| zeros()).collect::<Result<Vec<_>>>()?;
        let final_norm = ops::elementwise::scale(&model.dec_norm.value, (cfg.d_model as f32).powf(-0.5))?;
        Ok(T5DecodeSession {
            model: model.clone(),
            batch: b,
            beams,
            max_len,
            t: 0,
            self_k,
            self_v,
            spare: zeros()?,
            pending: None,
            cross_k,
            cross_v,
            cross_mask,
            step_mask,
            step_bias,
            final_norm,
        })
    }

    /// `batch * beams`.
    pub fn rows(&self) -> usize {
        self.batch * self.beams
    }
    pub fn beams(&self) -> usize {
        self.beams
    }
    /// Steps taken so far (the position the next token is written to).
    pub fn steps(&self) -> usize {
        self.t
    }
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Apply a pending reorder to every cache (positions `0..t`), without appending.
    fn materialize(&mut self) -> Result<()> {
        if let Some(par) = self.pending.take() {
            for c in self.self_k.iter_mut().chain(self.self_v.iter_mut()) {
                ops::kv_cache::kv_reorder(&self.spare, c, &par, self.t, None)?;
                std::mem::swap(&mut self.spare, c);
            }
        }
        Ok(())
    }

    /// Write this step's keys/values `[rows, H * d_kv]` of layer `l` at position t (after the
    /// pending reorder, if any).
    fn write_kv(&mut self, l: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let t = self.t;
        match &self.pending {
            None => {
                let (rows, h, dk) = (self.rows(), self.model.cfg.heads, self.model.cfg.d_kv);
                ops::kv_cache::kv_write(&self.self_k[l], &k.reshape(&[rows, h, 1, dk])?, t)?;
                ops::kv_cache::kv_write(&self.self_v[l], &v.reshape(&[rows, h, 1, dk])?, t)
            }
            Some(par) => {
                ops::kv_cache::kv_reorder(&self.spare, &self.self_k[l], par, t, Some(k))?;
                std::mem::swap(&mut self.spare, &mut self.self_k[l]);
                ops::kv_cache::kv_reorder(&self.spare, &self.self_v[l], par, t, Some(v))?;
                std::mem::swap(&mut self.spare, &mut self.self_v[l]);
                Ok(())
            }
        }
    }
}

impl StepModel for T5DecodeSession {
    fn vocab(&self) -> usize {
        self.model.cfg.vocab
    }

    fn step(&mut self, tokens: &Tensor) -> Result<Tensor> {
        const OP: &str = "T5 decode step";
        let rows = self.rows();
        check::dtype(OP, "tokens", tokens, DType::U32)?;
        if tokens.shape() != [rows] {
            bail!("{OP}: tokens must be [rows = {rows}], got {}", shape_str(tokens.shape()));
        }
        if self.t >= self.max_len {
            bail!("{OP}: the session was built for {} steps; all are used", self.max_len);
        }
        let m = self.model.clone();
        let cfg = &m.cfg;
        let (h, dk, eps, t) = (cfg.heads, cfg.d_kv, cfg.eps, self.t);
        let (b, beams) = (self.batch, self.beams);
        let norm = |x: &Tensor, w: &Tensor| Ok::<_, anyhow::Error>(ops::norm::rms_norm(x, w, eps)?.y);
        let attn = ops::attention::attention;
        // x: [rows, d_model]
        let mut x = ops::embedding::gather(&m.shared.value, tokens)?;
        for (l, layer) in m.dec.iter().enumerate() {
            // Self-attention over the cache (positions 0..=t).
            let hs = norm(&x, &layer.ln_self.value)?;
            let q = lin(&hs, &layer.self_attn.q, Act::None)?.reshape(&[rows, h, 1, dk])?;
            let k = lin(&hs, &layer.self_attn.k, Act::None)?;
            let v = lin(&hs, &layer.self_attn.v, Act::None)?;
            self.write_kv(l, &k, &v)?;
            let bias = Some(&self.step_bias[t]);
            let a = attn(&q, &self.self_k[l], &self.self_v[l], bias, &self.step_mask[t], 1.0)?.out;
            x = ops::elementwise::add(&x, &lin(&a.reshape(&[rows, h * dk])?, &layer.self_attn.o, Act::None)?)?;
            // Cross-attention: the beams of user b are the queries of batch entry b.
            let hs = norm(&x, &layer.ln_cross.value)?;
            let q = lin(&hs, &layer.cross.q, Act::None)?;
            // [B, beams, H, dk] -> [B, H, beams, dk] (a plain view when beams == 1)
            let q = if beams == 1 {
                q.reshape(&[b, h, 1, dk])?
            } else {
                ops::permute::permute(&q.reshape(&[b, beams, h, dk])?, &[0, 2, 1, 3])?
            };
            let a = attn(&q, &self.cross_k[l], &self.cross_v[l], None, &self.cross_mask, 1.0)?.out;
            let a = if beams == 1 { a } else { ops::permute::permute(&a, &[0, 2, 1, 3])? };
            x = ops::elementwise::add(&x, &lin(&a.reshape(&[rows, h * dk])?, &layer.cross.o, Act::None)?)?;
            // Feed-forward.
            let hs = norm(&x, &layer.ln_ff.value)?;
            let f = lin(&lin(&hs, &layer.wi, Act::Relu)?, &layer.wo, Act::None)?;
            x = ops::elementwise::add(&x, &f)?;
        }
        self.pending = None;
        self.t += 1;
        let y = norm(&x, &self.final_norm)?;
        lin(&y, &m.shared, Act::None)
    }

    fn reorder(&mut self, parents: &Tensor) -> Result<()> {
        const OP: &str = "T5 decode reorder";
        let rows = self.rows();
        check::dtype(OP, "parents", parents, DType::U32)?;
        if parents.shape() != [rows] {
            bail!("{OP}: parents must be [rows = {rows}], got {}", shape_str(parents.shape()));
        }
        if self.t == 0 {
            return Ok(()); // nothing cached yet
        }
        self.materialize()?;
        self.pending = Some(parents.duplicate()?);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
