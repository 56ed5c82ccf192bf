//! Evaluation protocol: Recall@K and NDCG@K by full ranking over all items.
//!
//! Inputs are either a score row per user over all `n_items` items (retrieval
//! systems: TokenRec, SETRec, CF baselines) or a ranked list per user
//! (generative systems return their beams' items). Per user, with ground truth
//! `T` (one item for leave-one-out; all test-period items for the temporal
//! split) and the top-K list `R`:
//!
//! - `Recall@K = |R[..K] ∩ T| / |T|` (RecBole `Recall`; equals HR@K when |T| = 1)
//! - `NDCG@K = Σ_{p < K, R[p] ∈ T} 1/log2(p + 2) / Σ_{p < min(|T|, K)} 1/log2(p + 2)`
//!   (RecBole `NDCG`; the ideal DCG is 1 when |T| = 1)
//!
//! and the reported value is the mean over users, with a percentile bootstrap
//! 95% confidence interval over users (seeded, so reruns give equal numbers).
//!
//! Protocol choices (see [`Protocol`]):
//! - **History masking is off by default.** LETTER/TIGER/TTDS (specs §5-6)
//!   rank the beams of a trie-constrained beam search over *all* items, with
//!   only an invalid-identifier filter, so items the user already saw stay in
//!   the ranking; SETRec's spec mentions no history filter either. TokenRec's
//!   code does mask history (spec §5 step 5: `exclude_history = true`), as
//!   RecBole's full-sort evaluation does. Masked items are removed from the
//!   candidate set, so they never take a rank.
//! - **Ties** in scores are broken by lower item id first, so results are
//!   deterministic. NaN scores are an error.
//! - **Warm / cold subsets** (SETRec): the candidate set is restricted to warm
//!   (seen in training) or cold items (the others get −∞, as in SETRec's code),
//!   the ground truth to the user's targets in that subset, and users with no
//!   such target are left out of that subset's mean.
//! - Ranked lists: repeated items keep their first position; ids out of range
//!   are an error; lists shorter than K simply have fewer hits.

use crate::data::EvalCase;
use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::fmt;

/// Evaluation settings. `Default`: K = {5, 10, 20}, no history masking, 1000
/// bootstrap resamples, seed 2024.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Protocol {
    pub ks: Vec<usize>,
    /// Remove the user's previously seen items (`EvalCase::seen`) from the ranking.
    pub exclude_history: bool,
    /// Bootstrap resamples for the 95% CI (0 = no CI).
    pub bootstrap: usize,
    pub seed: u64,
}

impl Default for Protocol {
    fn default() -> Self {
        Protocol { ks: vec![5, 10, 20], exclude_history: false, bootstrap: 1000, seed: 2024 }
    }
}

/// Which target items (and candidates) a result covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Subset {
    All,
    Warm,
    Cold,
}

impl Subset {
    fn name(&self) -> &'static str {
        match self {
            Subset::All => "all",
            Subset::Warm => "warm",
            Subset::Cold => "cold",
        }
    }
}

/// Recall@K and NDCG@K of one ranked list against `targets`, for each K in
/// `ks` (in order). `ranked` must hold no repeats. Empty `targets` give zeros.
pub fn user_metrics(ranked: &[u32], targets: &[u32], ks: &[usize]) -> (Vec<f64>, Vec<f64>) {
    let mut recall = Vec::with_capacity(ks.len());
    let mut ndcg = Vec::with_capacity(ks.len());
    if targets.is_empty() {
        return (vec![0.0; ks.len()], vec![0.0; ks.len()]);
    }
    for &k in ks {
        let mut hits = 0usize;
        let mut dcg = 0.0f64;
        for (p, item) in ranked.iter().take(k).enumerate() {
            if targets.contains(item) {
                hits += 1;
                dcg += 1.0 / ((p + 2) as f64).log2();
            }
        }
        let idcg: f64 = (0..targets.len().min(k)).map(|p| 1.0 / ((p + 2) as f64).log2()).sum();
        recall.push(hits as f64 / targets.len() as f64);
        ndcg.push(if idcg > 0.0 { dcg / idcg } else { 0.0 });
    }
    (recall, ndcg)
}

/// Score order: higher score first, then lower item id.
fn better(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    b.0.partial_cmp(&a.0).unwrap_or(Ordering::Equal).then(a.1.cmp(&b.1))
}

/// The `k` best items of `scores` (one per item id) among those where
/// `keep(id)` holds: higher score first, ties to the lower id. Errors on NaN.
pub fn top_k(scores: &[f32], k: usize, keep: impl Fn(u32) -> bool) -> Result<Vec<u32>> {
    let mut c: Vec<(f32, u32)> = Vec::with_capacity(scores.len());
    for (i, &s) in scores.iter().enumerate() {
        if s.is_nan() {
            bail!("eval: score of item {i} is NaN");
        }
        if keep(i as u32) {
            c.push((s, i as u32));
        }
    }
    if k == 0 {
        return Ok(Vec::new());
    }
    if c.len() > k {
        c.select_nth_unstable_by(k - 1, better);
        c.truncate(k);
    }
    c.sort_by(better);
    Ok(c.into_iter().map(|x| x.1).collect())
}

/// One metric of one subset: mean over users and bootstrap 95% CI.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricValue {
    /// "Recall@10", "NDCG@5", ...
    pub name: String,
    pub k: usize,
    pub mean: f64,
    pub ci_low: f64,
    pub ci_high: f64,
}

/// Results for one subset (all / warm / cold).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SubsetReport {
    pub subset: Subset,
    /// Users that entered the mean.
    pub users: usize,
    pub metrics: Vec<MetricValue>,
}

impl SubsetReport {
    /// The value named e.g. "Recall@10", if computed.
    pub fn get(&self, name: &str) -> Option<&MetricValue> {
        self.metrics.iter().find(|m| m.name == name)
    }
}

/// A full evaluation result, printable as a table and serializable as JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub protocol: Protocol,
    pub subsets: Vec<SubsetReport>,
}

impl EvalReport {
    /// The report of one subset, if evaluated.
    pub fn subset(&self, s: Subset) -> Option<&SubsetReport> {
        self.subsets.iter().find(|r| r.subset == s)
    }

    /// Mean of e.g. ("ndcg", 10) or ("recall", 5) on all items, if computed.
    pub fn metric(&self, name: &str, k: usize) -> Option<f64> {
        let want = format!("{name}@{k}").to_lowercase();
        self.subset(Subset::All)?.metrics.iter().find(|m| m.name.to_lowercase() == want).map(|m| m.mean)
    }

    /// Pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

impl fmt::Display for EvalReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:<6} {:>6}  {:<10} {:>8}  {:<19}", "subset", "users", "metric", "mean", "95% CI (bootstrap)")?;
        for s in &self.subsets {
            for m in &s.metrics {
                writeln!(
                    f,
                    "{:<6} {:>6}  {:<10} {:>8.4}  [{:.4}, {:.4}]",
                    s.subset.name(),
                    s.users,
                    m.name,
                    m.mean,
                    m.ci_low,
                    m.ci_high
                )?;
            }
        }
        Ok(())
    }
}

/// Accumulates per-user metrics, one case at a time (scores or ranked list),
/// so that callers can score users in batches.
pub struct Evaluator {
    protocol: Protocol,
    n_items: usize,
    warm: Option<Vec<bool>>,
    max_k: usize,
    /// Per subset (All, Warm, Cold): per user, recall[ks] followed by ndcg[ks].
    rows: [Vec<Vec<f64>>; 3],
}

impl Evaluator {
    /// `warm[i]` (length `n_items`) enables the warm and cold subsets.
    pub fn new(protocol: &Protocol, n_items: usize, warm: Option<Vec<bool>>) -> Result<Evaluator> {
        if protocol.ks.is_empty() || protocol.ks.contains(&0) {
            bail!("eval: ks must be non-empty and positive, got {:?}", protocol.ks);
        }
        if let Some(w) = &warm {
            if w.len() != n_items {
                bail!("eval: warm mask has {} entries for {n_items} items", w.len());
            }
        }
        Ok(Evaluator {
            max_k: *protocol.ks.iter().max().unwrap(),
            protocol: protocol.clone(),
            n_items,
            warm,
            rows: [Vec::new(), Vec::new(), Vec::new()],
        })
    }

    fn subsets(&self) -> &'static [Subset] {
        if self.warm.is_some() {
            &[Subset::All, Subset::Warm, Subset::Cold]
        } else {
            &[Subset::All]
        }
    }

    fn in_subset(&self, s: Subset, i: u32) -> bool {
        match (s, &self.warm) {
            (Subset::All, _) | (_, None) => true,
            (Subset::Warm, Some(w)) => w[i as usize],
            (Subset::Cold, Some(w)) => !w[i as usize],
        }
    }

    fn check_case(&self, case: &EvalCase) -> Result<()> {
        if case.targets.is_empty() {
            bail!("eval: user {} has no targets", case.user);
        }
        if let Some(&bad) = case.targets.iter().chain(&case.seen).find(|&&i| i as usize >= self.n_items) {
            bail!("eval: user {} refers to item {bad} but there are {} items", case.user, self.n_items);
        }
        Ok(())
    }

    fn push(&mut self, s: Subset, ranked: &[u32], targets: &[u32]) {
        let (r, n) = user_metrics(ranked, targets, &self.protocol.ks);
        self.rows[s as usize].push(r.into_iter().chain(n).collect());
    }

    /// Adds one user from a score row over all items (`scores.len() == n_items`).
    pub fn add_scores(&mut self, case: &EvalCase, scores: &[f32]) -> Result<()> {
        self.check_case(case)?;
        if scores.len() != self.n_items {
            bail!("eval: user {} has {} scores for {} items", case.user, scores.len(), self.n_items);
        }
        let excl = self.protocol.exclude_history;
        for &s in self.subsets() {
            let gt: Vec<u32> = case.targets.iter().copied().filter(|&i| self.in_subset(s, i)).collect();
            if gt.is_empty() {
                continue;
            }
            let ranked =
                top_k(scores, self.max_k, |i| self.in_subset(s, i) && !(excl && case.seen.binary_search(&i).is_ok()))
                    .map_err(|e| anyhow::anyhow!("{e} (user {})", case.user))?;
            self.push(s, &ranked, &gt);
        }
        Ok(())
    }

    /// Adds one user from a ranked list (best first), as generative systems
    /// produce. Repeats keep their first position.
    pub fn add_ranking(&mut self, case: &EvalCase, ranked: &[u32]) -> Result<()> {
        self.check_case(case)?;
        if let Some(&bad) = ranked.iter().find(|&&i| i as usize >= self.n_items) {
            bail!("eval: user {} ranking holds item {bad} but there are {} items", case.user, self.n_items);
        }
        let excl = self.protocol.exclude_history;
        for &s in self.subsets() {
            let gt: Vec<u32> = case.targets.iter().copied().filter(|&i| self.in_subset(s, i)).collect();
            if gt.is_empty() {
                continue;
            }
            let mut list: Vec<u32> = Vec::with_capacity(self.max_k);
            for &i in ranked {
                if list.len() == self.max_k {
                    break;
                }
                if self.in_subset(s, i) && !(excl && case.seen.binary_search(&i).is_ok()) && !list.contains(&i) {
                    list.push(i);
                }
            }
            self.push(s, &list, &gt);
        }
        Ok(())
    }

    /// Number of users added to the `All` subset so far.
    pub fn users(&self) -> usize {
        self.rows[0].len()
    }

    /// Per-user values of the subset: rows of recall[ks] followed by ndcg[ks].
    pub fn per_user(&self, s: Subset) -> &[Vec<f64>] {
        &self.rows[s as usize]
    }

    /// Means and bootstrap CIs for every subset with at least one user.
    pub fn finish(&self) -> EvalReport {
        let ks = &self.protocol.ks;
        let names: Vec<(String, usize)> = ks
            .iter()
            .map(|&k| (format!("Recall@{k}"), k))
            .chain(ks.iter().map(|&k| (format!("NDCG@{k}"), k)))
            .collect();
        let mut subsets = Vec::new();
        for &s in self.subsets() {
            let rows = &self.rows[s as usize];
            if rows.is_empty() {
                continue;
            }
            let (lo, hi) = bootstrap_ci(rows, self.protocol.bootstrap, self.protocol.seed);
            let n = rows.len() as f64;
            let metrics = names
                .iter()
                .enumerate()
                .map(|(j, (name, k))| MetricValue {
                    name: name.clone(),
                    k: *k,
                    mean: rows.iter().map(|r| r[j]).sum::<f64>() / n,
                    ci_low: lo[j],
                    ci_high: hi[j],
                })
                .collect();
            subsets.push(SubsetReport { subset: s, users: rows.len(), metrics });
        }
        EvalReport { protocol: self.protocol.clone(), subsets }
    }
}

/// Percentile bootstrap (2.5%, 97.5%) of the column means of `rows`, with
/// `b` resamples of users drawn with replacement from a `StdRng` seeded with
/// `seed`. With `b == 0` both bounds equal the mean.
pub fn bootstrap_ci(rows: &[Vec<f64>], b: usize, seed: u64) -> (Vec<f64>, Vec<f64>) {
    let n = rows.len();
    let m = rows.first().map_or(0, |r| r.len());
    let mean: Vec<f64> = (0..m).map(|j| rows.iter().map(|r| r[j]).sum::<f64>() / n.max(1) as f64).collect();
    if b == 0 || n == 0 {
        return (mean.clone(), mean);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut samples: Vec<Vec<f64>> = vec![Vec::with_capacity(b); m];
    let mut acc = vec![0.0f64; m];
    for _ in 0..b {
        acc.iter_mut().for_each(|a| *a = 0.0);
        for _ in 0..n {
            let r = &rows[rng.gen_range(0..n)];
            for j in 0..m {
                acc[j] += r[j];
            }
        }
        for j in 0..m {
            samples[j].push(acc[j] / n as f64);
        }
    }
    let q = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(Ordering::Equal));
        let x = p * (v.len() - 1) as f64;
        let (i, f) = (x.floor() as usize, x - x.floor());
        if i + 1 < v.len() {
            v[i] * (1.0 - f) + v[i + 1] * f
        } else {
            v[i]
        }
    };
    let lo = samples.iter_mut().map(|v| q(v, 0.025)).collect();
    let hi = samples.iter_mut().map(|v| q(v, 0.975)).collect();
    (lo, hi)
}

/// Evaluates a row-major score matrix `[cases.len(), n_items]` (row r scores
/// `cases[r].user`).
pub fn evaluate_scores(
    scores: &[f32],
    n_items: usize,
    cases: &[EvalCase],
    protocol: &Protocol,
    warm: Option<Vec<bool>>,
) -> Result<EvalReport> {
    if scores.len() != cases.len() * n_items {
        bail!("eval: score matrix has {} values, expected {} cases x {n_items} items", scores.len(), cases.len());
    }
    let mut ev = Evaluator::new(protocol, n_items, warm)?;
    for (r, c) in cases.iter().enumerate() {
        ev.add_scores(c, &scores[r * n_items..(r + 1) * n_items])?;
    }
    Ok(ev.finish())
}

/// Evaluates one ranked list per case (best first).
pub fn evaluate_rankings(
    rankings: &[Vec<u32>],
    n_items: usize,
    cases: &[EvalCase],
    protocol: &Protocol,
    warm: Option<Vec<bool>>,
) -> Result<EvalReport> {
    if rankings.len() != cases.len() {
        bail!("eval: {} rankings for {} cases", rankings.len(), cases.len());
    }
    let mut ev = Evaluator::new(protocol, n_items, warm)?;
    for (l, c) in rankings.iter().zip(cases) {
        ev.add_ranking(c, l)?;
    }
    Ok(ev.finish())
}

#[cfg(test)]
mod tests;
