// Row-wise L2 normalization (sentence-transformers' Normalize, torch's F.normalize):
// y = x / max(||x||, eps) over the last axis, forward and backward.
// x, y, dy, dx: [rows, cols] row-major f32; nrm: [rows] = ||x|| (unclamped).
// One invocation per row (rows are short, e.g. 384): no workgroup memory, no barriers.
// Grid folded into x and y: row = (wid.x + wid.y * nwg.x) * WG + lid.

const WG = 64u;

struct Params { rows: u32, cols: u32, eps: f32 }
@group(0) @binding(0) var<uniform> p: Params;

// ---- forward: y = x / max(||x||, eps), nrm = ||x||
@group(0) @binding(1) var<storage, read> fx: array<f32>;
@group(0) @binding(2) var<storage, read_write> fy: array<f32>;
@group(0) @binding(3) var<storage, read_write> fnrm: array<f32>;

@compute @workgroup_size(WG)
fn forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let r = (wid.x + wid.y * nwg.x) * WG + lid;
    if (r >= p.rows) {
        return;
    }
    let base = r * p.cols;
    var ss = 0.0;
    for (var c = 0u; c < p.cols; c++) {
        let v = fx[base + c];
        ss += v * v;
    }
    let n = sqrt(ss);
    fnrm[r] = n;
    let inv = 1.0 / max(n, p.eps);
    for (var c = 0u; c < p.cols; c++) {
        fy[base + c] = fx[base + c] * inv;
    }
}

// ---- backward: with d = max(||x||, eps):
//   ||x|| > eps: dx = (dy - y * <y, dy>) / d
//   else:        dx = dy / eps        (the clamp is active: y = x / eps)
@group(0) @binding(1) var<storage, read> by: array<f32>;
@group(0) @binding(2) var<storage, read> bdy: array<f32>;
@group(0) @binding(3) var<storage, read> bnrm: array<f32>;
@group(0) @binding(4) var<storage, read_write> bdx: array<f32>;

@compute @workgroup_size(WG)
fn backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let r = (wid.x + wid.y * nwg.x) * WG + lid;
    if (r >= p.rows) {
        return;
    }
    let base = r * p.cols;
    let n = bnrm[r];
    if (n <= p.eps) {
        let inv = 1.0 / p.eps;
        for (var c = 0u; c < p.cols; c++) {
            bdx[base + c] = bdy[base + c] * inv;
        }
        return;
    }
    var dot = 0.0;
    for (var c = 0u; c < p.cols; c++) {
        dot += by[base + c] * bdy[base + c];
    }
    let inv = 1.0 / n;
    for (var c = 0u; c < p.cols; c++) {
        bdx[base + c] = (bdy[base + c] - by[base + c] * dot) * inv;
    }
}
