// T5 relative position bias (HF `_relative_position_bucket` + bucket embedding), fwd and bwd.
//   table:  [NB, H] row-major (nn.Embedding(num_buckets, n_heads).weight)
//   bias:   [H, TQ, TK] row-major, bias[h, i, j] = table[bucket(k_pos[j] - q_pos[i]), h]
//   q_pos:  [TQ] i32, k_pos: [TK] i32
//   lut:    [LUT] u32, bucket of |relative distance| n < LUT within one half (see relbias.rs);
//           n >= LUT maps to the last bucket of the half.
// Folded 1-D grids: idx = (wid.y * gx + wid.x) * WG + lid.x.

struct Params {
    heads: u32,
    tq: u32,
    tk: u32,
    nb: u32,
    bidirectional: u32,
    lut_len: u32,
    gx: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// relbias_fwd
@group(0) @binding(1) var<storage, read> table: array<f32>;
@group(0) @binding(2) var<storage, read> q_pos: array<i32>;
@group(0) @binding(3) var<storage, read> k_pos: array<i32>;
@group(0) @binding(4) var<storage, read> lut: array<u32>;
@group(0) @binding(5) var<storage, read_write> bias: array<f32>;
// relbias_bwd_rows: dbias [H, TQ, TK] -> partial [H, TQ, NB]
@group(0) @binding(1) var<storage, read> dbias: array<f32>;
@group(0) @binding(5) var<storage, read_write> partial: array<f32>;
// relbias_bwd_table: partial [H, TQ, NB] -> dtable [NB, H]
@group(0) @binding(1) var<storage, read> partial_in: array<f32>;
@group(0) @binding(2) var<storage, read_write> dtable: array<f32>;

fn bucket(rel: i32) -> u32 {
    var off = 0u;
    var nbh = p.nb;
    var n: i32;
    if (p.bidirectional != 0u) {
        nbh = p.nb / 2u;
        off = select(0u, nbh, rel > 0);
        n = abs(rel);
    } else {
        n = max(-rel, 0);
    }
    let un = u32(n);
    return off + select(nbh - 1u, lut[min(un, p.lut_len - 1u)], un < p.lut_len);
}

fn flat(wid: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wid.y * p.gx + wid.x) * WG + lid.x;
}

// One invocation per bias element.
@compute @workgroup_size(WG)
fn relbias_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let e = flat(wid, lid);
    if (e >= p.heads * p.tq * p.tk) {
        return;
    }
    let j = e % p.tk;
    let i = (e / p.tk) % p.tq;
    let h = e / (p.tk * p.tq);
    bias[e] = table[bucket(k_pos[j] - q_pos[i]) * p.heads + h];
}

// One invocation per (h, i): per-bucket sums over j, in j order.
@compute @workgroup_size(WG)
fn relbias_bwd_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = flat(wid, lid);
    if (r >= p.heads * p.tq) {
        return;
    }
    let i = r % p.tq;
    var acc: array<f32, MAX_BUCKETS>;
    for (var j = 0u; j < p.tk; j++) {
        let bk = min(bucket(k_pos[j] - q_pos[i]), MAX_BUCKETS - 1u);
        acc[bk] += dbias[r * p.tk + j];
    }
    for (var bk = 0u; bk < p.nb; bk++) {
        partial[r * p.nb + bk] = acc[bk];
    }
}

// One invocation per (bucket, h): sum of the row partials over i, in i order.
@compute @workgroup_size(WG)
fn relbias_bwd_table(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let e = flat(wid, lid);
    if (e >= p.nb * p.heads) {
        return;
    }
    let h = e % p.heads;
    let bk = e / p.heads;
    var acc = 0.0;
    for (var i = 0u; i < p.tq; i++) {
        acc += partial_in[(h * p.tq + i) * p.nb + bk];
    }
    dtable[e] = acc;
}
