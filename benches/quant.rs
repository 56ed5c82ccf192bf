//! Quantization benchmarks: nearest-codeword throughput and k-means iteration
//! time. Run: `cargo bench --bench quant` (release profile). Environment:
//! `GENREC_BENCH_BIG_ROWS` (rows of the 1M x 64 vs 4096 case; default 1000000).
//! Prints one JSON object per measurement.

use std::time::Instant;

use anyhow::Result;
use genrec::gpu::{Gpu, Tensor};
use genrec::quant::kmeans::{gather_rows, kmeans_pp_indices, lloyd, KmeansOpts};
use genrec::quant::nearest::{nearest, nearest_host};
use rand::{Rng, SeedableRng};

fn data(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

fn report(name: &str, fields: &[(&str, f64)]) {
    let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\": {v:.6}")).collect();
    println!("{{\"bench\": \"{name}\", {}}}", body.join(", "));
}

fn bench_nearest_resident(gpu: &Gpu, n: usize, d: usize, k: usize) -> Result<()> {
    let x = Tensor::from_f32(gpu, &data(1, n * d), &[n, d])?;
    let e = Tensor::from_f32(gpu, &data(2, k * d), &[k, d])?;
    nearest(&x, &e)?;
    gpu.sync()?;
    let reps = 3;
    let t = Instant::now();
    for _ in 0..reps {
        let r = nearest(&x, &e)?;
        r.idx.to_vec_u32()?; // includes reading back the [n] indices
    }
    let s = t.elapsed().as_secs_f64() / reps as f64;
    report(
        &format!("nearest_{n}x{d}_vs_{k}"),
        &[("seconds", s), ("vectors_per_s", n as f64 / s), ("gflops", 2.0 * (n * k * d) as f64 / s / 1e9)],
    );
    Ok(())
}

fn bench_nearest_chunked(gpu: &Gpu, n: usize, d: usize, k: usize) -> Result<()> {
    let x = data(3, n * d);
    let e = Tensor::from_f32(gpu, &data(4, k * d), &[k, d])?;
    nearest_host(gpu, &x[..d * 1024], d, &e, None)?; // compile + warm
    let t = Instant::now();
    let (idx, _) = nearest_host(gpu, &x, d, &e, None)?;
    let s = t.elapsed().as_secs_f64();
    assert_eq!(idx.len(), n);
    report(
        &format!("nearest_host_{n}x{d}_vs_{k}"),
        &[("seconds", s), ("vectors_per_s", n as f64 / s), ("gflops", 2.0 * (n * k * d) as f64 / s / 1e9)],
    );
    Ok(())
}

fn bench_kmeans(gpu: &Gpu, n: usize, d: usize, k: usize, iters: usize) -> Result<()> {
    let x = Tensor::from_f32(gpu, &data(5, n * d), &[n, d])?;
    let t = Instant::now();
    let idx = kmeans_pp_indices(&x, k, 42)?;
    let init_s = t.elapsed().as_secs_f64();
    let init = gather_rows(&x, &idx)?;
    lloyd(&x, &init, KmeansOpts { max_iter: 1, tol: 0.0, seed: 0 })?; // compile + warm
    let t = Instant::now();
    let r = lloyd(&x, &init, KmeansOpts { max_iter: iters, tol: 0.0, seed: 0 })?;
    let s = t.elapsed().as_secs_f64();
    let it = r.objective.len();
    report(
        &format!("kmeans_{n}x{d}_k{k}"),
        &[("kmeanspp_init_seconds", init_s), ("iterations", it as f64), ("seconds_per_iteration", s / it as f64)],
    );
    Ok(())
}

fn main() -> Result<()> {
    let gpu = Gpu::new()?;
    eprintln!("device: {}", gpu.describe());
    let big: usize = std::env::var("GENREC_BENCH_BIG_ROWS").ok().and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    bench_nearest_resident(&gpu, 100_000, 32, 256)?;
    bench_kmeans(&gpu, 100_000, 32, 256, 10)?;
    bench_nearest_chunked(&gpu, big, 64, 4096)?;
    Ok(())
}
