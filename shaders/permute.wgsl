// Axis permutation of a rank-<=4 tensor (padded to rank 4 with leading 1s).
// x: contiguous with shape in_shape; y[o0,o1,o2,o3] = x[i] where output axis a
// reads input axis perm[a]. Each invocation writes one output element.

struct Params {
    n: u32,
    // Output shape (rank 4).
    o0: u32, o1: u32, o2: u32, o3: u32,
    // Input strides (in elements) of the input axis each output axis reads.
    s0: u32, s1: u32, s2: u32, s3: u32,
    // Width of the dispatch grid in invocations (grid folded into x and y).
    row: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(256)
fn permute(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.y * p.row + gid.x;
    if (i >= p.n) {
        return;
    }
    var r = i;
    let c3 = r % p.o3; r = r / p.o3;
    let c2 = r % p.o2; r = r / p.o2;
    let c1 = r % p.o1; r = r / p.o1;
    let c0 = r;
    y[i] = x[c0 * p.s0 + c1 * p.s1 + c2 * p.s2 + c3 * p.s3];
}
