//! Amazon review data (McAuley et al. 2014 and Ni et al. 2018 releases).
//!
//! Reviews: one JSON object per line with `reviewerID`, `asin`,
//! `unixReviewTime` and optionally `reviewText`, `summary`, `overall`.
//! Metadata: one object per line with `asin` and optionally `title`,
//! `description` (string, or list of strings in 2018), `categories` (2014:
//! list of lists) or `category` (2018: list), `brand`. The 2014 metadata lines
//! are Python literals (`{'asin': ...}`), the 2018 ones strict JSON; both are
//! accepted. Files may be gzipped (detected by magic bytes).
//!
//! Metadata for items without reviews is skipped and counted; reviewed items
//! without metadata are kept (with empty text) and counted by `prepare`.

use super::io::{json_id, json_timestamp, parse_json_or_python, Lines};
use super::{ItemMeta, RawDataset, RawInteraction, RawUserText, TextKind};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

fn is_json_lines(name: &str) -> bool {
    let n = name.trim_end_matches(".gz");
    n.ends_with(".json") || n.ends_with(".jsonl")
}

/// Finds the reviews file (exactly one JSON-lines file whose name does not
/// start with `meta`) and the optional metadata file (`meta*`) in `dir`.
pub fn find_files(dir: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
    let mut reviews = Vec::new();
    let mut metas = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("{}: cannot list directory", dir.display()))? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("").to_string();
        if !p.is_file() || !is_json_lines(&name) {
            continue;
        }
        if name.starts_with("meta") {
            metas.push(p);
        } else {
            reviews.push(p);
        }
    }
    reviews.sort();
    metas.sort();
    if reviews.len() != 1 {
        bail!(
            "{}: expected exactly one Amazon reviews file (*.json[l][.gz] not starting with 'meta'), found {}",
            dir.display(),
            reviews.len()
        );
    }
    if metas.len() > 1 {
        bail!("{}: expected at most one 'meta*' file, found {}", dir.display(), metas.len());
    }
    Ok((reviews.pop().unwrap(), metas.pop()))
}

/// Dataset name from a reviews file name: `reviews_Beauty_5.json.gz` -> `Beauty`.
fn dataset_name(p: &Path) -> String {
    let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("amazon");
    let n = n.trim_end_matches(".gz").trim_end_matches(".jsonl").trim_end_matches(".json");
    let n = n.strip_prefix("reviews_").unwrap_or(n);
    n.strip_suffix("_5").unwrap_or(n).to_string()
}

/// Loads the reviews file and metadata file found by [`find_files`].
pub fn load_dir(dir: &Path) -> Result<RawDataset> {
    let (reviews, meta) = find_files(dir)?;
    load_files(&reviews, meta.as_deref())
}

/// Loads an Amazon reviews file and an optional metadata file.
pub fn load_files(reviews: &Path, meta: Option<&Path>) -> Result<RawDataset> {
    let mut ds = RawDataset { name: dataset_name(reviews), ..Default::default() };
    ds.report.files.push(reviews.display().to_string());
    for r in Lines::open(reviews)? {
        let (no, line) = r?;
        if line.trim().is_empty() {
            continue;
        }
        ds.report.records += 1;
        let v = parse_json_or_python(&line).map_err(|e| anyhow!("{}:{no}: {e}", reviews.display()))?;
        let field = |k: &str| v.get(k);
        let user = field("reviewerID")
            .and_then(json_id)
            .ok_or_else(|| anyhow!("{}:{no}: missing or empty 'reviewerID'", reviews.display()))?;
        let item = field("asin")
            .and_then(json_id)
            .ok_or_else(|| anyhow!("{}:{no}: missing or empty 'asin'", reviews.display()))?;
        let timestamp = field("unixReviewTime")
            .and_then(json_timestamp)
            .ok_or_else(|| anyhow!("{}:{no}: missing or bad 'unixReviewTime'", reviews.display()))?;
        let rating = field("overall").and_then(Value::as_f64).map(|x| x as f32);
        for (k, kind) in [("reviewText", TextKind::Review), ("summary", TextKind::Summary)] {
            if let Some(t) = field(k).and_then(Value::as_str).map(str::trim).filter(|t| !t.is_empty()) {
                ds.user_texts.push(RawUserText {
                    user: user.clone(),
                    item: Some(item.clone()),
                    timestamp: Some(timestamp),
                    kind,
                    text: t.to_string(),
                });
            }
        }
        ds.interactions.push(RawInteraction { user, item, timestamp, rating });
    }
    if let Some(meta) = meta {
        ds.report.files.push(meta.display().to_string());
        let reviewed: HashSet<String> = ds.interactions.iter().map(|r| r.item.clone()).collect();
        for r in Lines::open(meta)? {
            let (no, line) = r?;
            if line.trim().is_empty() {
                continue;
            }
            ds.report.records += 1;
            let v = parse_json_or_python(&line).map_err(|e| anyhow!("{}:{no}: {e}", meta.display()))?;
            let asin =
                v.get("asin").and_then(json_id).ok_or_else(|| anyhow!("{}:{no}: missing 'asin'", meta.display()))?;
            if !reviewed.contains(&asin) {
                ds.report.skip("metadata for an item without reviews");
                continue;
            }
            if ds.items.contains_key(&asin) {
                ds.report.skip("repeated metadata line (first kept)");
                continue;
            }
            ds.items.insert(asin, parse_meta(&v));
        }
    }
    Ok(ds)
}

/// Item metadata from a 2014 or 2018 metadata object.
pub fn parse_meta(v: &Value) -> ItemMeta {
    let s = |k: &str| -> Option<String> {
        match v.get(k)? {
            Value::String(s) => Some(s.trim().to_string()).filter(|s| !s.is_empty()),
            Value::Array(a) => {
                let parts: Vec<&str> =
                    a.iter().filter_map(Value::as_str).map(str::trim).filter(|s| !s.is_empty()).collect();
                Some(parts.join(" ")).filter(|s| !s.is_empty())
            }
            _ => None,
        }
    };
    let mut categories: Vec<String> = Vec::new();
    let mut push = |c: &str| {
        let c = c.trim();
        if !c.is_empty() && !categories.iter().any(|x| x == c) {
            categories.push(c.to_string());
        }
    };
    for key in ["categories", "category"] {
        if let Some(Value::Array(a)) = v.get(key) {
            for c in a {
                match c {
                    Value::String(s) => push(s),
                    Value::Array(inner) => inner.iter().filter_map(Value::as_str).for_each(&mut push),
                    _ => {}
                }
            }
        }
    }
    ItemMeta { title: s("title"), description: s("description"), categories, brand: s("brand"), year: None, text: None }
}
