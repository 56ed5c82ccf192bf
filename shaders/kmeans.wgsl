// K-means (Lloyd) centroid update without float atomics, and k-means++ distance
// updates.
//
// x: [n, d] row-major points; assign/prev: [n] cluster of each point now / in
// the previous iteration; dist: [n] squared distance to the assigned centroid.
// Points are split into nchunks chunks of `chunk` consecutive rows.
//   accum:    partial[p, c, j] = sum of x[i, j] over rows i of chunk p with
//             assign[i] = c (one invocation per (chunk, column), rows in order),
//             pcount[p, c] = their count, stats[p] = (sum of dist, #changed).
//   finalize: cent_new[c, j] = sum_p partial[p, c, j] / count[c], summed in
//             chunk order, so the result is deterministic; empty clusters keep
//             cent_old. counts[c] = sum_p pcount[p, c].
// partial and pcount must be zero on entry to accum.

struct Params {
    n: u32,
    d: u32,
    kc: u32,
    chunk: u32,
    nchunks: u32,
    groups_x: u32,
    center: u32,
    first: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> assign: array<u32>;
@group(0) @binding(3) var<storage, read> prev: array<u32>;
@group(0) @binding(4) var<storage, read> dist: array<f32>;
@group(0) @binding(5) var<storage, read_write> partial: array<f32>;
@group(0) @binding(6) var<storage, read_write> pcount: array<u32>;
@group(0) @binding(7) var<storage, read_write> stats: array<f32>;

fn flat_id(wid: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * p.groups_x + wid.x) * WG + lid;
}

@compute @workgroup_size(WG)
fn accum(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = flat_id(wid, lid);
    let ch = t / (p.d + 1u);
    let j = t % (p.d + 1u);
    if (ch >= p.nchunks) {
        return;
    }
    let r0 = ch * p.chunk;
    let r1 = min(r0 + p.chunk, p.n);
    if (j < p.d) {
        for (var i = r0; i < r1; i = i + 1u) {
            let c = assign[i];
            if (c < p.kc) {
                let o = (ch * p.kc + c) * p.d + j;
                partial[o] = partial[o] + x[i * p.d + j];
            }
        }
    } else {
        var s = 0.0;
        var changed = 0u;
        for (var i = r0; i < r1; i = i + 1u) {
            let c = assign[i];
            if (c < p.kc) {
                pcount[ch * p.kc + c] = pcount[ch * p.kc + c] + 1u;
            }
            s = s + dist[i];
            if (c != prev[i]) {
                changed = changed + 1u;
            }
        }
        stats[2u * ch] = s;
        stats[2u * ch + 1u] = f32(changed);
    }
}

@group(0) @binding(1) var<storage, read> f_partial: array<f32>;
@group(0) @binding(2) var<storage, read> f_pcount: array<u32>;
@group(0) @binding(3) var<storage, read> cent_old: array<f32>;
@group(0) @binding(4) var<storage, read_write> cent_new: array<f32>;
@group(0) @binding(5) var<storage, read_write> counts: array<u32>;

@compute @workgroup_size(WG)
fn finalize(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = flat_id(wid, lid);
    let c = t / p.d;
    let j = t % p.d;
    if (c >= p.kc) {
        return;
    }
    var s = 0.0;
    var cnt = 0u;
    for (var ch = 0u; ch < p.nchunks; ch = ch + 1u) {
        s = s + f_partial[(ch * p.kc + c) * p.d + j];
        cnt = cnt + f_pcount[ch * p.kc + c];
    }
    if (cnt > 0u) {
        cent_new[c * p.d + j] = s / f32(cnt);
    } else {
        cent_new[c * p.d + j] = cent_old[c * p.d + j];
    }
    if (j == 0u) {
        counts[c] = cnt;
    }
}

// k-means++: mind[i] = min(mind[i], ||x_i - x_center||^2) (or = when first).
@group(0) @binding(2) var<storage, read_write> mind: array<f32>;

@compute @workgroup_size(WG)
fn kpp_update(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_id(wid, lid);
    if (i >= p.n) {
        return;
    }
    var acc = 0.0;
    for (var t = 0u; t < p.d; t = t + 1u) {
        let diff = x[i * p.d + t] - x[p.center * p.d + t];
        acc = acc + diff * diff;
    }
    if (p.first == 1u) {
        mind[i] = acc;
    } else {
        mind[i] = min(mind[i], acc);
    }
}
