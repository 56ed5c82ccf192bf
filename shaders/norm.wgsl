// RMSNorm (mode 0, LLaMA) and LayerNorm (mode 1, BERT) over the last axis,
// forward and backward. x, y, dy, dx: [rows, cols] row-major; w, b: [cols];
// mean, rstd: [rows]. RMSNorm: y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps).
// LayerNorm: y = (x - mean) * rstd * w + b, rstd = 1 / sqrt(var(x) + eps) (biased var).
//
// Row kernels (forward, backward): one workgroup per row (row = wid.x + wid.y * nwg.x),
// buffers viewed as vec4s; with ALIGNED (cols % 4 == 0) a row is cols / 4 whole
// vec4s, otherwise each vec4 is gathered / scattered lane by lane, zero padded.
// One pass computes the row statistics (LayerNorm: per-thread Welford/Chan
// (count, mean, M2) combined in a tree), a second pass writes.
// Column kernel (dweight): one thread per column and segment of `seg` rows
// writes partial column sums [nseg, cols]; no atomics. The caller reduces them.

struct Params {
    rows: u32,
    cols: u32,
    mode: u32,
    eps: f32,
    seg: u32,
}
@group(0) @binding(0) var<uniform> p: Params;

// ---- row kernels: x at 1, w at 2 (vec4 views)
@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> w4: array<vec4<f32>>;
// forward: b at 3 (LayerNorm only), y at 4, mean at 5 (LayerNorm only), rstd at 6
@group(0) @binding(3) var<storage, read> fb4: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> fy4: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> fmean: array<f32>;
@group(0) @binding(6) var<storage, read_write> frstd: array<f32>;
// backward: dy at 3, mean at 4 (LayerNorm only), rstd at 5, dx at 6
@group(0) @binding(3) var<storage, read> bdy4: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> bmean: array<f32>;
@group(0) @binding(5) var<storage, read> brstd: array<f32>;
@group(0) @binding(6) var<storage, read_write> bdx4: array<vec4<f32>>;

var<workgroup> red_a: array<f32, WG>;
var<workgroup> red_b: array<f32, WG>;
var<workgroup> red_c: array<f32, WG>;

// Lanes of vec4 number j that lie inside the row.
fn lanes(j: u32) -> vec4<bool> {
    let n = p.cols - 4u * j;
    return vec4<bool>(true, n > 1u, n > 2u, n > 3u);
}

fn ld_x(base: u32, j: u32) -> vec4<f32> {
    if (ALIGNED) {
        return x4[base / 4u + j];
    }
    var v = vec4<f32>(0.0);
    for (var k = 0u; k < 4u; k++) {
        if (4u * j + k < p.cols) {
            let e = base + 4u * j + k;
            v[k] = x4[e / 4u][e % 4u];
        }
    }
    return v;
}

fn ld_w(j: u32) -> vec4<f32> {
    if (ALIGNED) {
        return w4[j];
    }
    var v = vec4<f32>(0.0);
    for (var k = 0u; k < 4u; k++) {
        let e = 4u * j + k;
        if (e < p.cols) {
            v[k] = w4[e / 4u][e % 4u];
        }
    }
    return v;
}

fn ld_b(j: u32) -> vec4<f32> {
    if (ALIGNED) {
        return fb4[j];
    }
    var v = vec4<f32>(0.0);
    for (var k = 0u; k < 4u; k++) {
        let e = 4u * j + k;
        if (e < p.cols) {
            v[k] = fb4[e / 4u][e % 4u];
        }
    }
    return v;
}

fn ld_dy(base: u32, j: u32) -> vec4<f32> {
    if (ALIGNED) {
        return bdy4[base / 4u + j];
    }
    var v = vec4<f32>(0.0);
    for (var k = 0u; k < 4u; k++) {
        if (4u * j + k < p.cols) {
            let e = base + 4u * j + k;
            v[k] = bdy4[e / 4u][e % 4u];
        }
    }
    return v;
}

fn st_y(base: u32, j: u32, v: vec4<f32>) {
    if (ALIGNED) {
        fy4[base / 4u + j] = v;
        return;
    }
    for (var k = 0u; k < 4u; k++) {
        if (4u * j + k < p.cols) {
            let e = base + 4u * j + k;
            fy4[e / 4u][e % 4u] = v[k];
        }
    }
}

fn st_dx(base: u32, j: u32, v: vec4<f32>) {
    if (ALIGNED) {
        bdx4[base / 4u + j] = v;
        return;
    }
    for (var k = 0u; k < 4u; k++) {
        if (4u * j + k < p.cols) {
            let e = base + 4u * j + k;
            bdx4[e / 4u][e % 4u] = v[k];
        }
    }
}

fn hsum(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

// Workgroup sums of (a, b); every thread gets both totals.
fn wg_sum2(lid: u32, a: f32, b: f32) -> vec2<f32> {
    red_a[lid] = a;
    red_b[lid] = b;
    workgroupBarrier();
    for (var w = WG / 2u; w > 0u; w = w / 2u) {
        if (lid < w) {
            red_a[lid] = red_a[lid] + red_a[lid + w];
            red_b[lid] = red_b[lid] + red_b[lid + w];
        }
        workgroupBarrier();
    }
    return vec2<f32>(red_a[0], red_b[0]);
}

// Combine per-thread (count, mean, M2) over the workgroup (Chan et al.);
// every thread gets (mean, M2) of the whole row.
fn chan_combine(lid: u32, n: f32, m: f32, m2: f32) -> vec2<f32> {
    red_a[lid] = n;
    red_b[lid] = m;
    red_c[lid] = m2;
    workgroupBarrier();
    for (var w = WG / 2u; w > 0u; w = w / 2u) {
        if (lid < w) {
            let na = red_a[lid];
            let nb = red_a[lid + w];
            let nt = na + nb;
            if (nb > 0.0) {
                let delta = red_b[lid + w] - red_b[lid];
                red_b[lid] = red_b[lid] + delta * nb / nt;
                red_c[lid] = red_c[lid] + red_c[lid + w] + delta * delta * na * nb / nt;
                red_a[lid] = nt;
            }
        }
        workgroupBarrier();
    }
    return vec2<f32>(red_b[0], red_c[0]);
}

@compute @workgroup_size(WG)
fn forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.rows) {
        return; // uniform over the workgroup
    }
    let base = row * p.cols;
    let c4 = (p.cols + 3u) / 4u;
    let layer = p.mode == 1u;
    var mean = 0.0;
    var rstd = 0.0;
    if (layer) {
        // Per-thread (count, mean, M2), one vec4 at a time (Chan et al.).
        var n = 0.0;
        var m = 0.0;
        var m2 = 0.0;
        for (var j = lid; j < c4; j += WG) {
            let v = ld_x(base, j);
            let valid = lanes(j);
            let nb = f32(min(4u, p.cols - 4u * j));
            let mb = hsum(v) / nb;
            let d = select(vec4<f32>(0.0), v - mb, valid);
            let m2b = dot(d, d);
            let nt = n + nb;
            let delta = mb - m;
            m += delta * nb / nt;
            m2 += m2b + delta * delta * n * nb / nt;
            n = nt;
        }
        let st = chan_combine(lid, n, m, m2);
        mean = st.x;
        rstd = inverseSqrt(max(st.y, 0.0) / f32(p.cols) + p.eps);
    } else {
        var ss = 0.0;
        for (var j = lid; j < c4; j += WG) {
            let v = ld_x(base, j);
            ss += dot(v, v);
        }
        rstd = inverseSqrt(wg_sum2(lid, ss, 0.0).x / f32(p.cols) + p.eps);
    }
    for (var j = lid; j < c4; j += WG) {
        let v = ld_x(base, j);
        var y = (v - mean) * rstd * ld_w(j);
        if (layer) {
            y += ld_b(j);
        }
        st_y(base, j, y);
    }
    if (lid == 0u) {
        frstd[row] = rstd;
        if (layer) {
            fmean[row] = mean;
        }
    }
}

// Sum of v over the workgroup through red_a (sum_a) or red_b (sum_b); every
// thread gets the total. Consecutive sums must alternate arrays (a thread may
// still be reading [0] of the previous one).
fn sum_a(lid: u32, v: f32) -> f32 {
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

fn sum_b(lid: u32, v: f32) -> f32 {
    red_b[lid] = v;
    workgroupBarrier();
    for (var w = WG / 2u; w > 0u; w = w / 2u) {
        if (lid < w) {
            red_b[lid] = red_b[lid] + red_b[lid + w];
        }
        workgroupBarrier();
    }
    return red_b[0];
}

// ROWS rows per workgroup (rows g * ROWS ..), each held in registers: a thread
// keeps its PER vec4s (j = lid + k * WG) of x, and of w and b for all ROWS rows,
// so x is read once, y written once, w and b once per ROWS rows. LayerNorm
// statistics are exact two-pass (mean, then sum of squared deviations) over
// the registers. Used when ceil(cols / 4) <= WG * PER.
@compute @workgroup_size(WG)
fn forward_cached(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let first = (wid.x + wid.y * nwg.x) * ROWS;
    if (first >= p.rows) {
        return; // uniform over the workgroup
    }
    let c4 = (p.cols + 3u) / 4u;
    let layer = p.mode == 1u;
    let inv_cols = 1.0 / f32(p.cols);
    var ws: array<vec4<f32>, PER>;
    var bs: array<vec4<f32>, PER>;
    for (var k = 0u; k < PER; k++) {
        let j = lid + k * WG;
        if (j < c4) {
            ws[k] = ld_w(j);
            if (layer) {
                bs[k] = ld_b(j);
            }
        }
    }
    let last = min(p.rows, first + ROWS);
    for (var row = first; row < last; row++) {
        let base = row * p.cols;
        var xs: array<vec4<f32>, PER>;
        var acc = 0.0;
        for (var k = 0u; k < PER; k++) {
            let j = lid + k * WG;
            var v = vec4<f32>(0.0);
            if (j < c4) {
                v = ld_x(base, j);
            }
            xs[k] = v;
            acc += select(dot(v, v), hsum(v), layer);
        }
        var mean = 0.0;
        var rstd = 0.0;
        if (layer) {
            mean = sum_a(lid, acc) * inv_cols;
            var m2 = 0.0;
            for (var k = 0u; k < PER; k++) {
                let j = lid + k * WG;
                if (j < c4) {
                    let d = select(vec4<f32>(0.0), xs[k] - mean, lanes(j));
                    m2 += dot(d, d);
                }
            }
            // red_b here keeps red_a's readers (above) apart from the next row's writers.
            rstd = inverseSqrt(sum_b(lid, m2) * inv_cols + p.eps);
        } else if ((row & 1u) == 0u) {
            rstd = inverseSqrt(sum_a(lid, acc) * inv_cols + p.eps);
        } else {
            rstd = inverseSqrt(sum_b(lid, acc) * inv_cols + p.eps);
        }
        for (var k = 0u; k < PER; k++) {
            let j = lid + k * WG;
            if (j < c4) {
                var y = (xs[k] - mean) * rstd * ws[k];
                if (layer) {
                    y += bs[k];
                }
                st_y(base, j, y);
            }
        }
        if (lid == 0u) {
            frstd[row] = rstd;
            if (layer) {
                fmean[row] = mean;
            }
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
    let layer = p.mode == 1u;
    let rstd = brstd[row];
    var mean = 0.0;
    if (layer) {
        mean = bmean[row];
    }
    // g = dy * w; sums of g and of g * xhat, xhat = (x - mean) * rstd.
    var sg = 0.0;
    var sgx = 0.0;
    for (var j = lid; j < c4; j += WG) {
        let g = ld_dy(base, j) * ld_w(j);
        let xhat = (ld_x(base, j) - mean) * rstd;
        sg += hsum(g);
        sgx += dot(g, xhat);
    }
    let sums = wg_sum2(lid, sg, sgx) / f32(p.cols);
    // LayerNorm: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)); RMSNorm drops mean(g).
    let mg = select(0.0, sums.x, layer);
    for (var j = lid; j < c4; j += WG) {
        let g = ld_dy(base, j) * ld_w(j);
        let xhat = (ld_x(base, j) - mean) * rstd;
        st_dx(base, j, rstd * (g - mg - xhat * sums.y));
    }
}

// ---- column kernel: partial dweight (and dbias) sums over a segment of rows.
// dw[s, c] = sum_r dy[r, c] * xhat[r, c], db[s, c] = sum_r dy[r, c], r in segment s.
@group(0) @binding(1) var<storage, read> cx: array<f32>;
@group(0) @binding(2) var<storage, read> cdy: array<f32>;
@group(0) @binding(3) var<storage, read> cmean: array<f32>;
@group(0) @binding(4) var<storage, read> crstd: array<f32>;
@group(0) @binding(5) var<storage, read_write> cdw: array<f32>;
@group(0) @binding(6) var<storage, read_write> cdb: array<f32>;

@compute @workgroup_size(WG)
fn dweight(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let c = wid.x * WG + lid;
    let s = wid.y;
    if (c >= p.cols) {
        return;
    }
    let layer = p.mode == 1u;
    let r_end = min(p.rows, (s + 1u) * p.seg);
    var dw = 0.0;
    var db = 0.0;
    for (var r = s * p.seg; r < r_end; r++) {
        let dy = cdy[r * p.cols + c];
        var xc = cx[r * p.cols + c];
        if (layer) {
            xc -= cmean[r];
        }
        dw += dy * xc * crstd[r];
        db += dy;
    }
    cdw[s * p.cols + c] = dw;
    if (layer) {
        cdb[s * p.cols + c] = db;
    }
}
