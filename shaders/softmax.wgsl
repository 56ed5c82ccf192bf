// Row softmax / log-softmax over the last axis, forward and backward.
// Tensors are [rows, cols] row-major; one workgroup per row (grid folded into
// x and y: row = wid.x + wid.y * nwg.x). Every buffer is viewed as vec4s: with
// ALIGNED (cols % 4 == 0) a row is cols / 4 whole vec4s; otherwise each vec4 of
// the row is gathered (and scattered) lane by lane, padded past the row end.
//
// forward (op 0 softmax, 1 log_softmax): one pass keeps a running (max, sum of
// exp(x - max)) per thread, a tree combines them, a second pass writes. A row
// whose entries are all -inf (fully masked) has sum 0 and is written as zeros
// (both ops). Entries of -1e30 are ordinary values.
// backward (op 0: dx = y * (dy - sum(y * dy)); op 1: dx = dy - exp(y) * sum(dy)).

struct Params {
    rows: u32,
    cols: u32,
    op: u32,
    // -inf, passed in because WGSL has no inf literal; pads lanes past the row end.
    neg_inf: f32,
}
@group(0) @binding(0) var<uniform> p: Params;
// forward: x; backward: y (the forward's output)
@group(0) @binding(1) var<storage, read> a4: array<vec4<f32>>;
// forward: y
@group(0) @binding(2) var<storage, read_write> fwd_out: array<vec4<f32>>;
// backward: dy, dx
@group(0) @binding(2) var<storage, read> dy4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> bwd_out: array<vec4<f32>>;

const NEG_BIG = -3.4028235e38;

var<workgroup> red_a: array<f32, WG>;
var<workgroup> red_b: array<f32, WG>;

// vec4 number j of the row starting at element `base`, lanes past the row end = pad.
fn ld_a(base: u32, j: u32, pad: f32) -> vec4<f32> {
    if (ALIGNED) {
        return a4[base / 4u + j];
    }
    var v = vec4<f32>(pad);
    for (var k = 0u; k < 4u; k++) {
        let c = 4u * j + k;
        if (c < p.cols) {
            let e = base + c;
            v[k] = a4[e / 4u][e % 4u];
        }
    }
    return v;
}

fn ld_dy(base: u32, j: u32, pad: f32) -> vec4<f32> {
    if (ALIGNED) {
        return dy4[base / 4u + j];
    }
    var v = vec4<f32>(pad);
    for (var k = 0u; k < 4u; k++) {
        let c = 4u * j + k;
        if (c < p.cols) {
            let e = base + c;
            v[k] = dy4[e / 4u][e % 4u];
        }
    }
    return v;
}

fn st_fwd(base: u32, j: u32, v: vec4<f32>) {
    if (ALIGNED) {
        fwd_out[base / 4u + j] = v;
        return;
    }
    for (var k = 0u; k < 4u; k++) {
        let c = 4u * j + k;
        if (c < p.cols) {
            let e = base + c;
            fwd_out[e / 4u][e % 4u] = v[k];
        }
    }
}

fn st_bwd(base: u32, j: u32, v: vec4<f32>) {
    if (ALIGNED) {
        bwd_out[base / 4u + j] = v;
        return;
    }
    for (var k = 0u; k < 4u; k++) {
        let c = 4u * j + k;
        if (c < p.cols) {
            let e = base + c;
            bwd_out[e / 4u][e % 4u] = v[k];
        }
    }
}

fn hmax(v: vec4<f32>) -> f32 {
    return max(max(v.x, v.y), max(v.z, v.w));
}

fn hsum(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

// Sum of red_a over the workgroup; every thread gets the total.
fn wg_sum(lid: u32, v: f32) -> f32 {
    red_a[lid] = v;
    workgroupBarrier();
    for (var w = WG / 2u; w > 0u; w = w / 2u) {
        if (lid < w) {
            red_a[lid] = red_a[lid] + red_a[lid + w];
        }
        workgroupBarrier();
    }
    return red_a[0];
}

@compute @workgroup_size(WG)
fn forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.rows) {
        return; // uniform over the workgroup
    }
    let base = row * p.cols;
    let ms = running_max_sum(base, lid);
    red_a[lid] = ms.x;
    red_b[lid] = ms.y;
    workgroupBarrier();
    for (var w = WG / 2u; w > 0u; w = w / 2u) {
        if (lid < w) {
            let m1 = red_a[lid];
            let m2 = red_a[lid + w];
            let mm = max(m1, m2);
            red_b[lid] = red_b[lid] * exp(m1 - mm) + red_b[lid + w] * exp(m2 - mm);
            red_a[lid] = mm;
        }
        workgroupBarrier();
    }
    write_row(base, lid, red_a[0], red_b[0]);
}

// One thread's running (max, sum of exp(x - max)) over the vec4s first, first + WG, ... of the
// row at `base` (finite start, so combining never computes inf - inf).
fn running_max_sum(base: u32, first: u32) -> vec2<f32> {
    let c4 = (p.cols + 3u) / 4u;
    var m = NEG_BIG;
    var s = 0.0;
    for (var j = first; j < c4; j += WG) {
        let v = ld_a(base, j, p.neg_inf);
        let mv = hmax(v);
        if (mv > m) {
            s = s * exp(m - mv);
            m = mv;
        }
        s += hsum(exp(v - m));
    }
    return vec2<f32>(m, s);
}

// The output pass of one thread over the same vec4s, given the row's max and sum; a row with
// sum 0 (fully masked) is written as zeros.
fn write_row(base: u32, first: u32, row_max: f32, row_sum: f32) {
    let c4 = (p.cols + 3u) / 4u;
    let masked = !(row_sum > 0.0);
    let inv = select(1.0 / row_sum, 0.0, masked);
    let log_sum = log(select(row_sum, 1.0, masked));
    for (var j = first; j < c4; j += WG) {
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

// Row held in registers: each thread keeps its PER vec4s (j = lid + k * WG), so
// x is read once and y written once. Used when ceil(cols / 4) <= WG * PER.
@compute @workgroup_size(WG)
fn forward_cached(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.rows) {
        return; // uniform over the workgroup
    }
    let base = row * p.cols;
    let c4 = (p.cols + 3u) / 4u;
    var xs: array<vec4<f32>, PER>;
    var m = NEG_BIG;
    for (var k = 0u; k < PER; k++) {
        let j = lid + k * WG;
        var v = vec4<f32>(p.neg_inf);
        if (j < c4) {
            v = ld_a(base, j, p.neg_inf);
        }
        xs[k] = v;
        m = max(m, hmax(v));
    }
    var s = 0.0;
    for (var k = 0u; k < PER; k++) {
        s += hsum(exp(xs[k] - m));
    }
    red_a[lid] = m;
    red_b[lid] = s;
    workgroupBarrier();
    for (var w = WG / 2u; w > 0u; w = w / 2u) {
        if (lid < w) {
            let m1 = red_a[lid];
            let m2 = red_a[lid + w];
            let mm = max(m1, m2);
            red_b[lid] = red_b[lid] * exp(m1 - mm) + red_b[lid + w] * exp(m2 - mm);
            red_a[lid] = mm;
        }
        workgroupBarrier();
    }
    let row_max = red_a[0];
    let row_sum = red_b[0];
    let masked = !(row_sum > 0.0);
    let inv = select(1.0 / row_sum, 0.0, masked);
    let log_sum = log(select(row_sum, 1.0, masked));
    for (var k = 0u; k < PER; k++) {
        let j = lid + k * WG;
        if (j < c4) {
            var y: vec4<f32>;
            if (p.op == 0u) {
                y = exp(xs[k] - row_max) * inv;
            } else {
                y = select((xs[k] - row_max) - log_sum, vec4<f32>(0.0), masked);
            }
            st_fwd(base, j, y);
        }
    }
}

@compute @workgroup_size(WG)
fn backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.rows) {
        return; // uniform over the workgroup
    }
    let base = row * p.cols;
    let c4 = (p.cols + 3u) / 4u;
    var acc = 0.0;
    for (var j = lid; j < c4; j += WG) {
        let dy = ld_dy(base, j, 0.0);
        if (p.op == 0u) {
            acc += dot(ld_a(base, j, 0.0), dy);
        } else {
            acc += hsum(dy);
        }
    }
    let total = wg_sum(lid, acc);
    for (var j = lid; j < c4; j += WG) {
        let y = ld_a(base, j, 0.0);
        let dy = ld_dy(base, j, 0.0);
        var dx: vec4<f32>;
        if (p.op == 0u) {
            dx = y * (dy - total);
        } else {
            dx = dy - exp(y) * total;
        }
        st_bwd(base, j, dx);
    }
}
