//! LETTER-LLM (SmolLM2-135M + LoRA, LC-Rec style) throughput on ml-100k at a small budget:
//! training samples/s (response-only CE, LoRA on the 7 projections, whole embedding trainable)
//! and recommendation users/s with trie-constrained beam search (beam 20, full-vocabulary
//! log-softmax), plus the metrics on the users it recommended for (a tiny, noisy subset).
//!
//! Identifiers come from a run directory's cached `letter-ids.json` (written by
//! `genrec train --system letter` / the quickstart).
//!
//! `cargo run --release --example lcrec_bench -- <letter-ids.json> [train_samples] [batch] [users] [max_items]`

use std::time::Instant;

use genrec::data::Split;
use genrec::eval::Protocol;
use genrec::gpu::Gpu;
use genrec::models::llama::Llama;
use genrec::models::llama_tokenizer::LlamaTokenizer;
use genrec::systems::lcrec::{LcRec, LcRecConfig};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let Some(ids) = args.get(1) else {
        anyhow::bail!("usage: lcrec_bench <letter-ids.json> [train_samples] [batch] [users] [max_items]");
    };
    let arg =
        |i: usize, d: usize| -> anyhow::Result<usize> { Ok(args.get(i).map(|s| s.parse()).transpose()?.unwrap_or(d)) };
    let (n_train, batch, users, max_items) = (arg(2, 16)?, arg(3, 8)?, arg(4, 4)?, arg(5, 5)?);
    let text = std::fs::read_to_string(ids)?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let codes: Vec<Vec<u32>> = serde_json::from_value(v["codes"]["codes"].clone())?;
    let data = genrec::pipeline::prepared_ml100k()?;
    anyhow::ensure!(codes.len() == data.n_items(), "{ids}: {} identifiers for {} items", codes.len(), data.n_items());
    let gpu = Gpu::shared()?;
    println!("adapter: {}", gpu.describe());
    let path = genrec::io::fetch::fetch("smollm2")?.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let tok = LlamaTokenizer::from_gguf_file(&path)?;
    let llm = Llama::from_gguf(&gpu, &path)?;
    let cfg = LcRecConfig {
        samples_per_epoch: n_train,
        batch_size: batch,
        epochs: 1,
        max_items,
        // One validation user: the fit time is (almost) all training.
        valid_users: 1,
        ..genrec::config::SystemConfig::defaults(genrec::pipeline::System::LetterLlm, false, 42, 20)?
            .llm
            .ok_or_else(|| anyhow::anyhow!("letter-llm has no llm stage"))?
    };
    let mut m = LcRec::new(&gpu, "letter-llm-bench", llm, &tok, &codes, cfg)?;
    let (trainable, all) = m.num_params();
    println!("{} code tokens added; {trainable} of {all} parameters trainable", m.added_tokens());
    let test = data.eval_cases(Split::Test);
    let p = m.prompt(&test[0].history, 0)?;
    println!("test prompt length (template 0, history <= {max_items}): {} tokens", p.len());
    let fit = m.fit(&data, None)?;
    println!(
        "train: {n_train} samples (batch {batch}) in {:.1} s incl. 1 validation user: {:.3} samples/s, losses {:?}",
        fit.train_seconds, fit.samples_per_second, fit.losses
    );
    let cases = genrec::systems::seq::fixed_subset(test, users);
    let t = Instant::now();
    let r = m.evaluate(&cases, &Protocol { bootstrap: 0, ks: vec![5, 10], ..Default::default() })?;
    let s = t.elapsed().as_secs_f64();
    println!("recommend (beam 20, top-10): {} users in {s:.1} s = {:.3} users/s", cases.len(), cases.len() as f64 / s);
    for (name, k) in [("recall", 5), ("recall", 10), ("ndcg", 5), ("ndcg", 10)] {
        println!("  {name}@{k} on these {} users: {:.4}", cases.len(), r.metric(name, k).unwrap_or(0.0));
    }
    Ok(())
}
