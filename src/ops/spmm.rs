//! Sparse (CSR) x dense matrix products, as LightGCN's propagation uses.
//!
//! A `Csr` lives on the GPU together with its transpose, so the backward pass
//! (dX = Aᵀ dY) is another SpMM; a symmetric matrix (`Csr::symmetric`, e.g.
//! LightGCN's normalized adjacency) shares one device copy for both.
//! Deterministic: each output element is summed by one invocation in CSR order
//! (no atomics).
//!
//! Kernels (`SpmmKernel`): `Scalar` (any D, one invocation per row and 4
//! columns, scalar loads), `Vec4` (D % 4 == 0, vec4 loads of x) and `Subgroup`
//! (D % 4 == 0, `shaders/spmm_sg.wgsl`: one 8-lane subgroup per row sharing the
//! col/val loads, for CPU adapters with 8-wide subgroups). `matmul` picks the
//! fastest one the shape and adapter allow.

use anyhow::{bail, Result};

use crate::gpu::{check, shape_str, DType, Gpu, Kernel, Params, Tensor};

const OP: &str = "spmm";
const WG: usize = 64;

/// Every kernel variant in this family (for naga validation).
pub fn kernels() -> Vec<Kernel> {
    [SpmmKernel::Scalar, SpmmKernel::Vec4, SpmmKernel::Subgroup].iter().map(|k| k.kernel()).collect()
}

/// Which SpMM kernel runs a product (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpmmKernel {
    /// Any D: one invocation per (row, 4 columns), scalar loads.
    Scalar,
    /// D % 4 == 0: one invocation per (row, vec4 column group).
    Vec4,
    /// D % 4 == 0 and 8-wide subgroups: one subgroup per (row, 64 columns).
    Subgroup,
}

impl SpmmKernel {
    fn kernel(self) -> Kernel {
        // Indices come from a validated host CSR (`host_csr` checks every
        // column against the matrix size) and the launcher checks x's shape;
        // stores are guarded, so the vec4 kernels run without bounds checks.
        match self {
            SpmmKernel::Scalar => Kernel::new(OP, "spmm", "spmm"),
            SpmmKernel::Vec4 => Kernel::new(OP, "spmm", "spmm_v4").trusted(true),
            SpmmKernel::Subgroup => Kernel::new(OP, "spmm_sg", "spmm_sg").trusted(true),
        }
    }

    /// The fastest kernel for row width `d` on `gpu`.
    pub fn best(gpu: &Gpu, d: usize) -> SpmmKernel {
        if !d.is_multiple_of(4) {
            SpmmKernel::Scalar
        } else if crate::ops::matmul::subgroup_kernel_ok(gpu) {
            SpmmKernel::Subgroup
        } else {
            SpmmKernel::Vec4
        }
    }
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

    /// y = A x, x: [cols, D] -> [rows, D], with the fastest kernel for D and the adapter.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let d = if x.rank() == 2 { x.shape()[1] } else { 1 };
        self.matmul_with(x, SpmmKernel::best(x.gpu(), d))
    }

    /// y = A x with a chosen kernel (errors if the shape or adapter does not allow it).
    pub fn matmul_with(&self, x: &Tensor, which: SpmmKernel) -> Result<Tensor> {
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
        if which != SpmmKernel::Scalar && !d.is_multiple_of(4) {
            bail!("{OP}: the {which:?} kernel needs D % 4 == 0, got dense operand {}", shape_str(x.shape()));
        }
        if which == SpmmKernel::Subgroup && !crate::ops::matmul::subgroup_kernel_ok(x.gpu()) {
            bail!("{OP}: the Subgroup kernel needs an adapter with 8-wide subgroups");
        }
        let buffers = [self.row_ptr.buffer(), self.col.buffer(), self.val.buffer(), x.buffer(), y.buffer()];
        let (p, grid) = match which {
            SpmmKernel::Scalar | SpmmKernel::Vec4 => {
                // Flat index over (row, 4 consecutive columns), folded into a 2-D grid.
                let groups = (self.rows * d.div_ceil(4)).div_ceil(WG);
                let gx = groups.min(65535);
                let gy = groups.div_ceil(gx);
                // The scalar kernel takes D, the vec4 kernel D / 4.
                let dd = if which == SpmmKernel::Vec4 { d / 4 } else { d };
                (Params::new().u(self.rows).u(dd).u(gx * WG), [gx as u32, gy as u32, 1])
            }
            SpmmKernel::Subgroup => {
                // x: 64-column blocks; rows folded into y and z.
                let (d4, gy) = (d / 4, self.rows.min(65535));
                let grid = [(d4.div_ceil(16)) as u32, gy as u32, self.rows.div_ceil(65535) as u32];
                (Params::new().u(self.rows).u(d4).u(0).u(0), grid)
            }
        };
        x.gpu().dispatch(&which.kernel(), p.bytes(), &buffers, grid)?;
        Ok(y)
    }
}

impl Csr {
    /// Build from (row, col, value) triples of a `rows x cols` matrix.
    pub fn from_triples(gpu: &Gpu, rows: usize, cols: usize, triples: &[(u32, u32, f32)]) -> Result<Csr> {
        let t: Vec<(u32, u32, f32)> = triples.iter().map(|&(r, c, v)| (c, r, v)).collect();
        Ok(Csr { a: CsrGpu::upload(gpu, rows, cols, triples)?, at: CsrGpu::upload(gpu, cols, rows, &t)? })
    }

    /// A symmetric `n x n` matrix from all its (row, col, value) entries: the
    /// transpose is the matrix itself, so one device copy serves both products.
    /// Errors if some entry's mirror is missing or has a different value.
    pub fn symmetric(gpu: &Gpu, n: usize, triples: &[(u32, u32, f32)]) -> Result<Csr> {
        let mut m = std::collections::HashMap::with_capacity(triples.len());
        for &(r, c, v) in triples {
            *m.entry((r, c)).or_insert(0f32) += v;
        }
        for (&(r, c), &v) in &m {
            if m.get(&(c, r)) != Some(&v) {
                bail!("{OP}: Csr::symmetric: entry ({r}, {c}) = {v} but ({c}, {r}) = {:?}", m.get(&(c, r)));
            }
        }
        let a = CsrGpu::upload(gpu, n, n, triples)?;
        Ok(Csr { at: a.clone(), a })
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
            let xt = Tensor::from_f32(&gpu, &x, &[cols, d]).unwrap();
            let y = csr.a.matmul(&xt).unwrap();
            let want = spmm_ref(rows, &t, &x, d);
            assert_close("spmm", &y.to_vec_f32().unwrap(), &want, 1e-5, 1e-5);
            for k in available(&gpu, d) {
                let y = csr.a.matmul_with(&xt, k).unwrap();
                assert_close(&format!("spmm {k:?} {rows}x{cols} d {d}"), &y.to_vec_f32().unwrap(), &want, 1e-5, 1e-5);
            }
            let g = rand_vec(20 + i as u64, rows * d, 1.0);
            let tt: Vec<_> = t.iter().map(|&(r, c, v)| (c, r, v)).collect();
            let yt = csr.at.matmul(&Tensor::from_f32(&gpu, &g, &[rows, d]).unwrap()).unwrap();
            assert_close("spmm transpose", &yt.to_vec_f32().unwrap(), &spmm_ref(cols, &tt, &g, d), 1e-5, 1e-5);
        }
    }

    /// The kernels that can run width `d` on this adapter.
    fn available(gpu: &Gpu, d: usize) -> Vec<SpmmKernel> {
        let mut v = vec![SpmmKernel::Scalar];
        if d % 4 == 0 {
            v.push(SpmmKernel::Vec4);
            if crate::ops::matmul::subgroup_kernel_ok(gpu) {
                v.push(SpmmKernel::Subgroup);
            } else {
                eprintln!("adapter subgroups are not 8 wide: spmm Subgroup kernel not tested");
            }
        }
        v
    }

    #[test]
    fn vector_kernels_match_reference_at_awkward_sizes() {
        // D = 4 (one vec4 group), 36 (past one 8-lane block, not 16-aligned),
        // 64 (exactly one block), 132 (three blocks, the last partial); rows with
        // 0, 1, 7, 8, 9 and 17 entries (tails of the 8-edge subgroup chunks).
        let gpu = Gpu::shared().unwrap();
        for (i, &(rows, cols, d)) in [(1, 1, 4), (7, 9, 36), (33, 17, 64), (19, 257, 132)].iter().enumerate() {
            let mut t = random_triples(40 + i as u64, rows, cols, rows * 5);
            for (r, n) in [0usize, 1, 7, 8, 9, 17].iter().enumerate().filter(|(r, _)| *r < rows) {
                t.retain(|e| e.0 as usize != r);
                t.extend((0..*n).map(|j| (r as u32, ((j * 5 + r) % cols) as u32, 0.5 - j as f32 * 0.1)));
            }
            let csr = Csr::from_triples(&gpu, rows, cols, &t).unwrap();
            let x = rand_vec(50 + i as u64, cols * d, 1.0);
            let xt = Tensor::from_f32(&gpu, &x, &[cols, d]).unwrap();
            let want = spmm_ref(rows, &t, &x, d);
            for k in available(&gpu, d) {
                let y = csr.a.matmul_with(&xt, k).unwrap();
                assert_close(&format!("spmm {k:?} {rows}x{cols} d {d}"), &y.to_vec_f32().unwrap(), &want, 1e-5, 1e-5);
            }
        }
        // Vector kernels refuse widths that are not multiples of 4.
        let csr = Csr::from_triples(&gpu, 2, 2, &[(0, 1, 1.0)]).unwrap();
        let x = Tensor::from_f32(&gpu, &[0.0; 6], &[2, 3]).unwrap();
        let e = csr.a.matmul_with(&x, SpmmKernel::Vec4).unwrap_err().to_string();
        assert!(e.contains("D % 4") && e.contains("[2, 3]"), "{e}");
    }

    #[test]
    fn symmetric_shares_one_copy_and_checks_mirrors() {
        let gpu = Gpu::shared().unwrap();
        let t = [(0u32, 2u32, 0.5f32), (2, 0, 0.5), (1, 1, 2.0), (1, 2, -1.0), (2, 1, -1.0)];
        let csr = Csr::symmetric(&gpu, 3, &t).unwrap();
        assert!(csr.a.val.same_buffer(&csr.at.val) && csr.a.col.same_buffer(&csr.at.col));
        let x = rand_vec(1, 3 * 8, 1.0);
        let y = csr.at.matmul(&Tensor::from_f32(&gpu, &x, &[3, 8]).unwrap()).unwrap();
        assert_close("symmetric spmm", &y.to_vec_f32().unwrap(), &spmm_ref(3, &t, &x, 8), 1e-5, 1e-5);
        let e = Csr::symmetric(&gpu, 3, &t[1..]).unwrap_err().to_string();
        assert!(e.contains("symmetric") && e.contains("(2, 0)"), "{e}");
        assert!(Csr::symmetric(&gpu, 3, &[(0, 1, 1.0), (1, 0, 2.0)]).is_err());
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
