// Low-rank term fused into the matmul epilogues (LoRA): scale * (H @ Fᵀ)[row, n], added to the
// accumulator before bias + activation. (Include with `//!include _lowrank`; used by
// matmul.wgsl and the generated matmul_sg.wgsl. The texture path, mm_tex, needs no epilogue:
// matmul_tex_pack.wgsl packs the term into its operands as r extra K steps.)
// Cost per output vec4: r loads of H and 4 r of F. Unlike the K loop's loads these are not
// shared across a tile, so for small K they are not negligible (not measured separately).
//   H: [rows of C, r] f32 row-major (row = batch entry * M + m, the output row)
//   F: [N, r] f32 row-major, or [r, N] when p.lr_ftrans != 0 (shared by every batch entry)
// The including shader defines `const LOWRANK: bool` (false: the term is compiled out, the two
// bindings stay declared and are bound to a dummy buffer) and has a uniform `p` with fields
// n: u32, lr_r: u32 (1 ..= 64), lr_ftrans: u32, lr_scale: f32.
// Callers only ask for rows < batch * M; columns are clamped to N - 1 (as the kernels' B loads).

@group(0) @binding(5) var<storage, read> lr_h: array<f32>;
@group(0) @binding(6) var<storage, read> lr_f: array<f32>;

// F[n, j] (F as [N, r]).
fn lr_f_at(n: u32, j: u32) -> f32 {
    if (p.lr_ftrans != 0u) {
        return lr_f[j * p.n + n];
    }
    return lr_f[n * p.lr_r + j];
}

// scale * sum_j H[row, j] F[n, j]
fn lr_at(row: u32, n: u32) -> f32 {
    let hb = row * p.lr_r;
    var s = 0.0;
    for (var j = 0u; j < p.lr_r; j++) {
        s = fma(lr_h[hb + j], lr_f_at(n, j), s);
    }
    return p.lr_scale * s;
}

// The term for columns n .. n + 3 of one row (columns past N read column N - 1).
fn lr_vec4(row: u32, n: u32) -> vec4<f32> {
    let nn = min(vec4<u32>(n, n + 1u, n + 2u, n + 3u), vec4<u32>(p.n - 1u));
    let hb = row * p.lr_r;
    var s = vec4<f32>(0.0);
    for (var j = 0u; j < p.lr_r; j++) {
        let f = vec4<f32>(lr_f_at(nn.x, j), lr_f_at(nn.y, j), lr_f_at(nn.z, j), lr_f_at(nn.w, j));
        s = fma(vec4<f32>(lr_h[hb + j]), f, s);
    }
    return p.lr_scale * s;
}
