// Key/value caches of incremental decoding, batched over rows (users x beams); used by both the
// T5 decoder and the LLaMA decoder. Launchers, CPU references and tests: src/ops/kv_cache.rs.
// Every kernel moves 32-bit words, so f32, u32 and i32 tensors all work. One invocation per
// output word; folded grid: idx = (wid.y * p.gx + wid.x) * WG + lid.x.
//
// kv_write:    cache [B, H, CAP, DH], src [B, H, TN, DH]:
//              cache[b, h, off + t, d] = src[b, h, t, d]                 (in place)
//              (p.a = DH, p.b = TN, p.c = CAP, p.d = off)
// kv_reorder:  src, dst [R, H, CAP, DH] (distinct), parents [R] u32, new [R, H, DH]:
//              dst[r, h, j, :] = src[parents[r], h, j, :]   for j < n_copy (zeros for a parent >= R)
//              dst[r, h, n_copy, :] = new[r, h, :]          when has_new
//              (a beam reorder fused with the next step's write; slots past those written keep
//              their contents)   (p.a = DH, p.b = H, p.c = CAP, p.d = n_copy, p.e = has_new, p.f = R)
// gather_rows: src [RS, W], parents [R] u32 -> dst [R, W]:
//              dst[r, c] = src[parents[r], c], zeros when parents[r] >= RS   (p.a = W, p.b = RS)
// decode_meta: row_pad [R] i32 (leading padding slots of each row), cur = the slot being written:
//              tok [R, 1 + CAP, 2] i32, the attention mask table of one decoding step
//                (query: segment 0, position cur; key j: segment -1 if j < pad else 0, position j),
//              pos [R] i32 = cur - pad (the RoPE position of the new token)    (p.a = CAP, p.b = cur)

struct Params {
    n: u32,
    a: u32,
    b: u32,
    c: u32,
    d: u32,
    e: u32,
    f: u32,
    gx: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// kv_write
@group(0) @binding(1) var<storage, read_write> cache: array<u32>;
@group(0) @binding(2) var<storage, read> src: array<u32>;

// kv_reorder
@group(0) @binding(1) var<storage, read> re_new: array<u32>;
@group(0) @binding(2) var<storage, read> re_src: array<u32>;
@group(0) @binding(3) var<storage, read> re_parents: array<u32>;
@group(0) @binding(4) var<storage, read_write> re_dst: array<u32>;

// gather_rows
@group(0) @binding(1) var<storage, read> rows_src: array<u32>;
@group(0) @binding(2) var<storage, read> parents: array<u32>;
@group(0) @binding(3) var<storage, read_write> rows_dst: array<u32>;

// decode_meta
@group(0) @binding(1) var<storage, read> row_pad: array<i32>;
@group(0) @binding(2) var<storage, read_write> tok: array<i32>;
@group(0) @binding(3) var<storage, read_write> pos: array<i32>;

fn flat(wid: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wid.y * p.gx + wid.x) * WG + lid.x;
}

@compute @workgroup_size(WG)
fn kv_write(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let idx = flat(wid, lid);
    if (idx >= p.n) {
        return;
    }
    let dh = p.a;
    let tn = p.b;
    let d = idx % dh;
    let t = (idx / dh) % tn;
    let bh = idx / (dh * tn);
    cache[(bh * p.c + p.d + t) * dh + d] = src[idx];
}

// idx = ((r * H + h) * n_out + j) * DH + d over the written slots, n_out = n_copy + has_new.
@compute @workgroup_size(WG)
fn kv_reorder(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let idx = flat(wid, lid);
    if (idx >= p.n) {
        return;
    }
    let dh = p.a;
    let heads = p.b;
    let cap = p.c;
    let n_copy = p.d;
    let n_out = n_copy + p.e;
    let d = idx % dh;
    let j = (idx / dh) % n_out;
    let rh = idx / (dh * n_out);
    let h = rh % heads;
    let r = rh / heads;
    let out = (rh * cap + j) * dh + d;
    if (j < n_copy) {
        let pr = re_parents[r];
        if (pr < p.f) {
            re_dst[out] = re_src[((pr * heads + h) * cap + j) * dh + d];
        } else {
            re_dst[out] = 0u;
        }
    } else {
        re_dst[out] = re_new[rh * dh + d];
    }
}

@compute @workgroup_size(WG)
fn gather_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let idx = flat(wid, lid);
    if (idx >= p.n) {
        return;
    }
    let r = idx / p.a;
    let c = idx % p.a;
    let par = parents[r];
    if (par < p.b) {
        rows_dst[idx] = rows_src[par * p.a + c];
    } else {
        rows_dst[idx] = 0u;
    }
}

@compute @workgroup_size(WG)
fn decode_meta(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let idx = flat(wid, lid);
    if (idx >= p.n) {
        return;
    }
    let cap = p.a;
    let cur = i32(p.b);
    let r = idx / (cap + 1u);
    let j = idx % (cap + 1u);
    let pad = row_pad[r];
    if (j == 0u) {
        tok[2u * idx] = 0;
        tok[2u * idx + 1u] = cur;
        pos[r] = cur - pad;
    } else {
        let k = i32(j) - 1;
        tok[2u * idx] = select(0, -1, k < pad);
        tok[2u * idx + 1u] = k;
    }
}
