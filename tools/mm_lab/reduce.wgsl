struct Params { n4: u32, cols: u32, rows: u32, grid_x: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(2) var t: texture_2d<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn red_buf(@builtin(global_invocation_id) g: vec3<u32>) {
    let i = g.x;
    var s = vec4<f32>(0.0);
    for (var r = 0u; r < p.rows; r++) {
        s += src[r * p.cols + i];
    }
    out[i] = s.x + s.y + s.z + s.w;
}

@compute @workgroup_size(64, 1, 1)
fn red_tex(@builtin(global_invocation_id) g: vec3<u32>) {
    let i = g.x;
    var s = vec4<f32>(0.0);
    for (var r = 0u; r < p.rows; r++) {
        s += textureLoad(t, vec2<u32>(i, r), 0);
    }
    out[i] = s.x + s.y + s.z + s.w;
}
