// Rotary position embedding, LLaMA/HF "rotate_half" convention, forward and inverse rotation.
// x, y: [B, H, T, DH] row-major, DH even, half = DH / 2. For d < half, with a = pos * inv_freq[d]:
//   y[d]        = x[d] * cos(a) - sgn * x[d + half] * sin(a)
//   y[d + half] = x[d + half] * cos(a) + sgn * x[d] * sin(a)
// sgn = +1 rotates (forward), -1 rotates back (the backward: the rotation's transpose).
// pos = offset + (positions[b * pos_bstride + t] if has_pos else t).
// One invocation per (b, h, t, d < half); folded grid: idx = (wid.y * gx + wid.x) * WG + lid.x.

struct Params {
    batch: u32,
    heads: u32,
    t: u32,
    dh: u32,
    has_pos: u32,
    pos_bstride: u32,
    offset: i32,
    sgn: f32,
    gx: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// rope (out of place)
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> positions: array<i32>;
@group(0) @binding(3) var<storage, read> inv_freq: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
// rope_inplace
@group(0) @binding(1) var<storage, read_write> xio: array<f32>;

// cos/sin of a with a Cody-Waite reduction by 2*pi, so large angles (long positions) stay
// accurate on GPUs whose sin/cos are only accurate near zero.
fn cos_sin(a: f32) -> vec2<f32> {
    let n = round(a * 0.15915494309189535);
    let r = (a - n * 6.28125) - n * 0.0019353071795864769;
    return vec2<f32>(cos(r), sin(r));
}

struct Site {
    ok: bool,
    i0: u32,
    i1: u32,
    cs: vec2<f32>,
}

fn site(wid: vec3<u32>, lid: vec3<u32>) -> Site {
    var s: Site;
    let half = p.dh / 2u;
    let idx = (wid.y * p.gx + wid.x) * WG + lid.x;
    s.ok = idx < p.batch * p.heads * p.t * half;
    if (!s.ok) {
        return s;
    }
    let d = idx % half;
    let row = idx / half; // (b * heads + h) * t + t_i
    let ti = row % p.t;
    let b = row / (p.t * p.heads);
    var pos = p.offset + i32(ti);
    if (p.has_pos != 0u) {
        pos = p.offset + positions[b * p.pos_bstride + ti];
    }
    s.i0 = row * p.dh + d;
    s.i1 = s.i0 + half;
    s.cs = cos_sin(f32(pos) * inv_freq[d]);
    s.cs.y *= p.sgn;
    return s;
}

@compute @workgroup_size(WG)
fn rope(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let s = site(wid, lid);
    if (!s.ok) {
        return;
    }
    let a = x[s.i0];
    let b = x[s.i1];
    y[s.i0] = a * s.cs.x - b * s.cs.y;
    y[s.i1] = b * s.cs.x + a * s.cs.y;
}

@compute @workgroup_size(WG)
fn rope_inplace(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let s = site(wid, lid);
    if (!s.ok) {
        return;
    }
    let a = xio[s.i0];
    let b = xio[s.i1];
    xio[s.i0] = a * s.cs.x - b * s.cs.y;
    xio[s.i1] = b * s.cs.x + a * s.cs.y;
}
