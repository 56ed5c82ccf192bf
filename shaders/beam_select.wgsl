// One beam-search step's top-k selection, one workgroup per user b (b = wid.x + wid.y * nwg.x).
//
// Rows are users * beams, row r = b * beams + k. Beam state: vec4<u32> per row,
// (node, item, bitcast<u32>(score), 0), where node is a trie node id for a live
// beam, FINISHED for a beam that has emitted EOS (item = its item), DEAD for an
// empty slot (score -inf).
// logits: [rows, V] f32, this step's raw logits; lse: [rows] f32, each row's
// normaliser from trie_mask.wgsl's trie_row_lse (+inf for rows with nothing
// allowed), so the masked log-prob of an allowed token t is logits[r, t] - lse[r].
// trie: packed u32 [node_off (N + 1) | node_item (N) | edge_tok (E) | edge_child (E)].
//
// Candidates of user b: each live beam k extends by every child token t of its
// node (score + logp[r, t]) and by EOS where an item ends (-> FINISHED); each
// finished beam carries over unchanged (token EOS); dead beams give none.
// Candidates with score -inf (or NaN) are dropped. The `beams` best by
// (score desc, key asc), key = k * V + token, fill the output slots in order
// (the best first); missing slots become DEAD. Keys are unique per user, so the
// order is total and the selection deterministic.
//
// Selection: every thread scans its share of the candidates (flattened index
// i = lid, lid + WG, ...) once, keeping a sorted private list of its best
// `beams` (LMAX >= beams); then `beams` rounds of a tree reduction over the list
// heads fill the output slots. Work per thread: n / WG candidates (+ rare list
// insertions) and beams * log2(WG) reduction steps.

struct Params {
    users: u32,
    beams: u32,
    vocab: u32,
    n_nodes: u32,
    eos: u32,
    neg_inf: f32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> trie: array<u32>;
@group(0) @binding(3) var<storage, read> state_in: array<vec4<u32>>;
// [rows] new beam states
@group(0) @binding(4) var<storage, read_write> state_out: array<vec4<u32>>;
// [rows] the old row (global index) each new row continues
@group(0) @binding(5) var<storage, read_write> parents: array<u32>;
// [rows] the token each new row appended (EOS for finished and dead rows)
@group(0) @binding(6) var<storage, read_write> tokens: array<u32>;
@group(0) @binding(7) var<storage, read> lse: array<f32>;

const FINISHED = 0xfffffffeu;
const DEAD = 0xffffffffu;
const NO_ITEM = 0xffffffffu;

// Candidate offsets of the user's beams: beam k owns [cand_off[k], cand_off[k + 1]).
var<workgroup> cand_off: array<u32, KMAX + 1>;
var<workgroup> red_score: array<f32, WG>;
var<workgroup> red_key: array<u32, WG>;
var<workgroup> red_lid: array<u32, WG>;

struct Cand {
    score: f32,
    key: u32,
    token: u32,
    node: u32,
    item: u32,
}

fn n_candidates(row: u32) -> u32 {
    let node = state_in[row].x;
    if (node == FINISHED) {
        return 1u;
    }
    if (node >= p.n_nodes) {
        return 0u;
    }
    let leaf = trie[p.n_nodes + 1u + node] != NO_ITEM;
    return trie[node + 1u] - trie[node] + select(0u, 1u, leaf);
}

// Candidate j of beam k (row r).
fn candidate(r: u32, k: u32, j: u32) -> Cand {
    let st = state_in[r];
    let old = bitcast<f32>(st.z);
    var c: Cand;
    if (st.x == FINISHED) {
        c.score = old;
        c.token = p.eos;
        c.node = FINISHED;
        c.item = st.y;
    } else {
        let e0 = trie[st.x];
        let nchild = trie[st.x + 1u] - e0;
        if (j < nchild) {
            c.token = trie[2u * p.n_nodes + 1u + e0 + j];
            c.node = trie[2u * p.n_nodes + 1u + (trie[p.n_nodes] + e0 + j)];
            c.item = NO_ITEM;
        } else {
            c.token = p.eos;
            c.node = FINISHED;
            c.item = trie[p.n_nodes + 1u + st.x];
        }
        c.score = old + (logits[r * p.vocab + c.token] - lse[r]);
    }
    c.key = k * p.vocab + c.token;
    return c;
}

// a ranks before b.
fn before(sa: f32, ka: u32, sb: f32, kb: u32) -> bool {
    return sa > sb || (sa == sb && ka < kb);
}

// This thread's best min(beams, LMAX) candidates, best first: score, key and
// flattened candidate index.
var<private> ls: array<f32, LMAX>;
var<private> lk: array<u32, LMAX>;
var<private> li: array<u32, LMAX>;

@compute @workgroup_size(WG)
fn beam_select(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let b = wid.x + wid.y * nwg.x;
    if (b >= p.users) {
        return; // uniform over the workgroup
    }
    let row0 = b * p.beams;
    for (var k = lid; k < p.beams; k += WG) {
        cand_off[k + 1u] = n_candidates(row0 + k);
    }
    workgroupBarrier();
    if (lid == 0u) {
        cand_off[0] = 0u;
        for (var k = 0u; k < p.beams; k++) {
            cand_off[k + 1u] += cand_off[k];
        }
    }
    workgroupBarrier();
    // 1. Per-thread sorted list of its best `beams` candidates (i = lid, lid + WG, ...).
    let total = cand_off[p.beams];
    var cnt = 0u;
    var k = 0u;
    for (var i = lid; i < total; i += WG) {
        while (cand_off[k + 1u] <= i) {
            k++;
        }
        let c = candidate(row0 + k, k, i - cand_off[k]);
        if (!(c.score > p.neg_inf)) {
            continue; // -inf or NaN: not a continuation
        }
        if (cnt == p.beams && !before(c.score, c.key, ls[cnt - 1u], lk[cnt - 1u])) {
            continue;
        }
        // Insertion from the end (the last entry falls off a full list).
        var j = min(cnt, p.beams - 1u);
        while (j > 0u && before(c.score, c.key, ls[j - 1u], lk[j - 1u])) {
            ls[j] = ls[j - 1u];
            lk[j] = lk[j - 1u];
            li[j] = li[j - 1u];
            j--;
        }
        ls[j] = c.score;
        lk[j] = c.key;
        li[j] = i;
        cnt = min(cnt + 1u, p.beams);
    }
    // 2. Merge: each round the best list head over the workgroup fills slot s.
    var head = 0u;
    for (var s = 0u; s < p.beams; s++) {
        if (head < cnt) {
            red_score[lid] = ls[head];
            red_key[lid] = lk[head];
        } else {
            red_score[lid] = p.neg_inf;
            red_key[lid] = 0xffffffffu;
        }
        red_lid[lid] = lid;
        workgroupBarrier();
        for (var w = WG / 2u; w > 0u; w = w / 2u) {
            if (lid < w) {
                let o = lid + w;
                let valid_o = red_score[o] > p.neg_inf;
                let valid_l = red_score[lid] > p.neg_inf;
                if (valid_o && (!valid_l || before(red_score[o], red_key[o], red_score[lid], red_key[lid]))) {
                    red_score[lid] = red_score[o];
                    red_key[lid] = red_key[o];
                    red_lid[lid] = red_lid[o];
                }
            }
            workgroupBarrier();
        }
        let win_score = red_score[0];
        let winner = red_lid[0];
        let out_row = row0 + s;
        if (win_score > p.neg_inf) {
            if (lid == winner) {
                let kb = lk[head] / p.vocab;
                let c = candidate(row0 + kb, kb, li[head] - cand_off[kb]);
                state_out[out_row] = vec4<u32>(c.node, c.item, bitcast<u32>(c.score), 0u);
                parents[out_row] = row0 + kb;
                tokens[out_row] = c.token;
                head++;
            }
        } else if (lid == 0u) {
            state_out[out_row] = vec4<u32>(DEAD, NO_ITEM, bitcast<u32>(p.neg_inf), 0u);
            parents[out_row] = out_row;
            tokens[out_row] = p.eos;
        }
        // Everyone has read red_*[0] before the next round overwrites it.
        workgroupBarrier();
    }
}
