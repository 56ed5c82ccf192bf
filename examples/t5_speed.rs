//! TIGER-size T5 speed, three workloads:
//! - training samples/s (forward + backward + AdamW, one loss readback per step);
//! - incremental beam decoding (step + reorder, no search logic) users/s;
//! - recommendation users/s: encode + trie-constrained beam search returning the top `beams`
//!   distinct items, exactly what `genrec eval` / `recommend` run per batch of users.
//!
//! cargo run --release --example t5_speed -- [batch 32] [steps 3] [vocab 1100] [users 16] [beams 20] [items.json]
//!
//! Shapes follow letter.spec.md §2.4: encoder input 20 items x 4 codes + EOS = 81 tokens,
//! decoder input 5 tokens (`[start, c1, c2, c3, c4]`), decoding 5 steps (4 codes + EOS).
//! The trie is read from `items.json` (a list of token lists: PAD 0 and EOS 1 reserved, as in
//! `systems::seq`), which `tools/t5_speed_torch.py --rust` writes so both sides search the same
//! trie; without it 1,682 random 4-level items over 256 codes per level are generated here.

use std::time::Instant;

use genrec::autograd::{cross_entropy, CeOptions, Tape};
use genrec::decode::{beam_search, BeamOpts, GpuTrie, ScoreNorm, StepModel, Trie};
use genrec::gpu::{Gpu, Tensor};
use genrec::models::t5::{T5Batch, T5Config, T5};
use rand::{Rng, SeedableRng};

fn arg(i: usize, default: usize) -> anyhow::Result<usize> {
    Ok(std::env::args().nth(i).map(|s| s.parse()).transpose()?.unwrap_or(default))
}

fn main() -> anyhow::Result<()> {
    let (batch, steps, vocab, users, beams) = (arg(1, 32)?, arg(2, 3)?, arg(3, 1100)?, arg(4, 16)?, arg(5, 20)?);
    let gpu = Gpu::shared()?;
    let cfg = T5Config::tiger(vocab);
    let model = T5::new(&gpu, cfg.clone(), 1)?;
    println!("device: {}", gpu.describe());
    println!("TIGER T5: {} parameters, vocab {vocab}", model.num_params());
    let hp = genrec::ops::adamw::AdamW { lr: 1e-3, ..Default::default() };
    let mut opt = genrec::nn::optim::AdamW::new(model.params(), hp, Some(1.0))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let sample = |rng: &mut rand::rngs::StdRng, n: usize| -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
        let mut row = |len: usize| -> Vec<u32> {
            (0..len).map(|j| if j + 1 == len { 1 } else { rng.gen_range(2..vocab as u32) }).collect()
        };
        let enc = (0..n).map(|_| row(81)).collect();
        let lab = (0..n).map(|_| row(5)).collect();
        (enc, lab)
    };
    let mut times = Vec::new();
    for step in 0..=steps {
        let (enc, lab) = sample(&mut rng, batch);
        let t0 = Instant::now();
        let (b, targets) = T5Batch::from_labels(&gpu, &cfg, &enc, &lab)?;
        let tape = Tape::new();
        let logits = model.forward(&tape, &b, true, step as u32)?;
        let loss = cross_entropy(&logits, &targets, &CeOptions::default())?;
        // With GENREC_T5_PROFILE set, sync between phases to split the time (slower overall).
        let profile = std::env::var_os("GENREC_T5_PROFILE").is_some();
        let mut split = Vec::new();
        if profile {
            gpu.sync()?;
            split.push(t0.elapsed().as_secs_f64());
        }
        tape.backward(&loss)?;
        if profile {
            gpu.sync()?;
            split.push(t0.elapsed().as_secs_f64());
        }
        opt.step()?;
        let l = loss.value.to_scalar()?;
        let dt = t0.elapsed().as_secs_f64();
        let phases = if profile {
            format!(" (forward {:.3}, backward {:.3}, optimizer {:.3})", split[0], split[1] - split[0], dt - split[1])
        } else {
            String::new()
        };
        println!("train step {step}: loss {l:.4}, {dt:.3} s{phases}{}", if step == 0 { " (warm-up)" } else { "" });
        if step > 0 {
            times.push(dt);
        }
    }
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    println!("training: batch {batch}, {:.1} samples/s ({mean:.3} s/step)", batch as f64 / mean);

    // Decoding: encode once, 5 steps of step + reorder over users x beams rows.
    let rows = users * beams;
    let mut dec_times = Vec::new();
    for rep in 0..=2 {
        let (enc, _) = sample(&mut rng, users);
        let t0 = Instant::now();
        let b = T5Batch::new(&gpu, &cfg, &enc, &vec![vec![0]; users])?;
        let e = model.encode(&b.enc_ids, &b.enc_valid)?;
        let mut sess = model.decode_session(&e, beams, 5)?;
        let mut toks = Tensor::from_u32(&gpu, &vec![0; rows], &[rows])?;
        for _ in 0..5 {
            let logits = sess.step(&toks)?;
            // Stand-in for the search: any in-user parents and tokens (uploaded here, but a real
            // beam search computes them on the GPU).
            let parents: Vec<u32> = (0..rows).map(|r| ((r / beams) * beams + rng.gen_range(0..beams)) as u32).collect();
            sess.reorder(&Tensor::from_u32(&gpu, &parents, &[rows])?)?;
            let t: Vec<u32> = (0..rows).map(|_| rng.gen_range(0..vocab as u32)).collect();
            toks = Tensor::from_u32(&gpu, &t, &[rows])?;
            drop(logits);
        }
        let _ = toks.to_vec_u32()?; // sync
        gpu.sync()?;
        let dt = t0.elapsed().as_secs_f64();
        println!(
            "decode rep {rep}: {users} users x {beams} beams, 5 steps: {dt:.3} s{}",
            if rep == 0 { " (warm-up)" } else { "" }
        );
        if rep > 0 {
            dec_times.push(dt);
        }
    }
    let mean = dec_times.iter().sum::<f64>() / dec_times.len() as f64;
    println!("decoding (encode + 5 x (step + reorder)): {:.1} users/s with {beams} beams", users as f64 / mean);

    // Recommendation: the real trie-constrained search (T5 EOS = 1, decoder start = PAD = 0).
    let items = match std::env::args().nth(6) {
        Some(path) => {
            let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("reading {path}: {e}"))?;
            serde_json::from_str::<Vec<Vec<u32>>>(&text)
                .map_err(|e| anyhow::anyhow!("{path}: expected a JSON list of token lists: {e}"))?
        }
        None => random_items(&mut rng, 1682),
    };
    let max_token = items.iter().flatten().copied().max().unwrap_or(0);
    anyhow::ensure!((max_token as usize) < vocab, "the items use token {max_token}, outside the vocabulary of {vocab}");
    let trie = Trie::new(&items, 1)?;
    let gtrie = GpuTrie::upload(&gpu, &trie)?;
    let steps = trie.max_depth() + 1;
    let mut rec_times = Vec::new();
    let mut returned = 0;
    for rep in 0..=2 {
        let (enc, _) = sample(&mut rng, users);
        let t0 = Instant::now();
        let b = T5Batch::new(&gpu, &cfg, &enc, &vec![vec![0]; users])?;
        let e = model.encode(&b.enc_ids, &b.enc_valid)?;
        let mut sess = model.decode_session(&e, beams, steps)?;
        let opts = BeamOpts { norm: ScoreNorm::FullVocab, ..BeamOpts::new(users, beams, beams, 0) };
        let hyps = beam_search(&mut sess, &gtrie, &opts)?;
        let dt = t0.elapsed().as_secs_f64();
        returned = hyps.iter().map(Vec::len).sum::<usize>();
        println!(
            "recommend rep {rep}: {users} users x {beams} beams, {steps} steps, trie of {} items: {dt:.3} s{}",
            trie.num_items(),
            if rep == 0 { " (warm-up)" } else { "" }
        );
        if rep > 0 {
            rec_times.push(dt);
        }
    }
    let mean = rec_times.iter().sum::<f64>() / rec_times.len() as f64;
    println!(
        "recommendation (encode + trie-constrained beam search, top {beams}): {:.1} users/s ({returned} items returned)",
        users as f64 / mean
    );
    if let Some(report) = gpu.profile_report() {
        println!("{report}");
    }
    Ok(())
}

/// `n` distinct random items of 4 codes (256 per level, token 2 + 256 * level + code), with a
/// fifth disambiguation token (2 + 1024 + collision index) on collisions, as TIGER's identifiers.
fn random_items(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<Vec<u32>> {
    let mut seen = std::collections::HashMap::new();
    (0..n)
        .map(|_| {
            let mut s: Vec<u32> = (0..4).map(|l| 2 + 256 * l + rng.gen_range(0..256)).collect();
            let c = seen.entry(s.clone()).or_insert(0u32);
            if *c > 0 {
                s.push(2 + 256 * 4 + *c);
            }
            *c += 1;
            s
        })
        .collect()
}
