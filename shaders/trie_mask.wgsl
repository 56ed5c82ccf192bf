// Trie-masked log-softmax, one workgroup per row (row = wid.x + wid.y * nwg.x).
//
// logits: [rows, V] f32 row-major; out: [rows, V] (trie_log_softmax) or [rows]
// (trie_row_lse). Row r's trie node is nodes[r * node_stride]
// (stride 1 for a plain node list, 4 for the beam state's vec4 (node, item, score, 0)).
// trie: the packed u32 buffer [node_off (N + 1) | node_item (N) | edge_tok (E) | edge_child (E)].
//
// The allowed tokens of node n are its children's tokens plus EOS when an item
// ends at n. out[r, t] = logits[r, t] - lse for allowed t, -inf elsewhere, where
// lse = logsumexp over the allowed tokens (full_vocab = 0) or over the whole row
// (full_vocab = 1, HF-style: full log-softmax, then mask). A row whose node is
// not a trie node (>= N: finished or dead beams), or whose normalisation set is
// all -inf, is all -inf. Never NaN for finite or -inf logits.

struct Params {
    rows: u32,
    vocab: u32,
    n_nodes: u32,
    eos: u32,
    node_stride: u32,
    full_vocab: u32,
    // -inf, passed in because WGSL has no inf literal.
    neg_inf: f32,
    _pad: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> nodes: array<u32>;
@group(0) @binding(3) var<storage, read> trie: array<u32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

const NO_ITEM = 0xffffffffu;
// Finite start for the running max, so combining never computes inf - inf.
const NEG_BIG = -3.4028235e38;

var<workgroup> red_m: array<f32, WG>;
var<workgroup> red_s: array<f32, WG>;

// Token of allowed entry j of a node whose edges start at e0: edges first, then EOS.
fn allowed_tok(e0: u32, nchild: u32, j: u32) -> u32 {
    if (j < nchild) {
        return trie[2u * p.n_nodes + 1u + e0 + j];
    }
    return p.eos;
}

// The row's allowed set (edge start, child count, allowed count incl. EOS).
struct Allowed {
    e0: u32,
    nchild: u32,
    n: u32,
}

fn allowed_of(row: u32) -> Allowed {
    var a: Allowed;
    a.e0 = 0u;
    a.nchild = 0u;
    a.n = 0u;
    let node = nodes[row * p.node_stride];
    if (node < p.n_nodes) {
        a.e0 = trie[node];
        a.nchild = trie[node + 1u] - a.e0;
        let leaf = trie[p.n_nodes + 1u + node] != NO_ITEM;
        a.n = a.nchild + select(0u, 1u, leaf);
    }
    return a;
}

// logsumexp of the row's normalisation set, as (max, sum of exp(x - max)) after
// a workgroup reduction; every thread gets the result. Call in uniform control flow.
fn row_stats(base: u32, a: Allowed, lid: u32) -> vec2<f32> {
    var m = NEG_BIG;
    var s = 0.0;
    if (p.full_vocab == 1u) {
        for (var c = lid; c < p.vocab; c += WG) {
            let x = logits[base + c];
            if (x > m) {
                s = s * exp(m - x);
                m = x;
            }
            s += exp(x - m);
        }
    } else {
        for (var j = lid; j < a.n; j += WG) {
            let x = logits[base + allowed_tok(a.e0, a.nchild, j)];
            if (x > m) {
                s = s * exp(m - x);
                m = x;
            }
            s += exp(x - m);
        }
    }
    red_m[lid] = m;
    red_s[lid] = s;
    workgroupBarrier();
    for (var w = WG / 2u; w > 0u; w = w / 2u) {
        if (lid < w) {
            let m1 = red_m[lid];
            let m2 = red_m[lid + w];
            let mm = max(m1, m2);
            red_s[lid] = red_s[lid] * exp(m1 - mm) + red_s[lid + w] * exp(m2 - mm);
            red_m[lid] = mm;
        }
        workgroupBarrier();
    }
    return vec2<f32>(red_m[0], red_s[0]);
}

@compute @workgroup_size(WG)
fn trie_log_softmax(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.rows) {
        return; // uniform over the workgroup
    }
    let base = row * p.vocab;
    let a = allowed_of(row);
    let ms = row_stats(base, a, lid);
    let valid = ms.y > 0.0;
    let lse = ms.x + log(select(1.0, ms.y, valid));
    // Every column -inf, then the allowed ones overwritten (the storage barrier
    // orders the two passes' writes within the workgroup).
    for (var c = lid; c < p.vocab; c += WG) {
        out[base + c] = p.neg_inf;
    }
    storageBarrier();
    if (valid) {
        for (var j = lid; j < a.n; j += WG) {
            let t = allowed_tok(a.e0, a.nchild, j);
            out[base + t] = logits[base + t] - lse;
        }
    }
}

// Only the normaliser: out[row] = lse of the row's normalisation set, +inf when
// no token is allowed or the set is all -inf (so logits - lse is -inf, never
// NaN). Beam search uses this and reads the allowed logits itself (no [rows, V]
// write).
@compute @workgroup_size(WG)
fn trie_row_lse(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.rows) {
        return; // uniform over the workgroup
    }
    let a = allowed_of(row);
    let ms = row_stats(row * p.vocab, a, lid);
    if (lid == 0u) {
        out[row] = select(-p.neg_inf, ms.x + log(ms.y), ms.y > 0.0 && a.n > 0u);
    }
}
