// Nearest codeword: fused distance + argmin / top-k over a codebook.
//
// x: [n, d] row-major, e: [kc, d] row-major (the codebook), enorm: [kc] = ||e_c||^2.
// out_idx / out_dist: [n, kout], each row sorted by (distance, index) ascending.
//
// The scan ranks codewords by the expanded score ||e||^2 - 2 x.e (||x||^2 is
// constant per row) with register blocking: each invocation owns RB = 4 rows
// and walks the codebook 4 codewords at a time (16 accumulators, no barriers,
// so it is fast on lavapipe and needs no shared memory for any kc or d).
// Each row keeps its TOPR best candidates by that score. The expanded form
// loses precision when ||x||^2 + ||e||^2 >> ||x - e||^2, so the candidates are
// re-ranked by the direct sum of squares sum_t (x_t - e_t)^2 before the kout
// best are written. Ties go to the lowest index (candidates are visited in
// index order and only a strictly smaller score displaces an earlier one).
//
// Compile-time constants: WG (invocations per workgroup), TOPR (candidates
// kept per row, >= kout).

struct Params {
    n: u32,
    kc: u32,
    d: u32,
    kout: u32,
    groups_x: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> e: array<f32>;
@group(0) @binding(3) var<storage, read> enorm: array<f32>;
@group(0) @binding(4) var<storage, read_write> out_idx: array<u32>;
@group(0) @binding(5) var<storage, read_write> out_dist: array<f32>;

const RB = 4u;
const NONE = 0xffffffffu;
const BIG = 3.4e38;

// Candidate lists of the RB rows, each sorted ascending by (score, index):
// row r occupies [r * TOPR, (r + 1) * TOPR).
var<private> cs: array<f32, 4u * TOPR>;
var<private> ci: array<u32, 4u * TOPR>;

fn insert(r: u32, s: f32, idx: u32) {
    let base = r * TOPR;
    // NaN scores fail this test and are never kept.
    if (!(s < cs[base + TOPR - 1u])) {
        return;
    }
    var j = TOPR - 1u;
    loop {
        if (j == 0u) { break; }
        let prev = cs[base + j - 1u];
        if (!(s < prev)) { break; }
        cs[base + j] = prev;
        ci[base + j] = ci[base + j - 1u];
        j = j - 1u;
    }
    cs[base + j] = s;
    ci[base + j] = idx;
}

// Offer codewords c0..c0+3 (scores s) to row r's list; returns its new threshold.
fn consider(r: u32, s: vec4<f32>, c0: u32) -> f32 {
    insert(r, s.x, c0);
    if (c0 + 1u < p.kc) { insert(r, s.y, c0 + 1u); }
    if (c0 + 2u < p.kc) { insert(r, s.z, c0 + 2u); }
    if (c0 + 3u < p.kc) { insert(r, s.w, c0 + 3u); }
    return cs[r * TOPR + TOPR - 1u];
}

fn direct_dist(row: u32, code: u32) -> f32 {
    var acc = 0.0;
    let xo = row * p.d;
    let eo = code * p.d;
    for (var t = 0u; t < p.d; t = t + 1u) {
        let diff = x[xo + t] - e[eo + t];
        acc = acc + diff * diff;
    }
    return acc;
}

// Argmin fast path (TOPR == 4): each row's 4 best (score, index) live in
// registers, updated by a branchless sorted insert, so SIMD lanes never
// diverge in the hot loop (dynamic indexing of private arrays is slow on
// CPU drivers). Larger TOPR (top-k) uses the cs/ci lists with a threshold.
var<private> bs0: vec4<f32>;
var<private> bs1: vec4<f32>;
var<private> bs2: vec4<f32>;
var<private> bs3: vec4<f32>;
var<private> bi0: vec4<u32>;
var<private> bi1: vec4<u32>;
var<private> bi2: vec4<u32>;
var<private> bi3: vec4<u32>;
// Insertion threshold (current worst kept score) of each row, TOPR > 4.
var<private> thr: vec4<f32>;

fn one(b: ptr<private, vec4<f32>>, bi: ptr<private, vec4<u32>>, s: f32, c: u32) {
    let bv = *b;
    let iv = *bi;
    let lt = vec4<f32>(s) < bv;
    let ltp = vec4<bool>(false, lt.x, lt.y, lt.z);
    *b = select(bv, select(vec4<f32>(s), vec4<f32>(s, bv.x, bv.y, bv.z), ltp), lt);
    *bi = select(iv, select(vec4<u32>(c), vec4<u32>(c, iv.x, iv.y, iv.z), ltp), lt);
}

fn offer4(b: ptr<private, vec4<f32>>, bi: ptr<private, vec4<u32>>, s: vec4<f32>, c0: u32) {
    one(b, bi, s.x, c0);
    one(b, bi, s.y, c0 + 1u);
    one(b, bi, s.z, c0 + 2u);
    one(b, bi, s.w, c0 + 3u);
}

fn start_lists() {
    for (var i = 0u; i < 4u * TOPR; i = i + 1u) {
        cs[i] = BIG;
        ci[i] = NONE;
    }
    bs0 = vec4<f32>(BIG);
    bs1 = vec4<f32>(BIG);
    bs2 = vec4<f32>(BIG);
    bs3 = vec4<f32>(BIG);
    bi0 = vec4<u32>(NONE);
    bi1 = vec4<u32>(NONE);
    bi2 = vec4<u32>(NONE);
    bi3 = vec4<u32>(NONE);
    thr = vec4<f32>(BIG);
}

// Offer codewords c0..c0+3 with scores s_r (row r) to the 4 rows' lists.
fn offer_all(s0: vec4<f32>, s1: vec4<f32>, s2: vec4<f32>, s3: vec4<f32>, c0: u32) {
    if (TOPR == 4u) {
        let valid = vec4<u32>(c0, c0 + 1u, c0 + 2u, c0 + 3u) < vec4<u32>(p.kc);
        let big = vec4<f32>(BIG);
        offer4(&bs0, &bi0, select(big, s0, valid), c0);
        offer4(&bs1, &bi1, select(big, s1, valid), c0);
        offer4(&bs2, &bi2, select(big, s2, valid), c0);
        offer4(&bs3, &bi3, select(big, s3, valid), c0);
    } else {
        if (any(s0 < vec4<f32>(thr.x))) { thr.x = consider(0u, s0, c0); }
        if (any(s1 < vec4<f32>(thr.y))) { thr.y = consider(1u, s1, c0); }
        if (any(s2 < vec4<f32>(thr.z))) { thr.z = consider(2u, s2, c0); }
        if (any(s3 < vec4<f32>(thr.w))) { thr.w = consider(3u, s3, c0); }
    }
}

fn store_row(r: u32, b: vec4<f32>, bi: vec4<u32>) {
    cs[r * TOPR] = b.x;
    cs[r * TOPR + 1u] = b.y;
    cs[r * TOPR + 2u] = b.z;
    cs[r * TOPR + 3u] = b.w;
    ci[r * TOPR] = bi.x;
    ci[r * TOPR + 1u] = bi.y;
    ci[r * TOPR + 2u] = bi.z;
    ci[r * TOPR + 3u] = bi.w;
}

// Move the register lists into cs/ci (argmin path) before the re-rank.
fn finish_lists() {
    if (TOPR == 4u) {
        store_row(0u, bs0, bi0);
        store_row(1u, bs1, bi1);
        store_row(2u, bs2, bi2);
        store_row(3u, bs3, bi3);
    }
}

// Sort row's candidate list by (distance, index) and write the kout best.
fn sort_and_write(row: u32, base: u32) {
    // Insertion sort by (distance, index).
    for (var m = 1u; m < TOPR; m = m + 1u) {
        let sv = cs[base + m];
        let si = ci[base + m];
        var j = m;
        loop {
            if (j == 0u) { break; }
            let pv = cs[base + j - 1u];
            let pi = ci[base + j - 1u];
            if (!(sv < pv || (sv == pv && si < pi))) { break; }
            cs[base + j] = pv;
            ci[base + j] = pi;
            j = j - 1u;
        }
        cs[base + j] = sv;
        ci[base + j] = si;
    }
    for (var m = 0u; m < p.kout; m = m + 1u) {
        out_idx[row * p.kout + m] = ci[base + m];
        out_dist[row * p.kout + m] = cs[base + m];
    }
}

@compute @workgroup_size(WG)
fn scan(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let group = wid.y * p.groups_x + wid.x;
    let row0 = (group * WG + lid) * RB;
    if (row0 >= p.n) {
        return;
    }
    start_lists();
    // Rows past n are clamped for loads and never written.
    let last = p.n - 1u;
    let x0 = min(row0, last) * p.d;
    let x1 = min(row0 + 1u, last) * p.d;
    let x2 = min(row0 + 2u, last) * p.d;
    let x3 = min(row0 + 3u, last) * p.d;
    let klast = p.kc - 1u;
    for (var c0 = 0u; c0 < p.kc; c0 = c0 + 4u) {
        let e0 = min(c0, klast) * p.d;
        let e1 = min(c0 + 1u, klast) * p.d;
        let e2 = min(c0 + 2u, klast) * p.d;
        let e3 = min(c0 + 3u, klast) * p.d;
        var a0 = vec4<f32>(0.0);
        var a1 = vec4<f32>(0.0);
        var a2 = vec4<f32>(0.0);
        var a3 = vec4<f32>(0.0);
        for (var t = 0u; t < p.d; t = t + 1u) {
            let ev = vec4<f32>(e[e0 + t], e[e1 + t], e[e2 + t], e[e3 + t]);
            a0 = fma(vec4<f32>(x[x0 + t]), ev, a0);
            a1 = fma(vec4<f32>(x[x1 + t]), ev, a1);
            a2 = fma(vec4<f32>(x[x2 + t]), ev, a2);
            a3 = fma(vec4<f32>(x[x3 + t]), ev, a3);
        }
        let en = vec4<f32>(enorm[min(c0, klast)], enorm[min(c0 + 1u, klast)],
                           enorm[min(c0 + 2u, klast)], enorm[min(c0 + 3u, klast)]);
        let s0 = en - 2.0 * a0;
        let s1 = en - 2.0 * a1;
        let s2 = en - 2.0 * a2;
        let s3 = en - 2.0 * a3;
        offer_all(s0, s1, s2, s3, c0);
    }
    finish_lists();
    // Re-rank each row's candidates by the direct distance, write the kout best.
    for (var r = 0u; r < RB; r = r + 1u) {
        let row = row0 + r;
        if (row >= p.n) {
            break;
        }
        let base = r * TOPR;
        for (var m = 0u; m < TOPR; m = m + 1u) {
            if (ci[base + m] == NONE) {
                cs[base + m] = BIG;
            } else {
                cs[base + m] = direct_dist(row, ci[base + m]);
            }
        }
        sort_and_write(row, base);
    }
}

// Codeword squared norms: sq_out[c] = ||sq_in[c, :]||^2 for c < p.kc, rows of p.d.
@group(0) @binding(1) var<storage, read> sq_in: array<f32>;
@group(0) @binding(2) var<storage, read_write> sq_out: array<f32>;

@compute @workgroup_size(WG)
fn sqnorm(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    if (c >= p.kc) {
        return;
    }
    var acc = 0.0;
    for (var t = 0u; t < p.d; t = t + 1u) {
        let v = sq_in[c * p.d + t];
        acc = fma(v, v, acc);
    }
    sq_out[c] = acc;
}

// Full squared-distance matrix by the direct form (exact to f32 rounding):
// pw_out[i, c] = sum_t (x[i, t] - e[c, t])^2, out: [n, kc]. One invocation per
// (row, codeword), 8x8 workgroups over (codeword, row).
@group(0) @binding(3) var<storage, read_write> pw_out: array<f32>;

@compute @workgroup_size(8, 8)
fn pairwise(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let row = gid.y;
    if (c >= p.kc || row >= p.n) {
        return;
    }
    pw_out[row * p.kc + c] = direct_dist(row, c);
}

// ---- scan4: the same scan for d % 4 == 0 with vec4 loads along d
// (x4: [n, d/4], e4: [kc, d/4]); 16 dot products per 8 vec4 loads.
@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> e4: array<vec4<f32>>;

fn direct_dist4(row: u32, code: u32, d4: u32) -> f32 {
    var acc = vec4<f32>(0.0);
    for (var t = 0u; t < d4; t = t + 1u) {
        let diff = x4[row * d4 + t] - e4[code * d4 + t];
        acc = fma(diff, diff, acc);
    }
    return (acc.x + acc.y) + (acc.z + acc.w);
}

@compute @workgroup_size(WG)
fn scan4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let group = wid.y * p.groups_x + wid.x;
    let row0 = (group * WG + lid) * RB;
    if (row0 >= p.n) {
        return;
    }
    start_lists();
    let d4 = p.d / 4u;
    let last = p.n - 1u;
    let x0 = min(row0, last) * d4;
    let x1 = min(row0 + 1u, last) * d4;
    let x2 = min(row0 + 2u, last) * d4;
    let x3 = min(row0 + 3u, last) * d4;
    let klast = p.kc - 1u;
    for (var c0 = 0u; c0 < p.kc; c0 = c0 + 4u) {
        let e0 = min(c0, klast) * d4;
        let e1 = min(c0 + 1u, klast) * d4;
        let e2 = min(c0 + 2u, klast) * d4;
        let e3 = min(c0 + 3u, klast) * d4;
        var a0 = vec4<f32>(0.0);
        var a1 = vec4<f32>(0.0);
        var a2 = vec4<f32>(0.0);
        var a3 = vec4<f32>(0.0);
        for (var t = 0u; t < d4; t = t + 1u) {
            let f0 = e4[e0 + t];
            let f1 = e4[e1 + t];
            let f2 = e4[e2 + t];
            let f3 = e4[e3 + t];
            let y0 = x4[x0 + t];
            let y1 = x4[x1 + t];
            let y2 = x4[x2 + t];
            let y3 = x4[x3 + t];
            a0 = a0 + vec4<f32>(dot(y0, f0), dot(y0, f1), dot(y0, f2), dot(y0, f3));
            a1 = a1 + vec4<f32>(dot(y1, f0), dot(y1, f1), dot(y1, f2), dot(y1, f3));
            a2 = a2 + vec4<f32>(dot(y2, f0), dot(y2, f1), dot(y2, f2), dot(y2, f3));
            a3 = a3 + vec4<f32>(dot(y3, f0), dot(y3, f1), dot(y3, f2), dot(y3, f3));
        }
        let en = vec4<f32>(enorm[min(c0, klast)], enorm[min(c0 + 1u, klast)],
                           enorm[min(c0 + 2u, klast)], enorm[min(c0 + 3u, klast)]);
        let s0 = en - 2.0 * a0;
        let s1 = en - 2.0 * a1;
        let s2 = en - 2.0 * a2;
        let s3 = en - 2.0 * a3;
        offer_all(s0, s1, s2, s3, c0);
    }
    finish_lists();
    for (var r = 0u; r < RB; r = r + 1u) {
        let row = row0 + r;
        if (row >= p.n) {
            break;
        }
        let base = r * TOPR;
        for (var m = 0u; m < TOPR; m = m + 1u) {
            if (ci[base + m] == NONE) {
                cs[base + m] = BIG;
            } else {
                cs[base + m] = direct_dist4(row, ci[base + m], d4);
            }
        }
        sort_and_write(row, base);
    }
}
