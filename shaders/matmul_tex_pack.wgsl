// Operand packing for mm_tex (shaders/matmul_tex.wgsl, the CPU-adapter matmul): copies A or
// B from a storage buffer into an rgba32float texture used as a linear array of vec4 texels,
// texel i at (i % 1024, i / 1024), with zero padding so that mm_tex needs no bounds checks
// on its loads. Why textures: llvmpipe lowers every storage-buffer load to a per-lane loop,
// while a storage-texture load is straight-line SIMD code (see matmul_tex.wgsl).
//
// pack_a: texel ((ba * p.mp + r) * p.kp4 + q) = A[ba][r, 4q .. 4q + 4]
//   (A[ba] is [M, K] row-major, or [K, M] with TRANS = true), zero where r >= M or k >= K.
//   ba < p.batches (1 when A is shared across the batch); batch stride p.stride elements.
// pack_b: texel (((bb * p.ns + s) * p.kp + k) * 16 + t) = B[bb][k, 4 (16 s + t) .. + 4]
//   (B[bb] is [K, N] row-major, or [N, K] with TRANS = true): 16-texel (64-column) panels,
//   each stored as kp contiguous rows, zero where k >= K or column >= N.
// F16 = true: the source holds f16 pairs in u32 words (widened with unpack2x16float).
// LOWRANK = true: the low-rank term scale * H Fᵀ (see _lowrank.wgsl) rides along the K loop of
//   mm_tex as r extra K steps, so it lands in the same accumulators: pack_a appends H's r
//   columns to each row of A ([M, K] -> [M, K + r], H row = ba * M + r, so a shared A is
//   packed once per batch entry), pack_b appends r rows scale * Fᵀ below B ([K + r, N]); F is
//   [N, r] (or [r, N] with p.ext_trans), shared by all batch entries. Source: binding 3.
// One invocation per texel; p.total texels; grid folded into x and y (p.grid_x along x).

struct Params {
    rows: u32,    // pack_a: M; pack_b: K
    cols: u32,    // pack_a: K; pack_b: N
    mp: u32,      // pack_a: padded rows per batch entry; pack_b: panels per batch entry (ns)
    kp4: u32,     // pack_a: texels per row (K padded / 4); pack_b: padded K (kp)
    stride: u32,  // source batch stride in elements
    total: u32,   // texels to write
    grid_x: u32,
    ext: u32,       // LOWRANK: rank r
    ext_trans: u32, // pack_b: F stored [r, N]
    ext_scale: f32, // pack_b: scale
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var dst: texture_storage_2d<rgba32float, write>;
@group(0) @binding(3) var<storage, read> ext: array<f32>;

// Element e of the source as f32.
fn elem(e: u32) -> f32 {
    if (F16) {
        let w = unpack2x16float(src[e >> 1u]);
        return select(w.x, w.y, (e & 1u) == 1u);
    }
    return bitcast<f32>(src[e]);
}

// Source element of logical [row, col] in batch entry ba, or 0 outside the matrix.
// Logical layout is [rows, cols]; TRANS stores it as [cols, rows].
fn at(ba: u32, row: u32, col: u32) -> f32 {
    if (row >= p.rows || col >= p.cols) {
        return 0.0;
    }
    let off = ba * p.stride;
    if (TRANS) {
        return elem(off + col * p.rows + row);
    }
    return elem(off + row * p.cols + col);
}

// Four consecutive logical columns c0 .. c0 + 3 of row `row`.
fn at4(ba: u32, row: u32, c0: u32) -> vec4<f32> {
    return vec4<f32>(at(ba, row, c0), at(ba, row, c0 + 1u), at(ba, row, c0 + 2u), at(ba, row, c0 + 3u));
}

// pack_a with LOWRANK: [A | H][row, col] (H[ba * M + row, col - K] past column K).
fn at_a(ba: u32, row: u32, col: u32) -> f32 {
    let j = col - p.cols;
    if (col >= p.cols && j < p.ext && row < p.rows) {
        return ext[(ba * p.rows + row) * p.ext + j];
    }
    return at(ba, row, col);
}

// pack_b with LOWRANK: [B ; scale Fᵀ][k, n] (scale F[n, k - K] past row K).
fn at_b(bb: u32, k: u32, n: u32) -> f32 {
    let j = k - p.rows;
    if (k >= p.rows && j < p.ext && n < p.cols) {
        if (p.ext_trans != 0u) {
            return p.ext_scale * ext[j * p.cols + n];
        }
        return p.ext_scale * ext[n * p.ext + j];
    }
    return at(bb, k, n);
}

fn texel(i: u32) -> vec2<u32> {
    return vec2<u32>(i & 1023u, i >> 10u);
}

@compute @workgroup_size(64, 1, 1)
fn pack_a(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.y * p.grid_x + wid.x) * 64u + lid.x;
    if (i >= p.total) {
        return;
    }
    let q = i % p.kp4;
    let rr = i / p.kp4;
    let r = rr % p.mp;
    let ba = rr / p.mp;
    if (LOWRANK) {
        let c = 4u * q;
        textureStore(dst, texel(i), vec4<f32>(at_a(ba, r, c), at_a(ba, r, c + 1u), at_a(ba, r, c + 2u), at_a(ba, r, c + 3u)));
        return;
    }
    textureStore(dst, texel(i), at4(ba, r, 4u * q));
}

@compute @workgroup_size(64, 1, 1)
fn pack_b(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.y * p.grid_x + wid.x) * 64u + lid.x;
    if (i >= p.total) {
        return;
    }
    let t = i % 16u;
    let kk = (i / 16u) % p.kp4;
    let ss = i / (16u * p.kp4);
    let s = ss % p.mp;
    let bb = ss / p.mp;
    let c = 4u * (16u * s + t);
    if (LOWRANK) {
        textureStore(dst, texel(i), vec4<f32>(at_b(bb, kk, c), at_b(bb, kk, c + 1u), at_b(bb, kk, c + 2u), at_b(bb, kk, c + 3u)));
        return;
    }
    textureStore(dst, texel(i), at4(bb, kk, c));
}
