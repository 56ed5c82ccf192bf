//! Nearest codeword: fused distance + argmin (and small top-k) of rows of
//! `x: [n, d]` against a codebook `e: [kc, d]`; plus the full distance matrix.
//! WGSL: `shaders/nearest.wgsl`.
//!
//! The scan ranks codewords by the expanded form `||e||^2 - 2 x.e` (one FMA per
//! element), keeps a few more candidates than asked for, and re-ranks them by
//! the direct sum of squares, so the result matches an f64 direct-sum reference
//! except on true near-ties (differences within f32 rounding of the distance),
//! or when more than `TOPR` codewords lie within the expanded form's rounding
//! error (~1e-7 * (||x||^2 + ||e||^2)) of the best. Ties go to the lowest index.
//!
//! Rows whose distances are NaN (non-finite input) come back with index
//! `u32::MAX`; the host-data entry point [`nearest_host`] rejects such input
//! with an error, the tensor launchers do not sync to check (use
//! [`super::check_finite`]).

use anyhow::{bail, Result};

use super::{fold_grid, matrix};
use crate::gpu::{check, div_ceil, shape_str, DType, Gpu, Kernel, Params, Tensor};

/// Invocations per workgroup of the scan; each owns 4 rows.
const WG: usize = 64;
const ROWS_PER_INV: usize = 4;
/// Largest k for [`nearest_topk`].
pub const MAX_TOPK: usize = 64;

/// Candidates kept per row for `kout` outputs: a margin of 3 for the re-rank,
/// rounded up to a multiple of 4 (fewer pipeline variants).
fn topr(kout: usize) -> usize {
    (kout + 3).div_ceil(4) * 4
}

/// `vec4`: the variant with vec4 loads along d (needs d % 4 == 0).
fn scan_kernel(kout: usize, vec4: bool) -> Kernel {
    Kernel::new("nearest", "nearest", if vec4 { "scan4" } else { "scan" })
        .define("WG", format!("{WG}u"))
        .define("TOPR", format!("{}u", topr(kout)))
}
fn sqnorm_kernel() -> Kernel {
    Kernel::new("nearest::sqnorm", "nearest", "sqnorm").define("WG", "64u").define("TOPR", "4u")
}
fn pairwise_kernel() -> Kernel {
    Kernel::new("pairwise_sqdist", "nearest", "pairwise").define("WG", "64u").define("TOPR", "4u")
}

/// Kernel variants for naga validation.
pub fn kernels() -> Vec<Kernel> {
    let mut v = Vec::new();
    for kout in [1, 5, 32, MAX_TOPK] {
        v.push(scan_kernel(kout, false));
        v.push(scan_kernel(kout, true));
    }
    v.push(sqnorm_kernel());
    v.push(pairwise_kernel());
    v
}

/// Result of a nearest-codeword search: `idx` (U32) and squared distance
/// `dist` (F32), both `[n]` for argmin or `[n, k]` for top-k (each row sorted
/// by distance, ties by index).
#[derive(Debug)]
pub struct Nearest {
    pub idx: Tensor,
    pub dist: Tensor,
}

fn check_pair(op: &str, x: &Tensor, e: &Tensor) -> Result<(usize, usize, usize)> {
    let (n, d) = matrix(op, "x", x)?;
    let (kc, de) = matrix(op, "codebook", e)?;
    check::same_device(op, &[x, e])?;
    if d != de {
        bail!(
            "{op}: x {} and codebook {} have different vector dimensions ({d} vs {de})",
            shape_str(x.shape()),
            shape_str(e.shape())
        );
    }
    Ok((n, d, kc))
}

/// Squared row norms of a codebook `e: [kc, d]` -> `[kc]`.
pub fn codeword_sqnorms(e: &Tensor) -> Result<Tensor> {
    let (kc, d) = matrix("nearest::sqnorm", "codebook", e)?;
    let out = Tensor::empty(e.gpu(), &[kc], DType::F32)?;
    e.gpu().dispatch(
        &sqnorm_kernel(),
        Params::new().u(0).u(kc).u(d).u(0).u(0).bytes(),
        &[e.buffer(), out.buffer()],
        [div_ceil(kc, 64), 1, 1],
    )?;
    Ok(out)
}

fn scan(op: &str, x: &Tensor, e: &Tensor, enorm: &Tensor, kout: usize) -> Result<Nearest> {
    let (n, d, kc) = check_pair(op, x, e)?;
    let gpu = x.gpu();
    let idx = Tensor::empty(gpu, &[n, kout], DType::U32)?;
    let dist = Tensor::empty(gpu, &[n, kout], DType::F32)?;
    let (grid, gx) = fold_grid(n.div_ceil(WG * ROWS_PER_INV));
    gpu.dispatch(
        &scan_kernel(kout, d % 4 == 0),
        Params::new().u(n).u(kc).u(d).u(kout).u(gx).bytes(),
        &[x.buffer(), e.buffer(), enorm.buffer(), idx.buffer(), dist.buffer()],
        grid,
    )?;
    Ok(Nearest { idx, dist })
}

/// Nearest codeword of every row: `x: [n, d]`, `codebook: [kc, d]` ->
/// `idx: U32 [n]`, `dist: F32 [n]` (squared Euclidean distance). Records work
/// only (no sync).
pub fn nearest(x: &Tensor, codebook: &Tensor) -> Result<Nearest> {
    nearest_with_norms(x, codebook, None)
}

/// [`nearest`] with precomputed codeword norms (`[kc]`, from
/// [`codeword_sqnorms`]) so a fixed codebook is not re-normed per call.
pub fn nearest_with_norms(x: &Tensor, codebook: &Tensor, enorm: Option<&Tensor>) -> Result<Nearest> {
    let (n, _, kc) = check_pair("nearest", x, codebook)?;
    let owned;
    let enorm = match enorm {
        Some(t) => {
            check::dtype("nearest", "codeword norms", t, DType::F32)?;
            if t.numel() != kc {
                bail!(
                    "nearest: codeword norms {} do not match codebook {}",
                    shape_str(t.shape()),
                    shape_str(codebook.shape())
                );
            }
            t
        }
        None => {
            owned = codeword_sqnorms(codebook)?;
            &owned
        }
    };
    let r = scan("nearest", x, codebook, enorm, 1)?;
    Ok(Nearest { idx: r.idx.reshape(&[n])?, dist: r.dist.reshape(&[n])? })
}

/// The `k` nearest codewords of every row, sorted by distance (ties by index):
/// `idx: U32 [n, k]`, `dist: F32 [n, k]`. `1 <= k <= min(kc, MAX_TOPK)`.
pub fn nearest_topk(x: &Tensor, codebook: &Tensor, k: usize) -> Result<Nearest> {
    let (_, _, kc) = check_pair("nearest_topk", x, codebook)?;
    if k == 0 || k > kc || k > MAX_TOPK {
        bail!("nearest_topk: k = {k} must be in 1..={} for codebook {}", kc.min(MAX_TOPK), shape_str(codebook.shape()));
    }
    let enorm = codeword_sqnorms(codebook)?;
    scan("nearest_topk", x, codebook, &enorm, k)
}

/// Nearest codeword of rows given on the host (`x: [n, d]` row-major), in
/// chunks of rows so inputs beyond the storage-binding limit (e.g. 1M x 64 f32
/// = 256 MB > 128 MiB) work. `chunk_rows = None` picks the largest chunk under
/// a quarter of the binding limit. Rejects non-finite input. Returns
/// (indices, squared distances).
pub fn nearest_host(
    gpu: &Gpu,
    x: &[f32],
    d: usize,
    codebook: &Tensor,
    chunk_rows: Option<usize>,
) -> Result<(Vec<u32>, Vec<f32>)> {
    let (kc, de) = matrix("nearest_host", "codebook", codebook)?;
    if d == 0 || x.is_empty() || !x.len().is_multiple_of(d) {
        bail!("nearest_host: {} values are not rows of dimension {d}", x.len());
    }
    let n = x.len() / d;
    if d != de {
        bail!(
            "nearest_host: x [{n}, {d}] and codebook {} have different vector dimensions ({d} vs {de})",
            shape_str(codebook.shape())
        );
    }
    super::check_finite_host("nearest_host", "x", x, &[n, d])?;
    let max_rows = ((gpu.max_binding_bytes() as usize / 4) / (d * 4)).max(1);
    let chunk = chunk_rows.unwrap_or(max_rows).clamp(1, max_rows);
    let enorm = codeword_sqnorms(codebook)?;
    let _ = kc;
    let mut idx = Vec::with_capacity(n);
    let mut dist = Vec::with_capacity(n);
    // Keep one chunk in flight while the previous one is read back.
    let mut pending: Option<Nearest> = None;
    for start in (0..n).step_by(chunk) {
        let rows = chunk.min(n - start);
        let xt = Tensor::from_f32(gpu, &x[start * d..(start + rows) * d], &[rows, d])?;
        let r = nearest_with_norms(&xt, codebook, Some(&enorm))?;
        gpu.flush();
        if let Some(prev) = pending.replace(r) {
            idx.extend(prev.idx.to_vec_u32()?);
            dist.extend(prev.dist.to_vec_f32()?);
        }
    }
    if let Some(prev) = pending {
        idx.extend(prev.idx.to_vec_u32()?);
        dist.extend(prev.dist.to_vec_f32()?);
    }
    Ok((idx, dist))
}

/// Full squared-distance matrix by the direct form: `x: [n, d]`, `c: [kc, d]`
/// -> `[n, kc]` with `out[i, j] = ||x_i - c_j||^2`.
pub fn pairwise_sqdist(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    let (n, d, kc) = check_pair("pairwise_sqdist", x, c)?;
    if n > 8 * 65535 {
        bail!("pairwise_sqdist: x {} has more than {} rows; split it", shape_str(x.shape()), 8 * 65535);
    }
    let out = Tensor::empty(x.gpu(), &[n, kc], DType::F32)?;
    x.gpu().dispatch(
        &pairwise_kernel(),
        Params::new().u(n).u(kc).u(d).u(0).u(0).bytes(),
        &[x.buffer(), c.buffer(), out.buffer()],
        [div_ceil(kc, 8), div_ceil(n, 8), 1],
    )?;
    Ok(out)
}

/// CPU reference: the `k` nearest codewords of each row by the direct sum of
/// squares in f64, ties to the lowest index. `x: [n, d]`, `e: [kc, d]`.
/// Returns (indices [n, k], distances [n, k]).
pub fn nearest_cpu(x: &[f32], e: &[f32], d: usize, k: usize) -> (Vec<u32>, Vec<f64>) {
    let n = x.len() / d;
    let mut idx = Vec::with_capacity(n * k);
    let mut dist = Vec::with_capacity(n * k);
    for row in x.chunks(d) {
        let mut all: Vec<(f64, u32)> = e
            .chunks(d)
            .enumerate()
            .map(|(c, code)| {
                let s: f64 = row.iter().zip(code).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum();
                (s, c as u32)
            })
            .collect();
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        for &(s, c) in all.iter().take(k) {
            idx.push(c);
            dist.push(s);
        }
    }
    (idx, dist)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_close, rand_vec};

    /// Indices must match the reference except where the reference's own
    /// distances for the two choices are within `tie` (relative) of each other.
    fn check_against_cpu(x: &[f32], e: &[f32], d: usize, k: usize, got_idx: &[u32], got_dist: &[f32]) {
        let (want_idx, want_dist) = nearest_cpu(x, e, d, k);
        let kc = e.len() / d;
        let full = nearest_cpu(x, e, d, kc);
        let n = x.len() / d;
        for i in 0..n {
            for m in 0..k {
                let (g, w) = (got_idx[i * k + m], want_idx[i * k + m]);
                if g != w {
                    // Distance of the GPU's choice by the reference.
                    let gd = full.0[i * kc..(i + 1) * kc].iter().position(|&c| c == g).map(|p| full.1[i * kc + p]);
                    let gd = gd.unwrap_or_else(|| panic!("row {i} rank {m}: invalid index {g}"));
                    let wd = want_dist[i * k + m];
                    assert!(
                        (gd - wd).abs() <= 1e-6 * wd.abs().max(1e-6),
                        "row {i} rank {m}: got {g} (dist {gd}), want {w} (dist {wd})"
                    );
                }
            }
        }
        let want32: Vec<f32> = want_dist.iter().map(|&v| v as f32).collect();
        assert_close("dist", got_dist, &want32, 1e-5, 1e-5);
    }

    #[test]
    fn argmin_matches_cpu_at_awkward_sizes() {
        let gpu = Gpu::shared().unwrap();
        for &(n, d, kc) in &[(1, 1, 1), (7, 3, 5), (33, 7, 257), (257, 33, 64), (130, 256, 9), (5, 16, 1000)] {
            let x = rand_vec(n as u64 * 31 + d as u64, n * d, 1.0);
            let e = rand_vec(kc as u64 * 17 + 1, kc * d, 1.0);
            let xt = Tensor::from_f32(&gpu, &x, &[n, d]).unwrap();
            let et = Tensor::from_f32(&gpu, &e, &[kc, d]).unwrap();
            let r = nearest(&xt, &et).unwrap();
            assert_eq!(r.idx.shape(), &[n]);
            check_against_cpu(&x, &e, d, 1, &r.idx.to_vec_u32().unwrap(), &r.dist.to_vec_f32().unwrap());
        }
    }

    #[test]
    fn topk_matches_cpu() {
        let gpu = Gpu::shared().unwrap();
        for &(n, d, kc, k) in &[(7, 5, 40, 3), (33, 8, 257, 32), (9, 3, 6, 6), (65, 17, 100, 1)] {
            let x = rand_vec(n as u64 + 5, n * d, 2.0);
            let e = rand_vec(kc as u64 + 9, kc * d, 2.0);
            let xt = Tensor::from_f32(&gpu, &x, &[n, d]).unwrap();
            let et = Tensor::from_f32(&gpu, &e, &[kc, d]).unwrap();
            let r = nearest_topk(&xt, &et, k).unwrap();
            assert_eq!(r.idx.shape(), &[n, k]);
            check_against_cpu(&x, &e, d, k, &r.idx.to_vec_u32().unwrap(), &r.dist.to_vec_f32().unwrap());
        }
    }

    #[test]
    fn planted_exact_ties_go_to_lowest_index() {
        // Duplicate codewords: every x is placed exactly on codeword 3 (== 7 ==
        // 11) or midway-equivalent; the lowest duplicate must win, and top-k
        // must list the duplicates in index order.
        let gpu = Gpu::shared().unwrap();
        let (d, kc) = (6, 20);
        let mut e = rand_vec(3, kc * d, 1.0);
        let proto: Vec<f32> = e[3 * d..4 * d].to_vec();
        for dup in [7, 11, 19] {
            e[dup * d..(dup + 1) * d].copy_from_slice(&proto);
        }
        let mut x = Vec::new();
        for i in 0..9 {
            // x = proto + a small offset: codeword 3 and its copies are tied nearest.
            x.extend(proto.iter().map(|&v| v + 0.01 * (i as f32 - 4.0)));
        }
        let xt = Tensor::from_f32(&gpu, &x, &[9, d]).unwrap();
        let et = Tensor::from_f32(&gpu, &e, &[kc, d]).unwrap();
        let r = nearest(&xt, &et).unwrap();
        assert_eq!(r.idx.to_vec_u32().unwrap(), vec![3; 9]);
        let t = nearest_topk(&xt, &et, 4).unwrap().idx.to_vec_u32().unwrap();
        for row in t.chunks(4) {
            assert_eq!(row, &[3, 7, 11, 19]);
        }
    }

    #[test]
    fn expanded_form_cancellation_is_repaired() {
        // Large common offset: ||x||^2 ~ 1e6 while distances are ~1e-2, so the
        // expanded scores alone cannot separate the codewords; the re-rank can.
        let gpu = Gpu::shared().unwrap();
        let (n, d) = (50, 4);
        let off = 500.0f32;
        // 3 close codewords among 40 far ones (the re-rank only sees the best 4 scores).
        let mut e: Vec<f32> = (0..40).flat_map(|i| [off + 3.0 + i as f32, off - 2.0, off, off]).collect();
        e.extend([0.0f32, 0.05, 0.11].iter().flat_map(|&s| [off + s, off, off, off]));
        let kc = e.len() / d;
        let x: Vec<f32> = (0..n).flat_map(|i| [off + 0.11 * i as f32 / n as f32, off, off, off]).collect();
        let xt = Tensor::from_f32(&gpu, &x, &[n, d]).unwrap();
        let et = Tensor::from_f32(&gpu, &e, &[kc, d]).unwrap();
        let r = nearest(&xt, &et).unwrap();
        check_against_cpu(&x, &e, d, 1, &r.idx.to_vec_u32().unwrap(), &r.dist.to_vec_f32().unwrap());
    }

    #[test]
    fn host_chunked_matches_single_pass() {
        let gpu = Gpu::shared().unwrap();
        let (n, d, kc) = (301, 9, 37);
        let x = rand_vec(11, n * d, 1.0);
        let e = rand_vec(12, kc * d, 1.0);
        let et = Tensor::from_f32(&gpu, &e, &[kc, d]).unwrap();
        let (idx, dist) = nearest_host(&gpu, &x, d, &et, Some(64)).unwrap();
        check_against_cpu(&x, &e, d, 1, &idx, &dist);
    }

    #[test]
    fn pairwise_matches_cpu() {
        let gpu = Gpu::shared().unwrap();
        let (n, d, kc) = (33, 7, 10);
        let x = rand_vec(1, n * d, 1.0);
        let e = rand_vec(2, kc * d, 1.0);
        let xt = Tensor::from_f32(&gpu, &x, &[n, d]).unwrap();
        let et = Tensor::from_f32(&gpu, &e, &[kc, d]).unwrap();
        let got = pairwise_sqdist(&xt, &et).unwrap().to_vec_f32().unwrap();
        let (idx, dist) = nearest_cpu(&x, &e, d, kc);
        let mut want = vec![0f32; n * kc];
        for i in 0..n {
            for m in 0..kc {
                want[i * kc + idx[i * kc + m] as usize] = dist[i * kc + m] as f32;
            }
        }
        assert_close("pairwise", &got, &want, 1e-5, 1e-6);
    }

    #[test]
    fn nan_rows_get_no_index_and_bad_shapes_are_errors() {
        let gpu = Gpu::shared().unwrap();
        let mut x = rand_vec(4, 3 * 4, 1.0);
        x[5] = f32::NAN;
        let e = rand_vec(5, 6 * 4, 1.0);
        let xt = Tensor::from_f32(&gpu, &x, &[3, 4]).unwrap();
        let et = Tensor::from_f32(&gpu, &e, &[6, 4]).unwrap();
        let idx = nearest(&xt, &et).unwrap().idx.to_vec_u32().unwrap();
        assert_eq!(idx[1], u32::MAX);
        assert!(idx[0] < 6 && idx[2] < 6);
        let err = nearest_host(&gpu, &x, 4, &et, None).unwrap_err().to_string();
        assert!(err.contains("nearest_host") && err.contains("non-finite"), "{err}");

        let e5 = Tensor::from_f32(&gpu, &rand_vec(6, 6 * 5, 1.0), &[6, 5]).unwrap();
        let err = nearest(&xt, &e5).unwrap_err().to_string();
        assert!(err.contains("nearest") && err.contains("[3, 4]") && err.contains("[6, 5]"), "{err}");
        let err = nearest_topk(&xt, &et, 7).unwrap_err().to_string();
        assert!(err.contains("nearest_topk") && err.contains("k = 7"), "{err}");
        let empty = Tensor::empty(&gpu, &[0, 4], DType::F32).unwrap();
        assert!(nearest(&empty, &et).unwrap_err().to_string().contains("empty"));
        let v = Tensor::from_f32(&gpu, &[1.0; 4], &[4]).unwrap();
        assert!(nearest(&v, &et).unwrap_err().to_string().contains("matrix"));
        assert!(pairwise_sqdist(&xt, &e5).unwrap_err().to_string().contains("pairwise_sqdist"));
    }
}
