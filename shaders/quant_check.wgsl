// Count non-finite values (NaN, +-inf) of an f32 array: x: [n]; count: [1].
// Tested by the exponent bits, which fast-math cannot fold away.

struct Params {
    n: u32,
    stride: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> count: array<atomic<u32>>;

@compute @workgroup_size(WG)
fn count_nonfinite(@builtin(global_invocation_id) gid: vec3<u32>) {
    var bad = 0u;
    for (var i = gid.x; i < p.n; i = i + p.stride) {
        if ((bitcast<u32>(x[i]) & 0x7f800000u) == 0x7f800000u) {
            bad = bad + 1u;
        }
    }
    if (bad > 0u) {
        atomicAdd(&count[0], bad);
    }
}
