// Embedding lookup and its deterministic backward.
//
// gather:   table [V, D] row-major (f32, or f16 packed two per u32), ids [N] u32
//           -> out [N, D]. An id >= V yields a zero row (never an out-of-bounds read).
// backward: dtable[v, :] = sum over positions i with ids[i] == v of dy[i, :], in
//           increasing i, through a CSR of positions per id built on the GPU by a
//           stable counting sort (count_ids -> scan_offsets -> fill_sorted), then
//           sum_slots walks each occupied row's list. Integer atomics only count; the order
//           of float additions is fixed, so results are bit-identical every run.

struct Params {
    n: u32,   // number of ids
    v: u32,   // table rows
    d: u32,   // row width
}

@group(0) @binding(0) var<uniform> p: Params;

// ---- gather ---------------------------------------------------------------

@group(0) @binding(1) var<storage, read> table: array<f32>;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

fn flat_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * 256u + lid;
}

@compute @workgroup_size(256)
fn gather(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let e = flat_index(wid, nwg, lid);
    if (e >= p.n * p.d) {
        return;
    }
    let row = e / p.d;
    let col = e - row * p.d;
    let id = ids[row];
    if (id < p.v) {
        out[e] = table[id * p.d + col];
    } else {
        out[e] = 0.0;
    }
}

// gather4: the same with D % 4 == 0, one vec4 per invocation (d4 = D / 4 in p.d).
@group(0) @binding(1) var<storage, read> table4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out4: array<vec4<f32>>;

@compute @workgroup_size(256)
fn gather4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let e = flat_index(wid, nwg, lid);
    if (e >= p.n * p.d) {
        return;
    }
    let row = e / p.d;
    let col = e - row * p.d;
    let id = ids[row];
    if (id < p.v) {
        out4[e] = table4[id * p.d + col];
    } else {
        out4[e] = vec4<f32>(0.0);
    }
}

// table_h: the same [V, D] table stored as f16, two values per u32 (element k
// in the low half of word k / 2 when k is even). Decoded with integer ops, so it
// needs neither SHADER_F16 nor naga's SHADER_FLOAT16_IN_FLOAT32 (unpack2x16float).
fn f16_bits_to_f32(h: u32) -> f32 {
    let sign = (h >> 15u) << 31u;
    let e = (h >> 10u) & 0x1fu;
    let mant = h & 0x3ffu;
    if (e == 0u) {
        // Zero or subnormal: mant * 2^-24.
        let mag = f32(mant) * 5.9604644775390625e-8;
        return bitcast<f32>(sign | bitcast<u32>(mag));
    }
    if (e == 31u) {
        return bitcast<f32>(sign | 0x7f800000u | (mant << 13u)); // inf / NaN
    }
    return bitcast<f32>(sign | ((e + 112u) << 23u) | (mant << 13u));
}
@group(0) @binding(1) var<storage, read> table_h: array<u32>;

@compute @workgroup_size(256)
fn gather_f16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let e = flat_index(wid, nwg, lid);
    if (e >= p.n * p.d) {
        return;
    }
    let row = e / p.d;
    let col = e - row * p.d;
    let id = ids[row];
    if (id < p.v) {
        let k = id * p.d + col;
        let word = table_h[k / 2u];
        out[e] = f16_bits_to_f32(select(word & 0xffffu, word >> 16u, (k & 1u) == 1u));
    } else {
        out[e] = 0.0;
    }
}

// ---- backward: CSR of positions per id -------------------------------------

// counts: [V], zeroed by the host; ids outside [0, V) are not counted.
@group(0) @binding(1) var<storage, read> c_ids: array<u32>;
@group(0) @binding(2) var<storage, read_write> counts: array<atomic<u32>>;

@compute @workgroup_size(256)
fn count_ids(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let id = c_ids[i];
    if (id < p.v) {
        atomicAdd(&counts[id], 1u);
    }
}

// offsets: [V + 1] exclusive prefix sum of counts; cursor: [V] a copy of
// offsets[0..V] for fill_sorted to advance. One workgroup.
@group(0) @binding(1) var<storage, read> s_counts: array<u32>;
@group(0) @binding(2) var<storage, read_write> offsets: array<u32>;
@group(0) @binding(3) var<storage, read_write> cursor: array<u32>;

var<workgroup> scan: array<u32, 256>;

@compute @workgroup_size(256)
fn scan_offsets(@builtin(local_invocation_index) lid: u32) {
    let chunk = (p.v + 255u) / 256u;
    let begin = min(lid * chunk, p.v);
    let end = min(begin + chunk, p.v);
    var local = 0u;
    for (var k = begin; k < end; k++) {
        local += s_counts[k];
    }
    scan[lid] = local;
    workgroupBarrier();
    // Hillis-Steele inclusive scan over the 256 chunk sums.
    for (var s = 1u; s < 256u; s <<= 1u) {
        var add = 0u;
        if (lid >= s) {
            add = scan[lid - s];
        }
        workgroupBarrier();
        scan[lid] += add;
        workgroupBarrier();
    }
    var run = scan[lid] - local;
    for (var k = begin; k < end; k++) {
        offsets[k] = run;
        cursor[k] = run;
        run += s_counts[k];
    }
    if (lid == 255u) {
        offsets[p.v] = scan[255];
    }
}

// sorted: [N] positions grouped by id, increasing within each id (stable).
// One workgroup walks the ids in chunks of 256; within a chunk each position's
// rank among equal ids comes from comparing with the chunk in shared memory.
@group(0) @binding(1) var<storage, read> f_ids: array<u32>;
@group(0) @binding(2) var<storage, read_write> f_cursor: array<u32>;
@group(0) @binding(3) var<storage, read_write> sorted: array<u32>;

var<workgroup> chunk_ids: array<u32, 256>;

@compute @workgroup_size(256)
fn fill_sorted(@builtin(local_invocation_index) lid: u32) {
    let invalid = 0xffffffffu;
    for (var base = 0u; base < p.n; base += 256u) {
        let i = base + lid;
        var id = invalid;
        if (i < p.n) {
            id = f_ids[i];
            if (id >= p.v) {
                id = invalid;
            }
        }
        chunk_ids[lid] = id;
        workgroupBarrier();
        var rank = 0u;
        var last = true;
        for (var t = 0u; t < 256u; t++) {
            let same = chunk_ids[t] == id;
            if (same && t < lid) {
                rank += 1u;
            }
            if (same && t > lid) {
                last = false;
            }
        }
        var start = 0u;
        if (id != invalid) {
            start = f_cursor[id];
            sorted[start + rank] = i;
        }
        storageBarrier();
        workgroupBarrier();
        if (id != invalid && last) {
            f_cursor[id] = start + rank + 1u;
        }
        storageBarrier();
        workgroupBarrier();
    }
}

// Sum over occupied rows (dtable cleared first). Invocation (slot s of sorted,
// column c) sums its row's list, in increasing position, when s is the first
// slot of that row; other slots return. Grid: N * D (sum_slots) or N * D / 4
// (sum_slots4, p.d = D / 4). Slots at or past offsets[V] (the number of valid
// ids) hold no position.
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read> r_offsets: array<u32>;
@group(0) @binding(3) var<storage, read> r_sorted: array<u32>;
@group(0) @binding(4) var<storage, read_write> dtable: array<f32>;
@group(0) @binding(5) var<storage, read> s_ids: array<u32>;

// The row whose list starts at slot s, or 0xffffffff.
fn slot_row(s: u32) -> u32 {
    if (s >= r_offsets[p.v]) {
        return 0xffffffffu;
    }
    let id = s_ids[r_sorted[s]];
    if (s != r_offsets[id]) {
        return 0xffffffffu;
    }
    return id;
}

@compute @workgroup_size(256)
fn sum_slots(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let e = flat_index(wid, nwg, lid);
    if (e >= p.n * p.d) {
        return;
    }
    let s = e / p.d;
    let col = e - s * p.d;
    let id = slot_row(s);
    if (id == 0xffffffffu) {
        return;
    }
    var acc = 0.0;
    let end = r_offsets[id + 1u];
    for (var k = s; k < end; k++) {
        acc += dy[r_sorted[k] * p.d + col];
    }
    dtable[id * p.d + col] = acc;
}

@group(0) @binding(1) var<storage, read> dy4: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> dtable4: array<vec4<f32>>;

@compute @workgroup_size(256)
fn sum_slots4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let e = flat_index(wid, nwg, lid);
    if (e >= p.n * p.d) {
        return;
    }
    let s = e / p.d;
    let col = e - s * p.d;
    let id = slot_row(s);
    if (id == 0xffffffffu) {
        return;
    }
    var acc = vec4<f32>(0.0);
    let end = r_offsets[id + 1u];
    for (var k = s; k < end; k++) {
        acc += dy4[r_sorted[k] * p.d + col];
    }
    dtable4[id * p.d + col] = acc;
}
