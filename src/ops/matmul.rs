//! Matrix multiply with fused bias + activation, its backward, and the kernel
//! choice per adapter. WGSL: `shaders/matmul.wgsl` (forward variants) and
//! `shaders/matmul_rowsum.wgsl` (bias gradients and batch reductions).
//!
//! `C = act(op(A) @ op(B) + bias)` where `op` optionally transposes:
//! A is `[M, K]` (`[K, M]` with `trans_a`) or batched `[Bt, M, K]`; B is
//! `[K, N]` (`[N, K]` with `trans_b`) or batched `[Bt, K, N]`. A 2-D operand
//! next to a 3-D one is shared by every batch entry (the usual "weight" case).
//! B may be stored as f16 (frozen base weights): it is widened to f32 on load
//! with `unpack2x16float`, which is core WGSL, so no adapter feature is needed;
//! accumulation is always f32.
//!
//! An optional rank-r term ([`LowRank`], LoRA's adapter) is fused into every kernel path:
//! `C = act(op(A) @ op(B) + bias + scale * H @ Fᵀ)` with H `[rows of C, r]` and F `[N, r]`
//! (or `[r, N]`), r <= [`LOWRANK_MAX`]. Each kernel adds the term to its accumulators in the
//! epilogue, before bias and activation (shaders/_lowrank.wgsl, included by matmul.wgsl and
//! the generated matmul_sg.wgsl); the texture path packs it into its operands as r extra K
//! steps (`[A | H] @ [B ; scale Fᵀ]`, shaders/matmul_tex_pack.wgsl), so mm_tex sums it in
//! its K loop. It is a compile-time constant (`LOWRANK`), so matmuls without it run the same
//! code as before. LoRA's backward uses the
//! same option for dX = dY W + (scale dY B) A (`Var::lora_linear`).
//!
//! Two kernel paths, chosen in one place (`Plan::for_gpu`):
//! - `Path::Register` (CPU adapters such as lavapipe): barrier-free register
//!   blocking; A rows depend only on the workgroup id so every SIMD lane reads
//!   the same A values, B is read as vec4 column groups. On a CPU adapter with
//!   8-lane subgroups the fastest kernel is `mm_tex` (`Plan::texture`,
//!   shaders/matmul_tex.wgsl): A and B are first packed into zero-padded
//!   rgba32float storage textures (shaders/matmul_tex_pack.wgsl, which also
//!   applies transposes and widens f16 B), because llvmpipe runs a storage-texture
//!   load as straight-line SIMD code but a storage-buffer load as a per-lane loop.
//!   Problems too small to repay the two packing dispatches (`Plan::tex_min_macs`)
//!   or too large for the adapter's texture limits take `mm_sg` or `mm_reg8`.
//! - `Path::Tiled` (real GPUs): 16x16 workgroups staging tiles of A and B in
//!   workgroup memory.
//!
//! Both take an `EDGE` constant: the aligned variant (M, N multiples of the
//! tile) skips clamping and store guards.

use anyhow::{bail, Result};

use crate::gpu::{check, div_ceil, shape_str, Binding, DType, Gpu, Kernel, Params, Tensor};
use crate::ops::Act;

/// Largest rank of a fused low-rank term ([`LowRank`]).
pub const LOWRANK_MAX: usize = 64;

/// A rank-r term fused into the matmul: `scale * H @ Fᵀ` is added to every output element
/// before bias and activation (LoRA: H = dropout(x) Aᵀ, F = B, scale = alpha / r).
#[derive(Clone, Copy, Debug)]
pub struct LowRank<'a> {
    /// f32 `[rows of C, r]`: `[M, r]`, or for a batched output `[Bt, M, r]` (or `[Bt * M, r]`);
    /// row i goes with output row i (batch entries stacked).
    pub h: &'a Tensor,
    /// f32 `[N, r]`, or `[r, N]` when `f_trans`; shared by every batch entry.
    pub f: &'a Tensor,
    pub f_trans: bool,
    pub scale: f32,
}

/// Options for [`matmul`]. `Default` is a plain `A @ B`.
#[derive(Clone, Copy, Debug, Default)]
pub struct MatmulOpts<'a> {
    /// A is stored `[K, M]` (per batch entry) and used transposed.
    pub trans_a: bool,
    /// B is stored `[N, K]` (per batch entry) and used transposed.
    pub trans_b: bool,
    /// Optional `[N]` f32 bias added before the activation.
    pub bias: Option<&'a Tensor>,
    /// Activation applied to the output.
    pub act: Act,
    /// Optional low-rank term `scale * H @ Fᵀ`, fused into the kernel's epilogue (1 <= r <=
    /// [`LOWRANK_MAX`]); `None` compiles the term out (`LOWRANK = false`).
    pub lowrank: Option<LowRank<'a>>,
}

/// Which kernel implementation runs a matmul.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Path {
    /// Barrier-free register blocking (CPU adapters).
    Register,
    /// Shared-memory tiling (GPUs).
    Tiled,
}

/// Tile shapes of both paths; `Plan::for_gpu` is the single place where an
/// adapter's choice is made.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub path: Path,
    /// Register path: rows per workgroup (and per invocation).
    pub rm: u32,
    /// Register path: vec4 column groups per invocation.
    pub cn: u32,
    /// Register path: invocations per workgroup (along N).
    pub wg: u32,
    /// Tiled path: output tile rows / columns (multiples of 16) and depth.
    pub tm: u32,
    pub tn: u32,
    pub tk: u32,
    /// Register path: use the hand-unrolled 8 x (2 vec4) kernel `mm_reg8`
    /// (requires rm = 8, cn = 2) instead of the generic loop kernel `mm_reg`.
    pub unrolled: bool,
    /// Register path: use the subgroup kernel `mm_sg` (shaders/matmul_sg.wgsl)
    /// where it applies (no transposes, f32 B, K and N multiples of 4, an
    /// adapter whose subgroups are exactly `SG_LANES` wide).
    pub subgroup: bool,
    /// Register path: use the texture-fed kernel `mm_tex` (shaders/matmul_tex.wgsl,
    /// operands packed by shaders/matmul_tex_pack.wgsl) where the packed operands fit
    /// the adapter's texture limits; it takes transposes, f16 B and any K, N.
    pub texture: bool,
    /// Texture path: only for problems of at least this many multiply-adds (M N K x batch)
    /// whose output is large next to the packed operands (`Plan::tex_pays`);
    /// otherwise packing costs more than it saves. 0: always (when the textures fit).
    pub tex_min_macs: usize,
}

/// Rows per workgroup of `mm_sg` (the generator's RM) and its subgroup width.
pub const SG_ROWS: usize = 32;
pub const SG_LANES: usize = 8;

/// Whether the adapter can run `mm_sg`.
pub fn subgroup_kernel_ok(gpu: &Gpu) -> bool {
    let i = gpu.info();
    gpu.has(wgpu::Features::SUBGROUP)
        && i.subgroup_min_size as usize == SG_LANES
        && i.subgroup_max_size as usize == SG_LANES
}

/// Rows per workgroup of `mm_tex` (the generator's RM), texels (4 columns each) per
/// packed B panel row, texels of K per unrolled chunk, and the packed textures' width.
pub const TEX_ROWS: usize = 16;
const TEX_PANEL: usize = 16;
const TEX_CHUNK: usize = 8;
const TEX_WIDTH: usize = 1024;
/// `Plan::tex_min_macs` of the adapter plan.
pub const TEX_MIN_MACS: usize = 1 << 18;
/// Multiply-adds per packed element (M N K / ((M + N) K)) below which packing does not pay:
/// on lavapipe [2560, 64] x [64, 64] ran 2.5x slower than `mm_sg` (ratio 62), [512]^3
/// (ratio 256) and [2560, 64] x [64, 1352] (ratio 885) 1.3x and 1.8x faster.
const TEX_MIN_RATIO: usize = 128;
/// Large problems (at least `TEX_LARGE_MACS` multiply-adds) amortize packing at a lower ratio:
/// TIGER's T5 shapes into d_model 128 (ratio 96-122) ran 2.6-2.8x faster on `mm_tex` than on
/// `mm_sg`, [2560, 256] x [256, 64] (ratio 62, 42 M MACs) 1.7x, while [2560, 64] x [64, 64]
/// (10.5 M MACs) stays slower (`genrec bench matmul`, docs/BENCHMARKS.md).
const TEX_MIN_RATIO_LARGE: usize = 32;
const TEX_LARGE_MACS: usize = 1 << 24;

impl Plan {
    /// Whether the texture path's packing pays off for `d` under this plan's threshold.
    fn tex_pays(&self, d: &Dims) -> bool {
        let macs = d.batch * d.m * d.n * d.k;
        let ratio_at_least = |r: usize| d.m * d.n >= r * (d.m + d.n);
        self.tex_min_macs == 0
            || (macs >= self.tex_min_macs
                && (ratio_at_least(TEX_MIN_RATIO) || (macs >= TEX_LARGE_MACS && ratio_at_least(TEX_MIN_RATIO_LARGE))))
    }
}

/// Whether the adapter can run `mm_tex`: a CPU adapter (where texture loads beat
/// storage-buffer loads) with 8-lane subgroups.
pub fn texture_kernel_ok(gpu: &Gpu) -> bool {
    gpu.is_cpu() && subgroup_kernel_ok(gpu)
}

impl Plan {
    /// The plan for an adapter: register blocking on CPU adapters, tiling otherwise.
    pub fn for_gpu(gpu: &Gpu) -> Plan {
        if gpu.is_cpu() {
            let sg = subgroup_kernel_ok(gpu);
            let texture = texture_kernel_ok(gpu);
            Plan { subgroup: sg, texture, tex_min_macs: TEX_MIN_MACS, ..Self::with_path(Path::Register) }
        } else {
            Self::with_path(Path::Tiled)
        }
    }
    /// The tile shapes used for a given path.
    pub fn with_path(path: Path) -> Plan {
        Plan {
            path,
            rm: 8,
            cn: 2,
            wg: 8,
            tm: 64,
            tn: 64,
            tk: 16,
            unrolled: true,
            subgroup: false,
            texture: false,
            tex_min_macs: 0,
        }
    }
    /// Output rows x columns covered by one workgroup.
    pub fn tile(&self) -> (usize, usize) {
        match self.path {
            Path::Register => (self.rm as usize, (self.wg * self.cn * 4) as usize),
            Path::Tiled => (self.tm as usize, self.tn as usize),
        }
    }

    fn kernel(&self, trans_a: bool, trans_b: bool, b_f16: bool, edge: bool, lowrank: bool) -> Kernel {
        let entry = match self.path {
            Path::Register if self.unrolled && self.rm == 8 && self.cn == 2 => "mm_reg8",
            Path::Register => "mm_reg",
            Path::Tiled => "mm_tiled",
        };
        // The tiled kernel always bounds-checks its loads; EDGE only matters to mm_reg.
        let edge = edge || self.path == Path::Tiled;
        Kernel::new("matmul", "matmul", entry)
            .define("TRANS_A", trans_a)
            .define("TRANS_B", trans_b)
            .define("B_F16", b_f16)
            .define("EDGE", edge)
            .define("LOWRANK", lowrank)
            .define("RM", format!("{}u", self.rm))
            .define("CN", format!("{}u", self.cn))
            .define("WG", format!("{}u", self.wg))
            .define("TM", format!("{}u", self.tm))
            .define("TN", format!("{}u", self.tn))
            .define("TK", format!("{}u", self.tk))
            // Every load index is clamped or bounds-checked; the tests cover
            // awkward shapes, transposes, batches and f16 on both paths.
            .trusted(true)
    }
}

fn sg_kernel(lowrank: bool) -> Kernel {
    // Loads are clamped to the matrix; stores (and the low-rank term) are guarded.
    Kernel::new("matmul", "matmul_sg", "mm_sg").define("LOWRANK", lowrank).trusted(true)
}

fn tex_kernel() -> Kernel {
    // Every texel index is inside the packed (zero-padded) textures by construction
    // (see the layout in shaders/matmul_tex.wgsl); bias and C accesses are guarded.
    // (A low-rank term needs no variant: it is packed into the operands as r extra K steps.)
    Kernel::new("matmul", "matmul_tex", "mm_tex").trusted(true)
}

fn pack_kernel(b_operand: bool, trans: bool, f16: bool, lowrank: bool) -> Kernel {
    // Source loads are guarded by the logical [rows, cols] bounds (and the low-rank
    // operand's by [rows, r] / [r, cols]); stores stay below `total`.
    Kernel::new("matmul", "matmul_tex_pack", if b_operand { "pack_b" } else { "pack_a" })
        .define("TRANS", trans)
        .define("F16", f16)
        .define("LOWRANK", lowrank)
        .trusted(true)
}

fn rowsum_kernel() -> Kernel {
    Kernel::new("matmul_rowsum", "matmul_rowsum", "rowsum").trusted(true)
}

/// Every kernel variant of this family (for naga validation).
pub fn kernels() -> Vec<Kernel> {
    let mut v = Vec::new();
    let generic = Plan { unrolled: false, ..Plan::with_path(Path::Register) };
    for plan in [Plan::with_path(Path::Register), generic, Plan::with_path(Path::Tiled)] {
        for ta in [false, true] {
            for tb in [false, true] {
                for f16 in [false, true] {
                    for edge in [false, true] {
                        for lowrank in [false, true] {
                            v.push(plan.kernel(ta, tb, f16, edge, lowrank));
                        }
                    }
                }
            }
        }
    }
    for lowrank in [false, true] {
        v.push(sg_kernel(lowrank));
    }
    v.push(tex_kernel());
    for b_operand in [false, true] {
        for trans in [false, true] {
            for f16 in [false, true] {
                if f16 && !b_operand {
                    continue; // A is always f32
                }
                for lowrank in [false, true] {
                    v.push(pack_kernel(b_operand, trans, f16, lowrank));
                }
            }
        }
    }
    v.push(rowsum_kernel());
    v
}

/// Problem dimensions derived from operand shapes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dims {
    pub batch: usize,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    /// Batch strides in elements (0: operand shared by all batch entries).
    pub sa: usize,
    pub sb: usize,
    pub out_shape: Vec<usize>,
}

/// Validate operand shapes and derive the problem dimensions.
pub fn dims(op: &str, a: &[usize], b: &[usize], trans_a: bool, trans_b: bool) -> Result<Dims> {
    let what = || {
        format!(
            "A {}{} and B {}{}",
            shape_str(a),
            if trans_a { " (transposed)" } else { "" },
            shape_str(b),
            if trans_b { " (transposed)" } else { "" }
        )
    };
    let split = |s: &[usize], name: &str| -> Result<(Option<usize>, usize, usize)> {
        match s.len() {
            2 => Ok((None, s[0], s[1])),
            3 => Ok((Some(s[0]), s[1], s[2])),
            _ => bail!("{op}: {name} must be 2-D or 3-D (batched); got {}", what()),
        }
    };
    let (ba, ar, ac) = split(a, "A")?;
    let (bb, br, bc) = split(b, "B")?;
    let (m, k) = if trans_a { (ac, ar) } else { (ar, ac) };
    let (kb, n) = if trans_b { (bc, br) } else { (br, bc) };
    if k != kb {
        bail!("{op}: inner dimensions differ (K = {k} for A, {kb} for B): {}", what());
    }
    let batch = match (ba, bb) {
        (Some(x), Some(y)) if x != y => bail!("{op}: batch sizes differ ({x} vs {y}): {}", what()),
        (Some(x), _) | (None, Some(x)) => x,
        (None, None) => 1,
    };
    if m == 0 || n == 0 || k == 0 || batch == 0 {
        bail!("{op}: empty operand: {}", what());
    }
    let out_shape = if ba.is_some() || bb.is_some() { vec![batch, m, n] } else { vec![m, n] };
    Ok(Dims {
        batch,
        m,
        k,
        n,
        sa: if ba.is_some() { m * k } else { 0 },
        sb: if bb.is_some() { k * n } else { 0 },
        out_shape,
    })
}

/// `C = act(op(A) @ op(B) + bias)` on the kernel path chosen for the adapter.
///
/// A: f32 `[M, K]` / `[K, M]` (trans_a) / `[Bt, ...]`; B: f32 or f16 `[K, N]` /
/// `[N, K]` (trans_b) / `[Bt, ...]`; a 2-D operand next to a 3-D one is shared
/// across the batch. bias: f32 `[N]`. Output f32 `[M, N]` or `[Bt, M, N]`.
pub fn matmul(a: &Tensor, b: &Tensor, opts: &MatmulOpts) -> Result<Tensor> {
    matmul_with_plan(a, b, opts, &Plan::for_gpu(a.gpu()))
}

/// [`matmul`] with an explicit plan (kernel path and tile shapes), for tests
/// and benchmarks of a path the adapter would not choose.
pub fn matmul_with_plan(a: &Tensor, b: &Tensor, opts: &MatmulOpts, plan: &Plan) -> Result<Tensor> {
    const OP: &str = "matmul";
    check::same_device(OP, &[a, b])?;
    check::dtype(OP, "A", a, DType::F32)?;
    if b.dtype() != DType::F32 && b.dtype() != DType::F16 {
        bail!("{OP}: B has dtype {:?}, expected F32 or F16 (shape {})", b.dtype(), shape_str(b.shape()));
    }
    let d = dims(OP, a.shape(), b.shape(), opts.trans_a, opts.trans_b)?;
    if let Some(bias) = opts.bias {
        check::same_device(OP, &[a, bias])?;
        check::dtype(OP, "bias", bias, DType::F32)?;
        if bias.shape() != [d.n] {
            bail!(
                "{OP}: bias has shape {}, expected [{}] (A {}, B {})",
                shape_str(bias.shape()),
                d.n,
                shape_str(a.shape()),
                shape_str(b.shape())
            );
        }
    }
    let lr = check_lowrank(OP, opts.lowrank.as_ref(), &d, a)?;
    let gpu = a.gpu();
    if plan.path == Path::Register && plan.texture && texture_kernel_ok(gpu) && plan.tex_pays(&d) {
        if let Some(out) = matmul_tex(a, b, opts, &d)? {
            return Ok(out);
        }
    }
    // The subgroup kernel (the fastest buffer kernel on CPU adapters) takes untransposed f32
    // operands only: when the shapes suit it, materialize the transposes with
    // `permute` (O(MK + KN) work against the product's O(MNK)).
    let sg_shape_ok = plan.path == Path::Register
        && plan.subgroup
        && b.dtype() == DType::F32
        && d.k % 4 == 0
        && d.n % 4 == 0
        && subgroup_kernel_ok(gpu);
    if sg_shape_ok && (opts.trans_a || opts.trans_b) {
        let t = |x: &Tensor| {
            let perm: &[usize] = if x.rank() == 3 { &[0, 2, 1] } else { &[1, 0] };
            crate::ops::permute::permute(x, perm)
        };
        let a2 = if opts.trans_a { t(a)? } else { a.clone() };
        let b2 = if opts.trans_b { t(b)? } else { b.clone() };
        let o2 = MatmulOpts { trans_a: false, trans_b: false, ..*opts };
        return matmul_with_plan(&a2, &b2, &o2, plan);
    }
    let out = Tensor::empty(gpu, &d.out_shape, DType::F32)?;
    let use_sg = plan.path == Path::Register
        && plan.subgroup
        && !opts.trans_a
        && !opts.trans_b
        && b.dtype() == DType::F32
        && d.k % 4 == 0
        && d.n % 4 == 0
        && subgroup_kernel_ok(gpu);
    let (tile_m, tile_n) = if use_sg { (SG_ROWS, SG_LANES * 4) } else { plan.tile() };
    let edge = d.m % tile_m != 0 || d.n % tile_n != 0;
    let kernel = if use_sg {
        sg_kernel(lr.is_some())
    } else {
        plan.kernel(opts.trans_a, opts.trans_b, b.dtype() == DType::F16, edge, lr.is_some())
    };
    let nx = div_ceil(d.n, tile_n);
    let ny = div_ceil(d.m, tile_m);
    let fold = ny.div_ceil(65535);
    let wy = ny.min(65535);
    let wz = d.batch * fold as usize;
    if wz > 65535 {
        bail!(
            "{OP}: batch {} x {} row-tile chunks exceeds 65535 workgroups (A {}, B {})",
            d.batch,
            fold,
            shape_str(a.shape()),
            shape_str(b.shape())
        );
    }
    let params = Params::new()
        .u(d.m)
        .u(d.n)
        .u(d.k)
        .u(d.batch)
        .u(d.sa)
        .u(d.sb)
        .u(opts.act.code() as usize)
        .u(opts.bias.is_some() as usize)
        .u(ny as usize)
        .u(fold as usize);
    let params = lowrank_params(params, lr.as_ref());
    let bias_buf = opts.bias.map(|t| t.buffer()).unwrap_or(a.buffer());
    // Without a low-rank term its two bindings hold a dummy (never read: LOWRANK = false).
    let (h_buf, f_buf) = lr.as_ref().map(|l| (l.h.buffer(), l.f.buffer())).unwrap_or((a.buffer(), a.buffer()));
    gpu.dispatch(
        &kernel,
        params.bytes(),
        &[a.buffer(), b.buffer(), bias_buf, out.buffer(), h_buf, f_buf],
        [nx, wy, wz as u32],
    )?;
    Ok(out)
}

/// Validate a low-rank term against the problem dimensions (see [`LowRank`]); returns it back.
fn check_lowrank<'a>(op: &str, lr: Option<&LowRank<'a>>, d: &Dims, a: &Tensor) -> Result<Option<LowRank<'a>>> {
    let Some(lr) = lr else { return Ok(None) };
    check::same_device(op, &[a, lr.h, lr.f])?;
    check::dtype(op, "low-rank H", lr.h, DType::F32)?;
    check::dtype(op, "low-rank F", lr.f, DType::F32)?;
    let (h, f) = (lr.h.shape(), lr.f.shape());
    let r = *h.last().unwrap_or(&0);
    if r == 0 || r > LOWRANK_MAX {
        bail!("{op}: low-rank H {} has rank {r}; the fused term takes 1 ..= {LOWRANK_MAX}", shape_str(h));
    }
    let rows = d.batch * d.m;
    if !(2..=3).contains(&h.len()) || lr.h.numel() != rows * r {
        bail!(
            "{op}: low-rank H has shape {}, expected [{}, {r}] (one row per output row of {})",
            shape_str(h),
            rows,
            shape_str(&d.out_shape)
        );
    }
    let want_f = if lr.f_trans { [r, d.n] } else { [d.n, r] };
    if f != want_f {
        bail!(
            "{op}: low-rank F has shape {}, expected {}{} for H {} and N = {}",
            shape_str(f),
            shape_str(&want_f),
            if lr.f_trans { " (f_trans)" } else { "" },
            shape_str(h),
            d.n
        );
    }
    if !lr.scale.is_finite() {
        bail!("{op}: low-rank scale {} is not finite", lr.scale);
    }
    Ok(Some(*lr))
}

/// Append the low-rank fields (lr_r, lr_ftrans, lr_scale) every matmul kernel's `Params` ends with.
fn lowrank_params(p: Params, lr: Option<&LowRank>) -> Params {
    match lr {
        Some(l) => p.u(l.h.last_dim()).u(l.f_trans as usize).f(l.scale),
        None => p.u(0).u(0).f(0.0),
    }
}

/// An rgba32float storage texture (from the device's pool) holding at least `texels`
/// vec4 texels as a linear array: texel i at (i % TEX_WIDTH, i / TEX_WIDTH). The height
/// is rounded up to a power of two (at most `max_height`) so that nearby shapes share
/// pooled textures.
fn packed_texture(gpu: &Gpu, texels: usize, max_height: usize) -> wgpu::Texture {
    let rows = texels.div_ceil(TEX_WIDTH).max(1);
    gpu.take_texture(TEX_WIDTH as u32, rows.next_power_of_two().min(max_height).max(rows) as u32)
}

/// A grid of `groups` workgroups folded into x and y (x at most 65535).
fn fold_grid(groups: usize) -> [u32; 3] {
    let gx = groups.clamp(1, 65535);
    [gx as u32, groups.div_ceil(gx) as u32, 1]
}

/// The texture path (`mm_tex`): pack A and B into zero-padded textures, then one
/// dispatch. `None` when the packed operands exceed the adapter's texture limits
/// (the caller falls back to the buffer kernels).
///
/// A low-rank term (`opts.lowrank`) is packed into the operands as r extra K steps,
/// `[A | H] @ [B ; scale Fᵀ]`, so mm_tex sums it in its K loop into the same accumulators
/// (no kernel variant; the cost is K + r rounded up to whole 32-deep chunks).
fn matmul_tex(a: &Tensor, b: &Tensor, opts: &MatmulOpts, d: &Dims) -> Result<Option<Tensor>> {
    const OP: &str = "matmul";
    let gpu = a.gpu();
    let lr = opts.lowrank.as_ref();
    let r = lr.map(|l| l.h.last_dim()).unwrap_or(0);
    // Padded sizes: K (+ r) to whole chunks, M to whole row tiles, N to whole panels.
    let kp4 = (d.k + r).div_ceil(4 * TEX_CHUNK) * TEX_CHUNK;
    let mp = d.m.div_ceil(TEX_ROWS) * TEX_ROWS;
    let ns = d.n.div_ceil(4 * TEX_PANEL);
    // H has a row per output row: with it, a shared A is packed once per batch entry.
    let a_batched = d.sa != 0 || (lr.is_some() && d.batch > 1);
    let a_entries = if a_batched { d.batch } else { 1 };
    let b_entries = if d.sb != 0 { d.batch } else { 1 };
    let a_texels = a_entries * mp * kp4;
    let b_texels = b_entries * ns * 4 * kp4 * TEX_PANEL;
    let max_height = gpu.limits().max_texture_dimension_2d as usize;
    let max_texels = TEX_WIDTH * max_height;
    if a_texels > max_texels || b_texels > max_texels {
        return Ok(None);
    }
    let ny = mp / TEX_ROWS;
    let fold = ny.div_ceil(65535);
    let wz = d.batch * fold;
    if wz > 65535 {
        return Ok(None);
    }
    let a_tex = packed_texture(gpu, a_texels, max_height);
    let b_tex = packed_texture(gpu, b_texels, max_height);
    let at = a_tex.create_view(&Default::default());
    let bt = b_tex.create_view(&Default::default());
    // pack_a: logical A is [M, K] ([K, M] stored when transposed).
    // The low-rank operands (H for A, F for B), a dummy when there are none.
    let (h_buf, f_buf) = lr.map(|l| (l.h.buffer(), l.f.buffer())).unwrap_or((a.buffer(), a.buffer()));
    let pa = Params::new().u(d.m).u(d.k).u(mp).u(kp4).u(d.sa).u(a_texels);
    let grid = fold_grid(a_texels.div_ceil(64));
    let pa = pa.u(grid[0] as usize).u(r).u(0).f(0.0);
    gpu.dispatch_with(
        &pack_kernel(false, opts.trans_a, false, lr.is_some()),
        pa.bytes(),
        &[Binding::Buffer(a.buffer()), Binding::Texture(&at), Binding::Buffer(h_buf)],
        grid,
    )?;
    // pack_b: logical B is [K, N] ([N, K] stored when transposed), in panels of 4 TEX_PANEL columns.
    let pb = Params::new().u(d.k).u(d.n).u(ns).u(4 * kp4).u(d.sb).u(b_texels);
    let grid = fold_grid(b_texels.div_ceil(64));
    let pb = pb.u(grid[0] as usize).u(r).u(lr.map(|l| l.f_trans as usize).unwrap_or(0));
    let pb = pb.f(lr.map(|l| l.scale).unwrap_or(0.0));
    gpu.dispatch_with(
        &pack_kernel(true, opts.trans_b, b.dtype() == DType::F16, lr.is_some()),
        pb.bytes(),
        &[Binding::Buffer(b.buffer()), Binding::Texture(&bt), Binding::Buffer(f_buf)],
        grid,
    )?;
    let out = Tensor::empty(gpu, &d.out_shape, DType::F32)?;
    let params = Params::new()
        .u(d.m)
        .u(d.n)
        .u(kp4)
        .u(mp)
        .u(ns)
        .u(a_batched as usize)
        .u((d.sb != 0) as usize)
        .u(opts.act.code() as usize)
        .u(opts.bias.is_some() as usize)
        .u(ny)
        .u(fold);
    let bias_buf = opts.bias.map(|t| t.buffer()).unwrap_or(a.buffer());
    gpu.dispatch_with(
        &tex_kernel(),
        params.bytes(),
        &[Binding::Texture(&at), Binding::Texture(&bt), Binding::Buffer(bias_buf), Binding::Buffer(out.buffer())],
        [ns as u32, ny.min(65535) as u32, wz as u32],
    )
    .map_err(|e| e.context(format!("{OP}: texture kernel for {:?}", d)))?;
    // Their uses are recorded: later work that takes them again is ordered after these.
    gpu.give_back_texture(a_tex);
    gpu.give_back_texture(b_tex);
    Ok(Some(out))
}

/// Sum over rows: `x` viewed as `[rows, cols]` -> `[cols]`.
fn rowsum(op: &str, x: &Tensor, rows: usize, cols: usize, out_shape: &[usize]) -> Result<Tensor> {
    if rows * cols != x.numel() {
        bail!("{op}: cannot sum {} as [{rows}, {cols}]", shape_str(x.shape()));
    }
    let gpu = x.gpu();
    let out = Tensor::empty(gpu, out_shape, DType::F32)?;
    let groups = cols.div_ceil(64);
    let gx = groups.min(65535);
    let gy = groups.div_ceil(gx);
    let params = Params::new().u(rows).u(cols).u(gx);
    gpu.dispatch(&rowsum_kernel(), params.bytes(), &[x.buffer(), out.buffer()], [gx as u32, gy as u32, 1])?;
    Ok(out)
}

/// Gradients of `C_pre = op(A) @ op(B) + bias` given `dy = dL/dC_pre` (the
/// gradient wrt the pre-activation output; the activation's derivative is
/// applied elsewhere).
///
/// Returns `(dA, dB, dbias)`, each `Some` only when asked for. dA has A's shape
/// (and layout: `[K, M]` when `trans_a`), dB has B's shape in f32 (summed over
/// the batch when a 2-D B was shared by a 3-D A; likewise dA for a shared A),
/// dbias is `[N]` (summed over all rows). An f16 B is supported except for dA
/// with `trans_a` (B would have to be the first operand, which is f32 only).
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward(
    a: &Tensor,
    b: &Tensor,
    dy: &Tensor,
    trans_a: bool,
    trans_b: bool,
    need_da: bool,
    need_db: bool,
    need_dbias: bool,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    const OP: &str = "matmul_backward";
    check::same_device(OP, &[a, b, dy])?;
    check::dtype(OP, "A", a, DType::F32)?;
    check::dtype(OP, "dy", dy, DType::F32)?;
    if b.dtype() != DType::F32 && b.dtype() != DType::F16 {
        bail!("{OP}: B has dtype {:?}, expected F32 or F16 (shape {})", b.dtype(), shape_str(b.shape()));
    }
    let d = dims(OP, a.shape(), b.shape(), trans_a, trans_b)?;
    if dy.shape() != d.out_shape.as_slice() {
        bail!(
            "{OP}: dy has shape {}, expected {} for A {} and B {}",
            shape_str(dy.shape()),
            shape_str(&d.out_shape),
            shape_str(a.shape()),
            shape_str(b.shape())
        );
    }
    let plain = |ta: bool, tb: bool| MatmulOpts { trans_a: ta, trans_b: tb, ..Default::default() };
    let a_shared = a.rank() == 2 && d.batch > 1 && dy.rank() == 3;
    let b_shared = b.rank() == 2 && d.batch > 1 && dy.rank() == 3;
    let batched = d.out_shape.len() == 3;

    let da = if need_da {
        if trans_a && b.dtype() == DType::F16 {
            bail!("{OP}: dA with trans_a needs an f32 B (B {} is f16)", shape_str(b.shape()));
        }
        let g = if a_shared && !trans_a && b.rank() == 3 {
            // dA = sum_b dY_b @ op(B_b)^T: a shared A means B is batched; reduce below.
            matmul(dy, b, &plain(false, !trans_b))?
        } else if !trans_a {
            matmul(dy, b, &plain(false, !trans_b))?
        } else {
            // A stored [K, M]: dA = op(B) @ dY^T.
            matmul(b, dy, &plain(trans_b, true))?
        };
        Some(if a_shared { rowsum(OP, &g, d.batch, d.m * d.k, a.shape())? } else { g.reshape(a.shape())? })
    } else {
        None
    };

    let db = if need_db {
        let g = if b_shared && !trans_a {
            // Shared weight: fold the batch into the reduction dimension.
            let a2 = a.reshape(&[d.batch * d.m, d.k])?;
            let dy2 = dy.reshape(&[d.batch * d.m, d.n])?;
            if trans_b {
                matmul(&dy2, &a2, &plain(true, false))?
            } else {
                matmul(&a2, &dy2, &plain(true, false))?
            }
        } else {
            let g =
                if trans_b { matmul(dy, a, &plain(true, trans_a))? } else { matmul(a, dy, &plain(!trans_a, false))? };
            if b_shared {
                rowsum(OP, &g, d.batch, d.k * d.n, b.shape())?
            } else {
                g
            }
        };
        Some(g.reshape(b.shape())?)
    } else {
        None
    };

    let dbias = if need_dbias {
        let rows = if batched { d.batch * d.m } else { d.m };
        Some(rowsum(OP, dy, rows, d.n, &[d.n])?)
    } else {
        None
    };
    Ok((da, db, dbias))
}

/// The low-rank term of [`matmul_ref`] (see [`LowRank`]): h `[rows of C, r]`, f `[N, r]`
/// (`[r, N]` with f_trans), row-major.
#[derive(Clone, Copy, Debug)]
pub struct LowRankRef<'a> {
    pub h: &'a [f64],
    pub f: &'a [f64],
    pub r: usize,
    pub f_trans: bool,
    pub scale: f64,
}

/// CPU reference in f64: `act(op(A) @ op(B) + bias + scale H Fᵀ)` with the shapes and
/// broadcasting rules of [`matmul`]. Returns the output in row-major order.
#[allow(clippy::too_many_arguments)]
pub fn matmul_ref(
    a: &[f64],
    a_shape: &[usize],
    b: &[f64],
    b_shape: &[usize],
    trans_a: bool,
    trans_b: bool,
    bias: Option<&[f64]>,
    act: Act,
    lowrank: Option<LowRankRef>,
) -> Result<Vec<f64>> {
    let d = dims("matmul_ref", a_shape, b_shape, trans_a, trans_b)?;
    if let Some(l) = &lowrank {
        if l.h.len() != d.batch * d.m * l.r || l.f.len() != d.n * l.r {
            bail!(
                "matmul_ref: low-rank H has {} values and F {}, expected {} and {}",
                l.h.len(),
                l.f.len(),
                d.batch * d.m * l.r,
                d.n * l.r
            );
        }
    }
    let mut out = vec![0f64; d.batch * d.m * d.n];
    for bt in 0..d.batch {
        let (ab, bb) = (bt * d.sa, bt * d.sb);
        for i in 0..d.m {
            for j in 0..d.n {
                let mut s = 0f64;
                for k in 0..d.k {
                    let av = if trans_a { a[ab + k * d.m + i] } else { a[ab + i * d.k + k] };
                    let bv = if trans_b { b[bb + j * d.k + k] } else { b[bb + k * d.n + j] };
                    s += av * bv;
                }
                if let Some(l) = &lowrank {
                    let row = bt * d.m + i;
                    let mut t = 0f64;
                    for q in 0..l.r {
                        let fv = if l.f_trans { l.f[q * d.n + j] } else { l.f[j * l.r + q] };
                        t += l.h[row * l.r + q] * fv;
                    }
                    s += l.scale * t;
                }
                if let Some(bias) = bias {
                    s += bias[j];
                }
                out[(bt * d.m + i) * d.n + j] = act.apply_f64(s);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_close, finite_diff, rand_vec};

    fn f64s(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&v| v as f64).collect()
    }
    fn f32s(x: &[f64]) -> Vec<f32> {
        x.iter().map(|&v| v as f32).collect()
    }
    fn round_f16(x: &[f32]) -> Vec<f32> {
        x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect()
    }

    /// Run one case on `path` and compare with the CPU reference.
    #[allow(clippy::too_many_arguments)]
    fn check_case(
        plan: Plan,
        a_shape: &[usize],
        b_shape: &[usize],
        ta: bool,
        tb: bool,
        with_bias: bool,
        act: Act,
        b_f16: bool,
        seed: u64,
    ) {
        let Operands { av, bv, a, b, d, biasv, bias, .. } = operands(a_shape, b_shape, (ta, tb), b_f16, seed);
        let opts = MatmulOpts { trans_a: ta, trans_b: tb, bias: with_bias.then_some(&bias), act, lowrank: None };
        let got = matmul_with_plan(&a, &b, &opts, &plan).unwrap();
        assert_eq!(got.shape(), d.out_shape.as_slice());
        let want = matmul_ref(
            &f64s(&av),
            a_shape,
            &f64s(&bv),
            b_shape,
            ta,
            tb,
            with_bias.then_some(&f64s(&biasv)[..]),
            act,
            None,
        )
        .unwrap();
        let what = format!("{plan:?} A{a_shape:?} B{b_shape:?} ta={ta} tb={tb} bias={with_bias} {act:?} f16={b_f16}");
        // Sums of K products of values in [-1, 1]: absolute error grows ~ sqrt(K) eps.
        let atol = 2e-6 * (d.k as f32).sqrt().max(1.0);
        assert_close(&what, &got.to_vec_f32().unwrap(), &f32s(&want), 1e-5, atol);
    }

    /// Every kernel variant: register (unrolled, loops, subgroup where the
    /// adapter allows it) and tiled.
    fn plans() -> Vec<Plan> {
        let reg = Plan::with_path(Path::Register);
        let mut v = vec![reg, Plan { unrolled: false, ..reg }, Plan::with_path(Path::Tiled)];
        if subgroup_kernel_ok(&Gpu::shared().unwrap()) {
            v.push(Plan { subgroup: true, ..reg });
        }
        if texture_kernel_ok(&Gpu::shared().unwrap()) {
            v.push(Plan { subgroup: true, texture: true, ..reg });
        }
        v
    }

    /// Random A, B (B rounded to f16 and stored as f16 when `b_f16`) and bias [N], with the
    /// host copies the CPU reference reads.
    struct Operands {
        gpu: Gpu,
        av: Vec<f32>,
        bv: Vec<f32>,
        a: Tensor,
        b: Tensor,
        d: Dims,
        biasv: Vec<f32>,
        bias: Tensor,
    }

    fn operands(a_shape: &[usize], b_shape: &[usize], (ta, tb): (bool, bool), b_f16: bool, seed: u64) -> Operands {
        let gpu = Gpu::shared().unwrap();
        let av = rand_vec(seed, a_shape.iter().product(), 1.0);
        let mut bv = rand_vec(seed + 1, b_shape.iter().product(), 1.0);
        let a = Tensor::from_f32(&gpu, &av, a_shape).unwrap();
        let b = if b_f16 {
            bv = round_f16(&bv);
            Tensor::from_f32_as_f16(&gpu, &bv, b_shape).unwrap()
        } else {
            Tensor::from_f32(&gpu, &bv, b_shape).unwrap()
        };
        let d = dims("t", a_shape, b_shape, ta, tb).unwrap();
        let biasv = rand_vec(seed + 2, d.n, 1.0);
        let bias = Tensor::from_f32(&gpu, &biasv, &[d.n]).unwrap();
        Operands { gpu, av, bv, a, b, d, biasv, bias }
    }

    fn shape2(rows: usize, cols: usize, trans: bool) -> Vec<usize> {
        if trans {
            vec![cols, rows]
        } else {
            vec![rows, cols]
        }
    }

    #[test]
    fn all_transposes_awkward_sizes_both_paths() {
        let sizes = [(1, 1, 1), (7, 33, 5), (33, 7, 257), (1, 257, 7), (65, 20, 129), (9, 4, 70)];
        for plan in plans() {
            for (i, &(m, k, n)) in sizes.iter().enumerate() {
                for ta in [false, true] {
                    for tb in [false, true] {
                        check_case(
                            plan,
                            &shape2(m, k, ta),
                            &shape2(k, n, tb),
                            ta,
                            tb,
                            false,
                            Act::None,
                            false,
                            i as u64,
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn aligned_fast_path_both_paths() {
        // Multiples of both tiles (8 x 64 and 64 x 64) take the EDGE = false variant.
        for plan in plans() {
            let (tm, tn) = plan.tile();
            assert_eq!((64 % tm, 128 % tn), (0, 0));
            for ta in [false, true] {
                for tb in [false, true] {
                    check_case(plan, &shape2(64, 36, ta), &shape2(36, 128, tb), ta, tb, false, Act::None, false, 11);
                }
            }
            check_case(plan, &[128, 256], &[256, 64], false, false, true, Act::Relu, false, 12);
        }
    }

    #[test]
    fn batched_and_broadcast() {
        for plan in plans() {
            for ta in [false, true] {
                for tb in [false, true] {
                    let a3 = [vec![3], shape2(7, 10, ta)].concat();
                    let b3 = [vec![3], shape2(10, 33, tb)].concat();
                    check_case(plan, &a3, &b3, ta, tb, true, Act::None, false, 20);
                    check_case(plan, &a3, &shape2(10, 33, tb), ta, tb, true, Act::None, false, 21);
                    check_case(plan, &shape2(7, 10, ta), &b3, ta, tb, false, Act::None, false, 22);
                }
            }
            // Aligned batched shapes.
            check_case(plan, &[2, 64, 16], &[16, 128], false, false, false, Act::None, false, 23);
        }
    }

    #[test]
    fn subgroup_kernel_edges() {
        // mm_sg: M not a multiple of its 32 rows, N % 4 == 0 but not a multiple of
        // 32 columns, K % 32 != 0 (remainder quads), batches, shared operands, bias.
        let gpu = Gpu::shared().unwrap();
        if !subgroup_kernel_ok(&gpu) {
            eprintln!("adapter subgroups are not {SG_LANES} wide: mm_sg not tested");
            return;
        }
        let plan = Plan { subgroup: true, ..Plan::with_path(Path::Register) };
        for &(m, k, n) in &[(1, 4, 4), (33, 36, 12), (70, 100, 44), (32, 64, 32), (65, 260, 96)] {
            check_case(plan, &[m, k], &[k, n], false, false, true, Act::Gelu, false, 90);
        }
        check_case(plan, &[3, 9, 40], &[3, 40, 20], false, false, true, Act::None, false, 91);
        check_case(plan, &[3, 9, 40], &[40, 20], false, false, false, Act::Relu, false, 92);
        check_case(plan, &[9, 40], &[3, 40, 20], false, false, true, Act::None, false, 93);
    }

    #[test]
    fn texture_kernel_edges() {
        // mm_tex: M not a multiple of its 16 rows, N not a multiple of its 64-column panels
        // (nor of 4), K not a multiple of its 32-deep chunks (nor of 4), several chunks,
        // transposes, f16 B, batches with shared operands, bias + activation.
        let gpu = Gpu::shared().unwrap();
        if !texture_kernel_ok(&gpu) {
            eprintln!("not a CPU adapter with 8-lane subgroups: mm_tex not tested");
            return;
        }
        let plan = Plan { subgroup: true, texture: true, ..Plan::with_path(Path::Register) };
        for &(m, k, n) in &[(1, 1, 1), (7, 33, 257), (33, 257, 7), (17, 64, 65), (16, 96, 128), (257, 7, 33)] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                check_case(plan, &shape2(m, k, ta), &shape2(k, n, tb), ta, tb, true, Act::Gelu, false, 95);
            }
            check_case(plan, &[m, k], &shape2(k, n, true), false, true, false, Act::None, true, 96);
        }
        check_case(plan, &[3, 9, 40], &[3, 40, 70], false, false, true, Act::None, false, 97);
        check_case(plan, &[3, 40, 9], &[40, 70], true, false, false, Act::Relu, false, 98);
        check_case(plan, &[9, 40], &[3, 70, 40], false, true, true, Act::None, true, 99);
    }

    #[test]
    fn texture_path_falls_back_when_operands_exceed_texture_limits() {
        // A [M, 1] packs to M x 8 texels: past the adapter's 2-D texture limit the launcher
        // must take the buffer kernels (same result).
        let gpu = Gpu::shared().unwrap();
        if !texture_kernel_ok(&gpu) {
            eprintln!("not a CPU adapter with 8-lane subgroups: mm_tex not tested");
            return;
        }
        let m = TEX_WIDTH * gpu.limits().max_texture_dimension_2d as usize / TEX_CHUNK + 1;
        let d = dims("t", &[m, 1], &[1, 2], false, false).unwrap();
        let a = Tensor::from_f32(&gpu, &vec![0.5; m], &[m, 1]).unwrap();
        let b = Tensor::from_f32(&gpu, &[2.0, -1.0], &[1, 2]).unwrap();
        assert!(matmul_tex(&a, &b, &MatmulOpts::default(), &d).unwrap().is_none());
        let plan = Plan { subgroup: true, texture: true, ..Plan::with_path(Path::Register) };
        let got = matmul_with_plan(&a, &b, &MatmulOpts::default(), &plan).unwrap().to_vec_f32().unwrap();
        assert_eq!(got.len(), 2 * m);
        assert!(got.chunks(2).all(|r| r == [1.0, -0.5]));
    }

    #[test]
    fn bias_and_every_activation() {
        for plan in plans() {
            for act in [Act::None, Act::Relu, Act::Gelu, Act::GeluTanh, Act::Silu, Act::Sigmoid, Act::Tanh] {
                check_case(plan, &[17, 12], &[12, 9], false, false, true, act, false, 30);
                check_case(plan, &[2, 8, 12], &[12, 64], false, false, true, act, false, 31);
            }
        }
    }

    #[test]
    fn f16_weights() {
        for plan in plans() {
            for tb in [false, true] {
                for ta in [false, true] {
                    check_case(plan, &shape2(33, 7, ta), &shape2(7, 5, tb), ta, tb, true, Act::Silu, true, 40);
                    check_case(plan, &shape2(16, 24, ta), &shape2(24, 128, tb), ta, tb, false, Act::None, true, 41);
                }
                check_case(plan, &[2, 5, 257], &shape2(257, 33, tb), false, tb, true, Act::None, true, 42);
            }
        }
    }

    #[test]
    fn row_tiles_fold_past_65535_workgroups() {
        // 8 rows per workgroup on the register path: 524,289 rows need 65,537 row tiles.
        let gpu = Gpu::shared().unwrap();
        let m = 65536 * 8 + 1;
        let av = rand_vec(50, m, 1.0);
        let bv = rand_vec(51, 3, 1.0);
        let a = Tensor::from_f32(&gpu, &av, &[m, 1]).unwrap();
        let b = Tensor::from_f32(&gpu, &bv, &[1, 3]).unwrap();
        for plan in plans() {
            let got = matmul_with_plan(&a, &b, &MatmulOpts::default(), &plan).unwrap().to_vec_f32().unwrap();
            let want: Vec<f32> = av.iter().flat_map(|&x| bv.iter().map(move |&y| x * y)).collect();
            assert_close(&format!("{plan:?} fold"), &got, &want, 1e-6, 0.0);
        }
    }

    #[test]
    fn auto_path_matches_reference() {
        check_case(Plan::for_gpu(&Gpu::shared().unwrap()), &[5, 6], &[7, 6], false, true, true, Act::Gelu, false, 60);
    }

    /// FD check of matmul_backward for one configuration.
    fn check_backward(a_shape: &[usize], b_shape: &[usize], ta: bool, tb: bool, seed: u64) {
        let gpu = Gpu::shared().unwrap();
        let na: usize = a_shape.iter().product();
        let nb: usize = b_shape.iter().product();
        let d = dims("t", a_shape, b_shape, ta, tb).unwrap();
        let nout = d.batch * d.m * d.n;
        let av = rand_vec(seed, na, 1.0);
        let bv = rand_vec(seed + 1, nb, 1.0);
        let biasv = rand_vec(seed + 2, d.n, 1.0);
        let r = rand_vec(seed + 3, nout, 1.0);
        let loss = |a: &[f64], b: &[f64], bias: &[f64]| -> f64 {
            let out = matmul_ref(a, a_shape, b, b_shape, ta, tb, Some(bias), Act::None, None).unwrap();
            out.iter().zip(&r).map(|(o, &w)| o * w as f64).sum()
        };
        let (a64, b64, bias64) = (f64s(&av), f64s(&bv), f64s(&biasv));
        let want_da = finite_diff(&av, 1e-3, |x| loss(x, &b64, &bias64));
        let want_db = finite_diff(&bv, 1e-3, |x| loss(&a64, x, &bias64));
        let want_dbias = finite_diff(&biasv, 1e-3, |x| loss(&a64, &b64, x));

        let a = Tensor::from_f32(&gpu, &av, a_shape).unwrap();
        let b = Tensor::from_f32(&gpu, &bv, b_shape).unwrap();
        let dy = Tensor::from_f32(&gpu, &r, &d.out_shape).unwrap();
        let (da, db, dbias) = matmul_backward(&a, &b, &dy, ta, tb, true, true, true).unwrap();
        let (da, db, dbias) = (da.unwrap(), db.unwrap(), dbias.unwrap());
        let what = format!("A{a_shape:?} B{b_shape:?} ta={ta} tb={tb}");
        assert_eq!(da.shape(), a_shape);
        assert_eq!(db.shape(), b_shape);
        assert_close(&format!("dA {what}"), &da.to_vec_f32().unwrap(), &want_da, 1e-3, 1e-4);
        assert_close(&format!("dB {what}"), &db.to_vec_f32().unwrap(), &want_db, 1e-3, 1e-4);
        assert_close(&format!("dbias {what}"), &dbias.to_vec_f32().unwrap(), &want_dbias, 1e-3, 1e-4);
    }

    #[test]
    fn backward_matches_finite_differences() {
        for ta in [false, true] {
            for tb in [false, true] {
                check_backward(&shape2(5, 7, ta), &shape2(7, 6, tb), ta, tb, 70);
                let a3 = [vec![2], shape2(3, 7, ta)].concat();
                let b3 = [vec![2], shape2(7, 5, tb)].concat();
                check_backward(&a3, &b3, ta, tb, 71);
                // Shared weight B (summed over the batch) and shared A.
                check_backward(&a3, &shape2(7, 5, tb), ta, tb, 72);
                check_backward(&shape2(3, 7, ta), &b3, ta, tb, 73);
            }
        }
    }

    #[test]
    fn backward_with_f16_weight_and_partial_requests() {
        let gpu = Gpu::shared().unwrap();
        let av = rand_vec(80, 2 * 4 * 9, 1.0);
        let bv = round_f16(&rand_vec(81, 9 * 6, 1.0));
        let r = rand_vec(82, 2 * 4 * 6, 1.0);
        let a = Tensor::from_f32(&gpu, &av, &[2, 4, 9]).unwrap();
        let b16 = Tensor::from_f32_as_f16(&gpu, &bv, &[6, 9]).unwrap();
        let b32 = Tensor::from_f32(&gpu, &bv, &[6, 9]).unwrap();
        let dy = Tensor::from_f32(&gpu, &r, &[2, 4, 6]).unwrap();
        let (da16, db16, dbias) = matmul_backward(&a, &b16, &dy, false, true, true, false, false).unwrap();
        assert!(db16.is_none() && dbias.is_none());
        let (da32, _, _) = matmul_backward(&a, &b32, &dy, false, true, true, false, false).unwrap();
        assert_close(
            "dA f16 B",
            &da16.unwrap().to_vec_f32().unwrap(),
            &da32.unwrap().to_vec_f32().unwrap(),
            1e-6,
            1e-6,
        );
        let at = Tensor::from_f32(&gpu, &av[..36], &[9, 4]).unwrap();
        let e = matmul_backward(&at, &b16, &dy.reshape(&[2, 4, 6]).unwrap(), true, true, true, false, false);
        assert!(e.is_err());
    }

    /// One case with a fused low-rank term (rank r, F as [N, r] or [r, N]) on `plan`, against
    /// the CPU reference.
    #[allow(clippy::too_many_arguments)]
    fn check_lowrank_case(
        plan: Plan,
        a_shape: &[usize],
        b_shape: &[usize],
        (ta, tb): (bool, bool),
        (with_bias, act, b_f16): (bool, Act, bool),
        r: usize,
        f_trans: bool,
        seed: u64,
    ) {
        let Operands { gpu, av, bv, a, b, d, biasv, bias } = operands(a_shape, b_shape, (ta, tb), b_f16, seed);
        // H follows the output's rows: [Bt, M, r] for a batched output, else [M, r].
        let h_shape = if d.out_shape.len() == 3 { vec![d.batch, d.m, r] } else { vec![d.m, r] };
        let hv = rand_vec(seed + 3, d.batch * d.m * r, 1.0);
        let fv = rand_vec(seed + 4, d.n * r, 1.0);
        let h = Tensor::from_f32(&gpu, &hv, &h_shape).unwrap();
        let f = Tensor::from_f32(&gpu, &fv, &shape2(d.n, r, f_trans)).unwrap();
        let scale = 0.75;
        let opts = MatmulOpts {
            trans_a: ta,
            trans_b: tb,
            bias: with_bias.then_some(&bias),
            act,
            lowrank: Some(LowRank { h: &h, f: &f, f_trans, scale }),
        };
        let got = matmul_with_plan(&a, &b, &opts, &plan).unwrap();
        assert_eq!(got.shape(), d.out_shape.as_slice());
        let (h64, f64_) = (f64s(&hv), f64s(&fv));
        let lr = LowRankRef { h: &h64, f: &f64_, r, f_trans, scale: scale as f64 };
        let want = matmul_ref(
            &f64s(&av),
            a_shape,
            &f64s(&bv),
            b_shape,
            ta,
            tb,
            with_bias.then_some(&f64s(&biasv)[..]),
            act,
            Some(lr),
        )
        .unwrap();
        let what = format!(
            "{plan:?} A{a_shape:?} B{b_shape:?} ta={ta} tb={tb} bias={with_bias} {act:?} f16={b_f16} r={r} f_trans={f_trans}"
        );
        let atol = 2e-6 * ((d.k + r) as f32).sqrt().max(1.0);
        assert_close(&what, &got.to_vec_f32().unwrap(), &f32s(&want), 1e-5, atol);
    }

    #[test]
    fn lowrank_term_every_path_awkward_shapes() {
        // M, N, K off every tile (8/32/16 rows, 64/32/64 columns, 4/32-deep K), K and N % 4
        // both 0 and not (the subgroup kernel only takes the former), r = 1, 7, 16.
        let sizes = [(7, 33, 5), (33, 36, 12), (65, 20, 129), (9, 4, 70), (17, 64, 65)];
        for plan in plans() {
            for (i, &(m, k, n)) in sizes.iter().enumerate() {
                for (j, r) in [1, 7, 16].into_iter().enumerate() {
                    let f_trans = (i + j) % 2 == 1;
                    // Every transpose pair for the first size; the others cycle through them
                    // (each (size, r) case still compiles and checks its own kernel variant).
                    let pairs = [(false, false), (true, false), (false, true), (true, true)];
                    let chosen = if i == 0 { &pairs[..] } else { &pairs[(i + j) % 4..(i + j) % 4 + 1] };
                    for &(ta, tb) in chosen {
                        let shapes = (shape2(m, k, ta), shape2(k, n, tb));
                        let epi = (i % 2 == 0, if j == 1 { Act::Gelu } else { Act::None }, false);
                        check_lowrank_case(plan, &shapes.0, &shapes.1, (ta, tb), epi, r, f_trans, 100 + i as u64);
                    }
                }
            }
        }
    }

    #[test]
    fn lowrank_term_aligned_batched_f16() {
        for plan in plans() {
            // Aligned (EDGE = false) shapes, rank 8 and the largest rank.
            check_lowrank_case(plan, &[64, 36], &[36, 128], (false, false), (true, Act::Silu, false), 8, false, 120);
            check_lowrank_case(plan, &[64, 64], &[128, 64], (false, true), (false, Act::None, false), 64, true, 121);
            // Batched output: H [Bt, M, r] (batched and shared A / B).
            for tb in [false, true] {
                let b3 = [vec![3], shape2(40, 70, tb)].concat();
                check_lowrank_case(plan, &[3, 9, 40], &b3, (false, tb), (true, Act::None, false), 7, tb, 122);
                check_lowrank_case(
                    plan,
                    &[3, 9, 40],
                    &shape2(40, 70, tb),
                    (false, tb),
                    (false, Act::Relu, false),
                    16,
                    false,
                    123,
                );
                check_lowrank_case(plan, &[9, 40], &b3, (false, tb), (true, Act::None, false), 1, true, 124);
            }
            // f16 (frozen) base weight, as LoRA uses it.
            for tb in [false, true] {
                for ta in [false, true] {
                    let (a, b) = (shape2(33, 7, ta), shape2(7, 5, tb));
                    check_lowrank_case(plan, &a, &b, (ta, tb), (true, Act::Silu, true), 7, ta, 125);
                }
                let b = shape2(57, 96, tb);
                check_lowrank_case(plan, &[2, 19, 57], &b, (false, tb), (false, Act::None, true), 16, !tb, 126);
            }
        }
    }

    #[test]
    fn lowrank_bad_inputs_are_errors() {
        let gpu = Gpu::shared().unwrap();
        let a = Tensor::from_f32(&gpu, &[0.0; 12], &[3, 4]).unwrap();
        let b = Tensor::from_f32(&gpu, &[0.0; 20], &[4, 5]).unwrap();
        let run = |h: &Tensor, f: &Tensor, f_trans: bool| {
            let lowrank = Some(LowRank { h, f, f_trans, scale: 1.0 });
            matmul(&a, &b, &MatmulOpts { lowrank, ..Default::default() }).map(|_| ()).unwrap_err().to_string()
        };
        let t = |shape: &[usize]| Tensor::zeros(&gpu, shape, DType::F32).unwrap();
        // Rank above LOWRANK_MAX.
        let r = LOWRANK_MAX + 1;
        let e = run(&t(&[3, r]), &t(&[5, r]), false);
        assert!(e.contains("matmul") && e.contains("rank") && e.contains(&r.to_string()), "{e}");
        // H rows do not match the output rows; F has the wrong layout.
        let e = run(&t(&[4, 2]), &t(&[5, 2]), false);
        assert!(e.contains("low-rank H") && e.contains("[3, 2]"), "{e}");
        let e = run(&t(&[3, 2]), &t(&[2, 5]), false);
        assert!(e.contains("low-rank F") && e.contains("[5, 2]"), "{e}");
        let e = run(&t(&[3, 2]), &t(&[5, 2]), true);
        assert!(e.contains("low-rank F") && e.contains("[2, 5]"), "{e}");
        let h16 = Tensor::from_f32_as_f16(&gpu, &[0.0; 6], &[3, 2]).unwrap();
        let e = run(&h16, &t(&[5, 2]), false);
        assert!(e.contains("low-rank H") && e.contains("F16"), "{e}");
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_op() {
        let gpu = Gpu::shared().unwrap();
        let a = Tensor::from_f32(&gpu, &[0.0; 12], &[3, 4]).unwrap();
        let b = Tensor::from_f32(&gpu, &[0.0; 10], &[5, 2]).unwrap();
        let e = matmul(&a, &b, &MatmulOpts::default()).unwrap_err().to_string();
        assert!(e.contains("matmul") && e.contains("[3, 4]") && e.contains("[5, 2]"), "{e}");

        let b = Tensor::from_f32(&gpu, &[0.0; 8], &[4, 2]).unwrap();
        let bad_bias = Tensor::from_f32(&gpu, &[0.0; 3], &[3]).unwrap();
        let opts = MatmulOpts { bias: Some(&bad_bias), ..Default::default() };
        let e = matmul(&a, &b, &opts).unwrap_err().to_string();
        assert!(e.contains("matmul") && e.contains("bias"), "{e}");

        let bu = Tensor::from_u32(&gpu, &[0; 8], &[4, 2]).unwrap();
        let e = matmul(&a, &bu, &MatmulOpts::default()).unwrap_err().to_string();
        assert!(e.contains("matmul") && e.contains("U32"), "{e}");
        let a16 = Tensor::from_f32_as_f16(&gpu, &[0.0; 12], &[3, 4]).unwrap();
        let e = matmul(&a16, &b, &MatmulOpts::default()).unwrap_err().to_string();
        assert!(e.contains("matmul") && e.contains("F16"), "{e}");

        let empty = Tensor::empty(&gpu, &[0, 4], DType::F32).unwrap();
        let e = matmul(&empty, &b, &MatmulOpts::default()).unwrap_err().to_string();
        assert!(e.contains("matmul") && e.contains("empty"), "{e}");

        let a3 = Tensor::from_f32(&gpu, &[0.0; 24], &[2, 3, 4]).unwrap();
        let b3 = Tensor::from_f32(&gpu, &[0.0; 24], &[3, 4, 2]).unwrap();
        let e = matmul(&a3, &b3, &MatmulOpts::default()).unwrap_err().to_string();
        assert!(e.contains("matmul") && e.contains("batch"), "{e}");
        let v = Tensor::from_f32(&gpu, &[0.0; 4], &[4]).unwrap();
        assert!(matmul(&v, &b, &MatmulOpts::default()).unwrap_err().to_string().contains("matmul"));

        let dy = Tensor::from_f32(&gpu, &[0.0; 6], &[2, 3]).unwrap();
        let e = matmul_backward(&a, &b, &dy, false, false, true, true, true).unwrap_err().to_string();
        assert!(e.contains("matmul_backward") && e.contains("dy"), "{e}");
    }
}
