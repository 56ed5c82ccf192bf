struct Params { rows: u32, cols: u32, grid_x: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> w: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> y: array<vec4<f32>>;

// grid: rows workgroups of 64; one row per workgroup
@compute @workgroup_size(64)
fn copy(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let c4 = p.cols / 4u;
    let base = (wid.x + wid.y * p.grid_x) * c4;
    for (var j = lid; j < c4; j += 64u) {
        y[base + j] = x[base + j];
    }
}

// one 8-lane subgroup per row, two passes over x, subgroupAdd
@compute @workgroup_size(8)
fn rms_sg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(subgroup_invocation_id) lid: u32) {
    let c4 = p.cols / 4u;
    let base = (wid.x + wid.y * p.grid_x) * c4;
    var ss = vec4<f32>(0.0);
    for (var j = lid; j < c4; j += 8u) {
        let v = x[base + j];
        ss = fma(v, v, ss);
    }
    let rstd = inverseSqrt(subgroupAdd(ss.x + ss.y + ss.z + ss.w) / f32(p.cols) + 1e-6);
    for (var j = lid; j < c4; j += 8u) {
        y[base + j] = x[base + j] * rstd * w[j];
    }
}

// same, 4 vec4 per lane per trip
@compute @workgroup_size(8)
fn rms_sg4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(subgroup_invocation_id) lid: u32) {
    let c4 = p.cols / 4u;
    let base = (wid.x + wid.y * p.grid_x) * c4;
    var s0 = vec4<f32>(0.0);
    var s1 = vec4<f32>(0.0);
    var j = lid;
    for (; j + 24u < c4; j += 32u) {
        let a = x[base + j];
        let b = x[base + j + 8u];
        let c = x[base + j + 16u];
        let d = x[base + j + 24u];
        s0 = fma(a, a, s0); s1 = fma(b, b, s1); s0 = fma(c, c, s0); s1 = fma(d, d, s1);
    }
    for (; j < c4; j += 8u) {
        let v = x[base + j];
        s0 = fma(v, v, s0);
    }
    let ss = s0 + s1;
    let rstd = inverseSqrt(subgroupAdd(ss.x + ss.y + ss.z + ss.w) / f32(p.cols) + 1e-6);
    for (var j = lid; j < c4; j += 8u) {
        y[base + j] = x[base + j] * rstd * w[j];
    }
}
