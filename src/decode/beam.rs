//! Trie-constrained beam search batched over users x beams, on the GPU
//! (`shaders/beam_select.wgsl` for the top-k selection, `trie_mask.wgsl` for
//! the masked log-softmax), plus its plain-Rust reference.
//!
//! One step, for rows `r = b * beams + k`: the model turns each row's last
//! token into logits `[rows, V]`; the trie kernel (`trie_row_lse`) computes
//! each row's log-softmax normaliser over the tokens its trie node allows;
//! the select kernel scores every allowed continuation as
//! `beam score + logits - lse` (so the masked `[rows, V]` log-probs are never
//! written: per row only the allowed logits are read) and picks, per user, the
//! `beams` best of (live beams x allowed tokens) together with the beams that
//! already finished; the model's state is reordered by the chosen parents.
//! Beam state (node, item, score) stays on the GPU; nothing is read back until
//! the end.
//!
//! Semantics (documented choices):
//! - Step 0 starts every row from `start_token` at the trie root, with only
//!   beam 0 live (the others are empty, score -inf), so beams never duplicate.
//! - A beam that emits EOS is finished and keeps its slot and score; a finished
//!   beam competes with the live beams' extensions at every later step (scores
//!   are summed log-probs, no length penalty). With items of equal depth every
//!   beam finishes at the same step, which is exactly HF beam search
//!   (`num_beams = beams`, `length_penalty = 1`, scores divided by the same
//!   length); with uneven depths (collision suffixes, prefix items) items are
//!   ranked by their summed log-prob, EOS included.
//! - The search runs exactly `trie.max_depth() + 1` steps: every live beam is
//!   one level deeper after each step, so after that many steps every beam is
//!   finished or empty. No per-step readback is needed.
//! - Ties rank the lower beam index first, then the lower token.
//! - Candidates with score -inf (a model's own -inf logits) are never chosen;
//!   a user with fewer reachable items than `beams` gets empty slots, which
//!   are left out of the results (so a result list may be shorter than `topk`
//!   only when the trie has fewer than `topk` items). A user left with no
//!   item at all (NaN or -inf logits everywhere) is an error.
//! - Results: per user, the first `topk` finished beams, best first. Beams are
//!   distinct sequences and the trie maps sequences to items one-to-one, so the
//!   items are distinct.

use anyhow::{bail, ensure, Context, Result};

use super::mask::{row_grid, row_lse, trie_row_lse_ref, wg_for, ScoreNorm};
use super::trie::{GpuTrie, Trie, NO_ITEM};
use super::StepModel;
use crate::gpu::{check, shape_str, DType, Kernel, Params, Tensor};

/// Node id of a beam that has emitted EOS.
pub const FINISHED: u32 = 0xffff_fffe;
/// Node id of an empty beam slot.
pub const DEAD: u32 = 0xffff_ffff;
/// Most beams per user (the select kernel's per-user offsets live in shared memory).
pub const MAX_BEAMS: usize = 256;

const WG_GPU: usize = 64;
const WG_CPU: usize = 8;

/// Private per-thread list lengths of the select kernel's variants (>= beams).
const LMAX_SMALL: usize = 32;

fn lmax_for(beams: usize) -> usize {
    if beams <= LMAX_SMALL {
        LMAX_SMALL
    } else {
        MAX_BEAMS
    }
}

fn kernel(wg: usize, lmax: usize) -> Kernel {
    Kernel::new("beam_select", "beam_select", "beam_select")
        .define("WG", format!("{wg}u"))
        .define("KMAX", format!("{MAX_BEAMS}u"))
        .define("LMAX", format!("{lmax}u"))
}

/// Every kernel variant of this family (for naga validation).
pub fn kernels() -> Vec<Kernel> {
    let mut v = Vec::new();
    for wg in [WG_GPU, WG_CPU] {
        for lmax in [LMAX_SMALL, MAX_BEAMS] {
            v.push(kernel(wg, lmax));
        }
    }
    v
}

/// Beam search options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BeamOpts {
    /// Users searched together; the model has `batch * beams` rows.
    pub batch: usize,
    /// Beams per user (1..=MAX_BEAMS).
    pub beams: usize,
    /// Items returned per user (1..=beams).
    pub topk: usize,
    /// The token every row is fed first (e.g. T5's decoder start / pad token).
    pub start_token: u32,
    /// Score normalisation per step (default: over the allowed tokens).
    pub norm: ScoreNorm,
}

impl BeamOpts {
    pub fn new(batch: usize, beams: usize, topk: usize, start_token: u32) -> BeamOpts {
        BeamOpts { batch, beams, topk, start_token, norm: ScoreNorm::Allowed }
    }
    /// Rows the model must be prepared for: `batch * beams`.
    pub fn rows(&self) -> usize {
        self.batch * self.beams
    }
    fn validate(&self, op: &str, vocab: usize, trie: &Trie) -> Result<()> {
        ensure!(self.batch >= 1, "{op}: batch must be at least 1");
        ensure!((1..=MAX_BEAMS).contains(&self.beams), "{op}: beams = {} is outside 1..={MAX_BEAMS}", self.beams);
        ensure!(
            (1..=self.beams).contains(&self.topk),
            "{op}: topk = {} must be in 1..=beams ({})",
            self.topk,
            self.beams
        );
        ensure!(
            (self.start_token as usize) < vocab,
            "{op}: start_token {} is outside the model's vocabulary of {vocab}",
            self.start_token
        );
        ensure!(
            (trie.max_token() as usize) < vocab,
            "{op}: the trie uses token {} (EOS = {}) but the model's vocabulary is {vocab}",
            trie.max_token(),
            trie.eos()
        );
        ensure!(
            self.rows().checked_mul(vocab).is_some_and(|n| n <= u32::MAX as usize),
            "{op}: {} rows x vocabulary {vocab} is too large for u32 indexing",
            self.rows()
        );
        Ok(())
    }
}

/// One returned hypothesis: an item and its summed log-prob (EOS included).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hyp {
    pub item: u32,
    pub score: f32,
}

/// A beam as the select kernel stores it: `node` is a trie node, [`FINISHED`]
/// or [`DEAD`]; `item` is set for finished beams.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BeamState {
    pub node: u32,
    pub item: u32,
    pub score: f32,
}

impl BeamState {
    pub const DEAD: BeamState = BeamState { node: DEAD, item: NO_ITEM, score: f32::NEG_INFINITY };

    fn pack(states: &[BeamState]) -> Vec<u32> {
        states.iter().flat_map(|s| [s.node, s.item, s.score.to_bits(), 0]).collect()
    }
    fn unpack(words: &[u32]) -> Vec<BeamState> {
        words.chunks(4).map(|w| BeamState { node: w[0], item: w[1], score: f32::from_bits(w[2]) }).collect()
    }
    /// Uploads states as the kernel's U32 `[rows, 4]`.
    pub fn upload(gpu: &crate::gpu::Gpu, states: &[BeamState]) -> Result<Tensor> {
        Tensor::from_u32(gpu, &Self::pack(states), &[states.len(), 4])
    }
    /// Reads states back from U32 `[rows, 4]`.
    pub fn download(t: &Tensor) -> Result<Vec<BeamState>> {
        Ok(Self::unpack(&t.to_vec_u32()?))
    }
    /// The initial states: beam 0 of every user at the root with score 0, the rest empty.
    pub fn initial(batch: usize, beams: usize) -> Vec<BeamState> {
        (0..batch * beams)
            .map(|r| if r % beams == 0 { BeamState { node: 0, item: NO_ITEM, score: 0.0 } } else { BeamState::DEAD })
            .collect()
    }
}

/// Output of one selection step (all on the GPU, `[rows]` each).
pub struct Selected {
    /// U32 `[rows, 4]` packed [`BeamState`]s.
    pub state: Tensor,
    /// U32 `[rows]`: the old row each new row continues.
    pub parents: Tensor,
    /// U32 `[rows]`: the token each new row appended (EOS for finished/empty rows).
    pub tokens: Tensor,
}

/// One selection step on the GPU: `logits` F32 `[users * beams, V]` (raw),
/// `lse` F32 `[users * beams]` (their trie normalisers, [`super::trie_row_lse`];
/// the masked log-prob of an allowed token is `logits - lse`), `state` U32
/// `[users * beams, 4]`.
pub fn beam_select(
    logits: &Tensor,
    lse: &Tensor,
    trie: &GpuTrie,
    state: &Tensor,
    users: usize,
    beams: usize,
) -> Result<Selected> {
    const OP: &str = "beam_select";
    check::nonempty(OP, &[("logits", logits), ("lse", lse), ("state", state)])?;
    check::dtype(OP, "logits", logits, DType::F32)?;
    check::dtype(OP, "lse", lse, DType::F32)?;
    check::dtype(OP, "state", state, DType::U32)?;
    check::same_device(OP, &[logits, lse, state, trie.tensor()])?;
    ensure!((1..=MAX_BEAMS).contains(&beams), "{OP}: beams = {beams} is outside 1..={MAX_BEAMS}");
    let rows = users * beams;
    if logits.rank() != 2 || logits.shape()[0] != rows {
        bail!("{OP}: logits must be [{users} users x {beams} beams, V], got {}", shape_str(logits.shape()));
    }
    if lse.shape() != [rows] {
        bail!("{OP}: lse must be [{rows}], got {}", shape_str(lse.shape()));
    }
    if state.shape() != [rows, 4] {
        bail!("{OP}: state must be [{rows}, 4], got {}", shape_str(state.shape()));
    }
    let vocab = logits.shape()[1];
    let t = trie.trie();
    ensure!(
        (t.max_token() as usize) < vocab,
        "{OP}: logits {} have a vocabulary of {vocab} but the trie uses token {}",
        shape_str(logits.shape()),
        t.max_token()
    );
    ensure!(beams * vocab <= u32::MAX as usize, "{OP}: beams x vocabulary {vocab} overflows u32 keys");
    let gpu = logits.gpu();
    let out = Selected {
        state: Tensor::empty(gpu, &[rows, 4], DType::U32)?,
        parents: Tensor::empty(gpu, &[rows], DType::U32)?,
        tokens: Tensor::empty(gpu, &[rows], DType::U32)?,
    };
    let p = Params::new().u(users).u(beams).u(vocab).u(t.num_nodes()).u(t.eos() as usize).f(f32::NEG_INFINITY);
    gpu.dispatch(
        &kernel(wg_for(gpu), lmax_for(beams)),
        p.bytes(),
        &[
            logits.buffer(),
            trie.tensor().buffer(),
            state.buffer(),
            out.state.buffer(),
            out.parents.buffer(),
            out.tokens.buffer(),
            lse.buffer(),
        ],
        row_grid(users),
    )?;
    Ok(out)
}

/// CPU reference of [`beam_select`] (same f32 arithmetic:
/// `score + (logits - lse)`): returns (new states, parents, tokens).
pub fn beam_select_ref(
    logits: &[f32],
    lse: &[f32],
    vocab: usize,
    trie: &Trie,
    state: &[BeamState],
    users: usize,
    beams: usize,
) -> (Vec<BeamState>, Vec<u32>, Vec<u32>) {
    let rows = users * beams;
    let logp = |r: usize, t: u32| logits[r * vocab + t as usize] - lse[r];
    let (mut new_state, mut parents, mut tokens) = (Vec::with_capacity(rows), Vec::with_capacity(rows), Vec::new());
    for b in 0..users {
        // (score, key, parent row, token, new state)
        let mut cands: Vec<(f32, u32, u32, u32, BeamState)> = Vec::new();
        for k in 0..beams {
            let r = b * beams + k;
            let st = state[r];
            let key = |tok: u32| (k * vocab) as u32 + tok;
            if st.node == FINISHED {
                cands.push((st.score, key(trie.eos()), r as u32, trie.eos(), st));
            } else if (st.node as usize) < trie.num_nodes() {
                for (tok, child) in trie.children(st.node) {
                    let s = st.score + logp(r, tok);
                    cands.push((s, key(tok), r as u32, tok, BeamState { node: child, item: NO_ITEM, score: s }));
                }
                if let Some(item) = trie.leaf_item(st.node) {
                    let s = st.score + logp(r, trie.eos());
                    cands.push((
                        s,
                        key(trie.eos()),
                        r as u32,
                        trie.eos(),
                        BeamState { node: FINISHED, item, score: s },
                    ));
                }
            }
        }
        cands.retain(|c| c.0 > f32::NEG_INFINITY);
        cands.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        for s in 0..beams {
            match cands.get(s) {
                Some(&(_, _, parent, tok, st)) => {
                    new_state.push(st);
                    parents.push(parent);
                    tokens.push(tok);
                }
                None => {
                    new_state.push(BeamState::DEAD);
                    parents.push((b * beams + s) as u32);
                    tokens.push(trie.eos());
                }
            }
        }
    }
    (new_state, parents, tokens)
}

/// Per user, the first `topk` finished beams of a final state, best first.
fn collect(op: &str, states: &[BeamState], trie: &Trie, opts: &BeamOpts) -> Result<Vec<Vec<Hyp>>> {
    let mut out = Vec::with_capacity(opts.batch);
    for b in 0..opts.batch {
        let mut hyps = Vec::with_capacity(opts.topk);
        for st in &states[b * opts.beams..(b + 1) * opts.beams] {
            match st.node {
                FINISHED => {
                    ensure!(
                        (st.item as usize) < trie.num_items() && st.score.is_finite(),
                        "{op}: internal error: user {b} finished with item {} score {}",
                        st.item,
                        st.score
                    );
                    if hyps.len() < opts.topk {
                        hyps.push(Hyp { item: st.item, score: st.score });
                    }
                }
                DEAD => {}
                n => bail!("{op}: internal error: user {b} still has a live beam at node {n} after the last step"),
            }
        }
        ensure!(
            !hyps.is_empty(),
            "{op}: user {b} ended with no finite-scored item: the model's logits were NaN or -inf at every allowed token"
        );
        out.push(hyps);
    }
    Ok(out)
}

/// Trie-constrained beam search on the GPU; returns, per user, up to
/// `opts.topk` distinct items with their scores, best first (see the module
/// doc for the exact semantics). `model` must be prepared for `opts.rows()`
/// rows; it is stepped `trie.max_depth() + 1` times and reordered between steps.
pub fn beam_search(model: &mut dyn StepModel, trie: &GpuTrie, opts: &BeamOpts) -> Result<Vec<Vec<Hyp>>> {
    const OP: &str = "beam_search";
    let t = trie.trie();
    let vocab = model.vocab();
    opts.validate(OP, vocab, t)?;
    let gpu = trie.gpu();
    let rows = opts.rows();
    let mut state = BeamState::upload(gpu, &BeamState::initial(opts.batch, opts.beams))?;
    let mut tokens = Tensor::from_u32(gpu, &vec![opts.start_token; rows], &[rows])?;
    let steps = t.max_depth() + 1;
    for step in 0..steps {
        let logits = model.step(&tokens).with_context(|| format!("{OP}: model step {step}"))?;
        if logits.shape() != [rows, vocab] || logits.dtype() != DType::F32 {
            bail!(
                "{OP}: model step {step} returned {} {:?} logits, expected [{rows}, {vocab}] F32",
                shape_str(logits.shape()),
                logits.dtype()
            );
        }
        let lse = row_lse(OP, &logits, &state, 4, trie, opts.norm)?;
        let sel = beam_select(&logits, &lse, trie, &state, opts.batch, opts.beams)?;
        if step + 1 < steps {
            model.reorder(&sel.parents).with_context(|| format!("{OP}: model reorder after step {step}"))?;
        }
        state = sel.state;
        tokens = sel.tokens;
    }
    collect(OP, &BeamState::download(&state)?, t, opts)
}

/// A model on the host, for the reference search: the same contract as
/// [`StepModel`] with host vectors (`step` returns `[rows * vocab]` logits).
pub trait CpuStepModel {
    fn vocab(&self) -> usize;
    fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>>;
    fn reorder(&mut self, parents: &[u32]) -> Result<()>;
}

/// Plain-Rust reference of [`beam_search`] (same semantics, f64 log-softmax,
/// sort-based selection).
pub fn beam_search_ref(model: &mut dyn CpuStepModel, trie: &Trie, opts: &BeamOpts) -> Result<Vec<Vec<Hyp>>> {
    const OP: &str = "beam_search_ref";
    let vocab = model.vocab();
    opts.validate(OP, vocab, trie)?;
    let rows = opts.rows();
    let mut state = BeamState::initial(opts.batch, opts.beams);
    let mut tokens = vec![opts.start_token; rows];
    let steps = trie.max_depth() + 1;
    for step in 0..steps {
        let logits = model.step(&tokens)?;
        ensure!(logits.len() == rows * vocab, "{OP}: model step {step} returned {} logits", logits.len());
        let nodes: Vec<u32> = state.iter().map(|s| s.node).collect();
        let lse = trie_row_lse_ref(&logits, vocab, &nodes, trie, opts.norm);
        let (st, parents, toks) = beam_select_ref(&logits, &lse, vocab, trie, &state, opts.batch, opts.beams);
        if step + 1 < steps {
            model.reorder(&parents)?;
        }
        state = st;
        tokens = toks;
    }
    collect(OP, &state, trie, opts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::mask::trie_log_softmax_ref;
    use crate::decode::random_trie;
    use crate::decode::toy::toy_pair;
    use crate::gpu::Gpu;
    use crate::ops::testing::rand_vec;
    use rand::{Rng, SeedableRng};

    fn gpu() -> Gpu {
        Gpu::shared().unwrap()
    }

    /// Random beam states over `trie`: live beams at random nodes with random
    /// scores, some finished (random items), some dead; a few tied scores.
    fn random_states(rng: &mut rand::rngs::StdRng, trie: &Trie, rows: usize) -> Vec<BeamState> {
        (0..rows)
            .map(|_| {
                let score = if rng.gen_bool(0.2) { -1.0 } else { rng.gen_range(-8.0f32..0.0) };
                match rng.gen_range(0..10) {
                    0 => BeamState::DEAD,
                    1 | 2 => BeamState { node: FINISHED, item: rng.gen_range(0..trie.num_items() as u32), score },
                    _ => BeamState { node: rng.gen_range(0..trie.num_nodes() as u32), item: NO_ITEM, score },
                }
            })
            .collect()
    }

    #[test]
    fn select_matches_reference_exactly() {
        let g = gpu();
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for (vocab, users, beams) in
            [(2, 1, 1), (7, 3, 7), (33, 5, 33), (257, 2, 9), (1030, 1, 20), (9, 37, 2), (40, 2, 70)]
        {
            let trie = random_trie(vocab as u64 + 100, vocab, 5 + vocab / 3, 4);
            let gt = trie.to_gpu(&g).unwrap();
            let rows = users * beams;
            let states = random_states(&mut rng, &trie, rows);
            let nodes: Vec<u32> = states.iter().map(|s| s.node).collect();
            // Quantised logits so equal-score ties occur and test the key order.
            let logits: Vec<f32> =
                rand_vec(vocab as u64, rows * vocab, 3.0).iter().map(|v| (v * 2.0).round() / 2.0).collect();
            let lse = trie_row_lse_ref(&logits, vocab, &nodes, &trie, ScoreNorm::Allowed);
            let t_logits = Tensor::from_f32(&g, &logits, &[rows, vocab]).unwrap();
            let t_lse = Tensor::from_f32(&g, &lse, &[rows]).unwrap();
            let t_state = BeamState::upload(&g, &states).unwrap();
            let sel = beam_select(&t_logits, &t_lse, &gt, &t_state, users, beams).unwrap();
            let (want_s, want_p, want_t) = beam_select_ref(&logits, &lse, vocab, &trie, &states, users, beams);
            let got_s = BeamState::download(&sel.state).unwrap();
            let what = format!("V={vocab} users={users} beams={beams}");
            for (r, (a, b)) in got_s.iter().zip(&want_s).enumerate() {
                assert!(
                    a.node == b.node && a.item == b.item && a.score.to_bits() == b.score.to_bits(),
                    "{what} row {r}: {a:?} vs {b:?}"
                );
            }
            assert_eq!(sel.parents.to_vec_u32().unwrap(), want_p, "{what} parents");
            assert_eq!(sel.tokens.to_vec_u32().unwrap(), want_t, "{what} tokens");
            // Scores come out sorted per user.
            for b in 0..users {
                let s: Vec<f32> = want_s[b * beams..(b + 1) * beams].iter().map(|s| s.score).collect();
                assert!(s.windows(2).all(|w| w[0] >= w[1]), "{what}: unsorted {s:?}");
            }
        }
    }

    fn run_both(vocab: usize, trie: &Trie, opts: &BeamOpts, seed: u64) -> (Vec<Vec<Hyp>>, Vec<Vec<Hyp>>) {
        let g = gpu();
        let gt = trie.to_gpu(&g).unwrap();
        let (mut m, mut r) = toy_pair(&g, vocab, opts.rows(), trie.max_depth() + 1, 3.0, seed).unwrap();
        let got = beam_search(&mut m, &gt, opts).unwrap();
        let want = beam_search_ref(&mut r, trie, opts).unwrap();
        (got, want)
    }

    fn assert_same(what: &str, got: &[Vec<Hyp>], want: &[Vec<Hyp>]) {
        assert_eq!(got.len(), want.len(), "{what}: users");
        for (b, (g, w)) in got.iter().zip(want).enumerate() {
            let gi: Vec<u32> = g.iter().map(|h| h.item).collect();
            let wi: Vec<u32> = w.iter().map(|h| h.item).collect();
            assert_eq!(gi, wi, "{what}: user {b} items");
            for (x, y) in g.iter().zip(w) {
                assert!((x.score - y.score).abs() <= 1e-4 * (1.0 + y.score.abs()), "{what}: user {b} {x:?} vs {y:?}");
            }
        }
    }

    #[test]
    fn gpu_search_matches_reference_search() {
        for (seed, vocab, batch, beams, topk) in
            [(1u64, 12, 3, 5, 5), (2, 7, 1, 1, 1), (3, 33, 4, 8, 3), (4, 20, 2, 20, 10)]
        {
            let trie = random_trie(seed, vocab, 40, 4);
            for norm in [ScoreNorm::Allowed, ScoreNorm::FullVocab] {
                let opts = BeamOpts { norm, ..BeamOpts::new(batch, beams, topk, (vocab - 1) as u32) };
                let (got, want) = run_both(vocab, &trie, &opts, seed);
                assert_same(&format!("seed {seed} {norm:?}"), &got, &want);
                assert!(got.iter().all(|h| h.len() == topk.min(trie.num_items())));
            }
        }
    }

    /// Exhaustive search (beams >= items) returns every item, ranked by its
    /// exact joint log-prob computed by running the model along each sequence.
    #[test]
    fn exhaustive_search_ranks_all_items_by_joint_log_prob() {
        let vocab = 10;
        let trie = random_trie(5, vocab, 12, 3);
        let n = trie.num_items();
        let (start, eos) = (0u32, trie.eos());
        let opts = BeamOpts::new(2, n, n, start);
        let (got, want) = run_both(vocab, &trie, &opts, 9);
        assert_same("exhaustive", &got, &want);
        // Brute force with the host model: one row per item (2 users: the model is row-wise, same tables).
        let g = gpu();
        let (_, mut r) = toy_pair(&g, vocab, n, trie.max_depth() + 1, 3.0, 9).unwrap();
        let mut score = vec![0f64; n];
        let mut prefix: Vec<Vec<u32>> = vec![Vec::new(); n];
        let mut toks = vec![start; n];
        let mut done = vec![false; n];
        for _ in 0..=trie.max_depth() {
            let logits = r.step(&toks).unwrap();
            for i in 0..n {
                if done[i] {
                    continue;
                }
                let seq = trie.tokens(i as u32).unwrap();
                let next = if prefix[i].len() < seq.len() { seq[prefix[i].len()] } else { eos };
                let node = trie.node_for_prefix(&prefix[i]).unwrap();
                let lp = trie_log_softmax_ref(
                    &logits[i * vocab..(i + 1) * vocab],
                    vocab,
                    &[node],
                    &trie,
                    ScoreNorm::Allowed,
                );
                score[i] += lp[next as usize] as f64;
                if next == eos {
                    done[i] = true;
                } else {
                    prefix[i].push(next);
                }
                toks[i] = next;
            }
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| score[b].total_cmp(&score[a]));
        for hyps in &got {
            assert_eq!(hyps.len(), n);
            assert_eq!(hyps.iter().map(|h| h.item as usize).collect::<Vec<_>>(), order);
            for h in hyps {
                assert!((h.score as f64 - score[h.item as usize]).abs() < 1e-4, "{h:?} vs {}", score[h.item as usize]);
            }
        }
    }

    /// HF-style beam search (K live beams, top-2K candidates, EOS candidates of
    /// rank < K go to a finished list, done when K are finished), on tries with
    /// all items of equal depth and full-vocab log-probs: the same items and scores.
    #[allow(clippy::needless_range_loop)]
    fn hf_reference(
        model: &mut dyn CpuStepModel,
        trie: &Trie,
        batch: usize,
        beams: usize,
        start: u32,
    ) -> Vec<Vec<Hyp>> {
        let vocab = model.vocab();
        let rows = batch * beams;
        let ninf = f32::NEG_INFINITY;
        // HF starts beams 1.. at -1e9 (not -inf).
        let mut score: Vec<f32> = (0..rows).map(|r| if r % beams == 0 { 0.0 } else { -1e9 }).collect();
        let mut prefix: Vec<Vec<u32>> = vec![Vec::new(); rows];
        let mut toks = vec![start; rows];
        let mut finished: Vec<Vec<Hyp>> = vec![Vec::new(); batch];
        for _ in 0..=trie.max_depth() {
            let logits = model.step(&toks).unwrap();
            let mut parents = vec![0u32; rows];
            let (mut new_score, mut new_prefix, mut new_toks) = (score.clone(), prefix.clone(), toks.clone());
            for b in 0..batch {
                let mut cands: Vec<(f32, usize, u32)> = Vec::new();
                for k in 0..beams {
                    let r = b * beams + k;
                    let row = &logits[r * vocab..(r + 1) * vocab];
                    let m = row.iter().cloned().fold(ninf, f32::max) as f64;
                    let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
                    let allowed = trie.allowed_after(&prefix[r]).unwrap_or_default();
                    for t in 0..vocab as u32 {
                        let lp = if allowed.contains(&t) { (row[t as usize] as f64 - lse) as f32 } else { ninf };
                        cands.push((score[r] + lp, k, t));
                    }
                }
                // torch.topk over the flattened [beams * V]; ties to the lower index.
                cands.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
                let mut next = 0;
                for (rank, &(s, k, t)) in cands.iter().take(2 * beams).enumerate() {
                    let r = b * beams + k;
                    if t == trie.eos() {
                        if rank < beams && s > ninf && finished[b].len() < beams {
                            finished[b].push(Hyp { item: trie.item_for_tokens(&prefix[r]).unwrap(), score: s });
                        }
                        continue;
                    }
                    if next < beams {
                        let nr = b * beams + next;
                        parents[nr] = r as u32;
                        new_score[nr] = s;
                        new_prefix[nr] = [&prefix[r][..], &[t]].concat();
                        new_toks[nr] = t;
                        next += 1;
                    }
                }
            }
            model.reorder(&parents).unwrap();
            (score, prefix, toks) = (new_score, new_prefix, new_toks);
        }
        for f in &mut finished {
            f.sort_by(|a, b| b.score.total_cmp(&a.score));
        }
        finished
    }

    #[test]
    fn equal_depth_search_equals_hf_beam_search() {
        let g = gpu();
        for (seed, vocab, depth, beams) in [(21u64, 9, 3, 4), (22, 14, 2, 6), (23, 11, 4, 3)] {
            // All items of one depth, per-level alphabet of 4 (>= beams first tokens where needed).
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut items: Vec<Vec<u32>> = Vec::new();
            for first in 0..beams.max(2) as u32 {
                for _ in 0..3 {
                    let mut s = vec![first + 1];
                    s.extend((1..depth).map(|_| rng.gen_range(1..vocab as u32 - 1)));
                    if !items.contains(&s) {
                        items.push(s);
                    }
                }
            }
            let trie = Trie::new(&items, vocab as u32 - 1).unwrap();
            let opts = BeamOpts { norm: ScoreNorm::FullVocab, ..BeamOpts::new(2, beams, beams, 0) };
            let (mut m, _) = toy_pair(&g, vocab, opts.rows(), depth + 1, 3.0, seed).unwrap();
            let (_, mut r) = toy_pair(&g, vocab, opts.rows(), depth + 1, 3.0, seed).unwrap();
            let got = beam_search(&mut m, &trie.to_gpu(&g).unwrap(), &opts).unwrap();
            let want = hf_reference(&mut r, &trie, 2, beams, 0);
            assert_same(&format!("hf seed {seed}"), &got, &want);
        }
    }

    /// Random tries (uneven depths, prefix items, random vocabularies), random
    /// models: every result is a valid item, distinct, `min(topk, items)` long,
    /// best first, and equal to the reference search.
    #[test]
    fn property_random_tries_give_valid_distinct_items() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(77);
        for case in 0..12u64 {
            let vocab = rng.gen_range(2..40);
            let n_items = rng.gen_range(1..30);
            let trie = random_trie(1000 + case, vocab, n_items, rng.gen_range(1..6));
            let beams = rng.gen_range(1..12);
            let topk = rng.gen_range(1..=beams);
            let batch = rng.gen_range(1..4);
            let start = rng.gen_range(0..vocab as u32);
            let opts = BeamOpts::new(batch, beams, topk, start);
            let (got, want) = run_both(vocab, &trie, &opts, case);
            let what = format!("case {case}: V={vocab} items={} beams={beams} topk={topk}", trie.num_items());
            assert_same(&what, &got, &want);
            for hyps in &got {
                assert_eq!(hyps.len(), topk.min(trie.num_items()), "{what}");
                let mut seen = std::collections::HashSet::new();
                for h in hyps {
                    let seq = trie.tokens(h.item).unwrap_or_else(|| panic!("{what}: invalid item {}", h.item));
                    assert_eq!(trie.item_for_tokens(seq), Some(h.item), "{what}");
                    assert!(seen.insert(h.item), "{what}: duplicate item {}", h.item);
                    assert!(h.score.is_finite() && h.score <= 1e-5, "{what}: score {}", h.score);
                }
                assert!(hyps.windows(2).all(|w| w[0].score >= w[1].score), "{what}: not best first");
            }
        }
    }

    #[test]
    fn fewer_items_than_beams_gives_no_garbage() {
        let trie = Trie::new(&[vec![1, 2], vec![1, 3], vec![4]], 5).unwrap();
        let opts = BeamOpts::new(3, 8, 8, 0);
        let (got, want) = run_both(6, &trie, &opts, 3);
        assert_same("few items", &got, &want);
        for hyps in &got {
            assert_eq!(hyps.len(), 3);
            let mut items: Vec<u32> = hyps.iter().map(|h| h.item).collect();
            items.sort();
            assert_eq!(items, vec![0, 1, 2]);
            assert!(hyps.iter().all(|h| h.score.is_finite()));
        }
    }

    /// Returns logits of the wrong width (`wrong`) or NaN logits.
    struct BadModel(usize, bool);
    impl StepModel for BadModel {
        fn vocab(&self) -> usize {
            self.0
        }
        fn step(&mut self, tokens: &Tensor) -> Result<Tensor> {
            if self.1 {
                return Tensor::zeros(tokens.gpu(), &[tokens.numel(), self.0 + 1], DType::F32);
            }
            Tensor::from_f32(tokens.gpu(), &vec![f32::NAN; tokens.numel() * self.0], &[tokens.numel(), self.0])
        }
        fn reorder(&mut self, _: &Tensor) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bad_inputs_are_clear_errors() {
        let g = gpu();
        let trie = Trie::new(&[vec![1, 2], vec![3]], 4).unwrap();
        let gt = trie.to_gpu(&g).unwrap();
        let (mut m, _) = toy_pair(&g, 5, 4, 3, 1.0, 0).unwrap();
        let e = beam_search(&mut m, &gt, &BeamOpts::new(2, 2, 3, 0)).unwrap_err().to_string();
        assert!(e.contains("beam_search") && e.contains("topk = 3"), "{e}");
        let e = beam_search(&mut m, &gt, &BeamOpts::new(2, 2, 2, 5)).unwrap_err().to_string();
        assert!(e.contains("start_token 5"), "{e}");
        let e = beam_search(&mut m, &gt, &BeamOpts::new(1, 300, 2, 0)).unwrap_err().to_string();
        assert!(e.contains("beams = 300"), "{e}");
        let (mut small, _) = toy_pair(&g, 4, 4, 3, 1.0, 0).unwrap();
        let e = beam_search(&mut small, &gt, &BeamOpts::new(2, 2, 2, 0)).unwrap_err().to_string();
        assert!(e.contains("token 4") && e.contains("vocabulary is 4"), "{e}");
        let e = beam_search(&mut BadModel(5, true), &gt, &BeamOpts::new(2, 2, 2, 0)).unwrap_err().to_string();
        assert!(e.contains("step 0") && e.contains("[4, 6]") && e.contains("[4, 5]"), "{e}");
        let e = beam_search(&mut BadModel(5, false), &gt, &BeamOpts::new(2, 2, 2, 0)).unwrap_err().to_string();
        assert!(e.contains("user 0") && e.contains("NaN"), "{e}");
        let lp = Tensor::zeros(&g, &[3, 5], DType::F32).unwrap();
        let st = BeamState::upload(&g, &BeamState::initial(2, 2)).unwrap();
        let lse = Tensor::zeros(&g, &[3], DType::F32).unwrap();
        let e = beam_select(&lp, &lse, &gt, &st, 2, 2).err().unwrap().to_string();
        assert!(e.contains("beam_select") && e.contains("[3, 5]"), "{e}");
    }

    /// A TIGER-shaped trie: `n` items x 4 levels of 256 codes (token 1 + 256 * level + code),
    /// colliding items get a 5th suffix token; pad/start 0, EOS 1025, V = 1026.
    fn tiger_trie(n: usize, seed: u64) -> Trie {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut seen = std::collections::HashMap::new();
        let items: Vec<Vec<u32>> = (0..n)
            .map(|_| {
                let mut s: Vec<u32> = (0..4).map(|l| 1 + 256 * l + rng.gen_range(0..256)).collect();
                let c = seen.entry(s.clone()).or_insert(0u32);
                if *c > 0 {
                    s.push(1 + 3 * 256 + *c);
                }
                *c += 1;
                s
            })
            .collect();
        Trie::new(&items, 1025).unwrap()
    }

    /// Timing on the current adapter (prints, asserts nothing about time):
    /// `cargo test --release --lib decode::beam::tests::stage_timing -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn stage_timing() {
        let g = gpu();
        let (vocab, batch, beams) = (1026usize, 64usize, 20usize);
        let trie = tiger_trie(1682, 1);
        let gt = trie.to_gpu(&g).unwrap();
        let opts = BeamOpts::new(batch, beams, 10, 0);
        let rows = opts.rows();
        println!("adapter: {}", g.describe());
        println!("trie: {} items, {} nodes, depth {}", trie.num_items(), trie.num_nodes(), trie.max_depth());
        // Decode kernels only: fixed logits, (depth + 1) x (mask + select), one sync.
        let logits = Tensor::from_f32(&g, &rand_vec(3, rows * vocab, 4.0), &[rows, vocab]).unwrap();
        let run = || {
            let mut state = BeamState::upload(&g, &BeamState::initial(batch, beams)).unwrap();
            for _ in 0..=trie.max_depth() {
                let lse = row_lse("t", &logits, &state, 4, &gt, ScoreNorm::Allowed).unwrap();
                state = beam_select(&logits, &lse, &gt, &state, batch, beams).unwrap().state;
            }
            BeamState::download(&state).unwrap()
        };
        run(); // compile pipelines
        let t0 = std::time::Instant::now();
        let reps = 3;
        for _ in 0..reps {
            run();
        }
        let dt = t0.elapsed().as_secs_f64() / reps as f64;
        println!(
            "decode kernels (row lse + select, {} steps, {batch} users x {beams} beams, V={vocab}): {:.1} ms/search = {:.0} users/s",
            trie.max_depth() + 1,
            dt * 1e3,
            batch as f64 / dt
        );
        // Stage split: masks alone, then selects alone (on a fixed masked input).
        let state0 = BeamState::upload(&g, &BeamState::initial(batch, beams)).unwrap();
        let t0 = std::time::Instant::now();
        for _ in 0..10 {
            row_lse("t", &logits, &state0, 4, &gt, ScoreNorm::Allowed).unwrap();
        }
        g.sync().unwrap();
        println!("  row lse: {:.2} ms/step", t0.elapsed().as_secs_f64() * 100.0);
        let t0 = std::time::Instant::now();
        for _ in 0..10 {
            crate::decode::mask::masked_log_softmax("t", &logits, &state0, 4, &gt, ScoreNorm::Allowed).unwrap();
        }
        g.sync().unwrap();
        println!(
            "  (full masked log-softmax, not used by the search: {:.2} ms/step)",
            t0.elapsed().as_secs_f64() * 100.0
        );
        // A wide state: every beam live at the root (its ~256 children each).
        let mid: Vec<BeamState> = (0..rows).map(|r| BeamState { node: 0, item: NO_ITEM, score: -(r as f32) }).collect();
        let mid = BeamState::upload(&g, &mid).unwrap();
        let lse = row_lse("t", &logits, &mid, 4, &gt, ScoreNorm::Allowed).unwrap();
        beam_select(&logits, &lse, &gt, &mid, batch, beams).unwrap();
        g.sync().unwrap();
        let t0 = std::time::Instant::now();
        for _ in 0..10 {
            beam_select(&logits, &lse, &gt, &mid, batch, beams).unwrap();
        }
        g.sync().unwrap();
        println!(
            "  select ({beams} x {} candidates per user): {:.2} ms/step",
            trie.children(0).count(),
            t0.elapsed().as_secs_f64() * 100.0
        );
        // Whole search with the toy model (its gather/add kernels included).
        let (mut m, mut r) = toy_pair(&g, vocab, rows, trie.max_depth() + 1, 3.0, 2).unwrap();
        let first = beam_search(&mut m, &gt, &opts).unwrap();
        let (mut m, _) = toy_pair(&g, vocab, rows, trie.max_depth() + 1, 3.0, 2).unwrap();
        let t0 = std::time::Instant::now();
        let got = beam_search(&mut m, &gt, &opts).unwrap();
        let dt = t0.elapsed().as_secs_f64();
        println!("beam_search with the toy model: {:.1} ms = {:.0} users/s", dt * 1e3, batch as f64 / dt);
        let t0 = std::time::Instant::now();
        let want = beam_search_ref(&mut r, &trie, &opts).unwrap();
        let dt = t0.elapsed().as_secs_f64();
        println!("beam_search_ref (host, same model): {:.1} ms = {:.0} users/s", dt * 1e3, batch as f64 / dt);
        assert_eq!(first, got);
        assert_same("timing run", &got, &want);
    }
}
