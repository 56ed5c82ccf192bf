//! Bandwidth of the row kernels (softmax, log-softmax, RMSNorm, LayerNorm) on
//! a [rows, cols] f32 tensor, next to a plain copy of the same buffer size
//! measured in the same run (a buffer-to-buffer copy and a vec4 copy shader).
//! GB/s counts the minimum traffic: each element read once and written once.
//!
//! `cargo run --release --example rowops_bench -- [rows] [cols] [iters]`

use std::time::Instant;

use anyhow::Result;
use genrec::gpu::{DType, Gpu, Tensor};
use genrec::ops::{elementwise, norm, softmax};

fn time(gpu: &Gpu, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up: compile the pipeline, fill the pool
    gpu.sync()?;
    let t0 = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    gpu.sync()?;
    Ok(t0.elapsed().as_secs_f64() / iters as f64)
}

fn main() -> Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numeric argument"))
        .collect();
    let rows = args.first().copied().unwrap_or(4096);
    let cols = args.get(1).copied().unwrap_or(4096);
    let iters = args.get(2).copied().unwrap_or(10);
    let gpu = Gpu::shared()?;
    println!("device: {}", gpu.describe());
    println!("tensor [{rows}, {cols}] f32, {iters} iterations each");
    let n = rows * cols;
    let data: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 * 0.01 - 5.0)
        .collect();
    let x = Tensor::from_f32(&gpu, &data, &[rows, cols])?;
    let w = Tensor::from_f32(&gpu, &vec![1.0; cols], &[cols])?;
    let b = Tensor::from_f32(&gpu, &vec![0.0; cols], &[cols])?;
    let dst = Tensor::empty(&gpu, &[rows, cols], DType::F32)?;
    let bytes = 2.0 * (n * 4) as f64;

    let copy = time(&gpu, iters, || dst.copy_from(&x))?;
    let copy_gbs = bytes / copy / 1e9;
    println!(
        "{:<22} {:>9.3} ms {:>8.2} GB/s",
        "copy (buffer copy)",
        copy * 1e3,
        copy_gbs
    );
    let kcopy = time(&gpu, iters, || elementwise::copy_kernel(&x).map(drop))?;
    let kcopy_gbs = bytes / kcopy / 1e9;
    println!(
        "{:<22} {:>9.3} ms {:>8.2} GB/s",
        "copy (vec4 shader)",
        kcopy * 1e3,
        kcopy_gbs
    );

    let cases: Vec<(&str, Box<dyn Fn() -> Result<()>>)> = vec![
        ("softmax", Box::new(|| softmax::softmax(&x).map(drop))),
        (
            "log_softmax",
            Box::new(|| softmax::log_softmax(&x).map(drop)),
        ),
        (
            "rms_norm",
            Box::new(|| norm::rms_norm(&x, &w, 1e-5).map(drop)),
        ),
        (
            "layer_norm",
            Box::new(|| norm::layer_norm(&x, &w, &b, 1e-5).map(drop)),
        ),
    ];
    for (name, f) in cases {
        let t = time(&gpu, iters, f)?;
        let gbs = bytes / t / 1e9;
        println!(
            "{name:<22} {:>9.3} ms {gbs:>8.2} GB/s  {:>5.1}% of buffer copy, {:>5.1}% of shader copy",
            t * 1e3,
            100.0 * gbs / copy_gbs,
            100.0 * gbs / kcopy_gbs
        );
    }
    Ok(())
}
