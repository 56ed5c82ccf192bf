//! Semantic-ID sequences for generative recommenders (TIGER, LETTER-TIGER):
//! the compact token vocabulary, encoder inputs built from a user's history,
//! and the learning-rate schedule.
//!
//! Vocabulary (letter.spec.md §8.11, the compact variant): `pad = 0`,
//! `eos = 1`, then one block of tokens per code level, so the same code value
//! at different levels is a different token (LETTER's `<a_i>`, `<b_i>`, ...).
//! Level `l` code `c` is token `2 + offset[l] + c`. The decoder starts from
//! `pad` (T5's decoder-start token).

use anyhow::{bail, Result};

pub const PAD: u32 = 0;
pub const EOS: u32 = 1;

/// Maps (level, code) pairs to token ids and back.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CodeVocab {
    /// Number of distinct code values at each level (codes are `0..size`).
    pub level_sizes: Vec<usize>,
    /// First token of each level's block.
    offsets: Vec<u32>,
}

impl CodeVocab {
    /// The smallest vocabulary covering `codes` (item -> code per level; items
    /// may have different numbers of levels, e.g. a collision suffix).
    pub fn from_codes(codes: &[Vec<u32>]) -> Result<CodeVocab> {
        if codes.is_empty() {
            bail!("code vocabulary: no items");
        }
        let mut sizes: Vec<usize> = Vec::new();
        for (i, c) in codes.iter().enumerate() {
            if c.is_empty() {
                bail!("code vocabulary: item {i} has an empty identifier");
            }
            for (l, &v) in c.iter().enumerate() {
                if sizes.len() <= l {
                    sizes.push(0);
                }
                sizes[l] = sizes[l].max(v as usize + 1);
            }
        }
        Ok(CodeVocab::with_level_sizes(sizes))
    }

    pub fn with_level_sizes(level_sizes: Vec<usize>) -> CodeVocab {
        let mut offsets = Vec::with_capacity(level_sizes.len());
        let mut next = 2u32;
        for &s in &level_sizes {
            offsets.push(next);
            next += s as u32;
        }
        CodeVocab { level_sizes, offsets }
    }

    /// Total number of tokens, specials included.
    pub fn size(&self) -> usize {
        2 + self.level_sizes.iter().sum::<usize>()
    }

    /// Token of code `code` at `level`.
    pub fn token(&self, level: usize, code: u32) -> Result<u32> {
        match self.level_sizes.get(level) {
            Some(&n) if (code as usize) < n => Ok(self.offsets[level] + code),
            Some(&n) => bail!("code vocabulary: code {code} at level {level} is out of range (level has {n} codes)"),
            None => bail!("code vocabulary: level {level} does not exist ({} levels)", self.level_sizes.len()),
        }
    }

    /// The tokens of one identifier (no EOS).
    pub fn tokens(&self, codes: &[u32]) -> Result<Vec<u32>> {
        codes.iter().enumerate().map(|(l, &c)| self.token(l, c)).collect()
    }

    /// (level, code) of a code token; `None` for specials and out-of-range ids.
    pub fn decode(&self, token: u32) -> Option<(usize, u32)> {
        (0..self.level_sizes.len())
            .rev()
            .find(|&l| token >= self.offsets[l])
            .filter(|&l| ((token - self.offsets[l]) as usize) < self.level_sizes[l])
            .map(|l| (l, token - self.offsets[l]))
    }
}

/// Token sequences of every item (item id -> identifier tokens, no EOS).
pub fn item_token_table(vocab: &CodeVocab, codes: &[Vec<u32>]) -> Result<Vec<Vec<u32>>> {
    codes.iter().map(|c| vocab.tokens(c)).collect()
}

/// Encoder input for a history: the identifiers of its last `max_items`
/// items, oldest first, followed by EOS (no separators, no user token).
pub fn encoder_input(items: &[Vec<u32>], history: &[u32], max_items: usize) -> Result<Vec<u32>> {
    let h = &history[history.len().saturating_sub(max_items)..];
    let mut out = Vec::with_capacity(h.len() * 5 + 1);
    for &i in h {
        match items.get(i as usize) {
            Some(t) => out.extend_from_slice(t),
            None => bail!("history holds item {i} but only {} items have identifiers", items.len()),
        }
    }
    out.push(EOS);
    Ok(out)
}

/// A fixed, seed-independent subset of `n` cases (every k-th; `n = 0` or
/// `n >= len` keeps all): validation on a budget.
pub fn fixed_subset<T: Clone>(cases: Vec<T>, n: usize) -> Vec<T> {
    if n == 0 || cases.len() <= n {
        return cases;
    }
    let stride = cases.len() as f64 / n as f64;
    (0..n).map(|i| cases[(i as f64 * stride) as usize].clone()).collect()
}

/// Learning rate at `step` of `total`: linear warm-up over `warmup` steps,
/// then cosine decay to zero (the LETTER/TIGER code's schedule).
pub fn warmup_cosine(base: f32, step: usize, total: usize, warmup: usize) -> f32 {
    if step < warmup {
        return base * (step + 1) as f32 / warmup as f32;
    }
    let span = total.saturating_sub(warmup).max(1);
    let p = ((step - warmup) as f32 / span as f32).min(1.0);
    base * 0.5 * (1.0 + (std::f32::consts::PI * p).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocab_levels_are_disjoint_blocks() {
        let codes = vec![vec![0, 3, 1], vec![2, 0, 0], vec![1, 1, 0, 1]];
        let v = CodeVocab::from_codes(&codes).unwrap();
        assert_eq!(v.level_sizes, vec![3, 4, 2, 2]);
        assert_eq!(v.size(), 2 + 3 + 4 + 2 + 2);
        assert_eq!(v.tokens(&[0, 3, 1]).unwrap(), vec![2, 5 + 3, 9 + 1]);
        for tok in 2..v.size() as u32 {
            let (l, c) = v.decode(tok).unwrap();
            assert_eq!(v.token(l, c).unwrap(), tok);
        }
        assert_eq!(v.decode(PAD), None);
        assert_eq!(v.decode(EOS), None);
        assert_eq!(v.decode(v.size() as u32), None);
        assert!(v.token(0, 3).is_err());
        assert!(v.token(4, 0).is_err());
        assert!(CodeVocab::from_codes(&[vec![]]).is_err());
    }

    #[test]
    fn encoder_input_keeps_last_items_then_eos() {
        let items = vec![vec![2, 5], vec![3, 6], vec![4, 7, 9]];
        assert_eq!(encoder_input(&items, &[0, 1, 2], 2).unwrap(), vec![3, 6, 4, 7, 9, EOS]);
        assert_eq!(encoder_input(&items, &[], 2).unwrap(), vec![EOS]);
        assert!(encoder_input(&items, &[3], 2).is_err());
    }

    #[test]
    fn fixed_subset_takes_every_kth() {
        let v: Vec<u32> = (0..10).collect();
        assert_eq!(fixed_subset(v.clone(), 0), v);
        assert_eq!(fixed_subset(v.clone(), 10), v);
        assert_eq!(fixed_subset(v.clone(), 4), vec![0, 2, 5, 7]);
        assert_eq!(fixed_subset(v, 1), vec![0]);
    }

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        assert!((warmup_cosine(1.0, 0, 100, 10) - 0.1).abs() < 1e-6);
        assert!((warmup_cosine(1.0, 9, 100, 10) - 1.0).abs() < 1e-6);
        assert!((warmup_cosine(1.0, 10, 100, 10) - 1.0).abs() < 1e-6);
        assert!(warmup_cosine(1.0, 55, 100, 10) < 0.51 && warmup_cosine(1.0, 55, 100, 10) > 0.49);
        assert!(warmup_cosine(1.0, 100, 100, 10).abs() < 1e-6);
    }
}
