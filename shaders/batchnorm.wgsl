// BatchNorm1d over the rows of x: [n, c] row-major (statistics per column j,
// over the n rows), as PyTorch's nn.BatchNorm1d on 2-D input.
//   y[i, j] = (x[i, j] - mean[j]) * inverseSqrt(var[j] + eps) * gamma[j] + beta[j]
// mean / var are the batch statistics (biased variance) in training, the
// running statistics in evaluation; the kernels always take var, never rstd.
//
// Column kernels (stats, running, bwd_sums): one thread per column j
// (j = wid.x * 64 + lid), a serial loop over the n rows; neighbouring threads
// read neighbouring columns of a row. Element kernels (apply, bwd_dx): one
// thread per element e = (wid.x + wid.y * nwg.x) * 64 + lid, j = e % c.

struct Params {
    n: u32,
    c: u32,
    // bwd_dx: 1 = batch statistics (gradient through mean and var), 0 = fixed
    // (running) statistics. running: unused.
    batch_stats: u32,
    eps: f32,
    momentum: f32,
}
@group(0) @binding(0) var<uniform> p: Params;

// ---- stats: x at 1 -> mean at 2, var at 3 (biased), [c] each.
@group(0) @binding(1) var<storage, read> s_x: array<f32>;
@group(0) @binding(2) var<storage, read_write> s_mean: array<f32>;
@group(0) @binding(3) var<storage, read_write> s_var: array<f32>;

@compute @workgroup_size(64)
fn stats(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let j = wid.x * 64u + lid;
    if (j >= p.c) {
        return;
    }
    // Two passes (mean, then centred squares) keep the variance accurate for
    // columns with a large mean.
    var sum = 0.0;
    for (var i = 0u; i < p.n; i++) {
        sum += s_x[i * p.c + j];
    }
    let mean = sum / f32(p.n);
    var sq = 0.0;
    for (var i = 0u; i < p.n; i++) {
        let d = s_x[i * p.c + j] - mean;
        sq += d * d;
    }
    s_mean[j] = mean;
    s_var[j] = sq / f32(p.n);
}

// ---- running: batch mean at 1, biased var at 2 (of n rows) -> running_mean
// at 3, running_var at 4, updated in place with momentum m:
//   rm = (1 - m) rm + m mean,  rv = (1 - m) rv + m var * n / (n - 1)  (unbiased, as PyTorch).
@group(0) @binding(1) var<storage, read> r_mean: array<f32>;
@group(0) @binding(2) var<storage, read> r_var: array<f32>;
@group(0) @binding(3) var<storage, read_write> r_rmean: array<f32>;
@group(0) @binding(4) var<storage, read_write> r_rvar: array<f32>;

@compute @workgroup_size(64)
fn running(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let j = wid.x * 64u + lid;
    if (j >= p.c) {
        return;
    }
    let m = p.momentum;
    let unbiased = r_var[j] * f32(p.n) / f32(p.n - 1u);
    r_rmean[j] = (1.0 - m) * r_rmean[j] + m * r_mean[j];
    r_rvar[j] = (1.0 - m) * r_rvar[j] + m * unbiased;
}

// ---- apply: x at 1, mean at 2, var at 3, gamma at 4, beta at 5 -> y at 6.
@group(0) @binding(1) var<storage, read> a_x: array<f32>;
@group(0) @binding(2) var<storage, read> a_mean: array<f32>;
@group(0) @binding(3) var<storage, read> a_var: array<f32>;
@group(0) @binding(4) var<storage, read> a_gamma: array<f32>;
@group(0) @binding(5) var<storage, read> a_beta: array<f32>;
@group(0) @binding(6) var<storage, read_write> a_y: array<f32>;

@compute @workgroup_size(64)
fn apply(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let e = (wid.x + wid.y * nwg.x) * 64u + lid;
    if (e >= p.n * p.c) {
        return;
    }
    let j = e % p.c;
    let rstd = inverseSqrt(a_var[j] + p.eps);
    a_y[e] = (a_x[e] - a_mean[j]) * rstd * a_gamma[j] + a_beta[j];
}

// ---- bwd_sums: x at 1, dy at 2, mean at 3, var at 4 -> dgamma at 5, dbeta at 6:
//   dgamma[j] = sum_i dy[i, j] * xhat[i, j],  dbeta[j] = sum_i dy[i, j].
@group(0) @binding(1) var<storage, read> g_x: array<f32>;
@group(0) @binding(2) var<storage, read> g_dy: array<f32>;
@group(0) @binding(3) var<storage, read> g_mean: array<f32>;
@group(0) @binding(4) var<storage, read> g_var: array<f32>;
@group(0) @binding(5) var<storage, read_write> g_dgamma: array<f32>;
@group(0) @binding(6) var<storage, read_write> g_dbeta: array<f32>;

@compute @workgroup_size(64)
fn bwd_sums(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let j = wid.x * 64u + lid;
    if (j >= p.c) {
        return;
    }
    let mean = g_mean[j];
    let rstd = inverseSqrt(g_var[j] + p.eps);
    var sg = 0.0;
    var sb = 0.0;
    for (var i = 0u; i < p.n; i++) {
        let dy = g_dy[i * p.c + j];
        sg += dy * (g_x[i * p.c + j] - mean) * rstd;
        sb += dy;
    }
    g_dgamma[j] = sg;
    g_dbeta[j] = sb;
}

// ---- bwd_dx: x at 1, dy at 2, mean at 3, var at 4, gamma at 5, dgamma at 6,
// dbeta at 7 -> dx at 8.
//   batch statistics: dx = gamma * rstd * (dy - dbeta / n - xhat * dgamma / n)
//   fixed statistics: dx = gamma * rstd * dy
@group(0) @binding(1) var<storage, read> d_x: array<f32>;
@group(0) @binding(2) var<storage, read> d_dy: array<f32>;
@group(0) @binding(3) var<storage, read> d_mean: array<f32>;
@group(0) @binding(4) var<storage, read> d_var: array<f32>;
@group(0) @binding(5) var<storage, read> d_gamma: array<f32>;
@group(0) @binding(6) var<storage, read> d_dgamma: array<f32>;
@group(0) @binding(7) var<storage, read> d_dbeta: array<f32>;
@group(0) @binding(8) var<storage, read_write> d_dx: array<f32>;

@compute @workgroup_size(64)
fn bwd_dx(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let e = (wid.x + wid.y * nwg.x) * 64u + lid;
    if (e >= p.n * p.c) {
        return;
    }
    let j = e % p.c;
    let rstd = inverseSqrt(d_var[j] + p.eps);
    var g = d_dy[e];
    if (p.batch_stats != 0u) {
        let xhat = (d_x[e] - d_mean[j]) * rstd;
        let inv_n = 1.0 / f32(p.n);
        g = g - d_dbeta[j] * inv_n - xhat * d_dgamma[j] * inv_n;
    }
    d_dx[e] = d_gamma[j] * rstd * g;
}
