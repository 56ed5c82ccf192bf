//! Key/value cache of incremental decoding (`shaders/kv_cache.wgsl`), batched over rows
//! (`rows = batch * beams`): append this step's keys or values at a position, and reorder the
//! cached rows after a beam-search step (a gather of rows by parent index, fused with the next
//! append so that each decoding step moves every cached vector at most once).
//!
//! Layouts (row-major, f32): cache `[R, H, L, D]` (`L` preallocated positions, `D` a multiple
//! of 4); the new entries `[R, H, D]` (any shape with `R * H * D` elements, e.g. a projection
//! output `[R, H * D]`); parents `[R]` u32 (new row `r` continues old row `parents[r]`; a parent
//! `>= R` yields zero rows, never an out-of-bounds read).

use anyhow::{bail, Result};

use crate::gpu::{check, div_ceil, shape_str, DType, Kernel, Params, Tensor};

const OP_APPEND: &str = "kv_append";
const OP_REORDER: &str = "kv_reorder";
const WG: usize = 256;

fn kernel(entry: &'static str) -> Kernel {
    let name = if entry == "kv_append" { OP_APPEND } else { OP_REORDER };
    Kernel::new(name, "kv_cache", entry)
}

/// Every kernel variant of this family (for naga validation).
pub fn kernels() -> Vec<Kernel> {
    vec![kernel("kv_append"), kernel("kv_reorder")]
}

/// Cache sizes: rows, heads, preallocated length, head dim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheDims {
    pub rows: usize,
    pub heads: usize,
    pub max_len: usize,
    pub dh: usize,
}

fn cache_dims(op: &str, name: &str, cache: &Tensor) -> Result<CacheDims> {
    check::nonempty(op, &[(name, cache)])?;
    check::dtype(op, name, cache, DType::F32)?;
    let s = cache.shape();
    if s.len() != 4 || !s[3].is_multiple_of(4) {
        bail!("{op}: {name} must be [R, H, L, D] with D a multiple of 4, got {}", shape_str(s));
    }
    Ok(CacheDims { rows: s[0], heads: s[1], max_len: s[2], dh: s[3] })
}

fn check_new(op: &str, new: &Tensor, d: CacheDims, cache: &Tensor) -> Result<()> {
    check::dtype(op, "new", new, DType::F32)?;
    if new.numel() != d.rows * d.heads * d.dh {
        bail!(
            "{op}: new entries {} must hold R * H * D = {} * {} * {} values for cache {}",
            shape_str(new.shape()),
            d.rows,
            d.heads,
            d.dh,
            shape_str(cache.shape())
        );
    }
    check::same_device(op, &[new, cache])
}

/// Fold `n` invocations into an (x, y) grid; returns (grid, invocations per grid row).
fn grid(n: usize) -> ([u32; 3], usize) {
    let groups = div_ceil(n, WG).max(1) as usize;
    let gx = groups.min(65535);
    ([gx as u32, groups.div_ceil(gx) as u32, 1], gx * WG)
}

fn params(d: CacheDims, pos: usize, has_new: bool, row: usize) -> Params {
    Params::new().u(d.rows).u(d.heads).u(d.max_len).u(d.dh / 4).u(pos).u(has_new as usize).u(row).u(0)
}

/// In place: `cache[r, h, pos, :] = new[r, h, :]` for every row and head.
pub fn kv_append(cache: &Tensor, new: &Tensor, pos: usize) -> Result<()> {
    let d = cache_dims(OP_APPEND, "cache", cache)?;
    check_new(OP_APPEND, new, d, cache)?;
    if pos >= d.max_len {
        bail!(
            "{OP_APPEND}: position {pos} is past the cache length {} (cache {})",
            d.max_len,
            shape_str(cache.shape())
        );
    }
    let n = d.rows * d.heads * d.dh / 4;
    let (g, row) = grid(n);
    cache.gpu().dispatch(&kernel("kv_append"), params(d, pos, false, row).bytes(), &[new.buffer(), cache.buffer()], g)
}

/// `dst[r, h, j, :] = src[parents[r], h, j, :]` for `j < n_copy`, then (with `new`)
/// `dst[r, h, n_copy, :] = new[r, h, :]`. `dst` and `src` are distinct `[R, H, L, D]` caches;
/// positions of `dst` past those written keep their contents.
pub fn kv_reorder(dst: &Tensor, src: &Tensor, parents: &Tensor, n_copy: usize, new: Option<&Tensor>) -> Result<()> {
    let d = cache_dims(OP_REORDER, "src", src)?;
    let dd = cache_dims(OP_REORDER, "dst", dst)?;
    if d != dd {
        bail!("{OP_REORDER}: dst {} and src {} differ", shape_str(dst.shape()), shape_str(src.shape()));
    }
    if dst.same_buffer(src) {
        bail!("{OP_REORDER}: dst and src must be different tensors (cache {})", shape_str(src.shape()));
    }
    check::dtype(OP_REORDER, "parents", parents, DType::U32)?;
    if parents.shape() != [d.rows] {
        bail!("{OP_REORDER}: parents must be [R = {}], got {}", d.rows, shape_str(parents.shape()));
    }
    check::same_device(OP_REORDER, &[dst, src, parents])?;
    let n_out = n_copy + new.is_some() as usize;
    if n_out > d.max_len {
        bail!(
            "{OP_REORDER}: {n_copy} copied positions{} exceed the cache length {} (cache {})",
            if new.is_some() { " plus the new one" } else { "" },
            d.max_len,
            shape_str(src.shape())
        );
    }
    if let Some(nw) = new {
        check_new(OP_REORDER, nw, d, src)?;
    }
    let n = d.rows * d.heads * n_out * d.dh / 4;
    if n == 0 {
        return Ok(());
    }
    // The new-entries binding needs some buffer when there is none: src (read-only there too).
    let new_buf = new.unwrap_or(src);
    let (g, row) = grid(n);
    src.gpu().dispatch(
        &kernel("kv_reorder"),
        params(d, n_copy, new.is_some(), row).bytes(),
        &[new_buf.buffer(), src.buffer(), parents.buffer(), dst.buffer()],
        g,
    )
}

/// CPU reference of `kv_append` (in place on `cache`).
pub fn kv_append_ref(cache: &mut [f32], d: CacheDims, new: &[f32], pos: usize) {
    for rh in 0..d.rows * d.heads {
        for x in 0..d.dh {
            cache[(rh * d.max_len + pos) * d.dh + x] = new[rh * d.dh + x];
        }
    }
}

/// CPU reference of `kv_reorder` (writes into `dst`, which holds its previous contents).
pub fn kv_reorder_ref(dst: &mut [f32], src: &[f32], d: CacheDims, parents: &[u32], n_copy: usize, new: Option<&[f32]>) {
    for r in 0..d.rows {
        for h in 0..d.heads {
            let pr = parents[r] as usize;
            for j in 0..n_copy {
                for x in 0..d.dh {
                    let o = ((r * d.heads + h) * d.max_len + j) * d.dh + x;
                    dst[o] = if pr < d.rows { src[((pr * d.heads + h) * d.max_len + j) * d.dh + x] } else { 0.0 };
                }
            }
            if let Some(nw) = new {
                for x in 0..d.dh {
                    dst[((r * d.heads + h) * d.max_len + n_copy) * d.dh + x] = nw[(r * d.heads + h) * d.dh + x];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::Gpu;
    use crate::ops::testing::rand_vec;
    use rand::{Rng, SeedableRng};

    fn dims(rows: usize, heads: usize, max_len: usize, dh: usize) -> CacheDims {
        CacheDims { rows, heads, max_len, dh }
    }

    #[test]
    fn append_matches_reference() {
        let gpu = Gpu::shared().unwrap();
        for (i, d) in [dims(1, 1, 1, 4), dims(7, 3, 5, 8), dims(33, 2, 9, 4), dims(257, 1, 2, 12), dims(3, 6, 6, 64)]
            .into_iter()
            .enumerate()
        {
            let n = d.rows * d.heads * d.max_len * d.dh;
            let mut want = rand_vec(i as u64, n, 1.0);
            let cache = Tensor::from_f32(&gpu, &want, &[d.rows, d.heads, d.max_len, d.dh]).unwrap();
            for pos in [0, d.max_len - 1, d.max_len / 2] {
                let new = rand_vec(100 + pos as u64, d.rows * d.heads * d.dh, 2.0);
                let nt = Tensor::from_f32(&gpu, &new, &[d.rows, d.heads * d.dh]).unwrap();
                kv_append(&cache, &nt, pos).unwrap();
                kv_append_ref(&mut want, d, &new, pos);
            }
            assert_eq!(cache.to_vec_f32().unwrap(), want, "{d:?}");
        }
    }

    #[test]
    fn reorder_matches_reference() {
        let gpu = Gpu::shared().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for (i, d) in [dims(1, 1, 1, 4), dims(7, 3, 5, 8), dims(33, 2, 9, 4), dims(257, 1, 3, 8), dims(5, 6, 6, 64)]
            .into_iter()
            .enumerate()
        {
            let shape = [d.rows, d.heads, d.max_len, d.dh];
            let n = d.rows * d.heads * d.max_len * d.dh;
            let src = rand_vec(i as u64, n, 1.0);
            let src_t = Tensor::from_f32(&gpu, &src, &shape).unwrap();
            for n_copy in [0, d.max_len / 2, d.max_len - 1, d.max_len] {
                for with_new in [false, true] {
                    if n_copy + with_new as usize > d.max_len {
                        continue;
                    }
                    // Parents with repeats, and one out of range when there are several rows.
                    let mut parents: Vec<u32> = (0..d.rows).map(|_| rng.gen_range(0..d.rows as u32)).collect();
                    if d.rows > 2 {
                        parents[1] = d.rows as u32 + 3;
                    }
                    let pt = Tensor::from_u32(&gpu, &parents, &[d.rows]).unwrap();
                    let mut want = rand_vec(50 + i as u64, n, 3.0);
                    let dst = Tensor::from_f32(&gpu, &want, &shape).unwrap();
                    let new = rand_vec(77, d.rows * d.heads * d.dh, 1.0);
                    let nt = Tensor::from_f32(&gpu, &new, &[d.rows, d.heads, 1, d.dh]).unwrap();
                    kv_reorder(&dst, &src_t, &pt, n_copy, with_new.then_some(&nt)).unwrap();
                    kv_reorder_ref(&mut want, &src, d, &parents, n_copy, with_new.then_some(&new[..]));
                    assert_eq!(dst.to_vec_f32().unwrap(), want, "{d:?} n_copy {n_copy} new {with_new}");
                }
            }
        }
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_op() {
        let gpu = Gpu::shared().unwrap();
        let cache = Tensor::zeros(&gpu, &[2, 3, 4, 8], DType::F32).unwrap();
        let other = Tensor::zeros(&gpu, &[2, 3, 4, 8], DType::F32).unwrap();
        let new = Tensor::zeros(&gpu, &[2, 24], DType::F32).unwrap();
        let parents = Tensor::from_u32(&gpu, &[0, 1], &[2]).unwrap();
        let e = kv_append(&cache, &new, 4).unwrap_err().to_string();
        assert!(e.contains("kv_append") && e.contains("position 4"), "{e}");
        let short = Tensor::zeros(&gpu, &[2, 23], DType::F32).unwrap();
        let e = kv_append(&cache, &short, 0).unwrap_err().to_string();
        assert!(e.contains("kv_append") && e.contains("[2, 23]"), "{e}");
        let odd = Tensor::zeros(&gpu, &[2, 3, 4, 6], DType::F32).unwrap();
        assert!(kv_append(&odd, &new, 0).unwrap_err().to_string().contains("multiple of 4"));
        let e = kv_reorder(&cache, &cache, &parents, 1, None).unwrap_err().to_string();
        assert!(e.contains("kv_reorder") && e.contains("different"), "{e}");
        let e = kv_reorder(&other, &cache, &parents, 4, Some(&new)).unwrap_err().to_string();
        assert!(e.contains("kv_reorder") && e.contains("cache length 4"), "{e}");
        let p3 = Tensor::from_u32(&gpu, &[0, 1, 1], &[3]).unwrap();
        let e = kv_reorder(&other, &cache, &p3, 1, None).unwrap_err().to_string();
        assert!(e.contains("parents must be [R = 2]"), "{e}");
        let pf = Tensor::zeros(&gpu, &[2], DType::F32).unwrap();
        assert!(kv_reorder(&other, &cache, &pf, 1, None).is_err());
    }
}
