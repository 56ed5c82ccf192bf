//! The generative recommenders, each composed from models, tokenizers and
//! constrained decoding: TIGER and LETTER-TIGER (T5 over semantic IDs), and
//! LETTER-LLM (an LLM with LoRA over identifier tokens, LC-Rec style).

pub mod fit;
pub mod lcrec;
pub mod seq;
pub mod tiger;

use crate::data::EvalCase;
use crate::eval::{EvalReport, Protocol};

/// What the CLI and pipeline need from a trained generative system.
pub trait GenerativeRecommender {
    /// Top-`k` distinct items per case, best first, with their scores (`k <= beams()`).
    fn recommend(&self, cases: &[EvalCase], k: usize) -> anyhow::Result<Vec<Vec<(u32, f32)>>>;
    /// Full-ranking evaluation from the recommendations.
    fn evaluate(&self, cases: &[EvalCase], protocol: &Protocol) -> anyhow::Result<EvalReport>;
    /// Beam width (the most items `recommend` returns).
    fn beams(&self) -> usize;
}

impl GenerativeRecommender for tiger::Tiger {
    fn recommend(&self, cases: &[EvalCase], k: usize) -> anyhow::Result<Vec<Vec<(u32, f32)>>> {
        tiger::Tiger::recommend(self, cases, k)
    }
    fn evaluate(&self, cases: &[EvalCase], protocol: &Protocol) -> anyhow::Result<EvalReport> {
        tiger::Tiger::evaluate(self, cases, protocol)
    }
    fn beams(&self) -> usize {
        self.cfg.beams
    }
}

impl GenerativeRecommender for lcrec::LcRec {
    fn recommend(&self, cases: &[EvalCase], k: usize) -> anyhow::Result<Vec<Vec<(u32, f32)>>> {
        lcrec::LcRec::recommend(self, cases, k)
    }
    fn evaluate(&self, cases: &[EvalCase], protocol: &Protocol) -> anyhow::Result<EvalReport> {
        lcrec::LcRec::evaluate(self, cases, protocol)
    }
    fn beams(&self) -> usize {
        self.cfg.beams
    }
}
