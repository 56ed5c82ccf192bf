// spmm_sg: sparse (CSR) x dense for CPU adapters (lavapipe), D % 4 == 0, f32:
//   y[r, :] = sum over e in row r of val[e] * x[col[e], :]
// row_ptr: [rows + 1] u32, col: [nnz] u32, val: [nnz] f32, x: [n_cols, D], y: [rows, D] (as vec4).
// Why this shape: llvmpipe runs the 8 invocations of a subgroup as the lanes of one
// 256-bit SIMD group and turns every storage-buffer load into a per-lane loop, so
// loads, not FMAs, bound the speed (see matmul_sg.wgsl). A workgroup is one 8-lane
// subgroup and owns one row and 16 vec4 column groups (64 columns); lane l owns
// groups l and l + 8. The edges of the row are taken 8 at a time: lane l loads
// col/val of edge e0 + l once, and subgroupBroadcast (a register extract) hands
// them to every lane, so per edge each lane issues 2 vec4 loads of x and only
// 1/4 of a col/val load. Tail edges past the row's end get weight 0 (their
// column is the last valid edge's, so the x loads stay in bounds).
// Needs subgroup size 8 (the launcher checks the adapter's subgroup limits).
// Grid: x = column block (16 vec4 groups), rows folded into y + 65535 * z.
// Deterministic: each output element is summed by one lane in CSR order.

struct Params {
    rows: u32,
    d4: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> row_ptr: array<u32>;
@group(0) @binding(2) var<storage, read> col: array<u32>;
@group(0) @binding(3) var<storage, read> val: array<f32>;
@group(0) @binding(4) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> y: array<vec4<f32>>;

var<private> acc0: vec4<f32>;
var<private> acc1: vec4<f32>;

// acc += w * x[c, groups g0 and g1].
fn edge(c: u32, w: f32, g0: u32, g1: u32) {
    let base = c * p.d4;
    acc0 += w * x[base + g0];
    acc1 += w * x[base + g1];
}

@compute @workgroup_size(8, 1, 1)
fn spmm_sg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    let r = wid.z * 65535u + wid.y;
    if (r >= p.rows) {
        return;
    }
    let q0 = wid.x * 16u + lane;
    let q1 = q0 + 8u;
    // Lanes past D read the last column group; their results are not stored.
    let g0 = min(q0, p.d4 - 1u);
    let g1 = min(q1, p.d4 - 1u);
    acc0 = vec4<f32>(0.0);
    acc1 = vec4<f32>(0.0);
    let start = row_ptr[r];
    let end = row_ptr[r + 1u];
    for (var e0 = start; e0 < end; e0 = e0 + 8u) {
        let e = min(e0 + lane, end - 1u);
        let mc = col[e];
        let mw = select(0.0, val[e], e0 + lane < end);
        edge(subgroupBroadcast(mc, 0u), subgroupBroadcast(mw, 0u), g0, g1);
        edge(subgroupBroadcast(mc, 1u), subgroupBroadcast(mw, 1u), g0, g1);
        edge(subgroupBroadcast(mc, 2u), subgroupBroadcast(mw, 2u), g0, g1);
        edge(subgroupBroadcast(mc, 3u), subgroupBroadcast(mw, 3u), g0, g1);
        edge(subgroupBroadcast(mc, 4u), subgroupBroadcast(mw, 4u), g0, g1);
        edge(subgroupBroadcast(mc, 5u), subgroupBroadcast(mw, 5u), g0, g1);
        edge(subgroupBroadcast(mc, 6u), subgroupBroadcast(mw, 6u), g0, g1);
        edge(subgroupBroadcast(mc, 7u), subgroupBroadcast(mw, 7u), g0, g1);
    }
    if (q0 < p.d4) {
        y[r * p.d4 + q0] = acc0;
    }
    if (q1 < p.d4) {
        y[r * p.d4 + q1] = acc1;
    }
}
