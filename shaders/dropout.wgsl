// Dropout with a counter-based mask: element i of a launch is kept iff
// hash(seed, offset + i) >> 8 >= threshold (threshold = round(p * 2^24)), and
// kept values are scaled by 1 / (1 - p). The mask is never stored: backward
// runs the same kernel on dy with the same (seed, offset).
// x, y: [n] (any shape, flattened).

struct Params {
    n: u32,
    seed: u32,
    offset: u32,
    threshold: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

// PCG-style integer hash (Jarzynski & Olano 2020). Mirrored in dropout.rs.
fn pcg_hash(v: u32) -> u32 {
    let state = v * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

fn dropout_hash(seed: u32, counter: u32) -> u32 {
    let k = pcg_hash(seed);
    return pcg_hash(pcg_hash(counter ^ k) + k);
}

@compute @workgroup_size(256)
fn dropout(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (i >= p.n) {
        return;
    }
    let h = dropout_hash(p.seed, p.offset + i);
    if ((h >> 8u) >= p.threshold) {
        y[i] = x[i] * p.scale;
    } else {
        y[i] = 0.0;
    }
}
