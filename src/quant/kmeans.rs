//! K-means: seeded k-means++ initialisation and Lloyd iterations with GPU
//! assignment (`nearest`) and a deterministic GPU centroid update (per-chunk
//! partial sums reduced in a fixed order; no float atomics).
//! WGSL: `shaders/kmeans.wgsl`.
//!
//! Rules shared by the GPU path and the CPU reference [`lloyd_cpu`]:
//! - objective[t] = sum of squared distances of the assignment to centroids C_t;
//! - stop after iteration t > 0 if no assignment changed or the objective
//!   improved by at most `tol * objective[t-1]`, or after `max_iter` iterations;
//!   the returned centroids and assignment are C_t and argmin(C_t) (consistent);
//! - an empty cluster is reseeded at the point farthest from its centroid
//!   (largest distance, ties to the lowest index; several empties take the
//!   next farthest points), as scikit-learn does.

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};

use super::nearest::{codeword_sqnorms, nearest_with_norms};
use super::{check_finite, fold_grid, matrix};
use crate::gpu::{check, shape_str, DType, Kernel, Params, Tensor};

const WG: usize = 64;
/// Budget for the per-chunk partial sums (f32 elements).
const PARTIAL_BUDGET: usize = 8 << 20;

fn kernel(entry: &'static str) -> Kernel {
    let name = match entry {
        "accum" => "kmeans::accum",
        "finalize" => "kmeans::finalize",
        _ => "kmeans::kpp_update",
    };
    Kernel::new(name, "kmeans", entry).define("WG", format!("{WG}u"))
}

/// Kernel variants for naga validation.
pub fn kernels() -> Vec<Kernel> {
    vec![kernel("accum"), kernel("finalize"), kernel("kpp_update")]
}

/// Lloyd options.
#[derive(Clone, Copy, Debug)]
pub struct KmeansOpts {
    /// Maximum number of assignment steps.
    pub max_iter: usize,
    /// Relative objective improvement below which iteration stops.
    pub tol: f64,
    /// Seed of the k-means++ initialisation.
    pub seed: u64,
}

impl Default for KmeansOpts {
    fn default() -> Self {
        KmeansOpts { max_iter: 100, tol: 1e-4, seed: 42 }
    }
}

/// Result of k-means: `centroids: F32 [k, d]`, `assign: U32 [n]` (argmin of
/// the returned centroids), `objective[t]` for every iteration run.
#[derive(Debug)]
pub struct KmeansResult {
    pub centroids: Tensor,
    pub assign: Tensor,
    pub objective: Vec<f64>,
}

fn params(
    n: usize,
    d: usize,
    kc: usize,
    chunk: usize,
    nchunks: usize,
    gx: usize,
    center: usize,
    first: bool,
) -> Params {
    Params::new().u(n).u(d).u(kc).u(chunk).u(nchunks).u(gx).u(center).u(first as usize)
}

/// Draw an index with probability proportional to `w` (k-means++ D^2
/// sampling); uniform over not-yet-chosen rows when all weights are zero.
fn pp_pick(w: &[f64], chosen: &[usize], rng: &mut rand::rngs::StdRng) -> usize {
    let total: f64 = w.iter().sum();
    if !(total > 0.0) {
        let free: Vec<usize> = (0..w.len()).filter(|i| !chosen.contains(i)).collect();
        return if free.is_empty() { rng.gen_range(0..w.len()) } else { free[rng.gen_range(0..free.len())] };
    }
    let r = rng.gen::<f64>() * total;
    let mut cum = 0.0;
    let mut last = 0;
    for (i, &v) in w.iter().enumerate() {
        if v > 0.0 {
            cum += v;
            last = i;
            if cum > r {
                return i;
            }
        }
    }
    last
}

fn check_k(op: &str, x: &Tensor, n: usize, k: usize) -> Result<()> {
    if k == 0 || k > n {
        bail!("{op}: cannot make {k} clusters from x {} ({n} points); need 1 <= k <= points", shape_str(x.shape()));
    }
    Ok(())
}

/// Seeded k-means++ initialisation: `x: [n, d]` -> row indices of the `k`
/// chosen centers. The D^2 distance updates run on the GPU; the sampling on the
/// host (one readback of `[n]` per center).
pub fn kmeans_pp_indices(x: &Tensor, k: usize, seed: u64) -> Result<Vec<usize>> {
    let op = "kmeans_pp";
    let (n, d) = matrix(op, "x", x)?;
    check_k(op, x, n, k)?;
    let gpu = x.gpu();
    let mind = Tensor::empty(gpu, &[n], DType::F32)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut chosen = vec![rng.gen_range(0..n)];
    let (grid, gx) = fold_grid(n.div_ceil(WG));
    while chosen.len() < k {
        let c = *chosen.last().unwrap();
        gpu.dispatch(
            &kernel("kpp_update"),
            params(n, d, 0, 0, 0, gx, c, chosen.len() == 1).bytes(),
            &[x.buffer(), mind.buffer()],
            grid,
        )?;
        let w: Vec<f64> = mind.to_vec_f32()?.into_iter().map(|v| v as f64).collect();
        chosen.push(pp_pick(&w, &chosen, &mut rng));
    }
    Ok(chosen)
}

/// Gather rows `idx` of `x: [n, d]` into a new `[idx.len(), d]` tensor (GPU copies).
pub fn gather_rows(x: &Tensor, idx: &[usize]) -> Result<Tensor> {
    let (n, d) = matrix("gather_rows", "x", x)?;
    let out = Tensor::empty(x.gpu(), &[idx.len(), d], DType::F32)?;
    for (r, &i) in idx.iter().enumerate() {
        if i >= n {
            bail!("gather_rows: row {i} out of range for x {}", shape_str(x.shape()));
        }
        copy_row(x, i, &out, r, d);
    }
    Ok(out)
}

fn copy_row(src: &Tensor, i: usize, dst: &Tensor, r: usize, d: usize) {
    let bytes = (d * 4) as u64;
    src.gpu().with_encoder(|e| {
        e.copy_buffer_to_buffer(src.buffer(), i as u64 * bytes, dst.buffer(), r as u64 * bytes, bytes)
    });
}

/// K-means with seeded k-means++ initialisation then [`lloyd`].
pub fn kmeans(x: &Tensor, k: usize, opts: KmeansOpts) -> Result<KmeansResult> {
    check_finite("kmeans", "x", x)?;
    let idx = kmeans_pp_indices(x, k, opts.seed)?;
    let init = gather_rows(x, &idx)?;
    lloyd(x, &init, opts)
}

/// Lloyd iterations from the given centroids: `x: [n, d]`, `init: [k, d]`.
/// See the module docs for the stopping and reseeding rules. Reads back
/// `2 * chunks + k` words per iteration (objective, changes, cluster sizes).
pub fn lloyd(x: &Tensor, init: &Tensor, opts: KmeansOpts) -> Result<KmeansResult> {
    let op = "kmeans";
    let (n, d) = matrix(op, "x", x)?;
    let (k, di) = matrix(op, "init centroids", init)?;
    check::same_device(op, &[x, init])?;
    if d != di {
        bail!(
            "{op}: x {} and init centroids {} have different dimensions",
            shape_str(x.shape()),
            shape_str(init.shape())
        );
    }
    check_k(op, x, n, k)?;
    if opts.max_iter == 0 {
        bail!("{op}: max_iter must be at least 1");
    }
    check_finite(op, "x", x)?;
    check_finite(op, "init centroids", init)?;
    let gpu = x.gpu();

    let nchunks = n.div_ceil(64).min((PARTIAL_BUDGET / (k * d)).max(1)).max(1);
    let chunk = n.div_ceil(nchunks);
    let nchunks = n.div_ceil(chunk);
    let mut cur = init.duplicate()?;
    let mut next = Tensor::empty(gpu, &[k, d], DType::F32)?;
    let mut prev = Tensor::from_u32(gpu, &vec![u32::MAX; n], &[n])?;
    let partial = Tensor::empty(gpu, &[nchunks * k * d], DType::F32)?;
    let pcount = Tensor::empty(gpu, &[nchunks * k], DType::U32)?;
    let stats = Tensor::empty(gpu, &[nchunks * 2], DType::F32)?;
    let counts = Tensor::empty(gpu, &[k], DType::U32)?;
    let (agrid, agx) = fold_grid((nchunks * (d + 1)).div_ceil(WG));
    let (fgrid, fgx) = fold_grid((k * d).div_ceil(WG));

    let mut objective = Vec::new();
    loop {
        let enorm = codeword_sqnorms(&cur)?;
        let near = nearest_with_norms(x, &cur, Some(&enorm))?;
        gpu.with_encoder(|e| {
            e.clear_buffer(partial.buffer(), 0, Some((nchunks * k * d * 4) as u64));
            e.clear_buffer(pcount.buffer(), 0, Some((nchunks * k * 4) as u64));
        });
        gpu.dispatch(
            &kernel("accum"),
            params(n, d, k, chunk, nchunks, agx, 0, false).bytes(),
            &[
                x.buffer(),
                near.idx.buffer(),
                prev.buffer(),
                near.dist.buffer(),
                partial.buffer(),
                pcount.buffer(),
                stats.buffer(),
            ],
            agrid,
        )?;
        gpu.dispatch(
            &kernel("finalize"),
            params(n, d, k, chunk, nchunks, fgx, 0, false).bytes(),
            &[partial.buffer(), pcount.buffer(), cur.buffer(), next.buffer(), counts.buffer()],
            fgrid,
        )?;
        let st = stats.to_vec_f32()?;
        let obj: f64 = st.iter().step_by(2).map(|&v| v as f64).sum();
        let changed: f64 = st.iter().skip(1).step_by(2).map(|&v| v as f64).sum();
        if !obj.is_finite() {
            bail!("{op}: objective became non-finite at iteration {} (x {})", objective.len(), shape_str(x.shape()));
        }
        objective.push(obj);
        let t = objective.len();
        let stop = t > 1 && (changed == 0.0 || objective[t - 2] - obj <= opts.tol * objective[t - 2]);
        if stop || t >= opts.max_iter {
            return Ok(KmeansResult { centroids: cur, assign: near.idx, objective });
        }
        let cnt = counts.to_vec_u32()?;
        let empties: Vec<usize> = (0..k).filter(|&c| cnt[c] == 0).collect();
        if !empties.is_empty() {
            let far = farthest(&near.dist.to_vec_f32()?.iter().map(|&v| v as f64).collect::<Vec<_>>(), empties.len());
            for (&c, &i) in empties.iter().zip(&far) {
                copy_row(x, i, &next, c, d);
            }
        }
        std::mem::swap(&mut cur, &mut next);
        prev = near.idx;
    }
}

/// Indices of the `m` largest values of `dist`, ties to the lowest index.
fn farthest(dist: &[f64], m: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..dist.len()).collect();
    order.sort_by(|&a, &b| dist[b].total_cmp(&dist[a]).then(a.cmp(&b)));
    order.truncate(m);
    order
}

/// CPU reference of [`kmeans_pp_indices`] (f64 distances, same RNG stream).
pub fn kmeans_pp_cpu(x: &[f32], d: usize, k: usize, seed: u64) -> Vec<usize> {
    let n = x.len() / d;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut chosen = vec![rng.gen_range(0..n)];
    let mut mind = vec![f64::INFINITY; n];
    while chosen.len() < k {
        let c = *chosen.last().unwrap();
        for i in 0..n {
            let s: f64 = (0..d).map(|t| (x[i * d + t] as f64 - x[c * d + t] as f64).powi(2)).sum();
            mind[i] = mind[i].min(s);
        }
        chosen.push(pp_pick(&mind, &chosen, &mut rng));
    }
    chosen
}

/// CPU reference of [`lloyd`] in f64 with the same rules. `x: [n, d]`,
/// `init: [k, d]`. Returns (centroids [k, d], assignment [n], objective per
/// iteration).
pub fn lloyd_cpu(x: &[f32], init: &[f32], d: usize, max_iter: usize, tol: f64) -> (Vec<f64>, Vec<u32>, Vec<f64>) {
    let n = x.len() / d;
    let k = init.len() / d;
    let mut cur: Vec<f64> = init.iter().map(|&v| v as f64).collect();
    let mut prev = vec![u32::MAX; n];
    let mut objective = Vec::new();
    loop {
        let mut assign = vec![0u32; n];
        let mut dist = vec![0f64; n];
        for i in 0..n {
            let mut best = (f64::INFINITY, 0u32);
            for c in 0..k {
                let s: f64 = (0..d).map(|t| (x[i * d + t] as f64 - cur[c * d + t]).powi(2)).sum();
                if s < best.0 {
                    best = (s, c as u32);
                }
            }
            (dist[i], assign[i]) = best;
        }
        let obj: f64 = dist.iter().sum();
        let changed = assign.iter().zip(&prev).filter(|(a, b)| a != b).count();
        objective.push(obj);
        let t = objective.len();
        if (t > 1 && (changed == 0 || objective[t - 2] - obj <= tol * objective[t - 2])) || t >= max_iter {
            return (cur, assign, objective);
        }
        let mut sum = vec![0f64; k * d];
        let mut cnt = vec![0usize; k];
        for i in 0..n {
            let c = assign[i] as usize;
            cnt[c] += 1;
            for t in 0..d {
                sum[c * d + t] += x[i * d + t] as f64;
            }
        }
        let mut next = cur.clone();
        for c in 0..k {
            if cnt[c] > 0 {
                for t in 0..d {
                    next[c * d + t] = sum[c * d + t] / cnt[c] as f64;
                }
            }
        }
        let empties: Vec<usize> = (0..k).filter(|&c| cnt[c] == 0).collect();
        for (&c, &i) in empties.iter().zip(&farthest(&dist, empties.len())) {
            for t in 0..d {
                next[c * d + t] = x[i * d + t] as f64;
            }
        }
        cur = next;
        prev = assign;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::Gpu;
    use crate::ops::testing::{assert_close, rand_vec};

    /// `n` points around `k` well-separated random centers, plus noise.
    fn blobs(seed: u64, n: usize, d: usize, k: usize) -> Vec<f32> {
        let centers = rand_vec(seed, k * d, 4.0);
        let noise = rand_vec(seed + 1, n * d, 1.0);
        (0..n)
            .flat_map(|i| (0..d).map(move |t| (i, t)))
            .map(|(i, t)| centers[(i % k) * d + t] + noise[i * d + t])
            .collect()
    }

    fn run_both(x: &[f32], d: usize, init: &[f32], max_iter: usize) {
        let gpu = Gpu::shared().unwrap();
        let n = x.len() / d;
        let k = init.len() / d;
        let xt = Tensor::from_f32(&gpu, x, &[n, d]).unwrap();
        let it = Tensor::from_f32(&gpu, init, &[k, d]).unwrap();
        let r = lloyd(&xt, &it, KmeansOpts { max_iter, tol: 0.0, seed: 0 }).unwrap();
        let (cc, ca, co) = lloyd_cpu(x, init, d, max_iter, 0.0);
        assert_eq!(r.objective.len(), co.len(), "iterations: gpu {:?} cpu {:?}", r.objective, co);
        for w in r.objective.windows(2) {
            assert!(w[1] <= w[0] * (1.0 + 1e-6), "objective increased: {:?}", r.objective);
        }
        let go: Vec<f32> = r.objective.iter().map(|&v| v as f32).collect();
        let wo: Vec<f32> = co.iter().map(|&v| v as f32).collect();
        assert_close("objective", &go, &wo, 1e-5, 1e-5);
        assert_eq!(r.assign.to_vec_u32().unwrap(), ca);
        let wc: Vec<f32> = cc.iter().map(|&v| v as f32).collect();
        assert_close("centroids", &r.centroids.to_vec_f32().unwrap(), &wc, 1e-5, 1e-5);
    }

    #[test]
    fn lloyd_matches_cpu_from_same_init() {
        for &(n, d, k, seed) in &[(257, 7, 5, 1u64), (33, 3, 4, 2), (300, 33, 16, 3), (1, 2, 1, 4)] {
            let x = blobs(seed, n, d, k.max(2));
            let idx = kmeans_pp_cpu(&x, d, k, seed);
            let init: Vec<f32> = idx.iter().flat_map(|&i| x[i * d..(i + 1) * d].to_vec()).collect();
            run_both(&x, d, &init, 20);
        }
    }

    #[test]
    fn empty_clusters_are_reseeded_at_the_farthest_point() {
        // Centroids 1 and 2 duplicate centroid 0 (ties -> only 0 gets points);
        // centroid 3 is far from everything: 3 empty clusters on iteration 1.
        let d = 4;
        let x = blobs(9, 120, d, 6);
        let mut init = x[0..d].to_vec();
        init.extend_from_slice(&x[0..d]);
        init.extend_from_slice(&x[0..d]);
        init.extend([100.0f32; 4]);
        init.extend_from_slice(&x[5 * d..6 * d]);
        run_both(&x, d, &init, 15);
        let gpu = Gpu::shared().unwrap();
        let xt = Tensor::from_f32(&gpu, &x, &[120, d]).unwrap();
        let it = Tensor::from_f32(&gpu, &init, &[5, d]).unwrap();
        let r = lloyd(&xt, &it, KmeansOpts { max_iter: 15, tol: 0.0, seed: 0 }).unwrap();
        let a = r.assign.to_vec_u32().unwrap();
        for c in 0..5u32 {
            assert!(a.contains(&c), "cluster {c} still empty: {:?}", r.objective);
        }
    }

    #[test]
    fn kmeans_pp_is_seeded_and_matches_cpu() {
        let gpu = Gpu::shared().unwrap();
        let (n, d, k) = (200, 5, 12);
        let x = blobs(5, n, d, 6);
        let xt = Tensor::from_f32(&gpu, &x, &[n, d]).unwrap();
        let a = kmeans_pp_indices(&xt, k, 7).unwrap();
        assert_eq!(a, kmeans_pp_indices(&xt, k, 7).unwrap());
        assert_eq!(a, kmeans_pp_cpu(&x, d, k, 7));
        let mut s = a.clone();
        s.sort();
        s.dedup();
        assert_eq!(s.len(), k, "centers must be distinct points: {a:?}");
        let r = kmeans(&xt, 6, KmeansOpts::default()).unwrap();
        assert!(r.objective.len() >= 2 && r.objective.last().unwrap() <= &r.objective[0]);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let gpu = Gpu::shared().unwrap();
        let x = Tensor::from_f32(&gpu, &rand_vec(1, 5 * 3, 1.0), &[5, 3]).unwrap();
        let e = kmeans(&x, 6, KmeansOpts::default()).unwrap_err().to_string();
        assert!(e.contains("kmeans") && e.contains("6 clusters") && e.contains("[5, 3]"), "{e}");
        let init = Tensor::from_f32(&gpu, &rand_vec(2, 2 * 4, 1.0), &[2, 4]).unwrap();
        let e = lloyd(&x, &init, KmeansOpts::default()).unwrap_err().to_string();
        assert!(e.contains("kmeans") && e.contains("[5, 3]") && e.contains("[2, 4]"), "{e}");
        let mut v = rand_vec(3, 15, 1.0);
        v[4] = f32::INFINITY;
        let xb = Tensor::from_f32(&gpu, &v, &[5, 3]).unwrap();
        let e = kmeans(&xb, 2, KmeansOpts::default()).unwrap_err().to_string();
        assert!(e.contains("kmeans") && e.contains("non-finite"), "{e}");
    }
}
