//! Finite-difference gradient checking of differentiable functions on the GPU.

use anyhow::{anyhow, bail, Result};
use rand::{Rng, SeedableRng};

use super::tape::{Tape, Var};
use crate::gpu::{Gpu, Tensor};

/// Compare the tape's gradients of `f` with central finite differences.
///
/// `inputs` are (values, shape) pairs; `f` maps them (as `Var`s) to an output
/// of any shape. The scalar checked is `sum(out * w)` for a fixed random `w`,
/// so every output element matters. Forward passes run on the GPU in f32, so
/// `eps` should be ~1e-2 and tolerances ~1e-2 relative. Returns Err naming the
/// worst input element when |analytic - numeric| > atol + rtol * |numeric|.
pub fn check_gradients(
    gpu: &Gpu,
    inputs: &[(Vec<f32>, Vec<usize>)],
    f: impl Fn(&Tape, &[Var]) -> Result<Var>,
    eps: f32,
    rtol: f32,
    atol: f32,
) -> Result<()> {
    // Analytic gradients.
    let tape = Tape::new();
    let vars: Vec<Var> =
        inputs.iter().map(|(v, s)| Ok(tape.input(Tensor::from_f32(gpu, v, s)?))).collect::<Result<_>>()?;
    let out = f(&tape, &vars)?;
    let n_out = out.value.numel();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let w: Vec<f32> = (0..n_out).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let w_t = tape.constant(Tensor::from_f32(gpu, &w, out.shape())?);
    let loss = out.mul(&w_t)?.sum_all()?;
    let grads = tape.backward(&loss)?;

    let objective = |vals: &[Vec<f32>]| -> Result<f64> {
        let t = Tape::no_grad();
        let vs: Vec<Var> = vals
            .iter()
            .zip(inputs)
            .map(|(v, (_, s))| Ok(t.constant(Tensor::from_f32(gpu, v, s)?)))
            .collect::<Result<_>>()?;
        let o = f(&t, &vs)?.value.to_vec_f32()?;
        Ok(o.iter().zip(&w).map(|(&a, &b)| a as f64 * b as f64).sum())
    };

    let mut vals: Vec<Vec<f32>> = inputs.iter().map(|(v, _)| v.clone()).collect();
    let mut worst: Option<(f32, String)> = None;
    for (i, var) in vars.iter().enumerate() {
        let analytic = match grads.of(var) {
            Some(g) => g.to_vec_f32()?,
            None => vec![0.0; inputs[i].0.len()],
        };
        for j in 0..vals[i].len() {
            let orig = vals[i][j];
            vals[i][j] = orig + eps;
            let fp = objective(&vals)?;
            vals[i][j] = orig - eps;
            let fm = objective(&vals)?;
            vals[i][j] = orig;
            let numeric = ((fp - fm) / (2.0 * eps as f64)) as f32;
            let a = analytic[j];
            if !a.is_finite() {
                bail!("gradient check: input {i}[{j}] analytic gradient is {a}");
            }
            let excess = (a - numeric).abs() - (atol + rtol * numeric.abs());
            if excess > 0.0 && worst.as_ref().map(|(e, _)| excess > *e).unwrap_or(true) {
                worst = Some((excess, format!("input {i}[{j}]: analytic {a}, numeric {numeric}")));
            }
        }
    }
    match worst {
        None => Ok(()),
        Some((_, msg)) => Err(anyhow!("gradient check failed (rtol {rtol}, atol {atol}): {msg}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::{attention, cross_entropy, embedding, CeOptions};
    use crate::ops::testing::rand_vec;
    use crate::ops::Act;

    fn gpu() -> Gpu {
        Gpu::shared().unwrap()
    }
    fn inp(seed: u64, shape: &[usize]) -> (Vec<f32>, Vec<usize>) {
        (rand_vec(seed, shape.iter().product(), 1.0), shape.to_vec())
    }

    #[test]
    fn linear_with_fused_bias_and_activation() {
        for act in [Act::None, Act::Gelu, Act::Tanh, Act::Silu] {
            check_gradients(
                &gpu(),
                &[inp(1, &[2, 5, 7]), inp(2, &[3, 7]), inp(3, &[3])],
                |_, v| v[0].linear(&v[1], Some(&v[2]), true, act),
                1e-2,
                1e-2,
                1e-3,
            )
            .unwrap_or_else(|e| panic!("{act:?}: {e}"));
        }
    }

    #[test]
    fn broadcast_arithmetic_and_reductions() {
        check_gradients(
            &gpu(),
            &[inp(4, &[3, 4, 5]), inp(5, &[5]), inp(6, &[3, 4, 1])],
            |_, v| v[0].add(&v[1])?.mul(&v[2])?.sub(&v[1])?.scale(0.5),
            1e-2,
            1e-2,
            1e-3,
        )
        .unwrap();
        // Division: keep the divisor away from zero.
        let den: Vec<f32> = rand_vec(7, 6, 1.0).iter().map(|x| 1.5 + x).collect();
        check_gradients(&gpu(), &[inp(8, &[6]), (den, vec![6])], |_, v| v[0].div(&v[1])?.mean_all(), 1e-3, 1e-2, 1e-3)
            .unwrap();
    }

    #[test]
    fn softmax_norms_and_swiglu() {
        check_gradients(&gpu(), &[inp(9, &[4, 9])], |_, v| v[0].softmax(), 1e-2, 1e-2, 1e-3).unwrap();
        check_gradients(&gpu(), &[inp(10, &[4, 9])], |_, v| v[0].log_softmax(), 1e-2, 1e-2, 1e-3).unwrap();
        check_gradients(
            &gpu(),
            &[inp(11, &[5, 12]), inp(12, &[12]), inp(13, &[12])],
            |_, v| v[0].layer_norm(&v[1], &v[2], 1e-5),
            1e-2,
            2e-2,
            2e-3,
        )
        .unwrap();
        check_gradients(
            &gpu(),
            &[inp(14, &[5, 12]), inp(15, &[12])],
            |_, v| v[0].rms_norm(&v[1], 1e-6),
            1e-2,
            2e-2,
            2e-3,
        )
        .unwrap();
        check_gradients(&gpu(), &[inp(16, &[3, 8]), inp(17, &[3, 8])], |_, v| v[0].swiglu(&v[1]), 1e-2, 1e-2, 1e-3)
            .unwrap();
    }

    #[test]
    fn batch_norm_train_and_eval() {
        use crate::ops::batchnorm::BnMode;
        let g = gpu();
        // Scaled-up input columns so the variance is well away from eps.
        let (x, s) = inp(30, &[6, 7]);
        let x: Vec<f32> = x.iter().map(|v| 3.0 * v + 0.5).collect();
        for mode in [BnMode::BatchStats, BnMode::Eval] {
            let rm = Tensor::from_f32(&g, &rand_vec(31, 7, 0.5), &[7]).unwrap();
            let rv = Tensor::from_f32(&g, &[1.5; 7], &[7]).unwrap();
            check_gradients(
                &g,
                &[(x.clone(), s.clone()), inp(32, &[7]), inp(33, &[7])],
                |_, v| v[0].batch_norm(&v[1], &v[2], &rm, &rv, mode, 0.1, 1e-5),
                1e-2,
                2e-2,
                2e-3,
            )
            .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        }
    }

    #[test]
    fn embedding_and_cross_entropy() {
        let g = gpu();
        let ids = Tensor::from_u32(&g, &[3, 0, 3, 5, 1], &[5]).unwrap();
        check_gradients(&g, &[inp(18, &[6, 4])], |_, v| embedding(&v[0], &ids), 1e-2, 1e-2, 1e-3).unwrap();
        // The same lookup through a host-built CSR ([2, 3] ids, repeats included).
        let csr = crate::ops::embedding::IdCsr::from_host(&g, &[3, 0, 3, 5, 1, 3], &[2, 3], 6).unwrap();
        check_gradients(&g, &[inp(18, &[6, 4])], |_, v| crate::autograd::embedding_csr(&v[0], &csr), 1e-2, 1e-2, 1e-3)
            .unwrap();
        let small = crate::ops::embedding::IdCsr::from_host(&g, &[0, 1], &[2], 2).unwrap();
        let t = crate::autograd::Tape::new();
        let table = t.input(Tensor::from_f32(&g, &[0.0; 12], &[3, 4]).unwrap());
        let e = crate::autograd::embedding_csr(&table, &small).unwrap_err().to_string();
        assert!(e.contains("embedding_csr") && e.contains("[3, 4]"), "{e}");
        let targets = Tensor::from_i32(&g, &[2, -100, 0, 6], &[4]).unwrap();
        for tau in [1.0, 0.5] {
            let o = CeOptions { tau, ..Default::default() };
            check_gradients(&g, &[inp(19, &[4, 7])], |_, v| cross_entropy(&v[0], &targets, &o), 1e-2, 1e-2, 1e-3)
                .unwrap();
        }
    }

    #[test]
    fn permute_and_causal_attention() {
        let g = gpu();
        let mask = crate::ops::attention::MaskSpec::causal(5, 5).unwrap().upload(&g).unwrap();
        check_gradients(
            &g,
            &[inp(20, &[2, 5, 2, 4]), inp(21, &[2, 5, 2, 4]), inp(22, &[2, 5, 2, 4])],
            |_, v| {
                let q = v[0].permute(&[0, 2, 1, 3])?;
                let k = v[1].permute(&[0, 2, 1, 3])?;
                let vv = v[2].permute(&[0, 2, 1, 3])?;
                attention(&q, &k, &vv, None, &mask, 0.5)?.permute(&[0, 2, 1, 3])
            },
            1e-2,
            1e-2,
            1e-3,
        )
        .unwrap();
    }

    #[test]
    fn lora_linear_fused_all_gradients() {
        // x (batched, flattened inside), W, A, B and bias all get gradients; dropout 0 (the
        // checker's objective runs on a no-grad tape, where dropout is the identity). The rank
        // 3 term is fused into the forward matmul and into the dX matmul.
        let g = gpu();
        check_gradients(
            &g,
            &[inp(30, &[2, 3, 7]), inp(31, &[5, 7]), inp(32, &[3, 7]), inp(33, &[5, 3]), inp(34, &[5])],
            |_, v| {
                let l = crate::autograd::LoraTerm { a: &v[2], b: &v[3], scale: 1.5, p: 0.0, seed: 3, offset: 0 };
                v[0].lora_linear(&v[1], Some(&v[4]), l)
            },
            1e-2,
            1e-2,
            1e-3,
        )
        .unwrap();
        // No bias, rank 1, 2-D x.
        check_gradients(
            &g,
            &[inp(35, &[4, 6]), inp(36, &[9, 6]), inp(37, &[1, 6]), inp(38, &[9, 1])],
            |_, v| {
                let l = crate::autograd::LoraTerm { a: &v[2], b: &v[3], scale: 0.5, p: 0.0, seed: 3, offset: 0 };
                v[0].lora_linear(&v[1], None, l)
            },
            1e-2,
            1e-2,
            1e-3,
        )
        .unwrap();
    }

    #[test]
    fn a_wrong_gradient_is_caught() {
        // The checker must fail when a backward rule is wrong: record x*2 with
        // a backward that claims d/dx = 3.
        let g = gpu();
        let r = check_gradients(
            &g,
            &[inp(23, &[4])],
            |t, v| {
                let y = crate::ops::elementwise::scale(&v[0].value, 2.0)?;
                Ok(t.record(y, &[&v[0]], |g| Ok(vec![Some(crate::ops::elementwise::scale(g, 3.0)?)])))
            },
            1e-2,
            1e-2,
            1e-3,
        );
        assert!(r.is_err());
    }
}
