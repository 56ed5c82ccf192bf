// softmax.wgsl plus its subgroup forward, in a module of its own (subgroup built-ins need the
// adapter's SUBGROUP feature, which the other softmax kernels must not).
//
// forward_sg: CPU adapters with 8-lane subgroups (lavapipe): one subgroup per row (WG = 8), each
// lane keeps a running (max, sum of exp(x - max)) over its strided vec4s, subgroupMax and
// subgroupAdd combine them (no workgroup memory, no barriers: those are coroutine switches on
// llvmpipe), then a second pass re-reads x (in cache) and writes y. Same semantics as `forward`.
// Launcher and tests: src/ops/softmax.rs.

//!include softmax

@compute @workgroup_size(WG)
fn forward_sg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(subgroup_invocation_id) lane: u32) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.rows) {
        return; // uniform over the workgroup
    }
    let base = row * p.cols;
    let c4 = (p.cols + 3u) / 4u;
    var m = NEG_BIG;
    var s = 0.0;
    for (var j = lane; j < c4; j += WG) {
        let v = ld_a(base, j, p.neg_inf);
        let mv = hmax(v);
        if (mv > m) {
            s = s * exp(m - mv);
            m = mv;
        }
        s += hsum(exp(v - m));
    }
    let row_max = subgroupMax(m);
    let row_sum = subgroupAdd(s * exp(m - row_max));
    let masked = !(row_sum > 0.0);
    let inv = select(1.0 / row_sum, 0.0, masked);
    let log_sum = log(select(row_sum, 1.0, masked));
    for (var j = lane; j < c4; j += WG) {
        let v = ld_a(base, j, 0.0);
        var y: vec4<f32>;
        if (p.op == 0u) {
            y = exp(v - row_max) * inv;
        } else {
            y = select((v - row_max) - log_sum, vec4<f32>(0.0), masked);
        }
        st_fwd(base, j, y);
    }
}
