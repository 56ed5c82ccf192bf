//! `genrec tokenize`: train a tokenizer on item embeddings from safetensors
//! files and write `codes.json` (`ItemCodes`), `report.json`
//! (`TokenizerReport`), `histogram.png` (first-level code frequencies) and
//! `model.safetensors` (the trained RQ-VAE, `RqVae::load`).
//!
//! `--method mq` (TokenRec) instead reads user and item CF embeddings from one
//! file (`genrec cf --out`: `user_emb`, `item_emb`), trains both
//! MQ-tokenizers and writes `user_codes.json`, `item_codes.json`,
//! `report.json` (`{"users": MqReport, "items": MqReport}`),
//! `{user,item}_histogram.png` and `{user,item}_model.safetensors`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::mq::{tokenize_users_items, MqTokenizerConfig, MqVariant};
use super::{report, train_tokenizer_model, CodebookInit, Method, TokenizerConfig};
use crate::gpu::Gpu;
use crate::io::safetensors::SafeTensorsFile;

/// Arguments of `genrec tokenize`.
#[derive(clap::Args, Debug, Clone)]
pub struct TokenizeArgs {
    /// Tokenizer: rqvae (TIGER), letter, or mq (TokenRec's users + items).
    #[arg(long, default_value = "rqvae")]
    pub method: String,
    /// Item semantic embeddings, safetensors with one [items, D] tensor (row i = item i).
    #[arg(long)]
    pub emb: PathBuf,
    /// Tensor name in --emb (default: the file's only tensor).
    #[arg(long)]
    pub emb_key: Option<String>,
    /// Item CF embeddings [items, e_dim] (LETTER's collaborative term; also the report's code similarity).
    #[arg(long)]
    pub cf: Option<PathBuf>,
    /// Tensor name in --cf (default: the file's only tensor).
    #[arg(long)]
    pub cf_key: Option<String>,
    /// Drop the first CF row (a padding row 0, as SASRec tables have).
    #[arg(long)]
    pub cf_drop_first: bool,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Residual levels.
    #[arg(long)]
    pub levels: Option<usize>,
    /// Codes per level.
    #[arg(long)]
    pub codes: Option<usize>,
    /// Codeword width (must equal the CF width for LETTER).
    #[arg(long)]
    pub e_dim: Option<usize>,
    /// Encoder hidden sizes, comma-separated (default: halving powers of two).
    #[arg(long)]
    pub hidden: Option<String>,
    #[arg(long)]
    pub alpha: Option<f32>,
    #[arg(long)]
    pub beta: Option<f32>,
    /// Codebook initialization: kmeans or constrained.
    #[arg(long)]
    pub init: Option<String>,
    /// Evaluate the collision rate (checkpoint selection) every N epochs.
    #[arg(long)]
    pub eval_every: Option<usize>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// mq: tensor name of the user embeddings in --emb (default user_emb; --emb-key
    /// names the item tensor, default item_emb).
    #[arg(long)]
    pub user_key: Option<String>,
    /// mq: codes per user codebook (default: --codes, else 256).
    #[arg(long)]
    pub user_codes: Option<usize>,
    /// mq: probability of masking an input element during training (0.2).
    #[arg(long)]
    pub mask_ratio: Option<f32>,
    /// mq: parallel (the paper's K encoders) or residual (the code's shared encoder).
    #[arg(long)]
    pub variant: Option<String>,
    /// mq: re-run the k-means codebook initialization every N epochs (default 10; 0: only at the start).
    #[arg(long)]
    pub kmeans_every: Option<usize>,
    /// mq: fraction of rows held out for checkpoint selection (0.2).
    #[arg(long)]
    pub valid_ratio: Option<f64>,
    /// mq: append a disambiguation token to colliding code tuples.
    #[arg(long)]
    pub unique_ids: bool,
    /// mq: no BatchNorm1d after the hidden Linear layers (the default has it,
    /// as the authors' MLPs; without it the codebooks collapse on small-scale
    /// inputs such as LightGCN embeddings).
    #[arg(long)]
    pub no_batch_norm: bool,
    /// mq: dropout after every hidden encoder layer during training (0.5).
    #[arg(long)]
    pub enc_dropout: Option<f32>,
    /// mq: dropout after every hidden decoder layer during training (0.2).
    #[arg(long)]
    pub dec_dropout: Option<f32>,
}

/// Load the rank-2 tensor `key` (or the only tensor) of a safetensors file.
pub fn load_matrix(path: &Path, key: Option<&str>) -> Result<(Vec<f32>, usize, usize)> {
    let f = SafeTensorsFile::open(path)?;
    let names = f.names();
    let name = match key {
        Some(k) => k.to_string(),
        None if names.len() == 1 => names[0].clone(),
        None => bail!("{}: holds tensors {names:?}; pick one with --emb-key / --cf-key", path.display()),
    };
    let t = f.get(&name).with_context(|| format!("{}: tensor {name}", path.display()))?;
    if t.shape.len() != 2 {
        bail!("{}: tensor {name} must be [items, dim], got shape {:?}", path.display(), t.shape);
    }
    Ok((t.data, t.shape[0], t.shape[1]))
}

/// Build the configuration from the arguments (method defaults, then overrides).
pub fn config(a: &TokenizeArgs) -> Result<TokenizerConfig> {
    let mut c = TokenizerConfig::for_method(Method::parse(&a.method)?);
    c.seed = a.seed;
    if let Some(v) = a.epochs {
        c.epochs = v;
    }
    if let Some(v) = a.batch_size {
        c.batch_size = v;
    }
    if let Some(v) = a.levels {
        c.levels = v;
    }
    if let Some(v) = a.codes {
        c.codebook_size = v;
    }
    if let Some(v) = a.e_dim {
        c.e_dim = v;
    }
    if let Some(v) = a.alpha {
        c.alpha = v;
    }
    if let Some(v) = a.beta {
        c.beta = v;
    }
    if let Some(v) = a.eval_every {
        c.eval_every = v;
    }
    if let Some(h) = &a.hidden {
        let v: Result<Vec<usize>, _> = h.split(',').map(|s| s.trim().parse::<usize>()).collect();
        c.hidden = Some(v.with_context(|| format!("--hidden {h:?}: expected comma-separated sizes"))?);
    }
    if let Some(i) = &a.init {
        c.init = match i.as_str() {
            "kmeans" => CodebookInit::Kmeans,
            "constrained" => CodebookInit::Constrained,
            _ => bail!("--init {i:?}: expected kmeans or constrained"),
        };
    }
    Ok(c)
}

/// The MQ-tokenizer configurations (users, items) from the arguments.
pub fn mq_configs(a: &TokenizeArgs) -> Result<(MqTokenizerConfig, MqTokenizerConfig)> {
    let mut c = MqTokenizerConfig::tokenrec(256);
    c.seed = a.seed;
    if let Some(v) = a.epochs {
        c.epochs = v;
    }
    if let Some(v) = a.batch_size {
        c.batch_size = v;
    }
    if let Some(v) = a.levels {
        c.books = v;
    }
    if let Some(v) = a.e_dim {
        c.code_dim = v;
    }
    if let Some(v) = a.eval_every {
        c.eval_every = v;
    }
    if let Some(v) = a.mask_ratio {
        c.mask_ratio = v;
    }
    if let Some(v) = a.kmeans_every {
        c.kmeans_every = v;
    }
    if let Some(v) = a.valid_ratio {
        c.valid_ratio = v;
    }
    if let Some(v) = &a.variant {
        c.variant = MqVariant::parse(v)?;
    }
    if let Some(h) = &a.hidden {
        let v: Result<Vec<usize>, _> = h.split(',').map(|s| s.trim().parse::<usize>()).collect();
        let v = v.with_context(|| format!("--hidden {h:?}: expected comma-separated sizes"))?;
        c.dec_hidden = v.iter().rev().cloned().collect();
        c.enc_hidden = v;
    }
    c.unique_ids = a.unique_ids;
    c.batch_norm = !a.no_batch_norm;
    for (flag, v, dst) in
        [("--enc-dropout", a.enc_dropout, &mut c.enc_dropout), ("--dec-dropout", a.dec_dropout, &mut c.dec_dropout)]
    {
        if let Some(v) = v {
            if !(0.0..1.0).contains(&v) {
                bail!("{flag} {v}: expected a probability in [0, 1)");
            }
            *dst = v;
        }
    }
    let mut items = c.clone();
    if let Some(v) = a.codes {
        items.codebook_size = v;
    }
    let mut users = c;
    users.codebook_size = a.user_codes.or(a.codes).unwrap_or(256);
    // Different initial weights for the two tokenizers.
    users.seed = a.seed.wrapping_add(1);
    Ok((users, items))
}

/// `genrec tokenize --method mq`.
fn run_mq(a: &TokenizeArgs) -> Result<()> {
    let (ucfg, icfg) = mq_configs(a)?;
    let (users, nu, du) = load_matrix(&a.emb, Some(a.user_key.as_deref().unwrap_or("user_emb")))?;
    let (items, ni, di) = load_matrix(&a.emb, Some(a.emb_key.as_deref().unwrap_or("item_emb")))?;
    eprintln!("tokenize: mq ({:?}) on {nu} users x {du}-d and {ni} items x {di}-d", icfg.variant);
    let gpu = Gpu::shared()?;
    let out = tokenize_users_items(&gpu, &users, nu, &items, ni, &ucfg, &icfg)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    out.users.save(&a.out.join("user_codes.json"))?;
    out.items.save(&a.out.join("item_codes.json"))?;
    let json = serde_json::json!({ "users": out.user_report, "items": out.item_report });
    let path = a.out.join("report.json");
    crate::io::atomic_write(&path, |w| Ok(serde_json::to_writer_pretty(&mut *w, &json)?))
        .with_context(|| format!("writing {}", path.display()))?;
    report::save_histogram_png(&out.user_report.base.first_level_histogram, &a.out.join("user_histogram.png"))?;
    report::save_histogram_png(&out.item_report.base.first_level_histogram, &a.out.join("item_histogram.png"))?;
    out.user_model.save(&a.out.join("user_model.safetensors"))?;
    out.item_model.save(&a.out.join("item_model.safetensors"))?;
    for (what, r) in [("users", &out.user_report), ("items", &out.item_report)] {
        let b = &r.base;
        let util: Vec<String> = b.per_level.iter().map(|s| format!("{}/{}", s.used, b.codebook_size)).collect();
        let ppl: Vec<String> = b.per_level.iter().map(|s| format!("{:.1}", s.perplexity)).collect();
        println!(
            "mq {what}: {} rows, codes used per book [{}], perplexity [{}], collision rate {:.4}, final {:.4}, code similarity {:.4}, {:.1}s",
            b.n_items,
            util.join(", "),
            ppl.join(", "),
            b.ids.collision_rate_argmin,
            b.collision_rate_final,
            b.code_similarity.unwrap_or(f64::NAN),
            b.train_seconds
        );
    }
    println!(
        "wrote {}/{{user,item}}_codes.json, report.json, {{user,item}}_histogram.png, {{user,item}}_model.safetensors",
        a.out.display()
    );
    Ok(())
}

/// Run `genrec tokenize`.
pub fn run(a: &TokenizeArgs) -> Result<()> {
    if a.method.eq_ignore_ascii_case("mq") || a.method.eq_ignore_ascii_case("tokenrec") {
        return run_mq(a);
    }
    let cfg = config(a)?;
    let (sem, m, d) = load_matrix(&a.emb, a.emb_key.as_deref())?;
    let cf = match &a.cf {
        None => None,
        Some(p) => {
            let (mut v, mut rows, dc) = load_matrix(p, a.cf_key.as_deref())?;
            if a.cf_drop_first {
                if rows == 0 {
                    bail!("{}: no row to drop", p.display());
                }
                v.drain(..dc);
                rows -= 1;
            }
            if rows != m {
                bail!(
                    "{}: {rows} CF rows for {m} items in {} (use --cf-drop-first for a padding row 0)",
                    p.display(),
                    a.emb.display()
                );
            }
            Some(v)
        }
    };
    eprintln!("tokenize: {} on {m} items x {d}-d{}", cfg.method.name(), if cf.is_some() { " with CF" } else { "" });
    let gpu = Gpu::shared()?;
    let (model, ids, rep) = train_tokenizer_model(&gpu, &sem, m, cf.as_deref(), &cfg)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    ids.save(&a.out.join("codes.json"))?;
    report::save_report(&rep, &a.out.join("report.json"))?;
    report::save_histogram_png(&rep.first_level_histogram, &a.out.join("histogram.png"))?;
    model.save(&a.out.join("model.safetensors"))?;
    let util: Vec<String> = rep.per_level.iter().map(|s| format!("{}/{}", s.used, rep.codebook_size)).collect();
    println!(
        "{}: {} items, codes used per level [{}], collision rate {:.4} (argmin) -> {:.4} (after Sinkhorn) -> 0 with {} extra tokens{}",
        cfg.method.name(),
        rep.n_items,
        util.join(", "),
        rep.ids.collision_rate_argmin,
        rep.ids.collision_rate_sinkhorn,
        rep.ids.items_with_extra_token,
        rep.code_similarity.map(|s| format!(", code similarity {s:.4}")).unwrap_or_default()
    );
    println!("wrote {}/{{codes.json, report.json, histogram.png, model.safetensors}}", a.out.display());
    Ok(())
}
