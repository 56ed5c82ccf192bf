//! `genrec tokenize`: train a tokenizer on item embeddings from safetensors
//! files and write `codes.json` (`ItemCodes`), `report.json`
//! (`TokenizerReport`), `histogram.png` (first-level code frequencies) and
//! `model.safetensors` (the trained RQ-VAE, `RqVae::load`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::{report, train_tokenizer_model, CodebookInit, Method, TokenizerConfig};
use crate::gpu::Gpu;
use crate::io::safetensors::SafeTensorsFile;

/// Arguments of `genrec tokenize`.
#[derive(clap::Args, Debug, Clone)]
pub struct TokenizeArgs {
    /// Tokenizer: rqvae (TIGER) or letter.
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

/// Run `genrec tokenize`.
pub fn run(a: &TokenizeArgs) -> Result<()> {
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
