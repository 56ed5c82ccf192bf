// Activation functions shared by the activation kernels and fused epilogues.
// kind: 0 none, 1 relu, 2 gelu (erf), 3 gelu (tanh approx), 4 silu, 5 sigmoid, 6 tanh.
// (Include with `//!include _act`; ops::Act::code() gives the kind.)

fn act_erf(x: f32) -> f32 {
    // Abramowitz & Stegun 7.1.26, |error| < 1.5e-7.
    let s = sign(x);
    let a = abs(x);
    let t = 1.0 / (1.0 + 0.3275911 * a);
    let y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * exp(-a * a);
    return s * y;
}

fn act_sigmoid(x: f32) -> f32 {
    // Stable for large |x|.
    if (x >= 0.0) {
        return 1.0 / (1.0 + exp(-x));
    }
    let e = exp(x);
    return e / (1.0 + e);
}

fn act_tanh(x: f32) -> f32 {
    // tanh(x) = 2 sigmoid(2x) - 1, stable for large |x|.
    return 2.0 * act_sigmoid(2.0 * x) - 1.0;
}

// y = act(x)
fn act_fwd(x: f32, kind: u32) -> f32 {
    switch kind {
        case 1u: { return max(x, 0.0); }
        case 2u: { return 0.5 * x * (1.0 + act_erf(x * 0.70710678118654752)); }
        case 3u: {
            let u = 0.79788456080286536 * (x + 0.044715 * x * x * x);
            return 0.5 * x * (1.0 + act_tanh(u));
        }
        case 4u: { return x * act_sigmoid(x); }
        case 5u: { return act_sigmoid(x); }
        case 6u: { return act_tanh(x); }
        default: { return x; }
    }
}

// d act(x) / dx, evaluated at the pre-activation x.
fn act_grad(x: f32, kind: u32) -> f32 {
    switch kind {
        case 1u: { return select(0.0, 1.0, x > 0.0); }
        case 2u: {
            let cdf = 0.5 * (1.0 + act_erf(x * 0.70710678118654752));
            let pdf = 0.39894228040143268 * exp(-0.5 * x * x);
            return cdf + x * pdf;
        }
        case 3u: {
            let u = 0.79788456080286536 * (x + 0.044715 * x * x * x);
            let t = act_tanh(u);
            let du = 0.79788456080286536 * (1.0 + 3.0 * 0.044715 * x * x);
            return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du;
        }
        case 4u: {
            let s = act_sigmoid(x);
            return s * (1.0 + x * (1.0 - s));
        }
        case 5u: {
            let s = act_sigmoid(x);
            return s * (1.0 - s);
        }
        case 6u: {
            let t = act_tanh(x);
            return 1.0 - t * t;
        }
        default: { return 1.0; }
    }
}
