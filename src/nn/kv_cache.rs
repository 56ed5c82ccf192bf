//! The per-layer KV cache of a decoding session (the LLaMA decoder), on the kernels of
//! [`crate::ops::kv_cache`].
//!
//! A cache holds, per layer, keys and values `[R, Hkv, CAP, Dh]` (f32, the attention layout) for
//! `R` rows (batch x beams) and a fixed capacity of `CAP` slots. Every row writes slot `len` at
//! the same time; rows whose prompts are shorter are left-padded, and their `pad[r]` leading
//! slots are masked out. Attention always runs over all `CAP` slots with the causal rule on slot
//! indices (a key at slot j is visible to the query at slot `cur` iff j <= cur and j is not
//! padding), so slots not yet written are never read.

use anyhow::{bail, Result};

use crate::gpu::{DType, Gpu, Tensor};
use crate::ops::attention::{Mask, MaskKind, MaskSpec};
use crate::ops::kv_cache::{decode_meta, gather_rows, kv_reorder};

const OP: &str = "kv_cache";

/// Per-layer key/value caches of one decoding session, plus the per-row padding (on the GPU).
pub struct KvCache {
    /// Per layer: keys and values `[R, Hkv, CAP, Dh]` f32.
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
    /// Leading padding slots per row, i32 `[R]`.
    pub row_pad: Tensor,
    /// Slots written so far (the next write goes to slot `len`).
    pub len: usize,
}

impl KvCache {
    /// Zeroed caches for `layers` layers of `rows` rows.
    pub fn new(gpu: &Gpu, layers: usize, rows: usize, kv_heads: usize, cap: usize, dh: usize) -> Result<KvCache> {
        if rows == 0 || cap == 0 || layers == 0 {
            bail!("{OP}: empty cache (layers {layers}, rows {rows}, capacity {cap})");
        }
        let shape = [rows, kv_heads, cap, dh];
        let mut k = Vec::with_capacity(layers);
        let mut v = Vec::with_capacity(layers);
        for _ in 0..layers {
            k.push(Tensor::zeros(gpu, &shape, DType::F32)?);
            v.push(Tensor::zeros(gpu, &shape, DType::F32)?);
        }
        Ok(KvCache { k, v, row_pad: Tensor::zeros(gpu, &[rows], DType::I32)?, len: 0 })
    }

    pub fn rows(&self) -> usize {
        self.row_pad.shape()[0]
    }
    pub fn capacity(&self) -> usize {
        self.k[0].shape()[2]
    }

    /// New row r continues old row `parents[r]` (u32 `[R']`, on the GPU); R' may differ from R
    /// (e.g. repeating each prompt row once per beam).
    pub fn reorder(&mut self, parents: &Tensor) -> Result<()> {
        if parents.shape() == [self.rows()] {
            // A beam step: copy only the written slots, into one spare buffer swapped through.
            let mut spare = Tensor::empty(self.row_pad.gpu(), self.k[0].shape(), DType::F32)?;
            for t in self.k.iter_mut().chain(self.v.iter_mut()) {
                kv_reorder(&spare, t, parents, self.len, None)?;
                std::mem::swap(t, &mut spare);
            }
        } else {
            for t in self.k.iter_mut().chain(self.v.iter_mut()) {
                *t = gather_rows(t, parents)?;
            }
        }
        self.row_pad = gather_rows(&self.row_pad, parents)?;
        Ok(())
    }

    /// The mask (over all CAP slots) and RoPE positions `[R, 1]` for the step writing slot `len`.
    pub fn step_meta(&self) -> Result<(Mask, Tensor)> {
        let (rows, cap) = (self.rows(), self.capacity());
        if self.len >= cap {
            bail!("{OP}: cache full ({cap} slots); create the session with a larger capacity");
        }
        let (tok, pos) = decode_meta(&self.row_pad, self.len, cap)?;
        // The host spec only carries the dimensions the launcher checks; the per-token data the
        // kernel reads is `tok`, built on the GPU.
        let spec = MaskSpec {
            kind: MaskKind::Causal,
            batch: rows,
            tq: 1,
            tk: cap,
            q_seg: vec![0; rows],
            q_pos: vec![self.len as i32; rows],
            k_seg: vec![0; rows * cap],
            k_pos: (0..rows).flat_map(|_| 0..cap as i32).collect(),
        };
        Ok((Mask { spec, tok }, pos))
    }
}
