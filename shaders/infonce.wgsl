// In-batch InfoNCE: s_ij = <a_i, b_j> * inv_t for a: [B, D], b: [M, D] (M >= B,
// rows B.. of b are extra negatives), target of row i is column i;
// loss = mean_i (logsumexp_j s_ij - s_ii).
// Backward: G = (softmax_rows(s) - I) * dloss * inv_t / B  ([B, M]),
// da = G b ([B, D]), db = G^T a ([M, D]).

struct Params {
    bn: u32,   // B: rows of a (queries)
    m: u32,    // M: rows of b (keys)
    d: u32,    // D: embedding width
    inv_t: f32,
}

@group(0) @binding(0) var<uniform> p: Params;

const NEG_BIG: f32 = -3.0e38;

fn flat_wg(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// ---- forward: one workgroup per row of a --------------------------------------

@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> loss_rows: array<f32>;
@group(0) @binding(4) var<storage, read_write> lse_rows: array<f32>;

fn score(i: u32, j: u32) -> f32 {
    var acc = 0.0;
    for (var c = 0u; c < p.d; c++) {
        acc += a[i * p.d + c] * b[j * p.d + c];
    }
    return acc * p.inv_t;
}

var<workgroup> red_m: array<f32, 256>;
var<workgroup> red_s: array<f32, 256>;

@compute @workgroup_size(256)
fn nce_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = flat_wg(wid, nwg);
    if (i >= p.bn) {
        return; // whole workgroup: uniform
    }
    var m = NEG_BIG;
    var s = 0.0;
    for (var j = lid; j < p.m; j += 256u) {
        let z = score(i, j);
        if (z > m) {
            s = s * exp(m - z) + 1.0;
            m = z;
        } else {
            s += exp(z - m);
        }
    }
    red_m[lid] = m;
    red_s[lid] = s;
    workgroupBarrier();
    for (var k = 128u; k > 0u; k >>= 1u) {
        if (lid < k) {
            let m2 = red_m[lid + k];
            let s2 = red_s[lid + k];
            let mm = max(m, m2);
            s = s * exp(m - mm) + s2 * exp(m2 - mm);
            m = mm;
            red_m[lid] = m;
            red_s[lid] = s;
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        let lse = m + log(s);
        lse_rows[i] = lse;
        loss_rows[i] = lse - score(i, i);
    }
}

// ---- mean over the B rows: one workgroup, fixed order ---------------------------

@group(0) @binding(1) var<storage, read> m_rows: array<f32>;
@group(0) @binding(2) var<storage, read_write> loss_mean: array<f32>;

@compute @workgroup_size(256)
fn nce_mean(@builtin(local_invocation_index) lid: u32) {
    var acc = 0.0;
    for (var r = lid; r < p.bn; r += 256u) {
        acc += m_rows[r];
    }
    red_s[lid] = acc;
    workgroupBarrier();
    for (var k = 128u; k > 0u; k >>= 1u) {
        if (lid < k) {
            red_s[lid] += red_s[lid + k];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        loss_mean[0] = red_s[0] / f32(p.bn);
    }
}

// ---- backward -------------------------------------------------------------------

// g: [B, M] gradient of the loss with respect to the raw inner products.
@group(0) @binding(1) var<storage, read> g_a: array<f32>;
@group(0) @binding(2) var<storage, read> g_b: array<f32>;
@group(0) @binding(3) var<storage, read> g_lse: array<f32>;
@group(0) @binding(4) var<storage, read> g_dloss: array<f32>;
@group(0) @binding(5) var<storage, read_write> g_out: array<f32>;

@compute @workgroup_size(256)
fn nce_grad_scores(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let e = flat_wg(wid, nwg) * 256u + lid;
    if (e >= p.bn * p.m) {
        return;
    }
    let i = e / p.m;
    let j = e - i * p.m;
    var acc = 0.0;
    for (var c = 0u; c < p.d; c++) {
        acc += g_a[i * p.d + c] * g_b[j * p.d + c];
    }
    var g = exp(acc * p.inv_t - g_lse[i]);
    if (i == j) {
        g -= 1.0;
    }
    g_out[e] = g * g_dloss[0] * p.inv_t / f32(p.bn);
}

// da[i, c] = sum_j g[i, j] b[j, c]
@group(0) @binding(1) var<storage, read> k_g: array<f32>;
@group(0) @binding(2) var<storage, read> k_other: array<f32>;
@group(0) @binding(3) var<storage, read_write> k_out: array<f32>;

@compute @workgroup_size(256)
fn nce_da(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let e = flat_wg(wid, nwg) * 256u + lid;
    if (e >= p.bn * p.d) {
        return;
    }
    let i = e / p.d;
    let c = e - i * p.d;
    var acc = 0.0;
    for (var j = 0u; j < p.m; j++) {
        acc += k_g[i * p.m + j] * k_other[j * p.d + c];
    }
    k_out[e] = acc;
}

// db[j, c] = sum_i g[i, j] a[i, c]
@compute @workgroup_size(256)
fn nce_db(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let e = flat_wg(wid, nwg) * 256u + lid;
    if (e >= p.m * p.d) {
        return;
    }
    let j = e / p.d;
    let c = e - j * p.d;
    var acc = 0.0;
    for (var i = 0u; i < p.bn; i++) {
        acc += k_g[i * p.m + j] * k_other[i * p.d + c];
    }
    k_out[e] = acc;
}
