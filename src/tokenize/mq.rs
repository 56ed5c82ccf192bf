//! TokenRec's MQ-tokenizer (masked multi-codebook vector quantization) for
//! users and items, trained on the GPU (tokenrec.spec.md §2-§4, §8).
//!
//! Input: collaborative embeddings `x: [n, d]` (d = 64; LightGCN or MF from
//! `cf::`), one tokenizer for users and one for items with the same
//! architecture, trained separately. Model:
//! - **masking**: every training step draws a fresh element-wise Bernoulli(ρ)
//!   mask for every row (ρ = 0.2, masked entries set to 0, no rescaling,
//!   [`mask_input`]), written to a *new* buffer: the batch itself is never
//!   modified. (The authors' code draws one mask per batch with an in-place
//!   `bernoulli_` on row 0 of the batch, corrupting that row; not copied.) No
//!   mask at evaluation / tokenization time.
//! - **K-way encoder** ([`MqVariant::Parallel`], the paper's default): K
//!   separate MLPs `d -> 128 -> 256 -> d_c` (d_c = 512; see *MLP layers*)
//!   give `a^k = Enc^k(x')`, each quantized against its own codebook
//!   `c^k: [L, d_c]`: `w^k = argmin_l |a^k - c^k_l|^2`. The decoder input is
//!   the mean of the K codewords with the straight-through estimator
//!   (`mean_k a^k + sg(mean_k c^k - mean_k a^k)`, so each `a^k` gets 1/K of
//!   the pooled gradient).
//! - [`MqVariant::Residual`] (the authors' code): one shared encoder
//!   `z = Enc(x')`, residual quantization `r_0 = z`, `r_{k+1} = r_k - c^k_{w^k}`
//!   (residuals keep their gradient, as in the code), decoder input
//!   `z + sg(sum_k c^k - z)`.
//! - **K-to-1 decoder**: MLP `d_c -> 256 -> 128 -> d` reconstructing the
//!   *unmasked* input (a denoising task).
//! - **losses** (element-mean MSEs, as the code): `recon = mean((dec - x)^2)`,
//!   per book `cb_k = mean((sg a^k - c^k)^2)`, `cm_k = mean((a^k - sg c^k)^2)`,
//!   total `recon + sum_k (cb_k + β cm_k)` with β = 0.25.
//! - **MLP layers** (the authors'): every hidden layer is Linear ->
//!   BatchNorm1d -> Dropout -> ReLU, the last layer a plain Linear; dropout
//!   0.5 in the encoder(s), 0.2 in the decoder (spec §2: "Dropout(0.5, then
//!   0.2)"; read here as encoder / decoder). Training steps normalize with
//!   batch statistics and update the running ones (momentum 0.1, unbiased
//!   variance, as PyTorch); evaluation, checkpoint selection and tokenization
//!   use the running statistics and no dropout, so a row's codes do not depend
//!   on its batch. k-means (re-)initialization normalizes with the statistics
//!   of all training rows. The running statistics are saved with the
//!   parameters. [`MqTokenizerConfig::batch_norm`] / `enc_dropout` /
//!   `dec_dropout` (CLI `--no-batch-norm`, `--enc-dropout`, `--dec-dropout`)
//!   turn them off. The authors' learnable `pos` input vector is not used.
//!
//! Training ([`train_mq`]): AdamW (lr 1e-3, weight decay 0.01, the code's),
//! batches of 512 rows, a seeded 80/20 split of the rows (the code's
//! `valid_ratio`), codebooks initialized U(-1/L, 1/L) then by k-means
//! (k-means++ + GPU Lloyd) on the unmasked encoder outputs (residuals for the
//! residual variant) of **all training rows** before training and again every
//! `kmeans_every` epochs (default 10; the code re-runs k-means every 50 of its
//! 1,000 epochs on its first batch; on all rows it stays well defined when L
//! >= the batch size). Every
//! `eval_every` epochs the validation loss (unmasked) is computed and the
//! parameters with the lowest one are kept (the code's checkpoint rule).
//!
//! **Codebook collapse (issue 5; ml-100k, 64-d LightGCN, docs/BENCHMARKS.md):**
//! without BatchNorm, 20 epochs left 13-58 of 256 codes per book and 64-94 %
//! of the rows sharing a full tuple, although k-means starts from 256
//! distinct codes: the LightGCN vectors have a per-dimension variance of
//! ~0.035, the encoder outputs are smaller still, and AdamW's ~lr-sized steps
//! move codewords and latents by more than the latent spread. The authors'
//! BatchNorm keeps hidden activations at unit scale. With it (the default
//! now), 20 epochs with k-means only at the start still give collision rates
//! of 0.70-0.78. What fixed the collapse was mainly re-running k-means every
//! 10 epochs (now the default): 40 epochs, residual, users / items 0.022 /
//! 0.047 with BatchNorm + dropout and 0.029 / 0.015 without; parallel 0.265 /
//! 0.361 with. The test
//! `batch_norm_keeps_small_scale_inputs_from_collapsing` shows BatchNorm's
//! effect on shrunken synthetic clusters.
//!
//! Identifiers: TokenRec retrieves items by vector search, never by decoding
//! identifiers, so tuples need not be unique (spec §5: collisions only make
//! rows indistinguishable in the LLM's input). By default the K argmin tokens
//! are returned as they are ([`MqTokenizerConfig::unique_ids`] = false) and
//! the report gives the collision rate; with `unique_ids` the existing
//! deterministic disambiguation (`ids::disambiguate`: an extra token 0, 1, ...
//! in increasing row id inside each colliding group) is applied. The
//! identifiers use `ids::ItemCodes` for users too.

use std::rc::Rc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::ids::{collision_groups, collision_rate, disambiguate, IdStats, ItemCodes};
use super::report::{code_similarity, fill_code_stats, EpochLog, TokenizerReport};
use crate::autograd::{self, Param, Tape, Var};
use crate::gpu::{check, div_ceil, shape_str, DType, Gpu, Kernel, Params, Tensor};
use crate::nn::optim::AdamW;
use crate::nn::{uniform_init, BatchNorm1d, BnMode, Linear};
use crate::ops::adamw::AdamW as AdamWHp;
use crate::ops::{self, Act};
use crate::quant::kmeans::{kmeans, KmeansOpts};
use crate::quant::nearest::nearest;

// ---------------------------------------------------------------------------
// The input mask op.

/// The mask reuses `shaders/dropout.wgsl` (same counter hash, so
/// `ops::dropout::keep` is its CPU mirror) with a keep scale of exactly 1.
fn mask_kernel() -> Kernel {
    Kernel::new("mq::mask_input", "dropout", "dropout")
}

/// Kernel variants of this module (the WGSL is dropout's, validated there too).
pub fn kernels() -> Vec<Kernel> {
    vec![mask_kernel()]
}

/// Element-wise Bernoulli mask: `y[i] = 0` with probability `ratio`, else
/// `x[i]` unchanged (no rescaling). Element i is kept iff
/// `ops::dropout::keep(seed, offset + i, ratio)`; `ratio` in [0, 1] (1 masks
/// everything). `x`: any shape, f32; `y`: a new tensor of the same shape (`x`
/// is never written).
pub fn mask_input(x: &Tensor, ratio: f32, seed: u32, offset: u32) -> Result<Tensor> {
    const OP: &str = "mq::mask_input";
    check::nonempty(OP, &[("x", x)])?;
    check::dtype(OP, "x", x, DType::F32)?;
    if !(0.0..=1.0).contains(&ratio) {
        bail!("{OP}: mask ratio {ratio} must be in [0, 1] (x {})", shape_str(x.shape()));
    }
    let n = x.numel();
    if n > u32::MAX as usize - 256 {
        bail!("{OP}: x {} has too many elements for one launch", shape_str(x.shape()));
    }
    let threshold = (ratio as f64 * (1u64 << 24) as f64).round() as usize;
    let y = Tensor::empty(x.gpu(), x.shape(), DType::F32)?;
    let params = Params::new().u(n).u(seed as usize).u(offset as usize).u(threshold).f(1.0);
    let groups = div_ceil(n, 256);
    let gx = groups.min(65535);
    x.gpu().dispatch(&mask_kernel(), params.bytes(), &[x.buffer(), y.buffer()], [gx, groups.div_ceil(gx.max(1)), 1])?;
    Ok(y)
}

/// CPU reference of [`mask_input`].
pub fn mask_input_ref(x: &[f32], ratio: f32, seed: u32, offset: u32) -> Vec<f32> {
    x.iter()
        .enumerate()
        .map(|(i, &v)| if ops::dropout::keep(seed, offset.wrapping_add(i as u32), ratio) { v } else { 0.0 })
        .collect()
}

/// Differentiable [`mask_input`]: the backward applies the same mask to the
/// output gradient (the op is linear and diagonal).
pub fn masked(x: &Var, ratio: f32, seed: u32) -> Result<Var> {
    let y = mask_input(&x.value, ratio, seed, 0)?;
    Ok(x.tape().record(y, &[x], move |g| Ok(vec![Some(mask_input(g, ratio, seed, 0)?)])))
}

/// The mask seed of training step `step` (a fresh mask every step): a
/// SplitMix64 mix of the run seed and the step, folded to 32 bits.
pub fn step_mask_seed(seed: u64, step: u64) -> u32 {
    let mut z = seed ^ step.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z ^ (z >> 32)) as u32
}

// ---------------------------------------------------------------------------
// The model.

/// Encoder layout: the paper's K parallel encoders or the code's shared
/// encoder with residual quantization.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MqVariant {
    Parallel,
    Residual,
}

impl MqVariant {
    pub fn parse(s: &str) -> Result<MqVariant> {
        match s.to_ascii_lowercase().as_str() {
            "parallel" | "kway" | "k-way" => Ok(MqVariant::Parallel),
            "residual" | "shared" => Ok(MqVariant::Residual),
            _ => bail!("unknown MQ variant {s:?}; expected parallel or residual"),
        }
    }
}

/// Architecture of an [`MqTokenizer`].
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MqModelConfig {
    /// Input (CF embedding) width d.
    pub in_dim: usize,
    /// Codeword width d_c (the code's 512 = T5-small's d_model).
    pub code_dim: usize,
    /// K: sub-encoders / sub-codebooks (residual levels for `Residual`).
    pub books: usize,
    /// L: codes per sub-codebook.
    pub codebook_size: usize,
    /// Encoder hidden widths (`d -> hidden.. -> d_c`; the code's 128, 256).
    pub enc_hidden: Vec<usize>,
    /// Decoder hidden widths (`d_c -> hidden.. -> d`; the code's 256, 128).
    pub dec_hidden: Vec<usize>,
    pub variant: MqVariant,
    /// Commitment weight β (0.25).
    pub beta: f32,
    /// Weight initialization seed.
    pub seed: u64,
    /// BatchNorm1d after every hidden Linear (the authors' Linear -> BatchNorm
    /// -> Dropout -> ReLU). Configs saved before this field existed read as
    /// false: those models had no BatchNorm.
    #[serde(default)]
    pub batch_norm: bool,
    /// Dropout probability after every hidden layer of the encoder(s) and of
    /// the decoder, during training only (absent in old configs: 0).
    #[serde(default)]
    pub enc_dropout: f32,
    #[serde(default)]
    pub dec_dropout: f32,
}

impl MqModelConfig {
    fn validate(&self) -> Result<()> {
        if self.in_dim == 0 || self.code_dim == 0 || self.books == 0 || self.codebook_size < 2 {
            bail!(
                "mq: invalid config: in_dim {}, code_dim {}, books {}, codebook_size {} (need > 0, codebook_size >= 2)",
                self.in_dim,
                self.code_dim,
                self.books,
                self.codebook_size
            );
        }
        if self.enc_hidden.contains(&0) || self.dec_hidden.contains(&0) {
            bail!("mq: hidden sizes {:?} / {:?} contain a zero", self.enc_hidden, self.dec_hidden);
        }
        if !self.beta.is_finite() || self.beta < 0.0 {
            bail!("mq: commitment weight beta = {} must be finite and >= 0", self.beta);
        }
        for (what, p) in [("enc_dropout", self.enc_dropout), ("dec_dropout", self.dec_dropout)] {
            if !(0.0..1.0).contains(&p) {
                bail!("mq: {what} = {p} must be in [0, 1)");
            }
        }
        Ok(())
    }
}

/// Losses and codes of one forward pass. Losses are `[1]` GPU values.
pub struct MqStepOut {
    /// `recon + sum_k (cb_k + beta * cm_k)`.
    pub total: Var,
    pub recon: Tensor,
    /// `sum_k (cb_k + beta * cm_k)`.
    pub quant: Tensor,
    pub cb: Vec<Tensor>,
    pub cm: Vec<Tensor>,
    /// Per book, U32 `[B]` codes (not read back).
    pub codes: Vec<Tensor>,
    /// The encoder input: the masked copy of x (or x itself without a mask).
    pub input: Tensor,
    /// The decoder output `[B, d]`.
    pub recon_x: Tensor,
}

/// One MLP layer: `Linear`, then on hidden layers BatchNorm (optional),
/// dropout (training only) and ReLU. Without BatchNorm the ReLU is fused into
/// the Linear (dropout commutes with ReLU: it only zeroes or scales by > 0).
pub struct MlpLayer {
    pub linear: Linear,
    pub bn: Option<BatchNorm1d>,
    /// Dropout probability (0 on the last layer).
    pub dropout: f32,
    /// ReLU after BatchNorm (hidden layers with BatchNorm).
    pub relu: bool,
}

/// How a forward pass runs the MLPs: BatchNorm statistics and whether dropout
/// is on (with the step's seed).
#[derive(Clone, Copy, Debug)]
struct Pass {
    bn: BnMode,
    dropout_seed: Option<u32>,
}

impl Pass {
    const EVAL: Pass = Pass { bn: BnMode::Eval, dropout_seed: None };
}

/// The dropout seed of layer `layer` of MLP `mlp` in the step with seed `seed`.
fn layer_seed(seed: u32, mlp: usize, layer: usize) -> u32 {
    let tag = (mlp as u32).wrapping_mul(64).wrapping_add(layer as u32).wrapping_add(1);
    ops::dropout::pcg_hash(seed ^ tag.wrapping_mul(0x9e37_79b9))
}

/// The MQ-tokenizer: encoder(s), decoder and K codebooks as `Param`s.
pub struct MqTokenizer {
    pub cfg: MqModelConfig,
    /// K encoders (`Parallel`) or one (`Residual`).
    pub encoders: Vec<Vec<MlpLayer>>,
    pub decoder: Vec<MlpLayer>,
    /// K codebooks `[L, d_c]`.
    pub codebooks: Vec<Rc<Param>>,
}

impl std::fmt::Debug for MqTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqTokenizer").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

/// MLP `dims[0] -> .. -> dims[last]`; layer i is named `{prefix}.{i}`, its
/// BatchNorm `{prefix}.{i}.bn`.
fn mlp(gpu: &Gpu, prefix: &str, dims: &[usize], seed: u64, batch_norm: bool, dropout: f32) -> Result<Vec<MlpLayer>> {
    let n = dims.len() - 1;
    (0..n)
        .map(|i| {
            let hidden = i + 1 < n;
            let act = if hidden && !batch_norm { Act::Relu } else { Act::None };
            let linear = Linear::new(
                gpu,
                &format!("{prefix}.{i}"),
                dims[i],
                dims[i + 1],
                true,
                act,
                seed.wrapping_add(i as u64 * 7919),
            )?;
            let bn = if hidden && batch_norm {
                Some(BatchNorm1d::new(gpu, &format!("{prefix}.{i}.bn"), dims[i + 1])?)
            } else {
                None
            };
            Ok(MlpLayer { linear, bn, dropout: if hidden { dropout } else { 0.0 }, relu: hidden && batch_norm })
        })
        .collect()
}

/// Run MLP number `id` (its dropout seeds differ from the other MLPs').
fn run_mlp(tape: &Tape, layers: &[MlpLayer], x: &Var, pass: Pass, id: usize) -> Result<Var> {
    let mut h = x.clone();
    for (i, l) in layers.iter().enumerate() {
        h = l.linear.forward(tape, &h)?;
        if let Some(bn) = &l.bn {
            h = bn.forward(tape, &h, pass.bn)?;
        }
        if let (Some(seed), true) = (pass.dropout_seed, l.dropout > 0.0) {
            h = h.dropout(l.dropout, layer_seed(seed, id, i), 0)?;
        }
        if l.relu {
            h = h.act(Act::Relu)?;
        }
    }
    Ok(h)
}

/// MLP id of the decoder in `run_mlp` (encoders are 0..K).
const DECODER_ID: usize = 63;

/// Element-mean squared difference, `[1]`.
fn mse(a: &Var, b: &Var) -> Result<Var> {
    let d = a.sub(b)?;
    d.mul(&d)?.mean_all()
}

impl MqTokenizer {
    /// A fresh model: PyTorch-default Linear init, codebooks U(-1/L, 1/L).
    pub fn new(gpu: &Gpu, cfg: MqModelConfig) -> Result<MqTokenizer> {
        cfg.validate()?;
        let mut enc_dims = vec![cfg.in_dim];
        enc_dims.extend(&cfg.enc_hidden);
        enc_dims.push(cfg.code_dim);
        let mut dec_dims = vec![cfg.code_dim];
        dec_dims.extend(&cfg.dec_hidden);
        dec_dims.push(cfg.in_dim);
        let n_enc = match cfg.variant {
            MqVariant::Parallel => cfg.books,
            MqVariant::Residual => 1,
        };
        let encoders = (0..n_enc)
            .map(|k| {
                let seed = cfg.seed.wrapping_add(1000 * k as u64);
                mlp(gpu, &format!("encoder.{k}"), &enc_dims, seed, cfg.batch_norm, cfg.enc_dropout)
            })
            .collect::<Result<_>>()?;
        let decoder = mlp(gpu, "decoder", &dec_dims, cfg.seed.wrapping_add(999_983), cfg.batch_norm, cfg.dec_dropout)?;
        let (l, dc) = (cfg.codebook_size, cfg.code_dim);
        let codebooks = (0..cfg.books)
            .map(|k| {
                let v = uniform_init(cfg.seed.wrapping_add(77 + k as u64), l * dc, 1.0 / l as f32);
                Ok(Param::new(format!("codebook.{k}"), Tensor::from_f32(gpu, &v, &[l, dc])?))
            })
            .collect::<Result<_>>()?;
        Ok(MqTokenizer { cfg, encoders, decoder, codebooks })
    }

    /// All trainable parameters: `encoder.{k}.{i}.weight|bias`,
    /// `encoder.{k}.{i}.bn.weight|bias` (with BatchNorm), `decoder.{i}...`
    /// likewise, `codebook.{k}`.
    pub fn params(&self) -> Vec<Rc<Param>> {
        let mut v: Vec<Rc<Param>> = Vec::new();
        for l in self.encoders.iter().flatten().chain(&self.decoder) {
            v.extend(l.linear.params());
            if let Some(bn) = &l.bn {
                v.extend(bn.params());
            }
        }
        v.extend(self.codebooks.iter().cloned());
        v
    }

    /// Every tensor of the model state by name: the parameters, then the
    /// BatchNorm running statistics (`....bn.running_mean|running_var`).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.params().iter().map(|p| (p.name.clone(), p.value.clone())).collect();
        for bn in self.encoders.iter().flatten().chain(&self.decoder).filter_map(|l| l.bn.as_ref()) {
            v.extend(bn.buffers().into_iter().map(|(n, t)| (n, t.clone())));
        }
        v
    }

    /// Host copies of the model state (parameters and BatchNorm running
    /// statistics): (name, shape, values).
    pub fn snapshot(&self) -> Result<super::rqvae::ParamValues> {
        self.state_tensors().iter().map(|(n, t)| Ok((n.clone(), t.shape().to_vec(), t.to_vec_f32()?))).collect()
    }

    /// Overwrite the model state by name (errors name the tensor and shapes).
    pub fn load_params(&self, get: super::rqvae::ParamSource) -> Result<()> {
        for (name, t) in self.state_tensors() {
            let Some((shape, data)) = get(&name) else {
                bail!("mq: no value for tensor {name} {}", shape_str(t.shape()));
            };
            if shape != t.shape() {
                bail!("mq: tensor {name} expects shape {}, got {}", shape_str(t.shape()), shape_str(&shape));
            }
            t.write_f32(&data).with_context(|| format!("mq: writing tensor {name}"))?;
        }
        Ok(())
    }

    /// Write the model state (f32) and the config (`__metadata__["mq_config"]`)
    /// as safetensors, atomically.
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        use crate::io::{safetensors::StoreDtype, HostTensor};
        let mut t = std::collections::BTreeMap::new();
        for (name, shape, data) in self.snapshot()? {
            t.insert(name, HostTensor::new(&shape, data)?);
        }
        let meta: std::collections::HashMap<String, String> =
            [("mq_config".to_string(), serde_json::to_string(&self.cfg)?)].into_iter().collect();
        crate::io::safetensors::save(path, &t, Some(&meta), StoreDtype::F32)
    }

    /// Load a model written by [`MqTokenizer::save`].
    pub fn load(gpu: &Gpu, path: &std::path::Path) -> Result<MqTokenizer> {
        let f = crate::io::safetensors::SafeTensorsFile::open(path)?;
        let json = f
            .metadata()
            .get("mq_config")
            .cloned()
            .with_context(|| format!("{}: no mq_config metadata (not an MQ-tokenizer file?)", path.display()))?;
        let cfg: MqModelConfig =
            serde_json::from_str(&json).with_context(|| format!("{}: bad mq_config", path.display()))?;
        let m = MqTokenizer::new(gpu, cfg)?;
        m.load_params(&|name| f.get(name).ok().map(|t| (t.shape.clone(), t.data.clone())))
            .with_context(|| format!("loading {}", path.display()))?;
        Ok(m)
    }

    fn check_x(&self, op: &str, x: &Tensor) -> Result<usize> {
        if x.dtype() != DType::F32 || x.rank() != 2 || x.shape()[1] != self.cfg.in_dim || x.shape()[0] == 0 {
            bail!(
                "{op}: x must be f32 [B, {}] (B > 0, the tokenizer's input width), got {} {:?}",
                self.cfg.in_dim,
                shape_str(x.shape()),
                x.dtype()
            );
        }
        Ok(x.shape()[0])
    }

    /// Quantize the encoder input `xin` (`[B, d]`): per book the (straight-
    /// through) latent, the selected codeword rows (gradient to the codebook)
    /// and the codes. Residual variant: book k's latent is the residual r_k.
    #[allow(clippy::type_complexity)]
    fn quantize(&self, tape: &Tape, xin: &Var, pass: Pass) -> Result<(Vec<Var>, Vec<Var>, Vec<Tensor>)> {
        let books: Vec<Var> = self.codebooks.iter().map(|p| tape.param(p)).collect();
        let (mut lat, mut sel, mut codes) = (Vec::new(), Vec::new(), Vec::new());
        match self.cfg.variant {
            MqVariant::Parallel => {
                for (k, (enc, book)) in self.encoders.iter().zip(&books).enumerate() {
                    let a = run_mlp(tape, enc, xin, pass, k)?;
                    let c = nearest(&a.value, &book.value)?.idx;
                    sel.push(autograd::embedding(book, &c)?);
                    lat.push(a);
                    codes.push(c);
                }
            }
            MqVariant::Residual => {
                let mut r = run_mlp(tape, &self.encoders[0], xin, pass, 0)?;
                for (k, book) in books.iter().enumerate() {
                    let c = nearest(&r.value, &book.value)?.idx;
                    let e = autograd::embedding(book, &c)?;
                    let next = if k + 1 < books.len() { Some(r.sub(&e)?) } else { None };
                    lat.push(r.clone());
                    sel.push(e);
                    codes.push(c);
                    if let Some(n) = next {
                        r = n;
                    }
                }
            }
        }
        Ok((lat, sel, codes))
    }

    /// One forward pass on `x: [B, d]`. A training step (`mask = Some((ratio,
    /// seed))`): mask x into a new buffer, BatchNorm with batch statistics
    /// (updating the running ones; B >= 2), dropout seeded from `seed`.
    /// Evaluation (`None`): no mask, BatchNorm with the running statistics, no
    /// dropout. Then quantize, decode the straight-through pooled codewords,
    /// and the losses against the unmasked `x`. Records nothing on the host
    /// (no sync).
    pub fn forward(&self, tape: &Tape, x: &Tensor, mask: Option<(f32, u32)>) -> Result<MqStepOut> {
        self.check_x("mq::forward", x)?;
        let k_n = self.cfg.books as f32;
        let xv = tape.constant(x.clone());
        let (xin, pass) = match mask {
            Some((ratio, seed)) => (
                tape.constant(mask_input(x, ratio, seed, 0)?),
                Pass { bn: BnMode::Train, dropout_seed: Some(ops::dropout::pcg_hash(seed ^ 0x5bd1_e995)) },
            ),
            None => (xv.clone(), Pass::EVAL),
        };
        let (lat, sel, codes) = self.quantize(tape, &xin, pass)?;
        let (mut cbs, mut cms) = (Vec::new(), Vec::new());
        let mut quant: Option<Var> = None;
        for (a, e) in lat.iter().zip(&sel) {
            let cb = mse(e, &tape.constant(a.value.clone()))?;
            let cm = mse(&tape.constant(e.value.clone()), a)?;
            let term = cb.add(&cm.scale(self.cfg.beta)?)?;
            cbs.push(cb.value.clone());
            cms.push(cm.value.clone());
            quant = Some(match quant {
                None => term,
                Some(q) => q.add(&term)?,
            });
        }
        let quant = quant.expect("books >= 1");
        // Straight-through decoder input.
        let mut esum = sel[0].value.clone();
        for e in &sel[1..] {
            esum = ops::elementwise::add(&esum, &e.value)?;
        }
        let pooled = match self.cfg.variant {
            MqVariant::Parallel => {
                // mean_k a^k + sg(mean_k e^k - mean_k a^k): value mean_k e^k,
                // gradient g / K to every a^k.
                let mut asum = lat[0].clone();
                for a in &lat[1..] {
                    asum = asum.add(a)?;
                }
                let amean = asum.scale(1.0 / k_n)?;
                let emean = ops::elementwise::scale(&esum, 1.0 / k_n)?;
                let delta = ops::elementwise::sub(&emean, &amean.value)?;
                amean.add(&tape.constant(delta))?
            }
            MqVariant::Residual => {
                // z + sg(sum_k e^k - z).
                let z = &lat[0];
                let delta = ops::elementwise::sub(&esum, &z.value)?;
                z.add(&tape.constant(delta))?
            }
        };
        let out = run_mlp(tape, &self.decoder, &pooled, pass, DECODER_ID)?;
        let recon = mse(&out, &xv)?;
        let total = recon.add(&quant)?;
        Ok(MqStepOut {
            total,
            recon: recon.value,
            quant: quant.value,
            cb: cbs,
            cm: cms,
            codes,
            input: xin.value,
            recon_x: out.value,
        })
    }

    /// Codes `[B][K]` of `x: [B, d]` (no mask; argmin per book).
    pub fn codes(&self, x: &Tensor) -> Result<Vec<Vec<u32>>> {
        let b = self.check_x("mq::codes", x)?;
        let tape = Tape::no_grad();
        let (_, _, codes) = self.quantize(&tape, &tape.constant(x.clone()), Pass::EVAL)?;
        let host: Vec<Vec<u32>> = codes.iter().map(|c| c.to_vec_u32()).collect::<Result<_>>()?;
        Ok((0..b).map(|i| host.iter().map(|c| c[i]).collect()).collect())
    }

    /// Codes of host rows `x: [n, d]` in chunks of `chunk` rows.
    pub fn codes_host(&self, x: &[f32], chunk: usize) -> Result<Vec<Vec<u32>>> {
        let gpu = self.codebooks[0].value.gpu().clone();
        let d = self.cfg.in_dim;
        if x.is_empty() || !x.len().is_multiple_of(d) {
            bail!("mq::codes: {} values are not rows of the tokenizer's input width {d}", x.len());
        }
        let n = x.len() / d;
        let mut out = Vec::with_capacity(n);
        for s in (0..n).step_by(chunk.max(1)) {
            let rows = chunk.max(1).min(n - s);
            out.extend(self.codes(&Tensor::from_f32(&gpu, &x[s * d..(s + rows) * d], &[rows, d])?)?);
        }
        Ok(out)
    }

    /// (Re-)initialize every codebook by k-means on the unmasked latents of
    /// the host rows `x: [n, d]`: book k's encoder outputs (`Parallel`), or
    /// level k's residuals given the freshly initialized books before it
    /// (`Residual`). BatchNorm normalizes with the statistics of these rows
    /// (no running-statistics update), as the training batches do. Needs n >= L.
    pub fn kmeans_init(&self, x: &[f32], kopts: KmeansOpts) -> Result<()> {
        let gpu = self.codebooks[0].value.gpu().clone();
        let (d, l) = (self.cfg.in_dim, self.cfg.codebook_size);
        let n = x.len() / d;
        if n < l {
            bail!("mq: {n} rows cannot initialize a codebook of {l} codes (need rows >= codes)");
        }
        let tape = Tape::no_grad();
        let xt = tape.constant(Tensor::from_f32(&gpu, x, &[n, d])?);
        let pass = Pass { bn: BnMode::BatchStats, dropout_seed: None };
        let mut r = match self.cfg.variant {
            MqVariant::Residual => Some(run_mlp(&tape, &self.encoders[0], &xt, pass, 0)?.value),
            MqVariant::Parallel => None,
        };
        for (k, book) in self.codebooks.iter().enumerate() {
            let lat = match &r {
                Some(r) => r.clone(),
                None => run_mlp(&tape, &self.encoders[k], &xt, pass, k)?.value,
            };
            let o = KmeansOpts { seed: kopts.seed.wrapping_add(k as u64), ..kopts };
            let res = kmeans(&lat, l, o).with_context(|| format!("mq: k-means of codebook {k}"))?;
            book.value.write_f32(&res.centroids.to_vec_f32()?)?;
            if let Some(rr) = &mut r {
                let e = ops::embedding::gather(&book.value, &res.assign)?;
                *rr = ops::elementwise::sub(rr, &e)?;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Training.

/// Everything [`train_mq`] needs besides the data.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct MqTokenizerConfig {
    pub code_dim: usize,
    pub books: usize,
    pub codebook_size: usize,
    pub enc_hidden: Vec<usize>,
    pub dec_hidden: Vec<usize>,
    pub variant: MqVariant,
    pub beta: f32,
    /// BatchNorm1d after every hidden Linear of the MLPs.
    #[serde(default)]
    pub batch_norm: bool,
    /// Dropout after every hidden layer of the encoder(s) / the decoder.
    #[serde(default)]
    pub enc_dropout: f32,
    #[serde(default)]
    pub dec_dropout: f32,
    /// ρ: probability that an input element is zeroed during training.
    pub mask_ratio: f32,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f32,
    pub weight_decay: f32,
    /// Re-run the k-means codebook initialization every this many epochs
    /// (0: only before training).
    pub kmeans_every: usize,
    /// Lloyd iterations of each k-means.
    pub kmeans_iters: usize,
    /// Fraction of rows held out for checkpoint selection (0: keep the last).
    pub valid_ratio: f64,
    /// Evaluate (validation loss, collision rate) every this many epochs.
    pub eval_every: usize,
    /// Append the deterministic disambiguation token to colliding tuples.
    pub unique_ids: bool,
    pub seed: u64,
    pub progress: bool,
}

impl MqTokenizerConfig {
    /// TokenRec's settings: K = 3 books of `codebook_size` codes (the paper:
    /// 256 on LastFM / ML1M, 512 on Beauty / Clothing), d_c = 512, the code's
    /// widths with BatchNorm and dropout 0.5 (encoders) / 0.2 (decoder),
    /// ρ = 0.2, β = 0.25, AdamW lr 1e-3 wd 0.01, batch 512, k-means every 10
    /// epochs (the code: 50, over 1,000 epochs; the runs here are 20-200 epochs,
    /// and on ml-100k LightGCN a re-initialization at epoch 10 took the
    /// residual users' collision rate at epoch 20 from 0.78 to 0.25), 80/20
    /// split, K parallel encoders.
    pub fn tokenrec(codebook_size: usize) -> MqTokenizerConfig {
        MqTokenizerConfig {
            code_dim: 512,
            books: 3,
            codebook_size,
            enc_hidden: vec![128, 256],
            dec_hidden: vec![256, 128],
            variant: MqVariant::Parallel,
            beta: 0.25,
            batch_norm: true,
            enc_dropout: 0.5,
            dec_dropout: 0.2,
            mask_ratio: 0.2,
            epochs: 200,
            batch_size: 512,
            lr: 1e-3,
            weight_decay: 0.01,
            kmeans_every: 10,
            kmeans_iters: 25,
            valid_ratio: 0.2,
            eval_every: 10,
            unique_ids: false,
            seed: 42,
            progress: true,
        }
    }

    pub fn model_config(&self, in_dim: usize) -> MqModelConfig {
        MqModelConfig {
            in_dim,
            code_dim: self.code_dim,
            books: self.books,
            codebook_size: self.codebook_size,
            enc_hidden: self.enc_hidden.clone(),
            dec_hidden: self.dec_hidden.clone(),
            variant: self.variant,
            beta: self.beta,
            seed: self.seed,
            batch_norm: self.batch_norm,
            enc_dropout: self.enc_dropout,
            dec_dropout: self.dec_dropout,
        }
    }
}

/// One evaluation of [`train_mq`].
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MqEval {
    pub epoch: usize,
    /// Unmasked total / reconstruction loss on the validation rows (on the
    /// training rows when there are none).
    pub loss: f64,
    pub recon: f64,
    /// Argmin collision rate over all rows.
    pub collision_rate: f64,
}

/// The report of one MQ tokenizer (the shared report plus MQ specifics).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MqReport {
    #[serde(flatten)]
    pub base: TokenizerReport,
    pub evals: Vec<MqEval>,
    pub n_train: usize,
    pub n_valid: usize,
    /// k-means (re-)initializations run and their total time.
    pub kmeans_runs: usize,
    pub kmeans_seconds: f64,
}

fn gather_rows(x: &[f32], d: usize, idx: &[usize]) -> Vec<f32> {
    idx.iter().flat_map(|&i| x[i * d..(i + 1) * d].iter().cloned()).collect()
}

/// Err unless `x` holds `n` finite rows of a common width (and that width is
/// `want_dim` when given); returns the width.
pub fn check_rows(what: &str, x: &[f32], n: usize, want_dim: Option<usize>) -> Result<usize> {
    if n == 0 || x.is_empty() || !x.len().is_multiple_of(n) {
        bail!("mq: {what} embeddings hold {} values, not a [{n}, d] matrix", x.len());
    }
    let d = x.len() / n;
    if let Some(w) = want_dim {
        if w != d {
            bail!("mq: {what} embeddings are {d}-d but {w}-d were expected");
        }
    }
    crate::quant::check_finite_host("mq", &format!("{what} embeddings"), x, &[n, d])?;
    Ok(d)
}

/// Unmasked mean losses of `rows` (chunked).
fn eval_loss(model: &MqTokenizer, x: &[f32], rows: &[usize], chunk: usize) -> Result<(f64, f64)> {
    let gpu = model.codebooks[0].value.gpu().clone();
    let d = model.cfg.in_dim;
    let (mut tot, mut rec) = (0.0, 0.0);
    for c in rows.chunks(chunk.max(1)) {
        let t = Tensor::from_f32(&gpu, &gather_rows(x, d, c), &[c.len(), d])?;
        let tape = Tape::no_grad();
        let out = model.forward(&tape, &t, None)?;
        let w = c.len() as f64 / rows.len() as f64;
        tot += out.total.value.to_scalar()? as f64 * w;
        rec += out.recon.to_scalar()? as f64 * w;
    }
    Ok((tot, rec))
}

/// Train one MQ tokenizer on `x: [n, d]` (host rows; `what` names them in
/// messages, e.g. "user"). Returns the model (the kept checkpoint), the
/// identifiers of all n rows and the report. Errors on NaN/inf, a ragged
/// matrix, fewer training rows than codes, or bad settings.
pub fn train_mq(
    gpu: &Gpu,
    x: &[f32],
    n: usize,
    cfg: &MqTokenizerConfig,
    what: &str,
) -> Result<(MqTokenizer, ItemCodes, MqReport)> {
    let d = check_rows(what, x, n, None)?;
    if cfg.epochs == 0 || cfg.batch_size == 0 || cfg.eval_every == 0 || cfg.kmeans_iters == 0 {
        bail!("mq: epochs, batch_size, eval_every and kmeans_iters must be >= 1");
    }
    if cfg.batch_norm && cfg.batch_size < 2 {
        bail!("mq: BatchNorm needs batches of at least 2 rows (batch_size {})", cfg.batch_size);
    }
    if !(0.0..1.0).contains(&cfg.valid_ratio) {
        bail!("mq: valid_ratio {} must be in [0, 1)", cfg.valid_ratio);
    }
    if !(0.0..=1.0).contains(&cfg.mask_ratio) {
        bail!("mq: mask ratio {} must be in [0, 1]", cfg.mask_ratio);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let mut perm: Vec<usize> = (0..n).collect();
    perm.shuffle(&mut rng);
    let n_valid = (n as f64 * cfg.valid_ratio).round() as usize;
    let (valid, train) = perm.split_at(n_valid);
    let (mut valid, mut train) = (valid.to_vec(), train.to_vec());
    valid.sort_unstable();
    train.sort_unstable();
    if train.len() < cfg.codebook_size {
        bail!(
            "mq: {} {what} rows for training ({n} rows, valid_ratio {}) are fewer than the {} codes per codebook",
            train.len(),
            cfg.valid_ratio,
            cfg.codebook_size
        );
    }
    let model = MqTokenizer::new(gpu, cfg.model_config(d))?;
    let mut rep = MqReport { n_train: train.len(), n_valid: valid.len(), ..Default::default() };
    rep.base.method = "mq".into();
    rep.base.adapter = gpu.info().name.clone();
    rep.base.config = serde_json::to_value(cfg)?;
    let t0 = Instant::now();
    let train_x = gather_rows(x, d, &train);
    let kmeans_init = |epoch: usize, rep: &mut MqReport| -> Result<()> {
        let t = Instant::now();
        let seed = cfg.seed.wrapping_add(1_000 + epoch as u64 * 31);
        model.kmeans_init(&train_x, KmeansOpts { max_iter: cfg.kmeans_iters, tol: 1e-4, seed })?;
        rep.kmeans_runs += 1;
        rep.kmeans_seconds += t.elapsed().as_secs_f64();
        Ok(())
    };
    kmeans_init(0, &mut rep)?;
    let mut opt = AdamW::new(
        model.params(),
        AdamWHp { lr: cfg.lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: cfg.weight_decay },
        None,
    )?;
    // Batches of batch_size rows; a last batch of one row joins the one before
    // (BatchNorm's batch statistics need two rows).
    let mut bounds: Vec<(usize, usize)> =
        (0..train.len()).step_by(cfg.batch_size).map(|s| (s, (s + cfg.batch_size).min(train.len()))).collect();
    if bounds.len() >= 2 && bounds[bounds.len() - 1].1 - bounds[bounds.len() - 1].0 == 1 {
        let last = bounds.pop().expect("len >= 2");
        bounds.last_mut().expect("len >= 1").1 = last.1;
    }
    let steps = bounds.len();
    let bar = if cfg.progress { ProgressBar::new((cfg.epochs * steps) as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "mq {what} {{bar:30}} {{pos}}/{{len}} steps {{per_sec}} eta {{eta}} {{msg}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let eval_rows = if valid.is_empty() { &train } else { &valid };
    let mut best: Option<(f64, usize, super::rqvae::ParamValues)> = None;
    let mut order = train.clone();
    let mut step = 0u64;
    for epoch in 0..cfg.epochs {
        if cfg.kmeans_every > 0 && epoch > 0 && epoch % cfg.kmeans_every == 0 {
            kmeans_init(epoch, &mut rep)?;
        }
        order.shuffle(&mut rng);
        let mut losses = Vec::with_capacity(steps);
        for &(s, e) in &bounds {
            let chunk = &order[s..e];
            let xb = Tensor::from_f32(gpu, &gather_rows(x, d, chunk), &[chunk.len(), d])?;
            let tape = Tape::new();
            let out = model.forward(&tape, &xb, Some((cfg.mask_ratio, step_mask_seed(cfg.seed, step))))?;
            tape.backward(&out.total)?;
            opt.step()?;
            losses.push((out.total.value.clone(), out.recon, out.quant, chunk.len()));
            step += 1;
            bar.inc(1);
        }
        let mut log = EpochLog { epoch, ..Default::default() };
        let m = train.len() as f64;
        for (t, r, q, b) in &losses {
            let w = *b as f64 / m;
            log.total += t.to_scalar()? as f64 * w;
            log.recon += r.to_scalar()? as f64 * w;
            log.quant += q.to_scalar()? as f64 * w;
        }
        if !log.total.is_finite() {
            bar.abandon();
            bail!("mq: {what} tokenizer diverged at epoch {epoch} (loss {})", log.total);
        }
        if (epoch + 1) % cfg.eval_every == 0 || epoch + 1 == cfg.epochs {
            let (loss, recon) = eval_loss(&model, x, eval_rows, cfg.batch_size)?;
            let cr = collision_rate(&model.codes_host(x, cfg.batch_size)?);
            log.collision_rate = Some(cr);
            rep.evals.push(MqEval { epoch, loss, recon, collision_rate: cr });
            // Keep the lowest validation loss (the code's rule); without
            // validation rows, the last evaluation.
            if valid.is_empty() || best.as_ref().is_none_or(|b| loss <= b.0) {
                best = Some((loss, epoch, model.snapshot()?));
            }
            bar.set_message(format!("loss {:.4} valid {loss:.4} collisions {cr:.4}", log.total));
            if bar.is_hidden() && cfg.progress {
                eprintln!(
                    "mq {what} epoch {}/{} loss {:.4} valid {loss:.4} collisions {cr:.4}",
                    epoch + 1,
                    cfg.epochs,
                    log.total
                );
            }
        }
        rep.base.epochs.push(log);
    }
    bar.finish();
    let (_, be, snap) = best.expect("the last epoch is always evaluated");
    model.load_params(&|name| snap.iter().find(|s| s.0 == name).map(|s| (s.1.clone(), s.2.clone())))?;
    rep.base.train_seconds = t0.elapsed().as_secs_f64();
    rep.base.best_epoch = be;

    let codes = model.codes_host(x, cfg.batch_size)?;
    let groups = collision_groups(&codes);
    let cr = collision_rate(&codes);
    rep.base.best_collision_rate = cr;
    rep.base.ids = IdStats {
        collision_rate_argmin: cr,
        collision_rate_sinkhorn: cr,
        sinkhorn_rounds: 0,
        items_with_extra_token: if cfg.unique_ids { groups.iter().map(|g| g.len()).sum() } else { 0 },
        max_group: groups.iter().map(|g| g.len()).max().unwrap_or(1),
    };
    let ids = if cfg.unique_ids {
        disambiguate(codes, cfg.books, cfg.codebook_size)
    } else {
        ItemCodes { levels: cfg.books, codebook_size: cfg.codebook_size, extra_size: 0, codes }
    };
    fill_code_stats(&mut rep.base, &ids);
    if n >= 2 {
        // Neighbours in the input (CF) space sharing codes.
        rep.base.code_similarity = Some(code_similarity(gpu, &ids.codes, ids.levels, x)?);
    }
    Ok((model, ids, rep))
}

/// Identifiers, reports and models of both tokenizers.
#[derive(Debug)]
pub struct MqOutput {
    pub users: ItemCodes,
    pub items: ItemCodes,
    pub user_report: MqReport,
    pub item_report: MqReport,
    pub user_model: MqTokenizer,
    pub item_model: MqTokenizer,
}

/// TokenRec's tokenization stage: train the user tokenizer on `users: [n_users,
/// d]` and the item tokenizer on `items: [n_items, d]` (same width d; row i =
/// internal id i), each with its own config. The library entry point of
/// `genrec tokenize --method mq`.
pub fn tokenize_users_items(
    gpu: &Gpu,
    users: &[f32],
    n_users: usize,
    items: &[f32],
    n_items: usize,
    user_cfg: &MqTokenizerConfig,
    item_cfg: &MqTokenizerConfig,
) -> Result<MqOutput> {
    let du = check_rows("user", users, n_users, None)?;
    check_rows("item", items, n_items, Some(du)).context("mq: user and item embeddings must have the same width")?;
    let (user_model, uids, mut user_report) = train_mq(gpu, users, n_users, user_cfg, "user")?;
    user_report.base.method = "mq-users".into();
    let (item_model, iids, mut item_report) = train_mq(gpu, items, n_items, item_cfg, "item")?;
    item_report.base.method = "mq-items".into();
    Ok(MqOutput { users: uids, items: iids, user_report, item_report, user_model, item_model })
}

#[cfg(test)]
#[path = "mq_tests.rs"]
mod tests;
