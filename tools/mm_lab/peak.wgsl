struct Params { iters: u32, n: u32, grid_x: u32 }
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
    for (var t = 0u; t < p.iters; t++) {
        x0 = fma(x0, m, c);
        x1 = fma(x1, m, c);
        x2 = fma(x2, m, c);
    }
    if (i < p.n) {
        let v = x0 + x1 + x2;
        out[i] = v.x + v.y + v.z + v.w;
    }
}

// 3 chains, 8 steps per loop trip (iters must be a multiple of 8)
@compute @workgroup_size(64, 1, 1)
fn fma_unroll(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.y * p.grid_x + wid.x) * 64u + lid.x;
    let s = f32(i) * 1e-9;
    var x0 = vec4<f32>(s, s + 0.1, s + 0.2, s + 0.3);
    var x1 = x0 + 1.0;
    var x2 = x0 + 2.0;
    let m = vec4<f32>(0.999999);
    let c = vec4<f32>(1e-7);
    for (var t = 0u; t < p.iters; t += 8u) {
        x0 = fma(x0, m, c); x1 = fma(x1, m, c); x2 = fma(x2, m, c);
        x0 = fma(x0, m, c); x1 = fma(x1, m, c); x2 = fma(x2, m, c);
        x0 = fma(x0, m, c); x1 = fma(x1, m, c); x2 = fma(x2, m, c);
        x0 = fma(x0, m, c); x1 = fma(x1, m, c); x2 = fma(x2, m, c);
        x0 = fma(x0, m, c); x1 = fma(x1, m, c); x2 = fma(x2, m, c);
        x0 = fma(x0, m, c); x1 = fma(x1, m, c); x2 = fma(x2, m, c);
        x0 = fma(x0, m, c); x1 = fma(x1, m, c); x2 = fma(x2, m, c);
        x0 = fma(x0, m, c); x1 = fma(x1, m, c); x2 = fma(x2, m, c);
    }
    if (i < p.n) {
        let v = x0 + x1 + x2;
        out[i] = v.x + v.y + v.z + v.w;
    }
}

// 6 chains (24 scalar), 4 steps per trip; 48 flops per step -> pass 48
@compute @workgroup_size(64, 1, 1)
fn fma6(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.y * p.grid_x + wid.x) * 64u + lid.x;
    let s = f32(i) * 1e-9;
    var x0 = vec4<f32>(s, s + 0.1, s + 0.2, s + 0.3);
    var x1 = x0 + 1.0; var x2 = x0 + 2.0; var x3 = x0 + 3.0; var x4 = x0 + 4.0; var x5 = x0 + 5.0;
    let m = vec4<f32>(0.999999);
    let c = vec4<f32>(1e-7);
    for (var t = 0u; t < p.iters; t += 4u) {
        x0 = fma(x0, m, c); x1 = fma(x1, m, c); x2 = fma(x2, m, c); x3 = fma(x3, m, c); x4 = fma(x4, m, c); x5 = fma(x5, m, c);
        x0 = fma(x0, m, c); x1 = fma(x1, m, c); x2 = fma(x2, m, c); x3 = fma(x3, m, c); x4 = fma(x4, m, c); x5 = fma(x5, m, c);
        x0 = fma(x0, m, c); x1 = fma(x1, m, c); x2 = fma(x2, m, c); x3 = fma(x3, m, c); x4 = fma(x4, m, c); x5 = fma(x5, m, c);
        x0 = fma(x0, m, c); x1 = fma(x1, m, c); x2 = fma(x2, m, c); x3 = fma(x3, m, c); x4 = fma(x4, m, c); x5 = fma(x5, m, c);
    }
    if (i < p.n) {
        let v = x0 + x1 + x2 + x3 + x4 + x5;
        out[i] = v.x + v.y + v.z + v.w;
    }
}
