// Log-domain Sinkhorn-Knopp in f32 (LETTER / LC-Rec balanced assignment).
//
// cost: [n, kc] row-major. The reference (f64) does Q = exp(-cost/eps), then
// per iteration: rows to 1/n, columns to 1/kc; finally Q *= n. Here Q is kept
// as potentials: log Q[i, j] = lk[i, j] + u[i] + v[j], with
// lk[i, j] = -(cost'[i, j] - min_j cost'[i, :]) / eps <= 0 (the row shift is a
// row scaling, which the first row normalisation cancels exactly) and cost' the
// optionally min-max-centred cost (LETTER's center_distance_for_constraint).
//   minmax:  mm = (min, max) of cost over all entries (one workgroup).
//   logk:    lk as above (one invocation per row).
//   rows:    u[i] = -log(n) - logsumexp_j(lk[i, j] + v[j]).
//   cols:    v[j] = -log(kc) - logsumexp_i(lk[i, j] + u[i]).
//   plan:    plan[i, j] = exp(lk[i, j] + u[i] + v[j] + log(n)).
//   argmax:  assign[i] = argmax_j log plan[i, j], ties to the lowest j.

struct Params {
    n: u32,
    kc: u32,
    inv_eps: f32,
    center: u32,
    groups_x: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

const BIGNEG = -3.4e38;

// ---- minmax: cost -> mm
@group(0) @binding(1) var<storage, read> mm_cost: array<f32>;
@group(0) @binding(2) var<storage, read_write> mm_out: array<f32>;
var<workgroup> wmin: array<f32, 256>;
var<workgroup> wmax: array<f32, 256>;

@compute @workgroup_size(256)
fn minmax(@builtin(local_invocation_index) lid: u32) {
    var lo = 3.4e38;
    var hi = BIGNEG;
    let total = p.n * p.kc;
    for (var i = lid; i < total; i = i + 256u) {
        lo = min(lo, mm_cost[i]);
        hi = max(hi, mm_cost[i]);
    }
    wmin[lid] = lo;
    wmax[lid] = hi;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            wmin[lid] = min(wmin[lid], wmin[lid + s]);
            wmax[lid] = max(wmax[lid], wmax[lid + s]);
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        mm_out[0] = wmin[0];
        mm_out[1] = wmax[0];
    }
}

fn flat_id(wid: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * p.groups_x + wid.x) * WG + lid;
}

// ---- logk: cost, mm -> lk
@group(0) @binding(1) var<storage, read> lk_cost: array<f32>;
@group(0) @binding(2) var<storage, read> lk_mm: array<f32>;
@group(0) @binding(3) var<storage, read_write> lk_out: array<f32>;

fn centred(c: f32) -> f32 {
    if (p.center == 0u) {
        return c;
    }
    let middle = (lk_mm[1] + lk_mm[0]) * 0.5;
    let amplitude = lk_mm[1] - middle + 1e-5;
    return (c - middle) / amplitude;
}

@compute @workgroup_size(WG)
fn logk(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_id(wid, lid);
    if (i >= p.n) {
        return;
    }
    let o = i * p.kc;
    var m = 3.4e38;
    for (var j = 0u; j < p.kc; j = j + 1u) {
        m = min(m, centred(lk_cost[o + j]));
    }
    for (var j = 0u; j < p.kc; j = j + 1u) {
        lk_out[o + j] = -(centred(lk_cost[o + j]) - m) * p.inv_eps;
    }
}

// ---- rows / cols / plan / argmax: lk, u, v
@group(0) @binding(1) var<storage, read> lk: array<f32>;
@group(0) @binding(2) var<storage, read_write> u: array<f32>;
@group(0) @binding(3) var<storage, read_write> v: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read_write> out_idx: array<u32>;

@compute @workgroup_size(WG)
fn rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_id(wid, lid);
    if (i >= p.n) {
        return;
    }
    let o = i * p.kc;
    var m = BIGNEG;
    for (var j = 0u; j < p.kc; j = j + 1u) {
        m = max(m, lk[o + j] + v[j]);
    }
    var s = 0.0;
    for (var j = 0u; j < p.kc; j = j + 1u) {
        s = s + exp((lk[o + j] + v[j]) - m);
    }
    u[i] = -log(f32(p.n)) - (m + log(s));
}

@compute @workgroup_size(WG)
fn cols(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let j = flat_id(wid, lid);
    if (j >= p.kc) {
        return;
    }
    var m = BIGNEG;
    for (var i = 0u; i < p.n; i = i + 1u) {
        m = max(m, lk[i * p.kc + j] + u[i]);
    }
    var s = 0.0;
    for (var i = 0u; i < p.n; i = i + 1u) {
        s = s + exp((lk[i * p.kc + j] + u[i]) - m);
    }
    v[j] = -log(f32(p.kc)) - (m + log(s));
}

@compute @workgroup_size(WG)
fn plan(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = flat_id(wid, lid);
    if (t >= p.n * p.kc) {
        return;
    }
    let i = t / p.kc;
    let j = t % p.kc;
    out[t] = exp((lk[t] + u[i]) + (v[j] + log(f32(p.n))));
}

@compute @workgroup_size(WG)
fn argmax(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_id(wid, lid);
    if (i >= p.n) {
        return;
    }
    var best = BIGNEG;
    var bj = 0u;
    let ui = u[i];
    for (var j = 0u; j < p.kc; j = j + 1u) {
        let s = (lk[i * p.kc + j] + ui) + v[j];
        if (s > best) {
            best = s;
            bj = j;
        }
    }
    out_idx[i] = bj;
}
