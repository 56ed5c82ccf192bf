// Fused attention, the variant for CPU adapters (lavapipe): a workgroup is one 8-lane subgroup
// (WG = 8), and llvmpipe turns every storage load into a per-lane loop even when all lanes read
// the same address. The lanes all need the same key (or query) row, so each lane loads every
// eighth vec4 of it and subgroupBroadcast (a register extract on llvmpipe) hands the pieces to
// all lanes: 8x fewer load instructions per row. Needs subgroups of exactly 8 lanes (the
// launcher checks the adapter). Kernels: _attention.wgsl; launchers: src/ops/attention.rs.

//!include _attention

const LANES = 8u;
// vec4 pieces of a row per lane.
const PIECES = (DH4 + LANES - 1u) / LANES;

// x of lane l (l uniform; subgroupBroadcast needs a constant lane).
fn bcast(x: vec4<f32>, l: u32) -> vec4<f32> {
    switch l {
        case 0u: { return subgroupBroadcast(x, 0u); }
        case 1u: { return subgroupBroadcast(x, 1u); }
        case 2u: { return subgroupBroadcast(x, 2u); }
        case 3u: { return subgroupBroadcast(x, 3u); }
        case 4u: { return subgroupBroadcast(x, 4u); }
        case 5u: { return subgroupBroadcast(x, 5u); }
        case 6u: { return subgroupBroadcast(x, 6u); }
        default: { return subgroupBroadcast(x, 7u); }
    }
}

// Element d of the row was loaded by lane d % LANES as its piece d / LANES.
fn share(part: array<vec4<f32>, PIECES>) -> array<vec4<f32>, DH4> {
    var r: array<vec4<f32>, DH4>;
    for (var d = 0u; d < DH4; d++) {
        r[d] = bcast(part[d / LANES], d % LANES);
    }
    return r;
}

fn fetch_q(base: u32, lane: u32) -> array<vec4<f32>, DH4> {
    var part: array<vec4<f32>, PIECES>;
    for (var t = 0u; t < PIECES; t++) {
        part[t] = q[base + min(t * LANES + lane, DH4 - 1u)];
    }
    return share(part);
}

fn fetch_k(base: u32, lane: u32) -> array<vec4<f32>, DH4> {
    var part: array<vec4<f32>, PIECES>;
    for (var t = 0u; t < PIECES; t++) {
        part[t] = k[base + min(t * LANES + lane, DH4 - 1u)];
    }
    return share(part);
}

fn fetch_v(base: u32, lane: u32) -> array<vec4<f32>, DH4> {
    var part: array<vec4<f32>, PIECES>;
    for (var t = 0u; t < PIECES; t++) {
        part[t] = v[base + min(t * LANES + lane, DH4 - 1u)];
    }
    return share(part);
}

fn fetch_do(base: u32, lane: u32) -> array<vec4<f32>, DH4> {
    var part: array<vec4<f32>, PIECES>;
    for (var t = 0u; t < PIECES; t++) {
        part[t] = g_do[base + min(t * LANES + lane, DH4 - 1u)];
    }
    return share(part);
}
