//! LoRA fused into the base matmul vs the unfused form (base matmul + dropout + two thin
//! matmuls + scale + add), forward + backward, on SmolLM2-135M's projection shapes:
//! W [576, 576] (q/o) and [1536, 576] (gate/up), M tokens (default 512), rank r (default 8),
//! alpha = 2 r, frozen f32 base (gradients for x, A and B, as in LoRA fine-tuning).
//! Both variants run interleaved in the same process; each time is the best of `rounds`
//! batches of `iters` steps, with the process CPU time (all lavapipe threads) next to it.
//!
//! `cargo run --release --example lora_bench -- [M] [r] [dropout] [iters] [rounds]`

use std::time::Instant;

use anyhow::Result;
use genrec::autograd::{Param, Tape};
use genrec::gpu::{Gpu, Tensor};
use genrec::nn::lora::{lora_linear, lora_linear_unfused};

use genrec::bench::process_cpu_seconds as cpu_seconds;

fn rand(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    genrec::nn::uniform_init(seed, n, scale)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: f64| args.get(i).map(|a| a.parse::<f64>().expect("numeric argument")).unwrap_or(d);
    let m = arg(0, 512.0) as usize;
    let r = arg(1, 8.0) as usize;
    let p = arg(2, 0.0) as f32;
    let iters = arg(3, 3.0) as usize;
    let rounds = arg(4, 5.0) as usize;
    let gpu = Gpu::shared()?;
    println!("device: {}", gpu.describe());
    println!("M = {m}, r = {r}, alpha = {}, dropout {p}; best of {rounds} x {iters} fwd+bwd steps", 2 * r);
    for (d_out, d_in) in [(576usize, 576usize), (1536, 576)] {
        let x = Tensor::from_f32(&gpu, &rand(1, m * d_in, 1.0), &[m, d_in])?;
        let w = Tensor::from_f32(&gpu, &rand(2, d_out * d_in, 0.05), &[d_out, d_in])?;
        let a = Param::new("A", Tensor::from_f32(&gpu, &rand(3, r * d_in, 0.05), &[r, d_in])?);
        let b = Param::new("B", Tensor::from_f32(&gpu, &rand(4, d_out * r, 0.05), &[d_out, r])?);
        let dy = Tensor::from_f32(&gpu, &rand(5, m * d_out, 1.0), &[m, d_out])?;
        let scale = 2.0;
        // One fwd+bwd step; the gradients of x, A and B are all computed.
        let step = |fused: bool| -> Result<()> {
            a.zero_grad();
            b.zero_grad();
            let tape = Tape::new();
            let xv = tape.input(x.clone());
            let wv = tape.constant(w.clone());
            let (av, bv) = (tape.param(&a), tape.param(&b));
            let lora = Some((&av, &bv, scale, p, 7, 0));
            let f = if fused { lora_linear } else { lora_linear_unfused };
            let y = f(&xv, &wv, None, lora)?;
            tape.backward_with(&y, dy.clone())?;
            Ok(())
        };
        // Same results from both (sanity), then warm-up (pipelines compiled, pools filled).
        let grads = |fused: bool| -> Result<Vec<f32>> {
            step(fused)?;
            Ok([a.grad().unwrap().to_vec_f32()?, b.grad().unwrap().to_vec_f32()?].concat())
        };
        let (gf, gu) = (grads(true)?, grads(false)?);
        let max_rel = gf.iter().zip(&gu).map(|(x, y)| (x - y).abs() / y.abs().max(1e-3)).fold(0f32, f32::max);
        let mut best = [(f64::INFINITY, f64::INFINITY); 2];
        for _ in 0..rounds {
            for (i, fused) in [true, false].into_iter().enumerate() {
                let (t0, c0) = (Instant::now(), cpu_seconds());
                for _ in 0..iters {
                    step(fused)?;
                }
                gpu.sync()?;
                let wall = t0.elapsed().as_secs_f64() / iters as f64;
                let cpu = match (c0, cpu_seconds()) {
                    (Some(c0), Some(c1)) => (c1 - c0) / iters as f64,
                    _ => f64::NAN,
                };
                best[i] = (best[i].0.min(wall), best[i].1.min(cpu));
            }
        }
        let [(fw, fc), (uw, uc)] = best;
        println!(
            "W [{d_out}, {d_in}]: fused {:.2} ms ({:.2} CPU-ms), unfused {:.2} ms ({:.2} CPU-ms): fused/unfused {:.2}x wall, {:.2}x CPU (dA, dB max rel diff {max_rel:.1e})",
            fw * 1e3,
            fc * 1e3,
            uw * 1e3,
            uc * 1e3,
            fw / uw,
            fc / uc
        );
    }
    Ok(())
}
