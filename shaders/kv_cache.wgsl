// Key/value cache for incremental decoding, batched over rows (users x beams).
// See src/ops/kv_cache.rs for the launchers and the CPU reference.
//
// Layouts (row-major, f32, moved as vec4: D is a multiple of 4, D4 = D / 4):
//   cache, src, dst: [R, H, L, D]   one row per beam, L = the preallocated length
//   new:             [R, H, D]      this step's key (or value) of every row and head
//   parents:         [R] u32        new row r continues old row parents[r]
//
// kv_append:  cache[r, h, pos, :] = new[r, h, :]                      (in place)
// kv_reorder: dst[r, h, j, :] = src[parents[r], h, j, :]  for j < n_copy
//             dst[r, h, n_copy, :] = new[r, h, :]          when has_new
// (a gather of cache rows fused with the next append). A parent >= R gives zero rows, never an
// out-of-bounds read. Positions past those written are left as they are.

struct Params {
    rows: u32,
    heads: u32,
    max_len: u32,
    d4: u32,
    // kv_append: the position written; kv_reorder: positions copied (0..n_copy).
    pos: u32,
    has_new: u32,
    // Grid width in invocations (grids are folded into x and y).
    row: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// kv_append bindings
@group(0) @binding(1) var<storage, read> a_new: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> a_cache: array<vec4<f32>>;

// kv_reorder bindings
@group(0) @binding(1) var<storage, read> r_new: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> r_src: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> r_parents: array<u32>;
@group(0) @binding(4) var<storage, read_write> r_dst: array<vec4<f32>>;

// One invocation per vec4 of new: e = ((r * H + h) * D4 + d).
@compute @workgroup_size(256)
fn kv_append(@builtin(global_invocation_id) gid: vec3<u32>) {
    let e = gid.y * p.row + gid.x;
    if (e >= p.rows * p.heads * p.d4) {
        return;
    }
    let d = e % p.d4;
    let rh = e / p.d4;
    a_cache[(rh * p.max_len + p.pos) * p.d4 + d] = a_new[e];
}

// One invocation per written vec4 of dst: e = (((r * H + h) * n_out + j) * D4 + d) with
// n_out = n_copy + has_new.
@compute @workgroup_size(256)
fn kv_reorder(@builtin(global_invocation_id) gid: vec3<u32>) {
    let e = gid.y * p.row + gid.x;
    let n_out = p.pos + p.has_new;
    if (e >= p.rows * p.heads * n_out * p.d4) {
        return;
    }
    let d = e % p.d4;
    let t = e / p.d4;
    let j = t % n_out;
    let rh = t / n_out;
    let h = rh % p.heads;
    let r = rh / p.heads;
    let out = (rh * p.max_len + j) * p.d4 + d;
    if (j < p.pos) {
        let pr = r_parents[r];
        if (pr < p.rows) {
            r_dst[out] = r_src[((pr * p.heads + h) * p.max_len + j) * p.d4 + d];
        } else {
            r_dst[out] = vec4<f32>(0.0);
        }
    } else {
        r_dst[out] = r_new[rh * p.d4 + d];
    }
}
