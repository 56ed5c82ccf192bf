# panel-packed B (strip = 8*CV texels, contiguous rows), linear textures of width 1024 texels
import sys
RM = int(sys.argv[1]); CV = int(sys.argv[2]); SWAP = len(sys.argv) > 3 and sys.argv[3] == "swap"
SG = 8; SWT = SG * CV
L = []; w = L.append
w("""struct Params { m: u32, n: u32, k: u32, gx: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> b: array<vec4<f32>>;
@group(0) @binding(3) var at: texture_2d<f32>;
@group(0) @binding(4) var bt: texture_2d<f32>;
@group(0) @binding(5) var<storage, read_write> c: array<vec4<f32>>;
fn tl(i: u32) -> vec2<u32> { return vec2<u32>(i & 1023u, i >> 10u); }
@compute @workgroup_size(8, 1, 1)
fn mm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    let k4 = p.k / 4u;
    let n4 = p.n / 4u;""")
rt, ct = ("wid.x", "wid.y") if SWAP else ("wid.y", "wid.x")
w(f"    let m0 = {rt} * {RM}u;")
w(f"    let strip = {ct};")
w(f"    let bbase = strip * p.k * {SWT}u + lane;")
for r in range(RM):
    w(f"    let ra{r} = (m0 + {r}u) * k4 + lane;")
for r in range(RM):
    for j in range(CV):
        w(f"    var s{r}_{j} = vec4<f32>(0.0);")
w(f"    for (var q0 = 0u; q0 < k4; q0 += {SG}u) {{")
for r in range(RM):
    w(f"        let x{r} = textureLoad(at, tl(ra{r} + q0), 0);")
w(f"        let bq = bbase + q0 * {4*SWT}u;")
for l in range(SG):
    for q in range(4):
        for j in range(CV):
            w(f"        let b{l}_{q}_{j} = textureLoad(bt, tl(bq + {(l*4+q)*SWT + j*SG}u), 0);")
for r in range(RM):
    for l in range(SG):
        w(f"        let v{l}_{r} = subgroupBroadcast(x{r}, {l}u);")
        for q, comp in enumerate("xyzw"):
            for j in range(CV):
                w(f"        s{r}_{j} = fma(vec4<f32>(v{l}_{r}.{comp}), b{l}_{q}_{j}, s{r}_{j});")
w("    }")
for r in range(RM):
    for j in range(CV):
        w(f"    c[(m0 + {r}u) * n4 + strip * {SWT}u + {j*SG}u + lane] = s{r}_{j};")
w("}")
print("\n".join(L))
