//! Generic format for users' own data.
//!
//! - `interactions.csv` (or `.csv.gz`): a header naming at least `user`,
//!   `item` and `timestamp` (any column order; extra columns ignored), plus
//!   optional `rating` and `text` (a user-written text about the item, kept as
//!   [`TextKind::Other`](super::TextKind)).
//! - `items.jsonl` (optional, or `.jsonl.gz`): one object per line with
//!   `item` (string or integer) and either `text` or any of `title`,
//!   `description`, `categories` (string or list), `brand`, `year`. Items
//!   listed here without interactions are ignored.

use super::io::{json_id, parse_timestamp, Lines};
use super::movielens::read_csv;
use super::{amazon, find_named, ItemMeta, RawDataset, RawInteraction, RawUserText, TextKind};
use anyhow::{anyhow, bail, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// `interactions.csv` (required) and `items.jsonl` (optional) in `dir`.
pub fn find_files(dir: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
    let inter = find_named(dir, &["interactions.csv"])
        .ok_or_else(|| anyhow!("{}: no interactions.csv (generic format)", dir.display()))?;
    Ok((inter, find_named(dir, &["items.jsonl", "items.json"])))
}

/// Loads the generic format from `dir`.
pub fn load_dir(dir: &Path) -> Result<RawDataset> {
    let (inter, items) = find_files(dir)?;
    let mut ds =
        RawDataset { name: dir.file_name().and_then(|n| n.to_str()).unwrap_or("generic").into(), ..Default::default() };
    ds.report.files.push(inter.display().to_string());
    let mut interactions = Vec::new();
    let mut texts = Vec::new();
    let n = read_csv(
        &inter,
        &["user", "item", "timestamp"],
        |_, v| {
            let get = |i: usize, what: &str| -> Result<&str> {
                match v[i].map(str::trim) {
                    Some(s) if !s.is_empty() => Ok(s),
                    _ => bail!("empty {what}"),
                }
            };
            let user = get(0, "user")?;
            let item = get(1, "item")?;
            let ts = get(2, "timestamp")?;
            let timestamp = parse_timestamp(ts).ok_or_else(|| anyhow!("bad timestamp {ts:?}"))?;
            let rating = match v[3].map(str::trim).filter(|s| !s.is_empty()) {
                Some(r) => Some(r.parse::<f32>().map_err(|_| anyhow!("bad rating {r:?}"))?),
                None => None,
            };
            if let Some(t) = v[4].map(str::trim).filter(|s| !s.is_empty()) {
                texts.push(RawUserText {
                    user: user.into(),
                    item: Some(item.into()),
                    timestamp: Some(timestamp),
                    kind: TextKind::Other,
                    text: t.into(),
                });
            }
            interactions.push(RawInteraction { user: user.into(), item: item.into(), timestamp, rating });
            Ok(())
        },
        &["rating", "text"],
    )?;
    ds.report.records += n;
    ds.interactions = interactions;
    ds.user_texts = texts;
    if let Some(items) = items {
        ds.report.files.push(items.display().to_string());
        for r in Lines::open(&items)? {
            let (no, line) = r?;
            if line.trim().is_empty() {
                continue;
            }
            ds.report.records += 1;
            let v: Value =
                serde_json::from_str(&line).map_err(|e| anyhow!("{}:{no}: invalid JSON: {e}", items.display()))?;
            let id = v
                .get("item")
                .and_then(json_id)
                .ok_or_else(|| anyhow!("{}:{no}: missing 'item' (string or integer)", items.display()))?;
            let mut meta = amazon::parse_meta(&v);
            meta.text =
                v.get("text").and_then(Value::as_str).map(str::trim).filter(|s| !s.is_empty()).map(String::from);
            meta.year = v.get("year").and_then(json_id);
            if meta == ItemMeta::default() {
                ds.report.skip("item line without any text field");
            }
            if ds.items.insert(id.clone(), meta).is_some() {
                bail!("{}:{no}: item {id:?} appears twice", items.display());
            }
        }
    }
    Ok(ds)
}
