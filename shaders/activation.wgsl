// Standalone activations and SwiGLU, forward and backward.
// All tensors are flat f32 arrays indexed as vec4 slots over n4 = ceil(n / 4)
// (pool buffers are multiples of 16 bytes; lanes past n are padding, computed
// and written but never read). kind: ops::Act::code().
// Grid folded into x and y: workgroup id = wid.x + wid.y * nwg.x.

//!include _act

const WG = 256u;

struct Params { n4: u32, kind: u32 }
@group(0) @binding(0) var<uniform> p: Params;

fn fwd4(v: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(act_fwd(v.x, p.kind), act_fwd(v.y, p.kind), act_fwd(v.z, p.kind), act_fwd(v.w, p.kind));
}
fn grad4(v: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(act_grad(v.x, p.kind), act_grad(v.y, p.kind), act_grad(v.z, p.kind), act_grad(v.w, p.kind));
}
fn silu4(v: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(act_fwd(v.x, 4u), act_fwd(v.y, 4u), act_fwd(v.z, 4u), act_fwd(v.w, 4u));
}
fn silu_grad4(v: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(act_grad(v.x, 4u), act_grad(v.y, 4u), act_grad(v.z, 4u), act_grad(v.w, 4u));
}

// ---- forward: y = act(x)
@group(0) @binding(1) var<storage, read> fx: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> fy: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i < p.n4) {
        fy[i] = fwd4(fx[i]);
    }
}

// ---- backward: dx = dy * act'(x)   (x is the pre-activation input)
@group(0) @binding(1) var<storage, read> bx: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> bdy: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> bdx: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i < p.n4) {
        bdx[i] = bdy[i] * grad4(bx[i]);
    }
}

// ---- swiglu: y = silu(gate) * up
@group(0) @binding(1) var<storage, read> sg: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> su: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> sy: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn swiglu(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i < p.n4) {
        sy[i] = silu4(sg[i]) * su[i];
    }
}

// ---- swiglu_backward: dgate = dy * up * silu'(gate), dup = dy * silu(gate)
@group(0) @binding(1) var<storage, read> wg_gate: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> wg_up: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> wg_dy: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> wg_dgate: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> wg_dup: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn swiglu_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i < p.n4) {
        let g = wg_gate[i];
        let dy = wg_dy[i];
        wg_dgate[i] = dy * wg_up[i] * silu_grad4(g);
        wg_dup[i] = dy * silu4(g);
    }
}
