//! Constrained generation: a prefix trie over valid item identifiers laid out
//! for the GPU, a trie-masked-logits kernel, and beam search batched over
//! users x beams.
//!
//! Beam search drives any autoregressive model through [`StepModel`]. Rows are
//! `batch * beams`, row `r = b * beams + k` is beam `k` of user `b`.

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
