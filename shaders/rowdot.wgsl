// Row-wise dot products, e.g. BPR scores s⁺ = <e_u, e_i>, s⁻ = <e_u, e_j>:
//   s[b, k] = sum_j a[b, j] * m[b, k, j]
// a: [B, D], m: [B, K, D], s and its gradient g: [B, K]; da: [B, D]; dm: [B, K, D]; f32 row-major.
// Backward: da[b, j] = sum_k g[b, k] m[b, k, j];  dm[b, k, j] = g[b, k] a[b, j].
// One invocation per output element (no workgroup memory, no atomics: deterministic).
// The flat index is folded over a 2-D grid: i = (wid.x + wid.y * nwg.x) * WG + lid.

const WG = 64u;

struct Params { b: u32, k: u32, d: u32 }
@group(0) @binding(0) var<uniform> p: Params;

fn flat(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

// ---- forward: s[b, k] = <a[b, :], m[b, k, :]>
@group(0) @binding(1) var<storage, read> fa: array<f32>;
@group(0) @binding(2) var<storage, read> fm: array<f32>;
@group(0) @binding(3) var<storage, read_write> fs: array<f32>;

@compute @workgroup_size(WG)
fn forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    if (i >= p.b * p.k) {
        return;
    }
    let ra = (i / p.k) * p.d;
    let rm = i * p.d;
    var acc = 0.0;
    for (var j = 0u; j < p.d; j++) {
        acc += fa[ra + j] * fm[rm + j];
    }
    fs[i] = acc;
}

// ---- backward for a: da[b, j] = sum_k g[b, k] m[b, k, j]
@group(0) @binding(1) var<storage, read> ag: array<f32>;
@group(0) @binding(2) var<storage, read> am: array<f32>;
@group(0) @binding(3) var<storage, read_write> ada: array<f32>;

@compute @workgroup_size(WG)
fn backward_a(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    if (i >= p.b * p.d) {
        return;
    }
    let bi = i / p.d;
    let j = i % p.d;
    var acc = 0.0;
    for (var k = 0u; k < p.k; k++) {
        acc += ag[bi * p.k + k] * am[(bi * p.k + k) * p.d + j];
    }
    ada[i] = acc;
}

// ---- backward for m: dm[b, k, j] = g[b, k] a[b, j]
@group(0) @binding(1) var<storage, read> mg: array<f32>;
@group(0) @binding(2) var<storage, read> ma: array<f32>;
@group(0) @binding(3) var<storage, read_write> mdm: array<f32>;

@compute @workgroup_size(WG)
fn backward_m(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    if (i >= p.b * p.k * p.d) {
        return;
    }
    let bk = i / p.d;
    let j = i % p.d;
    mdm[i] = mg[bk] * ma[(bk / p.k) * p.d + j];
}
