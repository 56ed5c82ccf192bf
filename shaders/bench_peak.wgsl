// Device peak probes for the benchmark harness (src/bench.rs).
//
// fma_peak: every invocation runs 3 independent vec4 FMA chains (12 scalar chains: enough
//   to hide FMA latency, few enough to stay in registers on lavapipe) for
//   p.iters steps (8 flops per vec4 FMA per step; p.iters % 8 == 0) and writes their sum to
//   out[i], so nothing is optimized away. out: [invocations] f32.
//   The loop body holds 8 steps: on llvmpipe every loop trip costs a mask update, a
//   blend per loop-carried value and a branch, which with one step per trip capped the
//   measured "peak" at about a third of the FMA throughput (28.9 vs 85 GFLOP per
//   CPU-second in one comparison on the 2-core CI machine).
// copy_vec4: dst[i] = src[i] over p.n vec4 elements (bytes moved = 32 * p.n).
//   src, dst: [n] vec4<f32>. Grid folded into x and y (p.grid_x workgroups along x).

struct Params {
    iters: u32,
    n: u32,
    grid_x: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn fma_peak(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.y * p.grid_x + wid.x) * 64u + lid.x;
    let s = f32(i) * 1e-9;
    var x0 = vec4<f32>(s, s + 0.1, s + 0.2, s + 0.3);
    var x1 = x0 + 1.0;
    var x2 = x0 + 2.0;
    let m = vec4<f32>(0.999999);
    let c = vec4<f32>(1e-7);
    for (var t = 0u; t < p.iters; t += 8u) {
        x0 = fma(x0, m, c);
        x1 = fma(x1, m, c);
        x2 = fma(x2, m, c);
        x0 = fma(x0, m, c);
        x1 = fma(x1, m, c);
        x2 = fma(x2, m, c);
        x0 = fma(x0, m, c);
        x1 = fma(x1, m, c);
        x2 = fma(x2, m, c);
        x0 = fma(x0, m, c);
        x1 = fma(x1, m, c);
        x2 = fma(x2, m, c);
        x0 = fma(x0, m, c);
        x1 = fma(x1, m, c);
        x2 = fma(x2, m, c);
        x0 = fma(x0, m, c);
        x1 = fma(x1, m, c);
        x2 = fma(x2, m, c);
        x0 = fma(x0, m, c);
        x1 = fma(x1, m, c);
        x2 = fma(x2, m, c);
        x0 = fma(x0, m, c);
        x1 = fma(x1, m, c);
        x2 = fma(x2, m, c);
    }
    if (i < p.n) {
        let v = x0 + x1 + x2;
        out[i] = v.x + v.y + v.z + v.w;
    }
}
