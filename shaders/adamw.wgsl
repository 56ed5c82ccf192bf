// AdamW step (decoupled weight decay, bias correction) and the global
// gradient-norm reduction used for clipping.
//
// adamw_step: param, grad, m, v: [n] (a parameter tensor flattened), updated in
// place. With clip_on = 1 the gradient is scaled by
// min(1, max_norm / (sqrt(norm_sq[0]) + 1e-6)) first (PyTorch clip_grad_norm_),
// where norm_sq: [1] is the sum of squares over all gradients (from
// sumsq_partial + sumsq_finish), so no readback sits between backward and update.

struct StepParams {
    n: u32,
    clip_on: u32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    // 1 - beta1^t and 1 - beta2^t for the step t being taken (t >= 1).
    bc1: f32,
    bc2: f32,
    max_norm: f32,
}

@group(0) @binding(0) var<uniform> sp: StepParams;
@group(0) @binding(1) var<storage, read_write> param: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;
@group(0) @binding(5) var<storage, read> norm_sq: array<f32>;

@compute @workgroup_size(256)
fn adamw_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (i >= sp.n) {
        return;
    }
    var g = grad[i];
    if (sp.clip_on != 0u) {
        let norm = sqrt(norm_sq[0]);
        g = g * min(1.0, sp.max_norm / (norm + 1e-6));
    }
    let mi = sp.beta1 * m[i] + (1.0 - sp.beta1) * g;
    let vi = sp.beta2 * v[i] + (1.0 - sp.beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    let mhat = mi / sp.bc1;
    let vhat = vi / sp.bc2;
    let decayed = param[i] * (1.0 - sp.lr * sp.weight_decay);
    param[i] = decayed - sp.lr * mhat / (sqrt(vhat) + sp.eps);
}

// Sum of squares: sumsq_partial writes one partial per workgroup of one
// gradient tensor x: [n] into partials[out_offset + workgroup]; sumsq_finish
// adds partials[0..count] in a fixed order into out[0]. Deterministic.
struct PartialParams {
    n: u32,
    out_offset: u32,
}

@group(0) @binding(0) var<uniform> pp: PartialParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> partials: array<f32>;

var<workgroup> red: array<f32, 256>;

@compute @workgroup_size(256)
fn sumsq_partial(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    var acc = 0.0;
    let stride = nwg.x * 256u;
    for (var i = wid.x * 256u + lid; i < pp.n; i += stride) {
        let g = x[i];
        acc += g * g;
    }
    red[lid] = acc;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        partials[pp.out_offset + wid.x] = red[0];
    }
}

struct FinishParams {
    count: u32,
}

@group(0) @binding(0) var<uniform> fp: FinishParams;
@group(0) @binding(1) var<storage, read> parts: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn sumsq_finish(@builtin(local_invocation_index) lid: u32) {
    var acc = 0.0;
    for (var i = lid; i < fp.count; i += 256u) {
        acc += parts[i];
    }
    red[lid] = acc;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        out[0] = red[0];
    }
}
