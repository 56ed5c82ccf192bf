// Matmul family: C = act(op(A) @ op(B) + bias), plus a row-sum used for bias
// gradients and batch reductions.
//
// Layouts (row-major, per batch entry):
//   A: [M, K], or [K, M] when TRANS_A;   batch stride p.sa (0 = shared by all batches)
//   B: [K, N], or [N, K] when TRANS_B;   batch stride p.sb (0 = shared by all batches)
//      stored as f32 (bitcast from u32 words) or, when B_F16, as packed f16 pairs
//   bias: [N] (read only when p.has_bias != 0)
//   C: [batch, M, N]
//
// Compile-time constants (see src/ops/matmul.rs, `Plan`):
//   TRANS_A, TRANS_B, B_F16: bool
//   EDGE: bool — clamp loads and guard stores for shapes that are not multiples
//         of the tile (false only when M % TILE_M == 0, N % TILE_N == 0, N % 4 == 0)
//   mm_reg:   RM rows x CN vec4 columns per invocation, WG invocations along N
//   mm_tiled: TM x TN output tile per 16x16 workgroup (4x4 per invocation), TK deep
//
// Row tiles may exceed the 65535 workgroups-per-dimension limit: they are
// folded into z as (batch * p.fold + chunk), row tile = chunk * 65535 + wid.y.

//!include _act

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

// Bias + activation, then store C[row, n] (row counts across batch entries).
fn store_out(row: u32, n: u32, v: f32) {
    var x = v;
    if (p.has_bias != 0u) {
        x += bias[n];
    }
    c[row * p.n + n] = act_fwd(x, p.act);
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
