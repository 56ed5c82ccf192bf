// norm.wgsl plus its subgroup kernel, in a module of its own: a module that calls subgroup
// built-ins needs the adapter's SUBGROUP feature, which the other norm kernels must not.
// Launcher and tests: src/ops/norm.rs.

//!include norm

// CPU adapters with 8-lane subgroups (lavapipe): one subgroup per row (WG = 8),
// statistics by subgroupAdd (no workgroup memory, no barriers, which are coroutine
// switches on llvmpipe) and x re-read for the output pass (the row is in cache)
// instead of being held in a private array. Statistics take one pass: LayerNorm
// sums d = x - x[row, 0] and d^2 (the shifted-data variance: no cancellation
// between large terms when the row's values sit far from 0).
@compute @workgroup_size(WG)
fn forward_sg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(subgroup_invocation_id) lane: u32) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.rows) {
        return; // uniform over the workgroup
    }
    let base = row * p.cols;
    let c4 = (p.cols + 3u) / 4u;
    let layer = p.mode == 1u;
    let inv_cols = 1.0 / f32(p.cols);
    var mean = 0.0;
    var variance = 0.0;
    if (layer) {
        let shift = ld_x(base, 0u).x;
        var s1 = vec4<f32>(0.0);
        var s2 = vec4<f32>(0.0);
        for (var j = lane; j < c4; j += WG) {
            let d = select(vec4<f32>(0.0), ld_x(base, j) - shift, lanes(j));
            s1 += d;
            s2 = fma(d, d, s2);
        }
        let md = subgroupAdd(hsum(s1)) * inv_cols;
        mean = shift + md;
        variance = max(subgroupAdd(hsum(s2)) * inv_cols - md * md, 0.0);
    } else {
        var acc = vec4<f32>(0.0);
        for (var j = lane; j < c4; j += WG) {
            let v = ld_x(base, j);
            acc = fma(v, v, acc);
        }
        variance = subgroupAdd(hsum(acc)) * inv_cols;
    }
    let rstd = inverseSqrt(variance + p.eps);
    for (var j = lane; j < c4; j += WG) {
        var y = (ld_x(base, j) - mean) * rstd * ld_w(j);
        if (layer) {
            y += ld_b(j);
        }
        st_y(base, j, y);
    }
    if (lane == 0u) {
        frstd[row] = rstd;
        if (layer) {
            fmean[row] = mean;
        }
    }
}
