// Elementwise arithmetic: binary ops with numpy-style broadcasting, scalar
// affine maps, in-place axpy and fill.
//
// vec4 entry points index the buffers as vec4s over ceil(n / 4) slots: pool
// buffers are multiples of 16 bytes, so the last partial vec4 is in bounds;
// values written past n land in the output's own padding and are never read.
// The grid is folded into x and y: workgroup id = wid.x + wid.y * nwg.x.

const WG = 256u;

// op: 0 add, 1 sub, 2 mul, 3 div
fn bin_op1(a: f32, b: f32, op: u32) -> f32 {
    switch op {
        case 1u: { return a - b; }
        case 2u: { return a * b; }
        case 3u: { return a / b; }
        default: { return a + b; }
    }
}

fn bin_op4(a: vec4<f32>, b: vec4<f32>, op: u32) -> vec4<f32> {
    switch op {
        case 1u: { return a - b; }
        case 2u: { return a * b; }
        case 3u: { return a / b; }
        default: { return a + b; }
    }
}

// ---- binary_same: out = a op b, all three the same shape (n4 = ceil(n / 4)).
struct SameParams { n4: u32, op: u32 }
@group(0) @binding(0) var<uniform> ps: SameParams;
@group(0) @binding(1) var<storage, read> sa: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> sb: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> so: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn binary_same(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i < ps.n4) {
        so[i] = bin_op4(sa[i], sb[i], ps.op);
    }
}

// ---- binary_bcast: out[idx] = a[idx . astr] op b[idx . bstr], where idx is the
// multi-index of the flat output position over `dims` (rank <= 8, row-major) and
// broadcast dimensions have stride 0.
struct BcastParams {
    n: u32,
    rank: u32,
    op: u32,
    _pad: u32,
    dims: array<vec4<u32>, 2>,
    astr: array<vec4<u32>, 2>,
    bstr: array<vec4<u32>, 2>,
}
@group(0) @binding(0) var<uniform> pb: BcastParams;
@group(0) @binding(1) var<storage, read> ba: array<f32>;
@group(0) @binding(2) var<storage, read> bb: array<f32>;
@group(0) @binding(3) var<storage, read_write> bo: array<f32>;

@compute @workgroup_size(WG)
fn binary_bcast(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i >= pb.n) {
        return;
    }
    var rem = i;
    var ia = 0u;
    var ib = 0u;
    for (var d = pb.rank; d > 0u; d--) {
        let k = d - 1u;
        let dim = pb.dims[k / 4u][k % 4u];
        let c = rem % dim;
        rem = rem / dim;
        ia += c * pb.astr[k / 4u][k % 4u];
        ib += c * pb.bstr[k / 4u][k % 4u];
    }
    bo[i] = bin_op1(ba[ia], bb[ib], pb.op);
}

// ---- affine: y = x * mul + add (x, y: n4 vec4 slots)
struct AffineParams { n4: u32, mul: f32, add: f32 }
@group(0) @binding(0) var<uniform> pa: AffineParams;
@group(0) @binding(1) var<storage, read> ax: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> ay: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn affine(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i < pa.n4) {
        ay[i] = ax[i] * pa.mul + pa.add;
    }
}

// ---- add_scaled: y += alpha * x, in place (x, y: n4 vec4 slots)
struct AxpyParams { n4: u32, alpha: f32 }
@group(0) @binding(0) var<uniform> px: AxpyParams;
@group(0) @binding(1) var<storage, read_write> xy: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> xx: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn add_scaled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i < px.n4) {
        xy[i] = xy[i] + px.alpha * xx[i];
    }
}

// ---- fill: x[:] = value, in place (n4 vec4 slots)
struct FillParams { n4: u32, value: f32 }
@group(0) @binding(0) var<uniform> pf: FillParams;
@group(0) @binding(1) var<storage, read_write> fx: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn fill(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i < pf.n4) {
        fx[i] = vec4<f32>(pf.value);
    }
}

// ---- copy: y = x (n4 vec4 slots); the bandwidth baseline for benchmarks.
@compute @workgroup_size(WG)
fn copy(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i < pa.n4) {
        ay[i] = ax[i];
    }
}
