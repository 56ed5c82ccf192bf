//! Preparation: dedup, iterated k-core, dense ids, chronological sequences,
//! leave-one-out or temporal 8:1:1 split, history truncation, samples.

use super::{ItemMeta, LoadReport, RawDataset, TextKind};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fmt;

/// How interactions are divided into train / validation / test.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum SplitKind {
    /// Per user: last interaction = test, second-to-last = validation, the rest
    /// = training (LETTER, TIGER, TokenRec, TTDS). Users with fewer than 3
    /// interactions (possible only with `kcore < 3`) are training-only.
    LeaveOneOut,
    /// Global chronological split (SETRec, after Wang et al. 2023): all
    /// interactions sorted by (timestamp, input order); the first
    /// `floor(train * N)` are training, the next up to `floor((train + valid) * N)`
    /// validation, the rest test. Items never seen in training are *cold*.
    Temporal { train: f64, valid: f64 },
}

impl SplitKind {
    /// The 8:1:1 temporal split.
    pub const TEMPORAL_811: SplitKind = SplitKind::Temporal { train: 0.8, valid: 0.1 };

    /// Parses `loo` / `leave-one-out` or `temporal` (8:1:1).
    pub fn parse(s: &str) -> Result<SplitKind> {
        Ok(match s {
            "loo" | "leave-one-out" | "leave_one_out" => SplitKind::LeaveOneOut,
            "temporal" | "time" | "8:1:1" => SplitKind::TEMPORAL_811,
            other => bail!("unknown split '{other}' (expected loo or temporal)"),
        })
    }
}

/// Options of [`prepare`]. `Default`: 5-core, leave-one-out, history 20, dedup.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrepareOptions {
    /// Users and items with fewer than `kcore` interactions are removed,
    /// repeatedly, until every remaining user and item has at least `kcore`
    /// (a fixed point). 0 or 1 disables filtering.
    pub kcore: usize,
    pub split: SplitKind,
    /// Model-input histories keep the most recent `max_history` items
    /// (0 = unlimited). Exclusion sets in [`EvalCase::seen`] are never truncated.
    pub max_history: usize,
    /// Keep only the earliest (timestamp, then input order) occurrence of each
    /// (user, item) pair.
    pub dedup: bool,
    /// Drop interactions whose rating is below this value (None = keep all).
    pub min_rating: Option<f32>,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        PrepareOptions { kcore: 5, split: SplitKind::LeaveOneOut, max_history: 20, dedup: true, min_rating: None }
    }
}

/// The split an interaction (or a user text) belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum Split {
    Train = 0,
    Valid = 1,
    Test = 2,
}

impl Split {
    /// From the stored byte.
    pub fn from_u8(b: u8) -> Option<Split> {
        match b {
            0 => Some(Split::Train),
            1 => Some(Split::Valid),
            2 => Some(Split::Test),
            _ => None,
        }
    }
}

/// A user-written text mapped to dense ids, with the split it belongs to
/// (use only `Split::Train` texts as model input to avoid leakage).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UserText {
    pub user: u32,
    pub item: Option<u32>,
    pub timestamp: Option<i64>,
    pub kind: TextKind,
    pub split: Split,
    pub text: String,
}

/// Dataset statistics (printable with `Display`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub users: usize,
    pub items: usize,
    pub interactions: usize,
    /// interactions / (users * items).
    pub density: f64,
    /// Mean number of interactions per user.
    pub mean_seq_len: f64,
    pub max_seq_len: usize,
    pub train_interactions: usize,
    pub valid_interactions: usize,
    pub test_interactions: usize,
    /// Users with at least one validation / test target.
    pub valid_users: usize,
    pub test_users: usize,
    /// Items first seen in validation / test (never in training).
    pub cold_items_valid: usize,
    pub cold_items_test: usize,
    /// Training samples (one per training-sequence position with a non-empty history).
    pub train_samples: usize,
    pub raw_interactions: usize,
    pub duplicates_removed: usize,
    pub below_min_rating_removed: usize,
    pub kcore_removed: usize,
    pub kcore_rounds: usize,
    pub items_without_text: usize,
    pub user_texts: usize,
    pub skipped_user_texts: usize,
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "users                 {}", self.users)?;
        writeln!(f, "items                 {}", self.items)?;
        writeln!(f, "interactions          {}", self.interactions)?;
        writeln!(f, "density               {:.4}%", self.density * 100.0)?;
        writeln!(f, "mean sequence length  {:.2} (max {})", self.mean_seq_len, self.max_seq_len)?;
        writeln!(
            f,
            "train / valid / test  {} / {} / {} interactions",
            self.train_interactions, self.valid_interactions, self.test_interactions
        )?;
        writeln!(f, "valid / test users    {} / {}", self.valid_users, self.test_users)?;
        writeln!(f, "cold items valid/test {} / {}", self.cold_items_valid, self.cold_items_test)?;
        writeln!(f, "training samples      {}", self.train_samples)?;
        writeln!(
            f,
            "raw interactions      {} (duplicates removed {}, below min rating {}, k-core removed {} in {} rounds)",
            self.raw_interactions,
            self.duplicates_removed,
            self.below_min_rating_removed,
            self.kcore_removed,
            self.kcore_rounds
        )?;
        write!(
            f,
            "texts                 {} items without text, {} user texts ({} skipped)",
            self.items_without_text, self.user_texts, self.skipped_user_texts
        )
    }
}

/// A prepared dataset: dense ids, per-user chronological sequences (CSR:
/// user u's interactions are `offsets[u]..offsets[u+1]` of `items`, `times`,
/// `split`), item metadata by dense id, user texts.
#[derive(Clone, Debug, PartialEq)]
pub struct Prepared {
    pub name: String,
    pub options: PrepareOptions,
    /// Raw id of each dense user / item id.
    pub user_ids: Vec<String>,
    pub item_ids: Vec<String>,
    /// [n_users + 1] offsets into the per-interaction arrays.
    pub offsets: Vec<u64>,
    /// [n_interactions] dense item ids, chronological per user.
    pub items: Vec<u32>,
    /// [n_interactions] timestamps.
    pub times: Vec<i64>,
    /// [n_interactions] `Split as u8`; non-decreasing within each user.
    pub split: Vec<u8>,
    /// [n_items] metadata (default when the source had none).
    pub item_meta: Vec<ItemMeta>,
    pub user_texts: Vec<UserText>,
    pub stats: Stats,
    pub load_report: LoadReport,
}

/// One training example: the (truncated, chronological) history before
/// `target` in the user's training sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub user: u32,
    pub history: Vec<u32>,
    pub target: u32,
}

/// One evaluation query for a user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalCase {
    pub user: u32,
    /// Model input: the most recent `max_history` items before the targets,
    /// chronological.
    pub history: Vec<u32>,
    /// Every item the user interacted with before the targets (untruncated,
    /// sorted, unique): the exclusion set when history masking is on.
    pub seen: Vec<u32>,
    /// Ground-truth items (unique, in chronological order). One for
    /// leave-one-out; all of the user's items in the period for temporal.
    pub targets: Vec<u32>,
}

fn truncate_tail(v: &[u32], max: usize) -> Vec<u32> {
    if max == 0 || v.len() <= max {
        v.to_vec()
    } else {
        v[v.len() - max..].to_vec()
    }
}

/// Orders raw ids: numerically when all are integers, else by bytes.
fn sorted_ids(ids: HashSet<&str>) -> Vec<String> {
    let mut v: Vec<&str> = ids.into_iter().collect();
    if v.iter().all(|s| s.parse::<i64>().is_ok()) {
        v.sort_by_key(|s| s.parse::<i64>().unwrap());
    } else {
        v.sort();
    }
    v.into_iter().map(String::from).collect()
}

/// Runs the whole preparation on a raw dataset. Errors when nothing is left
/// after filtering or an option is out of range.
pub fn prepare(raw: &RawDataset, opts: &PrepareOptions) -> Result<Prepared> {
    if let SplitKind::Temporal { train, valid } = opts.split {
        if !(train > 0.0 && valid >= 0.0 && train + valid <= 1.0) {
            bail!("prepare: temporal split fractions train={train} valid={valid} must satisfy 0 < train, 0 <= valid, train + valid <= 1");
        }
    }
    if raw.interactions.is_empty() {
        bail!("prepare: dataset '{}' has no interactions ({})", raw.name, raw.report.files.join(", "));
    }
    let mut stats = Stats { raw_interactions: raw.interactions.len(), ..Default::default() };

    // Intern raw ids (temporary ids in first-appearance order).
    let mut uidx: HashMap<&str, u32> = HashMap::new();
    let mut iidx: HashMap<&str, u32> = HashMap::new();
    let mut uname: Vec<&str> = Vec::new();
    let mut iname: Vec<&str> = Vec::new();
    // (user, item, timestamp, input position)
    let mut rows: Vec<(u32, u32, i64, u32)> = Vec::with_capacity(raw.interactions.len());
    for (pos, r) in raw.interactions.iter().enumerate() {
        if let (Some(min), Some(rating)) = (opts.min_rating, r.rating) {
            if rating < min {
                stats.below_min_rating_removed += 1;
                continue;
            }
        }
        let u = *uidx.entry(&r.user).or_insert_with(|| {
            uname.push(&r.user);
            (uname.len() - 1) as u32
        });
        let i = *iidx.entry(&r.item).or_insert_with(|| {
            iname.push(&r.item);
            (iname.len() - 1) as u32
        });
        rows.push((u, i, r.timestamp, pos as u32));
    }
    // Chronological order with stable ties: (timestamp, input position).
    rows.sort_by_key(|&(_, _, t, p)| (t, p));
    if opts.dedup {
        let mut seen: HashSet<(u32, u32)> = HashSet::with_capacity(rows.len());
        let before = rows.len();
        rows.retain(|&(u, i, _, _)| seen.insert((u, i)));
        stats.duplicates_removed = before - rows.len();
    }

    // Iterated k-core to a fixed point.
    if opts.kcore > 1 {
        loop {
            let mut ucnt = vec![0usize; uname.len()];
            let mut icnt = vec![0usize; iname.len()];
            for &(u, i, _, _) in &rows {
                ucnt[u as usize] += 1;
                icnt[i as usize] += 1;
            }
            let before = rows.len();
            rows.retain(|&(u, i, _, _)| ucnt[u as usize] >= opts.kcore && icnt[i as usize] >= opts.kcore);
            if rows.len() == before {
                break;
            }
            stats.kcore_rounds += 1;
            stats.kcore_removed += before - rows.len();
        }
    }
    if rows.is_empty() {
        bail!(
            "prepare: dataset '{}' is empty after filtering ({} raw interactions, {} duplicates, {} below min rating, {} removed by {}-core)",
            raw.name,
            stats.raw_interactions,
            stats.duplicates_removed,
            stats.below_min_rating_removed,
            stats.kcore_removed,
            opts.kcore
        );
    }

    // Dense ids in raw-id order.
    let user_ids = sorted_ids(rows.iter().map(|r| uname[r.0 as usize]).collect());
    let item_ids = sorted_ids(rows.iter().map(|r| iname[r.1 as usize]).collect());
    let udense: HashMap<&str, u32> = user_ids.iter().enumerate().map(|(d, s)| (s.as_str(), d as u32)).collect();
    let idense: HashMap<&str, u32> = item_ids.iter().enumerate().map(|(d, s)| (s.as_str(), d as u32)).collect();
    let utmp2d: Vec<u32> = uname.iter().map(|s| udense.get(s).copied().unwrap_or(u32::MAX)).collect();
    let itmp2d: Vec<u32> = iname.iter().map(|s| idense.get(s).copied().unwrap_or(u32::MAX)).collect();
    let n_users = user_ids.len();
    let n = rows.len();

    // Split labels, by position in the global chronological order.
    let mut labels = vec![Split::Train as u8; n];
    if let SplitKind::Temporal { train, valid } = opts.split {
        let n_train = ((train * n as f64).floor() as usize).min(n);
        let n_tv = (((train + valid) * n as f64).floor() as usize).clamp(n_train, n);
        for (k, l) in labels.iter_mut().enumerate() {
            *l = if k < n_train {
                Split::Train as u8
            } else if k < n_tv {
                Split::Valid as u8
            } else {
                Split::Test as u8
            };
        }
    }

    // CSR by user; a stable counting sort keeps chronological order.
    let mut counts = vec![0u64; n_users + 1];
    for r in &rows {
        counts[utmp2d[r.0 as usize] as usize + 1] += 1;
    }
    for u in 0..n_users {
        counts[u + 1] += counts[u];
    }
    let offsets = counts.clone();
    let mut fill = counts;
    let mut items = vec![0u32; n];
    let mut times = vec![0i64; n];
    let mut split = vec![0u8; n];
    for (k, r) in rows.iter().enumerate() {
        let u = utmp2d[r.0 as usize] as usize;
        let at = fill[u] as usize;
        fill[u] += 1;
        items[at] = itmp2d[r.1 as usize];
        times[at] = r.2;
        split[at] = labels[k];
    }
    if opts.split == SplitKind::LeaveOneOut {
        for u in 0..n_users {
            let (a, b) = (offsets[u] as usize, offsets[u + 1] as usize);
            if b - a >= 3 {
                split[b - 1] = Split::Test as u8;
                split[b - 2] = Split::Valid as u8;
            }
        }
    }

    // Item metadata by dense id.
    let item_meta: Vec<ItemMeta> = item_ids.iter().map(|id| raw.items.get(id).cloned().unwrap_or_default()).collect();

    // User texts: keep those of surviving users (and items); label each by its
    // interaction's split, else by time, else Test (never leaks into training).
    let mut inter_split: HashMap<(u32, u32), u8> = HashMap::new();
    for u in 0..n_users {
        for k in offsets[u] as usize..offsets[u + 1] as usize {
            inter_split.entry((u as u32, items[k])).or_insert(split[k]);
        }
    }
    let mut user_texts = Vec::new();
    for t in &raw.user_texts {
        let Some(&user) = udense.get(t.user.as_str()) else {
            stats.skipped_user_texts += 1;
            continue;
        };
        let item = match &t.item {
            Some(i) => match idense.get(i.as_str()) {
                Some(&d) => Some(d),
                None => {
                    stats.skipped_user_texts += 1;
                    continue;
                }
            },
            None => None,
        };
        let label = match item.and_then(|i| inter_split.get(&(user, i))) {
            Some(&l) => l,
            None => match t.timestamp {
                Some(ts) => {
                    let (a, b) = (offsets[user as usize] as usize, offsets[user as usize + 1] as usize);
                    // The split of the first interaction at or after ts.
                    (a..b).find(|&k| times[k] >= ts).map(|k| split[k]).unwrap_or(Split::Test as u8)
                }
                None => Split::Test as u8,
            },
        };
        user_texts.push(UserText {
            user,
            item,
            timestamp: t.timestamp,
            kind: t.kind,
            split: Split::from_u8(label).unwrap_or(Split::Test),
            text: t.text.clone(),
        });
    }

    let mut p = Prepared {
        name: raw.name.clone(),
        options: opts.clone(),
        user_ids,
        item_ids,
        offsets,
        items,
        times,
        split,
        item_meta,
        user_texts,
        stats,
        load_report: raw.report.clone(),
    };
    p.stats = p.compute_stats(p.stats.clone());
    Ok(p)
}

impl Prepared {
    /// Number of users (dense ids `0..n_users`).
    pub fn n_users(&self) -> usize {
        self.user_ids.len()
    }

    /// Number of items (dense ids `0..n_items`).
    pub fn n_items(&self) -> usize {
        self.item_ids.len()
    }

    /// The id models may use for padding: `n_items` (never a real item).
    pub fn pad_item(&self) -> u32 {
        self.n_items() as u32
    }

    /// Range of user `u`'s interactions in `items` / `times` / `split`.
    pub fn range(&self, u: usize) -> std::ops::Range<usize> {
        self.offsets[u] as usize..self.offsets[u + 1] as usize
    }

    /// User `u`'s full chronological item sequence (all splits).
    pub fn sequence(&self, u: usize) -> &[u32] {
        &self.items[self.range(u)]
    }

    /// User `u`'s items in `split`, chronological.
    pub fn items_in(&self, u: usize, split: Split) -> Vec<u32> {
        self.range(u).filter(|&k| self.split[k] == split as u8).map(|k| self.items[k]).collect()
    }

    /// User `u`'s training sequence.
    pub fn train_sequence(&self, u: usize) -> Vec<u32> {
        self.items_in(u, Split::Train)
    }

    /// `warm[i]` is true when item i occurs in training.
    pub fn warm_items(&self) -> Vec<bool> {
        let mut w = vec![false; self.n_items()];
        for (k, &i) in self.items.iter().enumerate() {
            if self.split[k] == Split::Train as u8 {
                w[i as usize] = true;
            }
        }
        w
    }

    /// Training samples from every prefix of every training sequence: for
    /// position t >= 1 (t >= 0 with `include_empty_history`, as SETRec's
    /// code does), history = the up-to-`max_history` items before t, target =
    /// item t. Users in user order, positions in order.
    pub fn train_samples(&self, include_empty_history: bool) -> Vec<Sample> {
        let mut out = Vec::new();
        for u in 0..self.n_users() {
            let seq = self.train_sequence(u);
            let start = if include_empty_history { 0 } else { 1 };
            for t in start..seq.len() {
                out.push(Sample {
                    user: u as u32,
                    history: truncate_tail(&seq[..t], self.options.max_history),
                    target: seq[t],
                });
            }
        }
        out
    }

    /// Evaluation queries for `split` (Valid or Test): one per user with at
    /// least one target there. History = everything before the period
    /// (training for Valid; training + validation for Test), truncated to
    /// `max_history` for model input. `Split::Train` gives no cases.
    pub fn eval_cases(&self, split: Split) -> Vec<EvalCase> {
        let mut out = Vec::new();
        if split == Split::Train {
            return out;
        }
        for u in 0..self.n_users() {
            let r = self.range(u);
            let mut hist = Vec::new();
            let mut targets: Vec<u32> = Vec::new();
            for k in r {
                let s = self.split[k];
                if s < split as u8 {
                    hist.push(self.items[k]);
                } else if s == split as u8 && !targets.contains(&self.items[k]) {
                    targets.push(self.items[k]);
                }
            }
            if targets.is_empty() {
                continue;
            }
            let mut seen = hist.clone();
            seen.sort_unstable();
            seen.dedup();
            out.push(EvalCase {
                user: u as u32,
                history: truncate_tail(&hist, self.options.max_history),
                seen,
                targets,
            });
        }
        out
    }

    /// The composed text of item `i` (see [`ItemMeta::text`]).
    pub fn item_text(&self, i: usize) -> String {
        self.item_meta[i].text()
    }

    /// Recomputes the derived statistics, keeping the filtering counters of `base`.
    pub fn compute_stats(&self, base: Stats) -> Stats {
        let (nu, ni, n) = (self.n_users(), self.n_items(), self.items.len());
        let mut s = base;
        s.users = nu;
        s.items = ni;
        s.interactions = n;
        s.density = if nu * ni > 0 { n as f64 / (nu as f64 * ni as f64) } else { 0.0 };
        s.mean_seq_len = if nu > 0 { n as f64 / nu as f64 } else { 0.0 };
        s.max_seq_len = (0..nu).map(|u| self.range(u).len()).max().unwrap_or(0);
        s.train_interactions = self.split.iter().filter(|&&x| x == 0).count();
        s.valid_interactions = self.split.iter().filter(|&&x| x == 1).count();
        s.test_interactions = self.split.iter().filter(|&&x| x == 2).count();
        let users_with = |sp: u8| (0..nu).filter(|&u| self.range(u).any(|k| self.split[k] == sp)).count();
        s.valid_users = users_with(1);
        s.test_users = users_with(2);
        let warm = self.warm_items();
        let cold_in = |sp: u8| {
            let set: HashSet<u32> = self
                .items
                .iter()
                .zip(&self.split)
                .filter(|(i, &x)| x == sp && !warm[**i as usize])
                .map(|(i, _)| *i)
                .collect();
            set.len()
        };
        s.cold_items_valid = cold_in(1);
        s.cold_items_test = cold_in(2);
        s.train_samples = (0..nu).map(|u| self.train_sequence(u).len().saturating_sub(1)).sum();
        s.items_without_text = self.item_meta.iter().filter(|m| m.is_empty()).count();
        s.user_texts = self.user_texts.len();
        s
    }
}
