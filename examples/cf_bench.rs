//! LightGCN / SASRec speed on ml-100k (fetched and prepared if missing), with the
//! old and new kernels measured in the same run:
//! - SpMM over LightGCN's normalized adjacency (edges/s) with each kernel;
//! - BPR scores as a batched [B,1,64] x [B,2,64]^T matmul (before) vs `rowdot` (after);
//! - whole training epochs of LightGCN / MF (triples/s) and SASRec (positions/s).
//! `cargo run --release --example cf_bench -- [lightgcn_batch] [sasrec_epochs]`
//! (sasrec_epochs 0 skips SASRec). Op timings sync after each op (latency).

use std::time::Instant;

use genrec::cf::lightgcn::{LightGcn, LightGcnConfig};
use genrec::gpu::{Gpu, Tensor};
use genrec::ops::{self, matmul::MatmulOpts, spmm::SpmmKernel};

fn time(name: &str, gpu: &Gpu, reps: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    f()?;
    gpu.sync()?;
    let t = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    gpu.sync()?;
    let ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
    println!("{name:<52} {ms:>9.2} ms");
    Ok(ms)
}

/// `n` deterministic values in [-scale, scale).
fn rand_vec(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as u64 * 7919 + seed * 104729) % 1000) as f32 / 500.0 * scale - scale).collect()
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let batch: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(2048);
    let sasrec_epochs: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let gpu = Gpu::shared()?;
    println!("device: {}", gpu.describe());
    let data = genrec::pipeline::prepared_ml100k()?;
    let d = 64;
    let model = LightGcn::new(&gpu, &data, LightGcnConfig { d, epochs: 1, ..Default::default() })?;
    let adj = model.adjacency();
    let n = adj.a.rows;
    println!("LightGCN graph: {n} nodes, {} directed edges, D = {d}", adj.a.nnz);
    let x = Tensor::from_f32(&gpu, &rand_vec(1, n * d, 0.1), &[n, d])?;
    for k in [SpmmKernel::Scalar, SpmmKernel::Vec4, SpmmKernel::Subgroup] {
        if k == SpmmKernel::Subgroup && SpmmKernel::best(&gpu, d) != SpmmKernel::Subgroup {
            println!("spmm {k:?}: not available on this adapter");
            continue;
        }
        let ms = time(&format!("spmm {k:?} [{n} x {n}, {} nnz] x [{n}, {d}]", adj.a.nnz), &gpu, 10, || {
            adj.a.matmul_with(&x, k).map(|_| ())
        })?;
        println!(
            "{:<52} {:>9.2} M edges/s ({:.2} GFLOP/s)",
            "",
            adj.a.nnz as f64 / ms / 1e3,
            2.0 * (adj.a.nnz * d) as f64 / ms / 1e6
        );
    }
    let b = batch;
    let eu = Tensor::from_f32(&gpu, &rand_vec(2, b * d, 0.1), &[b, 1, d])?;
    let ei = Tensor::from_f32(&gpu, &rand_vec(3, b * 2 * d, 0.1), &[b, 2, d])?;
    let g = Tensor::from_f32(&gpu, &rand_vec(4, b * 2, 0.1), &[b, 1, 2])?;
    time(&format!("before: scores [{b},1,{d}] x [{b},2,{d}]^T matmul fwd"), &gpu, 5, || {
        ops::matmul::matmul(&eu, &ei, &MatmulOpts { trans_b: true, ..Default::default() }).map(|_| ())
    })?;
    time("before: scores matmul backward", &gpu, 5, || {
        ops::matmul::matmul_backward(&eu, &ei, &g, false, true, true, true, false).map(|_| ())
    })?;
    let eu2 = eu.reshape(&[b, d])?;
    let g2 = g.reshape(&[b, 2])?;
    time(&format!("after: rowdot [{b},{d}] . [{b},2,{d}] fwd"), &gpu, 10, || {
        ops::rowdot::rowdot(&eu2, &ei).map(|_| ())
    })?;
    time("after: rowdot backward", &gpu, 10, || ops::rowdot::rowdot_backward(&eu2, &ei, &g2, true, true).map(|_| ()))?;

    // Embedding backward ids: sorted on the GPU (before) vs on the host (after).
    let ids: Vec<u32> = (0..2 * b as u32).map(|i| (i * 7919) % n as u32).collect();
    let ids_t = Tensor::from_u32(&gpu, &ids, &[2 * b])?;
    let dy = Tensor::from_f32(&gpu, &rand_vec(5, 2 * b * d, 0.1), &[2 * b, d])?;
    time(&format!("before: scatter_add of {} ids, CSR built on the GPU", 2 * b), &gpu, 10, || {
        ops::embedding::scatter_add(&dy, &ids_t, n).map(|_| ())
    })?;
    time(&format!("after: scatter_add of {} ids, IdCsr::from_host", 2 * b), &gpu, 10, || {
        let csr = ops::embedding::IdCsr::from_host(&gpu, &ids, &[2 * b], n)?;
        ops::embedding::scatter_add_csr(&dy, &csr).map(|_| ())
    })?;

    // Whole epochs, timed from the epoch callback: the first epoch also compiles
    // every pipeline (seconds on lavapipe), so the second one is the steady rate.
    let triples: usize = (0..data.n_users())
        .map(|u| data.train_sequence(u).into_iter().collect::<std::collections::HashSet<_>>().len())
        .sum();
    let steps = triples.div_ceil(batch);
    let lcfg = LightGcnConfig { d, epochs: 2, batch_size: batch, ..Default::default() };
    let mcfg = genrec::cf::mf::MfConfig { d, epochs: 2, batch_size: batch, ..Default::default() };
    for (name, m) in [
        ("LightGCN (3 layers)", LightGcn::new(&gpu, &data, lcfg)?),
        ("MF (BPR)", genrec::cf::mf::new(&gpu, &data, &mcfg)?),
    ] {
        let mut t = Instant::now();
        let mut secs = Vec::new();
        m.fit(|_, _| {
            secs.push(t.elapsed().as_secs_f64());
            t = Instant::now();
            Ok(true)
        })?;
        println!(
            "{name}: {triples} triples/epoch, batch {batch}: first epoch {:.2} s, second {:.2} s ({:.0} triples/s, {:.0} ms/step)",
            secs[0],
            secs[1],
            triples as f64 / secs[1],
            secs[1] * 1e3 / steps as f64
        );
    }
    if sasrec_epochs > 0 {
        use genrec::cf::sasrec::{SasRec, SasRecConfig};
        let cfg = SasRecConfig {
            d_model: d,
            max_len: data.options.max_history.max(1),
            epochs: sasrec_epochs,
            ..Default::default()
        };
        let m = SasRec::new(&gpu, data.n_items(), cfg.clone())?;
        let t = Instant::now();
        m.fit(&data, |_, _| Ok(true))?;
        let s = t.elapsed().as_secs_f64() / sasrec_epochs as f64;
        // Training positions per epoch: every train item after the first, per user.
        let positions: usize = (0..data.n_users()).map(|u| data.train_sequence(u).len().saturating_sub(1)).sum();
        println!(
            "SASRec d {d}, batch {}: {s:.1} s/epoch, {:.0} training positions/s",
            cfg.batch_size,
            positions as f64 / s
        );
    }
    Ok(())
}
