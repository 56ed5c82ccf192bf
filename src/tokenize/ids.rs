//! Item identifiers from a trained tokenizer: code tuples, LETTER's Sinkhorn
//! re-assignment of colliding groups, and deterministic disambiguation.
//!
//! Pipeline ([`assign_ids`]):
//! 1. argmin codes at every level for all items (no Sinkhorn);
//! 2. LETTER's collision loop (`generate_indices.py`, letter.spec.md §5): find
//!    the groups of items sharing a full tuple; re-quantize each group as one
//!    batch with Sinkhorn on the last level (levels above stay argmin, so only
//!    the last code changes); repeat up to `rounds` times;
//! 3. disambiguation ([`disambiguate`]): the items of any group still sharing a
//!    tuple get one extra token, 0, 1, 2, ... in increasing item id; all other
//!    items keep `levels` tokens. The result is unique and prefix-free (an
//!    extended identifier's first `levels` tokens are shared only by its own
//!    group, none of which has a `levels`-token identifier).
//!
//! Everything is deterministic for fixed inputs (argmin ties go to the lowest
//! index; Sinkhorn runs a fixed number of deterministic GPU passes; groups are
//! processed in order of their smallest item id).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::gpu::{shape_str, Tensor};
use crate::quant::nearest::pairwise_sqdist;
use crate::quant::sinkhorn::{sinkhorn, SinkhornOpts};

/// Identifiers of all items. `codes[i]` has `levels` tokens, or `levels + 1`
/// when item i needed a disambiguation token (value `< extra_size`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ItemCodes {
    pub levels: usize,
    pub codebook_size: usize,
    /// Largest disambiguation token + 1 (0 when no item has one).
    pub extra_size: usize,
    pub codes: Vec<Vec<u32>>,
}

impl ItemCodes {
    pub fn n_items(&self) -> usize {
        self.codes.len()
    }

    /// Size of a flat token space for the identifiers: level l's code c is
    /// token `l * codebook_size + c` (each level its own namespace, like
    /// LETTER's `<a_c>`, `<b_c>`, ...), the disambiguation token k is
    /// `levels * codebook_size + k`.
    pub fn vocab_size(&self) -> usize {
        self.levels * self.codebook_size + self.extra_size
    }

    /// Item `item`'s identifier as flat tokens (see [`ItemCodes::vocab_size`]).
    pub fn tokens(&self, item: usize) -> Vec<u32> {
        self.codes[item].iter().enumerate().map(|(l, &c)| (l * self.codebook_size) as u32 + c).collect()
    }

    /// Whether every identifier is distinct.
    pub fn is_unique(&self) -> bool {
        collision_rate(&self.codes) == 0.0
    }

    /// Err unless every identifier has `levels` codes `< codebook_size`,
    /// optionally followed by one token `< extra_size`.
    pub fn validate(&self, what: &str) -> Result<()> {
        for (i, c) in self.codes.iter().enumerate() {
            if c.len() != self.levels && c.len() != self.levels + 1 {
                bail!("{what}: item {i} has {} codes, expected {} or {}", c.len(), self.levels, self.levels + 1);
            }
            if let Some((l, &v)) =
                c.iter().take(self.levels).enumerate().find(|(_, &v)| v as usize >= self.codebook_size)
            {
                bail!("{what}: item {i} level {l} code {v} >= codebook size {}", self.codebook_size);
            }
            if c.len() > self.levels && c[self.levels] as usize >= self.extra_size {
                bail!("{what}: item {i} extra token {} >= extra_size {}", c[self.levels], self.extra_size);
            }
        }
        Ok(())
    }

    /// Write as JSON (atomic: temp file + rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::io::atomic_write(path, |w| {
            serde_json::to_writer(&mut *w, self)?;
            Ok(())
        })
        .with_context(|| format!("writing item codes {}", path.display()))
    }

    /// Read a file written by [`ItemCodes::save`] and validate it.
    pub fn load(path: &Path) -> Result<ItemCodes> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading item codes {}", path.display()))?;
        let c: ItemCodes =
            serde_json::from_str(&text).with_context(|| format!("parsing item codes {}", path.display()))?;
        c.validate(&format!("item codes {}", path.display()))?;
        Ok(c)
    }
}

/// `(#items - #distinct identifiers) / #items` (LETTER's collision rate; 0
/// for no items).
pub fn collision_rate(codes: &[Vec<u32>]) -> f64 {
    if codes.is_empty() {
        return 0.0;
    }
    let distinct: std::collections::HashSet<&Vec<u32>> = codes.iter().collect();
    (codes.len() - distinct.len()) as f64 / codes.len() as f64
}

/// Groups (size >= 2) of items sharing an identifier; items ascending inside
/// a group, groups ordered by their first item.
pub fn collision_groups(codes: &[Vec<u32>]) -> Vec<Vec<usize>> {
    let mut by: HashMap<&Vec<u32>, Vec<usize>> = HashMap::new();
    for (i, c) in codes.iter().enumerate() {
        by.entry(c).or_default().push(i);
    }
    let mut g: Vec<Vec<usize>> = by.into_values().filter(|v| v.len() > 1).collect();
    g.sort_by_key(|v| v[0]);
    g
}

/// LETTER's collision loop on the last level: up to `rounds` times, every
/// group of items sharing a full tuple is re-assigned with Sinkhorn over its
/// own last-level residuals (`last_res: [M, d]` host, row-major) against
/// `last_codebook: [N, d]`. Only the last code of each item changes. Returns
/// the number of rounds run.
pub fn resolve_collisions(
    codes: &mut [Vec<u32>],
    last_res: &[f32],
    d: usize,
    last_codebook: &Tensor,
    rounds: usize,
    sk: SinkhornOpts,
) -> Result<usize> {
    const OP: &str = "resolve_collisions";
    let m = codes.len();
    if last_res.len() != m * d {
        bail!("{OP}: residuals hold {} values, expected [{m}, {d}]", last_res.len());
    }
    if last_codebook.rank() != 2 || last_codebook.shape()[1] != d {
        bail!("{OP}: last codebook {} does not have width {d}", shape_str(last_codebook.shape()));
    }
    let gpu = last_codebook.gpu();
    let mut run = 0;
    while run < rounds {
        let groups = collision_groups(codes);
        if groups.is_empty() {
            break;
        }
        for g in groups {
            let rows: Vec<f32> = g.iter().flat_map(|&i| last_res[i * d..(i + 1) * d].iter().cloned()).collect();
            let r = Tensor::from_f32(gpu, &rows, &[g.len(), d])?;
            let a = sinkhorn(&pairwise_sqdist(&r, last_codebook)?, sk, false)?.assign.to_vec_u32()?;
            for (&i, &c) in g.iter().zip(&a) {
                let last = codes[i].len() - 1;
                codes[i][last] = c;
            }
        }
        run += 1;
    }
    Ok(run)
}

/// Append a disambiguation token to the items of every remaining collision
/// group (0, 1, 2, ... in increasing item id), leaving unique items alone.
pub fn disambiguate(mut codes: Vec<Vec<u32>>, levels: usize, codebook_size: usize) -> ItemCodes {
    let mut extra = 0;
    for g in collision_groups(&codes) {
        extra = extra.max(g.len());
        for (k, &i) in g.iter().enumerate() {
            codes[i].push(k as u32);
        }
    }
    ItemCodes { levels, codebook_size, extra_size: extra, codes }
}

/// Collision statistics of [`assign_ids`].
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IdStats {
    /// Collision rate of the plain argmin tuples.
    pub collision_rate_argmin: f64,
    /// After LETTER's Sinkhorn re-assignment rounds.
    pub collision_rate_sinkhorn: f64,
    /// Rounds of re-assignment run.
    pub sinkhorn_rounds: usize,
    /// Items that received a disambiguation token.
    pub items_with_extra_token: usize,
    /// Largest group of items sharing a tuple before disambiguation.
    pub max_group: usize,
}

/// Identifiers for all items of `sem: [M, in_dim]` (host, row-major) under a
/// trained model: argmin codes, `rounds` of Sinkhorn re-assignment
/// (0 = TIGER: none), then disambiguation. Processes items in chunks of
/// `chunk` rows.
pub fn assign_ids(
    model: &super::RqVae,
    sem: &[f32],
    rounds: usize,
    sk: SinkhornOpts,
    chunk: usize,
) -> Result<(ItemCodes, IdStats)> {
    let cfg = &model.cfg;
    let gpu = model.codebooks[0].value.gpu().clone();
    let (din, d) = (cfg.in_dim, cfg.e_dim);
    if sem.is_empty() || !sem.len().is_multiple_of(din) {
        bail!("assign_ids: {} values are not rows of the model's input width {din}", sem.len());
    }
    let m = sem.len() / din;
    let chunk = chunk.max(1);
    let mut codes = Vec::with_capacity(m);
    let mut last = Vec::with_capacity(m * d);
    for s in (0..m).step_by(chunk) {
        let rows = chunk.min(m - s);
        let x = Tensor::from_f32(&gpu, &sem[s * din..(s + rows) * din], &[rows, din])?;
        let (c, r) = model.codes(&x)?;
        codes.extend(c);
        last.extend(r.to_vec_f32()?);
    }
    let mut st = IdStats { collision_rate_argmin: collision_rate(&codes), ..Default::default() };
    st.sinkhorn_rounds = resolve_collisions(&mut codes, &last, d, &model.codebooks[cfg.levels - 1].value, rounds, sk)?;
    st.collision_rate_sinkhorn = collision_rate(&codes);
    let groups = collision_groups(&codes);
    st.items_with_extra_token = groups.iter().map(|g| g.len()).sum();
    st.max_group = groups.iter().map(|g| g.len()).max().unwrap_or(1);
    Ok((disambiguate(codes, cfg.levels, cfg.codebook_size), st))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::Gpu;

    #[test]
    fn collision_rate_and_groups_on_a_hand_case() {
        let c = vec![vec![1, 2], vec![3, 4], vec![1, 2], vec![1, 2], vec![3, 4], vec![0, 0]];
        // 6 items, 3 distinct tuples.
        assert_eq!(collision_rate(&c), 0.5);
        assert_eq!(collision_groups(&c), vec![vec![0, 2, 3], vec![1, 4]]);
        let ids = disambiguate(c, 2, 5);
        assert_eq!(
            ids.codes,
            vec![vec![1, 2, 0], vec![3, 4, 0], vec![1, 2, 1], vec![1, 2, 2], vec![3, 4, 1], vec![0, 0]]
        );
        assert_eq!(ids.extra_size, 3);
        assert!(ids.is_unique());
        // Flat tokens: level 0 at 0..5, level 1 at 5..10, extra at 10..13.
        assert_eq!(ids.vocab_size(), 13);
        assert_eq!(ids.tokens(3), vec![1, 7, 12]);
        assert_eq!(ids.tokens(5), vec![0, 5]);
        ids.validate("hand").unwrap();
        // Prefix-free: no identifier is a proper prefix of another.
        for a in &ids.codes {
            for b in &ids.codes {
                assert!(!(a.len() < b.len() && b.starts_with(a)), "{a:?} is a prefix of {b:?}");
            }
        }
    }

    #[test]
    fn sinkhorn_reassignment_spreads_a_colliding_group() {
        let gpu = Gpu::shared().unwrap();
        // Last-level codebook of 3 codes in 2-d: (0,0), (1,0), (0,1). Items 0, 2, 3
        // sit nearest to code 0, so they share the tuple [5, 0]; item 1 has another
        // prefix. With as many codes as group members each Sinkhorn column holds
        // one item, so the plan is the cheapest permutation: item 3 (-0.3, 0) keeps
        // code 0 (its alternatives cost 1.09 / 1.69), item 0 (0.3, 0) takes code 1
        // (0.49), item 2 (0, 0.3) takes code 2 (0.49): total 1.07 against >= 2.27
        // for every other permutation.
        let book = Tensor::from_f32(&gpu, &[0.0, 0.0, 1.0, 0.0, 0.0, 1.0], &[3, 2]).unwrap();
        let res = [0.3f32, 0.0, 0.0, 0.0, 0.0, 0.3, -0.3, 0.0];
        let mut codes = vec![vec![5, 0], vec![4, 0], vec![5, 0], vec![5, 0]];
        assert_eq!(collision_rate(&codes), 0.5);
        let rounds = resolve_collisions(&mut codes, &res, 2, &book, 20, SinkhornOpts::letter()).unwrap();
        assert_eq!(codes, vec![vec![5, 1], vec![4, 0], vec![5, 2], vec![5, 0]]);
        // One round resolved everything; the second found no group.
        assert_eq!(rounds, 1);
        assert_eq!(collision_rate(&codes), 0.0);
        // Zero rounds (TIGER) leaves the collision for disambiguation.
        let mut tiger = vec![vec![5, 0], vec![4, 0], vec![5, 0], vec![5, 0]];
        assert_eq!(resolve_collisions(&mut tiger, &res, 2, &book, 0, SinkhornOpts::letter()).unwrap(), 0);
        let ids = disambiguate(tiger, 2, 3);
        assert_eq!(ids.codes, vec![vec![5, 0, 0], vec![4, 0], vec![5, 0, 1], vec![5, 0, 2]]);
        assert!(ids.is_unique());
    }

    #[test]
    fn save_load_roundtrip_and_bad_file() {
        let dir = crate::io::TestDir::new("tok_ids");
        let ids = disambiguate(vec![vec![1, 2], vec![1, 2], vec![0, 3]], 2, 4);
        let p = dir.path().join("codes.json");
        ids.save(&p).unwrap();
        assert_eq!(ItemCodes::load(&p).unwrap(), ids);
        let bad = ItemCodes { levels: 2, codebook_size: 4, extra_size: 0, codes: vec![vec![1, 9]] };
        bad.save(&p).unwrap();
        let e = ItemCodes::load(&p).unwrap_err().to_string();
        assert!(e.contains("code 9") && e.contains("codes.json"), "{e}");
    }
}
