//! Sparse (CSR) x dense matrix products, as LightGCN's propagation uses.
//!
//! A `Csr` lives on the GPU together with its transpose, so the backward pass
//! (dX = Aᵀ dY) is another SpMM. Deterministic: each output element is summed
//! by one invocation in CSR order (no atomics).

use anyhow::{bail, Result};

use crate::gpu::{check, shape_str, DType, Gpu, Kernel, Params, Tensor};

const OP: &str = "spmm";
const WG: usize = 64;

pub fn kernels() -> Vec<Kernel> {
    vec![kernel()]
}

fn kernel() -> Kernel {
    Kernel::new(OP, "spmm", "spmm")
}

/// One CSR matrix [rows, cols] on the device.
#[derive(Clone, Debug)]
pub struct CsrGpu {
    pub rows: usize,
    pub cols: usize,
    pub nnz: usize,
    row_ptr: Tensor,
    col: Tensor,
    val: Tensor,
}

/// A sparse matrix and its transpose on the device.
#[derive(Clone, Debug)]
pub struct Csr {
    pub a: CsrGpu,
    pub at: CsrGpu,
}

/// Host CSR: (row_ptr, col, val), sorted by row then column.
fn host_csr(rows: usize, cols: usize, triples: &[(u32, u32, f32)]) -> Result<(Vec<u32>, Vec<u32>, Vec<f32>)> {
    let mut t = triples.to_vec();
    for &(r, c, v) in &t {
        if r as usize >= rows || c as usize >= cols {
            bail!("{OP}: entry ({r}, {c}) outside a {rows} x {cols} matrix");
        }
        if !v.is_finite() {
            bail!("{OP}: entry ({r}, {c}) has non-finite value {v}");
        }
    }
    t.sort_by_key(|&(r, c, _)| (r, c));
    let mut row_ptr = vec![0u32; rows + 1];
    for &(r, _, _) in &t {
        row_ptr[r as usize + 1] += 1;
    }
    for i in 0..rows {
        row_ptr[i + 1] += row_ptr[i];
    }
    Ok((row_ptr, t.iter().map(|x| x.1).collect(), t.iter().map(|x| x.2).collect()))
}

impl CsrGpu {
    fn upload(gpu: &Gpu, rows: usize, cols: usize, triples: &[(u32, u32, f32)]) -> Result<CsrGpu> {
        let (rp, c, v) = host_csr(rows, cols, triples)?;
        let nnz = c.len();
        // Zero-nnz matrices still need non-empty buffers to bind.
        let (c, v) = if nnz == 0 { (vec![0u32], vec![0f32]) } else { (c, v) };
        Ok(CsrGpu {
            rows,
            cols,
            nnz,
            row_ptr: Tensor::from_u32(gpu, &rp, &[rows + 1])?,
            col: Tensor::from_u32(gpu, &c, &[c.len()])?,
            val: Tensor::from_f32(gpu, &v, &[v.len()])?,
        })
    }

    /// y = A x, x: [cols, D] -> [rows, D].
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        check::dtype(OP, "x", x, DType::F32)?;
        if x.rank() != 2 || x.shape()[0] != self.cols {
            bail!(
                "{OP}: dense operand {} must be [{}, D] for a {} x {} sparse matrix",
                shape_str(x.shape()),
                self.cols,
                self.rows,
                self.cols
            );
        }
        let d = x.shape()[1];
        let y = Tensor::empty(x.gpu(), &[self.rows, d], DType::F32)?;
        if self.rows == 0 || d == 0 {
            return Ok(y);
        }
        // Flat index over (row, column quad), folded into a 2-D grid.
        let groups = (self.rows * d.div_ceil(4)).div_ceil(WG);
        let gx = groups.min(65535);
        let gy = groups.div_ceil(gx);
        let p = Params::new().u(self.rows).u(d).u(gx * WG);
        x.gpu().dispatch(
            &kernel(),
            p.bytes(),
            &[self.row_ptr.buffer(), self.col.buffer(), self.val.buffer(), x.buffer(), y.buffer()],
            [gx as u32, gy as u32, 1],
        )?;
        Ok(y)
    }
}

impl Csr {
    /// Build from (row, col, value) triples of a `rows x cols` matrix.
    pub fn from_triples(gpu: &Gpu, rows: usize, cols: usize, triples: &[(u32, u32, f32)]) -> Result<Csr> {
        let t: Vec<(u32, u32, f32)> = triples.iter().map(|&(r, c, v)| (c, r, v)).collect();
        Ok(Csr { a: CsrGpu::upload(gpu, rows, cols, triples)?, at: CsrGpu::upload(gpu, cols, rows, &t)? })
    }
}

/// CPU reference: y = A x with A given by triples, f64 accumulation.
pub fn spmm_ref(rows: usize, triples: &[(u32, u32, f32)], x: &[f32], d: usize) -> Vec<f32> {
    let mut y = vec![0f64; rows * d];
    for &(r, c, v) in triples {
        for j in 0..d {
            y[r as usize * d + j] += v as f64 * x[c as usize * d + j] as f64;
        }
    }
    y.into_iter().map(|v| v as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_close, finite_diff, rand_vec};
    use rand::{Rng, SeedableRng};

    fn random_triples(seed: u64, rows: usize, cols: usize, nnz: usize) -> Vec<(u32, u32, f32)> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..nnz)
            .map(|_| (rng.gen_range(0..rows) as u32, rng.gen_range(0..cols) as u32, rng.gen_range(-1.0..1.0)))
            .collect()
    }

    #[test]
    fn forward_and_transpose_match_reference() {
        let gpu = Gpu::shared().unwrap();
        for (i, &(rows, cols, nnz, d)) in
            [(1, 1, 1, 1), (7, 5, 20, 3), (33, 40, 300, 64), (257, 100, 2000, 33), (5, 9, 0, 4)].iter().enumerate()
        {
            let t = random_triples(i as u64, rows, cols, nnz);
            let csr = Csr::from_triples(&gpu, rows, cols, &t).unwrap();
            let x = rand_vec(10 + i as u64, cols * d, 1.0);
            let y = csr.a.matmul(&Tensor::from_f32(&gpu, &x, &[cols, d]).unwrap()).unwrap();
            assert_close("spmm", &y.to_vec_f32().unwrap(), &spmm_ref(rows, &t, &x, d), 1e-5, 1e-5);
            let g = rand_vec(20 + i as u64, rows * d, 1.0);
            let tt: Vec<_> = t.iter().map(|&(r, c, v)| (c, r, v)).collect();
            let yt = csr.at.matmul(&Tensor::from_f32(&gpu, &g, &[rows, d]).unwrap()).unwrap();
            assert_close("spmm transpose", &yt.to_vec_f32().unwrap(), &spmm_ref(cols, &tt, &g, d), 1e-5, 1e-5);
        }
    }

    #[test]
    fn transpose_product_is_the_gradient() {
        // d/dx sum(w * (A x)) = Aᵀ w, checked by finite differences of the reference.
        let gpu = Gpu::shared().unwrap();
        let (rows, cols, d) = (9, 6, 5);
        let t = random_triples(3, rows, cols, 25);
        let csr = Csr::from_triples(&gpu, rows, cols, &t).unwrap();
        let x = rand_vec(4, cols * d, 1.0);
        let w = rand_vec(5, rows * d, 1.0);
        let fd = finite_diff(&x, 1e-4, |xs| {
            let xf: Vec<f32> = xs.iter().map(|&v| v as f32).collect();
            spmm_ref(rows, &t, &xf, d).iter().zip(&w).map(|(&a, &b)| a as f64 * b as f64).sum()
        });
        let g = csr.at.matmul(&Tensor::from_f32(&gpu, &w, &[rows, d]).unwrap()).unwrap();
        assert_close("spmm grad", &g.to_vec_f32().unwrap(), &fd, 1e-3, 1e-3);
    }

    #[test]
    fn bad_input_is_an_error() {
        let gpu = Gpu::shared().unwrap();
        assert!(Csr::from_triples(&gpu, 3, 3, &[(3, 0, 1.0)]).unwrap_err().to_string().contains("outside"));
        assert!(Csr::from_triples(&gpu, 3, 3, &[(0, 0, f32::NAN)]).is_err());
        let csr = Csr::from_triples(&gpu, 3, 4, &[(0, 1, 1.0)]).unwrap();
        let x = Tensor::from_f32(&gpu, &[0.0; 6], &[3, 2]).unwrap();
        let e = csr.a.matmul(&x).unwrap_err().to_string();
        assert!(e.contains("spmm") && e.contains("[3, 2]"), "{e}");
    }
}
