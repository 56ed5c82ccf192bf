// Memory bandwidth probe for the benchmark harness (src/bench.rs).
// dst[i] = src[i] for i < p.n; src, dst: [n] vec4<f32> (bytes moved = 32 * n).
// Grid folded into x and y (p.grid_x workgroups along x).

struct Params {
    n: u32,
    grid_x: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<f32>>;

@compute @workgroup_size(64, 1, 1)
fn copy_vec4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.y * p.grid_x + wid.x) * 64u + lid.x;
    if (i < p.n) {
        dst[i] = src[i];
    }
}
