//! Kernels: one family per file, paired with `shaders/<family>.wgsl`.
//!
//! Each file holds the launcher(s), a plain CPU reference (clear loops, f64
//! accumulation) and tests: GPU vs CPU at awkward sizes (1, 7, 33, 257, ...),
//! and for every backward kernel a finite-difference check against the CPU
//! reference forward evaluated in f64.
//!
//! Launchers take `&Tensor`s and return `Result<Tensor>`; they validate shapes
//! and dtypes and name the op and shapes in every error. They only *record*
//! work (see `gpu`), so a chain of ops is one submission.

use crate::gpu::Kernel;

pub mod activation;
pub mod adamw;
pub mod attention;
pub mod batchnorm;
pub mod cross_entropy;
pub mod dropout;
pub mod elementwise;
pub mod embedding;
pub mod infonce;
pub mod kv_cache;
pub mod l2norm;
pub mod matmul;
pub mod norm;
pub mod permute;
pub mod reduce;
pub mod relbias;
pub mod rope;
pub mod rowdot;
pub mod softmax;
pub mod spmm;

#[cfg(test)]
pub mod testing;

/// Elementwise activation, used standalone (`ops::activation`) and fused into
/// matmul epilogues. WGSL: `shaders/_act.wgsl` (`act_fwd`, `act_grad`), where
/// the kind is `Act::code()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Act {
    #[default]
    None,
    Relu,
    /// Exact GELU (erf), as BERT uses.
    Gelu,
    /// GELU with the tanh approximation ("gelu_new").
    GeluTanh,
    /// x * sigmoid(x), as LLaMA's SwiGLU uses.
    Silu,
    Sigmoid,
    Tanh,
}

impl Act {
    /// The kind number understood by `shaders/_act.wgsl`.
    pub fn code(self) -> u32 {
        match self {
            Act::None => 0,
            Act::Relu => 1,
            Act::Gelu => 2,
            Act::GeluTanh => 3,
            Act::Silu => 4,
            Act::Sigmoid => 5,
            Act::Tanh => 6,
        }
    }

    /// CPU reference, f64.
    pub fn apply_f64(self, x: f64) -> f64 {
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        match self {
            Act::None => x,
            Act::Relu => x.max(0.0),
            Act::Gelu => 0.5 * x * (1.0 + erf_f64(x / std::f64::consts::SQRT_2)),
            Act::GeluTanh => {
                let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
                0.5 * x * (1.0 + u.tanh())
            }
            Act::Silu => x * sig(x),
            Act::Sigmoid => sig(x),
            Act::Tanh => x.tanh(),
        }
    }
}

/// erf in f64 (Abramowitz & Stegun 7.1.26 is only 1.5e-7; use a series /
/// continued fraction accurate to ~1e-15 for the CPU references).
pub fn erf_f64(x: f64) -> f64 {
    if x.abs() < 3.0 {
        // Maclaurin series.
        let mut sum = x;
        let mut term = x;
        let x2 = x * x;
        let mut n = 0.0;
        loop {
            n += 1.0;
            term *= -x2 / n;
            let add = term / (2.0 * n + 1.0);
            sum += add;
            if add.abs() < 1e-17 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc continued fraction (Lentz), accurate for |x| >= 3.
        let a = x.abs();
        let mut f = a;
        let mut c = a;
        let mut d = 0.0;
        for k in 1..200 {
            let an = k as f64 / 2.0;
            d = a + an * d;
            d = 1.0 / d;
            c = a + an / c;
            f *= c * d;
        }
        let erfc = (-a * a).exp() / (f * std::f64::consts::PI.sqrt());
        x.signum() * (1.0 - erfc)
    }
}

/// Every op kernel variant, for naga validation without a device. Each op
/// module lists its variants in a `kernels()` function; `crate::shaders`
/// adds the other layers' kernels and holds the validation tests.
pub fn kernels() -> Vec<Kernel> {
    [
        activation::kernels(),
        adamw::kernels(),
        attention::kernels(),
        batchnorm::kernels(),
        cross_entropy::kernels(),
        dropout::kernels(),
        elementwise::kernels(),
        embedding::kernels(),
        infonce::kernels(),
        kv_cache::kernels(),
        l2norm::kernels(),
        matmul::kernels(),
        norm::kernels(),
        permute::kernels(),
        reduce::kernels(),
        relbias::kernels(),
        rope::kernels(),
        softmax::kernels(),
        rowdot::kernels(),
        spmm::kernels(),
    ]
    .concat()
}
