//! Key/value caches of incremental decoding (`shaders/kv_cache.wgsl`), batched over rows
//! (`R = batch x beams`), shared by the T5 and LLaMA decoders.
//!
//! A cache is `[R, H, CAP, Dh]` (the attention layout) with a fixed capacity of `CAP` slots.
//! Every kernel moves 32-bit words, so f32, u32 and i32 tensors all work:
//! - [`kv_write`]: write new keys/values `[R, H, Tn, Dh]` into slots `off..off + Tn` (a prompt's
//!   prefill, or one decoding step with `Tn = 1`).
//! - [`kv_reorder`]: after a beam-search step, new row r continues old row `parents[r]`: a gather
//!   of the first `n_copy` slots into a second buffer, fused with the next step's write, so each
//!   decoding step moves every cached vector at most once (a parent `>= R` yields zero rows,
//!   never an out-of-bounds read).
//! - [`gather_rows`]: `dst[r] = src[parents[r]]` over the leading axis of any tensor (repeating
//!   prompt rows per beam, reordering per-row metadata).
//! - [`decode_meta`]: from the per-row left padding (on the GPU), the attention mask table and
//!   the RoPE positions of one decoding step, so that reordering never needs a readback.

use anyhow::{bail, Result};

use crate::gpu::{check, div_ceil, shape_str, DType, Kernel, Params, Tensor};
use crate::ops::attention::{MaskKind, MaskSpec};

const OP: &str = "kv_cache";
const WG: u32 = 64;

fn kernel(entry: &'static str) -> Kernel {
    Kernel::new(OP, "kv_cache", entry).define("WG", format!("{WG}u"))
}

/// Every kv_cache kernel variant (for naga validation).
pub fn kernels() -> Vec<Kernel> {
    vec![kernel("kv_write"), kernel("kv_reorder"), kernel("gather_rows"), kernel("decode_meta")]
}

fn grid(n: usize) -> ([u32; 3], usize) {
    let groups = div_ceil(n, WG as usize).max(1) as usize;
    let gx = groups.min(65535);
    ([gx as u32, groups.div_ceil(gx) as u32, 1], gx)
}

fn is_word(t: &Tensor) -> bool {
    t.dtype().size() == 4
}

/// `cache[b, h, off + t, :] = src[b, h, t, :]`; cache `[B, H, CAP, Dh]`, src `[B, H, Tn, Dh]`,
/// same 32-bit dtype, `off + Tn <= CAP`.
pub fn kv_write(cache: &Tensor, src: &Tensor, off: usize) -> Result<()> {
    const W: &str = "kv_write";
    check::nonempty(W, &[("cache", cache), ("src", src)])?;
    check::same_device(W, &[cache, src])?;
    if cache.rank() != 4 || src.rank() != 4 || !is_word(cache) || cache.dtype() != src.dtype() {
        bail!(
            "{W}: cache {} ({:?}) and src {} ({:?}) must both be 4-D [B, H, T, Dh] of one 32-bit dtype",
            shape_str(cache.shape()),
            cache.dtype(),
            shape_str(src.shape()),
            src.dtype()
        );
    }
    let (c, s) = (cache.shape(), src.shape());
    if c[0] != s[0] || c[1] != s[1] || c[3] != s[3] || off + s[2] > c[2] {
        bail!(
            "{W}: src {} does not fit cache {} at slot {off} (needs equal B, H, Dh and off + Tn <= CAP)",
            shape_str(s),
            shape_str(c)
        );
    }
    let n = src.numel();
    let (g, gx) = grid(n);
    let p = Params::new().u(n).u(s[3]).u(s[2]).u(c[2]).u(off).u(gx);
    cache.gpu().dispatch(&kernel("kv_write"), p.bytes(), &[cache.buffer(), src.buffer()], g)
}

/// `dst[r, h, j, :] = src[parents[r], h, j, :]` for `j < n_copy`, then (with `new`, any shape
/// of `R * H * Dh` words) `dst[r, h, n_copy, :] = new[r, h, :]`. `dst` and `src` are distinct
/// `[R, H, CAP, Dh]` caches of one 32-bit dtype; slots of `dst` past those written keep their
/// contents.
pub fn kv_reorder(dst: &Tensor, src: &Tensor, parents: &Tensor, n_copy: usize, new: Option<&Tensor>) -> Result<()> {
    const O: &str = "kv_reorder";
    check::nonempty(O, &[("src", src), ("parents", parents)])?;
    check::same_device(O, &[dst, src, parents])?;
    check::dtype(O, "parents", parents, DType::U32)?;
    if src.rank() != 4 || !is_word(src) || dst.shape() != src.shape() || dst.dtype() != src.dtype() {
        bail!(
            "{O}: dst {} ({:?}) and src {} ({:?}) must be equal 4-D [R, H, CAP, Dh] caches of one 32-bit dtype",
            shape_str(dst.shape()),
            dst.dtype(),
            shape_str(src.shape()),
            src.dtype()
        );
    }
    if dst.same_buffer(src) {
        bail!("{O}: dst and src must be different tensors (cache {})", shape_str(src.shape()));
    }
    let [r, h, cap, dh] = [src.shape()[0], src.shape()[1], src.shape()[2], src.shape()[3]];
    if parents.shape() != [r] {
        bail!("{O}: parents must be [R = {r}], got {}", shape_str(parents.shape()));
    }
    let n_out = n_copy + new.is_some() as usize;
    if n_out > cap {
        bail!(
            "{O}: {n_copy} copied slots{} exceed the capacity {cap} (cache {})",
            if new.is_some() { " plus the new one" } else { "" },
            shape_str(src.shape())
        );
    }
    if let Some(nw) = new {
        check::same_device(O, &[nw, src])?;
        if nw.numel() != r * h * dh || nw.dtype() != src.dtype() {
            bail!(
                "{O}: new entries {} ({:?}) must hold R * H * Dh = {} words of the cache's dtype (cache {})",
                shape_str(nw.shape()),
                nw.dtype(),
                r * h * dh,
                shape_str(src.shape())
            );
        }
    }
    let n = r * h * n_out * dh;
    if n == 0 {
        return Ok(());
    }
    // The new-entries binding needs some buffer when there is none: src (read-only there too).
    let new_buf = new.unwrap_or(src);
    let (g, gx) = grid(n);
    let p = Params::new().u(n).u(dh).u(h).u(cap).u(n_copy).u(new.is_some() as usize).u(r).u(gx);
    src.gpu().dispatch(
        &kernel("kv_reorder"),
        p.bytes(),
        &[new_buf.buffer(), src.buffer(), parents.buffer(), dst.buffer()],
        g,
    )
}

/// Rows of `src` (`[RS, ...]`, any 32-bit dtype) picked by `parents` (u32 `[R]`): the result
/// is `[R, ...]` with row r = `src[parents[r]]` (zeros for a parent >= RS).
pub fn gather_rows(src: &Tensor, parents: &Tensor) -> Result<Tensor> {
    const G: &str = "gather_rows";
    check::nonempty(G, &[("src", src), ("parents", parents)])?;
    check::same_device(G, &[src, parents])?;
    check::dtype(G, "parents", parents, DType::U32)?;
    if !is_word(src) || src.rank() < 1 || parents.rank() != 1 {
        bail!(
            "{G}: src {} ({:?}) must be a 32-bit tensor with a leading row axis and parents {} must be [R]",
            shape_str(src.shape()),
            src.dtype(),
            shape_str(parents.shape())
        );
    }
    let rs = src.shape()[0];
    let w = src.numel() / rs;
    let r = parents.shape()[0];
    let mut shape = src.shape().to_vec();
    shape[0] = r;
    let out = Tensor::empty(src.gpu(), &shape, src.dtype())?;
    let n = r * w;
    let (g, gx) = grid(n);
    let p = Params::new().u(n).u(w).u(rs).u(0).u(0).u(gx);
    src.gpu().dispatch(&kernel("gather_rows"), p.bytes(), &[src.buffer(), parents.buffer(), out.buffer()], g)?;
    Ok(out)
}

/// The attention mask table `[R, 1 + cap, 2]` and RoPE positions `[R, 1]` (both i32) of one
/// decoding step writing slot `cur`, from `row_pad` (i32 `[R]`, leading padding slots per row).
pub fn decode_meta(row_pad: &Tensor, cur: usize, cap: usize) -> Result<(Tensor, Tensor)> {
    const D: &str = "decode_meta";
    check::nonempty(D, &[("row_pad", row_pad)])?;
    check::dtype(D, "row_pad", row_pad, DType::I32)?;
    if row_pad.rank() != 1 || cur >= cap {
        bail!("{D}: row_pad must be [R] (got {}) and slot {cur} < capacity {cap}", shape_str(row_pad.shape()));
    }
    let r = row_pad.shape()[0];
    let gpu = row_pad.gpu();
    let tok = Tensor::empty(gpu, &[r, 1 + cap, 2], DType::I32)?;
    let pos = Tensor::empty(gpu, &[r, 1], DType::I32)?;
    let n = r * (1 + cap);
    let (g, gx) = grid(n);
    let p = Params::new().u(n).u(cap).u(cur).u(0).u(0).u(gx);
    gpu.dispatch(&kernel("decode_meta"), p.bytes(), &[row_pad.buffer(), tok.buffer(), pos.buffer()], g)?;
    Ok((tok, pos))
}

/// CPU reference of [`kv_write`] on flat data.
pub fn kv_write_ref(cache: &mut [f32], cshape: [usize; 4], src: &[f32], tn: usize, off: usize) {
    let [b, h, cap, dh] = cshape;
    for bh in 0..b * h {
        for t in 0..tn {
            for d in 0..dh {
                cache[(bh * cap + off + t) * dh + d] = src[(bh * tn + t) * dh + d];
            }
        }
    }
}

/// CPU reference of [`kv_reorder`] on flat data (`dst` holds its previous contents).
pub fn kv_reorder_ref(
    dst: &mut [f32],
    src: &[f32],
    shape: [usize; 4],
    parents: &[u32],
    n_copy: usize,
    new: Option<&[f32]>,
) {
    let [rows, heads, cap, dh] = shape;
    for r in 0..rows {
        for h in 0..heads {
            let pr = parents[r] as usize;
            for j in 0..n_copy {
                for x in 0..dh {
                    let o = ((r * heads + h) * cap + j) * dh + x;
                    dst[o] = if pr < rows { src[((pr * heads + h) * cap + j) * dh + x] } else { 0.0 };
                }
            }
            if let Some(nw) = new {
                for x in 0..dh {
                    dst[((r * heads + h) * cap + n_copy) * dh + x] = nw[(r * heads + h) * dh + x];
                }
            }
        }
    }
}

/// CPU reference of [`gather_rows`]: `src` is `[rs, w]`.
pub fn gather_rows_ref(src: &[f32], w: usize, parents: &[u32]) -> Vec<f32> {
    let rs = src.len() / w.max(1);
    parents
        .iter()
        .flat_map(
            |&p| {
                if (p as usize) < rs {
                    src[p as usize * w..(p as usize + 1) * w].to_vec()
                } else {
                    vec![0.0; w]
                }
            },
        )
        .collect()
}

/// CPU reference of [`decode_meta`]: the host-built `MaskSpec` (causal over slots) and positions.
pub fn decode_meta_ref(row_pad: &[i32], cur: usize, cap: usize) -> (MaskSpec, Vec<i32>) {
    let r = row_pad.len();
    let mut m = MaskSpec {
        kind: MaskKind::Causal,
        batch: r,
        tq: 1,
        tk: cap,
        q_seg: vec![0; r],
        q_pos: vec![cur as i32; r],
        k_seg: Vec::new(),
        k_pos: Vec::new(),
    };
    for &pad in row_pad {
        m.k_seg.extend((0..cap as i32).map(|j| if j < pad { -1 } else { 0 }));
        m.k_pos.extend(0..cap as i32);
    }
    (m, row_pad.iter().map(|&p| cur as i32 - p).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::Gpu;
    use crate::ops::testing::{assert_close, rand_vec};
    use rand::{Rng, SeedableRng};

    #[test]
    fn kv_write_matches_reference() {
        let gpu = Gpu::shared().unwrap();
        for &(b, h, cap, dh, tn, off) in
            &[(1, 1, 1, 4, 1, 0), (2, 3, 9, 8, 7, 2), (3, 1, 33, 4, 1, 32), (1, 2, 257, 12, 5, 100)]
        {
            let init = rand_vec(1, b * h * cap * dh, 1.0);
            let src = rand_vec(2, b * h * tn * dh, 1.0);
            let cache = Tensor::from_f32(&gpu, &init, &[b, h, cap, dh]).unwrap();
            let st = Tensor::from_f32(&gpu, &src, &[b, h, tn, dh]).unwrap();
            kv_write(&cache, &st, off).unwrap();
            let mut want = init.clone();
            kv_write_ref(&mut want, [b, h, cap, dh], &src, tn, off);
            assert_eq!(cache.to_vec_f32().unwrap(), want, "kv_write {b}x{h}x{cap}x{dh} tn {tn} off {off}");
        }
    }

    #[test]
    fn reorder_matches_reference() {
        let gpu = Gpu::shared().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for (i, shape) in
            [[1, 1, 1, 1], [7, 3, 5, 8], [33, 2, 9, 3], [257, 1, 3, 7], [5, 6, 6, 64]].into_iter().enumerate()
        {
            let [rows, heads, cap, dh] = shape;
            let n = rows * heads * cap * dh;
            let src = rand_vec(i as u64, n, 1.0);
            let src_t = Tensor::from_f32(&gpu, &src, &shape).unwrap();
            for n_copy in [0, cap / 2, cap - 1, cap] {
                for with_new in [false, true] {
                    if n_copy + with_new as usize > cap {
                        continue;
                    }
                    // Parents with repeats, and one out of range when there are several rows.
                    let mut parents: Vec<u32> = (0..rows).map(|_| rng.gen_range(0..rows as u32)).collect();
                    if rows > 2 {
                        parents[1] = rows as u32 + 3;
                    }
                    let pt = Tensor::from_u32(&gpu, &parents, &[rows]).unwrap();
                    let mut want = rand_vec(50 + i as u64, n, 3.0);
                    let dst = Tensor::from_f32(&gpu, &want, &shape).unwrap();
                    let new = rand_vec(77, rows * heads * dh, 1.0);
                    let nt = Tensor::from_f32(&gpu, &new, &[rows, heads, 1, dh]).unwrap();
                    kv_reorder(&dst, &src_t, &pt, n_copy, with_new.then_some(&nt)).unwrap();
                    kv_reorder_ref(&mut want, &src, shape, &parents, n_copy, with_new.then_some(&new[..]));
                    assert_eq!(dst.to_vec_f32().unwrap(), want, "{shape:?} n_copy {n_copy} new {with_new}");
                }
            }
        }
    }

    #[test]
    fn gather_rows_matches_reference_for_f32_and_i32() {
        let gpu = Gpu::shared().unwrap();
        for &(rs, w, r) in &[(1, 1, 1), (7, 33, 7), (4, 257, 9), (33, 5, 2)] {
            let src = rand_vec(3, rs * w, 1.0);
            let parents: Vec<u32> = (0..r).map(|i| ((i * 5 + 3) % (rs + 1)) as u32).collect();
            let st = Tensor::from_f32(&gpu, &src, &[rs, w]).unwrap();
            let pt = Tensor::from_u32(&gpu, &parents, &[r]).unwrap();
            let got = gather_rows(&st, &pt).unwrap();
            assert_eq!(got.shape(), &[r, w]);
            assert_close("gather_rows", &got.to_vec_f32().unwrap(), &gather_rows_ref(&src, w, &parents), 0.0, 0.0);
            let ints: Vec<i32> = (0..rs as i32).map(|i| i * 3 - 7).collect();
            let it = Tensor::from_i32(&gpu, &ints, &[rs]).unwrap();
            let got = gather_rows(&it, &pt).unwrap().to_vec_i32().unwrap();
            let want: Vec<i32> =
                parents.iter().map(|&p| if (p as usize) < rs { ints[p as usize] } else { 0 }).collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn decode_meta_matches_host_mask() {
        let gpu = Gpu::shared().unwrap();
        for &(cap, cur, ref pads) in &[(1usize, 0usize, vec![0i32]), (9, 4, vec![0, 3, 1]), (33, 32, vec![5; 7])] {
            let pt = Tensor::from_i32(&gpu, pads, &[pads.len()]).unwrap();
            let (tok, pos) = decode_meta(&pt, cur, cap).unwrap();
            let (spec, want_pos) = decode_meta_ref(pads, cur, cap);
            let want_tok = spec.upload(&gpu).unwrap().tok.to_vec_i32().unwrap();
            assert_eq!(tok.to_vec_i32().unwrap(), want_tok, "mask table cap {cap} cur {cur}");
            assert_eq!(pos.to_vec_i32().unwrap(), want_pos);
        }
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_op() {
        let gpu = Gpu::shared().unwrap();
        let cache = Tensor::zeros(&gpu, &[1, 2, 4, 8], DType::F32).unwrap();
        let e = |r: Result<()>, what: &str| {
            let s = r.expect_err("expected an error").to_string();
            assert!(s.contains(what), "{s}");
        };
        e(kv_write(&cache, &Tensor::zeros(&gpu, &[1, 2, 5, 8], DType::F32).unwrap(), 0), "kv_write");
        e(kv_write(&cache, &Tensor::zeros(&gpu, &[1, 2, 1, 8], DType::F32).unwrap(), 4), "kv_write");
        e(kv_write(&cache, &Tensor::zeros(&gpu, &[1, 2, 1, 8], DType::F16).unwrap(), 0), "kv_write");
        let p = Tensor::zeros(&gpu, &[2], DType::I32).unwrap();
        e(gather_rows(&cache, &p).map(|_| ()), "gather_rows");
        let other = Tensor::zeros(&gpu, &[1, 2, 4, 8], DType::F32).unwrap();
        let parents = Tensor::from_u32(&gpu, &[0], &[1]).unwrap();
        let new = Tensor::zeros(&gpu, &[1, 16], DType::F32).unwrap();
        e(kv_reorder(&cache, &cache, &parents, 1, None), "different");
        e(kv_reorder(&other, &cache, &parents, 4, Some(&new)), "capacity 4");
        e(
            kv_reorder(&other, &cache, &Tensor::from_u32(&gpu, &[0, 0], &[2]).unwrap(), 1, None),
            "parents must be [R = 1]",
        );
        e(
            kv_reorder(&other, &cache, &parents, 1, Some(&Tensor::zeros(&gpu, &[1, 15], DType::F32).unwrap())),
            "R * H * Dh",
        );
        e(kv_reorder(&other, &cache, &p, 1, None), "kv_reorder");
        e(decode_meta(&p, 4, 4).map(|_| ()), "decode_meta");
    }
}
