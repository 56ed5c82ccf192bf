//! T5 relative position bias (`shaders/relbias.wgsl`): bucket the relative position
//! `k_pos[j] - q_pos[i]` exactly as Hugging Face T5's `_relative_position_bucket` and gather
//! the bucket embedding: `bias[h, i, j] = table[bucket, h]`, table `[num_buckets, H]`,
//! bias `[H, Tq, Tk]` (the additive bias of `ops::attention`, shared over the batch).
//!
//! Positions are i32 tensors `[Tq]`, `[Tk]` so callers can use T5's aranges (with the cache
//! length as the query offset when decoding) or SETRec's item-shared position ids.
//! HF computes the logarithmic buckets in f32 (`torch.log` of a float tensor); the bucket of
//! each distance below `max_distance` is computed once on the host with the same f32
//! arithmetic (`relative_position_bucket`) and passed to the kernel as a lookup table, so the
//! GPU's `log` accuracy cannot move a boundary. The backward scatters dbias into the table
//! deterministically (per-row bucket sums, then a fixed-order sum over rows; no atomics).

use anyhow::{bail, Result};

use crate::gpu::{check, div_ceil, shape_str, DType, Gpu, Kernel, Params, Tensor};

const OP: &str = "relbias";
const WG: u32 = 64;
/// Largest `num_buckets` the backward supports.
pub const MAX_BUCKETS: usize = 64;

/// Bucketing parameters: T5 uses 32 buckets, max distance 128, bidirectional in the encoder
/// and causal (unidirectional) in the decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelBiasCfg {
    pub bidirectional: bool,
    pub num_buckets: usize,
    pub max_distance: usize,
}

impl RelBiasCfg {
    /// T5 encoder self-attention: bidirectional, 32 buckets, max distance 128.
    pub fn t5_encoder() -> RelBiasCfg {
        RelBiasCfg { bidirectional: true, num_buckets: 32, max_distance: 128 }
    }
    /// T5 decoder self-attention: causal, 32 buckets, max distance 128.
    pub fn t5_decoder() -> RelBiasCfg {
        RelBiasCfg { bidirectional: false, num_buckets: 32, max_distance: 128 }
    }
    fn half(&self) -> usize {
        if self.bidirectional {
            self.num_buckets / 2
        } else {
            self.num_buckets
        }
    }
}

/// HF T5 `_relative_position_bucket(relative_position = key - query)`, with the same f32
/// arithmetic for the logarithmic part.
pub fn relative_position_bucket(rel: i64, cfg: RelBiasCfg) -> usize {
    let nbh = cfg.half();
    let mut bucket = 0;
    let n = if cfg.bidirectional {
        if rel > 0 {
            bucket += nbh;
        }
        rel.unsigned_abs() as usize
    } else {
        (-rel.min(0)) as usize
    };
    let max_exact = nbh / 2;
    if n < max_exact {
        return bucket + n;
    }
    let ratio = (n as f32 / max_exact as f32).ln();
    let denom = (cfg.max_distance as f64 / max_exact as f64).ln() as f32;
    let large = max_exact as i64 + (ratio / denom * (nbh - max_exact) as f32) as i64;
    bucket + (large as usize).min(nbh - 1)
}

/// Bucket (within one half) of each distance n < max(max_distance, max_exact).
pub fn bucket_lut(cfg: RelBiasCfg) -> Vec<u32> {
    let len = cfg.max_distance.max(cfg.half() / 2).max(1);
    // -n lands in the lower half for both directions.
    (0..len).map(|n| relative_position_bucket(-(n as i64), cfg) as u32).collect()
}

fn kernel(entry: &'static str) -> Kernel {
    Kernel::new(OP, "relbias", entry).define("WG", format!("{WG}u")).define("MAX_BUCKETS", format!("{MAX_BUCKETS}u"))
}

/// Every relbias kernel variant (for naga validation).
pub fn kernels() -> Vec<Kernel> {
    vec![kernel("relbias_fwd"), kernel("relbias_bwd_rows"), kernel("relbias_bwd_table")]
}

/// i32 positions `start, start + 1, ..` (length `len`) for `relbias`.
pub fn positions(gpu: &Gpu, start: i32, len: usize) -> Result<Tensor> {
    let v: Vec<i32> = (0..len as i32).map(|i| start + i).collect();
    Tensor::from_i32(gpu, &v, &[len])
}

fn check_cfg(cfg: RelBiasCfg) -> Result<()> {
    if cfg.num_buckets < 2 || cfg.num_buckets > MAX_BUCKETS || (cfg.bidirectional && !cfg.num_buckets.is_multiple_of(2))
    {
        bail!("{OP}: num_buckets {} must be in 2..={MAX_BUCKETS} (even when bidirectional)", cfg.num_buckets);
    }
    if cfg.half() < 2 || cfg.max_distance == 0 {
        bail!("{OP}: {cfg:?} leaves no logarithmic range");
    }
    Ok(())
}

fn check_pos(q_pos: &Tensor, k_pos: &Tensor) -> Result<(usize, usize)> {
    check::nonempty(OP, &[("q_pos", q_pos), ("k_pos", k_pos)])?;
    check::dtype(OP, "q_pos", q_pos, DType::I32)?;
    check::dtype(OP, "k_pos", k_pos, DType::I32)?;
    if q_pos.rank() != 1 || k_pos.rank() != 1 {
        bail!(
            "{OP}: positions must be [Tq] and [Tk], got {} and {}",
            shape_str(q_pos.shape()),
            shape_str(k_pos.shape())
        );
    }
    Ok((q_pos.numel(), k_pos.numel()))
}

fn params(heads: usize, tq: usize, tk: usize, cfg: RelBiasCfg, lut_len: usize, n: usize) -> (Params, [u32; 3]) {
    let groups = div_ceil(n, WG as usize).max(1);
    let gx = groups.min(65535);
    let p =
        Params::new().u(heads).u(tq).u(tk).u(cfg.num_buckets).u(cfg.bidirectional as usize).u(lut_len).u(gx as usize);
    (p, [gx, groups.div_ceil(gx), 1])
}

/// The bias `[H, Tq, Tk]` from the bucket table `[num_buckets, H]` and positions `[Tq]`, `[Tk]`.
pub fn relbias(table: &Tensor, q_pos: &Tensor, k_pos: &Tensor, cfg: RelBiasCfg) -> Result<Tensor> {
    check_cfg(cfg)?;
    let (tq, tk) = check_pos(q_pos, k_pos)?;
    check::nonempty(OP, &[("table", table)])?;
    check::dtype(OP, "table", table, DType::F32)?;
    if table.rank() != 2 || table.shape()[0] != cfg.num_buckets {
        bail!("{OP}: table must be [num_buckets = {}, H], got {}", cfg.num_buckets, shape_str(table.shape()));
    }
    check::same_device(OP, &[table, q_pos, k_pos])?;
    let h = table.shape()[1];
    let gpu = table.gpu();
    let lut = bucket_lut(cfg);
    let lut_t = Tensor::from_u32(gpu, &lut, &[lut.len()])?;
    let bias = Tensor::empty(gpu, &[h, tq, tk], DType::F32)?;
    let (p, grid) = params(h, tq, tk, cfg, lut.len(), h * tq * tk);
    gpu.dispatch(
        &kernel("relbias_fwd"),
        p.bytes(),
        &[table.buffer(), q_pos.buffer(), k_pos.buffer(), lut_t.buffer(), bias.buffer()],
        grid,
    )?;
    Ok(bias)
}

/// Gradient of the bucket table `[num_buckets, H]` from dbias `[H, Tq, Tk]` (deterministic).
pub fn relbias_backward(dbias: &Tensor, q_pos: &Tensor, k_pos: &Tensor, cfg: RelBiasCfg) -> Result<Tensor> {
    check_cfg(cfg)?;
    let (tq, tk) = check_pos(q_pos, k_pos)?;
    check::nonempty(OP, &[("dbias", dbias)])?;
    check::dtype(OP, "dbias", dbias, DType::F32)?;
    if dbias.rank() != 3 || dbias.shape()[1] != tq || dbias.shape()[2] != tk {
        bail!("{OP}: dbias must be [H, Tq = {tq}, Tk = {tk}], got {}", shape_str(dbias.shape()));
    }
    check::same_device(OP, &[dbias, q_pos, k_pos])?;
    let h = dbias.shape()[0];
    let gpu = dbias.gpu();
    let lut = bucket_lut(cfg);
    let lut_t = Tensor::from_u32(gpu, &lut, &[lut.len()])?;
    let partial = Tensor::empty(gpu, &[h, tq, cfg.num_buckets], DType::F32)?;
    let (p, grid) = params(h, tq, tk, cfg, lut.len(), h * tq);
    gpu.dispatch(
        &kernel("relbias_bwd_rows"),
        p.bytes(),
        &[dbias.buffer(), q_pos.buffer(), k_pos.buffer(), lut_t.buffer(), partial.buffer()],
        grid,
    )?;
    let dtable = Tensor::empty(gpu, &[cfg.num_buckets, h], DType::F32)?;
    let (p, grid) = params(h, tq, tk, cfg, lut.len(), cfg.num_buckets * h);
    gpu.dispatch(&kernel("relbias_bwd_table"), p.bytes(), &[partial.buffer(), dtable.buffer()], grid)?;
    Ok(dtable)
}

/// CPU reference: bias `[H, Tq, Tk]` in f64 from table `[nb, H]`.
pub fn relbias_ref(table: &[f64], heads: usize, q_pos: &[i32], k_pos: &[i32], cfg: RelBiasCfg) -> Vec<f64> {
    let (tq, tk) = (q_pos.len(), k_pos.len());
    let mut out = vec![0.0; heads * tq * tk];
    for h in 0..heads {
        for (i, &qp) in q_pos.iter().enumerate() {
            for (j, &kp) in k_pos.iter().enumerate() {
                let bk = relative_position_bucket(kp as i64 - qp as i64, cfg);
                out[(h * tq + i) * tk + j] = table[bk * heads + h];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_close, finite_diff, rand_vec};

    #[test]
    fn buckets_match_hf_t5_values() {
        // Expected values computed with numpy float32 arithmetic following HF's
        // `_relative_position_bucket` (independent of this file's code).
        let enc = RelBiasCfg::t5_encoder();
        for (rel, want) in [
            (0, 0),
            (1, 17),
            (-1, 1),
            (-7, 7),
            (-8, 8),
            (-11, 8),
            (-12, 9),
            (-15, 9),
            (-16, 10),
            (16, 26),
            (-22, 10),
            (-23, 11),
            (-32, 12),
            (-45, 12),
            (-46, 13),
            (-64, 14),
            (-90, 14),
            (-91, 15),
            (-127, 15),
            (-128, 15),
            (-1000, 15),
            (1000, 31),
        ] {
            assert_eq!(relative_position_bucket(rel, enc), want, "bidirectional rel {rel}");
        }
        let dec = RelBiasCfg::t5_decoder();
        for (rel, want) in [
            (5, 0),
            (0, 0),
            (-15, 15),
            (-16, 16),
            (-18, 16),
            (-19, 17),
            (-32, 21),
            (-64, 26),
            (-112, 30),
            (-113, 31),
            (-500, 31),
        ] {
            assert_eq!(relative_position_bucket(rel, dec), want, "causal rel {rel}");
        }
    }

    #[test]
    fn forward_matches_reference() {
        let gpu = Gpu::shared().unwrap();
        for (cfg, tq, tk, q0, h) in [
            (RelBiasCfg::t5_encoder(), 1, 1, 0, 1),
            (RelBiasCfg::t5_encoder(), 33, 33, 0, 6),
            (RelBiasCfg::t5_decoder(), 7, 7, 0, 8),
            (RelBiasCfg::t5_decoder(), 1, 300, 299, 3), // decoding step with a long cache
            (RelBiasCfg::t5_encoder(), 65, 257, -50, 2),
            (RelBiasCfg { bidirectional: false, num_buckets: 16, max_distance: 20 }, 9, 40, 30, 2),
        ] {
            let table = rand_vec(tq as u64 + tk as u64, cfg.num_buckets * h, 1.0);
            let tt = Tensor::from_f32(&gpu, &table, &[cfg.num_buckets, h]).unwrap();
            let qp = positions(&gpu, q0, tq).unwrap();
            let kp = positions(&gpu, 0, tk).unwrap();
            let got = relbias(&tt, &qp, &kp, cfg).unwrap().to_vec_f32().unwrap();
            let qv: Vec<i32> = (0..tq as i32).map(|i| q0 + i).collect();
            let kv: Vec<i32> = (0..tk as i32).collect();
            let t64: Vec<f64> = table.iter().map(|&x| x as f64).collect();
            let want: Vec<f32> = relbias_ref(&t64, h, &qv, &kv, cfg).iter().map(|&x| x as f32).collect();
            assert_close(&format!("relbias {cfg:?} {tq}x{tk}"), &got, &want, 0.0, 0.0);
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let gpu = Gpu::shared().unwrap();
        // Item-shared positions (SETRec T5 encoder) on the query and key side.
        let pos: Vec<i32> = vec![0, 1, 2, 2, 2, 3, 3, 3, 40, 41, 200];
        let t = pos.len();
        for cfg in [RelBiasCfg::t5_encoder(), RelBiasCfg::t5_decoder()] {
            let h = 3;
            let table = rand_vec(5, cfg.num_buckets * h, 1.0);
            let dy = rand_vec(6, h * t * t, 1.0);
            let fd = finite_diff(&table, 1e-3, |tb| {
                relbias_ref(tb, h, &pos, &pos, cfg).iter().zip(&dy).map(|(a, &b)| a * b as f64).sum()
            });
            let pt = Tensor::from_i32(&gpu, &pos, &[t]).unwrap();
            let dyt = Tensor::from_f32(&gpu, &dy, &[h, t, t]).unwrap();
            let g = relbias_backward(&dyt, &pt, &pt, cfg).unwrap().to_vec_f32().unwrap();
            assert_close(&format!("relbias dtable {cfg:?}"), &g, &fd, 1e-4, 1e-5);
        }
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_op() {
        let gpu = Gpu::shared().unwrap();
        let cfg = RelBiasCfg::t5_encoder();
        let table = Tensor::zeros(&gpu, &[32, 4], DType::F32).unwrap();
        let p = positions(&gpu, 0, 5).unwrap();
        let e = |r: Result<Tensor>| {
            let s = r.err().expect("expected an error").to_string();
            assert!(s.contains("relbias"), "{s}");
        };
        e(relbias(&Tensor::zeros(&gpu, &[16, 4], DType::F32).unwrap(), &p, &p, cfg));
        e(relbias(&table, &Tensor::zeros(&gpu, &[5], DType::F32).unwrap(), &p, cfg));
        e(relbias(&table, &p, &p, RelBiasCfg { num_buckets: 33, ..cfg }));
        e(relbias(&table, &p, &p, RelBiasCfg { num_buckets: 128, ..cfg }));
        e(relbias_backward(&Tensor::zeros(&gpu, &[4, 5, 6], DType::F32).unwrap(), &p, &p, cfg));
        e(relbias_backward(&Tensor::zeros(&gpu, &[4, 5, 0], DType::F32).unwrap(), &p, &p, cfg));
    }
}
