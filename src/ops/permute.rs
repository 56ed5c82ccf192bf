//! Axis permutation (rank <= 4), e.g. splitting attention heads:
//! [B, T, H, Dh] -> [B, H, T, Dh] is `permute(x, &[0, 2, 1, 3])`.
//! The backward of a permutation is the inverse permutation (`inverse`).

use anyhow::{bail, Result};

use crate::gpu::{check, shape_str, DType, Kernel, Params, Tensor};

const OP: &str = "permute";
const WG: usize = 256;

pub fn kernels() -> Vec<Kernel> {
    vec![kernel()]
}

fn kernel() -> Kernel {
    Kernel::new(OP, "permute", "permute")
}

/// Output axis `a` is input axis `perm[a]`. f32, rank 1..=4.
pub fn permute(x: &Tensor, perm: &[usize]) -> Result<Tensor> {
    check::dtype(OP, "x", x, DType::F32)?;
    let shape = x.shape();
    let r = shape.len();
    let mut seen = [false; 4];
    if r == 0 || r > 4 || perm.len() != r || perm.iter().any(|&p| p >= r || std::mem::replace(&mut seen[p], true)) {
        bail!("{OP}: {perm:?} is not a permutation of the axes of {}", shape_str(shape));
    }
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let y = Tensor::empty(x.gpu(), &out_shape, DType::F32)?;
    let n = x.numel();
    if n == 0 {
        return Ok(y);
    }
    // Input strides, then padded to rank 4 with leading unit axes.
    let mut in_strides = vec![1usize; r];
    for a in (0..r.saturating_sub(1)).rev() {
        in_strides[a] = in_strides[a + 1] * shape[a + 1];
    }
    let pad = 4 - r;
    let mut o = [1usize; 4];
    let mut s = [0usize; 4];
    for a in 0..r {
        o[pad + a] = out_shape[a];
        s[pad + a] = in_strides[perm[a]];
    }
    let groups = n.div_ceil(WG);
    let gx = groups.min(65535);
    let gy = groups.div_ceil(gx);
    let p = Params::new().u(n).u(o[0]).u(o[1]).u(o[2]).u(o[3]).u(s[0]).u(s[1]).u(s[2]).u(s[3]).u(gx * WG);
    x.gpu().dispatch(&kernel(), p.bytes(), &[x.buffer(), y.buffer()], [gx as u32, gy as u32, 1])?;
    Ok(y)
}

/// The permutation that undoes `perm`.
pub fn inverse(perm: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; perm.len()];
    for (a, &p) in perm.iter().enumerate() {
        inv[p] = a;
    }
    inv
}

/// CPU reference.
pub fn permute_ref(x: &[f32], shape: &[usize], perm: &[usize]) -> Vec<f32> {
    let r = shape.len();
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let mut strides = vec![1usize; r];
    for a in (0..r.saturating_sub(1)).rev() {
        strides[a] = strides[a + 1] * shape[a + 1];
    }
    let n: usize = shape.iter().product();
    let mut y = vec![0f32; n];
    for (i, out) in y.iter_mut().enumerate() {
        let mut rem = i;
        let mut src = 0;
        for a in (0..r).rev() {
            let c = rem % out_shape[a];
            rem /= out_shape[a];
            src += c * strides[perm[a]];
        }
        *out = x[src];
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::Gpu;
    use crate::ops::testing::rand_vec;

    #[test]
    fn matches_reference_on_awkward_shapes() {
        let gpu = Gpu::shared().unwrap();
        let cases: &[(&[usize], &[usize])] = &[
            (&[7], &[0]),
            (&[3, 5], &[1, 0]),
            (&[2, 7, 3, 5], &[0, 2, 1, 3]),
            (&[1, 33, 4, 9], &[0, 2, 1, 3]),
            (&[2, 3, 4, 5], &[3, 1, 0, 2]),
            (&[5, 1, 257], &[2, 0, 1]),
        ];
        for (i, (shape, perm)) in cases.iter().enumerate() {
            let n: usize = shape.iter().product();
            let x = rand_vec(i as u64, n, 1.0);
            let t = Tensor::from_f32(&gpu, &x, shape).unwrap();
            let y = permute(&t, perm).unwrap();
            let want = permute_ref(&x, shape, perm);
            assert_eq!(y.to_vec_f32().unwrap(), want, "shape {shape:?} perm {perm:?}");
            let back = permute(&y, &inverse(perm)).unwrap();
            assert_eq!(back.shape(), *shape);
            assert_eq!(back.to_vec_f32().unwrap(), x);
        }
    }

    #[test]
    fn rejects_bad_permutations() {
        let gpu = Gpu::shared().unwrap();
        let t = Tensor::from_f32(&gpu, &[0.0; 6], &[2, 3]).unwrap();
        for perm in [&[0, 0][..], &[0], &[0, 2], &[1, 0, 2]] {
            let e = permute(&t, perm).unwrap_err().to_string();
            assert!(e.contains("permute") && e.contains("[2, 3]"), "{e}");
        }
    }
}
