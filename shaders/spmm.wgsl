// Sparse (CSR) x dense: y[r, :] = sum over e in row r of val[e] * x[col[e], :].
// row_ptr: [rows + 1] u32, col: [nnz] u32, val: [nnz] f32, x: [n_cols, D], y: [rows, D].
// One invocation per (row, 4 consecutive columns), numbered row-major over a
// flat index so every lane of a workgroup has work even when D is small; the
// flat grid is folded into x and y. Deterministic: each output element is
// summed by one invocation in CSR order.

struct Params {
    rows: u32,
    d: u32,
    // Invocations per grid row (grid x extent x 64).
    row_width: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> row_ptr: array<u32>;
@group(0) @binding(2) var<storage, read> col: array<u32>;
@group(0) @binding(3) var<storage, read> val: array<f32>;
@group(0) @binding(4) var<storage, read> x: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn spmm(@builtin(global_invocation_id) gid: vec3<u32>) {
    let quads = (p.d + 3u) / 4u;
    let flat = gid.y * p.row_width + gid.x;
    let r = flat / quads;
    let c0 = (flat % quads) * 4u;
    if (r >= p.rows) {
        return;
    }
    var acc = vec4<f32>(0.0);
    let lanes = min(4u, p.d - c0);
    for (var e = row_ptr[r]; e < row_ptr[r + 1u]; e = e + 1u) {
        let w = val[e];
        let base = col[e] * p.d + c0;
        if (lanes == 4u) {
            acc += w * vec4<f32>(x[base], x[base + 1u], x[base + 2u], x[base + 3u]);
        } else {
            for (var l = 0u; l < lanes; l = l + 1u) {
                acc[l] += w * x[base + l];
            }
        }
    }
    let out = r * p.d + c0;
    for (var l = 0u; l < lanes; l = l + 1u) {
        y[out + l] = acc[l];
    }
}

// ---- spmm_v4: the same product for D % 4 == 0 with x and y read as vec4:
// one invocation per (row, vec4 column group); `p.d` holds D / 4 here. One
// 16-byte load of x per edge instead of four scalar loads (llvmpipe turns
// each storage load into a per-lane loop, so fewer loads is what counts).
@group(0) @binding(4) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> y4: array<vec4<f32>>;

@compute @workgroup_size(64)
fn spmm_v4(@builtin(global_invocation_id) gid: vec3<u32>) {
    let flat = gid.y * p.row_width + gid.x;
    let r = flat / p.d;
    let q = flat % p.d;
    if (r >= p.rows) {
        return;
    }
    var acc = vec4<f32>(0.0);
    for (var e = row_ptr[r]; e < row_ptr[r + 1u]; e = e + 1u) {
        acc += val[e] * x4[col[e] * p.d + q];
    }
    y4[r * p.d + q] = acc;
}
