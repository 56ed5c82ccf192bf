//! Dropout with a counter-based RNG (`shaders/dropout.wgsl`).
//!
//! Element `i` of a call is kept iff `hash(seed, offset + i) >> 8 >= round(p * 2^24)`
//! (u32 wrapping arithmetic), and kept values are scaled by `1 / (1 - p)`. The
//! mask is a pure function of `(seed, offset + i)`, so it is reproducible and
//! `dropout_backward` recomputes it instead of storing it. Give different
//! tensors of one step different seeds, or one seed and disjoint `offset`
//! ranges (e.g. `offset` = running element count).

use anyhow::{bail, Result};

use crate::gpu::{check, div_ceil, DType, Kernel, Params, Tensor};

const WG: usize = 256;

fn kernel() -> Kernel {
    Kernel::new("dropout", "dropout", "dropout")
}

/// Every kernel variant of this family (for naga validation).
pub fn kernels() -> Vec<Kernel> {
    vec![kernel()]
}

/// Fold a 1-D count of workgroups into an (x, y) grid within the 65535 limit.
fn grid(workgroups: u32) -> [u32; 3] {
    let x = workgroups.min(65535);
    [x, workgroups.div_ceil(x.max(1)), 1]
}

/// The mask threshold on the top 24 bits of the hash, and the keep scale.
fn threshold_and_scale(op: &str, p: f32) -> Result<(u32, f32)> {
    if !(0.0..1.0).contains(&p) {
        bail!("{op}: drop probability p = {p} must be in [0, 1)");
    }
    let threshold = (p as f64 * (1u64 << 24) as f64).round() as u32;
    Ok((threshold, (1.0 / (1.0 - p as f64)) as f32))
}

fn launch(op: &str, x: &Tensor, p: f32, seed: u32, offset: u32) -> Result<Tensor> {
    check::nonempty(op, &[("x", x)])?;
    check::dtype(op, "x", x, DType::F32)?;
    let (threshold, scale) = threshold_and_scale(op, p)?;
    let n = x.numel();
    if n > u32::MAX as usize - WG {
        bail!("{op}: x {:?} has too many elements for one launch", x.shape());
    }
    let y = Tensor::empty(x.gpu(), x.shape(), DType::F32)?;
    let params = Params::new().u(n).u(seed as usize).u(offset as usize).u(threshold as usize).f(scale);
    x.gpu().dispatch(&kernel(), params.bytes(), &[x.buffer(), y.buffer()], grid(div_ceil(n, WG)))?;
    Ok(y)
}

/// `y = x * mask / (1 - p)` with `mask_i = hash(seed, offset + i) >= p`
/// (x: any shape, f32; y: same shape). `p` in [0, 1); `p = 0` is the identity.
pub fn dropout(x: &Tensor, p: f32, seed: u32, offset: u32) -> Result<Tensor> {
    launch("dropout", x, p, seed, offset)
}

/// Backward of `dropout(x, p, seed, offset)`: `dx = dy * mask / (1 - p)` with the
/// mask recomputed from `(seed, offset)` (dy: the shape of x).
pub fn dropout_backward(dy: &Tensor, p: f32, seed: u32, offset: u32) -> Result<Tensor> {
    launch("dropout_backward", dy, p, seed, offset)
}

/// CPU mirror of the WGSL hash (bit-exact).
pub fn pcg_hash(v: u32) -> u32 {
    let state = v.wrapping_mul(747796405).wrapping_add(2891336453);
    let word = ((state >> ((state >> 28) + 4)) ^ state).wrapping_mul(277803737);
    (word >> 22) ^ word
}

/// Whether element `counter` (= offset + index) is kept for this seed and p.
pub fn keep(seed: u32, counter: u32, p: f32) -> bool {
    let threshold = (p as f64 * (1u64 << 24) as f64).round() as u32;
    let k = pcg_hash(seed);
    let h = pcg_hash(pcg_hash(counter ^ k).wrapping_add(k));
    (h >> 8) >= threshold
}

/// CPU reference of `dropout` (f64 arithmetic, same mask as the GPU).
pub fn dropout_ref(x: &[f64], p: f32, seed: u32, offset: u32) -> Vec<f64> {
    let scale = 1.0 / (1.0 - p as f64);
    x.iter()
        .enumerate()
        .map(|(i, &v)| if keep(seed, offset.wrapping_add(i as u32), p) { v * scale } else { 0.0 })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::Gpu;
    use crate::ops::testing::{assert_close, finite_diff, rand_vec};

    #[test]
    fn matches_cpu_reference_at_awkward_sizes() {
        let gpu = Gpu::shared().unwrap();
        for (k, &n) in [1usize, 7, 33, 257, 1000].iter().enumerate() {
            for &p in &[0.1f32, 0.5] {
                let x = rand_vec(10 + k as u64, n, 2.0);
                let xt = Tensor::from_f32(&gpu, &x, &[n]).unwrap();
                let (seed, offset) = (1234 + k as u32, 77 * k as u32);
                let got = dropout(&xt, p, seed, offset).unwrap().to_vec_f32().unwrap();
                let xs: Vec<f64> = x.iter().map(|&v| v as f64).collect();
                let want: Vec<f32> = dropout_ref(&xs, p, seed, offset).iter().map(|&v| v as f32).collect();
                assert_close(&format!("dropout n={n} p={p}"), &got, &want, 1e-6, 0.0);
            }
        }
    }

    #[test]
    fn kept_fraction_is_close_to_one_minus_p_and_seeds_differ() {
        let gpu = Gpu::shared().unwrap();
        let n = 100_000;
        let x = Tensor::from_f32(&gpu, &vec![1.0; n], &[n]).unwrap();
        for &p in &[0.1f32, 0.3, 0.9] {
            let y = dropout(&x, p, 42, 0).unwrap().to_vec_f32().unwrap();
            let kept = y.iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
            // Binomial std is <= 0.0016 here; allow 4 sigma.
            assert!((kept - (1.0 - p as f64)).abs() < 0.0064, "p={p}: kept fraction {kept}");
            let scale = 1.0 / (1.0 - p);
            assert!(y.iter().all(|&v| v == 0.0 || (v - scale).abs() < 1e-6));
            // Mean is preserved in expectation.
            let mean = y.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            assert!((mean - 1.0).abs() < 0.05 * scale as f64, "p={p}: mean {mean}");
        }
        let a = dropout(&x, 0.5, 1, 0).unwrap().to_vec_f32().unwrap();
        let b = dropout(&x, 0.5, 2, 0).unwrap().to_vec_f32().unwrap();
        let same = a.iter().zip(&b).filter(|(u, v)| (**u == 0.0) == (**v == 0.0)).count() as f64 / n as f64;
        assert!((same - 0.5).abs() < 0.02, "masks of seeds 1 and 2 agree on {same} of elements");
        // Offset shifts the counter: dropout(x, off=5)[i] == dropout(x, off=0)[i + 5].
        let c = dropout(&x, 0.5, 1, 5).unwrap().to_vec_f32().unwrap();
        assert_eq!(&c[..n - 5], &a[5..]);
    }

    #[test]
    fn reproducible_and_backward_uses_forward_mask() {
        let gpu = Gpu::shared().unwrap();
        let n = 4099;
        let x = rand_vec(3, n, 1.0);
        let xt = Tensor::from_f32(&gpu, &x, &[n]).unwrap();
        let y1 = dropout(&xt, 0.25, 9, 100).unwrap().to_vec_f32().unwrap();
        let y2 = dropout(&xt, 0.25, 9, 100).unwrap().to_vec_f32().unwrap();
        assert_eq!(y1, y2);
        let dyt = Tensor::from_f32(&gpu, &vec![1.0; n], &[n]).unwrap();
        let dx = dropout_backward(&dyt, 0.25, 9, 100).unwrap().to_vec_f32().unwrap();
        for i in 0..n {
            assert_eq!(dx[i] == 0.0, y1[i] == 0.0 && x[i] != 0.0, "mask differs at {i}");
        }
    }

    #[test]
    fn p_zero_is_identity() {
        let gpu = Gpu::shared().unwrap();
        let x = rand_vec(4, 33, 3.0);
        let xt = Tensor::from_f32(&gpu, &x, &[3, 11]).unwrap();
        let y = dropout(&xt, 0.0, 5, 0).unwrap();
        assert_eq!(y.shape(), &[3, 11]);
        assert_eq!(y.to_vec_f32().unwrap(), x);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let gpu = Gpu::shared().unwrap();
        let n = 257;
        let (p, seed, offset) = (0.4, 77, 3);
        let x = rand_vec(5, n, 1.0);
        let dy = rand_vec(6, n, 1.0);
        let dyt = Tensor::from_f32(&gpu, &dy, &[n]).unwrap();
        let got = dropout_backward(&dyt, p, seed, offset).unwrap().to_vec_f32().unwrap();
        let want = finite_diff(&x, 1e-3, |xs| {
            dropout_ref(xs, p, seed, offset).iter().zip(&dy).map(|(o, &g)| o * g as f64).sum()
        });
        assert_close("dropout dx", &got, &want, 1e-3, 1e-5);
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_op() {
        let gpu = Gpu::shared().unwrap();
        let x = Tensor::from_f32(&gpu, &[1.0; 4], &[4]).unwrap();
        for p in [1.0, -0.1, f32::NAN] {
            let e = dropout(&x, p, 0, 0).unwrap_err().to_string();
            assert!(e.contains("dropout") && e.contains("[0, 1)"), "{e}");
        }
        let e = dropout_backward(&x, 1.5, 0, 0).unwrap_err().to_string();
        assert!(e.contains("dropout_backward"), "{e}");
        let i = Tensor::from_u32(&gpu, &[1; 4], &[4]).unwrap();
        let e = dropout(&i, 0.5, 0, 0).unwrap_err().to_string();
        assert!(e.contains("dropout") && e.contains("U32"), "{e}");
        let z = Tensor::empty(&gpu, &[0, 3], DType::F32).unwrap();
        assert!(dropout(&z, 0.5, 0, 0).unwrap_err().to_string().contains("dropout"));
    }
}
