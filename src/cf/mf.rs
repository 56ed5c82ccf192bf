//! Matrix factorization with the BPR loss (Rendle et al., UAI 2009), the "MF"
//! row of LETTER's and TokenRec's baseline tables.
//!
//! BPR-MF is LightGCN with zero propagation layers: the score is the inner
//! product of the ego user and item embeddings, trained on (user, positive,
//! sampled negative) triples with -log σ(s⁺ - s⁻) + λ‖E_batch‖². So MF reuses
//! [`LightGcn`]'s trainer, evaluation and embedding export with `layers = 0`
//! (no SpMM is recorded at all).

use anyhow::Result;

use super::lightgcn::{LightGcn, LightGcnConfig};
use crate::data::Prepared;
use crate::gpu::Gpu;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct MfConfig {
    pub d: usize,
    /// λ of the L2 penalty on the batch's embeddings.
    pub l2: f32,
    pub lr: f32,
    pub batch_size: usize,
    pub epochs: usize,
    pub seed: u64,
}

impl Default for MfConfig {
    /// RecBole's BPR defaults: 64-d, lr 1e-3, batch 2048; λ = 1e-4.
    fn default() -> Self {
        MfConfig { d: 64, l2: 1e-4, lr: 1e-3, batch_size: 2048, epochs: 100, seed: 42 }
    }
}

/// A BPR-MF model: a [`LightGcn`] with no propagation layers.
pub fn new(gpu: &Gpu, data: &Prepared, cfg: &MfConfig) -> Result<LightGcn> {
    let c = LightGcnConfig {
        d: cfg.d,
        layers: 0,
        l2: cfg.l2,
        lr: cfg.lr,
        batch_size: cfg.batch_size,
        epochs: cfg.epochs,
        seed: cfg.seed,
    };
    LightGcn::new(gpu, data, c)
}
