//! End-to-end jobs behind the CLI.
//!
//! `quickstart` is the README's first command: fetch MovieLens-100k and
//! MiniLM, prepare the data (5-core, leave-one-out, history 20), train SASRec
//! (the baseline, and LETTER's 32-d collaborative signal), embed item titles
//! and genres with MiniLM, train the TIGER (RQ-VAE) and LETTER tokenizers,
//! train TIGER and LETTER-TIGER, evaluate everything by full ranking on the
//! test split and print a results table and sample recommendations with titles.
//!
//! `train_system` is `genrec train --system ...`: the same stages for one
//! generative system. Every expensive stage is cached under the run directory
//! (`<cache>/runs/<dataset>/<budget>-seed<seed>/`): CF embeddings, identifiers
//! and model checkpoints, so an interrupted run resumes and `genrec eval` /
//! `genrec recommend` reuse the trained model.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::cf::{self, sasrec::SasRec, sasrec::SasRecConfig};
use crate::config::{self, ConfigSource, SystemConfig};
use crate::data::{self, EvalCase, Format, PrepareOptions, Prepared, Split};
use crate::eval::{EvalReport, Protocol};
use crate::gpu::Gpu;
use crate::io::checkpoint::{fingerprint, fingerprint_json};
use crate::systems::lcrec::{LcRec, LcRecConfig};
use crate::systems::tiger::{FitSummary, Tiger};
use crate::systems::GenerativeRecommender;
use crate::tokenize::{self, ids::ItemCodes, report::TokenizerReport, Method, TokenizerConfig};

/// How much training a job does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Budget {
    /// Small on a CPU adapter (lavapipe), full on a GPU.
    Auto,
    /// Minutes on 2 CPU cores: smaller models, fewer epochs (see each config's `small`).
    Small,
    /// The papers' configurations.
    Full,
}

impl Budget {
    /// Whether this budget means the full configuration on `gpu`.
    pub fn is_full(self, gpu: &Gpu) -> bool {
        match self {
            Budget::Auto => !gpu.is_cpu(),
            Budget::Small => false,
            Budget::Full => true,
        }
    }
}

/// The generative systems `genrec train` builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum System {
    /// TIGER: RQ-VAE semantic IDs + T5, plain cross-entropy.
    Tiger,
    /// LETTER-TIGER: LETTER identifiers + T5 with the ranking-guided loss.
    Letter,
    /// LETTER on the SmolLM2-135M LLM with LoRA (LC-Rec style; not in the quickstart: slow on CPU adapters).
    LetterLlm,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Tiger => "TIGER",
            System::Letter => "LETTER-TIGER",
            System::LetterLlm => "LETTER-LLM",
        }
    }
    fn file_stem(self) -> &'static str {
        match self {
            System::Tiger => "tiger",
            System::Letter => "letter-tiger",
            System::LetterLlm => "letter-llm",
        }
    }
    fn method(self) -> Method {
        match self {
            System::Tiger => Method::RqVae,
            System::Letter | System::LetterLlm => Method::Letter,
        }
    }
}

/// Fetch (if needed) and prepare MovieLens-100k with the default protocol.
pub fn prepared_ml100k() -> Result<Prepared> {
    let dir = crate::io::fetch::fetch("ml-100k").context("fetching ml-100k")?;
    let opts = PrepareOptions::default();
    let out = crate::io::fetch::cache_dir()?.join("prepared").join("ml-100k-loo");
    let (p, reused) = data::prepare_cached(Format::Ml100k, &dir, &out, &opts)?;
    eprintln!("ml-100k prepared at {} ({})", out.display(), if reused { "reused" } else { "new" });
    Ok(p)
}

/// One system's run: its resolved configuration and the directory its
/// stages are cached in (`<cache>/runs/<dataset>/<budget>-seed<seed>[-<tag>]/`,
/// where a configuration other than the defaults adds a tag of its settings).
pub struct Run {
    pub system: System,
    pub full: bool,
    pub seed: u64,
    pub cfg: SystemConfig,
    pub dir: PathBuf,
}

impl Run {
    pub fn new(data: &Prepared, system: System, full: bool, seed: u64, src: &ConfigSource) -> Result<Run> {
        let history = data.options.max_history;
        let cfg = SystemConfig::resolve(system, full, seed, history, src)?;
        let budget = if full { "full" } else { "small" };
        let mut name = format!("{budget}-seed{seed}");
        if !src.is_default() {
            let defaults = SystemConfig::defaults(system, full, seed, history)?;
            let tag = config::tag(&cfg)?;
            if tag != config::tag(&defaults)? {
                name = format!("{name}-{tag}");
            }
        }
        let dir = crate::io::fetch::cache_dir()?.join("runs").join(&data.name).join(name);
        Ok(Run { system, full, seed, cfg, dir })
    }
}

/// Train SASRec (`[sasrec]` of the configuration: LETTER's 32-d CF signal)
/// with validation NDCG@10 early stopping; also caches its item embeddings
/// in `dir` for LETTER.
fn train_sasrec(gpu: &Gpu, data: &Prepared, cfg: &SasRecConfig, full: bool, dir: &Path) -> Result<(SasRec, f64)> {
    let cfg = cfg.clone();
    println!("training SASRec ({} epochs max, d={}, {} blocks) ...", cfg.epochs, cfg.d_model, cfg.blocks);
    let valid = data.eval_cases(Split::Valid);
    let model = SasRec::new(gpu, data.n_items(), cfg)?;
    let t = Instant::now();
    let quick = Protocol { bootstrap: 0, ks: vec![10], ..Protocol::default() };
    let mut best = (f64::MIN, 0usize);
    let every = if full { 10 } else { 2 };
    model.fit(data, |epoch, _loss| {
        // Validation NDCG@10 every few epochs; stop after 3 checks without gain.
        if (epoch + 1) % every == 0 {
            let v = model.evaluate(&valid, &quick)?.metric("ndcg", 10).unwrap_or(0.0);
            eprintln!("SASRec validation NDCG@10 after epoch {}: {v:.4}", epoch + 1);
            if v > best.0 {
                best = (v, epoch);
            } else if epoch - best.1 >= 3 * every {
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    let secs = t.elapsed().as_secs_f64();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let emb = model.item_embeddings()?;
    cf::save_embeddings(&dir.join(CF_FILE), "sasrec", &data.name, model.cfg.d_model, &emb, None)?;
    Ok((model, secs))
}

const CF_FILE: &str = "sasrec-item-emb.safetensors";

/// LETTER's CF embeddings: the run's cached SASRec item table, or a fresh
/// SASRec when there is none.
fn cf_embeddings(gpu: &Gpu, data: &Prepared, run: &Run) -> Result<Vec<f32>> {
    let path = run.dir.join(CF_FILE);
    if path.exists() {
        let f = crate::io::safetensors::SafeTensorsFile::open(&path)?;
        let t = f.get_shaped("item_emb", &[data.n_items(), run.cfg.sasrec.d_model])?;
        eprintln!("reusing SASRec item embeddings from {}", path.display());
        return Ok(t.data);
    }
    let (model, _) = train_sasrec(gpu, data, &run.cfg.sasrec, run.full, &run.dir)?;
    model.item_embeddings()
}

/// A run's cached identifiers (`<method>-ids.json`): the key of the inputs
/// and settings they were trained from, the codes and the tokenizer report.
#[derive(serde::Serialize, serde::Deserialize)]
struct IdsFile {
    key: String,
    codes: ItemCodes,
    report: TokenizerReport,
}

fn ids_path(dir: &Path, method: Method) -> PathBuf {
    dir.join(format!("{}-ids.json", method.name()))
}

/// Identifiers of every item for `method`, cached in `dir` under a key of
/// the inputs and settings.
fn identifiers(
    gpu: &Gpu,
    method: Method,
    sem: &[f32],
    cf: &[f32],
    n_items: usize,
    cfg: &TokenizerConfig,
    dir: &Path,
) -> Result<(ItemCodes, TokenizerReport)> {
    let key = fingerprint_json(&(
        cfg,
        fingerprint(bytemuck::cast_slice(sem)),
        fingerprint(bytemuck::cast_slice(cf)),
        n_items,
    ))?;
    let path = ids_path(dir, method);
    if let Ok(text) = std::fs::read_to_string(&path) {
        match serde_json::from_str::<IdsFile>(&text) {
            Ok(c) if c.key == key => {
                c.codes.validate(&path.display().to_string())?;
                eprintln!("reusing {} identifiers from {}", method.name(), path.display());
                return Ok((c.codes, c.report));
            }
            _ => eprintln!("{}: stale or unreadable, retraining the tokenizer", path.display()),
        }
    }
    println!("training the {} tokenizer ({} epochs) ...", method.name(), cfg.epochs);
    let (codes, report) = tokenize::train_tokenizer(gpu, sem, n_items, Some(cf), cfg)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::to_string(&IdsFile { key, codes: codes.clone(), report: report.clone() })?;
    crate::io::atomic_write(&path, |w| Ok(w.write_all(json.as_bytes())?))?;
    Ok((codes, report))
}

/// SmolLM2-135M-Instruct (fetched if missing) with its tokenizer, wrapped as
/// LETTER-LLM over `codes`.
fn lcrec_system(gpu: &Gpu, codes: &[Vec<u32>], cfg: LcRecConfig) -> Result<LcRec> {
    let dir = crate::io::fetch::fetch("smollm2").context("fetching the SmolLM2-135M asset for LETTER-LLM")?;
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let tok = crate::models::llama_tokenizer::LlamaTokenizer::from_gguf_file(&path)?;
    let llm = crate::models::llama::Llama::from_gguf(gpu, &path)?;
    LcRec::new(gpu, System::LetterLlm.file_stem(), llm, &tok, codes, cfg)
}

/// A fixed subset of `n` evaluation cases (every k-th user; 0 = all), for
/// evaluating slow systems on a budget when asked to. Says what it kept.
pub fn eval_subset(cases: Vec<EvalCase>, n: usize) -> Vec<EvalCase> {
    let total = cases.len();
    let kept = crate::systems::seq::fixed_subset(cases, n);
    if kept.len() < total {
        println!("evaluating on a fixed subset of {} of {total} users (every k-th, as asked)", kept.len());
    }
    kept
}

/// A trained generative system and how it got there.
pub struct TrainedSystem {
    pub model: Box<dyn GenerativeRecommender>,
    pub fit: FitSummary,
    pub tokenizer: TokenizerReport,
    pub codes: ItemCodes,
}

/// Item text embeddings (MiniLM over title + genres), cached.
fn semantic_embeddings(gpu: &Gpu, data: &Prepared) -> Result<Vec<f32>> {
    let opts = crate::models::embed::EmbedOptions { progress: true, ..Default::default() };
    let r = crate::models::embed::item_text_embeddings_cached(gpu, data, &opts)
        .with_context(|| format!("embedding the item texts of {}", data.name))?;
    if r.reused {
        eprintln!("reusing MiniLM item embeddings from {}", r.path.display());
    } else {
        println!("embedded {} item texts with MiniLM in {:.1}s", r.n_items, r.seconds);
    }
    Ok(r.data)
}

/// `genrec train --system ...`: identifiers, then the generative model
/// (resuming from the run directory's checkpoint when there is one).
pub fn train_system(gpu: &Gpu, data: &Prepared, run: &Run) -> Result<TrainedSystem> {
    let system = run.system;
    let dir = &run.dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cfg_path = dir.join(format!("{}-config.toml", system.file_stem()));
    let text = run.cfg.to_toml()?;
    crate::io::atomic_write(&cfg_path, |w| Ok(w.write_all(text.as_bytes())?))?;
    println!("configuration: {}", cfg_path.display());
    let sem = semantic_embeddings(gpu, data)?;
    let cf = cf_embeddings(gpu, data, run)?;
    let method = system.method();
    if run.cfg.tokenizer.method != method {
        bail!("{}: tokenizer.method must be {method:?} for {}", cfg_path.display(), system.name());
    }
    let (codes, tokenizer) = identifiers(gpu, method, &sem, &cf, data.n_items(), &run.cfg.tokenizer, dir)?;
    if system == System::LetterLlm {
        let cfg = run.cfg.llm.clone().context("LETTER-LLM run without an llm configuration")?;
        let mut model = lcrec_system(gpu, &codes.codes, cfg)?;
        let (trainable, all) = model.num_params();
        println!(
            "training {} (SmolLM2-135M + LoRA r {}: {trainable} of {all} parameters trainable, {} code tokens added, \
             τ = {}) ...",
            system.name(),
            model.cfg.lora_r,
            model.added_tokens(),
            model.cfg.tau
        );
        if !run.full {
            println!(
                "budget: small (CPU adapter): {} training prefixes per epoch x {} epochs, history <= {} items, \
                 {} validation users; pass --budget full for the LC-Rec configuration",
                model.cfg.samples_per_epoch, model.cfg.epochs, model.cfg.max_items, model.cfg.valid_users
            );
        }
        let fit = model.fit(data, Some(dir))?;
        return Ok(TrainedSystem { model: Box::new(model), fit, tokenizer, codes });
    }
    let mut model = Tiger::new(gpu, system.file_stem(), &codes.codes, run.cfg.model.clone())?;
    println!(
        "training {} ({} parameters, vocabulary {}, τ = {}) ...",
        system.name(),
        model.num_params(),
        model.vocab().size(),
        model.cfg.tau
    );
    let fit = model.fit(data, Some(dir))?;
    Ok(TrainedSystem { model: Box::new(model), fit, tokenizer, codes })
}

/// A trained system loaded back from its run directory (for `eval` and `recommend`).
pub fn load_system(gpu: &Gpu, data: &Prepared, run: &Run) -> Result<Box<dyn GenerativeRecommender>> {
    let (system, dir) = (run.system, &run.dir);
    let method = system.method();
    let ids = ids_path(dir, method);
    let ckpt = dir.join(format!("{}-best.safetensors", system.file_stem()));
    if !ids.exists() || !ckpt.exists() {
        bail!(
            "no trained {} for {} in {} (looked for {} and {}); run `genrec train --system {}` first",
            system.name(),
            data.name,
            dir.display(),
            ids.display(),
            ckpt.display(),
            system.file_stem().trim_end_matches("-tiger")
        );
    }
    let text = std::fs::read_to_string(&ids).with_context(|| format!("reading {}", ids.display()))?;
    let c: IdsFile = serde_json::from_str(&text).with_context(|| format!("parsing {}", ids.display()))?;
    if system == System::LetterLlm {
        let model = lcrec_system(
            gpu,
            &c.codes.codes,
            run.cfg.llm.clone().context("LETTER-LLM run without an llm configuration")?,
        )?;
        model.load_weights(&ckpt)?;
        return Ok(Box::new(model));
    }
    let model = Tiger::new(gpu, system.file_stem(), &c.codes.codes, run.cfg.model.clone())?;
    model.load_weights(&ckpt)?;
    Ok(Box::new(model))
}

/// Display title of an item.
pub fn title(data: &Prepared, i: u32) -> String {
    data.item_meta[i as usize].title.clone().unwrap_or_else(|| data.item_ids[i as usize].clone())
}

/// Prints one user's recent history and top recommendations.
pub fn print_recommendations(data: &Prepared, case: &EvalCase, recs: &[(u32, f32)]) {
    let recent: Vec<String> = case.history.iter().rev().take(3).map(|&i| title(data, i)).collect();
    println!("user {} — recently: {}", data.user_ids[case.user as usize], recent.join("; "));
    for (rank, &(i, score)) in recs.iter().enumerate() {
        let hit = if case.targets.contains(&i) { "  <- held-out next item" } else { "" };
        println!("  {}. {} ({score:.2}){hit}", rank + 1, title(data, i));
    }
}

pub struct QuickstartOptions {
    pub budget: Budget,
    pub seed: u64,
    /// Where results.json is written.
    pub out: PathBuf,
    /// Ignore cached identifiers and checkpoints of earlier runs.
    pub fresh: bool,
}

/// One row of the results table.
#[derive(serde::Serialize)]
pub struct ModelResult {
    pub model: String,
    pub train_seconds: f64,
    pub report: EvalReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fit: Option<FitSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<TokenizerReport>,
}

fn metrics_row(name: &str, r: &EvalReport, secs: f64) -> String {
    let m = |n: &str, k: usize| r.metric(n, k).map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
    format!(
        "{name:<13} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {secs:>9.1}",
        m("recall", 5),
        m("recall", 10),
        m("recall", 20),
        m("ndcg", 5),
        m("ndcg", 10),
        m("ndcg", 20)
    )
}

pub fn quickstart(opts: &QuickstartOptions) -> Result<Vec<ModelResult>> {
    let t_all = Instant::now();
    let gpu = Gpu::shared()?;
    let full = opts.budget.is_full(&gpu);
    println!("device: {}", gpu.describe());
    if !full {
        println!(
            "budget: small (CPU adapter: smaller T5, fewer epochs; pass --budget full for the paper configuration)"
        );
    }
    let data = prepared_ml100k()?;
    println!("{}", data.stats);
    let runs: Vec<Run> = [System::Tiger, System::Letter]
        .into_iter()
        .map(|system| Run::new(&data, system, full, opts.seed, &ConfigSource::default()))
        .collect::<Result<_>>()?;
    let dir = &runs[0].dir;
    if opts.fresh && dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let test = data.eval_cases(Split::Test);
    let protocol = Protocol::default();
    let mut results = Vec::new();

    let t = Instant::now();
    let pop = cf::evaluate_popularity(&data, &test, &protocol)?;
    let secs = t.elapsed().as_secs_f64();
    results.push(ModelResult {
        model: "Popularity".into(),
        train_seconds: secs,
        report: pop,
        fit: None,
        tokenizer: None,
    });

    let (sasrec, secs) = train_sasrec(&gpu, &data, &runs[0].cfg.sasrec, full, dir)?;
    let report = sasrec.evaluate(&test, &protocol)?;
    results.push(ModelResult { model: "SASRec".into(), train_seconds: secs, report, fit: None, tokenizer: None });
    drop(sasrec);

    let mut letter = None;
    for run in &runs {
        let system = run.system;
        let t = Instant::now();
        let trained = train_system(&gpu, &data, run)?;
        let secs = t.elapsed().as_secs_f64();
        let report = trained.model.evaluate(&test, &protocol)?;
        results.push(ModelResult {
            model: system.name().into(),
            train_seconds: secs,
            report,
            fit: Some(trained.fit.clone()),
            tokenizer: Some(trained.tokenizer.clone()),
        });
        if system == System::Letter {
            letter = Some(trained.model);
        }
    }

    println!("\nml-100k, leave-one-out, full ranking over {} items ({} test users)", data.n_items(), test.len());
    println!(
        "{:<13} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}",
        "model", "R@5", "R@10", "R@20", "N@5", "N@10", "N@20", "train s"
    );
    for r in &results {
        println!("{}", metrics_row(&r.model, &r.report, r.train_seconds));
    }
    println!("\nidentifiers (unique after an extra disambiguation level where needed):");
    for r in &results {
        if let Some(t) = &r.tokenizer {
            let used: Vec<String> = t.per_level.iter().map(|l| l.used.to_string()).collect();
            println!(
                "  {:<13} collisions: argmin {:.2}%, after Sinkhorn {:.2}%; codes used per level [{}] of {}; \
                 code similarity {}",
                r.model,
                100.0 * t.ids.collision_rate_argmin,
                100.0 * t.ids.collision_rate_sinkhorn,
                used.join(", "),
                t.codebook_size,
                t.code_similarity.map(|s| format!("{s:.3}")).unwrap_or_else(|| "-".into())
            );
        }
    }

    if let Some(model) = &letter {
        println!("\nsample recommendations (LETTER-TIGER, trie-constrained beam search):");
        let sample: Vec<EvalCase> = test.iter().take(3).cloned().collect();
        for (case, recs) in sample.iter().zip(model.recommend(&sample, 5)?) {
            print_recommendations(&data, case, &recs);
        }
    }

    let json = serde_json::to_string_pretty(&results)?;
    crate::io::atomic_write(&opts.out, |w| {
        w.write_all(json.as_bytes())?;
        Ok(())
    })?;
    println!("\nresults written to {} ({:.1} min in all)", opts.out.display(), t_all.elapsed().as_secs_f64() / 60.0);
    Ok(results)
}
