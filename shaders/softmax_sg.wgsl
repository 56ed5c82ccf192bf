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
    let ms = running_max_sum(base, lane);
    let row_max = subgroupMax(ms.x);
    write_row(base, lane, row_max, subgroupAdd(ms.y * exp(ms.x - row_max)));
}
