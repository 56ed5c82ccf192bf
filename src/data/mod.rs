//! Data pipeline: loaders for the public recommendation formats, preparation
//! (k-core filtering, chronological ordering, id remapping, splits, history
//! truncation, training samples) and a cached on-disk prepared format.
//!
//! Flow: [`load`] (a [`Format`] + an input directory) -> [`RawDataset`]
//! (string ids, timestamps, item metadata, user texts) -> [`prepare()`] with
//! [`PrepareOptions`] -> [`Prepared`] (dense ids, per-user chronological
//! sequences with a split label per interaction) -> [`Prepared::save`] /
//! [`Prepared::load`]; [`prepare_cached`] does all of it and reuses an
//! existing prepared directory whose input hash matches.
//!
//! Conventions (decided here, used by every system):
//! - Dense ids are `0..n_users` and `0..n_items`; **no id is reserved for
//!   padding**. Models that need a pad item use [`Prepared::pad_item`]
//!   (`== n_items`) or shift ids by one locally, so that score matrices have
//!   exactly `n_items` columns. Dense ids follow the raw ids' order
//!   (numeric order when every raw id is an integer, else byte order).
//! - Each user's interactions are ordered by timestamp; equal timestamps keep
//!   the input file's order (stable sort).
//! - Repeated (user, item) pairs keep the earliest occurrence by default
//!   ([`PrepareOptions::dedup`]); the number removed is reported.

pub mod amazon;
pub mod generic;
pub mod io;
pub mod movielens;
pub mod prepare;
pub mod store;

pub use prepare::{prepare, EvalCase, PrepareOptions, Prepared, Sample, Split, SplitKind, Stats};
pub use store::{input_hash, prepare_cached};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// One user-item interaction as read from the input, ids still raw strings.
#[derive(Clone, Debug, PartialEq)]
pub struct RawInteraction {
    pub user: String,
    pub item: String,
    /// Seconds (or any monotone integer unit) as given by the source.
    pub timestamp: i64,
    pub rating: Option<f32>,
}

/// What kind of user-written text a [`RawUserText`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextKind {
    /// A review body (Amazon `reviewText`).
    Review,
    /// A review title (Amazon `summary`), a short query-like text.
    Summary,
    /// A free-form tag (MovieLens `tags.csv`).
    Tag,
    /// Any other user text (generic format `text` column).
    Other,
}

/// A piece of text written by a user, optionally about an item (TTDS uses
/// these as the user tower's "comments"/"queries").
#[derive(Clone, Debug, PartialEq)]
pub struct RawUserText {
    pub user: String,
    pub item: Option<String>,
    pub timestamp: Option<i64>,
    pub kind: TextKind,
    pub text: String,
}

/// Item-side text. Every field is optional; [`ItemMeta::text`] composes them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ItemMeta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub categories: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brand: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub year: Option<String>,
    /// A ready-made text (generic format `text` field); used as is when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

impl ItemMeta {
    /// One text for the item: the `text` field when given, else
    /// "title (year). Categories: a, b. Brand: x. description", omitting
    /// missing parts. Empty when nothing is known.
    pub fn text(&self) -> String {
        if let Some(t) = &self.text {
            return t.clone();
        }
        let mut parts: Vec<String> = Vec::new();
        match (&self.title, &self.year) {
            (Some(t), Some(y)) => parts.push(format!("{t} ({y})")),
            (Some(t), None) => parts.push(t.clone()),
            (None, Some(y)) => parts.push(format!("({y})")),
            _ => {}
        }
        if !self.categories.is_empty() {
            parts.push(format!("Categories: {}", self.categories.join(", ")));
        }
        if let Some(b) = &self.brand {
            parts.push(format!("Brand: {b}"));
        }
        if let Some(d) = &self.description {
            parts.push(d.clone());
        }
        parts.join(". ")
    }

    /// True when no field is set.
    pub fn is_empty(&self) -> bool {
        self == &ItemMeta::default()
    }
}

/// Counts of what a loader read and what it skipped (with the reason).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Input files read, in order.
    pub files: Vec<String>,
    /// Non-empty data lines/records read, over all files.
    pub records: usize,
    /// Records skipped, by reason (e.g. "tag for unknown user/item": 3).
    pub skipped: BTreeMap<String, usize>,
}

impl LoadReport {
    /// Counts one skipped record under `reason`.
    pub fn skip(&mut self, reason: &str) {
        *self.skipped.entry(reason.to_string()).or_default() += 1;
    }
}

/// A dataset as read from disk, before filtering and id remapping.
#[derive(Clone, Debug, Default)]
pub struct RawDataset {
    /// Short name (e.g. "ml-100k", "Beauty").
    pub name: String,
    /// Interactions in file order (the order that breaks timestamp ties).
    pub interactions: Vec<RawInteraction>,
    /// Item metadata by raw item id (may hold items without interactions).
    pub items: HashMap<String, ItemMeta>,
    /// User-written texts in file order.
    pub user_texts: Vec<RawUserText>,
    pub report: LoadReport,
}

/// Supported input formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// RecBole atomic files: `<name>.inter` (+ optional `<name>.item`),
    /// tab-separated with typed headers (`user_id:token ...`), as in
    /// `recbole/dataset_example/ml-100k/`.
    Ml100k,
    /// MovieLens "latest-small" CSVs: `ratings.csv` (+ `movies.csv`, `tags.csv`).
    MlLatestSmall,
    /// Amazon reviews 2014 or 2018: one reviews JSON-lines file (+ one `meta_*`
    /// file), optionally gzipped.
    Amazon,
    /// `interactions.csv` (`user,item,timestamp[,rating][,text]`) + optional
    /// `items.jsonl` (`{"item": .., "text": ..}` or title/description/...).
    Generic,
}

impl Format {
    /// Parses a CLI name: `ml100k` (or `ml-100k`, `recbole`), `ml-latest-small`,
    /// `amazon`, `generic`.
    pub fn parse(s: &str) -> Result<Format> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "ml100k" | "ml-100k" | "recbole" | "atomic" => Format::Ml100k,
            "ml-latest-small" | "mllatestsmall" | "ml-latest" | "movielens-csv" => Format::MlLatestSmall,
            "amazon" => Format::Amazon,
            "generic" => Format::Generic,
            other => bail!("unknown data format '{other}' (expected ml100k, ml-latest-small, amazon or generic)"),
        })
    }

    /// The canonical CLI name.
    pub fn name(&self) -> &'static str {
        match self {
            Format::Ml100k => "ml100k",
            Format::MlLatestSmall => "ml-latest-small",
            Format::Amazon => "amazon",
            Format::Generic => "generic",
        }
    }
}

/// The files of `dir` that [`load`] would read for `format`, in reading order
/// (used for the content hash before any parsing).
pub fn input_files(format: Format, dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        bail!("{}: not a directory", dir.display());
    }
    match format {
        Format::Ml100k => movielens::atomic_files(dir).map(|(i, it)| std::iter::once(i).chain(it).collect()),
        Format::MlLatestSmall => movielens::latest_small_files(dir),
        Format::Amazon => amazon::find_files(dir).map(|(r, m)| std::iter::once(r).chain(m).collect()),
        Format::Generic => generic::find_files(dir).map(|(i, it)| std::iter::once(i).chain(it).collect()),
    }
}

/// Loads `dir` in the given format. Errors name the file and line.
pub fn load(format: Format, dir: &Path) -> Result<RawDataset> {
    if !dir.is_dir() {
        bail!("{}: not a directory", dir.display());
    }
    match format {
        Format::Ml100k => movielens::load_atomic(dir),
        Format::MlLatestSmall => movielens::load_latest_small(dir),
        Format::Amazon => amazon::load_dir(dir),
        Format::Generic => generic::load_dir(dir),
    }
}

/// Finds the first existing file among `names` in `dir`, also trying a `.gz`
/// suffix on each.
pub(crate) fn find_named(dir: &Path, names: &[&str]) -> Option<PathBuf> {
    for n in names {
        for cand in [dir.join(n), dir.join(format!("{n}.gz"))] {
            if cand.is_file() {
                return Some(cand);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests;
