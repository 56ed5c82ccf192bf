// Reductions along one axis. The input is viewed as x: [outer, len, inner]
// row-major and reduced over `len`; op: 0 sum, 1 max, 2 sum of squares.
// Results are multiplied by `scale` (1/len for a mean; 1 otherwise).
//
// reduce_wg: one workgroup per output and segment of the axis; segment s covers
// k in [s * seg, min(len, (s + 1) * seg)), threads stride over it and combine
// with a shared-memory tree. out: [outer, nseg, inner] (nseg = 1: the result;
// nseg > 1: partials that a second pass reduces).
// reduce_thread: one thread per output, a serial loop over the (short) axis;
// used for non-last axes where neighbouring threads read neighbouring columns.

struct Params {
    outer: u32,
    len: u32,
    inner: u32,
    seg: u32,
    nseg: u32,
    op: u32,
    scale: f32,
    // Identity of the max reduction (-inf), passed in because WGSL has no inf literal.
    neg_inf: f32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

fn identity() -> f32 {
    return select(0.0, p.neg_inf, p.op == 1u);
}

fn combine(a: f32, b: f32) -> f32 {
    return select(a + b, max(a, b), p.op == 1u);
}

fn load(i: u32) -> f32 {
    let v = x[i];
    return select(v, v * v, p.op == 2u);
}

var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(WG)
fn reduce_wg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let g = wid.x + wid.y * nwg.x; // = (o * nseg + s) * inner + i
    let total = p.outer * p.nseg * p.inner;
    if (g >= total) {
        return; // uniform over the workgroup
    }
    let i = g % p.inner;
    let s = (g / p.inner) % p.nseg;
    let o = g / (p.inner * p.nseg);
    let k_end = min(p.len, (s + 1u) * p.seg);
    let base = o * p.len * p.inner + i;
    var acc = identity();
    for (var k = s * p.seg + lid; k < k_end; k += WG) {
        acc = combine(acc, load(base + k * p.inner));
    }
    partial[lid] = acc;
    workgroupBarrier();
    for (var w = WG / 2u; w > 0u; w = w / 2u) {
        if (lid < w) {
            partial[lid] = combine(partial[lid], partial[lid + w]);
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        out[g] = partial[0] * select(p.scale, 1.0, p.op == 1u);
    }
}

@compute @workgroup_size(WG)
fn reduce_thread(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let g = (wid.x + wid.y * nwg.x) * WG + lid; // = o * inner + i
    if (g >= p.outer * p.inner) {
        return;
    }
    let i = g % p.inner;
    let o = g / p.inner;
    let base = o * p.len * p.inner + i;
    var acc = identity();
    for (var k = 0u; k < p.len; k++) {
        acc = combine(acc, load(base + k * p.inner));
    }
    out[g] = acc * select(p.scale, 1.0, p.op == 1u);
}
