//! SASRec (Kang & McAuley, ICDM 2018): self-attentive sequential
//! recommendation, trained on the GPU with genrec's kernels.
//!
//! Architecture as in the widely used PyTorch port (pmixer/SASRec.pytorch):
//! item embedding scaled by sqrt(d) + learned positions, dropout, `blocks` x
//! [Q = LN(x); x = Q + MHA(Q, x, x) (causal, padding masked); x = LN(x);
//! x = x + FFN(x)], final LN. Scores are inner products with the item
//! embeddings. Training uses every position of the (left-padded) training
//! sequence as a sample, with cross-entropy over all items (the "SASRec with
//! CE" variant, which is known to outperform the original sampled-BCE loss).
//! The original sampled-BCE loss is not implemented.

use std::rc::Rc;

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::autograd::{cross_entropy, embedding, CeOptions, Param, Tape, Var};
use crate::data::{EvalCase, Prepared};
use crate::eval::{EvalReport, Evaluator, Protocol};
use crate::gpu::{Gpu, Tensor};
use crate::nn::optim::AdamW;
use crate::nn::{Embedding, LayerNorm, Linear, MultiHeadAttention};
use crate::ops::adamw::AdamW as AdamWHp;
use crate::ops::attention::{Mask, MaskKind, MaskSpec};
use crate::ops::Act;

/// Hyper-parameters (defaults: the SASRec paper's MovieLens settings, with
/// the history length of genrec's prepared data).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SasRecConfig {
    pub d_model: usize,
    pub blocks: usize,
    pub heads: usize,
    /// Maximum sequence length L.
    pub max_len: usize,
    pub dropout: f32,
    pub lr: f32,
    pub weight_decay: f32,
    pub batch_size: usize,
    pub epochs: usize,
    pub seed: u64,
}

impl Default for SasRecConfig {
    fn default() -> Self {
        SasRecConfig {
            d_model: 64,
            blocks: 2,
            heads: 1,
            max_len: 50,
            dropout: 0.2,
            lr: 1e-3,
            weight_decay: 0.0,
            batch_size: 128,
            epochs: 200,
            seed: 42,
        }
    }
}

struct Block {
    ln_attn: LayerNorm,
    attn: MultiHeadAttention,
    ln_ffn: LayerNorm,
    ff1: Linear,
    ff2: Linear,
}

pub struct SasRec {
    pub cfg: SasRecConfig,
    pub n_items: usize,
    gpu: Gpu,
    /// [n_table, d], n_table = n_items rounded up to a multiple of 4 so the
    /// logit matmuls take the fast aligned kernels; rows past n_items are
    /// never targets and are masked out of the softmax. Sequence padding uses
    /// id n_table, which `ops::embedding::gather` maps to a zero row with no
    /// gradient.
    item_emb: Embedding,
    n_table: usize,
    /// [n_table] additive logit mask: 0 for real items, -1e9 for alignment rows.
    logit_mask: Tensor,
    /// [max_len, d]
    pos_emb: Embedding,
    blocks: Vec<Block>,
    ln_final: LayerNorm,
    /// U32 [max_len]: 0..max_len, the position ids (uploaded once).
    positions: Tensor,
}

/// A batch of left-padded sequences: ids [B, L] (pad = n_table) and the
/// attention mask built from them.
struct SeqBatch {
    ids: Tensor,
    mask: Mask,
}

impl SasRec {
    pub fn new(gpu: &Gpu, n_items: usize, cfg: SasRecConfig) -> Result<SasRec> {
        if n_items == 0 || cfg.max_len == 0 || !cfg.d_model.is_multiple_of(cfg.heads) {
            bail!("sasrec: bad configuration ({n_items} items, {cfg:?})");
        }
        let d = cfg.d_model;
        let s = cfg.seed * 1000;
        let n_table = n_items.div_ceil(4) * 4;
        let mask: Vec<f32> = (0..n_table).map(|i| if i < n_items { 0.0 } else { -1e9 }).collect();
        let mut blocks = Vec::new();
        for i in 0..cfg.blocks {
            let n = format!("blocks.{i}");
            let k = s + 100 * (i as u64 + 1);
            blocks.push(Block {
                ln_attn: LayerNorm::new(gpu, &format!("{n}.ln_attn"), d, 1e-8)?,
                attn: MultiHeadAttention::new(gpu, &format!("{n}.attn"), d, cfg.heads, cfg.heads, true, k)?,
                ln_ffn: LayerNorm::new(gpu, &format!("{n}.ln_ffn"), d, 1e-8)?,
                ff1: Linear::new(gpu, &format!("{n}.ff1"), d, d, true, Act::Relu, k + 10)?,
                ff2: Linear::new(gpu, &format!("{n}.ff2"), d, d, true, Act::None, k + 11)?,
            });
        }
        Ok(SasRec {
            n_items,
            gpu: gpu.clone(),
            item_emb: Embedding::new(gpu, "item_emb", n_table, d, 0.05, s + 1)?,
            n_table,
            logit_mask: Tensor::from_f32(gpu, &mask, &[n_table])?,
            pos_emb: Embedding::new(gpu, "pos_emb", cfg.max_len, d, 0.05, s + 2)?,
            blocks,
            ln_final: LayerNorm::new(gpu, "ln_final", d, 1e-8)?,
            positions: Tensor::from_u32(gpu, &(0..cfg.max_len as u32).collect::<Vec<_>>(), &[cfg.max_len])?,
            cfg,
        })
    }

    pub fn params(&self) -> Vec<Rc<Param>> {
        let mut v = vec![self.item_emb.weight.clone(), self.pos_emb.weight.clone()];
        for b in &self.blocks {
            v.extend(b.ln_attn.params());
            v.extend(b.attn.params());
            v.extend(b.ln_ffn.params());
            v.extend(b.ff1.params());
            v.extend(b.ff2.params());
        }
        v.extend(self.ln_final.params());
        v
    }

    /// Left-pad (or keep the last L of) each sequence.
    fn batch(&self, seqs: &[&[u32]]) -> Result<SeqBatch> {
        let l = self.cfg.max_len;
        let pad = self.n_table as u32;
        let mut ids = Vec::with_capacity(seqs.len() * l);
        let mut seg = Vec::with_capacity(seqs.len());
        for s in seqs {
            let s = &s[s.len().saturating_sub(l)..];
            let n_pad = l - s.len();
            ids.extend(std::iter::repeat_n(pad, n_pad));
            ids.extend_from_slice(s);
            let mut row = vec![-1i32; n_pad];
            row.extend(std::iter::repeat_n(0, s.len()));
            seg.push(row);
        }
        let mask = MaskSpec::from_sequence(MaskKind::Causal, &seg, l)?.upload(&self.gpu)?;
        Ok(SeqBatch { ids: Tensor::from_u32(&self.gpu, &ids, &[seqs.len(), l])?, mask })
    }

    /// Hidden states [B, L, d].
    fn encode(&self, tape: &Tape, batch: &SeqBatch, dropout_seed: u32) -> Result<Var> {
        let d = self.cfg.d_model;
        let p = if tape.grad_enabled() { self.cfg.dropout } else { 0.0 };
        let x = self.item_emb.forward(tape, &batch.ids)?.scale((d as f32).sqrt())?;
        let pos = self.pos_emb.forward(tape, &self.positions)?;
        let mut x = x.add(&pos)?.dropout(p, dropout_seed, 0)?;
        for (i, blk) in self.blocks.iter().enumerate() {
            let q = blk.ln_attn.forward(tape, &x)?;
            let a = blk.attn.forward(tape, &q, &x, &batch.mask)?.dropout(p, dropout_seed, 1 + 3 * i as u32)?;
            x = q.add(&a)?;
            x = blk.ln_ffn.forward(tape, &x)?;
            let h = blk.ff1.forward(tape, &x)?.dropout(p, dropout_seed, 2 + 3 * i as u32)?;
            let h = blk.ff2.forward(tape, &h)?.dropout(p, dropout_seed, 3 + 3 * i as u32)?;
            x = x.add(&h)?;
        }
        self.ln_final.forward(tape, &x)
    }

    /// Scores over the item table for hidden rows [N, d] -> [N, n_table].
    fn logits(&self, tape: &Tape, h: &Var) -> Result<Var> {
        h.matmul(&tape.param(&self.item_emb.weight), false, true)
    }

    /// Mean next-item cross-entropy over every non-padded position.
    fn loss(&self, tape: &Tape, seqs: &[&[u32]], step_seed: u32) -> Result<Var> {
        let l = self.cfg.max_len;
        // Inputs: seq[..n-1]; targets: seq[1..], aligned to the right.
        let inputs: Vec<&[u32]> = seqs.iter().map(|s| &s[..s.len() - 1]).collect();
        let batch = self.batch(&inputs)?;
        let mut targets = Vec::with_capacity(seqs.len() * l);
        for s in seqs {
            let t = &s[1..];
            let t = &t[t.len().saturating_sub(l)..];
            targets.extend(std::iter::repeat_n(-100i32, l - t.len()));
            targets.extend(t.iter().map(|&i| i as i32));
        }
        let targets = Tensor::from_i32(&self.gpu, &targets, &[seqs.len() * l])?;
        let h = self.encode(tape, &batch, step_seed)?.reshape(&[seqs.len() * l, self.cfg.d_model])?;
        let logits = self.logits(tape, &h)?;
        cross_entropy(&logits, &targets, &CeOptions { mask: Some(self.logit_mask.clone()), ..Default::default() })
    }

    /// Train on every user's training sequence; prints progress. Returns the
    /// mean loss of each epoch. `on_epoch(epoch, model)` may evaluate and
    /// return false to stop early.
    pub fn fit(&self, data: &Prepared, mut on_epoch: impl FnMut(usize, f32) -> Result<bool>) -> Result<Vec<f32>> {
        // Every training position is a target once per epoch: sequences longer
        // than max_len + 1 are cut into windows of max_len + 1 that overlap by one.
        let l = self.cfg.max_len;
        let mut seqs: Vec<Vec<u32>> = Vec::new();
        for u in 0..data.n_users() {
            let s = data.train_sequence(u);
            let mut end = s.len();
            while end >= 2 {
                let start = end.saturating_sub(l + 1);
                seqs.push(s[start..end].to_vec());
                if start == 0 {
                    break;
                }
                end = start + 1;
            }
        }
        if seqs.is_empty() {
            bail!("sasrec: no user has two or more training interactions");
        }
        let mut opt = AdamW::new(
            self.params(),
            AdamWHp { lr: self.cfg.lr, beta1: 0.9, beta2: 0.98, eps: 1e-8, weight_decay: self.cfg.weight_decay },
            Some(5.0),
        )?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.cfg.seed);
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        let steps_per_epoch = seqs.len().div_ceil(self.cfg.batch_size);
        let bar = ProgressBar::new((self.cfg.epochs * steps_per_epoch) as u64);
        bar.set_style(
            ProgressStyle::with_template("sasrec {bar:30} {pos}/{len} steps {per_sec} eta {eta} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let mut history = Vec::new();
        let mut step = 0u32;
        for epoch in 0..self.cfg.epochs {
            order.shuffle(&mut rng);
            let mut losses = Vec::new();
            for chunk in order.chunks(self.cfg.batch_size) {
                let batch: Vec<&[u32]> = chunk.iter().map(|&i| seqs[i].as_slice()).collect();
                let tape = Tape::new();
                let loss =
                    self.loss(&tape, &batch, step.wrapping_mul(2654435761).wrapping_add(self.cfg.seed as u32))?;
                tape.backward(&loss)?;
                opt.step()?;
                losses.push(loss.value);
                step += 1;
                bar.inc(1);
            }
            // One readback per epoch.
            let mut sum = 0.0;
            for l in &losses {
                sum += l.to_scalar()?;
            }
            let mean = sum / losses.len() as f32;
            if !mean.is_finite() {
                bar.abandon();
                bail!("sasrec: training diverged at epoch {epoch} (loss {mean})");
            }
            bar.set_message(format!("loss {mean:.4}"));
            if bar.is_hidden() {
                // No terminal: one line per epoch instead of a bar.
                eprintln!(
                    "sasrec epoch {}/{} loss {mean:.4} ({:.1} steps/s)",
                    epoch + 1,
                    self.cfg.epochs,
                    bar.position() as f64 / bar.elapsed().as_secs_f64()
                );
            }
            history.push(mean);
            if !on_epoch(epoch, mean)? {
                break;
            }
        }
        bar.finish();
        Ok(history)
    }

    /// Scores over all `n_items` items for each case's history, [cases, n_items].
    pub fn score(&self, cases: &[EvalCase]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(cases.len() * self.n_items);
        let (l, d) = (self.cfg.max_len, self.cfg.d_model);
        for chunk in cases.chunks(256) {
            let seqs: Vec<&[u32]> = chunk.iter().map(|c| c.history.as_slice()).collect();
            if seqs.iter().any(|s| s.is_empty()) {
                bail!("sasrec: a user has an empty history; nothing to score from");
            }
            let tape = Tape::no_grad();
            let batch = self.batch(&seqs)?;
            let h = self.encode(&tape, &batch, 0)?.reshape(&[chunk.len() * l, d])?;
            let last: Vec<u32> = (0..chunk.len() as u32).map(|b| b * l as u32 + l as u32 - 1).collect();
            let h_last = embedding(&h, &Tensor::from_u32(&self.gpu, &last, &[chunk.len()])?)?;
            let scores = self.logits(&tape, &h_last)?.value.to_vec_f32()?;
            for row in scores.chunks(self.n_table) {
                out.extend_from_slice(&row[..self.n_items]);
            }
        }
        Ok(out)
    }

    /// The learned item embeddings, [n_items, d_model] row-major (row i =
    /// internal item id i; the alignment rows are dropped). LETTER's
    /// collaborative signal (letter.spec.md §2.1).
    pub fn item_embeddings(&self) -> Result<Vec<f32>> {
        let all = self.item_emb.weight.value.to_vec_f32()?;
        Ok(all[..self.n_items * self.cfg.d_model].to_vec())
    }

    /// Full-ranking evaluation of `cases`.
    pub fn evaluate(&self, cases: &[EvalCase], protocol: &Protocol) -> Result<EvalReport> {
        let scores = self.score(cases)?;
        let mut ev = Evaluator::new(protocol, self.n_items, None)?;
        for (r, c) in cases.iter().enumerate() {
            ev.add_scores(c, &scores[r * self.n_items..(r + 1) * self.n_items])?;
        }
        Ok(ev.finish())
    }
}
