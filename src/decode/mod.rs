//! Constrained generation: a prefix trie over valid item identifiers laid out
//! for the GPU, a trie-masked-logits kernel, and beam search batched over
//! users x beams.
//!
//! Beam search drives any autoregressive model through [`StepModel`]. Rows are
//! `batch * beams`, row `r = b * beams + k` is beam `k` of user `b`.
//!
//! Files: `trie.rs` ([`Trie`]: build + host lookups; [`GpuTrie`]: one packed
//! buffer), `mask.rs` + `shaders/trie_mask.wgsl` (trie-masked log-softmax and
//! its normaliser-only variant), `beam.rs` + `shaders/beam_select.wgsl`
//! (per-user top-k selection, [`beam_search`], [`beam_search_ref`]), `toy.rs`
//! (a tiny GPU [`StepModel`] with a host twin, for tests and benchmarks).
//!
//! Using it from a model (e.g. T5):
//! ```ignore
//! let trie = Trie::new(&item_codes, eos)?;          // item i -> its code tokens
//! let gtrie = trie.to_gpu(&gpu)?;                    // upload once, reuse
//! let opts = BeamOpts::new(users, 20, 10, decoder_start_token);
//! let mut session = /* StepModel prepared for opts.rows() rows */;
//! let hyps = beam_search(&mut session, &gtrie, &opts)?; // [users][<= topk] Hyp { item, score }
//! ```
//! Contract for the model: step `s` (0-based) feeds each row's previous token
//! (`start_token` at step 0; EOS for rows that finished or are empty, whose
//! logits are ignored); `reorder(parents)` is called between steps with global
//! row indices; there are exactly `trie.max_depth() + 1` steps.

use crate::gpu::Tensor;
use anyhow::Result;

/// An autoregressive model beam search can drive one token at a time.
///
/// The model is prepared for a fixed number of rows (`batch * beams`) before
/// search starts (e.g. a T5 session whose encoder output is repeated per beam).
pub trait StepModel {
    /// Size of the vocabulary the logits of [`StepModel::step`] range over.
    fn vocab(&self) -> usize;
    /// Feeds one token per row (`tokens`: u32 `[rows]` on the GPU), appends it
    /// to each row's cached state, and returns the next-token logits
    /// `[rows, vocab]` (f32, on the GPU).
    fn step(&mut self, tokens: &Tensor) -> Result<Tensor>;
    /// Reorders the cached state: new row `r` continues old row `parents[r]`
    /// (`parents`: u32 `[rows]` on the GPU).
    fn reorder(&mut self, parents: &Tensor) -> Result<()>;
}

pub mod beam;
pub mod mask;
pub mod toy;
pub mod trie;

pub use beam::{beam_search, beam_search_ref, BeamOpts, CpuStepModel, Hyp, MAX_BEAMS};
pub use mask::{trie_log_softmax, trie_log_softmax_ref, trie_row_lse, trie_row_lse_ref, ScoreNorm};
pub use trie::{GpuTrie, Trie, NO_ITEM};

/// Every kernel variant of the decode layer (for naga validation).
pub fn kernels() -> Vec<crate::gpu::Kernel> {
    [mask::kernels(), beam::kernels()].concat()
}

/// A random trie over tokens `0..vocab - 1` (EOS = vocab - 1) with uneven
/// depths 1..=max_depth, prefix relations included, up to `n_items` items.
#[cfg(test)]
pub(crate) fn random_trie(seed: u64, vocab: usize, n_items: usize, max_depth: usize) -> Trie {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let eos = (vocab - 1) as u32;
    let alphabet = (vocab - 1).clamp(1, 4);
    let mut items: Vec<Vec<u32>> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..n_items * 4 {
        if items.len() == n_items {
            break;
        }
        let d = rng.gen_range(1..=max_depth);
        // Small per-level alphabets (shifted per level) so prefixes are shared.
        let s: Vec<u32> = (0..d).map(|l| ((rng.gen_range(0..alphabet) + 3 * l) % (vocab - 1)) as u32).collect();
        if seen.insert(s.clone()) {
            items.push(s);
        }
    }
    Trie::new(&items, eos).unwrap()
}
