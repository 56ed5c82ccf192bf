//! Item tokenizers: TIGER's RQ-VAE and LETTER (RQ-VAE + collaborative and
//! diversity regularization), trained on the GPU, and the identifiers they
//! give (`ids`) with a report (`report`).
//!
//! Entry point: [`train_tokenizer`] (used by `genrec tokenize` and the
//! quickstart). Training follows LETTER's code (letter.spec.md §4, Stage 1):
//! - codebooks start at zero and are initialized before training from the
//!   (randomly initialized) encoder's latents of **all** items, level by level
//!   on the residuals ([`CodebookInit`]): plain k-means (k-means++ + GPU Lloyd,
//!   TIGER's default) or LETTER's size-constrained k-means (sizes
//!   in `[max(1, min(M / 2N, 50)), max(4 * that, ceil(M / N))]`; LETTER's own
//!   bound `min(M // 512, 50)` is 0 for fewer than 512 items, so it is floored
//!   at 1). The constrained variant is what LETTER's code runs and LETTER's
//!   default here ([`TokenizerConfig::letter`]); TIGER's RQ-VAE keeps plain
//!   k-means. The exact min-cost-flow assignment (`quant::constrained`) used to
//!   take > 10 minutes for 1,682 items x 256 codes (debug build); it now
//!   repairs the argmin assignment by shortest augmenting paths: ml-100k's
//!   1,349 MiniLM items x 256 codes x 4 levels (10 restarts x 10 rounds): a
//!   1-epoch `genrec tokenize --init constrained` run takes 19 s of CPU
//!   (release build, lavapipe) against 3 s with `--init kmeans`;
//! - AdamW (lr 1e-3, weight decay 1e-4 on every parameter) over shuffled
//!   batches of up to 1024 items;
//! - LETTER: diversity clusters of every codebook refreshed at the start of each
//!   epoch by size-constrained k-means into K = 10 clusters with sizes in
//!   `[min(N / 2K, 10), 6K]` (LETTER's bounds; K is lowered to N / 2 and the
//!   bounds widened when N is small so a feasible clustering with >= 2 members
//!   per cluster exists); Sinkhorn assignment on the last level during
//!   training (eps 0.003, 50 iterations, min-max centred distances);
//! - dead codes: LETTER resets nothing (the diversity loss and Sinkhorn keep
//!   codes in use). For TIGER's RQ-VAE ([`TokenizerConfig::rqvae`]) codes that
//!   no item of an epoch's batches selected are reset at the end of the epoch
//!   to random residuals of that level from the last batch (`dead_code_reset`);
//! - every `eval_every` epochs (and after the last) the argmin collision rate
//!   of all items is computed; the parameters with the lowest rate are kept
//!   (on ties the later, longer-trained ones; LETTER's code keeps the earliest);
//! - identifiers: `ids::assign_ids` (Sinkhorn re-assignment rounds for
//!   LETTER, then an extra disambiguation token where needed).

pub mod cli;
pub mod ids;
pub mod mq;
pub mod report;
pub mod rqvae;

use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;

pub use ids::{assign_ids, collision_rate, disambiguate, resolve_collisions, IdStats, ItemCodes};
pub use report::{code_similarity, EpochLog, LevelStats, TokenizerReport};
pub use rqvae::{DiversityClusters, Positives, RqVae, RqVaeConfig, StepOptions, StepOut};

use crate::autograd::Tape;
use crate::gpu::{Gpu, Tensor};
use crate::nn::optim::AdamW;
use crate::ops::adamw::AdamW as AdamWHp;
use crate::quant::constrained::{constrained_kmeans, ConstrainedOpts};
use crate::quant::kmeans::{kmeans, KmeansOpts};
use crate::quant::sinkhorn::SinkhornOpts;

/// Which tokenizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Method {
    /// TIGER's RQ-VAE (semantic regularization only).
    RqVae,
    /// LETTER: + collaborative (needs CF embeddings) + diversity regularization.
    Letter,
}

impl Method {
    pub fn parse(s: &str) -> Result<Method> {
        match s.to_ascii_lowercase().as_str() {
            "rqvae" | "tiger" => Ok(Method::RqVae),
            "letter" => Ok(Method::Letter),
            _ => bail!("unknown tokenizer method {s:?}; expected rqvae or letter (or mq for `genrec tokenize`)"),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Method::RqVae => "rqvae",
            Method::Letter => "letter",
        }
    }
}

/// Codebook initialization before training.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CodebookInit {
    /// LETTER's size-constrained k-means on all items' residuals.
    Constrained,
    /// Plain k-means (k-means++ + Lloyd, 100 iterations) on all items' residuals.
    Kmeans,
}

/// Everything [`train_tokenizer`] needs besides the data.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerConfig {
    pub method: Method,
    /// Encoder hidden sizes; None = `RqVaeConfig::default_hidden(in_dim, e_dim)`.
    pub hidden: Option<Vec<usize>>,
    pub e_dim: usize,
    pub levels: usize,
    pub codebook_size: usize,
    pub mu: f32,
    /// CF InfoNCE weight (LETTER only).
    pub alpha: f32,
    /// Diversity weight (LETTER only).
    pub beta: f32,
    /// Diversity clusters per codebook (LETTER: 10).
    pub div_clusters: usize,
    /// k-means restarts of the per-epoch diversity clustering (LETTER: 10).
    pub div_n_init: usize,
    /// Sinkhorn on the last level during training (LETTER on, TIGER off).
    pub sinkhorn_train: bool,
    /// Sinkhorn settings of training and collision re-assignment (LETTER's by default).
    #[serde(skip, default = "SinkhornOpts::letter")]
    pub sinkhorn: SinkhornOpts,
    /// Rounds of LETTER's Sinkhorn collision re-assignment (TIGER: 0).
    pub collision_rounds: usize,
    pub init: CodebookInit,
    /// k-means restarts of the constrained initialization (LETTER: 10).
    pub init_n_init: usize,
    pub dead_code_reset: bool,
    /// The authors' straight-through residual chain (false: pure math).
    pub st_chain: bool,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f32,
    pub weight_decay: f32,
    /// Evaluate the collision rate every this many epochs.
    pub eval_every: usize,
    pub seed: u64,
    /// Show a progress bar (stderr lines when not a terminal).
    pub progress: bool,
}

impl TokenizerConfig {
    /// TIGER's RQ-VAE defaults: 4 x 256 x 32, mu 0.25, no CF / diversity /
    /// Sinkhorn, plain k-means init, dead-code reset.
    pub fn rqvae() -> TokenizerConfig {
        TokenizerConfig {
            method: Method::RqVae,
            hidden: None,
            e_dim: 32,
            levels: 4,
            codebook_size: 256,
            mu: 0.25,
            alpha: 0.0,
            beta: 0.0,
            div_clusters: 10,
            div_n_init: 10,
            sinkhorn_train: false,
            sinkhorn: SinkhornOpts::letter(),
            collision_rounds: 0,
            init: CodebookInit::Kmeans,
            init_n_init: 10,
            dead_code_reset: true,
            st_chain: true,
            epochs: 200,
            batch_size: 1024,
            lr: 1e-3,
            weight_decay: 1e-4,
            eval_every: 20,
            seed: 42,
            progress: true,
        }
    }

    /// LETTER's defaults: alpha 0.02, beta 1e-4, K = 10, Sinkhorn on the last
    /// level, 20 collision rounds, no dead-code reset, size-constrained k-means
    /// codebook initialization (see the module doc).
    pub fn letter() -> TokenizerConfig {
        TokenizerConfig {
            method: Method::Letter,
            alpha: 0.02,
            beta: 1e-4,
            sinkhorn_train: true,
            collision_rounds: 20,
            dead_code_reset: false,
            init: CodebookInit::Constrained,
            ..Self::rqvae()
        }
    }

    pub fn for_method(m: Method) -> TokenizerConfig {
        match m {
            Method::RqVae => Self::rqvae(),
            Method::Letter => Self::letter(),
        }
    }

    fn step_options(&self) -> StepOptions {
        let letter = self.method == Method::Letter;
        StepOptions {
            alpha: if letter { self.alpha } else { 0.0 },
            beta: if letter { self.beta } else { 0.0 },
            sinkhorn: self.sinkhorn_train.then_some(self.sinkhorn),
        }
    }
}

/// Diversity cluster count and size bounds for a codebook of `n` codes:
/// LETTER's K, `[min(n / 2K, 10), 6K]`, adjusted so that every cluster can
/// hold >= 2 codes and the bounds are feasible.
pub fn diversity_bounds(n: usize, k: usize) -> (usize, usize, usize) {
    let k = k.clamp(1, (n / 2).max(1));
    let lo = (n / (2 * k)).min(10).max(2.min(n / k));
    let hi = (6 * k).max(n.div_ceil(k));
    (k, lo, hi)
}

/// Cluster every codebook's rows with size-constrained k-means.
pub fn diversity_clusters(model: &RqVae, k: usize, n_init: usize, seed: u64) -> Result<DiversityClusters> {
    let n = model.cfg.codebook_size;
    let (k, lo, hi) = diversity_bounds(n, k);
    let labels = model
        .codebooks
        .iter()
        .enumerate()
        .map(|(l, p)| {
            let o =
                ConstrainedOpts { size_min: lo, size_max: hi, max_iter: 10, n_init, seed: seed.wrapping_add(l as u64) };
            Ok(constrained_kmeans(&p.value, k, o)
                .with_context(|| format!("diversity clusters of codebook {l}"))?
                .assign)
        })
        .collect::<Result<_>>()?;
    Ok(DiversityClusters { labels })
}

/// Initialize the codebooks from all items (`sem: [M, in_dim]` host): encode,
/// then per level cluster the residuals into N centroids and subtract each
/// item's nearest centroid.
pub fn init_codebooks(model: &RqVae, sem: &[f32], cfg: &TokenizerConfig) -> Result<()> {
    let gpu = model.codebooks[0].value.gpu().clone();
    let (din, n, d) = (model.cfg.in_dim, model.cfg.codebook_size, model.cfg.e_dim);
    let m = sem.len() / din;
    if m < n {
        bail!("tokenize: {m} items cannot initialize a codebook of {n} codes; use --codes <= {m}");
    }
    let tape = Tape::no_grad();
    let mut lat = Vec::with_capacity(m * d);
    for s in (0..m).step_by(cfg.batch_size.max(1)) {
        let rows = cfg.batch_size.max(1).min(m - s);
        let x = Tensor::from_f32(&gpu, &sem[s * din..(s + rows) * din], &[rows, din])?;
        lat.extend(model.encode(&tape, &tape.constant(x))?.value.to_vec_f32()?);
    }
    let mut r = Tensor::from_f32(&gpu, &lat, &[m, d])?;
    for (l, book) in model.codebooks.iter().enumerate() {
        let seed = cfg.seed.wrapping_add(100 + l as u64);
        let cent = match cfg.init {
            CodebookInit::Kmeans => {
                kmeans(&r, n, KmeansOpts { max_iter: 100, tol: 1e-4, seed })?.centroids.to_vec_f32()?
            }
            CodebookInit::Constrained => {
                let lo = (m / (2 * n)).clamp(1, 50);
                let hi = (4 * lo).max(m.div_ceil(n));
                let o =
                    ConstrainedOpts { size_min: lo, size_max: hi, max_iter: 10, n_init: cfg.init_n_init.max(1), seed };
                constrained_kmeans(&r, n, o)?.centroids
            }
        };
        book.value.write_f32(&cent)?;
        if l + 1 < model.codebooks.len() {
            let c = crate::quant::nearest::nearest(&r, &book.value)?.idx;
            let e = crate::ops::embedding::gather(&book.value, &c)?;
            r = crate::ops::elementwise::sub(&r, &e)?;
        }
    }
    Ok(())
}

fn check_inputs(sem: &[f32], n_items: usize, cf: Option<&[f32]>, cfg: &TokenizerConfig) -> Result<(usize, usize)> {
    if n_items == 0 || sem.is_empty() || !sem.len().is_multiple_of(n_items) {
        bail!("tokenize: semantic embeddings hold {} values, not a [{n_items}, D] matrix", sem.len());
    }
    let din = sem.len() / n_items;
    crate::quant::check_finite_host("tokenize", "semantic embeddings", sem, &[n_items, din])?;
    let mut dc = 0;
    if let Some(cf) = cf {
        if cf.is_empty() || !cf.len().is_multiple_of(n_items) {
            bail!("tokenize: CF embeddings hold {} values, not a [{n_items}, dc] matrix (one row per item)", cf.len());
        }
        dc = cf.len() / n_items;
        crate::quant::check_finite_host("tokenize", "CF embeddings", cf, &[n_items, dc])?;
    }
    if cfg.method == Method::Letter && cfg.alpha != 0.0 {
        match cf {
            None => bail!("tokenize: LETTER with alpha = {} needs CF embeddings (--cf)", cfg.alpha),
            Some(_) if dc != cfg.e_dim => bail!(
                "tokenize: CF embeddings are {dc}-d but the codebooks are {}-d; LETTER's InfoNCE needs equal widths (set e_dim = {dc})",
                cfg.e_dim
            ),
            _ => {}
        }
    }
    if n_items < cfg.codebook_size {
        bail!("tokenize: {n_items} items are fewer than the {} codes per level", cfg.codebook_size);
    }
    if cfg.epochs == 0 || cfg.batch_size == 0 || cfg.eval_every == 0 {
        bail!("tokenize: epochs, batch_size and eval_every must be >= 1");
    }
    Ok((din, dc))
}

fn gather_host(src: &[f32], width: usize, idx: &[usize]) -> Vec<f32> {
    idx.iter().flat_map(|&i| src[i * width..(i + 1) * width].iter().cloned()).collect()
}

/// Train a tokenizer on `sem: [n_items, D]` (host, row-major; optional CF
/// embeddings `cf: [n_items, dc]`, row i = item i) and return the model.
/// `report` receives the training log.
pub fn train_model(
    gpu: &Gpu,
    sem: &[f32],
    n_items: usize,
    cf: Option<&[f32]>,
    cfg: &TokenizerConfig,
    report: &mut TokenizerReport,
) -> Result<RqVae> {
    let (din, dc) = check_inputs(sem, n_items, cf, cfg)?;
    let m = n_items;
    let mcfg = RqVaeConfig {
        in_dim: din,
        hidden: cfg.hidden.clone().unwrap_or_else(|| RqVaeConfig::default_hidden(din, cfg.e_dim)),
        e_dim: cfg.e_dim,
        levels: cfg.levels,
        codebook_size: cfg.codebook_size,
        mu: cfg.mu,
        st_chain: cfg.st_chain,
        seed: cfg.seed,
    };
    let model = RqVae::new(gpu, mcfg)?;
    let t0 = Instant::now();
    init_codebooks(&model, sem, cfg)?;
    let sopts = cfg.step_options();
    let mut opt = AdamW::new(
        model.params(),
        AdamWHp { lr: cfg.lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: cfg.weight_decay },
        None,
    )?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let mut order: Vec<usize> = (0..m).collect();
    let steps = m.div_ceil(cfg.batch_size);
    let bar = if cfg.progress { ProgressBar::new((cfg.epochs * steps) as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("tokenize {bar:30} {pos}/{len} steps {per_sec} eta {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut best: Option<(f64, usize, rqvae::ParamValues)> = None;
    for epoch in 0..cfg.epochs {
        let clusters = if sopts.beta != 0.0 {
            Some(diversity_clusters(
                &model,
                cfg.div_clusters,
                cfg.div_n_init,
                cfg.seed.wrapping_add(epoch as u64 * 31),
            )?)
        } else {
            None
        };
        order.shuffle(&mut rng);
        let mut losses = Vec::new();
        let mut used = vec![vec![false; cfg.codebook_size]; cfg.levels];
        let mut last_res: Vec<Tensor> = Vec::new();
        for chunk in order.chunks(cfg.batch_size) {
            let x = Tensor::from_f32(gpu, &gather_host(sem, din, chunk), &[chunk.len(), din])?;
            let h = match cf {
                Some(cf) if sopts.alpha != 0.0 => {
                    Some(Tensor::from_f32(gpu, &gather_host(cf, dc, chunk), &[chunk.len(), dc])?)
                }
                _ => None,
            };
            let tape = Tape::new();
            let out =
                model.forward_train(&tape, &x, h.as_ref(), clusters.as_ref(), Positives::Sample(&mut rng), &sopts)?;
            tape.backward(&out.total)?;
            opt.step()?;
            for (l, c) in out.codes.iter().enumerate() {
                c.iter().for_each(|&v| used[l][v as usize] = true);
            }
            losses.push((out.total.value.clone(), out.recon, out.quant, out.cf));
            last_res = out.residuals;
            bar.inc(1);
        }
        let mut log = EpochLog { epoch, ..Default::default() };
        let k = losses.len() as f64;
        for (t, r, q, c) in &losses {
            log.total += t.to_scalar()? as f64 / k;
            log.recon += r.to_scalar()? as f64 / k;
            log.quant += q.to_scalar()? as f64 / k;
            if let Some(c) = c {
                log.cf += c.to_scalar()? as f64 / k;
            }
        }
        if !log.total.is_finite() {
            bar.abandon();
            bail!("tokenize: training diverged at epoch {epoch} (loss {})", log.total);
        }
        if cfg.dead_code_reset {
            reset_dead_codes(&model, &used, &last_res, &mut rng)?;
        }
        if (epoch + 1) % cfg.eval_every == 0 || epoch + 1 == cfg.epochs {
            let (codes, _) = argmin_codes(&model, sem, cfg.batch_size)?;
            let cr = collision_rate(&codes);
            log.collision_rate = Some(cr);
            if best.as_ref().is_none_or(|b| cr <= b.0) {
                best = Some((cr, epoch, model.snapshot()?));
            }
        }
        bar.set_message(format!(
            "loss {:.4} recon {:.4}{}",
            log.total,
            log.recon,
            log.collision_rate.map(|c| format!(" collisions {c:.4}")).unwrap_or_default()
        ));
        if bar.is_hidden() && cfg.progress {
            eprintln!("tokenize epoch {}/{} loss {:.4} recon {:.4}", epoch + 1, cfg.epochs, log.total, log.recon);
        }
        report.epochs.push(log);
    }
    bar.finish();
    let (cr, be, snap) = best.expect("the last epoch is always evaluated");
    model.load_params(&|name| snap.iter().find(|s| s.0 == name).map(|s| (s.1.clone(), s.2.clone())))?;
    report.best_epoch = be;
    report.best_collision_rate = cr;
    report.train_seconds = t0.elapsed().as_secs_f64();
    Ok(model)
}

/// Argmin codes `[M][levels]` of all items and the last-level residuals.
fn argmin_codes(model: &RqVae, sem: &[f32], chunk: usize) -> Result<(Vec<Vec<u32>>, Vec<f32>)> {
    let gpu = model.codebooks[0].value.gpu().clone();
    let din = model.cfg.in_dim;
    let m = sem.len() / din;
    let mut codes = Vec::with_capacity(m);
    let mut last = Vec::new();
    for s in (0..m).step_by(chunk.max(1)) {
        let rows = chunk.max(1).min(m - s);
        let x = Tensor::from_f32(&gpu, &sem[s * din..(s + rows) * din], &[rows, din])?;
        let (c, r) = model.codes(&x)?;
        codes.extend(c);
        last.extend(r.to_vec_f32()?);
    }
    Ok((codes, last))
}

/// Reset codes no batch selected this epoch to random rows of that level's
/// residuals from the last batch (TIGER-style dead-code handling).
fn reset_dead_codes(model: &RqVae, used: &[Vec<bool>], res: &[Tensor], rng: &mut rand::rngs::StdRng) -> Result<()> {
    use rand::Rng;
    let d = model.cfg.e_dim;
    for (l, u) in used.iter().enumerate() {
        let dead: Vec<usize> = (0..u.len()).filter(|&c| !u[c]).collect();
        if dead.is_empty() || l >= res.len() {
            continue;
        }
        let r = res[l].to_vec_f32()?;
        let b = r.len() / d;
        let mut book = model.codebooks[l].value.to_vec_f32()?;
        for c in dead {
            let i = rng.gen_range(0..b);
            book[c * d..(c + 1) * d].copy_from_slice(&r[i * d..(i + 1) * d]);
        }
        model.codebooks[l].value.write_f32(&book)?;
    }
    Ok(())
}

/// Train a tokenizer and assign identifiers to all items.
///
/// `sem: [n_items, D]` semantic embeddings (row-major, row i = item i);
/// `cf: [n_items, dc]` CF embeddings (LETTER; dc must equal `cfg.e_dim`; also
/// used for the report's code similarity). Returns the unique identifiers and
/// the report. Errors on NaN/inf input, mismatched shapes, fewer items than
/// codes, or LETTER without CF embeddings.
pub fn train_tokenizer(
    gpu: &Gpu,
    sem: &[f32],
    n_items: usize,
    cf: Option<&[f32]>,
    cfg: &TokenizerConfig,
) -> Result<(ItemCodes, TokenizerReport)> {
    let (_, ids, rep) = train_tokenizer_model(gpu, sem, n_items, cf, cfg)?;
    Ok((ids, rep))
}

/// [`train_tokenizer`] that also returns the trained model (e.g. to save it
/// with `RqVae::save` or to tokenize new items with `RqVae::codes`).
pub fn train_tokenizer_model(
    gpu: &Gpu,
    sem: &[f32],
    n_items: usize,
    cf: Option<&[f32]>,
    cfg: &TokenizerConfig,
) -> Result<(RqVae, ItemCodes, TokenizerReport)> {
    let mut rep = TokenizerReport {
        method: cfg.method.name().to_string(),
        adapter: gpu.info().name.clone(),
        ..Default::default()
    };
    let model = train_model(gpu, sem, n_items, cf, cfg, &mut rep)?;
    let (ids, st) = assign_ids(&model, sem, cfg.collision_rounds, cfg.sinkhorn, cfg.batch_size)?;
    rep.ids = st;
    report::fill_code_stats(&mut rep, &ids);
    if let Some(cf) = cf {
        rep.code_similarity = Some(code_similarity(gpu, &ids.codes, ids.levels, cf)?);
    }
    Ok((model, ids, rep))
}

#[cfg(test)]
mod tests;
