//! Test helpers shared by the op tests: seeded random data, tolerant
//! comparison, and finite-difference gradients of CPU reference functions.

use rand::{Rng, SeedableRng};

/// `n` values uniform in [-scale, scale), deterministic in `seed`.
pub fn rand_vec(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

/// Assert |got - want| <= atol + rtol * |want| elementwise; names the first
/// offending index.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], rtol: f32, atol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length {} vs {}", got.len(), want.len());
    let mut worst = (0usize, 0f32);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite() || !w.is_finite(), "{what}[{i}]: got {g}, want {w}");
        let err = (g - w).abs() - (atol + rtol * w.abs());
        if err > worst.1 {
            worst = (i, err);
        }
    }
    if worst.1 > 0.0 {
        let i = worst.0;
        panic!("{what}[{i}]: got {}, want {} (rtol {rtol}, atol {atol})", got[i], want[i]);
    }
}

/// Central-difference gradient of `f` (a scalar function of `x`, evaluated in
/// f64) at `x`: d f / d x_i for every i.
pub fn finite_diff(x: &[f32], eps: f64, f: impl Fn(&[f64]) -> f64) -> Vec<f32> {
    let mut xs: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let mut g = vec![0f32; x.len()];
    for i in 0..x.len() {
        let orig = xs[i];
        xs[i] = orig + eps;
        let fp = f(&xs);
        xs[i] = orig - eps;
        let fm = f(&xs);
        xs[i] = orig;
        g[i] = ((fp - fm) / (2.0 * eps)) as f32;
    }
    g
}
