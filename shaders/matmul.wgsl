// Matmul family: C = act(op(A) @ op(B) + bias [+ scale H Fᵀ]), plus a row-sum used for bias
// gradients and batch reductions.
//
// Layouts (row-major, per batch entry):
//   A: [M, K], or [K, M] when TRANS_A;   batch stride p.sa (0 = shared by all batches)
//   B: [K, N], or [N, K] when TRANS_B;   batch stride p.sb (0 = shared by all batches)
//      stored as f32 (bitcast from u32 words) or, when B_F16, as packed f16 pairs
//   bias: [N] (read only when p.has_bias != 0)
//   H, F: the optional low-rank (LoRA) term, see _lowrank.wgsl (bindings 5 and 6)
//   C: [batch, M, N]
//
// Compile-time constants (see src/ops/matmul.rs, `Plan`):
//   TRANS_A, TRANS_B, B_F16: bool
//   LOWRANK: bool — add p.lr_scale * H @ Fᵀ to every output before bias + activation
//   EDGE: bool — clamp loads and guard stores for shapes that are not multiples
//         of the tile (false only when M % TILE_M == 0, N % TILE_N == 0, N % 4 == 0)
//   mm_reg:   RM rows x CN vec4 columns per invocation, WG invocations along N
//   mm_tiled: TM x TN output tile per 16x16 workgroup (4x4 per invocation), TK deep
//
// Row tiles may exceed the 65535 workgroups-per-dimension limit: they are
// folded into z as (batch * p.fold + chunk), row tile = chunk * 65535 + wid.y.

//!include _act
//!include _lowrank

struct Params {
    m: u32,
    n: u32,
    k: u32,
    batch: u32,
    sa: u32,       // batch stride of A in elements (0 = broadcast)
    sb: u32,       // batch stride of B in elements (0 = broadcast)
    act: u32,      // ops::Act::code()
    has_bias: u32,
    ny: u32,       // number of row tiles
    fold: u32,     // row-tile chunks folded into z per batch entry
    lr_r: u32,     // low-rank term: rank r (LOWRANK only)
    lr_ftrans: u32, // F stored [r, N] instead of [N, r]
    lr_scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<u32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;

// B element i (flat index into the B buffer), widened to f32.
fn b_at(i: u32) -> f32 {
    if (B_F16) {
        let pair = unpack2x16float(b[i >> 1u]);
        return select(pair.x, pair.y, (i & 1u) == 1u);
    }
    return bitcast<f32>(b[i]);
}

// op(A)[m, k] of the batch entry starting at `base`.
fn a_el(base: u32, m: u32, k: u32) -> f32 {
    if (TRANS_A) {
        return a[base + k * p.m + m];
    }
    return a[base + m * p.k + k];
}

// op(B)[k, n] of the batch entry starting at `base`.
fn b_el(base: u32, k: u32, n: u32) -> f32 {
    if (TRANS_B) {
        return b_at(base + n * p.k + k);
    }
    return b_at(base + k * p.n + n);
}

// op(B)[k, n..n+4]; with EDGE, columns past N are clamped to N-1 (their results are never stored).
fn b_vec4(base: u32, k: u32, n: u32) -> vec4<f32> {
    if (!EDGE && !TRANS_B) {
        let i = base + k * p.n + n;
        if (B_F16) {
            // n and N are multiples of 4, so i is even: two packed words.
            let lo = unpack2x16float(b[i >> 1u]);
            let hi = unpack2x16float(b[(i >> 1u) + 1u]);
            return vec4<f32>(lo, hi);
        }
        return vec4<f32>(bitcast<f32>(b[i]), bitcast<f32>(b[i + 1u]), bitcast<f32>(b[i + 2u]), bitcast<f32>(b[i + 3u]));
    }
    var nn = vec4<u32>(n, n + 1u, n + 2u, n + 3u);
    if (EDGE) {
        nn = min(nn, vec4<u32>(p.n - 1u));
    }
    return vec4<f32>(b_el(base, k, nn.x), b_el(base, k, nn.y), b_el(base, k, nn.z), b_el(base, k, nn.w));
}

// Low-rank term (LOWRANK), bias + activation, then store C[row, n] (row counts across batch
// entries). Every kernel in this file stores through here, so the rank-r term joins the
// accumulated sum before the bias and activation in all of them.
fn store_out(row: u32, n: u32, v: f32) {
    var x = v;
    if (LOWRANK) {
        x += lr_at(row, n);
    }
    if (p.has_bias != 0u) {
        x += bias[n];
    }
    c[row * p.n + n] = act_fwd(x, p.act);
}

// op(A)[m, k..k+4] (k + 3 < K).
fn a_vec4(base: u32, m: u32, k: u32) -> vec4<f32> {
    if (TRANS_A) {
        return vec4<f32>(a_el(base, m, k), a_el(base, m, k + 1u), a_el(base, m, k + 2u), a_el(base, m, k + 3u));
    }
    let i = base + m * p.k + k;
    return vec4<f32>(a[i], a[i + 1u], a[i + 2u], a[i + 3u]);
}

// Store C[m, n..n+4] of the batch entry whose first row is row0, skipping
// what lies outside the matrix.
fn store4(row0: u32, m: u32, n: u32, v: vec4<f32>) {
    if (!EDGE || (m < p.m && n + 3u < p.n)) {
        store_out(row0 + m, n, v.x);
        store_out(row0 + m, n + 1u, v.y);
        store_out(row0 + m, n + 2u, v.z);
        store_out(row0 + m, n + 3u, v.w);
    } else if (m < p.m) {
        for (var q = 0u; q < 4u; q++) {
            if (n + q < p.n) {
                store_out(row0 + m, n + q, v[q]);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// mm_reg: barrier-free register blocking for CPU adapters (lavapipe).
// A workgroup covers RM rows x (WG * CN * 4) columns. Rows depend only on the
// workgroup id, so A loads are the same for every invocation of a SIMD group
// (one load, broadcast); each invocation owns CN vec4 column groups,
// interleaved across the workgroup so neighbouring lanes read neighbouring B
// columns.
// ---------------------------------------------------------------------------

const RMCN = RM * CN;

@compute @workgroup_size(WG, 1, 1)
fn mm_reg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let ty = (wid.z % p.fold) * 65535u + wid.y;
    if (ty >= p.ny) {
        return;
    }
    let bat = wid.z / p.fold;
    let a_base = bat * p.sa;
    let b_base = bat * p.sb;
    let m0 = ty * RM;
    let n_tile = wid.x * (WG * CN * 4u);

    var rows: array<u32, RM>;
    for (var r = 0u; r < RM; r++) {
        rows[r] = select(m0 + r, min(m0 + r, p.m - 1u), EDGE);
    }
    var cols: array<u32, CN>;
    for (var j = 0u; j < CN; j++) {
        cols[j] = n_tile + (j * WG + lid.x) * 4u;
    }

    var acc: array<vec4<f32>, RMCN>;
    let k4 = p.k / 4u;
    for (var kq = 0u; kq < k4; kq++) {
        let k = kq * 4u;
        var av: array<vec4<f32>, RM>;
        for (var r = 0u; r < RM; r++) {
            let m = rows[r];
            if (TRANS_A) {
                av[r] = vec4<f32>(a_el(a_base, m, k), a_el(a_base, m, k + 1u), a_el(a_base, m, k + 2u), a_el(a_base, m, k + 3u));
            } else {
                let i = a_base + m * p.k + k;
                av[r] = vec4<f32>(a[i], a[i + 1u], a[i + 2u], a[i + 3u]);
            }
        }
        for (var j = 0u; j < CN; j++) {
            let b0 = b_vec4(b_base, k, cols[j]);
            let b1 = b_vec4(b_base, k + 1u, cols[j]);
            let b2 = b_vec4(b_base, k + 2u, cols[j]);
            let b3 = b_vec4(b_base, k + 3u, cols[j]);
            for (var r = 0u; r < RM; r++) {
                let x = av[r];
                var s = acc[r * CN + j];
                s = fma(vec4<f32>(x.x), b0, s);
                s = fma(vec4<f32>(x.y), b1, s);
                s = fma(vec4<f32>(x.z), b2, s);
                s = fma(vec4<f32>(x.w), b3, s);
                acc[r * CN + j] = s;
            }
        }
    }
    // K remainder (K % 4).
    for (var k = k4 * 4u; k < p.k; k++) {
        for (var j = 0u; j < CN; j++) {
            let bv = b_vec4(b_base, k, cols[j]);
            for (var r = 0u; r < RM; r++) {
                acc[r * CN + j] = fma(vec4<f32>(a_el(a_base, rows[r], k)), bv, acc[r * CN + j]);
            }
        }
    }

    let row0 = bat * p.m;
    for (var r = 0u; r < RM; r++) {
        let m = m0 + r;
        for (var j = 0u; j < CN; j++) {
            let v = acc[r * CN + j];
            let n = cols[j];
            if (!EDGE || (m < p.m && n + 3u < p.n)) {
                store_out(row0 + m, n, v.x);
                store_out(row0 + m, n + 1u, v.y);
                store_out(row0 + m, n + 2u, v.z);
                store_out(row0 + m, n + 3u, v.w);
            } else if (m < p.m) {
                for (var q = 0u; q < 4u; q++) {
                    if (n + q < p.n) {
                        store_out(row0 + m, n + q, v[q]);
                    }
                }
            }
        }
    }
}

// mm_reg8: hand-unrolled mm_reg for RM = 8, CN = 2 (no local arrays: llvmpipe keeps
// the 16 vec4 accumulators in SSA values instead of indexed memory).
@compute @workgroup_size(WG, 1, 1)
fn mm_reg8(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let ty = (wid.z % p.fold) * 65535u + wid.y;
    if (ty >= p.ny) {
        return;
    }
    let bat = wid.z / p.fold;
    let a_base = bat * p.sa;
    let b_base = bat * p.sb;
    let m0 = ty * 8u;
    let n_tile = wid.x * (WG * 8u);
    let r0 = select(m0 + 0u, min(m0 + 0u, p.m - 1u), EDGE);
    let r1 = select(m0 + 1u, min(m0 + 1u, p.m - 1u), EDGE);
    let r2 = select(m0 + 2u, min(m0 + 2u, p.m - 1u), EDGE);
    let r3 = select(m0 + 3u, min(m0 + 3u, p.m - 1u), EDGE);
    let r4 = select(m0 + 4u, min(m0 + 4u, p.m - 1u), EDGE);
    let r5 = select(m0 + 5u, min(m0 + 5u, p.m - 1u), EDGE);
    let r6 = select(m0 + 6u, min(m0 + 6u, p.m - 1u), EDGE);
    let r7 = select(m0 + 7u, min(m0 + 7u, p.m - 1u), EDGE);
    let c0 = n_tile + (0u * WG + lid.x) * 4u;
    let c1 = n_tile + (1u * WG + lid.x) * 4u;
    var s00 = vec4<f32>(0.0);
    var s01 = vec4<f32>(0.0);
    var s10 = vec4<f32>(0.0);
    var s11 = vec4<f32>(0.0);
    var s20 = vec4<f32>(0.0);
    var s21 = vec4<f32>(0.0);
    var s30 = vec4<f32>(0.0);
    var s31 = vec4<f32>(0.0);
    var s40 = vec4<f32>(0.0);
    var s41 = vec4<f32>(0.0);
    var s50 = vec4<f32>(0.0);
    var s51 = vec4<f32>(0.0);
    var s60 = vec4<f32>(0.0);
    var s61 = vec4<f32>(0.0);
    var s70 = vec4<f32>(0.0);
    var s71 = vec4<f32>(0.0);
    let k4 = p.k / 4u;
    for (var kq = 0u; kq < k4; kq++) {
        let k = kq * 4u;
        let b00 = b_vec4(b_base, k + 0u, c0);
        let b01 = b_vec4(b_base, k + 1u, c0);
        let b02 = b_vec4(b_base, k + 2u, c0);
        let b03 = b_vec4(b_base, k + 3u, c0);
        let b10 = b_vec4(b_base, k + 0u, c1);
        let b11 = b_vec4(b_base, k + 1u, c1);
        let b12 = b_vec4(b_base, k + 2u, c1);
        let b13 = b_vec4(b_base, k + 3u, c1);
        let a0 = a_vec4(a_base, r0, k);
        s00 = fma(vec4<f32>(a0.x), b00, s00);
        s00 = fma(vec4<f32>(a0.y), b01, s00);
        s00 = fma(vec4<f32>(a0.z), b02, s00);
        s00 = fma(vec4<f32>(a0.w), b03, s00);
        s01 = fma(vec4<f32>(a0.x), b10, s01);
        s01 = fma(vec4<f32>(a0.y), b11, s01);
        s01 = fma(vec4<f32>(a0.z), b12, s01);
        s01 = fma(vec4<f32>(a0.w), b13, s01);
        let a1 = a_vec4(a_base, r1, k);
        s10 = fma(vec4<f32>(a1.x), b00, s10);
        s10 = fma(vec4<f32>(a1.y), b01, s10);
        s10 = fma(vec4<f32>(a1.z), b02, s10);
        s10 = fma(vec4<f32>(a1.w), b03, s10);
        s11 = fma(vec4<f32>(a1.x), b10, s11);
        s11 = fma(vec4<f32>(a1.y), b11, s11);
        s11 = fma(vec4<f32>(a1.z), b12, s11);
        s11 = fma(vec4<f32>(a1.w), b13, s11);
        let a2 = a_vec4(a_base, r2, k);
        s20 = fma(vec4<f32>(a2.x), b00, s20);
        s20 = fma(vec4<f32>(a2.y), b01, s20);
        s20 = fma(vec4<f32>(a2.z), b02, s20);
        s20 = fma(vec4<f32>(a2.w), b03, s20);
        s21 = fma(vec4<f32>(a2.x), b10, s21);
        s21 = fma(vec4<f32>(a2.y), b11, s21);
        s21 = fma(vec4<f32>(a2.z), b12, s21);
        s21 = fma(vec4<f32>(a2.w), b13, s21);
        let a3 = a_vec4(a_base, r3, k);
        s30 = fma(vec4<f32>(a3.x), b00, s30);
        s30 = fma(vec4<f32>(a3.y), b01, s30);
        s30 = fma(vec4<f32>(a3.z), b02, s30);
        s30 = fma(vec4<f32>(a3.w), b03, s30);
        s31 = fma(vec4<f32>(a3.x), b10, s31);
        s31 = fma(vec4<f32>(a3.y), b11, s31);
        s31 = fma(vec4<f32>(a3.z), b12, s31);
        s31 = fma(vec4<f32>(a3.w), b13, s31);
        let a4 = a_vec4(a_base, r4, k);
        s40 = fma(vec4<f32>(a4.x), b00, s40);
        s40 = fma(vec4<f32>(a4.y), b01, s40);
        s40 = fma(vec4<f32>(a4.z), b02, s40);
        s40 = fma(vec4<f32>(a4.w), b03, s40);
        s41 = fma(vec4<f32>(a4.x), b10, s41);
        s41 = fma(vec4<f32>(a4.y), b11, s41);
        s41 = fma(vec4<f32>(a4.z), b12, s41);
        s41 = fma(vec4<f32>(a4.w), b13, s41);
        let a5 = a_vec4(a_base, r5, k);
        s50 = fma(vec4<f32>(a5.x), b00, s50);
        s50 = fma(vec4<f32>(a5.y), b01, s50);
        s50 = fma(vec4<f32>(a5.z), b02, s50);
        s50 = fma(vec4<f32>(a5.w), b03, s50);
        s51 = fma(vec4<f32>(a5.x), b10, s51);
        s51 = fma(vec4<f32>(a5.y), b11, s51);
        s51 = fma(vec4<f32>(a5.z), b12, s51);
        s51 = fma(vec4<f32>(a5.w), b13, s51);
        let a6 = a_vec4(a_base, r6, k);
        s60 = fma(vec4<f32>(a6.x), b00, s60);
        s60 = fma(vec4<f32>(a6.y), b01, s60);
        s60 = fma(vec4<f32>(a6.z), b02, s60);
        s60 = fma(vec4<f32>(a6.w), b03, s60);
        s61 = fma(vec4<f32>(a6.x), b10, s61);
        s61 = fma(vec4<f32>(a6.y), b11, s61);
        s61 = fma(vec4<f32>(a6.z), b12, s61);
        s61 = fma(vec4<f32>(a6.w), b13, s61);
        let a7 = a_vec4(a_base, r7, k);
        s70 = fma(vec4<f32>(a7.x), b00, s70);
        s70 = fma(vec4<f32>(a7.y), b01, s70);
        s70 = fma(vec4<f32>(a7.z), b02, s70);
        s70 = fma(vec4<f32>(a7.w), b03, s70);
        s71 = fma(vec4<f32>(a7.x), b10, s71);
        s71 = fma(vec4<f32>(a7.y), b11, s71);
        s71 = fma(vec4<f32>(a7.z), b12, s71);
        s71 = fma(vec4<f32>(a7.w), b13, s71);
    }
    for (var k = k4 * 4u; k < p.k; k++) {
        let b0 = b_vec4(b_base, k, c0);
        let b1 = b_vec4(b_base, k, c1);
        let a0 = vec4<f32>(a_el(a_base, r0, k));
        s00 = fma(a0, b0, s00);
        s01 = fma(a0, b1, s01);
        let a1 = vec4<f32>(a_el(a_base, r1, k));
        s10 = fma(a1, b0, s10);
        s11 = fma(a1, b1, s11);
        let a2 = vec4<f32>(a_el(a_base, r2, k));
        s20 = fma(a2, b0, s20);
        s21 = fma(a2, b1, s21);
        let a3 = vec4<f32>(a_el(a_base, r3, k));
        s30 = fma(a3, b0, s30);
        s31 = fma(a3, b1, s31);
        let a4 = vec4<f32>(a_el(a_base, r4, k));
        s40 = fma(a4, b0, s40);
        s41 = fma(a4, b1, s41);
        let a5 = vec4<f32>(a_el(a_base, r5, k));
        s50 = fma(a5, b0, s50);
        s51 = fma(a5, b1, s51);
        let a6 = vec4<f32>(a_el(a_base, r6, k));
        s60 = fma(a6, b0, s60);
        s61 = fma(a6, b1, s61);
        let a7 = vec4<f32>(a_el(a_base, r7, k));
        s70 = fma(a7, b0, s70);
        s71 = fma(a7, b1, s71);
    }
    let row0 = bat * p.m;
    store4(row0, m0 + 0u, c0, s00);
    store4(row0, m0 + 0u, c1, s01);
    store4(row0, m0 + 1u, c0, s10);
    store4(row0, m0 + 1u, c1, s11);
    store4(row0, m0 + 2u, c0, s20);
    store4(row0, m0 + 2u, c1, s21);
    store4(row0, m0 + 3u, c0, s30);
    store4(row0, m0 + 3u, c1, s31);
    store4(row0, m0 + 4u, c0, s40);
    store4(row0, m0 + 4u, c1, s41);
    store4(row0, m0 + 5u, c0, s50);
    store4(row0, m0 + 5u, c1, s51);
    store4(row0, m0 + 6u, c0, s60);
    store4(row0, m0 + 6u, c1, s61);
    store4(row0, m0 + 7u, c0, s70);
    store4(row0, m0 + 7u, c1, s71);
}

// ---------------------------------------------------------------------------
// mm_tiled: shared-memory tiling for real GPUs. A 16x16 workgroup computes a
// TM x TN tile (each invocation a (TM/16) x (TN/16) block), staging TK-deep
// slices of op(A) and op(B) in workgroup memory.
// ---------------------------------------------------------------------------

const RPT = TM / 16u; // rows per invocation
const CPT = TN / 16u; // columns per invocation

var<workgroup> tile_a: array<f32, TK * TM>; // [kk][m]
var<workgroup> tile_b: array<f32, TK * TN>; // [kk][n]

@compute @workgroup_size(16, 16, 1)
fn mm_tiled(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let ty = (wid.z % p.fold) * 65535u + wid.y;
    if (ty >= p.ny) {
        return;
    }
    let bat = wid.z / p.fold;
    let a_base = bat * p.sa;
    let b_base = bat * p.sb;
    let m0 = ty * TM;
    let n0 = wid.x * TN;

    var acc: array<f32, RPT * CPT>;
    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        // Stage op(A)[m0.., k0..] and op(B)[k0.., n0..]; zero outside the matrix.
        for (var e = li; e < TK * TM; e += 256u) {
            var kk: u32;
            var mm: u32;
            if (TRANS_A) {
                // A is [K, M]: consecutive invocations read consecutive m.
                kk = e / TM;
                mm = e % TM;
            } else {
                mm = e / TK;
                kk = e % TK;
            }
            let m = m0 + mm;
            let k = k0 + kk;
            var v = 0.0;
            if (m < p.m && k < p.k) {
                v = a_el(a_base, m, k);
            }
            tile_a[kk * TM + mm] = v;
        }
        for (var e = li; e < TK * TN; e += 256u) {
            var kk: u32;
            var nn: u32;
            if (TRANS_B) {
                nn = e / TK;
                kk = e % TK;
            } else {
                kk = e / TN;
                nn = e % TN;
            }
            let n = n0 + nn;
            let k = k0 + kk;
            var v = 0.0;
            if (n < p.n && k < p.k) {
                v = b_el(b_base, k, n);
            }
            tile_b[kk * TN + nn] = v;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            var bv: array<f32, CPT>;
            for (var j = 0u; j < CPT; j++) {
                bv[j] = tile_b[kk * TN + j * 16u + lid.x];
            }
            for (var r = 0u; r < RPT; r++) {
                let av = tile_a[kk * TM + r * 16u + lid.y];
                for (var j = 0u; j < CPT; j++) {
                    acc[r * CPT + j] = fma(av, bv[j], acc[r * CPT + j]);
                }
            }
        }
        workgroupBarrier();
    }

    let row0 = bat * p.m;
    for (var r = 0u; r < RPT; r++) {
        let m = m0 + r * 16u + lid.y;
        for (var j = 0u; j < CPT; j++) {
            let n = n0 + j * 16u + lid.x;
            if (m < p.m && n < p.n) {
                store_out(row0 + m, n, acc[r * CPT + j]);
            }
        }
    }
}
