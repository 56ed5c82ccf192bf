// Row sum for matmul gradients: out[i] = sum_r x[r * S + i].
//   x: [R, S] row-major; out: [S]
// Used for dbias (sum of dY over all rows) and to sum per-batch weight
// gradients of a broadcast B. One invocation per output column; grid folded
// into x and y (64 invocations per workgroup).

struct Params {
    rows: u32,
    cols: u32,
    grid_x: u32, // workgroups along x
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn rowsum(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.y * p.grid_x + wid.x) * 64u + lid.x;
    if (i >= p.cols) {
        return;
    }
    var s = 0.0;
    for (var r = 0u; r < p.rows; r++) {
        s += x[r * p.cols + i];
    }
    out[i] = s;
}
