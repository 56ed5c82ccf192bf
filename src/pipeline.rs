//! End-to-end jobs behind the CLI. `quickstart` is the README's first command:
//! fetch MovieLens-100k, prepare it (5-core, leave-one-out, history 20), train
//! the collaborative baselines on the GPU, evaluate by full ranking and print
//! a results table and sample recommendations with titles.
//!
//! Status: the generative systems (TIGER, LETTER, ...) are not built yet; the
//! quickstart runs what exists: popularity and SASRec.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::cf::{self, sasrec::SasRec, sasrec::SasRecConfig};
use crate::data::{self, Format, PrepareOptions, Prepared, Split};
use crate::eval::{EvalReport, Protocol};
use crate::gpu::Gpu;

/// How much training the quickstart does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Budget {
    /// Small on a CPU adapter (lavapipe), full on a GPU.
    Auto,
    /// A few minutes on 2 CPU cores.
    Small,
    /// The paper-sized configuration.
    Full,
}

pub struct QuickstartOptions {
    pub budget: Budget,
    pub seed: u64,
    /// Where results.json is written.
    pub out: PathBuf,
}

/// One row of the results table.
#[derive(serde::Serialize)]
pub struct ModelResult {
    pub model: String,
    pub train_seconds: f64,
    pub report: EvalReport,
}

fn sasrec_config(full: bool, seed: u64, max_history: usize) -> SasRecConfig {
    let base = SasRecConfig { max_len: max_history, seed, ..Default::default() };
    if full {
        SasRecConfig { epochs: 200, ..base }
    } else {
        SasRecConfig { epochs: 12, ..base }
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

fn metrics_row(name: &str, r: &EvalReport, secs: f64) -> String {
    let m = |n: &str, k: usize| r.metric(n, k).map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
    format!(
        "{name:<12} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {secs:>9.1}",
        m("recall", 5),
        m("recall", 10),
        m("recall", 20),
        m("ndcg", 5),
        m("ndcg", 10),
        m("ndcg", 20)
    )
}

pub fn quickstart(opts: &QuickstartOptions) -> Result<Vec<ModelResult>> {
    let gpu = Gpu::shared()?;
    let full = match opts.budget {
        Budget::Auto => !gpu.is_cpu(),
        Budget::Small => false,
        Budget::Full => true,
    };
    println!("device: {}", gpu.describe());
    if !full {
        println!("budget: small (CPU adapter; pass --budget full for the paper-sized run)");
    }
    let data = prepared_ml100k()?;
    println!("{}", data.stats);
    let test = data.eval_cases(Split::Test);
    let valid = data.eval_cases(Split::Valid);
    let protocol = Protocol::default();
    let mut results = Vec::new();

    let t = Instant::now();
    let pop = cf::evaluate_popularity(&data, &test, &protocol)?;
    results.push(ModelResult { model: "Popularity".into(), train_seconds: t.elapsed().as_secs_f64(), report: pop });

    let cfg = sasrec_config(full, opts.seed, data.options.max_history);
    println!("training SASRec ({} epochs, d={}, {} blocks) ...", cfg.epochs, cfg.d_model, cfg.blocks);
    let model = SasRec::new(&gpu, data.n_items(), cfg)?;
    let t = Instant::now();
    let quick_protocol = Protocol { bootstrap: 0, ..Protocol::default() };
    let mut best = (f64::MIN, 0usize);
    let every = if full { 10 } else { 4 };
    model.fit(&data, |epoch, _loss| {
        // Validation NDCG@10 every few epochs; stop after 3 checks without gain.
        if (epoch + 1) % every == 0 {
            let v = model.evaluate(&valid, &quick_protocol)?.metric("ndcg", 10).unwrap_or(0.0);
            eprintln!("validation NDCG@10 after epoch {}: {v:.4}", epoch + 1);
            if v > best.0 {
                best = (v, epoch);
            } else if epoch - best.1 >= 3 * every {
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    let secs = t.elapsed().as_secs_f64();
    let report = model.evaluate(&test, &protocol)?;
    results.push(ModelResult { model: "SASRec".into(), train_seconds: secs, report });

    println!("\nml-100k, leave-one-out, full ranking over {} items ({} test users)", data.n_items(), test.len());
    println!(
        "{:<12} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}",
        "model", "R@5", "R@10", "R@20", "N@5", "N@10", "N@20", "train s"
    );
    for r in &results {
        println!("{}", metrics_row(&r.model, &r.report, r.train_seconds));
    }

    // Sample recommendations with titles for three users.
    println!("\nsample recommendations (SASRec, already-seen items left out):");
    let sample: Vec<_> = test.iter().take(3).cloned().collect();
    let scores = model.score(&sample)?;
    let n = data.n_items();
    for (r, case) in sample.iter().enumerate() {
        // Shown to a person: leave out what the user has already seen.
        let top = crate::eval::top_k(&scores[r * n..(r + 1) * n], 5, |i| case.seen.binary_search(&i).is_err())?;
        let title =
            |i: u32| data.item_meta[i as usize].title.clone().unwrap_or_else(|| data.item_ids[i as usize].clone());
        let recent: Vec<String> = case.history.iter().rev().take(3).map(|&i| title(i)).collect();
        println!("user {} — recently: {}", data.user_ids[case.user as usize], recent.join("; "));
        for (rank, &i) in top.iter().enumerate() {
            let hit = if case.targets.contains(&i) { "  <- held-out next item" } else { "" };
            println!("  {}. {}{hit}", rank + 1, title(i));
        }
    }

    let json = serde_json::to_string_pretty(&results)?;
    crate::io::atomic_write(&opts.out, |w| {
        w.write_all(json.as_bytes())?;
        Ok(())
    })?;
    println!("\nresults written to {}", opts.out.display());
    Ok(results)
}
