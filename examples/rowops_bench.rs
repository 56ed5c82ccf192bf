//! Bandwidth of the row kernels (softmax, log-softmax, RMSNorm, LayerNorm) on
//! a [rows, cols] f32 tensor, next to a plain copy of the same buffer size
//! measured in the same run (a buffer-to-buffer copy and a vec4 copy shader).
//! GB/s counts the minimum traffic: each element read once and written once.
//! Each time is the best of `rounds` batches of `iters` runs, and the copies are
//! re-measured next to every kernel, so a busy machine skews the ratios less.
//!
//! On a shared machine wall time swings with the load; the process CPU time
//! (all lavapipe worker threads, Linux /proc) is reported too, and its ratio
//! to the copy's is the steadier measure of the kernel's cost.
//!
//! `cargo run --release --example rowops_bench -- [rows] [cols] [iters] [rounds]`

use std::time::Instant;

use anyhow::Result;
use genrec::gpu::{DType, Gpu, Tensor};
use genrec::ops::{elementwise, norm, softmax};

use genrec::bench::process_cpu_seconds as cpu_seconds;

/// Best (wall, cpu) seconds per run over `rounds` batches of `iters`.
fn time(gpu: &Gpu, iters: usize, rounds: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    f()?; // warm-up: compile the pipeline, fill the pool
    gpu.sync()?;
    let (mut wall, mut cpu) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..rounds {
        let (t0, c0) = (Instant::now(), cpu_seconds());
        for _ in 0..iters {
            f()?;
        }
        gpu.sync()?;
        wall = wall.min(t0.elapsed().as_secs_f64() / iters as f64);
        if let (Some(c0), Some(c1)) = (c0, cpu_seconds()) {
            cpu = cpu.min((c1 - c0) / iters as f64);
        }
    }
    Ok((wall, cpu))
}

fn main() -> Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("numeric argument")).collect();
    let rows = args.first().copied().unwrap_or(4096);
    let cols = args.get(1).copied().unwrap_or(4096);
    let iters = args.get(2).copied().unwrap_or(3);
    let rounds = args.get(3).copied().unwrap_or(3);
    let gpu = Gpu::shared()?;
    println!("device: {}", gpu.describe());
    println!("tensor [{rows}, {cols}] f32, best of {rounds} x {iters} iterations");
    let n = rows * cols;
    let data: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 * 0.01 - 5.0).collect();
    let x = Tensor::from_f32(&gpu, &data, &[rows, cols])?;
    let w = Tensor::from_f32(&gpu, &vec![1.0; cols], &[cols])?;
    let b = Tensor::from_f32(&gpu, &vec![0.0; cols], &[cols])?;
    let dst = Tensor::empty(&gpu, &[rows, cols], DType::F32)?;
    let bytes = 2.0 * (n * 4) as f64;

    let gbs = |t: f64| bytes / t / 1e9;
    let copies = |label: &str| -> Result<((f64, f64), (f64, f64))> {
        let c = time(&gpu, iters, rounds, || dst.copy_from(&x))?;
        let k = time(&gpu, iters, rounds, || elementwise::copy_kernel(&x).map(drop))?;
        println!(
            "  {label:<20} buffer copy {:>7.2} GB/s ({:>7.2} per CPU-s), vec4 shader copy {:>6.2} GB/s ({:>6.2} per CPU-s)",
            gbs(c.0),
            gbs(c.1),
            gbs(k.0),
            gbs(k.1)
        );
        Ok((c, k))
    };
    let cases: Vec<(&str, Box<dyn Fn() -> Result<()>>)> = vec![
        ("softmax", Box::new(|| softmax::softmax(&x).map(drop))),
        ("log_softmax", Box::new(|| softmax::log_softmax(&x).map(drop))),
        ("rms_norm", Box::new(|| norm::rms_norm(&x, &w, 1e-5).map(drop))),
        ("layer_norm", Box::new(|| norm::layer_norm(&x, &w, &b, 1e-5).map(drop))),
    ];
    for (name, f) in cases {
        let (c1, k1) = copies("copies before")?;
        let t = time(&gpu, iters, rounds, f)?;
        let (c2, k2) = copies("copies after")?;
        // The copies' best of before/after.
        let (cw, cc) = (c1.0.min(c2.0), c1.1.min(c2.1));
        let (kw, kc) = (k1.0.min(k2.0), k1.1.min(k2.1));
        println!(
            "{name:<12} {:>8.1} ms {:>6.2} GB/s ({:>6.2} per CPU-s) | wall: {:>5.1}% of buffer copy, {:>5.1}% of shader copy | CPU time: {:>5.1}% of buffer copy, {:>5.1}% of shader copy",
            t.0 * 1e3,
            gbs(t.0),
            gbs(t.1),
            100.0 * cw / t.0,
            100.0 * kw / t.0,
            100.0 * cc / t.1,
            100.0 * kc / t.1
        );
    }
    Ok(())
}
