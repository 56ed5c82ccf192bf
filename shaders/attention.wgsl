// Fused attention, the variant for GPUs: every invocation fetches the rows it needs itself.
// The kernels are in _attention.wgsl; launchers and tests in src/ops/attention.rs.

//!include _attention

fn fetch_q(base: u32, lane: u32) -> array<vec4<f32>, DH4> {
    var r: array<vec4<f32>, DH4>;
    for (var d = 0u; d < DH4; d++) {
        r[d] = q[base + d];
    }
    return r;
}

fn fetch_k(base: u32, lane: u32) -> array<vec4<f32>, DH4> {
    var r: array<vec4<f32>, DH4>;
    for (var d = 0u; d < DH4; d++) {
        r[d] = k[base + d];
    }
    return r;
}

fn fetch_v(base: u32, lane: u32) -> array<vec4<f32>, DH4> {
    var r: array<vec4<f32>, DH4>;
    for (var d = 0u; d < DH4; d++) {
        r[d] = v[base + d];
    }
    return r;
}

fn fetch_do(base: u32, lane: u32) -> array<vec4<f32>, DH4> {
    var r: array<vec4<f32>, DH4>;
    for (var d = 0u; d < DH4; d++) {
        r[d] = g_do[base + d];
    }
    return r;
}
