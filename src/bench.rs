//! Kernel benchmark harness: device peaks (FMA throughput, copy bandwidth),
//! a wall-clock timing helper, and a registry of kernel benchmarks printed by
//! `genrec bench kernels`.
//!
//! Adding a kernel: write a `fn(&Gpu, quick: bool) -> Result<Vec<Case>>` that
//! builds its inputs and returns one [`Case`] per shape (a closure recording
//! one run, plus the flop and/or byte counts of one run), and add a line to
//! [`registry`].

use std::time::Instant;

use anyhow::Result;
use serde::Serialize;

use crate::gpu::{DType, Gpu, Kernel, Params, Tensor};

/// CPU seconds this process has used (user + system, all threads) from
/// `/proc/self/stat`; `None` where there is no procfs. Benchmarks print it next
/// to wall time because on a CPU adapter a shared machine inflates wall time.
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0) // USER_HZ
}
use crate::ops::matmul::{self, MatmulOpts, Path, Plan};

/// One benchmark row.
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    pub kernel: String,
    pub shape: String,
    /// Achieved compute rate (for compute-bound kernels).
    pub gflops: Option<f64>,
    /// Achieved memory bandwidth (for memory-bound kernels).
    pub gbps: Option<f64>,
    /// Percentage of the measured device peak (FMA peak for GFLOP/s, copy bandwidth for GB/s).
    pub peak_pct: Option<f64>,
    pub device: String,
    /// Wall-clock milliseconds per run.
    pub ms: f64,
}

/// Measured device peaks.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Peaks {
    pub gflops: f64,
    pub gbps: f64,
}

/// One benchmark case: `run` records one execution of the kernel into the
/// pending encoder (it must not read back); `flops` / `bytes` are the work of
/// one run (0 when not meaningful).
pub struct Case {
    pub kernel: String,
    pub shape: String,
    pub flops: f64,
    pub bytes: f64,
    /// Upper bound on timed runs (a slow path on a slow device).
    pub max_iters: usize,
    pub run: Box<dyn FnMut() -> Result<()>>,
}

/// A registered benchmark: name and case builder.
pub type Setup = fn(&Gpu, bool) -> Result<Vec<Case>>;

/// All kernel benchmarks, in print order. Add new kernels here.
pub fn registry() -> Vec<(&'static str, Setup)> {
    vec![("matmul", matmul_cases), ("rowops", rowop_cases)]
}

/// CPU seconds (user + system) this process has used so far, on Linux; lets a
/// CPU adapter (lavapipe runs in-process) be judged on a loaded machine.
pub fn process_cpu_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesized command name; utime, stime are fields 14, 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Milliseconds per run of `f`: warm up, pick an iteration count that fills
/// about `target_s` seconds (at most `max_iters`), record all iterations into
/// the pending encoder, `sync`, and divide the wall-clock time.
pub fn time_ms(gpu: &Gpu, target_s: f64, max_iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    // Warm-up (pipeline compilation, buffer allocation), then a single timed run.
    f()?;
    gpu.sync()?;
    let t0 = Instant::now();
    f()?;
    gpu.sync()?;
    let one = t0.elapsed().as_secs_f64();
    let iters = ((target_s / one.max(1e-6)) as usize).clamp(1, max_iters.max(1));
    let t0 = Instant::now();
    let c0 = process_cpu_s();
    for _ in 0..iters {
        f()?;
    }
    gpu.sync()?;
    let wall = t0.elapsed().as_secs_f64() * 1e3 / iters as f64;
    if let (Some(c0), Some(c1), true) = (c0, process_cpu_s(), std::env::var_os("GENREC_BENCH_CPU").is_some()) {
        // Debug aid on shared machines: CPU milliseconds per run instead of wall-clock.
        return Ok((c1 - c0) * 1e3 / iters as f64);
    }
    Ok(wall)
}

/// `n` values uniform in [-scale, scale), deterministic in `seed`.
fn rand_vec(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

fn fold_grid(groups: usize) -> (u32, u32) {
    let gx = groups.clamp(1, 65535);
    (gx as u32, groups.div_ceil(gx) as u32)
}

/// Peak FMA throughput (GFLOP/s) and vec4 copy bandwidth (GB/s) of the device.
pub fn peaks(gpu: &Gpu, quick: bool) -> Result<Peaks> {
    let target = if quick { 0.2 } else { 1.0 };
    // FMA: 3 vec4 chains x 8 flops per step per invocation.
    let invocations = 64 * 1024;
    let iters = if gpu.is_cpu() { 512 } else { 8192 };
    let out = Tensor::empty(gpu, &[invocations], DType::F32)?;
    let k = fma_kernel();
    let (gx, gy) = fold_grid(invocations / 64);
    let params = Params::new().u(iters).u(invocations).u(gx as usize);
    let ms = time_ms(gpu, target, 1000, || gpu.dispatch(&k, params.bytes(), &[out.buffer()], [gx, gy, 1]))?;
    let gflops = invocations as f64 * iters as f64 * 24.0 / (ms * 1e-3) / 1e9;

    // Copy: 64 MiB (16 MiB quick) each way.
    let n4 = if quick { 1 << 20 } else { 1 << 22 };
    let src = Tensor::zeros(gpu, &[n4 * 4], DType::F32)?;
    let dst = Tensor::empty(gpu, &[n4 * 4], DType::F32)?;
    let k = copy_kernel();
    let (gx, gy) = fold_grid(n4 / 64);
    let params = Params::new().u(n4).u(gx as usize);
    let ms =
        time_ms(gpu, target, 1000, || gpu.dispatch(&k, params.bytes(), &[src.buffer(), dst.buffer()], [gx, gy, 1]))?;
    let gbps = n4 as f64 * 32.0 / (ms * 1e-3) / 1e9;
    Ok(Peaks { gflops, gbps })
}

fn fma_kernel() -> Kernel {
    Kernel::new("bench_peak", "bench_peak", "fma_peak")
}
fn copy_kernel() -> Kernel {
    Kernel::new("bench_copy", "bench_copy", "copy_vec4")
}

/// The harness's own kernels (for naga validation).
pub fn kernels() -> Vec<Kernel> {
    vec![fma_kernel(), copy_kernel()]
}

/// Run the registered benchmarks whose name contains `filter` (all when empty).
pub fn run(gpu: &Gpu, filter: &str, quick: bool) -> Result<(Peaks, Vec<BenchResult>)> {
    let peaks = peaks(gpu, quick)?;
    let device = gpu.describe();
    let target = if quick { 0.3 } else { 1.5 };
    let mut results = Vec::new();
    for (name, setup) in registry() {
        if !filter.is_empty() && !name.contains(filter) {
            continue;
        }
        for mut case in setup(gpu, quick)? {
            let ms = time_ms(gpu, target, case.max_iters, &mut case.run)?;
            let secs = ms * 1e-3;
            let gflops = (case.flops > 0.0).then(|| case.flops / secs / 1e9);
            let gbps = (case.bytes > 0.0).then(|| case.bytes / secs / 1e9);
            let peak_pct = match (gflops, gbps) {
                (Some(g), _) => Some(100.0 * g / peaks.gflops),
                (None, Some(b)) => Some(100.0 * b / peaks.gbps),
                _ => None,
            };
            results.push(BenchResult {
                kernel: case.kernel,
                shape: case.shape,
                gflops,
                gbps,
                peak_pct,
                device: device.clone(),
                ms,
            });
        }
    }
    Ok((peaks, results))
}

/// A fixed-width table of results.
pub fn table(peaks: &Peaks, results: &[BenchResult]) -> String {
    let mut s = String::new();
    if let Some(r) = results.first() {
        s.push_str(&format!("device: {}\n", r.device));
    }
    s.push_str(&format!("peaks: {:.1} GFLOP/s (FMA), {:.1} GB/s (vec4 copy)\n", peaks.gflops, peaks.gbps));
    s.push_str(&format!(
        "{:<28} {:<26} {:>10} {:>10} {:>9} {:>7}\n",
        "kernel", "shape", "ms", "GFLOP/s", "GB/s", "% peak"
    ));
    let opt = |v: Option<f64>| v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into());
    for r in results {
        s.push_str(&format!(
            "{:<28} {:<26} {:>10.3} {:>10} {:>9} {:>7}\n",
            r.kernel,
            r.shape,
            r.ms,
            opt(r.gflops),
            opt(r.gbps),
            opt(r.peak_pct)
        ));
    }
    s
}

/// Memory-bound row ops on [rows, cols]: each reads and writes the tensor
/// once (bytes = 2 x 4 x rows x cols), next to a plain copy kernel.
fn rowop_cases(gpu: &Gpu, quick: bool) -> Result<Vec<Case>> {
    use crate::ops::{elementwise, norm, softmax};
    let (rows, cols) = if quick { (1024, 1024) } else { (4096, 4096) };
    let shape = format!("{rows}x{cols}");
    let x = Tensor::from_f32(gpu, &rand_vec(2, rows * cols, 1.0), &[rows, cols])?;
    let w = Tensor::from_f32(gpu, &rand_vec(3, cols, 1.0), &[cols])?;
    let bytes = 2.0 * 4.0 * (rows * cols) as f64;
    let case = |kernel: &str, run: Box<dyn FnMut() -> Result<()>>| Case {
        kernel: kernel.into(),
        shape: shape.clone(),
        flops: 0.0,
        bytes,
        max_iters: 20,
        run,
    };
    let (x1, x2, x3, x4, w3, w4) = (x.clone(), x.clone(), x.clone(), x.clone(), w.clone(), w.clone());
    Ok(vec![
        case("copy (shader, vec4)", Box::new(move || elementwise::copy_kernel(&x1).map(|_| ()))),
        case("softmax", Box::new(move || softmax::softmax(&x2).map(|_| ()))),
        case("rms_norm", Box::new(move || norm::rms_norm(&x3, &w3, 1e-6).map(|_| ()))),
        case("layer_norm", Box::new(move || norm::layer_norm(&x4, &w4, &w4, 1e-5).map(|_| ()))),
    ])
}

/// Matmul at realistic shapes on every kernel path that applies.
fn matmul_cases(gpu: &Gpu, quick: bool) -> Result<Vec<Case>> {
    // (M, K, N, label)
    let mut shapes: Vec<(usize, usize, usize, &str)> = vec![(1024, 1024, 1024, "square")];
    if !quick {
        shapes.push((4096, 576, 1536, "SmolLM2 FFN up"));
        shapes.push((4096, 1536, 576, "SmolLM2 FFN down"));
        shapes.push((2560, 128, 1024, "TIGER"));
        // TIGER T5 projections into d_model = 128 (attention output, FFN down): narrow N.
        shapes.push((2560, 384, 128, "TIGER attn out"));
        shapes.push((2560, 1024, 128, "TIGER FFN down"));
        shapes.push((384, 2560, 128, "TIGER dW-like"));
        // The small budget's T5 (d_model 64): FFN down takes the texture path, the 64 x 64
        // projections stay on mm_sg (Plan::tex_pays).
        shapes.push((2560, 256, 64, "small T5 FFN down"));
        shapes.push((2560, 64, 64, "small T5 attn out"));
    }
    let register = Plan::with_path(Path::Register);
    let tiled = Plan::with_path(Path::Tiled);
    let mut plans = vec![("matmul[register]", register), ("matmul[tiled]", tiled)];
    if matmul::subgroup_kernel_ok(gpu) {
        plans.insert(0, ("matmul[register, subgroup]", Plan { subgroup: true, ..register }));
    }
    if matmul::texture_kernel_ok(gpu) {
        plans.insert(0, ("matmul[texture]", Plan { subgroup: true, texture: true, ..register }));
    }
    let mut cases = Vec::new();
    for &(name, plan) in &plans {
        for &(m, k, n, label) in &shapes {
            if name == "matmul[register]" && plans.len() >= 3 && label != "square" {
                continue; // the subgroup kernel is the CPU path here; compare at one shape
            }
            if plan.path == Path::Tiled && gpu.is_cpu() {
                // The GPU path is slow on a CPU adapter: time it once, at 512^3.
                if label == "square" {
                    cases.push(matmul_case(gpu, name, plan, 512, 512, 512, label, false, false)?);
                }
                continue;
            }
            cases.push(matmul_case(gpu, name, plan, m, k, n, label, false, false)?);
        }
    }
    // Variants on the adapter's own plan: transposed B (the backward's dA) and f16 weights.
    let own = Plan::for_gpu(gpu);
    cases.push(matmul_case(gpu, "matmul[auto]", own, 1024, 1024, 1024, "square, B^T", false, true)?);
    cases.push(matmul_case(gpu, "matmul[auto]", own, 1024, 1024, 1024, "square, f16 B", true, false)?);
    Ok(cases)
}

#[allow(clippy::too_many_arguments)]
fn matmul_case(
    gpu: &Gpu,
    name: &str,
    plan: Plan,
    m: usize,
    k: usize,
    n: usize,
    label: &str,
    b_f16: bool,
    trans_b: bool,
) -> Result<Case> {
    let a = Tensor::from_f32(gpu, &rand_vec(1, m * k, 1.0), &[m, k])?;
    let bshape = if trans_b { [n, k] } else { [k, n] };
    let bv = rand_vec(2, k * n, 1.0);
    let b = if b_f16 { Tensor::from_f32_as_f16(gpu, &bv, &bshape)? } else { Tensor::from_f32(gpu, &bv, &bshape)? };
    let slow = plan.path == Path::Tiled && gpu.is_cpu();
    Ok(Case {
        kernel: name.to_string(),
        shape: format!("{m}x{k}x{n} ({label})"),
        flops: 2.0 * (m * k * n) as f64,
        bytes: 0.0,
        max_iters: if slow { 2 } else { 100 },
        run: Box::new(move || {
            let opts = MatmulOpts { trans_b, ..Default::default() };
            matmul::matmul_with_plan(&a, &b, &opts, &plan).map(|_| ())
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::div_ceil;

    #[test]
    fn peaks_and_a_tiny_matmul_case_produce_numbers() {
        let gpu = Gpu::shared().unwrap();
        let mut c =
            matmul_case(&gpu, "matmul[register]", Plan::with_path(Path::Register), 64, 32, 64, "t", false, false)
                .unwrap();
        let ms = time_ms(&gpu, 0.01, 3, &mut c.run).unwrap();
        assert!(ms > 0.0 && ms.is_finite());
        let r = BenchResult {
            kernel: c.kernel,
            shape: c.shape,
            gflops: Some(1.0),
            gbps: None,
            peak_pct: Some(2.0),
            device: gpu.describe(),
            ms,
        };
        let json = serde_json::to_string(&[r]).unwrap();
        assert!(json.contains("\"kernel\":\"matmul[register]\"") && json.contains("peak_pct"), "{json}");
    }

    #[test]
    fn peak_kernels_compute_what_they_claim() {
        // The copy kernel copies; the FMA kernel writes a finite value per invocation.
        let gpu = Gpu::shared().unwrap();
        let n4 = 100;
        let data: Vec<f32> = (0..n4 * 4).map(|i| i as f32).collect();
        let src = Tensor::from_f32(&gpu, &data, &[n4 * 4]).unwrap();
        let dst = Tensor::zeros(&gpu, &[n4 * 4], DType::F32).unwrap();
        let params = Params::new().u(n4).u(2);
        gpu.dispatch(&copy_kernel(), params.bytes(), &[src.buffer(), dst.buffer()], [2, 1, 1]).unwrap();
        assert_eq!(dst.to_vec_f32().unwrap(), data);
        let out = Tensor::zeros(&gpu, &[100], DType::F32).unwrap();
        let params = Params::new().u(8).u(100).u(2);
        gpu.dispatch(&fma_kernel(), params.bytes(), &[out.buffer()], [2, 1, 1]).unwrap();
        let v = out.to_vec_f32().unwrap();
        assert!(v.iter().all(|x| x.is_finite() && *x > 0.0), "{v:?}");
        assert_eq!(div_ceil(100, 64), 2);
    }
}
