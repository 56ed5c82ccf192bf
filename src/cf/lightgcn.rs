//! LightGCN (He et al., SIGIR 2020) trained on the GPU.
//!
//! Nodes are users then items; the normalized adjacency
//! Â = D^-1/2 A D^-1/2 of the user-item training graph is a device CSR
//! (`ops::spmm`), so propagation E_{k+1} = Â E_k and its backward are SpMM
//! kernels. Final embeddings are the layer mean (E_0 + ... + E_K) / (K + 1).
//! Loss: BPR on (user, positive, sampled negative) triples, written as a
//! 2-way cross-entropy (-log σ(s⁺ - s⁻) = CE([s⁺, s⁻], 0)), plus λ times the
//! squared norm of the batch's ego embeddings E_0 (as the paper does), /B.
//! General (non-sequential) recommenders are evaluated with the user's
//! training items masked (`Protocol::exclude_history`), as RecBole does.

use std::collections::HashSet;
use std::rc::Rc;

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};

use crate::autograd::{cross_entropy, embedding_csr, CeOptions, Param, Tape, Var};
use crate::data::{EvalCase, Prepared};
use crate::eval::{EvalReport, Evaluator, Protocol};
use crate::gpu::{Gpu, Tensor};
use crate::nn::{normal_init, optim::AdamW};
use crate::ops::adamw::AdamW as AdamWHp;
use crate::ops::embedding::IdCsr;
use crate::ops::spmm::Csr;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LightGcnConfig {
    pub d: usize,
    pub layers: usize,
    /// λ of the L2 penalty on the batch's ego embeddings.
    pub l2: f32,
    pub lr: f32,
    pub batch_size: usize,
    pub epochs: usize,
    pub seed: u64,
}

impl Default for LightGcnConfig {
    /// The paper's settings: 64-d, 3 layers, λ = 1e-4, lr 1e-3, batch 2048.
    fn default() -> Self {
        LightGcnConfig { d: 64, layers: 3, l2: 1e-4, lr: 1e-3, batch_size: 2048, epochs: 100, seed: 42 }
    }
}

pub struct LightGcn {
    pub cfg: LightGcnConfig,
    pub n_users: usize,
    pub n_items: usize,
    gpu: Gpu,
    /// Ego embeddings E_0: [n_users + n_items, d].
    emb: Rc<Param>,
    adj: Csr,
    /// Training items per user (for negative sampling and eval masking).
    train: Vec<HashSet<u32>>,
}

impl LightGcn {
    pub fn new(gpu: &Gpu, data: &Prepared, cfg: LightGcnConfig) -> Result<LightGcn> {
        let (nu, ni) = (data.n_users(), data.n_items());
        if nu == 0 || ni < 2 {
            bail!("lightgcn: need users and at least two items ({nu} users, {ni} items)");
        }
        let train: Vec<HashSet<u32>> = (0..nu).map(|u| data.train_sequence(u).into_iter().collect()).collect();
        let n = nu + ni;
        let mut deg = vec![0f64; n];
        for (u, items) in train.iter().enumerate() {
            deg[u] += items.len() as f64;
            for &i in items {
                deg[nu + i as usize] += 1.0;
            }
        }
        let mut triples = Vec::new();
        for (u, items) in train.iter().enumerate() {
            for &i in items {
                let j = nu + i as usize;
                let w = (1.0 / (deg[u].sqrt() * deg[j].sqrt())) as f32;
                triples.push((u as u32, j as u32, w));
                triples.push((j as u32, u as u32, w));
            }
        }
        if triples.is_empty() {
            bail!("lightgcn: the training split has no interactions");
        }
        // Â is symmetric: one device copy serves the forward and the backward product.
        let adj = Csr::symmetric(gpu, n, &triples)?;
        let emb = Tensor::from_f32(gpu, &normal_init(cfg.seed, n * cfg.d, 0.1), &[n, cfg.d])?;
        Ok(LightGcn { n_users: nu, n_items: ni, gpu: gpu.clone(), emb: Param::new("embedding", emb), adj, train, cfg })
    }

    /// The normalized adjacency Â ([n_users + n_items] square, symmetric).
    pub fn adjacency(&self) -> &Csr {
        &self.adj
    }

    pub fn params(&self) -> Vec<Rc<Param>> {
        vec![self.emb.clone()]
    }

    /// Layer-mean embeddings of all nodes, [n_users + n_items, d].
    fn propagate(&self, tape: &Tape) -> Result<(Var, Var)> {
        let e0 = tape.param(&self.emb);
        let mut e = e0.clone();
        let mut sum = e0.clone();
        for _ in 0..self.cfg.layers {
            e = e.spmm(&self.adj)?;
            sum = sum.add(&e)?;
        }
        Ok((sum.scale(1.0 / (self.cfg.layers + 1) as f32)?, e0))
    }

    /// BPR + L2 loss of one batch of (user, positive item, negative item).
    fn loss(&self, tape: &Tape, triples: &[(u32, u32, u32)]) -> Result<Var> {
        let b = triples.len();
        let nu = self.n_users as u32;
        let (fin, e0) = self.propagate(tape)?;
        let users: Vec<u32> = triples.iter().map(|t| t.0).collect();
        let items: Vec<u32> = triples.iter().flat_map(|t| [nu + t.1, nu + t.2]).collect();
        // Ids are sorted into CSRs on the host once per batch; each serves the
        // backward of both tables it indexes (layer mean and ego embeddings).
        let n = self.n_users + self.n_items;
        let users = IdCsr::from_host(&self.gpu, &users, &[b], n)?;
        let items = IdCsr::from_host(&self.gpu, &items, &[b, 2], n)?;
        let eu = embedding_csr(&fin, &users)?; // [B, d]
        let ei = embedding_csr(&fin, &items)?; // [B, 2, d]
        let scores = eu.rowdot(&ei)?; // [B, 2]: s+, s-
        let zeros = Tensor::from_i32(&self.gpu, &vec![0; b], &[b])?;
        let bpr = cross_entropy(&scores, &zeros, &CeOptions::default())?;
        // λ/B * (||E0_u||² + ||E0_i||² + ||E0_j||²), summed over the batch.
        let ego_u = embedding_csr(&e0, &users)?;
        let ego_i = embedding_csr(&e0, &items)?;
        let reg = ego_u.mul(&ego_u)?.sum_all()?.add(&ego_i.mul(&ego_i)?.sum_all()?)?.scale(self.cfg.l2 / b as f32)?;
        bpr.add(&reg)
    }

    /// Train; `on_epoch(epoch, loss)` may evaluate and return false to stop.
    pub fn fit(&self, mut on_epoch: impl FnMut(usize, f32) -> Result<bool>) -> Result<Vec<f32>> {
        let pairs: Vec<(u32, u32)> =
            self.train.iter().enumerate().flat_map(|(u, s)| s.iter().map(move |&i| (u as u32, i))).collect();
        let mut opt =
            AdamW::new(self.params(), AdamWHp { lr: self.cfg.lr, weight_decay: 0.0, ..Default::default() }, None)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.cfg.seed);
        let mut order: Vec<usize> = (0..pairs.len()).collect();
        let mut history = Vec::new();
        for epoch in 0..self.cfg.epochs {
            use rand::seq::SliceRandom;
            order.shuffle(&mut rng);
            let mut losses = Vec::new();
            for chunk in order.chunks(self.cfg.batch_size) {
                let triples: Vec<(u32, u32, u32)> = chunk
                    .iter()
                    .map(|&k| {
                        let (u, i) = pairs[k];
                        let seen = &self.train[u as usize];
                        // Uniform negative among items the user has not trained on
                        // (a user who has trained on every item gets a seen one).
                        let mut j = rng.gen_range(0..self.n_items as u32);
                        while seen.contains(&j) && seen.len() < self.n_items {
                            j = rng.gen_range(0..self.n_items as u32);
                        }
                        (u, i, j)
                    })
                    .collect();
                let tape = Tape::new();
                let loss = self.loss(&tape, &triples)?;
                tape.backward(&loss)?;
                opt.step()?;
                losses.push(loss.value);
            }
            let mut sum = 0.0;
            for l in &losses {
                sum += l.to_scalar()?;
            }
            let mean = sum / losses.len() as f32;
            if !mean.is_finite() {
                bail!("lightgcn: training diverged at epoch {epoch} (loss {mean})");
            }
            eprintln!("lightgcn epoch {}/{} loss {mean:.4}", epoch + 1, self.cfg.epochs);
            history.push(mean);
            if !on_epoch(epoch, mean)? {
                break;
            }
        }
        Ok(history)
    }

    /// Final user and item embeddings (host copies): ([n_users, d], [n_items, d]).
    pub fn embeddings(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let tape = Tape::no_grad();
        let (fin, _) = self.propagate(&tape)?;
        let all = fin.value.to_vec_f32()?;
        let split = self.n_users * self.cfg.d;
        Ok((all[..split].to_vec(), all[split..].to_vec()))
    }

    /// Full-ranking evaluation (user · item scores); `protocol.exclude_history`
    /// decides whether training items are masked.
    pub fn evaluate(&self, cases: &[EvalCase], protocol: &Protocol) -> Result<EvalReport> {
        let (users, items) = self.embeddings()?;
        let d = self.cfg.d;
        let items_t = Tensor::from_f32(&self.gpu, &items, &[self.n_items, d])?;
        let mut ev = Evaluator::new(protocol, self.n_items, None)?;
        for chunk in cases.chunks(512) {
            let mut rows = Vec::with_capacity(chunk.len() * d);
            for c in chunk {
                rows.extend_from_slice(&users[c.user as usize * d..(c.user as usize + 1) * d]);
            }
            let u = Tensor::from_f32(&self.gpu, &rows, &[chunk.len(), d])?;
            let opts = crate::ops::matmul::MatmulOpts { trans_b: true, ..Default::default() };
            let scores = crate::ops::matmul::matmul(&u, &items_t, &opts)?.to_vec_f32()?;
            for (r, c) in chunk.iter().enumerate() {
                ev.add_scores(c, &scores[r * self.n_items..(r + 1) * self.n_items])?;
            }
        }
        Ok(ev.finish())
    }
}
