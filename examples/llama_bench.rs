//! SmolLM2-135M-Instruct (asset `smollm2`, fetched if missing) prefill and decode throughput
//! through the KV-cache session: prefill tokens/s for one prompt of P tokens, decode tokens/s at
//! batch 1 and 16 (rows x steps / time, greedy argmax read back each step, as generation does).
//! `cargo run --release --example llama_bench -- [P] [decode_steps]`

use std::time::Instant;

use genrec::decode::StepModel;
use genrec::gpu::{Gpu, Tensor};
use genrec::models::llama::{argmax_rows, Llama};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let p: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(64);
    let steps: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(8);
    let dir = genrec::io::fetch::fetch("smollm2")?;
    let gpu = Gpu::shared()?;
    println!("adapter: {}", gpu.describe());
    let t0 = Instant::now();
    let m = Llama::from_gguf(&gpu, dir.join("SmolLM2-135M-Instruct.Q4_1.gguf"))?;
    gpu.sync()?;
    println!("load: {:.1} s", t0.elapsed().as_secs_f64());
    let prompt: Vec<u32> = (0..p).map(|i| (i * 37 % 5000 + 100) as u32).collect();
    // Warm-up (pipeline compilation).
    let (_, l) = m.session(&[prompt[..8].to_vec()], 1, 16)?;
    l.to_vec_f32()?;
    let t = Instant::now();
    let (_, l) = m.session(std::slice::from_ref(&prompt), 1, p + 1)?;
    l.to_vec_f32()?;
    let s = t.elapsed().as_secs_f64();
    println!("prefill batch 1, {p} tokens: {:.2} s = {:.1} tokens/s", s, p as f64 / s);
    for rows in [1usize, 16] {
        let prompts = vec![prompt[..16].to_vec(); rows];
        let (mut sess, mut logits) = m.session(&prompts, 1, 16 + steps + 1)?;
        let mut next = argmax_rows(&logits)?;
        logits = sess.step(&Tensor::from_u32(&gpu, &next, &[rows])?)?; // warm-up step
        next = argmax_rows(&logits)?;
        let t = Instant::now();
        for _ in 0..steps {
            logits = sess.step(&Tensor::from_u32(&gpu, &next, &[rows])?)?;
            next = argmax_rows(&logits)?;
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "decode batch {rows}: {steps} steps in {s:.2} s = {:.3} s/step, {:.2} tokens/s",
            s / steps as f64,
            (rows * steps) as f64 / s
        );
    }
    Ok(())
}
