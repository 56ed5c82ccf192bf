//! TIGER (Rajput et al., NeurIPS 2023) and LETTER-TIGER: a T5 encoder-decoder
//! trained from scratch to map a user's history of item identifiers to the
//! next item's identifier, decoded with trie-constrained beam search.
//!
//! The two systems differ only in their inputs: TIGER uses RQ-VAE semantic
//! IDs and plain cross-entropy (τ = 1); LETTER-TIGER uses LETTER's
//! identifiers and the ranking-guided generation loss, i.e. cross-entropy on
//! logits / τ (letter.spec.md §3.2, τ = 0.7 by default, §8.7). τ only applies
//! in training; beam search scores use the raw logits.
//!
//! Training follows the LETTER code's TIGER recipe (§4, Stage 2a): AdamW with
//! weight decay 0.01, linear warm-up then cosine decay, early stopping on the
//! validation metric (here NDCG@10 by constrained beam search, which is what
//! is finally reported), keeping the best weights. Checkpoints (model, AdamW
//! moments, epoch, best score) are written atomically after every epoch, so
//! an interrupted run resumes where it stopped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::fit::{Progress, RunFiles};
use super::seq::{self, CodeVocab, EOS, PAD};
use crate::autograd::{cross_entropy, CeOptions, Tape};
use crate::data::{EvalCase, Prepared, Split};
use crate::decode::{beam_search, BeamOpts, GpuTrie, ScoreNorm, Trie};
use crate::eval::{EvalReport, Evaluator, Protocol};
use crate::gpu::{Gpu, Tensor};
use crate::io::checkpoint::{self, Expect};
use crate::io::HostTensor;
use crate::models::t5::{T5Batch, T5Config, T5};
use crate::nn::optim::AdamW;
use crate::nn::state;
use crate::ops::adamw::AdamW as AdamWHp;

/// Hyper-parameters of the generative recommender (model + training + decoding).
/// The papers' values and the small budget are in `models/systems.toml` ([`crate::config`]).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TigerConfig {
    pub d_model: usize,
    pub heads: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub enc_layers: usize,
    pub dec_layers: usize,
    pub dropout: f32,
    /// History items fed to the encoder (most recent last).
    pub max_items: usize,
    pub lr: f32,
    pub weight_decay: f32,
    pub batch_size: usize,
    pub epochs: usize,
    /// Fraction of all steps spent warming up.
    pub warmup_frac: f32,
    /// Training temperature of the ranking-guided loss (1 = plain cross-entropy).
    pub tau: f32,
    pub beams: usize,
    /// Validate every this many epochs; stop after `patience` validations without gain.
    pub eval_every: usize,
    pub patience: usize,
    /// Validation users (a fixed subset, to keep validation cheap; 0 = all).
    pub valid_users: usize,
    /// Training examples drawn per epoch (0 = all prefixes).
    pub samples_per_epoch: usize,
    pub seed: u64,
}

impl TigerConfig {
    fn t5(&self, vocab: usize) -> T5Config {
        T5Config {
            d_model: self.d_model,
            heads: self.heads,
            d_kv: self.d_kv,
            d_ff: self.d_ff,
            enc_layers: self.enc_layers,
            dec_layers: self.dec_layers,
            dropout: self.dropout,
            ..T5Config::tiger(vocab)
        }
    }
}

/// What `fit` did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FitSummary {
    pub epochs_run: usize,
    pub steps: u64,
    pub best_epoch: usize,
    pub best_valid_ndcg10: f64,
    pub train_seconds: f64,
    pub samples_per_second: f64,
    /// Mean training loss of each epoch.
    pub losses: Vec<f32>,
}

/// A generative recommender over item identifiers.
pub struct Tiger {
    pub cfg: TigerConfig,
    pub name: String,
    gpu: Gpu,
    model: T5,
    vocab: CodeVocab,
    /// Item id -> identifier tokens (no EOS).
    item_tokens: Vec<Vec<u32>>,
    trie: GpuTrie,
    tokenizer_fingerprint: String,
}

impl Tiger {
    /// A fresh model for items identified by `codes` (item id -> code per
    /// level; identifiers must be unique, as `tokenize` makes them).
    pub fn new(gpu: &Gpu, name: &str, codes: &[Vec<u32>], cfg: TigerConfig) -> Result<Tiger> {
        let vocab = CodeVocab::from_codes(codes)?;
        let item_tokens = seq::item_token_table(&vocab, codes)?;
        let trie = Trie::new(&item_tokens, EOS).with_context(|| format!("{name}: building the identifier trie"))?;
        let trie = GpuTrie::upload(gpu, &trie)?;
        let model = T5::new(gpu, cfg.t5(vocab.size()), cfg.seed)?;
        let tokenizer_fingerprint = checkpoint::fingerprint_json(&codes)?;
        Ok(Tiger {
            cfg,
            name: name.to_string(),
            gpu: gpu.clone(),
            model,
            vocab,
            item_tokens,
            trie,
            tokenizer_fingerprint,
        })
    }

    pub fn vocab(&self) -> &CodeVocab {
        &self.vocab
    }

    pub fn num_params(&self) -> usize {
        self.model.num_params()
    }

    fn encoder_rows(&self, histories: &[&[u32]]) -> Result<Vec<Vec<u32>>> {
        histories.iter().map(|h| seq::encoder_input(&self.item_tokens, h, self.cfg.max_items)).collect()
    }

    /// Mean (τ-scaled) cross-entropy of one batch of (history, next item).
    fn loss(&self, tape: &Tape, histories: &[&[u32]], targets: &[u32], seed: u32) -> Result<crate::autograd::Var> {
        let enc = self.encoder_rows(histories)?;
        let labels: Vec<Vec<u32>> = targets
            .iter()
            .map(|&t| {
                let mut l = self.item_tokens[t as usize].clone();
                l.push(EOS);
                l
            })
            .collect();
        let (batch, tgt) = T5Batch::from_labels(&self.gpu, &self.model.cfg, &enc, &labels)?;
        let logits = self.model.forward(tape, &batch, tape.grad_enabled(), seed)?;
        cross_entropy(&logits, &tgt, &CeOptions { tau: self.cfg.tau, ..Default::default() })
    }

    /// Train on every training prefix of `data`, validating on its validation
    /// split; keeps the best weights. With `ckpt_dir`, resumes from
    /// `<ckpt_dir>/<name>-last.safetensors` when it matches this model, data
    /// and identifiers (otherwise says why and starts over), and writes it
    /// (and `<name>-best.safetensors` on improvement) after every epoch.
    pub fn fit(&mut self, data: &Prepared, ckpt_dir: Option<&Path>) -> Result<FitSummary> {
        let samples: Vec<_> = data.train_samples(false);
        if samples.is_empty() {
            bail!("{}: the dataset has no training examples", self.name);
        }
        let valid = seq::fixed_subset(data.eval_cases(Split::Valid), self.cfg.valid_users);
        let per_epoch =
            if self.cfg.samples_per_epoch == 0 { samples.len() } else { self.cfg.samples_per_epoch.min(samples.len()) };
        let steps_per_epoch = per_epoch.div_ceil(self.cfg.batch_size);
        let total_steps = steps_per_epoch * self.cfg.epochs;
        let warmup = ((total_steps as f32 * self.cfg.warmup_frac).ceil() as usize).max(1);
        let hp = AdamWHp { lr: self.cfg.lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: self.cfg.weight_decay };
        let params = self.model.params();
        let mut opt = AdamW::new(params.clone(), hp, Some(1.0))?;
        let dataset_fp = checkpoint::fingerprint(bytemuck::cast_slice(&data.items));
        let config = serde_json::to_value(&self.cfg)?;
        let paths = ckpt_dir.map(|d| {
            (d.join(format!("{}-last.safetensors", self.name)), d.join(format!("{}-best.safetensors", self.name)))
        });

        let mut prog = match paths.as_ref().filter(|p| p.0.exists()) {
            Some((last, best_path)) => {
                let expect = Expect {
                    dataset_fingerprint: Some(&dataset_fp),
                    tokenizer_fingerprint: Some(&self.tokenizer_fingerprint),
                    config: Some(&config),
                    shapes: None,
                };
                Progress::resume(&self.name, last, best_path, &expect, &params, &mut opt)?
            }
            None => Progress::fresh(),
        };
        let start_epoch = prog.epoch;
        let files = paths.as_ref().map(|(last, best)| RunFiles {
            name: &self.name,
            last: last.clone(),
            best: best.clone(),
            config: &config,
            dataset_fp: &dataset_fp,
            tokenizer_fp: &self.tokenizer_fingerprint,
        });

        let bar = ProgressBar::new(total_steps as u64);
        bar.set_style(
            ProgressStyle::with_template(&format!(
                "{} {{bar:30}} {{pos}}/{{len}} steps {{per_sec}} eta {{eta}} {{msg}}",
                self.name
            ))
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_position((start_epoch * steps_per_epoch) as u64);
        let t0 = std::time::Instant::now();
        let mut trained_samples = 0usize;
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.cfg.seed ^ 0x7196);
        let mut order: Vec<usize> = (0..samples.len()).collect();
        // Replay the shuffles of completed epochs so a resumed run sees the same data.
        for _ in 0..start_epoch {
            order.shuffle(&mut rng);
        }
        let mut bad_checks = 0usize;
        let mut epochs_run = start_epoch;
        for epoch in start_epoch..self.cfg.epochs {
            order.shuffle(&mut rng);
            let mut epoch_losses = Vec::with_capacity(steps_per_epoch);
            for chunk in order[..per_epoch].chunks(self.cfg.batch_size) {
                let step = opt.t as usize;
                opt.set_lr(seq::warmup_cosine(self.cfg.lr, step, total_steps, warmup));
                let hist: Vec<&[u32]> = chunk.iter().map(|&i| samples[i].history.as_slice()).collect();
                let tgt: Vec<u32> = chunk.iter().map(|&i| samples[i].target).collect();
                let tape = Tape::new();
                let seed = (step as u32).wrapping_mul(2654435761).wrapping_add(self.cfg.seed as u32);
                let loss = self.loss(&tape, &hist, &tgt, seed)?;
                tape.backward(&loss)?;
                opt.step()?;
                epoch_losses.push(loss.value);
                trained_samples += chunk.len();
                bar.inc(1);
            }
            let mut sum = 0.0;
            for l in &epoch_losses {
                sum += l.to_scalar()?;
            }
            let mean = sum / epoch_losses.len() as f32;
            epochs_run = epoch + 1;
            if !mean.is_finite() {
                bar.abandon();
                bail!(
                    "{}: training diverged in epoch {} (mean loss {mean}); the last good checkpoint is kept{}",
                    self.name,
                    epoch + 1,
                    paths.as_ref().map(|p| format!(" at {}", p.0.display())).unwrap_or_default()
                );
            }
            prog.losses.push(mean);
            let mut msg = format!("loss {mean:.4}");
            let mut stop = false;
            if (epoch + 1) % self.cfg.eval_every == 0 || epoch + 1 == self.cfg.epochs {
                let quick = Protocol { bootstrap: 0, ks: vec![10], ..Protocol::default() };
                let v = self.evaluate(&valid, &quick)?.metric("ndcg", 10).unwrap_or(0.0);
                msg += &format!(", valid NDCG@10 {v:.4}");
                if prog.record_validation(v, epoch + 1, &params, opt.t as u64, files.as_ref())? {
                    bad_checks = 0;
                } else {
                    bad_checks += 1;
                    stop = bad_checks >= self.cfg.patience;
                }
            }
            bar.set_message(msg.clone());
            if bar.is_hidden() {
                eprintln!("{} epoch {}/{}: {msg}", self.name, epoch + 1, self.cfg.epochs);
            }
            prog.save_last(epoch + 1, &params, &opt, files.as_ref())?;
            if stop {
                break;
            }
        }
        bar.finish();
        if let Some(s) = &prog.best_state {
            state::restore(&format!("{} best weights", self.name), &params, None, s, 0)?;
        }
        let secs = t0.elapsed().as_secs_f64();
        Ok(FitSummary {
            epochs_run,
            steps: opt.t as u64,
            best_epoch: prog.best.1,
            best_valid_ndcg10: prog.best.0.max(0.0),
            train_seconds: secs,
            samples_per_second: trained_samples as f64 / secs.max(1e-9),
            losses: prog.losses,
        })
    }

    /// Loads weights from a checkpoint written by `fit` (checked against this
    /// model's identifiers and shapes).
    pub fn load_weights(&self, path: &Path) -> Result<()> {
        let expect = Expect { tokenizer_fingerprint: Some(&self.tokenizer_fingerprint), ..Default::default() };
        let ck = checkpoint::load(path, &expect)?;
        let params = self.model.params();
        let weights: BTreeMap<String, HostTensor> =
            ck.tensors.into_iter().filter(|(k, _)| !k.starts_with("adamw.")).collect();
        state::restore(&path.display().to_string(), &params, None, &weights, 0)
    }

    /// Top-`k` distinct items per case by trie-constrained beam search
    /// (`k` <= beams), best first, with their summed log-probabilities.
    pub fn recommend(&self, cases: &[EvalCase], k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        let beams = self.cfg.beams;
        if k == 0 || k > beams {
            bail!("{}: asked for top-{k}, but beam search with {beams} beams returns at most {beams}", self.name);
        }
        // Users per search: rows = users * beams.
        let users_per_batch = (2048 / beams).max(1);
        let mut out = Vec::with_capacity(cases.len());
        for chunk in cases.chunks(users_per_batch) {
            let hist: Vec<&[u32]> = chunk.iter().map(|c| c.history.as_slice()).collect();
            let enc = self.encoder_rows(&hist)?;
            let s = enc.iter().map(Vec::len).max().unwrap_or(1);
            let ids: Vec<u32> =
                enc.iter().flat_map(|r| r.iter().copied().chain(std::iter::repeat(PAD)).take(s)).collect();
            let valid: Vec<Vec<bool>> = enc.iter().map(|r| (0..s).map(|j| j < r.len()).collect()).collect();
            let ids = Tensor::from_u32(&self.gpu, &ids, &[chunk.len(), s])?;
            let encoded = self.model.encode(&ids, &valid)?;
            let steps = self.trie.trie().max_depth() + 1;
            let mut session = self.model.decode_session(&encoded, beams, steps)?;
            let opts = BeamOpts { norm: ScoreNorm::FullVocab, ..BeamOpts::new(chunk.len(), beams, k, PAD) };
            let hyps = beam_search(&mut session, &self.trie, &opts)?;
            out.extend(hyps.into_iter().map(|h| h.into_iter().map(|h| (h.item, h.score)).collect()));
        }
        Ok(out)
    }

    /// Full-ranking evaluation: each user's list is the beam search's top
    /// items (as many as the protocol's largest K, at most `beams`).
    pub fn evaluate(&self, cases: &[EvalCase], protocol: &Protocol) -> Result<EvalReport> {
        let n_items = self.item_tokens.len();
        let k = protocol.ks.iter().copied().max().unwrap_or(10).min(self.cfg.beams);
        let recs = self.recommend(cases, k)?;
        let mut ev = Evaluator::new(protocol, n_items, None)?;
        for (c, r) in cases.iter().zip(&recs) {
            let ranked: Vec<u32> = r.iter().map(|x| x.0).collect();
            ev.add_ranking(c, &ranked)?;
        }
        Ok(ev.finish())
    }
}

/// Default checkpoint directory of a system trained on a dataset.
pub fn default_ckpt_dir(dataset: &str) -> Result<PathBuf> {
    Ok(crate::io::fetch::cache_dir()?.join("runs").join(dataset))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cf::{evaluate_popularity, synthetic_cycles};
    use crate::data::{prepare::prepare, PrepareOptions};

    fn tiny() -> TigerConfig {
        TigerConfig {
            d_model: 32,
            heads: 2,
            d_kv: 16,
            d_ff: 64,
            enc_layers: 1,
            dec_layers: 1,
            dropout: 0.0,
            max_items: 3,
            lr: 1e-2,
            batch_size: 64,
            epochs: 24,
            warmup_frac: 0.05,
            beams: 10,
            eval_every: 8,
            patience: 3,
            weight_decay: 0.01,
            tau: 1.0,
            valid_users: 0,
            samples_per_epoch: 0,
            seed: 42,
        }
    }

    /// Items 0..32 with 2-level identifiers [i / 4, i % 4]; one item gets a
    /// third (collision-suffix) level so identifiers have uneven depth.
    fn codes(n: usize) -> Vec<Vec<u32>> {
        let mut c: Vec<Vec<u32>> = (0..n as u32).map(|i| vec![i / 4, i % 4]).collect();
        c[5].push(0);
        c
    }

    #[test]
    fn learns_planted_sequences_beats_popularity_and_resumes() {
        let gpu = Gpu::shared().unwrap();
        let raw = synthetic_cycles(90, 32, 12, 11);
        let data = prepare(&raw, &PrepareOptions { kcore: 0, ..Default::default() }).unwrap();
        let n = data.n_items();
        assert_eq!(n, 32);
        let dir = crate::io::TestDir::new("tiger-fit");
        let mut model = Tiger::new(&gpu, "tiger-test", &codes(n), tiny()).unwrap();
        let fit = model.fit(&data, Some(dir.path())).unwrap();
        assert!(fit.losses.last().unwrap() < &(fit.losses[0] * 0.5), "loss did not fall: {:?}", fit.losses);

        let test = data.eval_cases(Split::Test);
        let protocol = Protocol { bootstrap: 0, ..Default::default() };
        let r = model.evaluate(&test, &protocol).unwrap();
        let pop = evaluate_popularity(&data, &test, &protocol).unwrap();
        let (m, p) = (r.metric("ndcg", 10).unwrap(), pop.metric("ndcg", 10).unwrap());
        // The next item is a function of the last two; random ranking of 32
        // items gives NDCG@10 ~ 0.14.
        eprintln!("synthetic TIGER: NDCG@10 {m:.4} (popularity {p:.4}), losses {:?}", fit.losses);
        assert!(m > 0.5 && m > 2.0 * p, "TIGER NDCG@10 {m} vs popularity {p}");

        // Every recommendation is a valid, distinct item.
        for recs in model.recommend(&test, 10).unwrap() {
            assert_eq!(recs.len(), 10);
            let mut items: Vec<u32> = recs.iter().map(|x| x.0).collect();
            assert!(items.iter().all(|&i| (i as usize) < n));
            assert!(recs.windows(2).all(|w| w[0].1 >= w[1].1), "scores not sorted: {recs:?}");
            items.sort();
            items.dedup();
            assert_eq!(items.len(), 10);
        }

        // A second run with the same configuration resumes from the last
        // checkpoint (nothing left to train) and restores the best weights.
        let mut again = Tiger::new(&gpu, "tiger-test", &codes(n), tiny()).unwrap();
        let fit2 = again.fit(&data, Some(dir.path())).unwrap();
        assert_eq!((fit2.epochs_run, fit2.steps), (fit.epochs_run, fit.steps));
        let r2 = again.evaluate(&test, &protocol).unwrap().metric("ndcg", 10).unwrap();
        assert!((r2 - m).abs() < 1e-9, "resumed model differs: {r2} vs {m}");

        // A checkpoint for other identifiers is refused with a clear message.
        let other = Tiger::new(&gpu, "tiger-test", &codes(n + 4), tiny()).unwrap();
        let e = other.load_weights(&dir.path().join("tiger-test-best.safetensors")).unwrap_err();
        assert!(format!("{e:#}").contains("tokenizer"), "{e:#}");
    }

    #[test]
    fn bad_inputs_are_errors() {
        let gpu = Gpu::shared().unwrap();
        // Duplicate identifiers cannot be decoded unambiguously.
        let dup = vec![vec![0, 1], vec![0, 1]];
        assert!(Tiger::new(&gpu, "t", &dup, tiny()).is_err());
        let m = Tiger::new(&gpu, "t", &codes(8), tiny()).unwrap();
        let case = EvalCase { user: 0, history: vec![1, 2], seen: vec![1, 2], targets: vec![3] };
        assert!(m.recommend(std::slice::from_ref(&case), 11).is_err());
        let bad = EvalCase { history: vec![99], ..case };
        assert!(format!("{:#}", m.recommend(&[bad], 5).unwrap_err()).contains("item 99"));
    }
}
