//! Times each op of a SASRec-sized training step on the current adapter
//! (sync after each op, so this measures op latency including dispatch).
//! `cargo run --release --example step_profile`

use std::time::Instant;

use genrec::gpu::{Gpu, Tensor};
use genrec::ops::{self, matmul::MatmulOpts, Act};

fn time(name: &str, gpu: &Gpu, reps: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<()> {
    f()?;
    gpu.sync()?;
    let t = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    gpu.sync()?;
    println!("{name:<40} {:>9.2} ms", t.elapsed().as_secs_f64() * 1e3 / reps as f64);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let gpu = Gpu::shared()?;
    println!("{}", gpu.describe());
    let (b, l, d, v) = (128usize, 20usize, 64usize, 1352usize);
    let n = b * l;
    let rnd = |k: usize, s: &[usize]| {
        Tensor::from_f32(&gpu, &(0..k).map(|i| ((i * 7919 % 1000) as f32) / 1000.0 - 0.5).collect::<Vec<_>>(), s)
    };
    let x = rnd(n * d, &[n, d])?;
    let w = rnd(d * d, &[d, d])?;
    let e = rnd(v * d, &[v, d])?;
    let bias = rnd(d, &[d])?;
    time("linear [2560,64]x[64,64]^T +bias", &gpu, 20, || {
        ops::matmul::matmul(&x, &w, &MatmulOpts { trans_b: true, bias: Some(&bias), ..Default::default() }).map(|_| ())
    })?;
    time("linear no-trans [2560,64]x[64,64]", &gpu, 20, || {
        ops::matmul::matmul(&x, &w, &MatmulOpts::default()).map(|_| ())
    })?;
    time("logits [2560,64]x[1352,64]^T", &gpu, 5, || {
        ops::matmul::matmul(&x, &e, &MatmulOpts { trans_b: true, ..Default::default() }).map(|_| ())
    })?;
    let dl = rnd(n * v, &[n, v])?;
    time("logits backward (dx, dE)", &gpu, 5, || {
        ops::matmul::matmul_backward(&x, &e, &dl, false, true, true, true, false).map(|_| ())
    })?;
    time("linear backward (dx, dW, db)", &gpu, 20, || {
        ops::matmul::matmul_backward(&x, &w, &x, false, true, true, true, true).map(|_| ())
    })?;
    let tg: Vec<i32> = (0..n as i32).map(|i| i % v as i32).collect();
    let tg = Tensor::from_i32(&gpu, &tg, &[n])?;
    let o = ops::cross_entropy::CrossEntropyOpts::default();
    time("cross_entropy fwd+bwd [2560,1352]", &gpu, 5, || {
        let f = ops::cross_entropy::cross_entropy(&dl, &tg, &o)?;
        ops::cross_entropy::cross_entropy_backward(&dl, &tg, &f, &o, None).map(|_| ())
    })?;
    let ones = rnd(d, &[d])?;
    time("layer_norm fwd+bwd [2560,64]", &gpu, 20, || {
        let f = ops::norm::layer_norm(&x, &ones, &bias, 1e-8)?;
        ops::norm::layer_norm_backward(&x, &ones, &f.mean, &f.rstd, &x).map(|_| ())
    })?;
    let q = rnd(n * d, &[b, 1, l, d])?;
    let seg: Vec<Vec<i32>> = (0..b).map(|i| (0..l).map(|t| if t < i % l { -1 } else { 0 }).collect()).collect();
    let mask = ops::attention::MaskSpec::from_sequence(ops::attention::MaskKind::Causal, &seg, l)?.upload(&gpu)?;
    time("attention fwd+bwd [128,1,20,64]", &gpu, 10, || {
        let f = ops::attention::attention(&q, &q, &q, None, &mask, 0.125)?;
        ops::attention::attention_backward(&q, &q, &q, &q, &f.out, &f.lse, None, &mask, 0.125, false).map(|_| ())
    })?;
    let ids: Vec<u32> = (0..n as u32).map(|i| i % (v as u32 + 1)).collect();
    let ids = Tensor::from_u32(&gpu, &ids, &[n])?;
    time("embedding gather+scatter_add", &gpu, 10, || {
        let g = ops::embedding::gather(&e, &ids)?;
        ops::embedding::scatter_add(&g, &ids, v).map(|_| ())
    })?;
    let x3 = x.reshape(&[b, l, d])?;
    time("permute [128,20,1,64]->(0,2,1,3)", &gpu, 20, || {
        ops::permute::permute(&x3.reshape(&[b, l, 1, d])?, &[0, 2, 1, 3]).map(|_| ())
    })?;
    time("sum_to_shape [128,20,64]->[20,64]", &gpu, 20, || ops::reduce::sum_to_shape(&x3, &[l, d]).map(|_| ()))?;
    time("add broadcast + act", &gpu, 20, || {
        let y = ops::elementwise::add(&x3, &x3)?;
        ops::activation::forward(&y, Act::Relu).map(|_| ())
    })?;
    // LightGCN-sized pieces: ml-100k graph (2,292 nodes, ~195k directed edges), batch 2,048.
    let (nodes, nnz, bsz) = (2292usize, 194802usize, 2048usize);
    let triples: Vec<(u32, u32, f32)> =
        (0..nnz).map(|k| ((k * 7 % nodes) as u32, ((k * 13 + 5) % nodes) as u32, 0.01)).collect();
    let csr = ops::spmm::Csr::from_triples(&gpu, nodes, nodes, &triples)?;
    let emb = rnd(nodes * d, &[nodes, d])?;
    time("spmm [2292 nodes, 195k nnz] x [.,64]", &gpu, 10, || csr.a.matmul(&emb).map(|_| ()))?;
    let eu = rnd(bsz * d, &[bsz, 1, d])?;
    let ei = rnd(bsz * 2 * d, &[bsz, 2, d])?;
    time("batched scores [2048,1,64]x[2048,2,64]^T", &gpu, 10, || {
        ops::matmul::matmul(&eu, &ei, &MatmulOpts { trans_b: true, ..Default::default() }).map(|_| ())
    })?;
    let g = rnd(bsz * 2, &[bsz, 1, 2])?;
    time("batched scores backward", &gpu, 10, || {
        ops::matmul::matmul_backward(&eu, &ei, &g, false, true, true, true, false).map(|_| ())
    })?;
    let uids: Vec<u32> = (0..bsz as u32 * 2).map(|i| (i * 31) % 943).collect();
    let uids = Tensor::from_u32(&gpu, &uids, &[bsz * 2])?;
    time("gather+scatter_add 4096 ids into [2292,64]", &gpu, 10, || {
        let x = ops::embedding::gather(&emb, &uids)?;
        ops::embedding::scatter_add(&x, &uids, nodes).map(|_| ())
    })?;
    time("empty dispatch-bound: scale [64]", &gpu, 50, || ops::elementwise::scale(&bias, 2.0).map(|_| ()))?;
    Ok(())
}
