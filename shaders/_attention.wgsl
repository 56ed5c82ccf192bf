// Fused attention (flash-attention style online softmax), forward and backward.
// See src/ops/attention.rs for the mask encoding and the launchers.
//
// Layouts (row-major, f32):
//   q, o, dO, dq:    [B, HQ, TQ, DH]      (read as vec4: DH is a multiple of 4)
//   k, v, dk, dv:    [B, HKV, TK, DH]     (HQ = G * HKV, grouped-query attention)
//   bias, dbias:     [HQ, TQ, TK]         (additive logit bias, shared over the batch)
//   lse:             [B, HQ, TQ]          (natural-log sum of exp of the visible logits)
//   stats:           [B, HQ, TQ] vec2     (lse, delta = sum(dO * O)) for the backward
//   ds:              [B, HQ, TQ, TK]      (d loss / d logit; only when the bias gradient is wanted)
//   meta (i32):      [MB, TQ + TK, 2]     per token (segment, position): the TQ query tokens first,
//                                          then the TK key tokens; MB = 1 (shared) or B.
//                                          segment < 0 marks padding.
//
// Logit: s[i, j] = scale * q_i . k_j + bias[h, i, j], kept iff visible(query i, key j).
//
// Compile-time constants: DH (head dim, multiple of 4, <= 128), QB (query rows per invocation),
// KB (keys per invocation in the dk/dv kernel), WG (workgroup size).
// Every kernel is barrier-free: each invocation keeps its rows (or keys) in registers; lavapipe
// punishes barriers and rewards register blocking.
//
// This body is included by attention.wgsl (rows fetched by each invocation) and attention_sg.wgsl
// (CPU adapters: the 8 lanes of a subgroup fetch a row together and share it), which define
// fetch_q/fetch_k/fetch_v/fetch_do(base, lane) -> one DH-row. All invocations of a workgroup work
// on the same (b, kv head) and fetch the same key rows (and, in dk/dv, the same query rows), so
// every fetch happens in control flow that is uniform over the workgroup: invocations past the
// last row do not return early but compute on a clamped row and store nothing.

const DH4 = DH / 4u;
// Running max before any visible key; finite so exp(m - m_new) is 0, not NaN.
const NEG_INIT = -1.0e30;
// lse of a row with no visible key.
const LSE_EMPTY = -3.4028235e38;

// Relations between a query token and a key token (see visible()).
const REL_NONE = 0u;
const REL_ALL = 1u;
const REL_CAUSAL = 2u; // key pos <= query pos
const REL_SELF = 3u;   // key pos == query pos
const REL_BEFORE = 4u; // key pos <  query pos

struct Params {
    batch: u32,
    hq: u32,
    hkv: u32,
    tq: u32,
    tk: u32,
    // i32 words between batch rows of meta: 0 (shared) or 2 * (TQ + TK).
    meta_bstride: u32,
    // 0 full, 1 causal, 2 set (SETRec), 3 ordered segments, 4 segment table.
    kind: u32,
    has_bias: u32,
    scale: f32,
    // kind 3: relation used when the key's segment is <, == or > the query's.
    rel_earlier: u32,
    rel_same: u32,
    rel_later: u32,
    // kind 4: relation table[qseg * 16 + kseg], 4 bits per entry, 8 entries per u32.
    table: array<vec4<u32>, 8>,
    // grid width in workgroups for the 1-D kernels (folded grids)
    gx: u32,
    write_ds: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// attn_fwd bindings
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read> tok: array<i32>;
@group(0) @binding(6) var<storage, read_write> o: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read_write> lse: array<f32>;

// attn_bwd_prep bindings: o, dO, lse -> stats
@group(0) @binding(1) var<storage, read> prep_o: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> prep_do: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> prep_lse: array<f32>;
@group(0) @binding(4) var<storage, read_write> prep_stats: array<vec2<f32>>;

// attn_bwd_dq / attn_bwd_dkdv bindings: 1..5 as the forward, then
@group(0) @binding(6) var<storage, read> g_do: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read> stats: array<vec2<f32>>;
@group(0) @binding(8) var<storage, read_write> dq: array<vec4<f32>>;
@group(0) @binding(9) var<storage, read_write> ds_out: array<f32>;
@group(0) @binding(8) var<storage, read_write> dk: array<vec4<f32>>;
@group(0) @binding(9) var<storage, read_write> dv: array<vec4<f32>>;

// attn_bwd_dbias bindings: ds [B, HQ*TQ*TK] -> dbias [HQ*TQ*TK]
@group(0) @binding(1) var<storage, read> red_ds: array<f32>;
@group(0) @binding(2) var<storage, read_write> red_dbias: array<f32>;

fn rel_ok(rel: u32, qp: i32, kp: i32) -> bool {
    switch rel {
        case 1u: { return true; }
        case 2u: { return kp <= qp; }
        case 3u: { return kp == qp; }
        case 4u: { return kp < qp; }
        default: { return false; }
    }
}

// Whether query token (qs, qp) sees key token (ks, kp); see MaskKind in attention.rs.
fn visible(qs: i32, qp: i32, ks: i32, kp: i32) -> bool {
    if (qs < 0 || ks < 0) {
        return false;
    }
    var rel = REL_ALL;
    switch p.kind {
        case 0u: { rel = REL_ALL; }
        case 1u: { rel = REL_CAUSAL; }
        case 2u: {
            // SETRec: causal; inside one item group (id != 0) only the token itself.
            rel = select(REL_CAUSAL, REL_SELF, qs != 0 && ks == qs);
        }
        case 3u: {
            if (ks < qs) {
                rel = p.rel_earlier;
            } else if (ks == qs) {
                rel = p.rel_same;
            } else {
                rel = p.rel_later;
            }
        }
        default: {
            let e = u32(qs) * 16u + u32(ks);
            let w = e / 8u;
            rel = (p.table[w / 4u][w % 4u] >> ((e % 8u) * 4u)) & 15u;
        }
    }
    return rel_ok(rel, qp, kp);
}

// ---------------------------------------------------------------------------------------------
// Forward. Grid: x = ceil(G*TQ / (QB*WG)), y = B*HKV. Invocation: QB consecutive rows of the
// (b, kv head) group, row r = g*TQ + i for query head kvh*G + g and query i (so decoding with
// TQ = 1 blocks the G query heads that share one KV head).
@compute @workgroup_size(WG)
fn attn_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let G = p.hq / p.hkv;
    let R = G * p.tq;
    let b = wid.y / p.hkv;
    let kvh = wid.y % p.hkv;
    if (wid.x * WG * QB >= R) {
        return;
    }
    let r0 = (wid.x * WG + lid.x) * QB;
    let mbase = b * p.meta_bstride;
    var qr: array<array<vec4<f32>, DH4>, QB>;
    var acc: array<array<vec4<f32>, DH4>, QB>;
    var m: array<f32, QB>;
    var l: array<f32, QB>;
    var qseg: array<i32, QB>;
    var qpos: array<i32, QB>;
    var brow: array<u32, QB>;
    var orow: array<u32, QB>;
    for (var rr = 0u; rr < QB; rr++) {
        let r = min(r0 + rr, R - 1u);
        let g = r / p.tq;
        let i = r % p.tq;
        let h = kvh * G + g;
        let row = (b * p.hq + h) * p.tq + i;
        orow[rr] = row;
        for (var d = 0u; d < DH4; d++) {
            qr[rr][d] = q[row * DH4 + d] * p.scale;
            acc[rr][d] = vec4<f32>(0.0);
        }
        m[rr] = NEG_INIT;
        l[rr] = 0.0;
        qseg[rr] = select(-1, tok[mbase + 2u * i], r0 + rr < R);
        qpos[rr] = tok[mbase + 2u * i + 1u];
        brow[rr] = (h * p.tq + i) * p.tk;
    }
    let kvbase = (b * p.hkv + kvh) * p.tk * DH4;
    let kmeta = mbase + 2u * p.tq;
    for (var j = 0u; j < p.tk; j++) {
        let ks = tok[kmeta + 2u * j];
        if (ks < 0) {
            continue;
        }
        let kp = tok[kmeta + 2u * j + 1u];
        let kb = kvbase + j * DH4;
        var kr = fetch_k(kb, lid.x);
        var vr = fetch_v(kb, lid.x);
        var vis: array<bool, QB>;
        var any = false;
        for (var rr = 0u; rr < QB; rr++) {
            vis[rr] = visible(qseg[rr], qpos[rr], ks, kp);
            any = any || vis[rr];
        }
        if (!any) {
            continue;
        }
        var s: array<f32, QB>;
        for (var d = 0u; d < DH4; d++) {
            let kv = kr[d];
            for (var rr = 0u; rr < QB; rr++) {
                s[rr] += dot(qr[rr][d], kv);
            }
        }
        var pr: array<f32, QB>;
        var corr: array<f32, QB>;
        for (var rr = 0u; rr < QB; rr++) {
            var sv = s[rr];
            if (p.has_bias != 0u) {
                sv += bias[brow[rr] + j];
            }
            if (vis[rr]) {
                let mn = max(m[rr], sv);
                corr[rr] = exp(m[rr] - mn);
                pr[rr] = exp(sv - mn);
                m[rr] = mn;
                l[rr] = l[rr] * corr[rr] + pr[rr];
            } else {
                corr[rr] = 1.0;
                pr[rr] = 0.0;
            }
        }
        for (var d = 0u; d < DH4; d++) {
            let vv = vr[d];
            for (var rr = 0u; rr < QB; rr++) {
                acc[rr][d] = acc[rr][d] * corr[rr] + pr[rr] * vv;
            }
        }
    }
    for (var rr = 0u; rr < QB; rr++) {
        if (r0 + rr >= R) {
            break;
        }
        let row = orow[rr];
        let nonempty = l[rr] > 0.0;
        let inv = select(0.0, 1.0 / l[rr], nonempty);
        for (var d = 0u; d < DH4; d++) {
            o[row * DH4 + d] = acc[rr][d] * inv;
        }
        lse[row] = select(LSE_EMPTY, m[rr] + log(l[rr]), nonempty);
    }
}

// ---------------------------------------------------------------------------------------------
// Backward step 1: stats[row] = (lse, sum_d dO*O), one invocation per row of [B*HQ*TQ].
// Grid folded: idx = (wid.y * gx + wid.x) * WG + lid.x.
@compute @workgroup_size(WG)
fn attn_bwd_prep(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = (wid.y * p.gx + wid.x) * WG + lid.x;
    if (row >= p.batch * p.hq * p.tq) {
        return;
    }
    var acc = 0.0;
    for (var d = 0u; d < DH4; d++) {
        acc += dot(prep_o[row * DH4 + d], prep_do[row * DH4 + d]);
    }
    prep_stats[row] = vec2<f32>(prep_lse[row], acc);
}

// Backward step 2: dq (and ds when the bias gradient is wanted), parallel over query rows with the
// same mapping as attn_fwd. dS = P * (dO.v - delta), P recomputed from lse.
@compute @workgroup_size(WG)
fn attn_bwd_dq(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let G = p.hq / p.hkv;
    let R = G * p.tq;
    let b = wid.y / p.hkv;
    let kvh = wid.y % p.hkv;
    if (wid.x * WG * QB >= R) {
        return;
    }
    let r0 = (wid.x * WG + lid.x) * QB;
    let mbase = b * p.meta_bstride;
    var qr: array<array<vec4<f32>, DH4>, QB>;
    var dor: array<array<vec4<f32>, DH4>, QB>;
    var acc: array<array<vec4<f32>, DH4>, QB>;
    var st: array<vec2<f32>, QB>;
    var qseg: array<i32, QB>;
    var qpos: array<i32, QB>;
    var brow: array<u32, QB>;
    var orow: array<u32, QB>;
    for (var rr = 0u; rr < QB; rr++) {
        let r = min(r0 + rr, R - 1u);
        let g = r / p.tq;
        let i = r % p.tq;
        let h = kvh * G + g;
        let row = (b * p.hq + h) * p.tq + i;
        orow[rr] = row;
        for (var d = 0u; d < DH4; d++) {
            qr[rr][d] = q[row * DH4 + d] * p.scale;
            dor[rr][d] = g_do[row * DH4 + d];
            acc[rr][d] = vec4<f32>(0.0);
        }
        st[rr] = stats[row];
        qseg[rr] = select(-1, tok[mbase + 2u * i], r0 + rr < R);
        qpos[rr] = tok[mbase + 2u * i + 1u];
        brow[rr] = (h * p.tq + i) * p.tk;
    }
    let kvbase = (b * p.hkv + kvh) * p.tk * DH4;
    let kmeta = mbase + 2u * p.tq;
    for (var j = 0u; j < p.tk; j++) {
        let ks = tok[kmeta + 2u * j];
        let kp = tok[kmeta + 2u * j + 1u];
        let kb = kvbase + j * DH4;
        var kr = fetch_k(kb, lid.x);
        var vr = fetch_v(kb, lid.x);
        var vis: array<bool, QB>;
        var any = false;
        for (var rr = 0u; rr < QB; rr++) {
            vis[rr] = visible(qseg[rr], qpos[rr], ks, kp);
            any = any || vis[rr];
        }
        var dsv: array<f32, QB>;
        if (any) {
            var s: array<f32, QB>;
            var dp: array<f32, QB>;
            for (var d = 0u; d < DH4; d++) {
                let kv = kr[d];
                let vv = vr[d];
                for (var rr = 0u; rr < QB; rr++) {
                    s[rr] += dot(qr[rr][d], kv);
                    dp[rr] += dot(dor[rr][d], vv);
                }
            }
            for (var rr = 0u; rr < QB; rr++) {
                var sv = s[rr];
                if (p.has_bias != 0u) {
                    sv += bias[brow[rr] + j];
                }
                let pv = exp(sv - st[rr].x);
                dsv[rr] = select(0.0, pv * (dp[rr] - st[rr].y), vis[rr]);
            }
            for (var d = 0u; d < DH4; d++) {
                let kv = kr[d];
                for (var rr = 0u; rr < QB; rr++) {
                    acc[rr][d] += dsv[rr] * kv;
                }
            }
        }
        if (p.write_ds != 0u) {
            for (var rr = 0u; rr < QB; rr++) {
                if (r0 + rr < R) {
                    ds_out[orow[rr] * p.tk + j] = dsv[rr];
                }
            }
        }
    }
    for (var rr = 0u; rr < QB; rr++) {
        if (r0 + rr >= R) {
            break;
        }
        let row = orow[rr];
        for (var d = 0u; d < DH4; d++) {
            dq[row * DH4 + d] = acc[rr][d] * p.scale;
        }
    }
}

// Backward step 3: dk, dv, parallel over keys. Grid: x = ceil(TK / (KB*WG)), y = B*HKV.
// Invocation: KB consecutive keys of one (b, kv head); loops over all G*TQ query rows that share
// the KV head, so the sums over the query heads of a group need no atomics.
@compute @workgroup_size(WG)
fn attn_bwd_dkdv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let G = p.hq / p.hkv;
    let R = G * p.tq;
    let b = wid.y / p.hkv;
    let kvh = wid.y % p.hkv;
    if (wid.x * WG * KB >= p.tk) {
        return;
    }
    let j0 = (wid.x * WG + lid.x) * KB;
    let mbase = b * p.meta_bstride;
    let kmeta = mbase + 2u * p.tq;
    let kvbase = (b * p.hkv + kvh) * p.tk * DH4;
    var kr: array<array<vec4<f32>, DH4>, KB>;
    var vr: array<array<vec4<f32>, DH4>, KB>;
    var dka: array<array<vec4<f32>, DH4>, KB>;
    var dva: array<array<vec4<f32>, DH4>, KB>;
    var kseg: array<i32, KB>;
    var kpos: array<i32, KB>;
    for (var kk = 0u; kk < KB; kk++) {
        let j = min(j0 + kk, p.tk - 1u);
        for (var d = 0u; d < DH4; d++) {
            kr[kk][d] = k[kvbase + j * DH4 + d];
            vr[kk][d] = v[kvbase + j * DH4 + d];
            dka[kk][d] = vec4<f32>(0.0);
            dva[kk][d] = vec4<f32>(0.0);
        }
        kseg[kk] = select(-1, tok[kmeta + 2u * j], j0 + kk < p.tk);
        kpos[kk] = tok[kmeta + 2u * j + 1u];
    }
    for (var r = 0u; r < R; r++) {
        let g = r / p.tq;
        let i = r % p.tq;
        let qs = tok[mbase + 2u * i];
        let qp = tok[mbase + 2u * i + 1u];
        let h = kvh * G + g;
        let row = (b * p.hq + h) * p.tq + i;
        var qv = fetch_q(row * DH4, lid.x);
        var dov = fetch_do(row * DH4, lid.x);
        var vis: array<bool, KB>;
        var any = false;
        for (var kk = 0u; kk < KB; kk++) {
            vis[kk] = visible(qs, qp, kseg[kk], kpos[kk]);
            any = any || vis[kk];
        }
        if (!any) {
            continue;
        }
        let st = stats[row];
        var s: array<f32, KB>;
        var dp: array<f32, KB>;
        for (var d = 0u; d < DH4; d++) {
            qv[d] *= p.scale;
            for (var kk = 0u; kk < KB; kk++) {
                s[kk] += dot(qv[d], kr[kk][d]);
                dp[kk] += dot(dov[d], vr[kk][d]);
            }
        }
        var pv: array<f32, KB>;
        var dsv: array<f32, KB>;
        let brow = (h * p.tq + i) * p.tk;
        for (var kk = 0u; kk < KB; kk++) {
            var sv = s[kk];
            if (p.has_bias != 0u) {
                sv += bias[brow + min(j0 + kk, p.tk - 1u)];
            }
            let e = exp(sv - st.x);
            pv[kk] = select(0.0, e, vis[kk]);
            dsv[kk] = pv[kk] * (dp[kk] - st.y);
        }
        for (var d = 0u; d < DH4; d++) {
            for (var kk = 0u; kk < KB; kk++) {
                dva[kk][d] += pv[kk] * dov[d];
                dka[kk][d] += dsv[kk] * qv[d];
            }
        }
    }
    for (var kk = 0u; kk < KB; kk++) {
        if (j0 + kk >= p.tk) {
            break;
        }
        let j = j0 + kk;
        for (var d = 0u; d < DH4; d++) {
            dk[kvbase + j * DH4 + d] = dka[kk][d];
            dv[kvbase + j * DH4 + d] = dva[kk][d];
        }
    }
}

// Backward step 4 (bias gradient): dbias[e] = sum_b ds[b, e] over e in [0, HQ*TQ*TK), fixed
// order (deterministic). Grid folded like attn_bwd_prep.
@compute @workgroup_size(WG)
fn attn_bwd_dbias(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let e = (wid.y * p.gx + wid.x) * WG + lid.x;
    let n = p.hq * p.tq * p.tk;
    if (e >= n) {
        return;
    }
    var acc = 0.0;
    for (var b = 0u; b < p.batch; b++) {
        acc += red_ds[b * n + e];
    }
    red_dbias[e] = acc;
}
