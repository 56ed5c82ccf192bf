//! Fused attention, forward and backward (`shaders/attention.wgsl`).
//!
//! `out = softmax(scale * q kᵀ + bias, masked) v` in one kernel with an online softmax
//! (flash-attention style: no `[Tq, Tk]` score matrix in memory in the forward), grouped-query
//! heads, an optional additive bias shared over the batch (T5's relative position bias) and a
//! mask that is *data*: per-token `(segment, position)` pairs plus a rule kind (`MaskKind`)
//! evaluated in the kernel. New masks need no new shader code.
//!
//! Layouts (row-major, f32): q/out `[B, Hq, Tq, Dh]`; k/v `[B, Hkv, Tk, Dh]` with `Hq = G * Hkv`
//! (query head h uses KV head `h / G`); bias `[Hq, Tq, Tk]`; lse `[B, Hq, Tq]`. `Dh` must be a
//! multiple of 4 and at most 128.
//!
//! # Mask encoding
//! Every query token i and key token j of batch row b carries a segment id and a position
//! (`MaskSpec::{q_seg, q_pos, k_seg, k_pos}`, `[batch, T]` with batch 1 = shared by all rows).
//! A **negative segment marks padding**: a padded key is seen by nobody, a padded query sees
//! nothing. Otherwise key j is visible to query i iff `rel(qs, ks).allows(qp, kp)` where the
//! relation `Rel` is one of None, All, Causal (`kp <= qp`), SelfOnly (`kp == qp`), Before
//! (`kp < qp`), chosen by the kind:
//! - `Full`: All (bidirectional; segments only mark padding).
//! - `Causal`: Causal. For KV-cache decoding give queries their absolute positions
//!   (`MaskSpec::causal` uses `qp = Tk - Tq + i`).
//! - `Set` (SETRec, setrec.spec.md §2.6): segment = item-group id, 0 for non-item tokens.
//!   Causal, except that a query in group g != 0 sees of its own group only itself (SelfOnly).
//!   Give every learnable query token one shared group id to keep queries from seeing each
//!   other. Positions here are the raw sequence indices, not the item-shared RoPE positions.
//! - `Ordered { earlier, same, later }`: the relation depends on how the key's segment compares
//!   with the query's: `ks < qs` -> earlier, `==` -> same, `>` -> later. E.g. block-causal
//!   "see earlier segments fully, causal inside your own" is `{All, Causal, None}`; SETRec
//!   with every non-item token given its own segment is `{All, SelfOnly, None}`.
//! - `Table(t)`: `t[qs][ks]` for segments 0..16 (a 16x16 relation table, passed to the kernel
//!   as 4-bit codes). `MaskKind::cascaded()` is STORE's cascaded mask (store.paper Fig. 4),
//!   blocks content 0, dense tokens (DT) 1, placeholders (PH) 2, task 3. Our reading (the
//!   paper's wording "content fully attends to token, placeholder fully attends to task" is
//!   inverted for a causal LM, see store.spec.md §2.3/§8.2): causal inside each block,
//!   DT -> content All, task -> PH All, every other cross-block pair None. So the task block
//!   reads the item only through the PH block (the gisting bottleneck).
//!
//! A query with no visible key gets an output row of zeros and `lse = -f32::MAX`; its gradient
//! contributions are zero.

use anyhow::{bail, Result};

use crate::gpu::{check, div_ceil, shape_str, DType, Gpu, Kernel, Params, Tensor};

const OP: &str = "attention";
const OP_BWD: &str = "attention_backward";
/// Workgroup size of every attention kernel.
/// Workgroup size of the plain kernels and of the 1-D ones (prep, dbias) in both variants.
const WG: u32 = 32;
/// Segments addressable by `MaskKind::Table`.
pub const TABLE_SEGMENTS: usize = 16;

/// Relation between a query token and a key token (positions qp, kp).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Rel {
    #[default]
    None,
    All,
    /// `kp <= qp`
    Causal,
    /// `kp == qp` (the token itself)
    SelfOnly,
    /// `kp < qp`
    Before,
}

impl Rel {
    /// The 4-bit code understood by the shader.
    pub fn code(self) -> u32 {
        match self {
            Rel::None => 0,
            Rel::All => 1,
            Rel::Causal => 2,
            Rel::SelfOnly => 3,
            Rel::Before => 4,
        }
    }
    /// Whether a key at position `kp` is visible to a query at `qp` under this relation.
    pub fn allows(self, qp: i32, kp: i32) -> bool {
        match self {
            Rel::None => false,
            Rel::All => true,
            Rel::Causal => kp <= qp,
            Rel::SelfOnly => kp == qp,
            Rel::Before => kp < qp,
        }
    }
}

/// The rule evaluated per (query, key) pair; see the module docs.
#[derive(Clone, Debug, PartialEq)]
pub enum MaskKind {
    Full,
    Causal,
    Set,
    Ordered { earlier: Rel, same: Rel, later: Rel },
    Table(Box<[[Rel; TABLE_SEGMENTS]; TABLE_SEGMENTS]>),
}

impl MaskKind {
    /// STORE's cascaded mask (Fig. 4) over blocks content 0, DT 1, PH 2, task 3: causal inside
    /// each block, DT -> content and task -> PH fully visible, all else blocked.
    pub fn cascaded() -> MaskKind {
        let mut t = [[Rel::None; TABLE_SEGMENTS]; TABLE_SEGMENTS];
        for (b, row) in t.iter_mut().enumerate().take(4) {
            row[b] = Rel::Causal;
        }
        t[1][0] = Rel::All;
        t[3][2] = Rel::All;
        MaskKind::Table(Box::new(t))
    }

    fn code(&self) -> u32 {
        match self {
            MaskKind::Full => 0,
            MaskKind::Causal => 1,
            MaskKind::Set => 2,
            MaskKind::Ordered { .. } => 3,
            MaskKind::Table(_) => 4,
        }
    }

    /// The relation for two non-padding segments.
    pub fn rel(&self, qs: i32, ks: i32) -> Rel {
        match self {
            MaskKind::Full => Rel::All,
            MaskKind::Causal => Rel::Causal,
            MaskKind::Set => {
                if qs != 0 && ks == qs {
                    Rel::SelfOnly
                } else {
                    Rel::Causal
                }
            }
            MaskKind::Ordered { earlier, same, later } => match ks.cmp(&qs) {
                std::cmp::Ordering::Less => *earlier,
                std::cmp::Ordering::Equal => *same,
                std::cmp::Ordering::Greater => *later,
            },
            MaskKind::Table(t) => t[qs as usize][ks as usize],
        }
    }
}

/// A mask described by data: kind + per-token (segment, position) for queries and keys.
/// Segment < 0 = padding. `batch` is 1 (shared by every batch row) or B.
#[derive(Clone, Debug, PartialEq)]
pub struct MaskSpec {
    pub kind: MaskKind,
    pub batch: usize,
    pub tq: usize,
    pub tk: usize,
    /// `[batch, tq]`
    pub q_seg: Vec<i32>,
    /// `[batch, tq]`
    pub q_pos: Vec<i32>,
    /// `[batch, tk]`
    pub k_seg: Vec<i32>,
    /// `[batch, tk]`
    pub k_pos: Vec<i32>,
}

impl MaskSpec {
    /// A mask from explicit per-token data (validated).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kind: MaskKind,
        batch: usize,
        tq: usize,
        tk: usize,
        q_seg: Vec<i32>,
        q_pos: Vec<i32>,
        k_seg: Vec<i32>,
        k_pos: Vec<i32>,
    ) -> Result<MaskSpec> {
        let m = MaskSpec { kind, batch, tq, tk, q_seg, q_pos, k_seg, k_pos };
        m.validate()?;
        Ok(m)
    }

    /// Bidirectional attention without padding (shared by the batch).
    pub fn full(tq: usize, tk: usize) -> MaskSpec {
        MaskSpec {
            kind: MaskKind::Full,
            batch: 1,
            tq,
            tk,
            q_seg: vec![0; tq],
            q_pos: (0..tq as i32).collect(),
            k_seg: vec![0; tk],
            k_pos: (0..tk as i32).collect(),
        }
    }

    /// Causal attention; the `tq` queries are the last `tq` of the `tk` keys (KV-cache decoding
    /// when `tq < tk`): query i has position `tk - tq + i`.
    pub fn causal(tq: usize, tk: usize) -> Result<MaskSpec> {
        if tq > tk {
            bail!("{OP}: causal mask needs tq <= tk, got tq {tq}, tk {tk}");
        }
        let mut m = MaskSpec::full(tq, tk);
        m.kind = MaskKind::Causal;
        m.q_pos = (0..tq).map(|i| (tk - tq + i) as i32).collect();
        Ok(m)
    }

    /// Encoder-decoder cross-attention: every query sees every valid key.
    /// `key_valid`: `[B][tk]`.
    pub fn cross(tq: usize, key_valid: &[Vec<bool>]) -> Result<MaskSpec> {
        let tk = key_valid.first().map(|r| r.len()).unwrap_or(0);
        MaskSpec::full(tq, tk).pad_keys(key_valid)
    }

    /// A mask over whole sequences: `seg[b]` gives the segment of each of the `tk` tokens
    /// (negative = padding), positions are the indices, and the queries are the last `tq`
    /// tokens (all of them for a forward over the whole sequence; fewer when decoding).
    pub fn from_sequence(kind: MaskKind, seg: &[Vec<i32>], tq: usize) -> Result<MaskSpec> {
        let batch = seg.len();
        let tk = seg.first().map(|r| r.len()).unwrap_or(0);
        if batch == 0 || seg.iter().any(|r| r.len() != tk) || tq > tk {
            bail!("{OP}: from_sequence needs B >= 1 rows of one length >= tq ({tq})");
        }
        let mut m = MaskSpec {
            kind,
            batch,
            tq,
            tk,
            q_seg: Vec::new(),
            q_pos: Vec::new(),
            k_seg: Vec::new(),
            k_pos: Vec::new(),
        };
        for row in seg {
            m.k_seg.extend_from_slice(row);
            m.k_pos.extend(0..tk as i32);
            m.q_seg.extend_from_slice(&row[tk - tq..]);
            m.q_pos.extend((tk - tq) as i32..tk as i32);
        }
        m.validate()?;
        Ok(m)
    }

    /// SETRec's sparse mask: `groups[b]` = item-group id per token (0 = ordinary causal token,
    /// negative = padding); see `MaskKind::Set`.
    pub fn set(groups: &[Vec<i32>], tq: usize) -> Result<MaskSpec> {
        MaskSpec::from_sequence(MaskKind::Set, groups, tq)
    }

    /// STORE's cascaded mask: `blocks[b]` = block id per token (0 content, 1 DT, 2 PH, 3 task,
    /// negative = padding).
    pub fn cascaded(blocks: &[Vec<i32>], tq: usize) -> Result<MaskSpec> {
        MaskSpec::from_sequence(MaskKind::cascaded(), blocks, tq)
    }

    /// Mark keys invalid where `key_valid[b][j]` is false (expands a shared mask to B rows).
    pub fn pad_keys(mut self, key_valid: &[Vec<bool>]) -> Result<MaskSpec> {
        let nb = key_valid.len();
        if nb == 0 || key_valid.iter().any(|r| r.len() != self.tk) || (self.batch != 1 && self.batch != nb) {
            bail!("{OP}: pad_keys needs [B][tk = {}] flags for a mask of batch {}", self.tk, self.batch);
        }
        if self.batch == 1 && nb > 1 {
            self.q_seg = self.q_seg.repeat(nb);
            self.q_pos = self.q_pos.repeat(nb);
            self.k_seg = self.k_seg.repeat(nb);
            self.k_pos = self.k_pos.repeat(nb);
            self.batch = nb;
        }
        for (b, row) in key_valid.iter().enumerate() {
            for (j, &ok) in row.iter().enumerate() {
                if !ok {
                    self.k_seg[b * self.tk + j] = -1;
                }
            }
        }
        Ok(self)
    }

    /// Check the per-token arrays' lengths and the table's segment range.
    pub fn validate(&self) -> Result<()> {
        let (nq, nk) = (self.batch * self.tq, self.batch * self.tk);
        if self.batch == 0 || self.tq == 0 || self.tk == 0 {
            bail!("{OP}: empty mask (batch {}, tq {}, tk {})", self.batch, self.tq, self.tk);
        }
        if self.q_seg.len() != nq || self.q_pos.len() != nq || self.k_seg.len() != nk || self.k_pos.len() != nk {
            bail!(
                "{OP}: mask arrays must be [batch {}, tq {}] and [batch, tk {}]; got q_seg {}, q_pos {}, k_seg {}, k_pos {}",
                self.batch,
                self.tq,
                self.tk,
                self.q_seg.len(),
                self.q_pos.len(),
                self.k_seg.len(),
                self.k_pos.len()
            );
        }
        if let MaskKind::Table(_) = self.kind {
            let bad = self.q_seg.iter().chain(&self.k_seg).find(|&&s| s >= TABLE_SEGMENTS as i32);
            if let Some(s) = bad {
                bail!("{OP}: table mask segment {s} out of range 0..{TABLE_SEGMENTS}");
            }
        }
        Ok(())
    }

    /// Whether key j is visible to query i in batch row b (CPU evaluation of the rule).
    pub fn visible(&self, b: usize, i: usize, j: usize) -> bool {
        let mb = if self.batch == 1 { 0 } else { b };
        let (qs, qp) = (self.q_seg[mb * self.tq + i], self.q_pos[mb * self.tq + i]);
        let (ks, kp) = (self.k_seg[mb * self.tk + j], self.k_pos[mb * self.tk + j]);
        qs >= 0 && ks >= 0 && self.kind.rel(qs, ks).allows(qp, kp)
    }

    /// Upload the per-token data as the kernel's `[batch, tq + tk, 2]` i32 table.
    pub fn upload(&self, gpu: &Gpu) -> Result<Mask> {
        self.validate()?;
        let mut tok = Vec::with_capacity(self.batch * (self.tq + self.tk) * 2);
        for b in 0..self.batch {
            for i in 0..self.tq {
                tok.push(self.q_seg[b * self.tq + i]);
                tok.push(self.q_pos[b * self.tq + i]);
            }
            for j in 0..self.tk {
                tok.push(self.k_seg[b * self.tk + j]);
                tok.push(self.k_pos[b * self.tk + j]);
            }
        }
        let tok = Tensor::from_i32(gpu, &tok, &[self.batch, self.tq + self.tk, 2])?;
        Ok(Mask { spec: self.clone(), tok })
    }
}

/// A `MaskSpec` uploaded to the device (reuse it across layers).
#[derive(Clone, Debug)]
pub struct Mask {
    pub spec: MaskSpec,
    /// `[batch, tq + tk, 2]` i32: (segment, position) of the queries then the keys.
    pub tok: Tensor,
}

/// Attention sizes: batch, query heads, KV heads, query/key lengths, head dim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnDims {
    pub b: usize,
    pub hq: usize,
    pub hkv: usize,
    pub tq: usize,
    pub tk: usize,
    pub dh: usize,
}

/// Forward results: `out` `[B, Hq, Tq, Dh]` and the per-row logsumexp `lse` `[B, Hq, Tq]`
/// (saved for the backward).
pub struct AttnOut {
    pub out: Tensor,
    pub lse: Tensor,
}

/// Backward results: dq like q, dk/dv like k/v (summed over the query heads of each KV head),
/// dbias `[Hq, Tq, Tk]` (summed over the batch) when asked for.
pub struct AttnGrads {
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
    pub dbias: Option<Tensor>,
}

fn rows_per_invocation(dh: usize) -> u32 {
    if dh <= 64 {
        4
    } else {
        2
    }
}

/// Which shader runs the row-parallel kernels (forward, dq, dk/dv).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// `attention.wgsl`: each invocation fetches its rows (GPUs), workgroups of [`WG`].
    Plain,
    /// `attention_sg.wgsl`: the lanes of one 8-lane subgroup share each row fetch (CPU
    /// adapters, where every storage load is a per-lane loop); workgroups of 8.
    Subgroup,
}

thread_local! {
    /// Tests run both variants on one adapter.
    static FORCE_VARIANT: std::cell::Cell<Option<Variant>> = const { std::cell::Cell::new(None) };
}

impl Variant {
    fn for_gpu(gpu: &crate::gpu::Gpu) -> Variant {
        if let Some(v) = FORCE_VARIANT.with(|f| f.get()) {
            return v;
        }
        if gpu.is_cpu() && crate::ops::matmul::subgroup_kernel_ok(gpu) {
            Variant::Subgroup
        } else {
            Variant::Plain
        }
    }
    fn wg(self) -> u32 {
        match self {
            Variant::Plain => WG,
            Variant::Subgroup => 8,
        }
    }
}

fn kernel_in(variant: Variant, entry: &'static str, dh: usize) -> Kernel {
    let blk = rows_per_invocation(dh);
    let shader = if variant == Variant::Subgroup { "attention_sg" } else { "attention" };
    Kernel::new(OP, shader, entry)
        .define("DH", format!("{dh}u"))
        .define("QB", format!("{blk}u"))
        .define("KB", format!("{blk}u"))
        .define("WG", format!("{}u", variant.wg()))
}

fn kernel(entry: &'static str, dh: usize) -> Kernel {
    kernel_in(Variant::Plain, entry, dh)
}

/// Every attention kernel variant (for naga validation).
pub fn kernels() -> Vec<Kernel> {
    let mut v = Vec::new();
    for dh in [4, 32, 64, 128] {
        for e in ["attn_fwd", "attn_bwd_prep", "attn_bwd_dq", "attn_bwd_dkdv", "attn_bwd_dbias"] {
            v.push(kernel(e, dh));
        }
        for e in ["attn_fwd", "attn_bwd_dq", "attn_bwd_dkdv"] {
            v.push(kernel_in(Variant::Subgroup, e, dh));
        }
    }
    v
}

fn check_inputs(op: &str, q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>, mask: &Mask) -> Result<AttnDims> {
    check::nonempty(op, &[("q", q), ("k", k), ("v", v)])?;
    for (n, t) in [("q", q), ("k", k), ("v", v)] {
        check::dtype(op, n, t, DType::F32)?;
        if t.rank() != 4 {
            bail!("{op}: {n} must be [B, H, T, Dh], got {}", shape_str(t.shape()));
        }
    }
    check::same_shape(op, ("k", k), ("v", v))?;
    let (qs, ks) = (q.shape(), k.shape());
    let d = AttnDims { b: qs[0], hq: qs[1], hkv: ks[1], tq: qs[2], tk: ks[2], dh: qs[3] };
    if ks[0] != d.b || ks[3] != d.dh {
        bail!("{op}: q {} and k {} disagree on batch or head dim", shape_str(qs), shape_str(ks));
    }
    if !d.hq.is_multiple_of(d.hkv) {
        bail!(
            "{op}: query heads {} not a multiple of KV heads {} (q {}, k {})",
            d.hq,
            d.hkv,
            shape_str(qs),
            shape_str(ks)
        );
    }
    if !d.dh.is_multiple_of(4) || d.dh > 128 {
        bail!("{op}: head dim {} must be a multiple of 4 and <= 128 (q {})", d.dh, shape_str(qs));
    }
    let m = &mask.spec;
    if m.tq != d.tq || m.tk != d.tk || (m.batch != 1 && m.batch != d.b) {
        bail!(
            "{op}: mask is for batch {}, tq {}, tk {} but q is {} and k is {}",
            m.batch,
            m.tq,
            m.tk,
            shape_str(qs),
            shape_str(ks)
        );
    }
    if let Some(bt) = bias {
        check::dtype(op, "bias", bt, DType::F32)?;
        if bt.shape() != [d.hq, d.tq, d.tk] {
            bail!("{op}: bias must be [Hq, Tq, Tk] = {:?}, got {}", [d.hq, d.tq, d.tk], shape_str(bt.shape()));
        }
    }
    let mut all = vec![q, k, v, &mask.tok];
    all.extend(bias);
    check::same_device(op, &all)?;
    if d.b * d.hkv > 65535 {
        bail!("{op}: B * Hkv = {} exceeds the 65535-workgroup grid limit", d.b * d.hkv);
    }
    Ok(d)
}

fn params(d: &AttnDims, mask: &Mask, has_bias: bool, scale: f32, gx: u32, write_ds: bool) -> Params {
    let m = &mask.spec;
    let (e, s, l) = match m.kind {
        MaskKind::Ordered { earlier, same, later } => (earlier.code(), same.code(), later.code()),
        _ => (0, 0, 0),
    };
    let mut words = [0u32; 32];
    if let MaskKind::Table(t) = &m.kind {
        for (qs, row) in t.iter().enumerate() {
            for (ks, rel) in row.iter().enumerate() {
                let e = qs * TABLE_SEGMENTS + ks;
                words[e / 8] |= rel.code() << ((e % 8) * 4);
            }
        }
    }
    let bstride = if m.batch == 1 { 0 } else { 2 * (d.tq + d.tk) };
    let mut p = Params::new()
        .u(d.b)
        .u(d.hq)
        .u(d.hkv)
        .u(d.tq)
        .u(d.tk)
        .u(bstride)
        .u(m.kind.code() as usize)
        .u(has_bias as usize)
        .f(scale)
        .u(e as usize)
        .u(s as usize)
        .u(l as usize);
    for w in words {
        p = p.u(w as usize);
    }
    p.u(gx as usize).u(write_ds as usize).u(0).u(0)
}

/// A 1-D grid of `n` invocations folded into (x, y) workgroups; returns (grid, gx).
fn fold(n: usize) -> ([u32; 3], u32) {
    let groups = div_ceil(n, WG as usize).max(1);
    let gx = groups.min(65535);
    ([gx, groups.div_ceil(gx), 1], gx)
}

/// Fused attention forward: `out = softmax(scale * q kᵀ + bias | mask) v`.
/// q `[B, Hq, Tq, Dh]`, k/v `[B, Hkv, Tk, Dh]`, bias `[Hq, Tq, Tk]` (shared over the batch),
/// `scale` = 1/sqrt(Dh) usually, 1.0 for T5.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    mask: &Mask,
    scale: f32,
) -> Result<AttnOut> {
    let d = check_inputs(OP, q, k, v, bias, mask)?;
    let gpu = q.gpu();
    let out = Tensor::empty(gpu, &[d.b, d.hq, d.tq, d.dh], DType::F32)?;
    let lse = Tensor::empty(gpu, &[d.b, d.hq, d.tq], DType::F32)?;
    let dummy;
    let bias_t = match bias {
        Some(t) => t,
        None => {
            dummy = Tensor::zeros(gpu, &[1], DType::F32)?;
            &dummy
        }
    };
    let p = params(&d, mask, bias.is_some(), scale, 0, false);
    let rows = d.tq * (d.hq / d.hkv);
    let variant = Variant::for_gpu(gpu);
    let grid = [div_ceil(rows, (variant.wg() * rows_per_invocation(d.dh)) as usize), (d.b * d.hkv) as u32, 1];
    gpu.dispatch(
        &kernel_in(variant, "attn_fwd", d.dh),
        p.bytes(),
        &[q.buffer(), k.buffer(), v.buffer(), bias_t.buffer(), mask.tok.buffer(), out.buffer(), lse.buffer()],
        grid,
    )?;
    Ok(AttnOut { out, lse })
}

/// Attention backward (flash-attention-2 style: probabilities recomputed from `lse`, no float
/// atomics): dq parallel over queries, dk/dv parallel over keys, dbias (if `want_dbias`, which
/// needs `bias`) by a fixed-order sum over the batch of a `[B, Hq, Tq, Tk]` scratch.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    bias: Option<&Tensor>,
    mask: &Mask,
    scale: f32,
    want_dbias: bool,
) -> Result<AttnGrads> {
    let d = check_inputs(OP_BWD, q, k, v, bias, mask)?;
    check::same_shape(OP_BWD, ("dout", dout), ("q", q))?;
    check::same_shape(OP_BWD, ("out", out), ("q", q))?;
    for (n, t) in [("dout", dout), ("out", out), ("lse", lse)] {
        check::dtype(OP_BWD, n, t, DType::F32)?;
    }
    if lse.shape() != [d.b, d.hq, d.tq] {
        bail!("{OP_BWD}: lse must be [B, Hq, Tq] = {:?}, got {}", [d.b, d.hq, d.tq], shape_str(lse.shape()));
    }
    if want_dbias && bias.is_none() {
        bail!("{OP_BWD}: the bias gradient was asked for without a bias");
    }
    check::same_device(OP_BWD, &[dout, q, out, lse])?;
    let gpu = q.gpu();
    let nrows = d.b * d.hq * d.tq;
    let stats = Tensor::empty(gpu, &[nrows, 2], DType::F32)?;
    let (grid, gx) = fold(nrows);
    let p = params(&d, mask, bias.is_some(), scale, gx, false);
    gpu.dispatch(
        &kernel("attn_bwd_prep", d.dh),
        p.bytes(),
        &[out.buffer(), dout.buffer(), lse.buffer(), stats.buffer()],
        grid,
    )?;

    let dummy = Tensor::zeros(gpu, &[1], DType::F32)?;
    let bias_t = bias.unwrap_or(&dummy);
    let dq = Tensor::empty(gpu, q.shape(), DType::F32)?;
    let ds = if want_dbias { Some(Tensor::empty(gpu, &[d.b, d.hq, d.tq, d.tk], DType::F32)?) } else { None };
    let p = params(&d, mask, bias.is_some(), scale, 0, want_dbias);
    let rows = d.tq * (d.hq / d.hkv);
    let blk = rows_per_invocation(d.dh) as usize;
    let variant = Variant::for_gpu(gpu);
    let wg = variant.wg() as usize;
    let grid = [div_ceil(rows, wg * blk), (d.b * d.hkv) as u32, 1];
    let common =
        [q.buffer(), k.buffer(), v.buffer(), bias_t.buffer(), mask.tok.buffer(), dout.buffer(), stats.buffer()];
    let mut bufs = common.to_vec();
    bufs.push(dq.buffer());
    // A separate dummy: one buffer may not be bound read-only and read-write at once.
    let dummy_ds = Tensor::zeros(gpu, &[1], DType::F32)?;
    bufs.push(ds.as_ref().unwrap_or(&dummy_ds).buffer());
    gpu.dispatch(&kernel_in(variant, "attn_bwd_dq", d.dh), p.bytes(), &bufs, grid)?;

    let dk = Tensor::empty(gpu, k.shape(), DType::F32)?;
    let dv = Tensor::empty(gpu, v.shape(), DType::F32)?;
    let grid = [div_ceil(d.tk, wg * blk), (d.b * d.hkv) as u32, 1];
    let mut bufs = common.to_vec();
    bufs.push(dk.buffer());
    bufs.push(dv.buffer());
    gpu.dispatch(&kernel_in(variant, "attn_bwd_dkdv", d.dh), p.bytes(), &bufs, grid)?;

    let dbias = match ds {
        Some(ds) => {
            let db = Tensor::empty(gpu, &[d.hq, d.tq, d.tk], DType::F32)?;
            let (grid, gx) = fold(d.hq * d.tq * d.tk);
            let p = params(&d, mask, true, scale, gx, false);
            gpu.dispatch(&kernel("attn_bwd_dbias", d.dh), p.bytes(), &[ds.buffer(), db.buffer()], grid)?;
            Some(db)
        }
        None => None,
    };
    Ok(AttnGrads { dq, dk, dv, dbias })
}

/// CPU reference forward in f64: returns (out `[B, Hq, Tq, Dh]`, lse `[B, Hq, Tq]`), with the
/// mask materialized by `MaskSpec::visible`. Empty rows: zeros and `lse = -inf`.
pub fn attention_ref(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    bias: Option<&[f64]>,
    mask: &MaskSpec,
    d: AttnDims,
    scale: f64,
) -> (Vec<f64>, Vec<f64>) {
    let g = d.hq / d.hkv;
    let mut out = vec![0.0; d.b * d.hq * d.tq * d.dh];
    let mut lse = vec![f64::NEG_INFINITY; d.b * d.hq * d.tq];
    for b in 0..d.b {
        for h in 0..d.hq {
            let kh = h / g;
            for i in 0..d.tq {
                let row = (b * d.hq + h) * d.tq + i;
                let qi = &q[row * d.dh..(row + 1) * d.dh];
                let mut s = vec![f64::NEG_INFINITY; d.tk];
                for (j, sj) in s.iter_mut().enumerate() {
                    if !mask.visible(b, i, j) {
                        continue;
                    }
                    let kr = ((b * d.hkv + kh) * d.tk + j) * d.dh;
                    let dot: f64 = (0..d.dh).map(|x| qi[x] * k[kr + x]).sum();
                    *sj = scale * dot + bias.map(|bb| bb[(h * d.tq + i) * d.tk + j]).unwrap_or(0.0);
                }
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let sum: f64 = s.iter().map(|&x| (x - m).exp()).sum();
                lse[row] = m + sum.ln();
                for (j, &sj) in s.iter().enumerate() {
                    let pj = (sj - lse[row]).exp();
                    if pj == 0.0 {
                        continue;
                    }
                    let vr = ((b * d.hkv + kh) * d.tk + j) * d.dh;
                    for x in 0..d.dh {
                        out[row * d.dh + x] += pj * v[vr + x];
                    }
                }
            }
        }
    }
    (out, lse)
}

/// CPU reference backward in f64 (analytic; checked against finite differences of
/// `attention_ref` in the tests): (dq, dk, dv, dbias).
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn attention_backward_ref(
    dout: &[f64],
    q: &[f64],
    k: &[f64],
    v: &[f64],
    bias: Option<&[f64]>,
    mask: &MaskSpec,
    d: AttnDims,
    scale: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let (out, lse) = attention_ref(q, k, v, bias, mask, d, scale);
    let g = d.hq / d.hkv;
    let mut dq = vec![0.0; q.len()];
    let mut dk = vec![0.0; k.len()];
    let mut dv = vec![0.0; v.len()];
    let mut dbias = vec![0.0; d.hq * d.tq * d.tk];
    for b in 0..d.b {
        for h in 0..d.hq {
            let kh = h / g;
            for i in 0..d.tq {
                let row = (b * d.hq + h) * d.tq + i;
                let r = row * d.dh;
                let delta: f64 = (0..d.dh).map(|x| dout[r + x] * out[r + x]).sum();
                for j in 0..d.tk {
                    if !mask.visible(b, i, j) {
                        continue;
                    }
                    let kr = ((b * d.hkv + kh) * d.tk + j) * d.dh;
                    let dot: f64 = (0..d.dh).map(|x| q[r + x] * k[kr + x]).sum();
                    let s = scale * dot + bias.map(|bb| bb[(h * d.tq + i) * d.tk + j]).unwrap_or(0.0);
                    let p = (s - lse[row]).exp();
                    let dp: f64 = (0..d.dh).map(|x| dout[r + x] * v[kr + x]).sum();
                    let ds = p * (dp - delta);
                    dbias[(h * d.tq + i) * d.tk + j] += ds;
                    for x in 0..d.dh {
                        dq[r + x] += ds * scale * k[kr + x];
                        dk[kr + x] += ds * scale * q[r + x];
                        dv[kr + x] += p * dout[r + x];
                    }
                }
            }
        }
    }
    (dq, dk, dv, dbias)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_close, finite_diff, rand_vec};

    fn f64v(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&v| v as f64).collect()
    }
    fn f32v(x: &[f64]) -> Vec<f32> {
        x.iter().map(|&v| v as f32).collect()
    }

    struct Case {
        d: AttnDims,
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        bias: Option<Vec<f32>>,
        scale: f32,
    }

    fn case(d: AttnDims, seed: u64, with_bias: bool) -> Case {
        Case {
            d,
            q: rand_vec(seed, d.b * d.hq * d.tq * d.dh, 1.0),
            k: rand_vec(seed + 1, d.b * d.hkv * d.tk * d.dh, 1.0),
            v: rand_vec(seed + 2, d.b * d.hkv * d.tk * d.dh, 1.0),
            bias: with_bias.then(|| rand_vec(seed + 3, d.hq * d.tq * d.tk, 1.0)),
            scale: 1.0 / (d.dh as f32).sqrt(),
        }
    }

    fn upload(c: &Case, mask: &MaskSpec) -> (Tensor, Tensor, Tensor, Option<Tensor>, Mask) {
        let gpu = Gpu::shared().unwrap();
        let d = c.d;
        let q = Tensor::from_f32(&gpu, &c.q, &[d.b, d.hq, d.tq, d.dh]).unwrap();
        let k = Tensor::from_f32(&gpu, &c.k, &[d.b, d.hkv, d.tk, d.dh]).unwrap();
        let v = Tensor::from_f32(&gpu, &c.v, &[d.b, d.hkv, d.tk, d.dh]).unwrap();
        let bias = c.bias.as_ref().map(|bb| Tensor::from_f32(&gpu, bb, &[d.hq, d.tq, d.tk]).unwrap());
        (q, k, v, bias, mask.upload(&gpu).unwrap())
    }

    /// Forward and backward on the GPU vs the f64 reference, with each shader variant the
    /// adapter can run (the subgroup one needs 8-lane subgroups, as lavapipe has).
    fn check_case(what: &str, c: &Case, mask: &MaskSpec) {
        let gpu = Gpu::shared().unwrap();
        let mut variants = vec![Variant::Plain];
        if crate::ops::matmul::subgroup_kernel_ok(&gpu) {
            variants.push(Variant::Subgroup);
        }
        for v in variants {
            FORCE_VARIANT.with(|f| f.set(Some(v)));
            check_case_in(&format!("{what} [{v:?}]"), c, mask);
            FORCE_VARIANT.with(|f| f.set(None));
        }
    }

    fn check_case_in(what: &str, c: &Case, mask: &MaskSpec) {
        let d = c.d;
        let (q, k, v, bias, m) = upload(c, mask);
        let r = attention(&q, &k, &v, bias.as_ref(), &m, c.scale).unwrap();
        let bias64 = c.bias.as_ref().map(|bb| f64v(bb));
        let (want_o, want_lse) =
            attention_ref(&f64v(&c.q), &f64v(&c.k), &f64v(&c.v), bias64.as_deref(), mask, d, c.scale as f64);
        assert_close(&format!("{what}: out"), &r.out.to_vec_f32().unwrap(), &f32v(&want_o), 1e-4, 2e-5);
        let want_lse: Vec<f32> = want_lse.iter().map(|&x| if x.is_finite() { x as f32 } else { -f32::MAX }).collect();
        assert_close(&format!("{what}: lse"), &r.lse.to_vec_f32().unwrap(), &want_lse, 1e-5, 1e-5);

        let dy = rand_vec(99, want_o.len(), 1.0);
        let dout = Tensor::from_f32(q.gpu(), &dy, q.shape()).unwrap();
        let g =
            attention_backward(&dout, &q, &k, &v, &r.out, &r.lse, bias.as_ref(), &m, c.scale, bias.is_some()).unwrap();
        let (dq, dk, dv, db) = attention_backward_ref(
            &f64v(&dy),
            &f64v(&c.q),
            &f64v(&c.k),
            &f64v(&c.v),
            bias64.as_deref(),
            mask,
            d,
            c.scale as f64,
        );
        assert_close(&format!("{what}: dq"), &g.dq.to_vec_f32().unwrap(), &f32v(&dq), 1e-3, 1e-4);
        assert_close(&format!("{what}: dk"), &g.dk.to_vec_f32().unwrap(), &f32v(&dk), 1e-3, 1e-4);
        assert_close(&format!("{what}: dv"), &g.dv.to_vec_f32().unwrap(), &f32v(&dv), 1e-3, 1e-4);
        if let Some(gb) = g.dbias {
            assert_close(&format!("{what}: dbias"), &gb.to_vec_f32().unwrap(), &f32v(&db), 1e-3, 1e-4);
        }
    }

    fn dims(b: usize, hq: usize, hkv: usize, tq: usize, tk: usize, dh: usize) -> AttnDims {
        AttnDims { b, hq, hkv, tq, tk, dh }
    }

    #[test]
    fn full_and_causal_awkward_lengths() {
        for (t, dh) in [(1, 8), (7, 16), (33, 64), (65, 32)] {
            let c = case(dims(2, 2, 2, t, t, dh), t as u64, false);
            check_case(&format!("full T={t}"), &c, &MaskSpec::full(t, t));
            check_case(&format!("causal T={t}"), &c, &MaskSpec::causal(t, t).unwrap());
        }
        // Dh = 128 uses the 2-rows-per-invocation variant.
        let c = case(dims(1, 2, 1, 9, 9, 128), 5, true);
        check_case("causal dh=128 gqa bias", &c, &MaskSpec::causal(9, 9).unwrap());
    }

    #[test]
    fn gqa_with_bias_and_padding() {
        // 6 query heads over 2 KV heads, T5-style scale 1 with a bias, left padding.
        let mut c = case(dims(3, 6, 2, 33, 33, 16), 11, true);
        c.scale = 1.0;
        let valid: Vec<Vec<bool>> = (0..3).map(|b| (0..33).map(|j| j >= 5 * b).collect()).collect();
        let m = MaskSpec::full(33, 33).pad_keys(&valid).unwrap();
        check_case("full gqa bias pad", &c, &m);
        let m = MaskSpec::causal(33, 33).unwrap().pad_keys(&valid).unwrap();
        check_case("causal gqa bias pad", &c, &m);
    }

    #[test]
    fn cross_attention_tq_ne_tk() {
        // Decoder queries (7) over encoder outputs (33) with per-row key padding.
        let c = case(dims(2, 4, 4, 7, 33, 32), 21, true);
        let valid = vec![vec![true; 33], (0..33).map(|j| j < 20).collect()];
        check_case("cross", &c, &MaskSpec::cross(7, &valid).unwrap());
    }

    #[test]
    fn decoding_one_query_against_kv_cache() {
        // 5 beams, 6 query heads on 2 KV heads, a 65-long cache; causal with offset.
        let c = case(dims(5, 6, 2, 1, 65, 64), 31, false);
        let m = MaskSpec::causal(1, 65).unwrap();
        check_case("decode causal", &c, &m);
        // Equal to the last row of the full causal prefill.
        let full = case(dims(5, 6, 2, 65, 65, 64), 31, false);
        let mut c2 = case(dims(5, 6, 2, 1, 65, 64), 31, false);
        c2.k = full.k.clone();
        c2.v = full.v.clone();
        c2.q = (0..5 * 6).flat_map(|bh| full.q[(bh * 65 + 64) * 64..(bh * 65 + 65) * 64].to_vec()).collect();
        let (q, k, v, _, mf) = upload(&full, &MaskSpec::causal(65, 65).unwrap());
        let pre = attention(&q, &k, &v, None, &mf, full.scale).unwrap().out.to_vec_f32().unwrap();
        let (q2, k2, v2, _, m2) = upload(&c2, &m);
        let dec = attention(&q2, &k2, &v2, None, &m2, c2.scale).unwrap().out.to_vec_f32().unwrap();
        let last: Vec<f32> = (0..30).flat_map(|bh| pre[(bh * 65 + 64) * 64..(bh * 65 + 65) * 64].to_vec()).collect();
        assert_close("decode == last prefill row", &dec, &last, 1e-5, 1e-6);
    }

    fn setrec_groups(n_i: usize, items: usize, q: usize, n_r: usize, pad_items: usize) -> Vec<i32> {
        // [instr (0)] [pad items (-1)] [item 1..] ["?;" (0)] [queries (one shared group)]
        let mut g = vec![0; n_i];
        g.extend(std::iter::repeat(-1).take(pad_items * q));
        for it in 0..items {
            g.extend(std::iter::repeat(it as i32 + 1).take(q));
        }
        g.extend(std::iter::repeat(0).take(n_r));
        g.extend(std::iter::repeat(items as i32 + 1).take(q));
        g
    }

    #[test]
    fn set_mask_setrec() {
        let rows = vec![setrec_groups(3, 4, 3, 2, 0), setrec_groups(3, 2, 3, 2, 2)];
        let t = rows[0].len();
        let m = MaskSpec::set(&rows, t).unwrap();
        // The rule from setrec.spec.md §2.6, spelled out.
        let r = &rows[0];
        for p in 0..t {
            for kk in 0..t {
                let both_item = r[p] > 0 && r[kk] == r[p];
                let want = kk <= p && (!both_item || kk == p);
                assert_eq!(m.visible(0, p, kk), want, "set mask at ({p}, {kk})");
            }
        }
        let c = case(dims(2, 4, 2, t, t, 16), 41, false);
        check_case("set", &c, &m);
        // Decoding the last 3 query tokens against the cache: same rule.
        let m3 = MaskSpec::set(&rows, 3).unwrap();
        let c3 = case(dims(2, 4, 2, 3, t, 16), 42, false);
        check_case("set decode", &c3, &m3);
    }

    #[test]
    fn set_mask_outputs_invariant_to_order_inside_an_item() {
        // setrec.spec.md §8.5: permuting the tokens of an item leaves the query outputs unchanged.
        let groups = setrec_groups(2, 3, 3, 1, 0);
        let t = groups.len();
        let m = MaskSpec::set(&[groups.clone()], t).unwrap();
        let d = dims(1, 2, 2, t, t, 8);
        let c = case(d, 51, false);
        let mut perm: Vec<usize> = (0..t).collect();
        perm.swap(2 + 3, 2 + 5); // reverse item 2's three tokens
        let permute = |x: &[f32]| -> Vec<f32> {
            let mut y = vec![0.0; x.len()];
            for h in 0..2 {
                for (p, &src) in perm.iter().enumerate() {
                    let (dst, s) = ((h * t + p) * 8, (h * t + src) * 8);
                    y[dst..dst + 8].copy_from_slice(&x[s..s + 8]);
                }
            }
            y
        };
        let c2 = Case { d, q: permute(&c.q), k: permute(&c.k), v: permute(&c.v), bias: None, scale: c.scale };
        let (q, k, v, _, mm) = upload(&c, &m);
        let a = attention(&q, &k, &v, None, &mm, c.scale).unwrap().out.to_vec_f32().unwrap();
        let (q, k, v, _, mm) = upload(&c2, &m);
        let b = attention(&q, &k, &v, None, &mm, c.scale).unwrap().out.to_vec_f32().unwrap();
        let nq = 3;
        for h in 0..2 {
            let s = (h * t + t - nq) * 8;
            let e = (h * t + t) * 8;
            assert_close("query outputs after permutation", &b[s..e], &a[s..e], 1e-5, 1e-6);
        }
    }

    #[test]
    fn cascaded_mask_store() {
        // content 4, DT 2, PH 2, task 3; second row pads the content's first token.
        let mut blocks = vec![0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 3];
        let t = blocks.len();
        let m = MaskSpec::cascaded(&[blocks.clone()], t).unwrap();
        #[rustfmt::skip]
        let want: [&str; 11] = [
            "1..........",
            "11.........",
            "111........",
            "1111.......",
            "11111......",
            "111111.....",
            "......1....",
            "......11...",
            "......111..",
            "......1111.",
            "......11111",
        ];
        for (i, row) in want.iter().enumerate() {
            let got: String = (0..t).map(|j| if m.visible(0, i, j) { '1' } else { '.' }).collect();
            assert_eq!(&got, row, "cascaded row {i}");
        }
        let c = case(dims(2, 2, 1, t, t, 8), 61, false);
        blocks[0] = -1;
        let mrows = MaskSpec::cascaded(&[vec![0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 3], blocks], t).unwrap();
        check_case("cascaded", &c, &mrows);
    }

    #[test]
    fn ordered_and_table_masks() {
        let t = 33;
        let seg: Vec<i32> = (0..t as i32).map(|p| p / 5).collect();
        let block_causal = MaskKind::Ordered { earlier: Rel::All, same: Rel::Causal, later: Rel::None };
        let m = MaskSpec::from_sequence(block_causal, &[seg.clone()], t).unwrap();
        let c = case(dims(2, 2, 2, t, t, 16), 71, true);
        check_case("ordered block-causal", &c, &m);
        let prefix_lm = MaskKind::Ordered { earlier: Rel::All, same: Rel::Before, later: Rel::All };
        let m = MaskSpec::from_sequence(prefix_lm, &[seg.clone()], t).unwrap();
        check_case("ordered mixed", &c, &m);
        let mut tab = [[Rel::None; TABLE_SEGMENTS]; TABLE_SEGMENTS];
        for (a, row) in tab.iter_mut().enumerate() {
            for (b, r) in row.iter_mut().enumerate() {
                *r = [Rel::None, Rel::All, Rel::Causal, Rel::SelfOnly, Rel::Before][(a * 7 + b * 3) % 5];
            }
        }
        let segs: Vec<i32> = (0..t as i32).map(|p| (p * 5) % 7).collect();
        let m = MaskSpec::from_sequence(MaskKind::Table(Box::new(tab)), &[segs], t).unwrap();
        check_case("table", &c, &m);
    }

    #[test]
    fn all_masked_rows_are_zero_not_nan() {
        // Row 0: first key padded, so causal query 0 sees nothing; row 1: query 3 padded.
        let t = 7;
        let mut m = MaskSpec::causal(t, t)
            .unwrap()
            .pad_keys(&[vec![false, true, true, true, true, true, true], vec![true; 7]])
            .unwrap();
        m.q_seg[t + 3] = -1;
        let c = case(dims(2, 2, 1, t, t, 8), 81, true);
        check_case("all-masked rows", &c, &m);
        let (q, k, v, bias, mm) = upload(&c, &m);
        let r = attention(&q, &k, &v, bias.as_ref(), &mm, c.scale).unwrap();
        let o = r.out.to_vec_f32().unwrap();
        assert!(o.iter().all(|x| x.is_finite()));
        assert!(o[0..8].iter().all(|&x| x == 0.0), "empty row must be zero: {:?}", &o[0..8]);
        let row = ((1 * 2) * t + 3) * 8;
        assert!(o[row..row + 8].iter().all(|&x| x == 0.0));
    }

    #[test]
    fn reference_backward_matches_finite_differences() {
        let d = dims(2, 4, 2, 5, 7, 4);
        let c = case(d, 91, true);
        let groups = vec![vec![0, 1, 1, 2, 2, 0, 3], vec![-1, 0, 1, 1, 2, 2, 0]];
        let m = MaskSpec::set(&groups, 5).unwrap();
        let dy = rand_vec(92, d.b * d.hq * d.tq * d.dh, 1.0);
        let dy64 = f64v(&dy);
        let (q, k, v, b) = (f64v(&c.q), f64v(&c.k), f64v(&c.v), f64v(c.bias.as_ref().unwrap()));
        let s = c.scale as f64;
        let loss = |o: &[f64]| o.iter().zip(&dy64).map(|(a, b)| a * b).sum::<f64>();
        let (dq, dk, dv, db) = attention_backward_ref(&dy64, &q, &k, &v, Some(&b), &m, d, s);
        let fq = finite_diff(&c.q, 1e-5, |x| loss(&attention_ref(x, &k, &v, Some(&b), &m, d, s).0));
        let fk = finite_diff(&c.k, 1e-5, |x| loss(&attention_ref(&q, x, &v, Some(&b), &m, d, s).0));
        let fv = finite_diff(&c.v, 1e-5, |x| loss(&attention_ref(&q, &k, x, Some(&b), &m, d, s).0));
        let fb = finite_diff(c.bias.as_ref().unwrap(), 1e-5, |x| loss(&attention_ref(&q, &k, &v, Some(x), &m, d, s).0));
        assert_close("ref dq vs fd", &f32v(&dq), &fq, 1e-4, 1e-6);
        assert_close("ref dk vs fd", &f32v(&dk), &fk, 1e-4, 1e-6);
        assert_close("ref dv vs fd", &f32v(&dv), &fv, 1e-4, 1e-6);
        assert_close("ref dbias vs fd", &f32v(&db), &fb, 1e-4, 1e-6);

        // And the GPU backward directly against the finite differences.
        let (qt, kt, vt, bt, mm) = upload(&c, &m);
        let r = attention(&qt, &kt, &vt, bt.as_ref(), &mm, c.scale).unwrap();
        let dout = Tensor::from_f32(qt.gpu(), &dy, qt.shape()).unwrap();
        let g = attention_backward(&dout, &qt, &kt, &vt, &r.out, &r.lse, bt.as_ref(), &mm, c.scale, true).unwrap();
        assert_close("gpu dq vs fd", &g.dq.to_vec_f32().unwrap(), &fq, 1e-3, 1e-4);
        assert_close("gpu dk vs fd", &g.dk.to_vec_f32().unwrap(), &fk, 1e-3, 1e-4);
        assert_close("gpu dv vs fd", &g.dv.to_vec_f32().unwrap(), &fv, 1e-3, 1e-4);
        assert_close("gpu dbias vs fd", &g.dbias.unwrap().to_vec_f32().unwrap(), &fb, 1e-3, 1e-4);
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_op() {
        let gpu = Gpu::shared().unwrap();
        let t = |s: &[usize]| Tensor::zeros(&gpu, s, DType::F32).unwrap();
        let m = MaskSpec::full(4, 4).upload(&gpu).unwrap();
        let err = |r: Result<AttnOut>| {
            let e = r.err().expect("expected an error").to_string();
            assert!(e.contains("attention"), "{e}");
            e
        };
        let q = t(&[1, 4, 4, 8]);
        let kv = t(&[1, 2, 4, 8]);
        err(attention(&q, &t(&[1, 3, 4, 8]), &t(&[1, 3, 4, 8]), None, &m, 1.0)); // 4 % 3
        err(attention(&q, &kv, &t(&[1, 2, 5, 8]), None, &m, 1.0)); // k != v
        err(attention(&t(&[1, 4, 4, 6]), &t(&[1, 2, 4, 6]), &t(&[1, 2, 4, 6]), None, &m, 1.0)); // dh % 4
        err(attention(&t(&[4, 4, 8]), &kv, &kv, None, &m, 1.0)); // rank
        err(attention(&q, &kv, &kv, Some(&t(&[4, 4, 5])), &m, 1.0)); // bias shape
        let m5 = MaskSpec::full(5, 4).upload(&gpu).unwrap();
        err(attention(&q, &kv, &kv, None, &m5, 1.0)); // mask size
        let e = err(attention(&t(&[1, 4, 0, 8]), &kv, &kv, None, &m, 1.0));
        assert!(e.contains("empty"), "{e}");
        assert!(MaskSpec::causal(5, 4).is_err());
        let bad_table = MaskSpec::from_sequence(MaskKind::cascaded(), &[vec![0, 16]], 2);
        assert!(bad_table.unwrap_err().to_string().contains("attention"));
        let r = attention(&q, &kv, &kv, None, &m, 1.0).unwrap();
        let e = attention_backward(&q, &q, &kv, &kv, &r.out, &r.lse, None, &m, 1.0, true).err().unwrap().to_string();
        assert!(e.contains("attention_backward"), "{e}");
        let e = attention_backward(&q, &q, &kv, &kv, &r.out, &kv, None, &m, 1.0, false).err().unwrap().to_string();
        assert!(e.contains("attention_backward") && e.contains("lse"), "{e}");
    }
}

/// Timing of the forward and backward (run with
/// `cargo test --release --lib ops::attention::bench -- --ignored --nocapture`).
#[cfg(test)]
mod bench {
    use super::*;
    use crate::ops::testing::rand_vec;

    fn time(label: &str, d: AttnDims, mask: MaskSpec) {
        let gpu = Gpu::shared().unwrap();
        let q = Tensor::from_f32(&gpu, &rand_vec(1, d.b * d.hq * d.tq * d.dh, 1.0), &[d.b, d.hq, d.tq, d.dh]).unwrap();
        let k =
            Tensor::from_f32(&gpu, &rand_vec(2, d.b * d.hkv * d.tk * d.dh, 1.0), &[d.b, d.hkv, d.tk, d.dh]).unwrap();
        let v =
            Tensor::from_f32(&gpu, &rand_vec(3, d.b * d.hkv * d.tk * d.dh, 1.0), &[d.b, d.hkv, d.tk, d.dh]).unwrap();
        let dy = Tensor::from_f32(&gpu, &rand_vec(4, d.b * d.hq * d.tq * d.dh, 1.0), q.shape()).unwrap();
        let m = mask.upload(&gpu).unwrap();
        let scale = 1.0 / (d.dh as f32).sqrt();
        let fwd = attention(&q, &k, &v, None, &m, scale).unwrap();
        attention_backward(&dy, &q, &k, &v, &fwd.out, &fwd.lse, None, &m, scale, false).unwrap();
        gpu.sync().unwrap();
        let iters = 5;
        let t0 = std::time::Instant::now();
        for _ in 0..iters {
            attention(&q, &k, &v, None, &m, scale).unwrap();
            gpu.sync().unwrap();
        }
        let tf = t0.elapsed().as_secs_f64() / iters as f64;
        let t0 = std::time::Instant::now();
        for _ in 0..iters {
            attention_backward(&dy, &q, &k, &v, &fwd.out, &fwd.lse, None, &m, scale, false).unwrap();
            gpu.sync().unwrap();
        }
        let tb = t0.elapsed().as_secs_f64() / iters as f64;
        let flop = 4.0 * (d.b * d.hq * d.tq * d.tk * d.dh) as f64;
        eprintln!(
            "{label} {d:?} on {}: forward {:.2} ms ({:.2} GFLOP/s), backward {:.2} ms ({:.2} GFLOP/s at 2.5x forward flops)",
            gpu.describe(),
            tf * 1e3,
            flop / tf / 1e9,
            tb * 1e3,
            2.5 * flop / tb / 1e9
        );
    }

    /// Both shader variants in one run (the subgroup one where the adapter has 8-lane subgroups).
    /// `XDG_RUNTIME_DIR=/tmp cargo test --release --lib ops::attention::bench -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_attention() {
        let gpu = Gpu::shared().unwrap();
        let mut variants = vec![Variant::Plain];
        if crate::ops::matmul::subgroup_kernel_ok(&gpu) {
            variants.push(Variant::Subgroup);
        }
        for v in variants {
            eprintln!("-- variant {v:?}");
            FORCE_VARIANT.with(|f| f.set(Some(v)));
            bench_cases();
        }
        FORCE_VARIANT.with(|f| f.set(None));
    }

    fn bench_cases() {
        let tiger = AttnDims { b: 16, hq: 6, hkv: 6, tq: 64, tk: 64, dh: 64 };
        time("TIGER full", tiger, MaskSpec::full(64, 64));
        let smol = AttnDims { b: 1, hq: 9, hkv: 3, tq: 512, tk: 512, dh: 64 };
        time("SmolLM2 full", smol, MaskSpec::full(512, 512));
        time("SmolLM2 causal", smol, MaskSpec::causal(512, 512).unwrap());
        let dec = AttnDims { b: 20, hq: 9, hkv: 3, tq: 1, tk: 512, dh: 64 };
        time("SmolLM2 decode (20 beams)", dec, MaskSpec::causal(1, 512).unwrap());
    }
}
