//! RQ-VAE item tokenizer (TIGER) with LETTER's regularizers, trained on the GPU.
//!
//! Model (LETTER's `RQ-VAE/models/{vq,rq,rqvae}.py` semantics, letter.spec.md §2.2, §3.1):
//! - encoder: MLP `in_dim -> hidden[0] -> ... -> e_dim`, ReLU after every layer
//!   but the last, Xavier-normal weights, zero biases; decoder: the mirror image
//!   (`e_dim -> ... -> in_dim`, no activation on its output);
//! - `levels` codebooks `[codebook_size, e_dim]`; residual quantization
//!   `r_0 = z`, `c_l = argmin_i |r_l - e_i|^2` (on the last level optionally a
//!   Sinkhorn balanced assignment, LETTER's training setting), `r_{l+1} = r_l - e_{c_l}`;
//! - straight-through estimator. With [`RqVaeConfig::st_chain`] (default, the
//!   authors' code) every level's output is `x_res = r_l + sg(e - r_l)` and the
//!   next residual is `r_l - x_res`, whose gradient with respect to `r_l` is
//!   exactly zero: the encoder gets the reconstruction / CF gradient through the
//!   identity path of level 0 and the commitment gradient of level 0 only. With
//!   `st_chain = false` ("pure math") the residuals keep their gradient
//!   (`r_{l+1} = r_l - e_{c_l}`), so every level's commitment term reaches the
//!   encoder and the earlier codebooks;
//! - losses: `recon = mean((dec(x_q) - x)^2)`; per level `cb = mean((e - sg r)^2)`,
//!   `cm = mean((sg e - r)^2)`, diversity `div` (below), level loss
//!   `cb + mu * cm + beta * div`, averaged over levels; collaborative
//!   `cf = InfoNCE(x_q, h)` (raw inner products, in-batch negatives, one
//!   direction); total `recon + mean_l(level) + alpha * cf`;
//! - diversity (LETTER): logits `e_{c_i} . E^T` over all codes of the level, the
//!   own code's logit lowered by 1e12, cross-entropy against a positive drawn
//!   uniformly from the other codes of `c_i`'s cluster (clusters of the codebook
//!   rows by size-constrained k-means, refreshed every epoch by the trainer).
//!   Gradients reach the anchor row and every row of the codebook.
//!
//! Codebook gradients of the gathered rows are scatter-added (`ops::embedding`).
//! No new kernels: everything is composed from `ops` / `quant`.

use std::rc::Rc;

use anyhow::{bail, Context, Result};
use rand::Rng;

use crate::autograd::{self, CeOptions, Param, Tape, Var};
use crate::gpu::{shape_str, DType, Gpu, Tensor};
use crate::nn::{normal_init, Linear};
use crate::ops::{self, Act};
use crate::quant::nearest::{nearest, pairwise_sqdist};
use crate::quant::sinkhorn::{sinkhorn, SinkhornOpts};

/// Architecture of an [`RqVae`].
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RqVaeConfig {
    /// Semantic embedding width D.
    pub in_dim: usize,
    /// Encoder hidden sizes (the decoder mirrors them).
    pub hidden: Vec<usize>,
    /// Latent / codeword width d.
    pub e_dim: usize,
    /// Number of residual levels L.
    pub levels: usize,
    /// Codes per level N.
    pub codebook_size: usize,
    /// Commitment weight (TIGER / LETTER: 0.25).
    pub mu: f32,
    /// The authors' straight-through residual chain (see the module doc).
    pub st_chain: bool,
    /// Seed of the weight initialization.
    pub seed: u64,
}

impl RqVaeConfig {
    /// LETTER's tokenizer shape (4 levels x 256 codes x 32-d, mu 0.25) for
    /// `in_dim`-wide inputs with [`RqVaeConfig::default_hidden`] layers.
    pub fn new(in_dim: usize) -> RqVaeConfig {
        RqVaeConfig {
            in_dim,
            hidden: Self::default_hidden(in_dim, 32),
            e_dim: 32,
            levels: 4,
            codebook_size: 256,
            mu: 0.25,
            st_chain: true,
            seed: 42,
        }
    }

    /// Default encoder hidden sizes: halving powers of two, starting at the
    /// largest power of two below `in_dim` and stopping above `e_dim`.
    /// LETTER's 4096-d input gives its 2048, 1024, 512, 256, 128, 64; our
    /// 384-d MiniLM embeddings give 256, 128, 64.
    pub fn default_hidden(in_dim: usize, e_dim: usize) -> Vec<usize> {
        let mut v = Vec::new();
        if in_dim < 2 {
            return v;
        }
        let mut h = 1usize << (usize::BITS - 1 - (in_dim - 1).leading_zeros());
        while h > e_dim {
            v.push(h);
            h /= 2;
        }
        v
    }

    fn validate(&self) -> Result<()> {
        if self.in_dim == 0 || self.e_dim == 0 || self.levels == 0 || self.codebook_size < 2 {
            bail!(
                "rqvae: invalid config: in_dim {}, e_dim {}, levels {}, codebook_size {} (need all > 0, codebook_size >= 2)",
                self.in_dim,
                self.e_dim,
                self.levels,
                self.codebook_size
            );
        }
        if self.hidden.contains(&0) {
            bail!("rqvae: hidden sizes {:?} contain a zero", self.hidden);
        }
        Ok(())
    }

    /// Layer widths of the encoder, input to latent.
    pub fn encoder_dims(&self) -> Vec<usize> {
        let mut d = vec![self.in_dim];
        d.extend(&self.hidden);
        d.push(self.e_dim);
        d
    }
}

/// Fixed diversity clusters of one step: `labels[l][code]` is the cluster of
/// `code` in level `l`'s codebook.
#[derive(Clone, Debug)]
pub struct DiversityClusters {
    pub labels: Vec<Vec<u32>>,
}

/// How the diversity positives are chosen.
pub enum Positives<'a> {
    /// Uniform same-cluster draw excluding the code itself (LETTER).
    Sample(&'a mut rand::rngs::StdRng),
    /// Given `[levels][batch]` (parity tests).
    Given(&'a [Vec<u32>]),
}

/// Loss weights and assignment options of one training step.
#[derive(Clone, Copy, Debug)]
pub struct StepOptions {
    /// Weight of the collaborative InfoNCE term (LETTER: 0.02; 0 = off).
    pub alpha: f32,
    /// Weight of the diversity term (LETTER: 1e-4; 0 = off).
    pub beta: f32,
    /// Sinkhorn assignment on the last level (LETTER: on, TIGER: off).
    pub sinkhorn: Option<SinkhornOpts>,
}

/// Everything one forward pass produced. Losses are `[1]` GPU values.
pub struct StepOut {
    pub total: Var,
    pub recon: Tensor,
    pub quant: Tensor,
    pub cf: Option<Tensor>,
    pub cb: Vec<Tensor>,
    pub cm: Vec<Tensor>,
    pub div: Vec<Tensor>,
    /// `[levels][batch]` codes (read back: the diversity positives need them).
    pub codes: Vec<Vec<u32>>,
    /// Quantized latent `[B, e_dim]` (straight-through value).
    pub xq: Tensor,
    /// Per-level residuals `r_l` `[B, e_dim]` (values), for dead-code resets.
    pub residuals: Vec<Tensor>,
}

/// Host copies of parameters: (name, shape, values).
pub type ParamValues = Vec<(String, Vec<usize>, Vec<f32>)>;

/// Looks up a parameter's host value (shape, values) by name.
pub type ParamSource<'a> = &'a dyn Fn(&str) -> Option<(Vec<usize>, Vec<f32>)>;

/// The RQ-VAE: encoder, decoder and codebooks as `Param`s.
pub struct RqVae {
    pub cfg: RqVaeConfig,
    pub encoder: Vec<Linear>,
    pub decoder: Vec<Linear>,
    /// `levels` codebooks, each `[codebook_size, e_dim]` (start at zero; see
    /// `tokenize::train` for the k-means initialization).
    pub codebooks: Vec<Rc<Param>>,
}

fn mlp(gpu: &Gpu, prefix: &str, dims: &[usize], seed: u64) -> Result<Vec<Linear>> {
    let n = dims.len() - 1;
    (0..n)
        .map(|i| {
            let (a, b) = (dims[i], dims[i + 1]);
            // Xavier normal: std = sqrt(2 / (fan_in + fan_out)).
            let std = (2.0 / (a + b) as f32).sqrt();
            let w = Tensor::from_f32(gpu, &normal_init(seed.wrapping_add(i as u64 * 7919), a * b, std), &[b, a])?;
            let bias = Tensor::zeros(gpu, &[b], DType::F32)?;
            Ok(Linear {
                weight: Param::new(format!("{prefix}.{i}.weight"), w),
                bias: Some(Param::new(format!("{prefix}.{i}.bias"), bias)),
                act: if i + 1 < n { Act::Relu } else { Act::None },
            })
        })
        .collect()
}

/// Mean squared difference of two equally shaped values, as a [1] value.
fn mse(a: &Var, b: &Var) -> Result<Var> {
    let d = a.sub(b)?;
    d.mul(&d)?.mean_all()
}

/// In-batch InfoNCE of `a` [B, d] against the constant `b` [B, d] (T = 1).
fn infonce_var(a: &Var, b: &Tensor) -> Result<Var> {
    let fwd = ops::infonce::infonce(&a.value, b, 1.0)?;
    let loss = fwd.loss.clone();
    let (av, bv) = (a.value.clone(), b.clone());
    Ok(a.tape().record(loss, &[a], move |g| {
        let (da, _) = ops::infonce::infonce_backward(&av, &bv, 1.0, &fwd, Some(g))?;
        Ok(vec![Some(da)])
    }))
}

impl RqVae {
    /// A fresh model: Xavier-normal weights, zero biases, zero codebooks.
    pub fn new(gpu: &Gpu, cfg: RqVaeConfig) -> Result<RqVae> {
        cfg.validate()?;
        let dims = cfg.encoder_dims();
        let rev: Vec<usize> = dims.iter().rev().cloned().collect();
        let encoder = mlp(gpu, "encoder", &dims, cfg.seed)?;
        let decoder = mlp(gpu, "decoder", &rev, cfg.seed.wrapping_add(1_000_003))?;
        let codebooks = (0..cfg.levels)
            .map(|l| {
                Ok(Param::new(
                    format!("codebook.{l}"),
                    Tensor::zeros(gpu, &[cfg.codebook_size, cfg.e_dim], DType::F32)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(RqVae { cfg, encoder, decoder, codebooks })
    }

    /// All trainable parameters (encoder, decoder, codebooks), named
    /// `encoder.{i}.weight|bias`, `decoder.{i}.weight|bias`, `codebook.{l}`.
    pub fn params(&self) -> Vec<Rc<Param>> {
        let mut v: Vec<Rc<Param>> = Vec::new();
        for l in self.encoder.iter().chain(&self.decoder) {
            v.extend(l.params());
        }
        v.extend(self.codebooks.iter().cloned());
        v
    }

    /// Overwrite parameters by name from host values (e.g. a checkpoint or a
    /// parity fixture). Errors name the parameter and the shapes.
    pub fn load_params(&self, get: ParamSource) -> Result<()> {
        for p in self.params() {
            let Some((shape, data)) = get(&p.name) else {
                bail!("rqvae: no value for parameter {} {}", p.name, shape_str(p.value.shape()));
            };
            if shape != p.value.shape() {
                bail!(
                    "rqvae: parameter {} expects shape {}, got {}",
                    p.name,
                    shape_str(p.value.shape()),
                    shape_str(&shape)
                );
            }
            p.value.write_f32(&data).with_context(|| format!("rqvae: writing parameter {}", p.name))?;
        }
        Ok(())
    }

    /// Host copies of every parameter, by name.
    pub fn snapshot(&self) -> Result<ParamValues> {
        self.params().iter().map(|p| Ok((p.name.clone(), p.value.shape().to_vec(), p.value.to_vec_f32()?))).collect()
    }

    /// Write every parameter (f32) and the config (`__metadata__["rqvae_config"]`,
    /// JSON) as safetensors, atomically.
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        use crate::io::{safetensors::StoreDtype, HostTensor};
        let mut t = std::collections::BTreeMap::new();
        for (name, shape, data) in self.snapshot()? {
            t.insert(name, HostTensor::new(&shape, data)?);
        }
        let meta: std::collections::HashMap<String, String> =
            [("rqvae_config".to_string(), serde_json::to_string(&self.cfg)?)].into_iter().collect();
        crate::io::safetensors::save(path, &t, Some(&meta), StoreDtype::F32)
    }

    /// Load a model written by [`RqVae::save`].
    pub fn load(gpu: &Gpu, path: &std::path::Path) -> Result<RqVae> {
        let f = crate::io::safetensors::SafeTensorsFile::open(path)?;
        let cfg_json = f
            .metadata()
            .get("rqvae_config")
            .cloned()
            .with_context(|| format!("{}: no rqvae_config metadata (not an RQ-VAE file?)", path.display()))?;
        let cfg: RqVaeConfig =
            serde_json::from_str(&cfg_json).with_context(|| format!("{}: bad rqvae_config", path.display()))?;
        let m = RqVae::new(gpu, cfg)?;
        m.load_params(&|name| f.get(name).ok().map(|t| (t.shape.clone(), t.data.clone())))
            .with_context(|| format!("loading {}", path.display()))?;
        Ok(m)
    }

    /// Latent `z = enc(x)` for `x: [B, in_dim]`.
    pub fn encode(&self, tape: &Tape, x: &Var) -> Result<Var> {
        let mut h = x.clone();
        for l in &self.encoder {
            h = l.forward(tape, &h)?;
        }
        Ok(h)
    }

    /// Reconstruction `dec(z)`.
    pub fn decode(&self, tape: &Tape, z: &Var) -> Result<Var> {
        let mut h = z.clone();
        for l in &self.decoder {
            h = l.forward(tape, &h)?;
        }
        Ok(h)
    }

    fn check_x(&self, op: &str, x: &Tensor) -> Result<usize> {
        if x.dtype() != DType::F32 || x.rank() != 2 || x.shape()[1] != self.cfg.in_dim || x.shape()[0] == 0 {
            bail!(
                "{op}: x must be f32 [B, {}] with B > 0, got {} {:?}",
                self.cfg.in_dim,
                shape_str(x.shape()),
                x.dtype()
            );
        }
        Ok(x.shape()[0])
    }

    /// Codes of one level for residuals `r: [B, d]`: argmin, or the row argmax
    /// of a Sinkhorn plan over the squared distances when `sk` is given.
    pub fn level_codes(&self, level: usize, r: &Tensor, sk: Option<SinkhornOpts>) -> Result<Tensor> {
        let e = &self.codebooks[level].value;
        match sk {
            None => Ok(nearest(r, e)?.idx),
            Some(o) => Ok(sinkhorn(&pairwise_sqdist(r, e)?, o, false)?.assign),
        }
    }

    /// Codes `[B][levels]` of `x: [B, in_dim]` by argmin at every level (the
    /// inference rule), plus the last-level residuals `[B, d]` (the input of
    /// LETTER's collision re-assignment).
    pub fn codes(&self, x: &Tensor) -> Result<(Vec<Vec<u32>>, Tensor)> {
        let b = self.check_x("rqvae::codes", x)?;
        let tape = Tape::no_grad();
        let mut r = self.encode(&tape, &tape.constant(x.clone()))?.value;
        let mut per_level = Vec::new();
        let mut last = r.clone();
        for l in 0..self.cfg.levels {
            let c = self.level_codes(l, &r, None)?;
            last = r.clone();
            if l + 1 < self.cfg.levels {
                let e = ops::embedding::gather(&self.codebooks[l].value, &c)?;
                r = ops::elementwise::sub(&r, &e)?;
            }
            per_level.push(c);
        }
        let host: Vec<Vec<u32>> = per_level.iter().map(|c| c.to_vec_u32()).collect::<Result<_>>()?;
        Ok(((0..b).map(|i| host.iter().map(|c| c[i]).collect()).collect(), last))
    }

    /// One training forward pass on `x: [B, in_dim]` with optional CF
    /// embeddings `cf: [B, e_dim]` (used when `opts.alpha > 0`) and diversity
    /// clusters (used when `opts.beta > 0`). Reads back the codes (one sync).
    pub fn forward_train(
        &self,
        tape: &Tape,
        x: &Tensor,
        cf: Option<&Tensor>,
        clusters: Option<&DiversityClusters>,
        positives: Positives,
        opts: &StepOptions,
    ) -> Result<StepOut> {
        const OP: &str = "rqvae::forward_train";
        let b = self.check_x(OP, x)?;
        let (l_n, n, d) = (self.cfg.levels, self.cfg.codebook_size, self.cfg.e_dim);
        let gpu = x.gpu().clone();
        let use_cf = opts.alpha != 0.0;
        let use_div = opts.beta != 0.0;
        if use_cf {
            match cf {
                Some(h) if h.shape() == [b, d] => {}
                Some(h) => {
                    bail!("{OP}: CF embeddings must be [{b}, {d}] (batch x e_dim), got {}", shape_str(h.shape()))
                }
                None => bail!("{OP}: alpha = {} needs CF embeddings", opts.alpha),
            }
        }
        if use_div {
            let Some(c) = clusters else { bail!("{OP}: beta = {} needs diversity clusters", opts.beta) };
            if c.labels.len() != l_n || c.labels.iter().any(|v| v.len() != n) {
                bail!("{OP}: diversity clusters must be [{l_n}][{n}] labels");
            }
        }
        let xv = tape.constant(x.clone());
        let z = self.encode(tape, &xv)?;

        // Residual quantization: codes per level, gathered rows with gradient to the codebook.
        let books: Vec<Var> = self.codebooks.iter().map(|p| tape.param(p)).collect();
        let mut r = z.clone();
        let mut rs: Vec<Var> = Vec::new();
        let mut sel: Vec<Var> = Vec::new();
        let mut code_t: Vec<Tensor> = Vec::new();
        for (l, book) in books.iter().enumerate() {
            let sk = if l + 1 == l_n { opts.sinkhorn } else { None };
            let c = self.level_codes(l, &r.value, sk)?;
            let e = autograd::embedding(book, &c)?;
            rs.push(r.clone());
            let next = if self.cfg.st_chain {
                // r - (r + sg(e - r)): value r - e, zero gradient.
                tape.constant(ops::elementwise::sub(&r.value, &e.value)?)
            } else {
                r.sub(&e)?
            };
            sel.push(e);
            code_t.push(c);
            r = next;
        }
        let host: Vec<Vec<u32>> = code_t.iter().map(|c| c.to_vec_u32()).collect::<Result<_>>()?;

        // Per-level losses.
        let mut level_losses: Vec<Var> = Vec::new();
        let (mut cbs, mut cms, mut divs) = (Vec::new(), Vec::new(), Vec::new());
        let mut given_rng = match positives {
            Positives::Sample(rng) => Ok(rng),
            Positives::Given(p) => Err(p),
        };
        for l in 0..l_n {
            let e = &sel[l];
            let r = &rs[l];
            let cb = mse(e, &tape.constant(r.value.clone()))?;
            let cm = mse(&tape.constant(e.value.clone()), r)?;
            let mut lvl = cb.add(&cm.scale(self.cfg.mu)?)?;
            cbs.push(cb.value.clone());
            cms.push(cm.value.clone());
            if use_div {
                let labels = &clusters.unwrap().labels[l];
                let pos: Vec<u32> = match &mut given_rng {
                    Err(p) => {
                        if p.len() != l_n || p[l].len() != b {
                            bail!("{OP}: given positives must be [{l_n}][{b}]");
                        }
                        p[l].clone()
                    }
                    Ok(rng) => sample_positives(labels, &host[l], rng)?,
                };
                for (i, (&p, &c)) in pos.iter().zip(&host[l]).enumerate() {
                    if p as usize >= n || p == c {
                        bail!("{OP}: positive {p} of row {i} at level {l} is out of range or the row's own code {c}");
                    }
                }
                let mut mask = vec![0f32; b * n];
                for (i, &c) in host[l].iter().enumerate() {
                    mask[i * n + c as usize] = -1e12;
                }
                let mask = Tensor::from_f32(&gpu, &mask, &[b, n])?;
                let tgt: Vec<i32> = pos.iter().map(|&p| p as i32).collect();
                let tgt = Tensor::from_i32(&gpu, &tgt, &[b])?;
                let logits = e.matmul(&books[l], false, true)?;
                let div = autograd::cross_entropy(
                    &logits,
                    &tgt,
                    &CeOptions { ignore_index: -100, tau: 1.0, mask: Some(mask) },
                )?;
                lvl = lvl.add(&div.scale(opts.beta)?)?;
                divs.push(div.value.clone());
            }
            level_losses.push(lvl);
        }
        let mut quant = level_losses[0].clone();
        for v in &level_losses[1..] {
            quant = quant.add(v)?;
        }
        let quant = quant.scale(1.0 / l_n as f32)?;

        // Quantized latent with the straight-through estimator: value sum_l e_l,
        // gradient to z by identity.
        let mut xq_val = sel[0].value.clone();
        for e in &sel[1..] {
            xq_val = ops::elementwise::add(&xq_val, &e.value)?;
        }
        let delta = ops::elementwise::sub(&xq_val, &z.value)?;
        let xq = z.add(&tape.constant(delta))?;
        let out = self.decode(tape, &xq)?;
        let recon = mse(&out, &xv)?;
        let mut total = recon.add(&quant)?;
        let mut cf_loss = None;
        if use_cf {
            let c = infonce_var(&xq, cf.unwrap())?;
            cf_loss = Some(c.value.clone());
            total = total.add(&c.scale(opts.alpha)?)?;
        }
        Ok(StepOut {
            total,
            recon: recon.value,
            quant: quant.value,
            cf: cf_loss,
            cb: cbs,
            cm: cms,
            div: divs,
            codes: host,
            xq: xq.value,
            residuals: rs.into_iter().map(|v| v.value).collect(),
        })
    }
}

/// A uniform draw, for every row, from the other codes of its code's cluster
/// (`labels[code]` = cluster). Err if a cluster has a single member.
pub fn sample_positives(labels: &[u32], codes: &[u32], rng: &mut rand::rngs::StdRng) -> Result<Vec<u32>> {
    let k = labels.iter().map(|&c| c as usize + 1).max().unwrap_or(0);
    let mut members: Vec<Vec<u32>> = vec![Vec::new(); k];
    for (code, &c) in labels.iter().enumerate() {
        members[c as usize].push(code as u32);
    }
    codes
        .iter()
        .map(|&c| {
            let Some(&g) = labels.get(c as usize) else {
                bail!("diversity: code {c} has no cluster label ({} labels)", labels.len());
            };
            let m = &members[g as usize];
            if m.len() < 2 {
                bail!("diversity: cluster {g} of code {c} has no other member to be its positive");
            }
            // Uniform over the members other than c.
            let pc = m.iter().position(|&x| x == c).unwrap_or(m.len());
            let mut j = rng.gen_range(0..m.len() - 1);
            if j >= pc {
                j += 1;
            }
            Ok(m[j])
        })
        .collect()
}
