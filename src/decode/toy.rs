//! A tiny autoregressive model for testing and benchmarking beam search: its
//! state lives on the GPU and `reorder` gathers it, so a search that reorders
//! wrongly gives different logits.
//!
//! Per row, with `h` a `[V]` state (zeros at the start) and `t` the step:
//! `h = 0.5 * h + table[token]`, `logits = h + pos[min(t, T - 1)]`.
//! [`ToyModel`] runs it on the GPU (`ops::embedding::gather` for the table
//! lookup and the reorder, `ops::elementwise` for the rest); [`ToyModelRef`]
//! is the same computation in f32 on the host (bit-identical logits: scaling
//! by 0.5 and one add per element round the same way on both).

use anyhow::{ensure, Result};
use rand::{Rng, SeedableRng};

use super::beam::CpuStepModel;
use super::StepModel;
use crate::gpu::{DType, Gpu, Tensor};
use crate::ops::{elementwise, embedding};

/// The GPU toy model (see the module doc).
pub struct ToyModel {
    vocab: usize,
    rows: usize,
    table: Tensor,
    pos: Vec<Tensor>,
    h: Tensor,
    t: usize,
}

/// The host twin of [`ToyModel`].
pub struct ToyModelRef {
    vocab: usize,
    rows: usize,
    table: Vec<f32>,
    pos: Vec<Vec<f32>>,
    h: Vec<f32>,
    t: usize,
}

/// A GPU model and its host twin over the same random tables: `vocab` tokens,
/// `rows` rows, `positions` position rows, logits of spread about `scale`.
pub fn toy_pair(
    gpu: &Gpu,
    vocab: usize,
    rows: usize,
    positions: usize,
    scale: f32,
    seed: u64,
) -> Result<(ToyModel, ToyModelRef)> {
    ensure!(vocab >= 1 && rows >= 1 && positions >= 1, "toy_pair: vocab, rows and positions must be >= 1");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let table: Vec<f32> = (0..vocab * vocab).map(|_| rng.gen_range(-scale..scale)).collect();
    let pos: Vec<Vec<f32>> =
        (0..positions).map(|_| (0..vocab).map(|_| rng.gen_range(-scale..scale) * 0.5).collect()).collect();
    let gpu_model = ToyModel {
        vocab,
        rows,
        table: Tensor::from_f32(gpu, &table, &[vocab, vocab])?,
        pos: pos.iter().map(|p| Tensor::from_f32(gpu, p, &[1, vocab])).collect::<Result<_>>()?,
        h: Tensor::zeros(gpu, &[rows, vocab], DType::F32)?,
        t: 0,
    };
    let cpu_model = ToyModelRef { vocab, rows, table, pos, h: vec![0.0; rows * vocab], t: 0 };
    Ok((gpu_model, cpu_model))
}

impl StepModel for ToyModel {
    fn vocab(&self) -> usize {
        self.vocab
    }
    fn step(&mut self, tokens: &Tensor) -> Result<Tensor> {
        ensure!(tokens.numel() == self.rows, "ToyModel::step: {} tokens for {} rows", tokens.numel(), self.rows);
        let e = embedding::gather(&self.table, tokens)?.reshape(&[self.rows, self.vocab])?;
        self.h = elementwise::add(&elementwise::scale(&self.h, 0.5)?, &e)?;
        let logits = elementwise::add(&self.h, &self.pos[self.t.min(self.pos.len() - 1)])?;
        self.t += 1;
        Ok(logits)
    }
    fn reorder(&mut self, parents: &Tensor) -> Result<()> {
        ensure!(parents.numel() == self.rows, "ToyModel::reorder: {} parents for {} rows", parents.numel(), self.rows);
        self.h = embedding::gather(&self.h, parents)?.reshape(&[self.rows, self.vocab])?;
        Ok(())
    }
}

impl CpuStepModel for ToyModelRef {
    fn vocab(&self) -> usize {
        self.vocab
    }
    fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let v = self.vocab;
        ensure!(tokens.len() == self.rows, "ToyModelRef::step: {} tokens for {} rows", tokens.len(), self.rows);
        let pos = &self.pos[self.t.min(self.pos.len() - 1)];
        let mut logits = vec![0.0; self.rows * v];
        for (r, &tok) in tokens.iter().enumerate() {
            ensure!((tok as usize) < v, "ToyModelRef::step: token {tok} >= vocab {v}");
            for c in 0..v {
                let h = 0.5 * self.h[r * v + c] + self.table[tok as usize * v + c];
                self.h[r * v + c] = h;
                logits[r * v + c] = h + pos[c];
            }
        }
        self.t += 1;
        Ok(logits)
    }
    fn reorder(&mut self, parents: &[u32]) -> Result<()> {
        let v = self.vocab;
        ensure!(parents.len() == self.rows, "ToyModelRef::reorder: {} parents for {} rows", parents.len(), self.rows);
        let old = self.h.clone();
        for (r, &p) in parents.iter().enumerate() {
            ensure!((p as usize) < self.rows, "ToyModelRef::reorder: parent {p} >= rows {}", self.rows);
            self.h[r * v..(r + 1) * v].copy_from_slice(&old[p as usize * v..(p as usize + 1) * v]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_and_host_twins_agree_through_reorders() {
        let g = Gpu::shared().unwrap();
        let (mut m, mut r) = toy_pair(&g, 7, 5, 3, 2.0, 1).unwrap();
        let toks = [3u32, 0, 6, 1, 1];
        let parents = [4u32, 4, 0, 2, 1];
        for step in 0..4 {
            let a = m.step(&Tensor::from_u32(&g, &toks, &[5]).unwrap()).unwrap().to_vec_f32().unwrap();
            let b = r.step(&toks).unwrap();
            assert_eq!(a, b, "step {step}");
            m.reorder(&Tensor::from_u32(&g, &parents, &[5]).unwrap()).unwrap();
            r.reorder(&parents).unwrap();
        }
    }
}
