//! Trie-masked log-softmax (`shaders/trie_mask.wgsl`): for every row of logits
//! `[rows, V]` and that row's current trie node, the log-probabilities of the
//! tokens the trie allows next (the node's children, plus EOS where an item
//! ends), and -inf for every other token. Masking and log-softmax are one
//! kernel: one pass over the allowed entries for (max, sum), one write pass.
//! [`trie_row_lse`] computes only each row's normaliser (`[rows]`), which is
//! what beam search uses: it reads `logits - lse` at the allowed tokens itself,
//! so no `[rows, V]` tensor is written per step.
//!
//! Normalisation ([`ScoreNorm`]): by default over the allowed tokens only
//! (`Allowed`: the allowed entries of a row form a distribution), or over the
//! whole vocabulary before masking (`FullVocab`: what HF's
//! `prefix_allowed_tokens_fn` path scores, and LETTER's reference code).
//!
//! Rows whose node is not a trie node (any id >= `num_nodes`, e.g. the finished
//! and dead beams of beam search) and rows whose normalisation set is all -inf
//! are entirely -inf. Finite or -inf logits never give NaN.

use anyhow::{bail, Result};

use super::trie::{GpuTrie, Trie};
use crate::gpu::{check, shape_str, DType, Gpu, Kernel, Params, Tensor};

/// How beam scores are normalised at each step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ScoreNorm {
    /// log-softmax over the allowed tokens only (the constrained distribution).
    #[default]
    Allowed,
    /// log-softmax over the whole vocabulary, then mask (HF `prefix_allowed_tokens_fn`).
    FullVocab,
}

/// Threads per row on GPUs; CPU adapters (lavapipe) use one SIMD batch of 8.
const WG_GPU: usize = 64;
const WG_CPU: usize = 8;

fn kernel(entry: &'static str, wg: usize) -> Kernel {
    Kernel::new(entry, "trie_mask", entry).define("WG", format!("{wg}u"))
}

/// Every kernel variant of this family (for naga validation).
pub fn kernels() -> Vec<Kernel> {
    let mut v = Vec::new();
    for entry in ["trie_log_softmax", "trie_row_lse"] {
        v.push(kernel(entry, WG_GPU));
        v.push(kernel(entry, WG_CPU));
    }
    v
}

pub(crate) fn row_grid(rows: usize) -> [u32; 3] {
    const MAX: usize = 65535;
    if rows <= MAX {
        [rows as u32, 1, 1]
    } else {
        [MAX as u32, rows.div_ceil(MAX) as u32, 1]
    }
}

pub(crate) fn wg_for(gpu: &Gpu) -> usize {
    if gpu.is_cpu() {
        WG_CPU
    } else {
        WG_GPU
    }
}

/// `nodes` must be U32 with one entry per row of `logits`.
fn check_nodes(op: &str, logits: &Tensor, nodes: &Tensor) -> Result<()> {
    check::dtype(op, "nodes", nodes, DType::U32)?;
    let rows = logits.shape().first().copied().unwrap_or(0);
    if nodes.numel() != rows {
        bail!(
            "{op}: nodes has shape {} but logits {} has {rows} rows",
            shape_str(nodes.shape()),
            shape_str(logits.shape())
        );
    }
    Ok(())
}

/// Masked log-softmax of `logits` (F32 `[rows, V]`) given each row's trie node
/// (`nodes`: U32 `[rows]`); returns F32 `[rows, V]`. `V` must exceed every
/// token of the trie (EOS included).
pub fn trie_log_softmax(logits: &Tensor, nodes: &Tensor, trie: &GpuTrie, norm: ScoreNorm) -> Result<Tensor> {
    const OP: &str = "trie_log_softmax";
    check_nodes(OP, logits, nodes)?;
    masked_log_softmax(OP, logits, nodes, 1, trie, norm)
}

/// Only the normaliser of [`trie_log_softmax`]: F32 `[rows]`, the logsumexp of
/// each row's normalisation set, +inf for rows with no allowed token (or all
/// -inf), so `logits - lse` is the masked log-prob at allowed tokens and never NaN.
pub fn trie_row_lse(logits: &Tensor, nodes: &Tensor, trie: &GpuTrie, norm: ScoreNorm) -> Result<Tensor> {
    const OP: &str = "trie_row_lse";
    check_nodes(OP, logits, nodes)?;
    row_lse(OP, logits, nodes, 1, trie, norm)
}

/// The launcher behind [`trie_row_lse`] (node of row `r` at `nodes[r * node_stride]`).
pub(crate) fn row_lse(
    op: &str,
    logits: &Tensor,
    nodes: &Tensor,
    node_stride: usize,
    trie: &GpuTrie,
    norm: ScoreNorm,
) -> Result<Tensor> {
    launch(op, "trie_row_lse", logits, nodes, node_stride, trie, norm)
}

/// The launcher behind [`trie_log_softmax`]: row `r`'s node is
/// `nodes[r * node_stride]` (beam search passes its packed state with stride 4).
pub(crate) fn masked_log_softmax(
    op: &str,
    logits: &Tensor,
    nodes: &Tensor,
    node_stride: usize,
    trie: &GpuTrie,
    norm: ScoreNorm,
) -> Result<Tensor> {
    launch(op, "trie_log_softmax", logits, nodes, node_stride, trie, norm)
}

fn launch(
    op: &str,
    entry: &'static str,
    logits: &Tensor,
    nodes: &Tensor,
    node_stride: usize,
    trie: &GpuTrie,
    norm: ScoreNorm,
) -> Result<Tensor> {
    check::nonempty(op, &[("logits", logits), ("nodes", nodes)])?;
    check::dtype(op, "logits", logits, DType::F32)?;
    check::dtype(op, "nodes", nodes, DType::U32)?;
    check::same_device(op, &[logits, nodes, trie.tensor()])?;
    if logits.rank() != 2 {
        bail!("{op}: logits must be [rows, vocab], got {}", shape_str(logits.shape()));
    }
    let (rows, vocab) = (logits.shape()[0], logits.shape()[1]);
    if nodes.numel() < rows * node_stride {
        bail!("{op}: nodes {} hold fewer than {rows} rows x stride {node_stride}", shape_str(nodes.shape()));
    }
    let t = trie.trie();
    if t.max_token() as usize >= vocab {
        bail!(
            "{op}: logits {} have a vocabulary of {vocab} but the trie uses token {} (EOS = {})",
            shape_str(logits.shape()),
            t.max_token(),
            t.eos()
        );
    }
    if rows.checked_mul(vocab).is_none_or(|n| n > u32::MAX as usize) {
        bail!("{op}: logits {} have too many elements for u32 indexing", shape_str(logits.shape()));
    }
    let gpu = logits.gpu();
    let out = if entry == "trie_row_lse" {
        Tensor::empty(gpu, &[rows], DType::F32)?
    } else {
        Tensor::empty(gpu, &[rows, vocab], DType::F32)?
    };
    let p = Params::new()
        .u(rows)
        .u(vocab)
        .u(t.num_nodes())
        .u(t.eos() as usize)
        .u(node_stride)
        .u(usize::from(norm == ScoreNorm::FullVocab))
        .f(f32::NEG_INFINITY)
        .u(0);
    gpu.dispatch(
        &kernel(entry, wg_for(gpu)),
        p.bytes(),
        &[logits.buffer(), nodes.buffer(), trie.tensor().buffer(), out.buffer()],
        row_grid(rows),
    )?;
    Ok(out)
}

/// logsumexp (f64) of row `row`'s normalisation set, None when it is empty or all -inf.
fn lse_ref(row: &[f32], allowed: &[u32], norm: ScoreNorm) -> Option<f64> {
    let set: Vec<f64> = match norm {
        ScoreNorm::Allowed => allowed.iter().map(|&t| row[t as usize] as f64).collect(),
        ScoreNorm::FullVocab => row.iter().map(|&x| x as f64).collect(),
    };
    let m = set.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if allowed.is_empty() || m == f64::NEG_INFINITY {
        return None;
    }
    Some(m + set.iter().map(|&x| (x - m).exp()).sum::<f64>().ln())
}

/// CPU reference (f64 per row) of [`trie_log_softmax`]: `logits` `[rows, vocab]`,
/// `nodes` `[rows]` (ids >= `num_nodes` give all -inf rows).
pub fn trie_log_softmax_ref(logits: &[f32], vocab: usize, nodes: &[u32], trie: &Trie, norm: ScoreNorm) -> Vec<f32> {
    let mut out = vec![f32::NEG_INFINITY; logits.len()];
    for (r, &node) in nodes.iter().enumerate() {
        let row = &logits[r * vocab..(r + 1) * vocab];
        let allowed = trie.allowed_tokens(node);
        if let Some(lse) = lse_ref(row, &allowed, norm) {
            for &t in &allowed {
                out[r * vocab + t as usize] = (row[t as usize] as f64 - lse) as f32;
            }
        }
    }
    out
}

/// CPU reference (f64) of [`trie_row_lse`]: `[rows]`, +inf where no token is allowed.
pub fn trie_row_lse_ref(logits: &[f32], vocab: usize, nodes: &[u32], trie: &Trie, norm: ScoreNorm) -> Vec<f32> {
    nodes
        .iter()
        .enumerate()
        .map(|(r, &node)| {
            let allowed = trie.allowed_tokens(node);
            lse_ref(&logits[r * vocab..(r + 1) * vocab], &allowed, norm).map_or(f32::INFINITY, |v| v as f32)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::random_trie;
    use crate::ops::testing::{assert_close, rand_vec};
    use rand::{Rng, SeedableRng};

    fn check_case(g: &Gpu, trie: &Trie, gt: &GpuTrie, vocab: usize, rows: usize, seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut x = rand_vec(seed, rows * vocab, 6.0);
        // A few -inf logits (a model's own mask) and one all -inf row.
        for v in x.iter_mut().step_by(11) {
            *v = f32::NEG_INFINITY;
        }
        if rows > 3 {
            x[2 * vocab..3 * vocab].iter_mut().for_each(|v| *v = f32::NEG_INFINITY);
        }
        let n = trie.num_nodes() as u32;
        // Mostly real nodes, some finished/dead markers.
        let nodes: Vec<u32> = (0..rows)
            .map(|_| if rng.gen_bool(0.15) { u32::MAX - rng.gen_range(0..2) } else { rng.gen_range(0..n) })
            .collect();
        let tl = Tensor::from_f32(g, &x, &[rows, vocab]).unwrap();
        let tn = Tensor::from_u32(g, &nodes, &[rows]).unwrap();
        for norm in [ScoreNorm::Allowed, ScoreNorm::FullVocab] {
            let y = trie_log_softmax(&tl, &tn, gt, norm).unwrap().to_vec_f32().unwrap();
            assert!(y.iter().all(|v| !v.is_nan()), "NaN in output");
            let want = trie_log_softmax_ref(&x, vocab, &nodes, trie, norm);
            for (i, (&a, &b)) in y.iter().zip(&want).enumerate() {
                assert_eq!(a == f32::NEG_INFINITY, b == f32::NEG_INFINITY, "{norm:?} V={vocab} [{i}]: {a} vs {b}");
            }
            let fin = |v: &[f32]| v.iter().map(|&a| if a.is_finite() { a } else { 0.0 }).collect::<Vec<_>>();
            assert_close(&format!("trie_log_softmax {norm:?} {rows}x{vocab}"), &fin(&y), &fin(&want), 1e-5, 2e-5);
            // The normaliser alone, and logits - lse reproduces the masked output bit for bit.
            let lse = trie_row_lse(&tl, &tn, gt, norm).unwrap().to_vec_f32().unwrap();
            let want_lse = trie_row_lse_ref(&x, vocab, &nodes, trie, norm);
            for (r, (&a, &b)) in lse.iter().zip(&want_lse).enumerate() {
                assert_eq!(a == f32::INFINITY, b == f32::INFINITY, "{norm:?} V={vocab} lse[{r}]: {a} vs {b}");
                assert!(a == b || (a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{norm:?} V={vocab} lse[{r}]: {a} vs {b}");
                for &t in &trie.allowed_tokens(nodes[r]) {
                    let i = r * vocab + t as usize;
                    if a.is_finite() {
                        assert_eq!(y[i].to_bits(), (x[i] - a).to_bits(), "{norm:?} V={vocab} row {r} token {t}");
                    }
                }
            }
        }
    }

    #[test]
    fn matches_reference_at_awkward_sizes() {
        let g = Gpu::shared().unwrap();
        for (vocab, rows) in [(2, 1), (7, 5), (33, 37), (257, 9), (1030, 3)] {
            let trie = random_trie(vocab as u64, vocab, 3 + vocab / 4, 4);
            let gt = trie.to_gpu(&g).unwrap();
            check_case(&g, &trie, &gt, vocab, rows, vocab as u64 * 7 + rows as u64);
        }
        // Wide nodes: 1029 children of the root (more than any workgroup), V = 1030.
        let items: Vec<Vec<u32>> = (0..1029).map(|t| vec![t]).collect();
        let trie = Trie::new(&items, 1029).unwrap();
        let gt = trie.to_gpu(&g).unwrap();
        check_case(&g, &trie, &gt, 1030, 4, 5);
    }

    #[test]
    fn vocab_of_one_is_rejected() {
        // V = 1 cannot hold a trie (items need a non-EOS token); it is rejected.
        let g = Gpu::shared().unwrap();
        let trie = Trie::new(&[vec![1]], 0).unwrap();
        let gt = trie.to_gpu(&g).unwrap();
        let tl = Tensor::from_f32(&g, &[0.5], &[1, 1]).unwrap();
        let tn = Tensor::from_u32(&g, &[0], &[1]).unwrap();
        let e = trie_log_softmax(&tl, &tn, &gt, ScoreNorm::Allowed).unwrap_err().to_string();
        assert!(e.contains("trie_log_softmax") && e.contains("vocabulary of 1") && e.contains("token 1"), "{e}");
    }

    #[test]
    fn single_child_and_leaf_rows_are_exact() {
        // items: [0, 1] and [2]; EOS = 3. Node [0] has the single child 1; node [2] is a leaf (EOS only).
        let g = Gpu::shared().unwrap();
        let trie = Trie::new(&[vec![0, 1], vec![2]], 3).unwrap();
        let gt = trie.to_gpu(&g).unwrap();
        let n0 = trie.node_for_prefix(&[0]).unwrap();
        let n2 = trie.node_for_prefix(&[2]).unwrap();
        let x = [0.3f32, -1.0, 2.0, 0.7, 0.3, -1.0, 2.0, 0.7, 5.0, 1.0, -3.0, 0.0];
        let tl = Tensor::from_f32(&g, &x, &[3, 4]).unwrap();
        let tn = Tensor::from_u32(&g, &[n0, n2, 0], &[3]).unwrap();
        let y = trie_log_softmax(&tl, &tn, &gt, ScoreNorm::Allowed).unwrap().to_vec_f32().unwrap();
        let ninf = f32::NEG_INFINITY;
        assert_eq!(&y[..8], &[ninf, 0.0, ninf, ninf, ninf, ninf, ninf, 0.0]);
        // Root: tokens 0 and 2 allowed (5.0 and -3.0).
        let lse = (5.0f64.exp() + (-3.0f64).exp()).ln();
        assert_close("root row", &y[8..], &[(5.0 - lse) as f32, ninf, (-3.0 - lse) as f32, ninf], 1e-6, 1e-6);
        // Full-vocab normalisation: the single child keeps its full log-prob.
        let y = trie_log_softmax(&tl, &tn, &gt, ScoreNorm::FullVocab).unwrap().to_vec_f32().unwrap();
        let lse0 = [0.3f64, -1.0, 2.0, 0.7].iter().map(|v| v.exp()).sum::<f64>().ln();
        assert!((y[1] as f64 - (-1.0 - lse0)).abs() < 1e-5, "{}", y[1]);
        assert!((y[7] as f64 - (0.7 - lse0)).abs() < 1e-5, "{}", y[7]);
    }

    #[test]
    fn bad_inputs_name_the_op_and_shapes() {
        let g = Gpu::shared().unwrap();
        let trie = Trie::new(&[vec![0, 1], vec![2]], 3).unwrap();
        let gt = trie.to_gpu(&g).unwrap();
        let tl = Tensor::from_f32(&g, &[0.0; 8], &[2, 4]).unwrap();
        let tn = Tensor::from_u32(&g, &[0; 3], &[3]).unwrap();
        let e = trie_log_softmax(&tl, &tn, &gt, ScoreNorm::Allowed).unwrap_err().to_string();
        assert!(e.contains("trie_log_softmax") && e.contains("[3]") && e.contains("[2, 4]"), "{e}");
        let ti = Tensor::from_i32(&g, &[0; 2], &[2]).unwrap();
        assert!(trie_log_softmax(&tl, &ti, &gt, ScoreNorm::Allowed).unwrap_err().to_string().contains("nodes"));
        let t3 = Tensor::from_f32(&g, &[0.0; 8], &[2, 2, 2]).unwrap();
        let tn2 = Tensor::from_u32(&g, &[0; 2], &[2]).unwrap();
        let e = trie_log_softmax(&t3, &tn2, &gt, ScoreNorm::Allowed).unwrap_err().to_string();
        assert!(e.contains("[rows, vocab]"), "{e}");
    }
}
