//! Item text embeddings for a prepared dataset (`genrec embed`): render each item's
//! text from a template, run the BERT text encoder (all-MiniLM-L6-v2 by default) over
//! all items on the GPU, and cache the `[n_items, dim]` matrix as safetensors.
//!
//! **Id alignment**: row `i` of the result is the item with dense id `i` of the
//! `Prepared` dataset (`prepared.item_ids[i]`, `prepared.item_meta[i]`); there is no
//! padding row. Items without any text are embedded from the empty string
//! (`[CLS] [SEP]`), so every row is a unit vector.
//!
//! Cache: a safetensors file with one tensor `embeddings` `[n_items, dim]` F32 and
//! `__metadata__` holding the cache `key` (sha256 of the dataset name, item ids, every
//! rendered text, the template, the model id and the max length; so a changed dataset,
//! template or model never reuses a stale file) plus human-readable fields. Default
//! location: `<genrec cache>/embeddings/<dataset>-<key prefix>.safetensors`. Written
//! atomically; a file whose key differs is recomputed and replaced.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use super::bert::{TextEncoder, DEFAULT_MAX_LEN};
use crate::data::{ItemMeta, Prepared};
use crate::gpu::Gpu;
use crate::io::safetensors::{save, SafeTensorsFile, StoreDtype};
use crate::io::HostTensor;

/// Default template: title then genres/categories (e.g. "Toy Story Animation Children's Comedy").
pub const DEFAULT_TEMPLATE: &str = "{title} {genres}";

/// Knobs of [`item_text_embeddings`].
#[derive(Clone, Debug)]
pub struct EmbedOptions {
    /// Text per item; placeholders: `{title}`, `{year}`, `{genres}` / `{categories}`
    /// (space-joined), `{brand}`, `{description}`, `{text}` (`ItemMeta::text()`, the
    /// composed description), `{id}` (raw item id). `{{` and `}}` are literal braces.
    /// Missing fields render empty; runs of whitespace collapse to one space.
    pub template: String,
    /// Texts per GPU batch.
    pub batch: usize,
    /// Tokens per text, [CLS]/[SEP] included (longer texts are truncated).
    pub max_len: usize,
    /// A HF BERT directory (config.json, model.safetensors, tokenizer.json); None =
    /// all-MiniLM-L6-v2 from the asset cache, fetched when missing.
    pub model_dir: Option<PathBuf>,
    /// Cache file; None = `<genrec cache>/embeddings/<dataset>-<key>.safetensors`.
    pub out: Option<PathBuf>,
    /// Reuse a cache file with the same key (default true).
    pub reuse: bool,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

impl Default for EmbedOptions {
    fn default() -> Self {
        EmbedOptions {
            template: DEFAULT_TEMPLATE.into(),
            batch: 64,
            max_len: DEFAULT_MAX_LEN,
            model_dir: None,
            out: None,
            reuse: true,
            progress: false,
        }
    }
}

/// Result of [`item_text_embeddings_cached`].
#[derive(Clone, Debug)]
pub struct ItemEmbeddings {
    /// Row-major `[n_items, dim]`; row i = dense item id i.
    pub data: Vec<f32>,
    pub n_items: usize,
    pub dim: usize,
    /// The cache file read or written.
    pub path: PathBuf,
    /// True when the cache file was reused (no model run).
    pub reused: bool,
    /// Seconds spent embedding (0 when reused).
    pub seconds: f64,
}

/// One field of an item for a template placeholder.
fn field(meta: &ItemMeta, raw_id: &str, name: &str) -> Option<String> {
    Some(match name {
        "title" => meta.title.clone().unwrap_or_default(),
        "year" => meta.year.clone().unwrap_or_default(),
        "genres" | "categories" => meta.categories.join(" "),
        "brand" => meta.brand.clone().unwrap_or_default(),
        "description" => meta.description.clone().unwrap_or_default(),
        "text" => meta.text(),
        "id" => raw_id.to_string(),
        _ => return None,
    })
}

/// Check a template's syntax and placeholder names.
pub fn check_template(template: &str) -> Result<()> {
    render_template(template, &ItemMeta::default(), "").map(|_| ())
}

/// Render `template` for one item (see [`EmbedOptions::template`]).
pub fn render_template(template: &str, meta: &ItemMeta, raw_id: &str) -> Result<String> {
    let mut out = String::new();
    let mut chars = template.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '{' if chars.peek().map(|p| p.1) == Some('{') => {
                chars.next();
                out.push('{');
            }
            '}' if chars.peek().map(|p| p.1) == Some('}') => {
                chars.next();
                out.push('}');
            }
            '{' => {
                let rest = &template[i + 1..];
                let Some(end) = rest.find('}') else {
                    bail!("template {template:?}: unclosed '{{' at byte {i}");
                };
                let name = rest[..end].trim();
                match field(meta, raw_id, name) {
                    Some(v) => out.push_str(&v),
                    None => bail!(
                        "template {template:?}: unknown placeholder {{{name}}} (known: title, year, genres, \
                         categories, brand, description, text, id)"
                    ),
                }
                for _ in 0..end + 1 {
                    chars.next();
                }
            }
            '}' => bail!("template {template:?}: stray '}}' at byte {i} (write '}}}}' for a literal brace)"),
            _ => out.push(c),
        }
    }
    Ok(out.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// The rendered text of every item, by dense id.
pub fn item_texts(prepared: &Prepared, template: &str) -> Result<Vec<String>> {
    check_template(template)?;
    if prepared.item_meta.len() != prepared.item_ids.len() {
        bail!(
            "dataset {}: {} item metadata rows for {} items",
            prepared.name,
            prepared.item_meta.len(),
            prepared.item_ids.len()
        );
    }
    prepared.item_meta.iter().zip(&prepared.item_ids).map(|(m, id)| render_template(template, m, id)).collect()
}

/// Identity of the model for cache keys, without loading it: the MiniLM asset's
/// package and version, or the directory with its config and weight file sizes.
fn model_id(opts: &EmbedOptions) -> Result<String> {
    match &opts.model_dir {
        None => {
            let spec = crate::io::fetch::asset("minilm")?;
            Ok(format!("minilm:{}=={}", spec.package, spec.version))
        }
        Some(dir) => {
            let cfg = std::fs::read(dir.join("config.json"))
                .with_context(|| format!("reading {}", dir.join("config.json").display()))?;
            let size = |f: &str| std::fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0);
            Ok(format!(
                "dir:{} config:{} weights:{} tokenizer:{}",
                dir.display(),
                crate::io::fetch::hex(&Sha256::digest(&cfg)),
                size("model.safetensors"),
                size("tokenizer.json")
            ))
        }
    }
}

/// The cache key: sha256 over everything that determines the matrix.
pub fn cache_key(prepared: &Prepared, texts: &[String], template: &str, model: &str, max_len: usize) -> String {
    let mut h = Sha256::new();
    h.update(b"genrec-item-embeddings-v1\n");
    for part in [prepared.name.as_str(), template, model, &max_len.to_string(), "mean+l2"] {
        h.update(part.as_bytes());
        h.update(b"\n");
    }
    for (id, t) in prepared.item_ids.iter().zip(texts) {
        h.update(id.as_bytes());
        h.update(b"\t");
        h.update(t.as_bytes());
        h.update(b"\n");
    }
    crate::io::fetch::hex(&h.finalize())
}

fn safe_name(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

/// Read a cache file if it holds `key` with shape `[n, dim?]`; None when absent or stale.
fn read_cache(path: &Path, key: &str, n: usize) -> Result<Option<(Vec<f32>, usize)>> {
    if !path.is_file() {
        return Ok(None);
    }
    let f = SafeTensorsFile::open(path)?;
    if f.metadata().get("key").map(String::as_str) != Some(key) || !f.contains("embeddings") {
        return Ok(None);
    }
    let t = f.get("embeddings")?;
    if t.shape.len() != 2 || t.shape[0] != n {
        bail!("{}: tensor \"embeddings\" has shape {:?}, expected [{n}, dim]", path.display(), t.shape);
    }
    Ok(Some((t.data, t.shape[1])))
}

/// Embeddings of every item's text, row-major `[n_items, dim]` (384 for MiniLM), row i
/// = dense item id i. Uses (and fills) the cache; fetches MiniLM when missing.
pub fn item_text_embeddings(gpu: &Gpu, prepared: &Prepared, opts: &EmbedOptions) -> Result<Vec<f32>> {
    Ok(item_text_embeddings_cached(gpu, prepared, opts)?.data)
}

/// [`item_text_embeddings`] with where the result came from and how long it took.
pub fn item_text_embeddings_cached(gpu: &Gpu, prepared: &Prepared, opts: &EmbedOptions) -> Result<ItemEmbeddings> {
    let n = prepared.n_items();
    if n == 0 {
        bail!("dataset {}: no items to embed", prepared.name);
    }
    let texts = item_texts(prepared, &opts.template)?;
    let model = model_id(opts)?;
    let key = cache_key(prepared, &texts, &opts.template, &model, opts.max_len);
    let path = match &opts.out {
        Some(p) => p.clone(),
        None => crate::io::fetch::cache_dir()?.join("embeddings").join(format!(
            "{}-{}.safetensors",
            safe_name(&prepared.name),
            &key[..16]
        )),
    };
    if opts.reuse {
        if let Some((data, dim)) = read_cache(&path, &key, n)? {
            return Ok(ItemEmbeddings { data, n_items: n, dim, path, reused: true, seconds: 0.0 });
        }
    }
    let encoder = match &opts.model_dir {
        None => TextEncoder::minilm(gpu, opts.max_len)?,
        Some(d) => TextEncoder::load(gpu, d, opts.max_len)?,
    };
    let t0 = Instant::now();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let bar = if opts.progress {
        let b = indicatif::ProgressBar::new(n as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("embedding {pos}/{len} items [{bar:30}] {per_sec} eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let data = encoder.embed(&refs, opts.batch, &mut |done| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    let seconds = t0.elapsed().as_secs_f64();
    let dim = encoder.dim();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut md = HashMap::new();
    md.insert("key".to_string(), key);
    md.insert("dataset".to_string(), prepared.name.clone());
    md.insert("template".to_string(), opts.template.clone());
    md.insert("model".to_string(), encoder.model_id.clone());
    md.insert("max_len".to_string(), opts.max_len.to_string());
    md.insert("pooling".to_string(), "mean over tokens, L2-normalized".to_string());
    md.insert("rows".to_string(), "row i = dense item id i of the prepared dataset".to_string());
    let mut tensors = std::collections::BTreeMap::new();
    tensors.insert("embeddings".to_string(), HostTensor::new(&[n, dim], data)?);
    save(&path, &tensors, Some(&md), StoreDtype::F32)?;
    let data = tensors.remove("embeddings").map(|t| t.data).unwrap_or_default();
    Ok(ItemEmbeddings { data, n_items: n, dim, path, reused: false, seconds })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> ItemMeta {
        ItemMeta {
            title: Some("Toy Story".into()),
            year: Some("1995".into()),
            categories: vec!["Animation".into(), "Comedy".into()],
            ..Default::default()
        }
    }

    #[test]
    fn template_renders_fields_and_collapses_space() {
        let m = meta();
        assert_eq!(render_template("{title} {genres}", &m, "1").unwrap(), "Toy Story Animation Comedy");
        assert_eq!(render_template("{title} ({year}) #{id}", &m, "42").unwrap(), "Toy Story (1995) #42");
        assert_eq!(render_template("{ title }  {brand}  {description}", &m, "1").unwrap(), "Toy Story");
        assert_eq!(render_template("{{{title}}}", &m, "1").unwrap(), "{Toy Story}");
        assert_eq!(render_template("{text}", &m, "1").unwrap(), "Toy Story (1995). Categories: Animation, Comedy");
        assert_eq!(render_template("{title}", &ItemMeta::default(), "9").unwrap(), "");
    }

    /// A prepared dataset of 4 items (one without any text) and 3 users, no filtering.
    fn tiny_prepared() -> Prepared {
        use crate::data::{RawDataset, RawInteraction};
        let mut raw = RawDataset { name: "tiny shop".into(), ..Default::default() };
        for (u, items) in [("u1", ["10", "20", "30"]), ("u2", ["20", "30", "40"]), ("u3", ["10", "40", "30"])] {
            for (t, i) in items.iter().enumerate() {
                raw.interactions.push(RawInteraction {
                    user: u.into(),
                    item: i.to_string(),
                    timestamp: t as i64,
                    rating: None,
                });
            }
        }
        let m = |title: &str, cats: &[&str]| ItemMeta {
            title: Some(title.into()),
            categories: cats.iter().map(|c| c.to_string()).collect(),
            ..Default::default()
        };
        raw.items.insert("10".into(), m("Toy Story", &["cats"]));
        raw.items.insert("20".into(), m("The Cat", &["playing", "mat"]));
        raw.items.insert("30".into(), m("Café", &[]));
        let opts = crate::data::PrepareOptions { kcore: 0, ..Default::default() };
        crate::data::prepare(&raw, &opts).unwrap()
    }

    #[test]
    fn item_embeddings_are_aligned_cached_and_keyed_by_template() {
        let gpu = Gpu::shared().unwrap();
        let model = crate::models::bert::tests::tiny_tokenizer_dir();
        let p = tiny_prepared();
        assert_eq!(p.item_ids, vec!["10", "20", "30", "40"]);
        let out = model.path().join("emb.safetensors");
        let opts = EmbedOptions {
            batch: 3,
            max_len: 16,
            model_dir: Some(model.path().to_path_buf()),
            out: Some(out.clone()),
            ..Default::default()
        };
        let first = item_text_embeddings_cached(&gpu, &p, &opts).unwrap();
        assert!(!first.reused && first.path == out && out.is_file());
        assert_eq!((first.n_items, first.dim, first.data.len()), (4, 16, 64));
        // Row i = dense item i: compare with embedding each text alone.
        let enc = TextEncoder::load(&gpu, model.path(), 16).unwrap();
        let texts = item_texts(&p, DEFAULT_TEMPLATE).unwrap();
        assert_eq!(texts, vec!["Toy Story cats", "The Cat playing mat", "Café", ""]);
        for (i, t) in texts.iter().enumerate() {
            let e = enc.embed(&[t.as_str()], 1, &mut |_| {}).unwrap();
            let row = &first.data[i * 16..(i + 1) * 16];
            let err = row.iter().zip(&e).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err < 1e-5, "item {i}: {err}");
            let norm: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "item {i} norm {norm}");
        }
        // Same dataset, template and model: the file is reused as is.
        let again = item_text_embeddings_cached(&gpu, &p, &opts).unwrap();
        assert!(again.reused);
        assert_eq!(again.data, first.data);
        let md = SafeTensorsFile::open(&out).unwrap().metadata();
        assert_eq!(md["template"], DEFAULT_TEMPLATE);
        assert_eq!(md["dataset"], "tiny shop");
        // Another template changes the key: recomputed, and the file replaced.
        let titles = EmbedOptions { template: "{title}".into(), ..opts.clone() };
        let t = item_text_embeddings_cached(&gpu, &p, &titles).unwrap();
        assert!(!t.reused);
        assert_ne!(t.data, first.data);
        assert!(!item_text_embeddings_cached(&gpu, &p, &opts).unwrap().reused, "stale file must not be reused");
        // --force (reuse: false) recomputes even with a matching file.
        let forced = EmbedOptions { reuse: false, ..opts.clone() };
        assert!(!item_text_embeddings_cached(&gpu, &p, &forced).unwrap().reused);
        // Bad inputs: a template error names the placeholder, a bad model dir its file.
        let bad = EmbedOptions { template: "{nope}".into(), ..opts.clone() };
        assert!(item_text_embeddings_cached(&gpu, &p, &bad).unwrap_err().to_string().contains("{nope}"));
        let nodir = EmbedOptions { model_dir: Some(model.path().join("missing")), ..opts };
        let e = format!("{:#}", item_text_embeddings_cached(&gpu, &p, &nodir).unwrap_err());
        assert!(e.contains("missing") && e.contains("config.json"), "{e}");
    }

    #[test]
    fn bad_templates_are_errors_naming_the_problem() {
        let e = check_template("{title} {rating}").unwrap_err().to_string();
        assert!(e.contains("{rating}") && e.contains("genres"), "{e}");
        let e = check_template("{title").unwrap_err().to_string();
        assert!(e.contains("unclosed"), "{e}");
        let e = check_template("a } b").unwrap_err().to_string();
        assert!(e.contains("stray"), "{e}");
    }
}
