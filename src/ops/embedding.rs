//! Embedding lookup (`gather`) and its deterministic backward (`scatter_add`),
//! `shaders/embedding.wgsl`.
//!
//! Out-of-range ids: the GPU kernels never read out of bounds. `gather` writes a
//! zero row for an id >= V and `scatter_add` drops its gradient (the position is
//! left out of the CSR). Checking every id on the GPU would need a readback, so
//! ids that come from host data should be uploaded with `ids_from_host`, which
//! rejects out-of-range ids with an error naming the op; ids made on the GPU
//! (argmin codes, sampled tokens) are in range by construction.
//!
//! Backward without float atomics: a stable counting sort on the GPU builds, for
//! every table row v, the list of positions i with ids[i] == v in increasing i
//! (integer atomics only count), then one invocation per (occupied row, column)
//! sums dy over its list in that order. Same bits every run, correct with
//! repeated ids. Cost caveat: a row's list is walked serially, so a very hot id
//! (e.g. a padding token filling half the batch) makes one chain of that many
//! dependent loads; give padding positions an id >= V instead (zero row, no
//! gradient) when building ids on the GPU.
//! `IdCsr` holds that CSR: `IdCsr::build` makes it on the GPU (clear + count +
//! scan (1 workgroup) + stable fill (1 workgroup, N/256 rounds)),
//! `IdCsr::from_host` sorts host ids on the CPU (O(N + V)) and uploads it, and
//! one CSR serves every backward that uses the same ids (`scatter_add_csr`).
//! The sum clears dtable, then runs N*D/4 invocations (vec4, when D % 4 == 0;
//! else N*D) of which only the first slot of each occupied row's list works.
//!
//! Measured at V=50k, N=16k (Zipf-like ids), D=576 on the 2-core lavapipe CI
//! machine shared with other jobs (load average 6-14, so +-3x noise),
//! `cargo test --lib ops::embedding::stage_timing -- --ignored --nocapture`:
//! `IdCsr::build` 50-180 ms (the one-workgroup fill dominates),
//! `IdCsr::from_host` 0.8 ms, `scatter_add_csr` 110-300 ms (clear of the
//! 115 MB dtable + sum), whole `scatter_add` 160-650 ms, `gather` 60-260 ms.
//! A first version that ran one invocation per (row, vec4) of dtable (V*D/4,
//! most rows empty) took ~1.1 s for the sum where the slot version took
//! ~0.3 s under the same load. On real GPUs every stage is memory-bound except
//! the single-workgroup fill (N/256 = 64 short rounds); prefer
//! `IdCsr::from_host` when ids come from host data anyway.

use anyhow::{bail, Result};

use crate::gpu::{check, div_ceil, shape_str, DType, Gpu, Kernel, Params, Tensor};

const WG: usize = 256;

fn k_gather() -> Kernel {
    Kernel::new("embedding gather", "embedding", "gather")
}
fn k_gather4() -> Kernel {
    Kernel::new("embedding gather", "embedding", "gather4")
}
fn k_sum4() -> Kernel {
    Kernel::new("embedding scatter_add", "embedding", "sum_slots4")
}
fn k_gather_f16() -> Kernel {
    Kernel::new("embedding gather", "embedding", "gather_f16")
}
fn k_count() -> Kernel {
    Kernel::new("embedding scatter_add", "embedding", "count_ids")
}
fn k_scan() -> Kernel {
    Kernel::new("embedding scatter_add", "embedding", "scan_offsets")
}
fn k_fill() -> Kernel {
    Kernel::new("embedding scatter_add", "embedding", "fill_sorted")
}
fn k_sum() -> Kernel {
    Kernel::new("embedding scatter_add", "embedding", "sum_slots")
}

/// Every kernel variant of this family (for naga validation).
pub fn kernels() -> Vec<Kernel> {
    vec![k_gather(), k_gather_f16(), k_count(), k_scan(), k_fill(), k_sum()]
}

fn grid(workgroups: u32) -> [u32; 3] {
    let x = workgroups.min(65535);
    [x, workgroups.div_ceil(x.max(1)), 1]
}

fn fits_u32(op: &str, what: &str, n: usize) -> Result<()> {
    if n > u32::MAX as usize - WG {
        bail!("{op}: {what} has {n} elements, more than one launch can index (u32)");
    }
    Ok(())
}

/// Upload token/item ids from host data as a U32 tensor of `shape`, rejecting
/// any id >= `vocab` (an error naming `op`, the position and the id).
pub fn ids_from_host(gpu: &Gpu, op: &str, ids: &[u32], shape: &[usize], vocab: usize) -> Result<Tensor> {
    if let Some((i, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        bail!("{op}: id {id} at position {i} of ids {} is out of range for a table of {vocab} rows", shape_str(shape));
    }
    Tensor::from_u32(gpu, ids, shape)
}

/// Rows of `table` ([V, D], f32 or f16) selected by `ids` (U32, any shape,
/// N elements): out has shape `ids.shape() + [D]`, f32. An id >= V gives a zero
/// row (see the module doc; validate host ids with `ids_from_host`).
pub fn gather(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    const OP: &str = "embedding gather";
    check::nonempty(OP, &[("table", table), ("ids", ids)])?;
    check::same_device(OP, &[table, ids])?;
    check::dtype(OP, "ids", ids, DType::U32)?;
    if table.rank() != 2 {
        bail!("{OP}: table must be [V, D], got {}", shape_str(table.shape()));
    }
    let (v, d, n) = (table.shape()[0], table.shape()[1], ids.numel());
    // Rows of 4k floats move as vec4s.
    let w = if table.dtype() == DType::F32 && d % 4 == 0 { 4 } else { 1 };
    let kernel = match table.dtype() {
        DType::F32 if w == 4 => k_gather4(),
        DType::F32 => k_gather(),
        DType::F16 => k_gather_f16(),
        other => bail!("{OP}: table has dtype {other:?}, expected F32 or F16 (shape {})", shape_str(table.shape())),
    };
    fits_u32(OP, "table", v * d)?;
    fits_u32(OP, "output", n * d)?;
    let mut shape = ids.shape().to_vec();
    shape.push(d);
    let out = Tensor::empty(table.gpu(), &shape, DType::F32)?;
    let params = Params::new().u(n).u(v).u(d / w);
    table.gpu().dispatch(
        &kernel,
        params.bytes(),
        &[table.buffer(), ids.buffer(), out.buffer()],
        grid(div_ceil(n * d / w, WG)),
    )?;
    Ok(out)
}

/// Positions grouped by id (CSR): for row v, `sorted[offsets[v]..offsets[v+1]]`
/// are the positions i with `ids[i] == v`, increasing. Positions with an
/// id >= vocab are left out (`offsets[vocab]` counts only valid ids). Build it once
/// per batch and reuse it for every table the same ids index.
#[derive(Clone, Debug)]
pub struct IdCsr {
    /// U32 `[vocab + 1]`.
    pub offsets: Tensor,
    /// U32 `[N]` (entries at or past `offsets[vocab]` are unused).
    pub sorted: Tensor,
    /// The ids it was built from: U32 `[N]`.
    pub ids: Tensor,
    pub vocab: usize,
}

impl IdCsr {
    /// Build on the GPU from ids already there (stable counting sort: integer
    /// atomics count, one workgroup scans, one workgroup places positions in order).
    pub fn build(ids: &Tensor, vocab: usize) -> Result<IdCsr> {
        const OP: &str = "embedding IdCsr::build";
        check::nonempty(OP, &[("ids", ids)])?;
        check::dtype(OP, "ids", ids, DType::U32)?;
        if vocab == 0 {
            bail!("{OP}: vocab must be > 0 (ids {})", shape_str(ids.shape()));
        }
        let n = ids.numel();
        fits_u32(OP, "ids", n)?;
        fits_u32(OP, "vocab", vocab + 1)?;
        let gpu = ids.gpu();
        let counts = Tensor::zeros(gpu, &[vocab], DType::U32)?;
        let offsets = Tensor::empty(gpu, &[vocab + 1], DType::U32)?;
        let cursor = Tensor::empty(gpu, &[vocab], DType::U32)?;
        let sorted = Tensor::empty(gpu, &[n], DType::U32)?;
        let params = Params::new().u(n).u(vocab).u(0);
        let pb = params.bytes();
        gpu.dispatch(&k_count(), pb, &[ids.buffer(), counts.buffer()], grid(div_ceil(n, WG)))?;
        gpu.dispatch(&k_scan(), pb, &[counts.buffer(), offsets.buffer(), cursor.buffer()], [1, 1, 1])?;
        gpu.dispatch(&k_fill(), pb, &[ids.buffer(), cursor.buffer(), sorted.buffer()], [1, 1, 1])?;
        Ok(IdCsr { offsets, sorted, ids: ids.clone(), vocab })
    }

    /// Build on the host from host ids (O(N + vocab)) and upload ids and CSR;
    /// rejects ids >= vocab like `ids_from_host`. `shape` is the ids' shape.
    pub fn from_host(gpu: &Gpu, ids: &[u32], shape: &[usize], vocab: usize) -> Result<IdCsr> {
        const OP: &str = "embedding IdCsr::from_host";
        if vocab == 0 || ids.is_empty() {
            bail!("{OP}: need vocab > 0 and at least one id (vocab {vocab}, ids {})", shape_str(shape));
        }
        let ids_t = ids_from_host(gpu, OP, ids, shape, vocab)?;
        let mut offsets = vec![0u32; vocab + 1];
        for &id in ids {
            offsets[id as usize + 1] += 1;
        }
        for v in 0..vocab {
            offsets[v + 1] += offsets[v];
        }
        let mut cursor = offsets.clone();
        let mut sorted = vec![0u32; ids.len()];
        for (i, &id) in ids.iter().enumerate() {
            sorted[cursor[id as usize] as usize] = i as u32;
            cursor[id as usize] += 1;
        }
        Ok(IdCsr {
            offsets: Tensor::from_u32(gpu, &offsets, &[vocab + 1])?,
            sorted: Tensor::from_u32(gpu, &sorted, &[ids.len()])?,
            ids: ids_t,
            vocab,
        })
    }
}

/// Backward of `gather`: `dtable[v, :] = sum_{i: ids[i] == v} dy[i, :]`
/// (dy: f32 with N rows of width D, e.g. `ids.shape() + [D]`; ids: U32 [N];
/// returns f32 [vocab, D]). Deterministic; positions with an id >= vocab are
/// dropped. Builds the CSR on the GPU; see `scatter_add_csr` to reuse one.
pub fn scatter_add(dy: &Tensor, ids: &Tensor, vocab: usize) -> Result<Tensor> {
    const OP: &str = "embedding scatter_add";
    check::nonempty(OP, &[("dy", dy), ("ids", ids)])?;
    check::dtype(OP, "ids", ids, DType::U32)?;
    if vocab == 0 || dy.rows() != ids.numel() {
        bail!(
            "{OP}: need vocab > 0 (got {vocab}) and one dy row per id (dy {}, ids {})",
            shape_str(dy.shape()),
            shape_str(ids.shape())
        );
    }
    scatter_add_csr(dy, &IdCsr::build(ids, vocab)?)
}

/// `scatter_add` with a prebuilt CSR of the ids (dy: f32, one row per id).
pub fn scatter_add_csr(dy: &Tensor, csr: &IdCsr) -> Result<Tensor> {
    const OP: &str = "embedding scatter_add";
    check::nonempty(OP, &[("dy", dy)])?;
    check::same_device(OP, &[dy, &csr.ids])?;
    check::dtype(OP, "dy", dy, DType::F32)?;
    let (n, d, vocab) = (csr.ids.numel(), dy.last_dim(), csr.vocab);
    if dy.rows() != n {
        bail!(
            "{OP}: dy {} must have one row per id, ids {} has {n}",
            shape_str(dy.shape()),
            shape_str(csr.ids.shape())
        );
    }
    fits_u32(OP, "dtable", (vocab + 1) * d)?;
    fits_u32(OP, "dy", n * d)?;
    let gpu = dy.gpu();
    let dtable = Tensor::empty(gpu, &[vocab, d], DType::F32)?;
    // Rows no id maps to stay zero; rows of 4k floats move as vec4s.
    gpu.with_encoder(|e| e.clear_buffer(dtable.buffer(), 0, None));
    let (sum, w) = if d % 4 == 0 { (k_sum4(), 4) } else { (k_sum(), 1) };
    gpu.dispatch(
        &sum,
        Params::new().u(n).u(vocab).u(d / w).bytes(),
        &[dy.buffer(), csr.offsets.buffer(), csr.sorted.buffer(), dtable.buffer(), csr.ids.buffer()],
        grid(div_ceil(n * d / w, WG)),
    )?;
    Ok(dtable)
}

/// CPU reference of `gather` (table [V, D] row-major; zero rows for ids >= V).
pub fn gather_ref(table: &[f64], v: usize, d: usize, ids: &[u32]) -> Vec<f64> {
    let mut out = vec![0.0; ids.len() * d];
    for (i, &id) in ids.iter().enumerate() {
        if (id as usize) < v {
            out[i * d..(i + 1) * d].copy_from_slice(&table[id as usize * d..(id as usize + 1) * d]);
        }
    }
    out
}

/// CPU reference of `scatter_add` (f64 sums, [vocab, D]).
pub fn scatter_add_ref(dy: &[f64], ids: &[u32], vocab: usize, d: usize) -> Vec<f64> {
    let mut out = vec![0.0; vocab * d];
    for (i, &id) in ids.iter().enumerate() {
        if (id as usize) < vocab {
            for c in 0..d {
                out[id as usize * d + c] += dy[i * d + c];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_close, finite_diff, rand_vec};
    use rand::{Rng, SeedableRng};

    fn to64(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&v| v as f64).collect()
    }
    fn to32(x: &[f64]) -> Vec<f32> {
        x.iter().map(|&v| v as f32).collect()
    }
    fn rand_ids(seed: u64, n: usize, v: usize) -> Vec<u32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(0..v as u32)).collect()
    }

    #[test]
    fn gather_matches_cpu_at_awkward_sizes() {
        let gpu = Gpu::shared().unwrap();
        for (k, &(v, d, n)) in [
            (1usize, 1usize, 1usize),
            (7, 33, 5),
            (33, 7, 257),
            (257, 65, 33),
            (5, 3, 1000),
            (7, 8, 33),   // vec4 path
            (33, 4, 257), // vec4 path
        ]
        .iter()
        .enumerate()
        {
            let table = rand_vec(k as u64, v * d, 1.0);
            let ids = rand_ids(50 + k as u64, n, v);
            let tt = Tensor::from_f32(&gpu, &table, &[v, d]).unwrap();
            let it = Tensor::from_u32(&gpu, &ids, &[n]).unwrap();
            let out = gather(&tt, &it).unwrap();
            assert_eq!(out.shape(), &[n, d]);
            let want = to32(&gather_ref(&to64(&table), v, d, &ids));
            assert_eq!(out.to_vec_f32().unwrap(), want, "gather v={v} d={d} n={n}");
        }
    }

    #[test]
    fn gather_f16_table_and_nd_ids() {
        let gpu = Gpu::shared().unwrap();
        let (v, d) = (9, 7); // odd D: rows straddle the packed u32 words
        let mut table: Vec<f32> = rand_vec(3, v * d, 2.0).iter().map(|&x| half::f16::from_f32(x).to_f32()).collect();
        // Special values in row 0: zero, -0, subnormals, the largest finite, inf.
        let special = [
            0.0,
            -0.0,
            2f32.powi(-24), // the smallest f16 subnormal
            -168.0 * 2f32.powi(-24),
            65504.0,
            f32::INFINITY,
            -2.5,
        ];
        table[..7].copy_from_slice(&special);
        let mut ids = rand_ids(4, 15, v);
        ids[4] = 0;
        let tt = Tensor::from_f32_as_f16(&gpu, &table, &[v, d]).unwrap();
        let it = Tensor::from_u32(&gpu, &ids, &[3, 5]).unwrap();
        let out = gather(&tt, &it).unwrap();
        assert_eq!(out.shape(), &[3, 5, d]);
        assert_eq!(out.to_vec_f32().unwrap(), to32(&gather_ref(&to64(&table), v, d, &ids)));
    }

    #[test]
    fn out_of_range_ids_give_zero_rows_and_no_gradient() {
        let gpu = Gpu::shared().unwrap();
        let (v, d) = (4, 3);
        let table = rand_vec(5, v * d, 1.0);
        let ids = [1u32, 4, 3, u32::MAX, 1];
        let tt = Tensor::from_f32(&gpu, &table, &[v, d]).unwrap();
        let it = Tensor::from_u32(&gpu, &ids, &[5]).unwrap();
        let out = gather(&tt, &it).unwrap().to_vec_f32().unwrap();
        assert_eq!(&out[3..6], &[0.0; 3]);
        assert_eq!(&out[9..12], &[0.0; 3]);
        assert_eq!(&out[0..3], &table[3..6]);
        let dy = rand_vec(6, 5 * d, 1.0);
        let dyt = Tensor::from_f32(&gpu, &dy, &[5, d]).unwrap();
        let got = scatter_add(&dyt, &it, v).unwrap().to_vec_f32().unwrap();
        assert_close("scatter_add with bad ids", &got, &to32(&scatter_add_ref(&to64(&dy), &ids, v, d)), 1e-6, 1e-7);
        let e = ids_from_host(&gpu, "embedding gather", &ids, &[5], v).unwrap_err().to_string();
        assert!(e.contains("embedding gather") && e.contains("id 4") && e.contains("position 1"), "{e}");
        assert!(ids_from_host(&gpu, "x", &[0, 3], &[2], v).is_ok());
    }

    #[test]
    fn scatter_add_matches_cpu_with_repeated_ids() {
        let gpu = Gpu::shared().unwrap();
        let cases: &[(usize, usize, usize, u64)] = &[
            (1, 1, 1, 0),
            (1, 7, 33, 1),    // every id the same
            (7, 33, 257, 2),  // many repeats, N spans two fill chunks
            (257, 5, 33, 3),  // mostly unseen rows
            (33, 9, 1000, 4), // N not a multiple of 256
            (300, 4, 600, 5), // V larger than the 256 scan threads' chunking (vec4 path)
            (7, 12, 257, 6),  // vec4 path, many repeats
        ];
        for &(v, d, n, seed) in cases {
            let ids = rand_ids(seed, n, v);
            let dy = rand_vec(seed + 100, n * d, 1.0);
            let it = Tensor::from_u32(&gpu, &ids, &[n]).unwrap();
            let dyt = Tensor::from_f32(&gpu, &dy, &[n, d]).unwrap();
            let got = scatter_add(&dyt, &it, v).unwrap();
            assert_eq!(got.shape(), &[v, d]);
            let want = to32(&scatter_add_ref(&to64(&dy), &ids, v, d));
            assert_close(&format!("scatter_add v={v} d={d} n={n}"), &got.to_vec_f32().unwrap(), &want, 1e-5, 1e-6);
        }
    }

    #[test]
    fn scatter_add_sums_in_position_order_bit_exactly_and_repeatably() {
        // A hot id spread over several fill chunks: the GPU sum must equal the f32
        // left-to-right sum in position order, bit for bit, on every run.
        let gpu = Gpu::shared().unwrap();
        for d in [2usize, 8] {
            let (v, n) = (3usize, 900usize);
            let ids: Vec<u32> = (0..n).map(|i| if i % 5 == 0 { 2 } else { (i % 2) as u32 }).collect();
            let dy: Vec<f32> =
                rand_vec(9, n * d, 1.0).iter().enumerate().map(|(i, x)| x * 10f32.powi((i % 7) as i32 - 3)).collect();
            let it = Tensor::from_u32(&gpu, &ids, &[n]).unwrap();
            let dyt = Tensor::from_f32(&gpu, &dy, &[n, d]).unwrap();
            let mut want = vec![0f32; v * d];
            for i in 0..n {
                for c in 0..d {
                    want[ids[i] as usize * d + c] += dy[i * d + c];
                }
            }
            for _ in 0..3 {
                let got = scatter_add(&dyt, &it, v).unwrap().to_vec_f32().unwrap();
                assert_eq!(
                    got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                );
            }
        }
    }

    #[test]
    fn host_and_gpu_csr_agree() {
        let gpu = Gpu::shared().unwrap();
        for &(v, d, n, seed) in &[(7usize, 12usize, 257usize, 60u64), (300, 5, 600, 61), (1, 3, 1, 62)] {
            let ids = rand_ids(seed, n, v);
            let host = IdCsr::from_host(&gpu, &ids, &[n], v).unwrap();
            let dev = IdCsr::build(&Tensor::from_u32(&gpu, &ids, &[n]).unwrap(), v).unwrap();
            assert_eq!(host.offsets.to_vec_u32().unwrap(), dev.offsets.to_vec_u32().unwrap());
            assert_eq!(host.sorted.to_vec_u32().unwrap(), dev.sorted.to_vec_u32().unwrap());
            let dy = Tensor::from_f32(&gpu, &rand_vec(seed + 1, n * d, 1.0), &[n, d]).unwrap();
            let a = scatter_add_csr(&dy, &host).unwrap().to_vec_f32().unwrap();
            let b = scatter_add(&dy, &dev.ids, v).unwrap().to_vec_f32().unwrap();
            assert_eq!(a, b);
        }
        let e = IdCsr::from_host(&gpu, &[0, 9], &[2], 5).unwrap_err().to_string();
        assert!(e.contains("IdCsr::from_host") && e.contains("id 9"), "{e}");
    }

    #[test]
    fn scatter_add_matches_finite_differences_of_gather() {
        let gpu = Gpu::shared().unwrap();
        let (v, d, n) = (6, 5, 40);
        let table = rand_vec(11, v * d, 1.0);
        let ids = rand_ids(12, n, v);
        let dy = rand_vec(13, n * d, 1.0);
        let it = Tensor::from_u32(&gpu, &ids, &[n]).unwrap();
        let dyt = Tensor::from_f32(&gpu, &dy, &[n, d]).unwrap();
        let got = scatter_add(&dyt, &it, v).unwrap().to_vec_f32().unwrap();
        let want =
            finite_diff(&table, 1e-3, |t| gather_ref(t, v, d, &ids).iter().zip(&dy).map(|(o, &g)| o * g as f64).sum());
        assert_close("embedding dtable", &got, &want, 1e-3, 1e-5);
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_op() {
        let gpu = Gpu::shared().unwrap();
        let t = Tensor::from_f32(&gpu, &[0.0; 6], &[2, 3]).unwrap();
        let ids_f = Tensor::from_f32(&gpu, &[0.0; 2], &[2]).unwrap();
        let ids = Tensor::from_u32(&gpu, &[0, 1], &[2]).unwrap();
        let e = gather(&t, &ids_f).unwrap_err().to_string();
        assert!(e.contains("embedding gather") && e.contains("ids"), "{e}");
        let flat = Tensor::from_f32(&gpu, &[0.0; 6], &[6]).unwrap();
        let e = gather(&flat, &ids).unwrap_err().to_string();
        assert!(e.contains("embedding gather") && e.contains("[6]"), "{e}");
        let dy = Tensor::from_f32(&gpu, &[0.0; 9], &[3, 3]).unwrap();
        let e = scatter_add(&dy, &ids, 2).unwrap_err().to_string();
        assert!(e.contains("embedding scatter_add") && e.contains("[3, 3]"), "{e}");
        let e = scatter_add(&t, &ids, 0).unwrap_err().to_string();
        assert!(e.contains("embedding scatter_add"), "{e}");
        let empty = Tensor::empty(&gpu, &[0], DType::U32).unwrap();
        assert!(gather(&t, &empty).unwrap_err().to_string().contains("embedding gather"));
    }

    /// Timing at the brief's size (V=50k, N=16k, D=576):
    /// `cargo test --lib ops::embedding::tests::bench -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_scatter_add_50k_16k_576() {
        let gpu = Gpu::shared().unwrap();
        let (v, n, d) = (50_000usize, 16_384usize, 576usize);
        // Zipf-like ids: a few hot rows, a long tail.
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let ids: Vec<u32> = (0..n).map(|_| ((v as f64).powf(rng.gen::<f64>()) as u32 - 1).min(v as u32 - 1)).collect();
        let it = Tensor::from_u32(&gpu, &ids, &[n]).unwrap();
        let dyt = Tensor::from_f32(&gpu, &rand_vec(2, n * d, 1.0), &[n, d]).unwrap();
        let table = Tensor::from_f32(&gpu, &rand_vec(3, v * d, 1.0), &[v, d]).unwrap();
        let time = |label: &str, f: &dyn Fn() -> Tensor| {
            let _ = f();
            gpu.sync().unwrap();
            let reps = 5;
            let t0 = std::time::Instant::now();
            let mut keep = Vec::new();
            for _ in 0..reps {
                keep.push(f());
            }
            gpu.sync().unwrap();
            let ms = t0.elapsed().as_secs_f64() * 1e3 / reps as f64;
            println!("{label}: {ms:.2} ms per call ({})", gpu.describe());
        };
        time("gather [16384] from [50000, 576]", &|| gather(&table, &it).unwrap());
        time("scatter_add [16384, 576] -> [50000, 576]", &|| scatter_add(&dyt, &it, v).unwrap());
        let got = scatter_add(&dyt, &it, v).unwrap().to_vec_f32().unwrap();
        let want = scatter_add_ref(&to64(&dyt.to_vec_f32().unwrap()), &ids, v, d);
        assert_close("bench scatter_add", &got, &to32(&want), 1e-4, 1e-5);
    }
}

/// Per-stage timing of `scatter_add` at the brief's size:
/// `cargo test --lib ops::embedding::stage_timing -- --ignored --nocapture`
#[cfg(test)]
mod stage_timing {
    use super::*;
    use crate::ops::testing::rand_vec;
    use rand::{Rng, SeedableRng};

    #[test]
    #[ignore]
    fn stages() {
        let gpu = Gpu::shared().unwrap();
        let (v, n, d) = (50_000usize, 16_384usize, 576usize);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let ids: Vec<u32> = (0..n).map(|_| ((v as f64).powf(rng.gen::<f64>()) as u32 - 1).min(v as u32 - 1)).collect();
        let it = Tensor::from_u32(&gpu, &ids, &[n]).unwrap();
        let dy = Tensor::from_f32(&gpu, &rand_vec(2, n * d, 1.0), &[n, d]).unwrap();
        let t = |label: &str, f: &dyn Fn()| {
            f();
            gpu.sync().unwrap();
            let t0 = std::time::Instant::now();
            for _ in 0..3 {
                f();
            }
            gpu.sync().unwrap();
            println!("{label}: {:.2} ms", t0.elapsed().as_secs_f64() * 1e3 / 3.0);
        };
        t("IdCsr::build (clear + count_ids + scan_offsets + fill_sorted)", &|| drop(IdCsr::build(&it, v).unwrap()));
        let csr = IdCsr::build(&it, v).unwrap();
        t("scatter_add_csr (clear dtable + sum_slots4)", &|| drop(scatter_add_csr(&dy, &csr).unwrap()));
        t("IdCsr::from_host (host sort + uploads)", &|| drop(IdCsr::from_host(&gpu, &ids, &[n], v).unwrap()));
        t("scatter_add (all of it)", &|| drop(scatter_add(&dy, &it, v).unwrap()));
        let table = Tensor::from_f32(&gpu, &rand_vec(3, v * d, 1.0), &[v, d]).unwrap();
        t("gather", &|| drop(gather(&table, &it).unwrap()));
    }
}
