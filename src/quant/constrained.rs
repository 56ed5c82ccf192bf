//! Size-constrained k-means, as LETTER's diversity regularisation uses (the
//! LETTER code calls the `k-means-constrained` package: every cluster holds
//! between `size_min` and `size_max` points; the assignment step is a
//! min-cost flow; `max_iter = 10`, `n_init = 10`).
//!
//! Here: distances `[n, k]` are computed on the GPU (`pairwise_sqdist`); the
//! assignment step is solved **exactly** on the host by [`constrained_assign`]
//! as a min-cost flow: start from the unconstrained argmin (optimal for its own
//! cluster sizes; returned directly when it satisfies the bounds) and repair it
//! by successive shortest paths over the k-node "move" graph whose edge a -> b
//! costs `min over p in a of (D[p][b] - D[p][a])`. A path starts at a cluster
//! giving up a point (cost -B while above `size_max`, 0 while above `size_min`;
//! B exceeds any assignment's cost spread, so violations are repaired first),
//! moves one point along each edge, and ends at a cluster absorbing one (-B
//! while below `size_min`, 0 while below `size_max`); paths are augmented while
//! their cost is negative. The move graph is kept incrementally (only rows of
//! clusters a path touched are recomputed) and shortest paths come from a dense
//! Dijkstra on reduced costs `w(a, b) + pi(a) - pi(b)` with Johnson potentials
//! (0 at the argmin, where every move costs >= 0; then the last distances:
//! tree edges stay tight and edges created by moving a point along a shortest
//! path have non-negative reduced cost by the triangle inequality). Cost:
//! O(n k + (#augmentations) k^2), #augmentations ~ the total bound violation of
//! the argmin, against O(n^2 k + n k^3) for the previous version (points
//! inserted one by one, Bellman-Ford over a move graph rebuilt from every
//! assigned point; kept as the test reference).
//! The centroid (mean) step runs on the host in f64.

use anyhow::{bail, Result};

use super::kmeans::kmeans_pp_indices;
use super::nearest::pairwise_sqdist;
use super::{check_finite, matrix};
use crate::gpu::{shape_str, Tensor};

/// Options of [`constrained_kmeans`]; defaults are LETTER's.
#[derive(Clone, Copy, Debug)]
pub struct ConstrainedOpts {
    pub size_min: usize,
    pub size_max: usize,
    /// Lloyd rounds per initialisation.
    pub max_iter: usize,
    /// Independent k-means++ initialisations; the lowest objective wins.
    pub n_init: usize,
    pub seed: u64,
}

impl ConstrainedOpts {
    /// LETTER's solver settings with the given size bounds.
    pub fn letter(size_min: usize, size_max: usize) -> ConstrainedOpts {
        ConstrainedOpts { size_min, size_max, max_iter: 10, n_init: 10, seed: 42 }
    }
}

/// Result: `centroids: [k, d]` (means of the final clusters), `assign: [n]`,
/// `objective` = sum of squared distances to the final means, and the
/// per-round objectives of the winning initialisation.
#[derive(Debug, Clone)]
pub struct ConstrainedResult {
    pub centroids: Vec<f32>,
    pub assign: Vec<u32>,
    pub objective: f64,
    pub history: Vec<f64>,
}

fn check_bounds(op: &str, n: usize, k: usize, lo: usize, hi: usize) -> Result<()> {
    if k == 0 || n < k {
        bail!("{op}: cannot make {k} clusters from {n} points; need 1 <= k <= points");
    }
    if lo > hi || k * lo > n || k * hi < n {
        bail!("{op}: size bounds [{lo}, {hi}] for {k} clusters cannot hold exactly {n} points");
    }
    Ok(())
}

/// Exact min-cost assignment of `n` points to `k` clusters with every cluster
/// size in `[size_min, size_max]`. `cost: [n, k]` row-major. Ties resolve
/// deterministically (lowest indices first).
pub fn constrained_assign(cost: &[f64], n: usize, k: usize, size_min: usize, size_max: usize) -> Result<Vec<u32>> {
    let op = "constrained_assign";
    if cost.len() != n * k {
        bail!("{op}: cost has {} values, expected [{n}, {k}]", cost.len());
    }
    check_bounds(op, n, k, size_min, size_max)?;
    if cost.iter().any(|v| !v.is_finite()) {
        bail!("{op}: cost [{n}, {k}] holds non-finite values");
    }
    // Fast path: the unconstrained optimum, when it is feasible.
    let argmin: Vec<u32> = (0..n)
        .map(|i| {
            let row = &cost[i * k..(i + 1) * k];
            (0..k).fold(0, |b, c| if row[c] < row[b] { c } else { b }) as u32
        })
        .collect();
    let mut size = vec![0usize; k];
    argmin.iter().for_each(|&c| size[c as usize] += 1);
    if size.iter().all(|&s| s >= size_min && s <= size_max) {
        return Ok(argmin);
    }

    let lo = cost.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = cost.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let big = (n as f64 + 1.0) * (hi - lo + 1.0);
    let tol = 1e-12 * (1.0 + hi.abs().max(lo.abs())) * n as f64;
    // Repair the argmin assignment (optimal for its own sizes) by successive
    // shortest paths: a path starts at a cluster that gives a point up (cost
    // -B while it is above size_max, 0 while above size_min), moves points
    // along move edges, and ends at a cluster that absorbs one (-B while below
    // size_min, 0 while below size_max). Paths are augmented while their cost
    // is negative, so all bound violations are repaired first.
    let mut assign = argmin;
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); k];
    for (p, &c) in assign.iter().enumerate() {
        members[c as usize].push(p);
    }
    // Move graph: w[a * k + b] = min over p in a of (cost[p][b] - cost[p][a]),
    // attained by point wp[a * k + b]; only the rows of clusters an augmenting
    // path touched are recomputed.
    let mut w = vec![f64::INFINITY; k * k];
    let mut wp = vec![0usize; k * k];
    let rebuild_row = |a: usize, members: &[Vec<usize>], w: &mut [f64], wp: &mut [usize]| {
        let row = &mut w[a * k..(a + 1) * k];
        row.iter_mut().for_each(|v| *v = f64::INFINITY);
        let mut ms = members[a].clone();
        ms.sort_unstable(); // lowest point index wins ties, independent of history
        for &p in &ms {
            let cr = &cost[p * k..(p + 1) * k];
            for b in 0..k {
                let c = cr[b] - cr[a];
                if b != a && c < row[b] {
                    row[b] = c;
                    wp[a * k + b] = p;
                }
            }
        }
    };
    for a in 0..k {
        rebuild_row(a, &members, &mut w, &mut wp);
    }
    let give = |sz: usize| {
        if sz > size_max {
            -big
        } else if sz > size_min {
            0.0
        } else {
            f64::INFINITY
        }
    };
    let absorb = |sz: usize| {
        if sz < size_min {
            -big
        } else if sz < size_max {
            0.0
        } else {
            f64::INFINITY
        }
    };
    // Johnson potentials: every move edge keeps a non-negative reduced cost
    // w[a][b] + pi[a] - pi[b] (all w >= 0 at the argmin, so pi = 0 to start;
    // then pi = the last shortest distances).
    let mut pi = vec![0f64; k];
    let mut dist = vec![0f64; k];
    let mut red = vec![0f64; k];
    let mut done = vec![false; k];
    let mut pred: Vec<Option<(usize, usize)>> = vec![None; k];
    for _aug in 0..=n * k {
        let mut any = false;
        for c in 0..k {
            let g = give(size[c]);
            red[c] = if g.is_finite() { g - pi[c] } else { f64::INFINITY };
            any |= g.is_finite();
            done[c] = false;
            pred[c] = None;
        }
        if !any {
            break;
        }
        // Dense Dijkstra on reduced costs (start labels may be arbitrary).
        for _ in 0..k {
            let mut a = usize::MAX;
            for c in 0..k {
                if !done[c] && red[c].is_finite() && (a == usize::MAX || red[c] < red[a] - tol) {
                    a = c;
                }
            }
            if a == usize::MAX {
                break;
            }
            done[a] = true;
            if members[a].is_empty() {
                continue;
            }
            for b in 0..k {
                let e = w[a * k + b];
                if done[b] || !e.is_finite() {
                    continue;
                }
                let r = (e + pi[a] - pi[b]).max(0.0); // clamped against rounding
                if red[a] + r < red[b] - tol {
                    red[b] = red[a] + r;
                    pred[b] = Some((a, wp[a * k + b]));
                }
            }
        }
        let mut best = (-tol, usize::MAX);
        for c in 0..k {
            if red[c].is_finite() {
                dist[c] = red[c] + pi[c];
                let t = dist[c] + absorb(size[c]);
                if t < best.0 {
                    best = (t, c);
                }
            }
        }
        if best.1 == usize::MAX {
            break; // no improving path: optimal
        }
        // Walk the path back from its end: each predecessor edge moves one point.
        let mut cur = best.1;
        size[cur] += 1;
        let mut touched = vec![cur];
        let mut guard = 0;
        while let Some((a, p)) = pred[cur] {
            members[a].retain(|&q| q != p);
            members[cur].push(p);
            assign[p] = cur as u32;
            cur = a;
            touched.push(cur);
            guard += 1;
            if guard > k {
                bail!("{op}: internal error: cyclic augmenting path");
            }
        }
        size[cur] -= 1;
        for &a in &touched {
            rebuild_row(a, &members, &mut w, &mut wp);
        }
        // Unreached clusters (none while a giver exists: the move graph is
        // complete among non-empty clusters) keep their potential.
        for c in 0..k {
            if red[c].is_finite() {
                pi[c] = dist[c];
            }
        }
    }
    if size.iter().any(|&s| s < size_min || s > size_max) {
        bail!("{op}: no feasible assignment found (bounds [{size_min}, {size_max}], [{n}, {k}])");
    }
    Ok(assign)
}

/// The previous exact solver (Bellman-Ford over a move graph rebuilt from
/// every assigned point at every insertion, O(n^2 k + n k^3)): the test
/// reference of [`constrained_assign`].
#[cfg(test)]
#[allow(clippy::needless_range_loop)]
fn constrained_assign_bellman_ford(cost: &[f64], n: usize, k: usize, size_min: usize, size_max: usize) -> Vec<u32> {
    let lo = cost.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = cost.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let big = (n as f64 + 1.0) * (hi - lo + 1.0);
    let tol = 1e-12 * (1.0 + hi.abs().max(lo.abs()));
    const NONE: u32 = u32::MAX;
    let mut assign = vec![NONE; n];
    let mut size = vec![0usize; k];
    let mut w = vec![f64::INFINITY; k * k];
    let mut wp = vec![0usize; k * k];
    let mut dist = vec![0f64; k];
    let mut pred: Vec<Option<(usize, usize)>> = vec![None; k];
    for s in 0..n {
        // Move graph among clusters.
        w.iter_mut().for_each(|v| *v = f64::INFINITY);
        for p in 0..s {
            let a = assign[p] as usize;
            let row = &cost[p * k..(p + 1) * k];
            for b in 0..k {
                let c = row[b] - row[a];
                if b != a && c < w[a * k + b] {
                    w[a * k + b] = c;
                    wp[a * k + b] = p;
                }
            }
        }
        dist.copy_from_slice(&cost[s * k..(s + 1) * k]);
        pred.iter_mut().for_each(|v| *v = None);
        for _round in 0..k {
            let mut changed = false;
            for a in 0..k {
                for b in 0..k {
                    let e = w[a * k + b];
                    if e.is_finite() && dist[a] + e < dist[b] - tol {
                        dist[b] = dist[a] + e;
                        pred[b] = Some((a, wp[a * k + b]));
                        changed = true;
                    }
                }
            }
            if !changed {
                break;
            }
        }
        let term = |c: usize| {
            if size[c] < size_min {
                -big
            } else if size[c] < size_max {
                0.0
            } else {
                f64::INFINITY
            }
        };
        let mut best = (f64::INFINITY, usize::MAX);
        for c in 0..k {
            let t = dist[c] + term(c);
            if t < best.0 - tol {
                best = (t, c);
            }
        }
        if best.1 == usize::MAX {
            panic!("infeasible");
        }
        // Walk the path back: each predecessor edge moves one point into `cur`.
        let mut cur = best.1;
        size[cur] += 1;
        let mut guard = 0;
        while let Some((a, p)) = pred[cur] {
            assign[p] = cur as u32;
            cur = a;
            guard += 1;
            if guard > k {
                panic!("cycle");
            }
        }
        assign[s] = cur as u32;
    }
    assign
}

fn sq(a: &[f32], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).powi(2)).sum()
}

/// Size-constrained k-means of `x: [n, d]` into `k` clusters with sizes in
/// `[opts.size_min, opts.size_max]`: k-means++ init (seed + run), then rounds
/// of GPU distances + exact constrained assignment + mean update until the
/// assignment stops changing or `max_iter`; best of `n_init` runs.
pub fn constrained_kmeans(x: &Tensor, k: usize, opts: ConstrainedOpts) -> Result<ConstrainedResult> {
    let op = "constrained_kmeans";
    let (n, d) = matrix(op, "x", x)?;
    check_bounds(op, n, k, opts.size_min, opts.size_max)
        .map_err(|e| anyhow::anyhow!("{e} (x {})", shape_str(x.shape())))?;
    if opts.max_iter == 0 || opts.n_init == 0 {
        bail!("{op}: max_iter and n_init must be at least 1");
    }
    check_finite(op, "x", x)?;
    let gpu = x.gpu();
    let xh = x.to_vec_f32()?;
    let mut best: Option<ConstrainedResult> = None;
    for run in 0..opts.n_init {
        let idx = kmeans_pp_indices(x, k, opts.seed.wrapping_add(run as u64))?;
        let mut cent: Vec<f64> = idx.iter().flat_map(|&i| xh[i * d..(i + 1) * d].iter().map(|&v| v as f64)).collect();
        let mut assign: Vec<u32> = Vec::new();
        let mut history = Vec::new();
        for _ in 0..opts.max_iter {
            let ct = Tensor::from_f32(gpu, &cent.iter().map(|&v| v as f32).collect::<Vec<_>>(), &[k, d])?;
            let dm: Vec<f64> = pairwise_sqdist(x, &ct)?.to_vec_f32()?.into_iter().map(|v| v as f64).collect();
            let a = constrained_assign(&dm, n, k, opts.size_min, opts.size_max)?;
            history.push((0..n).map(|i| dm[i * k + a[i] as usize]).sum::<f64>());
            let done = a == assign;
            assign = a;
            // Mean step (empty clusters, possible only with size_min = 0, keep their centroid).
            let mut sum = vec![0f64; k * d];
            let mut cnt = vec![0usize; k];
            for i in 0..n {
                let c = assign[i] as usize;
                cnt[c] += 1;
                for t in 0..d {
                    sum[c * d + t] += xh[i * d + t] as f64;
                }
            }
            for c in 0..k {
                if cnt[c] > 0 {
                    for t in 0..d {
                        cent[c * d + t] = sum[c * d + t] / cnt[c] as f64;
                    }
                }
            }
            if done {
                break;
            }
        }
        let objective: f64 = (0..n)
            .map(|i| sq(&xh[i * d..(i + 1) * d], &cent[assign[i] as usize * d..(assign[i] as usize + 1) * d]))
            .sum();
        if best.as_ref().is_none_or(|b| objective < b.objective) {
            best = Some(ConstrainedResult {
                centroids: cent.iter().map(|&v| v as f32).collect(),
                assign,
                objective,
                history,
            });
        }
    }
    Ok(best.unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::Gpu;
    use crate::ops::testing::rand_vec;

    /// Every labelling of n points into k clusters (k^n of them).
    fn labellings(n: usize, k: usize) -> impl Iterator<Item = Vec<usize>> {
        (0..k.pow(n as u32)).map(move |mut code| {
            (0..n)
                .map(|_| {
                    let c = code % k;
                    code /= k;
                    c
                })
                .collect()
        })
    }

    fn sizes_ok(a: &[usize], k: usize, lo: usize, hi: usize) -> bool {
        let mut s = vec![0; k];
        a.iter().for_each(|&c| s[c] += 1);
        s.iter().all(|&v| v >= lo && v <= hi)
    }

    #[test]
    fn assignment_is_the_brute_force_optimum() {
        for (seed, n, k, lo, hi) in
            [(1u64, 7, 3, 1, 3), (2, 7, 3, 2, 3), (3, 8, 2, 4, 4), (4, 7, 3, 0, 7), (5, 8, 3, 0, 3), (6, 6, 3, 2, 2)]
        {
            for rep in 0..4u64 {
                // Skewed costs so the unconstrained argmin violates the bounds.
                let cost: Vec<f64> = rand_vec(seed * 10 + rep, n * k, 1.0)
                    .iter()
                    .enumerate()
                    .map(|(t, &v)| v as f64 + if t % k == 0 { -0.8 } else { 0.0 })
                    .collect();
                let a = constrained_assign(&cost, n, k, lo, hi).unwrap();
                let a: Vec<usize> = a.iter().map(|&c| c as usize).collect();
                assert!(sizes_ok(&a, k, lo, hi), "bounds violated: {a:?}");
                let got: f64 = (0..n).map(|i| cost[i * k + a[i]]).sum();
                let want = labellings(n, k)
                    .filter(|l| sizes_ok(l, k, lo, hi))
                    .map(|l| (0..n).map(|i| cost[i * k + l[i]]).sum::<f64>())
                    .fold(f64::INFINITY, f64::min);
                assert!((got - want).abs() < 1e-9, "seed {seed} rep {rep}: got {got}, optimum {want}");
            }
        }
    }

    #[test]
    fn dijkstra_solver_matches_the_bellman_ford_reference() {
        // Moderate sizes (brute force is out of reach): the previous exact
        // solver gives the optimum; the fast one must reach the same cost.
        for (seed, n, k, lo, hi) in [(1u64, 33, 4, 5, 12), (2, 257, 16, 8, 20), (3, 200, 7, 0, 30), (4, 64, 64, 1, 1)] {
            let cost: Vec<f64> = rand_vec(seed, n * k, 1.0)
                .iter()
                .enumerate()
                .map(|(t, &v)| v as f64 + if t % k < 2 { -0.9 } else { 0.0 })
                .collect();
            let a = constrained_assign(&cost, n, k, lo, hi).unwrap();
            let b = constrained_assign_bellman_ford(&cost, n, k, lo, hi);
            let total = |a: &[u32]| (0..n).map(|i| cost[i * k + a[i] as usize]).sum::<f64>();
            let ai: Vec<usize> = a.iter().map(|&c| c as usize).collect();
            assert!(sizes_ok(&ai, k, lo, hi), "seed {seed}: bounds violated");
            assert!((total(&a) - total(&b)).abs() < 1e-9, "seed {seed}: cost {} vs reference {}", total(&a), total(&b));
        }
    }

    #[test]
    fn kmeans_is_close_to_brute_force_partition_optimum() {
        let gpu = Gpu::shared().unwrap();
        let (n, d, k, lo, hi) = (8, 2, 3, 2, 3);
        // One tight blob of 5 and three loose points: the bounds force a split.
        let mut x = rand_vec(21, n * d, 0.2);
        for i in 5..8 {
            x[i * d] += 3.0 * (i as f32 - 4.0);
        }
        let xt = Tensor::from_f32(&gpu, &x, &[n, d]).unwrap();
        let r = constrained_kmeans(
            &xt,
            k,
            ConstrainedOpts { size_min: lo, size_max: hi, max_iter: 10, n_init: 10, seed: 1 },
        )
        .unwrap();
        let a: Vec<usize> = r.assign.iter().map(|&c| c as usize).collect();
        assert!(sizes_ok(&a, k, lo, hi));
        let inertia = |l: &[usize]| {
            (0..k)
                .map(|c| {
                    let m: Vec<usize> = (0..n).filter(|&i| l[i] == c).collect();
                    let mean: Vec<f64> = (0..d)
                        .map(|t| m.iter().map(|&i| x[i * d + t] as f64).sum::<f64>() / m.len().max(1) as f64)
                        .collect();
                    m.iter().map(|&i| sq(&x[i * d..(i + 1) * d], &mean)).sum::<f64>()
                })
                .sum::<f64>()
        };
        let best =
            labellings(n, k).filter(|l| sizes_ok(l, k, lo, hi)).map(|l| inertia(&l)).fold(f64::INFINITY, f64::min);
        assert!((r.objective - inertia(&a)).abs() < 1e-6);
        assert!(r.objective <= best * 1.02 + 1e-9, "objective {} vs brute-force optimum {best}", r.objective);
        for w in r.history.windows(2) {
            assert!(w[1] <= w[0] + 1e-6, "objective increased: {:?}", r.history);
        }
    }

    #[test]
    fn letter_sized_problem_respects_bounds() {
        // LETTER's per-epoch case: 256 codes into 10 clusters of 10..60, data
        // skewed so that unconstrained clusters would be too large/small.
        let gpu = Gpu::shared().unwrap();
        let (n, d, k) = (256, 32, 10);
        let mut x = rand_vec(8, n * d, 1.0);
        for i in 0..200 {
            for t in 0..d {
                x[i * d + t] *= 0.1;
            }
        }
        let xt = Tensor::from_f32(&gpu, &x, &[n, d]).unwrap();
        let r = constrained_kmeans(&xt, k, ConstrainedOpts::letter(10, 60)).unwrap();
        let a: Vec<usize> = r.assign.iter().map(|&c| c as usize).collect();
        assert!(sizes_ok(&a, k, 10, 60));
        assert_eq!(r.centroids.len(), k * d);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let gpu = Gpu::shared().unwrap();
        let x = Tensor::from_f32(&gpu, &rand_vec(1, 10 * 2, 1.0), &[10, 2]).unwrap();
        let e = constrained_kmeans(&x, 3, ConstrainedOpts::letter(4, 5)).unwrap_err().to_string();
        assert!(e.contains("constrained_kmeans") && e.contains("[4, 5]") && e.contains("[10, 2]"), "{e}");
        let e = constrained_kmeans(&x, 11, ConstrainedOpts::letter(0, 5)).unwrap_err().to_string();
        assert!(e.contains("11 clusters from 10 points"), "{e}");
        let e = constrained_assign(&[0.0; 6], 3, 2, 2, 1).unwrap_err().to_string();
        assert!(e.contains("constrained_assign"), "{e}");
        let mut v = rand_vec(2, 20, 1.0);
        v[3] = f32::NAN;
        let xb = Tensor::from_f32(&gpu, &v, &[10, 2]).unwrap();
        let e = constrained_kmeans(&xb, 2, ConstrainedOpts::letter(1, 9)).unwrap_err().to_string();
        assert!(e.contains("non-finite"), "{e}");
    }
}
