// Cross-entropy over large vocabularies with ignore_index, label temperature
// and an optional additive logit mask.
//
// logits: [N, V] f32 row-major; targets: [N] i32; mask: [V] (mask_mode 1) or
// [N, V] (mask_mode 2), unused when mask_mode 0. The scaled logits of row r are
// z_j = logits[r, j] * inv_tau + mask_j, and loss_r = logsumexp(z) - z_target
// (0 for rows whose target == ignore). A target outside [0, V) gives a NaN loss.

struct Params {
    n: u32,
    v: u32,
    ignore: i32,
    mask_mode: u32,
    inv_tau: f32,
}

@group(0) @binding(0) var<uniform> p: Params;

// "Minus infinity" for the running max: finite, so exp(-inf - m) is 0 and
// never NaN even when every logit of a thread's share is masked with -inf.
const NEG_BIG: f32 = -3.0e38;

fn row_index(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// ---- forward: one workgroup per row, online max/sum ------------------------

@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<i32>;
@group(0) @binding(3) var<storage, read> mask: array<f32>;
@group(0) @binding(4) var<storage, read_write> loss_rows: array<f32>;
@group(0) @binding(5) var<storage, read_write> lse_rows: array<f32>;

fn z_at(row: u32, j: u32) -> f32 {
    var z = logits[row * p.v + j] * p.inv_tau;
    if (p.mask_mode == 1u) {
        z += mask[j];
    } else if (p.mask_mode == 2u) {
        z += mask[row * p.v + j];
    }
    return z;
}

var<workgroup> red_m: array<f32, 256>;
var<workgroup> red_s: array<f32, 256>;

@compute @workgroup_size(256)
fn ce_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let row = row_index(wid, nwg);
    if (row >= p.n) {
        return; // whole workgroup: uniform
    }
    let t = targets[row];
    if (t == p.ignore) {
        if (lid == 0u) {
            loss_rows[row] = 0.0;
            lse_rows[row] = 0.0;
        }
        return; // whole workgroup: uniform
    }
    var m = NEG_BIG;
    var s = 0.0;
    for (var j = lid; j < p.v; j += 256u) {
        let z = z_at(row, j);
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
        lse_rows[row] = lse;
        if (t >= 0 && u32(t) < p.v) {
            loss_rows[row] = lse - z_at(row, u32(t));
        } else {
            loss_rows[row] = bitcast<f32>(0x7fc00000u + p.n * 0u); // NaN: invalid target
        }
    }
}

// ---- mean over non-ignored rows: one workgroup, fixed order -----------------

@group(0) @binding(1) var<storage, read> m_loss_rows: array<f32>;
@group(0) @binding(2) var<storage, read> m_targets: array<i32>;
@group(0) @binding(3) var<storage, read_write> loss_mean: array<f32>;
@group(0) @binding(4) var<storage, read_write> count_out: array<f32>;

var<workgroup> red_c: array<u32, 256>;

@compute @workgroup_size(256)
fn ce_mean(@builtin(local_invocation_index) lid: u32) {
    var acc = 0.0;
    var cnt = 0u;
    for (var r = lid; r < p.n; r += 256u) {
        if (m_targets[r] != p.ignore) {
            acc += m_loss_rows[r];
            cnt += 1u;
        }
    }
    red_s[lid] = acc;
    red_c[lid] = cnt;
    workgroupBarrier();
    for (var k = 128u; k > 0u; k >>= 1u) {
        if (lid < k) {
            red_s[lid] += red_s[lid + k];
            red_c[lid] += red_c[lid + k];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        let c = f32(red_c[0]);
        loss_mean[0] = red_s[0] / max(c, 1.0);
        count_out[0] = c;
    }
}

// ---- backward of the mean loss ----------------------------------------------
// dlogits[r, j] = dloss * inv_tau / count * (softmax(z)_j - [j == target]),
// zero on ignored rows (and on rows with an invalid target).

@group(0) @binding(1) var<storage, read> b_logits: array<f32>;
@group(0) @binding(2) var<storage, read> b_targets: array<i32>;
@group(0) @binding(3) var<storage, read> b_mask: array<f32>;
@group(0) @binding(4) var<storage, read> b_lse: array<f32>;
@group(0) @binding(5) var<storage, read> b_count: array<f32>;
@group(0) @binding(6) var<storage, read> b_dloss: array<f32>;
@group(0) @binding(7) var<storage, read_write> dlogits: array<f32>;

@compute @workgroup_size(256)
fn ce_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    // Grid: x (folded with y) = row * blocks_per_row + column block.
    let blocks = (p.v + 255u) / 256u;
    let flat = row_index(wid, nwg);
    let row = flat / blocks;
    let j = (flat - row * blocks) * 256u + lid;
    if (row >= p.n || j >= p.v) {
        return;
    }
    let e = row * p.v + j;
    let t = b_targets[row];
    if (t == p.ignore || t < 0 || u32(t) >= p.v) {
        dlogits[e] = 0.0;
        return;
    }
    var z = b_logits[e] * p.inv_tau;
    if (p.mask_mode == 1u) {
        z += b_mask[j];
    } else if (p.mask_mode == 2u) {
        z += b_mask[e];
    }
    var g = exp(z - b_lse[row]);
    if (j == u32(t)) {
        g -= 1.0;
    }
    dlogits[e] = g * b_dloss[0] * p.inv_tau / max(b_count[0], 1.0);
}
