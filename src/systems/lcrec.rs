//! LETTER-LLM: LC-Rec style generative recommendation on a LLaMA-family LLM
//! (SmolLM2-135M by default) with LoRA, item identifiers added to the LLM's
//! vocabulary as new tokens, an Alpaca-style instruction prompt, and the same
//! trie-constrained beam search as TIGER (letter.spec.md §2.5, §5, §8.9).
//!
//! - **Tokens**: one new LLM token per (level, code) of the identifiers
//!   (`seq::CodeVocab`'s code tokens, the disambiguation level included), so
//!   code-vocab token `t >= 2` is LLM token `base_vocab + t - 2`. Responses end
//!   with the LLM's own EOS token.
//! - **Prompt**: the Alpaca wrapper around one of [`TEMPLATES`] (template 0 at
//!   test time; training draws a template per sample from a seeded hash), the
//!   history rendered as the items' code tokens separated by ", ". Text
//!   segments are tokenized separately and the code tokens spliced in between,
//!   which is what HF tokenizers do around added tokens.
//! - **Training**: LoRA (r 8, α 32, dropout 0.05) on q,k,v,o,gate,up,down,
//!   base frozen (f16 storage), the whole embedding table (and an untied head)
//!   trainable: `Llama::add_tokens` grows one table, so all rows train, not
//!   only the new ones (as LC-Rec's `modules_to_save`). Response-only
//!   cross-entropy (prompt and padding get ignore_index), right padding with
//!   the padding mask, AdamW with warm-up + cosine, early stopping on
//!   validation NDCG@10 from constrained beam search, resumable atomic
//!   checkpoints of the trainable tensors + AdamW moments, a divergence check
//!   (a non-finite loss stops before the update; the last checkpoint stays),
//!   and a PEFT export of the adapters (plus the code-token rows) at the end.
//! - **Decoding**: the trie is built over LLM token ids and beam search
//!   normalises with a log-softmax over the *full* LLM vocabulary
//!   (`ScoreNorm::FullVocab`), i.e. exactly HF `generate` with
//!   `prefix_allowed_tokens_fn`. The price is the full `[rows, V]` head per
//!   step (49k rows for SmolLM2, about a fifth of a decoding step's FLOPs);
//!   the prompt's prefill logits serve as the first step.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::fit::{Progress, RunFiles};
use super::seq::{self, CodeVocab};
use super::tiger::FitSummary;
use crate::autograd::{cross_entropy, CeOptions, Tape, Var};
use crate::data::{EvalCase, Prepared, Split};
use crate::decode::{beam_search, BeamOpts, GpuTrie, ScoreNorm, StepModel, Trie};
use crate::eval::{EvalReport, Evaluator, Protocol};
use crate::gpu::{Gpu, Tensor};
use crate::io::checkpoint::{self, Expect};
use crate::io::HostTensor;
use crate::models::llama::{Llama, LlamaSession};
use crate::nn::lora::LoraConfig;
use crate::nn::optim::AdamW;
use crate::nn::state;
use crate::ops::adamw::AdamW as AdamWHp;

/// The Alpaca wrapper before the instruction (LC-Rec / letter.spec.md §2.5).
pub const WRAPPER_HEAD: &str =
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n";
/// The wrapper between the instruction and the response.
pub const WRAPPER_TAIL: &str = "\n\n### Response:";
/// Separator between the items of a history.
pub const ITEM_SEP: &str = ", ";

/// Sequential-recommendation instructions; `{inters}` is the history. Template
/// 0 is LC-Rec's test-time template (verbatim from the spec); the others
/// paraphrase LC-Rec's training templates (the spec names 17; a few suffice).
pub const TEMPLATES: [&str; 5] = [
    "The user has interacted with items {inters} in chronological order. Can you predict the next possible item that the user may expect?",
    "I find the user's historical interactive items: {inters}, and I want to know what next item the user needs. Can you help me decide?",
    "Here are the user's historical interactions: {inters}, try to recommend another item to the user. Note that the historical interactions are arranged in chronological order.",
    "Based on the items that the user has interacted with: {inters}, can you determine what item would be recommended to him next?",
    "The user has interacted with the following items in order: {inters}. What else do you think the user needs?",
];

/// What the system needs from a text tokenizer (the real LLaMA tokenizer, or a
/// tiny synthetic one in tests).
pub trait PromptTokenizer {
    /// Token ids of `text` (no BOS/EOS added).
    fn encode_text(&self, text: &str) -> Result<Vec<u32>>;
    /// The end-of-sequence token that ends every response.
    fn eos(&self) -> Result<u32>;
    /// Number of ids the tokenizer can produce (must fit the model's embedding).
    fn vocab_size(&self) -> usize;
}

impl PromptTokenizer for crate::models::llama_tokenizer::LlamaTokenizer {
    fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        self.encode(text, false)
    }
    fn eos(&self) -> Result<u32> {
        self.eos_id.context("LLM tokenizer: no EOS token id in its metadata (needed to end responses)")
    }
    fn vocab_size(&self) -> usize {
        crate::models::llama_tokenizer::LlamaTokenizer::vocab_size(self)
    }
}

/// Pre-tokenized prompt pieces: for each template, the ids before and after
/// the history, and the separator between items.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Prompter {
    heads: Vec<Vec<u32>>,
    tails: Vec<Vec<u32>>,
    sep: Vec<u32>,
}

impl Prompter {
    pub fn new(tok: &dyn PromptTokenizer, templates: &[&str]) -> Result<Prompter> {
        if templates.is_empty() {
            bail!("LLM prompt: no instruction templates");
        }
        let (mut heads, mut tails) = (Vec::new(), Vec::new());
        for (i, t) in templates.iter().enumerate() {
            let Some((a, b)) = t.split_once("{inters}") else {
                bail!("LLM prompt: template {i} {t:?} has no {{inters}} placeholder");
            };
            heads.push(tok.encode_text(&format!("{WRAPPER_HEAD}{a}"))?);
            tails.push(tok.encode_text(&format!("{b}{WRAPPER_TAIL}"))?);
        }
        Ok(Prompter { heads, tails, sep: tok.encode_text(ITEM_SEP)? })
    }

    pub fn templates(&self) -> usize {
        self.heads.len()
    }

    /// Prompt ids of template `t` with `items` (each an identifier's LLM token ids) as history.
    pub fn prompt(&self, t: usize, items: &[&[u32]]) -> Result<Vec<u32>> {
        if t >= self.heads.len() {
            bail!("LLM prompt: template {t} does not exist ({} templates)", self.heads.len());
        }
        let mut out = self.heads[t].clone();
        for (i, it) in items.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(&self.sep);
            }
            out.extend_from_slice(it);
        }
        out.extend_from_slice(&self.tails[t]);
        Ok(out)
    }
}

/// Hyper-parameters of LETTER-LLM. The paper's values and the small budget are in
/// `models/systems.toml` ([`crate::config`], stage `llm`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LcRecConfig {
    pub lora_r: usize,
    pub lora_alpha: f32,
    pub lora_dropout: f32,
    /// Store the frozen projection weights as f16.
    pub f16_base: bool,
    /// Train every weight instead of LoRA adapters (for randomly initialised
    /// test models, which have no pretrained base worth freezing).
    #[serde(default)]
    pub full_finetune: bool,
    /// History items in the prompt (most recent last).
    pub max_items: usize,
    pub lr: f32,
    pub weight_decay: f32,
    pub batch_size: usize,
    pub epochs: usize,
    pub warmup_frac: f32,
    /// Training temperature of the ranking-guided loss (LETTER; 1 = plain CE).
    pub tau: f32,
    pub beams: usize,
    /// Rows (users x beams) per beam-search batch.
    pub decode_rows: usize,
    /// Instruction templates drawn from in training (1..=TEMPLATES.len()).
    pub train_templates: usize,
    pub eval_every: usize,
    pub patience: usize,
    /// Validation users (a fixed subset; 0 = all).
    pub valid_users: usize,
    /// Training examples per epoch (0 = all prefixes).
    pub samples_per_epoch: usize,
    pub seed: u64,
}

impl LcRecConfig {
    fn lora(&self) -> Result<LoraConfig> {
        LoraConfig::new(self.lora_r, self.lora_alpha, self.lora_dropout, &["q", "k", "v", "o", "gate", "up", "down"])
    }
}

/// The first step's logits come from the prompt prefill; later steps run the session.
struct PrefilledSession<'m> {
    inner: LlamaSession<'m>,
    first: Option<Tensor>,
}

impl StepModel for PrefilledSession<'_> {
    fn vocab(&self) -> usize {
        self.inner.vocab()
    }
    fn step(&mut self, tokens: &Tensor) -> Result<Tensor> {
        match self.first.take() {
            // Step 0 feeds the start token; the prompt's last position already predicted it.
            Some(l) => Ok(l),
            None => self.inner.step(tokens),
        }
    }
    fn reorder(&mut self, parents: &Tensor) -> Result<()> {
        self.inner.reorder(parents)
    }
}

/// One training batch: ids `[B, T]` (right-padded), validity, and targets `[B*T]`.
#[derive(Debug)]
pub struct LmBatch {
    pub ids: Vec<u32>,
    pub valid: Vec<Vec<bool>>,
    /// Next-token target per position; `-100` on prompt, padding and the last position.
    pub targets: Vec<i32>,
    pub b: usize,
    pub t: usize,
}

/// LETTER-LLM: an LLM with LoRA that generates item identifiers.
pub struct LcRec {
    pub cfg: LcRecConfig,
    pub name: String,
    gpu: Gpu,
    model: Llama,
    lora: LoraConfig,
    /// LLM vocabulary before the code tokens were added.
    base_vocab: usize,
    eos: u32,
    vocab: CodeVocab,
    /// Item id -> identifier as LLM token ids (no EOS).
    item_tokens: Vec<Vec<u32>>,
    trie: GpuTrie,
    prompter: Prompter,
    tokenizer_fingerprint: String,
    /// Identifies the base model, prompt and settings in checkpoints.
    config: serde_json::Value,
}

impl LcRec {
    /// Wraps `model` (a pretrained LLM whose tokenizer is `tok`): adds one token per
    /// (level, code) of `codes` (item id -> codes; unique identifiers), attaches LoRA,
    /// freezes the base and makes the embedding (and an untied head) trainable.
    pub fn new(
        gpu: &Gpu,
        name: &str,
        mut model: Llama,
        tok: &dyn PromptTokenizer,
        codes: &[Vec<u32>],
        cfg: LcRecConfig,
    ) -> Result<LcRec> {
        if cfg.train_templates == 0 || cfg.train_templates > TEMPLATES.len() {
            bail!("{name}: train_templates = {} must be in 1..={}", cfg.train_templates, TEMPLATES.len());
        }
        if cfg.max_items == 0 || cfg.batch_size == 0 || cfg.beams == 0 {
            bail!("{name}: max_items, batch_size and beams must be >= 1");
        }
        let base_vocab = model.cfg.vocab;
        if tok.vocab_size() > base_vocab {
            bail!("{name}: the tokenizer has {} tokens but the LLM only {base_vocab} embedding rows", tok.vocab_size());
        }
        let eos = tok.eos()?;
        if eos as usize >= base_vocab {
            bail!("{name}: EOS id {eos} is outside the LLM's vocabulary ({base_vocab})");
        }
        let vocab = CodeVocab::from_codes(codes)?;
        let n_new = vocab.size() - 2;
        let item_tokens: Vec<Vec<u32>> = seq::item_token_table(&vocab, codes)?
            .into_iter()
            .map(|t| t.into_iter().map(|x| base_vocab as u32 + x - 2).collect())
            .collect();
        let trie = Trie::new(&item_tokens, eos).with_context(|| format!("{name}: building the identifier trie"))?;
        let trie = GpuTrie::upload(gpu, &trie)?;
        let prompter = Prompter::new(tok, &TEMPLATES[..cfg.train_templates.max(1)])?;
        let base_cfg = serde_json::to_value(&model.cfg)?;
        model.add_tokens(n_new, cfg.seed)?;
        let lora = cfg.lora()?;
        if cfg.full_finetune {
            for p in model.named_params().values() {
                p.frozen.set(false);
            }
        } else {
            model.apply_lora(&lora, cfg.f16_base, cfg.seed)?;
            model.embed.frozen.set(false);
            if let Some(h) = &model.lm_head {
                h.frozen.set(false);
            }
        }
        let tokenizer_fingerprint = checkpoint::fingerprint_json(&codes)?;
        let config = serde_json::json!({
            "system": cfg,
            "base_model": base_cfg,
            "prompt": checkpoint::fingerprint_json(&prompter)?,
            "eos": eos,
        });
        Ok(LcRec {
            cfg,
            name: name.to_string(),
            gpu: gpu.clone(),
            model,
            lora,
            base_vocab,
            eos,
            vocab,
            item_tokens,
            trie,
            prompter,
            tokenizer_fingerprint,
            config,
        })
    }

    pub fn vocab(&self) -> &CodeVocab {
        &self.vocab
    }

    /// LLM token ids of item `item`'s identifier.
    pub fn item_tokens(&self, item: u32) -> Option<&[u32]> {
        self.item_tokens.get(item as usize).map(|v| v.as_slice())
    }

    /// Number of tokens added for the identifiers.
    pub fn added_tokens(&self) -> usize {
        self.vocab.size() - 2
    }

    /// Parameters that train (embedding, untied head, adapters) and all parameters.
    pub fn num_params(&self) -> (usize, usize) {
        let all = self.model.named_params();
        let n = |p: &std::rc::Rc<crate::autograd::Param>| p.value.numel();
        (self.model.params().iter().map(n).sum(), all.values().map(n).sum())
    }

    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// The prompt of a history (its last `max_items` items) with template `t`.
    pub fn prompt(&self, history: &[u32], t: usize) -> Result<Vec<u32>> {
        if history.is_empty() {
            bail!("{}: empty history; the prompt needs at least one item", self.name);
        }
        let h = &history[history.len().saturating_sub(self.cfg.max_items)..];
        let mut items = Vec::with_capacity(h.len());
        for &i in h {
            match self.item_tokens.get(i as usize) {
                Some(t) => items.push(t.as_slice()),
                None => bail!(
                    "{}: history holds item {i} but only {} items have identifiers",
                    self.name,
                    self.item_tokens.len()
                ),
            }
        }
        self.prompter.prompt(t, &items)
    }

    /// Right-padded training batch of (history, target, template): the input is
    /// prompt ++ response without its final EOS; the target of position t is token
    /// t + 1 where that token belongs to the response (code tokens + EOS), else -100.
    pub fn batch(&self, examples: &[(&[u32], u32, usize)]) -> Result<LmBatch> {
        let mut rows = Vec::with_capacity(examples.len());
        for &(h, target, t) in examples {
            let mut s = self.prompt(h, t)?;
            let p = s.len();
            let Some(resp) = self.item_tokens.get(target as usize) else {
                bail!("{}: target item {target} has no identifier ({} items)", self.name, self.item_tokens.len());
            };
            s.extend_from_slice(resp);
            s.push(self.eos);
            rows.push((s, p));
        }
        let t = rows.iter().map(|(s, _)| s.len() - 1).max().unwrap_or(1).max(1);
        let b = rows.len();
        let mut ids = vec![self.eos; b * t];
        let mut valid = vec![vec![false; t]; b];
        let mut targets = vec![-100i32; b * t];
        for (r, (s, p)) in rows.iter().enumerate() {
            for j in 0..s.len() - 1 {
                ids[r * t + j] = s[j];
                valid[r][j] = true;
                if j + 1 >= *p {
                    targets[r * t + j] = s[j + 1] as i32;
                }
            }
        }
        Ok(LmBatch { ids, valid, targets, b, t })
    }

    /// Mean (τ-scaled) response-only cross-entropy of a batch.
    fn loss(&self, tape: &Tape, examples: &[(&[u32], u32, usize)]) -> Result<Var> {
        let bt = self.batch(examples)?;
        let ids = Tensor::from_u32(&self.gpu, &bt.ids, &[bt.b, bt.t])?;
        let mask = Llama::padding_mask(&self.gpu, &bt.valid)?;
        // Logits only where a response token is predicted (prompt and padding rows are
        // ignored by the loss anyway): [N, V] instead of [B*T, V].
        let (rows, tgt): (Vec<u32>, Vec<i32>) =
            bt.targets.iter().enumerate().filter(|(_, &y)| y >= 0).map(|(i, &y)| (i as u32, y)).unzip();
        let rows = Tensor::from_u32(&self.gpu, &rows, &[tgt.len()])?;
        let logits = self.model.forward_at(tape, &ids, &mask, None, &rows)?;
        let tgt = Tensor::from_i32(&self.gpu, &tgt, &[rows.numel()])?;
        cross_entropy(&logits, &tgt, &CeOptions { tau: self.cfg.tau, ..Default::default() })
    }

    /// Instruction template of training example `i` in `epoch` (a seeded hash, so
    /// a resumed run draws the same).
    fn template_of(&self, epoch: usize, i: usize) -> usize {
        let mut h = self.cfg.seed ^ 0x9e37_79b9_7f4a_7c15;
        for x in [epoch as u64, i as u64] {
            h = (h ^ x).wrapping_mul(0x100_0000_01b3).rotate_left(29);
        }
        (h % self.cfg.train_templates as u64) as usize
    }

    /// Train on (sampled) training prefixes, validating on the validation split;
    /// keeps the best weights. With `ckpt_dir`, resumes from
    /// `<ckpt_dir>/<name>-last.safetensors` when it matches this model, data and
    /// identifiers, writes it after every epoch (`-best` on improvement), and
    /// exports the adapters to `<ckpt_dir>/<name>-peft/` at the end.
    pub fn fit(&mut self, data: &Prepared, ckpt_dir: Option<&Path>) -> Result<FitSummary> {
        let samples = data.train_samples(false);
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
        let paths = ckpt_dir.map(|d| {
            (d.join(format!("{}-last.safetensors", self.name)), d.join(format!("{}-best.safetensors", self.name)))
        });
        if per_epoch < samples.len() {
            eprintln!(
                "{}: budget: {per_epoch} of {} training prefixes per epoch, {} epochs, history <= {} items, {} validation users",
                self.name,
                samples.len(),
                self.cfg.epochs,
                self.cfg.max_items,
                valid.len()
            );
        }

        let mut prog = match paths.as_ref().filter(|p| p.0.exists()) {
            Some((last, best_path)) => {
                let expect = Expect {
                    dataset_fingerprint: Some(&dataset_fp),
                    tokenizer_fingerprint: Some(&self.tokenizer_fingerprint),
                    config: Some(&self.config),
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
            config: &self.config,
            dataset_fp: &dataset_fp,
            tokenizer_fp: &self.tokenizer_fingerprint,
        });

        let bar = ProgressBar::new((per_epoch * self.cfg.epochs) as u64);
        bar.set_style(
            ProgressStyle::with_template(&format!(
                "{} {{bar:30}} {{pos}}/{{len}} samples {{per_sec}} eta {{eta}} {{msg}}",
                self.name
            ))
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_position((start_epoch * per_epoch) as u64);
        let t0 = std::time::Instant::now();
        let mut trained = 0usize;
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.cfg.seed ^ 0x11c7);
        let mut order: Vec<usize> = (0..samples.len()).collect();
        for _ in 0..start_epoch {
            order.shuffle(&mut rng);
        }
        let mut bad_checks = 0usize;
        let mut epochs_run = start_epoch;
        for epoch in start_epoch..self.cfg.epochs {
            order.shuffle(&mut rng);
            let mut sum = 0f64;
            let mut n_steps = 0usize;
            for (ci, chunk) in order[..per_epoch].chunks(self.cfg.batch_size).enumerate() {
                let step = opt.t as usize;
                opt.set_lr(seq::warmup_cosine(self.cfg.lr, step, total_steps, warmup));
                let ex: Vec<(&[u32], u32, usize)> = chunk
                    .iter()
                    .enumerate()
                    .map(|(j, &i)| {
                        let s = &samples[i];
                        (s.history.as_slice(), s.target, self.template_of(epoch, ci * self.cfg.batch_size + j))
                    })
                    .collect();
                let tape = Tape::new();
                let loss = self.loss(&tape, &ex)?;
                let l = loss.value.to_scalar()?;
                // Divergence check before the update: the last checkpoint stays good.
                if !l.is_finite() {
                    bar.abandon();
                    bail!(
                        "{}: training diverged at step {step} of epoch {} (loss {l}); stopped before the update, \
                         the last good checkpoint is kept{}",
                        self.name,
                        epoch + 1,
                        paths.as_ref().map(|p| format!(" at {}", p.0.display())).unwrap_or_default()
                    );
                }
                tape.backward(&loss)?;
                opt.step()?;
                sum += l as f64;
                n_steps += 1;
                trained += chunk.len();
                bar.inc(chunk.len() as u64);
                bar.set_message(format!("loss {l:.4}"));
                // Without a terminal the bar is hidden: log about ten lines per epoch instead.
                if bar.is_hidden() && (ci + 1) % steps_per_epoch.div_ceil(10) == 0 {
                    let secs = t0.elapsed().as_secs_f64();
                    eprintln!(
                        "{} epoch {} step {}/{steps_per_epoch}: loss {l:.4}, {:.3} samples/s",
                        self.name,
                        epoch + 1,
                        ci + 1,
                        trained as f64 / secs.max(1e-9)
                    );
                }
            }
            let mean = (sum / n_steps.max(1) as f64) as f32;
            prog.losses.push(mean);
            epochs_run = epoch + 1;
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
        if let Some(dir) = ckpt_dir.filter(|_| !self.cfg.full_finetune) {
            self.export(&dir.join(format!("{}-peft", self.name)))?;
        }
        let secs = t0.elapsed().as_secs_f64();
        Ok(FitSummary {
            epochs_run,
            steps: opt.t as u64,
            best_epoch: prog.best.1,
            best_valid_ndcg10: prog.best.0.max(0.0),
            train_seconds: secs,
            samples_per_second: trained as f64 / secs.max(1e-9),
            losses: prog.losses,
        })
    }

    /// Loads the trainable tensors from a checkpoint written by `fit` (checked
    /// against this model's identifiers, base model, prompt and shapes).
    pub fn load_weights(&self, path: &Path) -> Result<()> {
        let expect = Expect {
            tokenizer_fingerprint: Some(&self.tokenizer_fingerprint),
            config: Some(&self.config),
            ..Default::default()
        };
        let ck = checkpoint::load(path, &expect)?;
        let weights: BTreeMap<String, HostTensor> =
            ck.tensors.into_iter().filter(|(k, _)| !k.starts_with("adamw.")).collect();
        state::restore(&path.display().to_string(), &self.model.params(), None, &weights, 0)
    }

    /// PEFT export: `adapter_model.safetensors` + `adapter_config.json` (the LoRA
    /// adapters), and `added_tokens.safetensors` with the code-token rows of the
    /// embedding (and an untied head), `[added, d]`, first id in its metadata.
    pub fn export(&self, dir: &Path) -> Result<()> {
        self.model.export_peft(dir, &self.lora, &self.name)?;
        let d = self.model.cfg.d;
        let rows = |p: &std::rc::Rc<crate::autograd::Param>| -> Result<HostTensor> {
            let v = p.value.to_vec_f32()?;
            HostTensor::new(&[self.added_tokens(), d], v[self.base_vocab * d..].to_vec())
        };
        let mut t = BTreeMap::new();
        t.insert("embed_tokens.added".to_string(), rows(&self.model.embed)?);
        if let Some(h) = &self.model.lm_head {
            t.insert("lm_head.added".to_string(), rows(h)?);
        }
        let mut meta = std::collections::HashMap::new();
        meta.insert("first_token_id".to_string(), self.base_vocab.to_string());
        crate::io::safetensors::save(
            dir.join("added_tokens.safetensors"),
            &t,
            Some(&meta),
            crate::io::safetensors::StoreDtype::F32,
        )
    }

    /// Top-`k` distinct items per case by trie-constrained beam search over the
    /// LLM's vocabulary (`k` <= beams), best first, with summed log-probabilities.
    pub fn recommend(&self, cases: &[EvalCase], k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        let beams = self.cfg.beams;
        if k == 0 || k > beams {
            bail!("{}: asked for top-{k}, but beam search with {beams} beams returns at most {beams}", self.name);
        }
        let users_per_batch = (self.cfg.decode_rows / beams).max(1);
        let steps = self.trie.trie().max_depth() + 1;
        let mut out = Vec::with_capacity(cases.len());
        for chunk in cases.chunks(users_per_batch) {
            let prompts: Vec<Vec<u32>> = chunk
                .iter()
                .map(|c| self.prompt(&c.history, 0).with_context(|| format!("{}: user {}", self.name, c.user)))
                .collect::<Result<_>>()?;
            let cap = prompts.iter().map(Vec::len).max().unwrap_or(0) + steps;
            let (inner, first) = self.model.session(&prompts, beams, cap)?;
            let mut session = PrefilledSession { inner, first: Some(first) };
            let opts = BeamOpts { norm: ScoreNorm::FullVocab, ..BeamOpts::new(chunk.len(), beams, k, self.eos) };
            let hyps = beam_search(&mut session, &self.trie, &opts)?;
            out.extend(hyps.into_iter().map(|h| h.into_iter().map(|h| (h.item, h.score)).collect()));
        }
        Ok(out)
    }

    /// Full-ranking evaluation from the beam search's top items.
    pub fn evaluate(&self, cases: &[EvalCase], protocol: &Protocol) -> Result<EvalReport> {
        let k = protocol.ks.iter().copied().max().unwrap_or(10).min(self.cfg.beams);
        let recs = self.recommend(cases, k)?;
        let mut ev = Evaluator::new(protocol, self.item_tokens.len(), None)?;
        for (c, r) in cases.iter().zip(&recs) {
            let ranked: Vec<u32> = r.iter().map(|x| x.0).collect();
            ev.add_ranking(c, &ranked)?;
        }
        Ok(ev.finish())
    }
}

/// The SmolLM2 asset's GGUF file, if fetched.
pub fn smollm2_path() -> Option<PathBuf> {
    crate::io::fetch::local("smollm2").map(|d| d.join("SmolLM2-135M-Instruct.Q4_1.gguf")).filter(|p| p.is_file())
}

#[cfg(test)]
mod tests;
