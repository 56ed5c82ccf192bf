//! Prefix trie over the items' token sequences, with its flattened GPU form.
//!
//! Item `i` is identified by a token sequence `items[i]` (its semantic-ID codes,
//! possibly of uneven length, e.g. when some items carry an extra
//! collision-suffix level). A sequence is complete when followed by the `eos`
//! token, which the trie allows only at a leaf, i.e. right after a complete
//! item sequence. A sequence that is a proper prefix of another item's sequence
//! is legal: its node is both internal and a leaf, so both its children and EOS
//! are allowed there. A duplicate full sequence is an error naming both items.
//!
//! Layout (host and GPU): nodes are numbered breadth-first from the root (0);
//! node `n`'s children are the edges `node_off[n]..node_off[n+1]`, sorted by
//! token, edge `e` going to `edge_child[e]` with token `edge_tok[e]`;
//! `node_item[n]` is the item ending at `n` or [`NO_ITEM`]. On the GPU the four
//! arrays are packed into one u32 buffer (see [`GpuTrie`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{bail, Result};

use crate::gpu::{Gpu, Tensor};

/// `node_item` value of a node where no item ends.
pub const NO_ITEM: u32 = u32::MAX;

/// A prefix trie over item token sequences plus an end-of-sequence token.
#[derive(Clone, Debug)]
pub struct Trie {
    eos: u32,
    /// `[N + 1]` CSR offsets into the edge arrays.
    node_off: Vec<u32>,
    /// `[N]` item ending at the node, or `NO_ITEM`.
    node_item: Vec<u32>,
    /// `[N]` depth of the node (root 0).
    node_depth: Vec<u32>,
    /// `[E]` edge tokens, ascending within each node.
    edge_tok: Vec<u32>,
    /// `[E]` edge targets.
    edge_child: Vec<u32>,
    /// Item id -> its token sequence.
    seqs: Vec<Vec<u32>>,
    max_depth: usize,
    max_token: u32,
}

impl Trie {
    /// Builds the trie of `items` (item `i` -> its tokens). Errors: no items, an
    /// empty sequence, a sequence containing `eos`, two items with the same
    /// sequence (naming both ids).
    pub fn new(items: &[Vec<u32>], eos: u32) -> Result<Trie> {
        const OP: &str = "Trie::new";
        if items.is_empty() {
            bail!("{OP}: no items to build a trie from");
        }
        if items.len() >= NO_ITEM as usize {
            bail!("{OP}: {} items do not fit u32 item ids", items.len());
        }
        // Pointer trie first (ids in insertion order), renumbered breadth-first below.
        let mut children: Vec<BTreeMap<u32, u32>> = vec![BTreeMap::new()];
        let mut item_at: Vec<u32> = vec![NO_ITEM];
        let mut max_depth = 0;
        let mut max_token = eos;
        for (i, seq) in items.iter().enumerate() {
            if seq.is_empty() {
                bail!("{OP}: item {i} has an empty token sequence (every item needs at least one token)");
            }
            if let Some(p) = seq.iter().position(|&t| t == eos) {
                bail!("{OP}: item {i} has the EOS token {eos} at position {p} of its sequence {seq:?}");
            }
            let mut node = 0usize;
            for &t in seq {
                max_token = max_token.max(t);
                node = match children[node].get(&t) {
                    Some(&c) => c as usize,
                    None => {
                        let c = children.len();
                        if c >= u32::MAX as usize - 2 {
                            bail!("{OP}: more than {} trie nodes", u32::MAX - 2);
                        }
                        children.push(BTreeMap::new());
                        item_at.push(NO_ITEM);
                        children[node].insert(t, c as u32);
                        c
                    }
                };
            }
            if item_at[node] != NO_ITEM {
                bail!("{OP}: items {} and {i} have the same token sequence {seq:?}", item_at[node]);
            }
            item_at[node] = i as u32;
            max_depth = max_depth.max(seq.len());
        }
        // Breadth-first renumbering: children of a node get consecutive ids.
        let n = children.len();
        let mut order = Vec::with_capacity(n); // new id -> old id
        let mut new_id = vec![0u32; n];
        let mut depth_of = vec![0u32; n];
        order.push(0usize);
        let mut head = 0;
        while head < order.len() {
            let old = order[head];
            head += 1;
            for &c in children[old].values() {
                new_id[c as usize] = order.len() as u32;
                depth_of[c as usize] = depth_of[old] + 1;
                order.push(c as usize);
            }
        }
        let mut node_off = Vec::with_capacity(n + 1);
        let mut node_item = Vec::with_capacity(n);
        let mut node_depth = Vec::with_capacity(n);
        let mut edge_tok = Vec::with_capacity(n - 1);
        let mut edge_child = Vec::with_capacity(n - 1);
        for &old in &order {
            node_off.push(edge_tok.len() as u32);
            node_item.push(item_at[old]);
            node_depth.push(depth_of[old]);
            for (&t, &c) in &children[old] {
                edge_tok.push(t);
                edge_child.push(new_id[c as usize]);
            }
        }
        node_off.push(edge_tok.len() as u32);
        Ok(Trie {
            eos,
            node_off,
            node_item,
            node_depth,
            edge_tok,
            edge_child,
            seqs: items.to_vec(),
            max_depth,
            max_token,
        })
    }

    /// The end-of-sequence token (allowed only at leaves).
    pub fn eos(&self) -> u32 {
        self.eos
    }
    /// The root node id (always 0).
    pub fn root(&self) -> u32 {
        0
    }
    pub fn num_items(&self) -> usize {
        self.seqs.len()
    }
    pub fn num_nodes(&self) -> usize {
        self.node_item.len()
    }
    pub fn num_edges(&self) -> usize {
        self.edge_tok.len()
    }
    /// Length of the longest item sequence (beam search needs `max_depth + 1` steps).
    pub fn max_depth(&self) -> usize {
        self.max_depth
    }
    /// The largest token id used, EOS included (a model's vocabulary must exceed it).
    pub fn max_token(&self) -> u32 {
        self.max_token
    }
    /// Depth of `node` (root 0), or None for an unknown node.
    pub fn depth(&self, node: u32) -> Option<usize> {
        self.node_depth.get(node as usize).map(|&d| d as usize)
    }

    /// The token sequence of `item` (without EOS).
    pub fn tokens(&self, item: u32) -> Option<&[u32]> {
        self.seqs.get(item as usize).map(|s| &s[..])
    }

    /// `(token, child)` pairs of `node`, ascending by token (empty for an unknown node).
    pub fn children(&self, node: u32) -> impl Iterator<Item = (u32, u32)> + '_ {
        let (a, b) = self.edge_range(node);
        (a..b).map(move |e| (self.edge_tok[e], self.edge_child[e]))
    }

    fn edge_range(&self, node: u32) -> (usize, usize) {
        match self.node_off.get(node as usize..node as usize + 2) {
            Some(r) => (r[0] as usize, r[1] as usize),
            None => (0, 0),
        }
    }

    /// The child of `node` along `token`, if any.
    pub fn child(&self, node: u32, token: u32) -> Option<u32> {
        let (a, b) = self.edge_range(node);
        self.edge_tok[a..b].binary_search(&token).ok().map(|k| self.edge_child[a + k])
    }

    /// The item ending at `node` (a leaf), if any.
    pub fn leaf_item(&self, node: u32) -> Option<u32> {
        self.node_item.get(node as usize).copied().filter(|&i| i != NO_ITEM)
    }

    /// Tokens allowed after reaching `node`: its children's tokens, plus EOS if
    /// an item ends there; ascending. Empty for an unknown node.
    pub fn allowed_tokens(&self, node: u32) -> Vec<u32> {
        let mut v: Vec<u32> = self.children(node).map(|(t, _)| t).collect();
        if self.leaf_item(node).is_some() {
            let at = v.partition_point(|&t| t < self.eos);
            v.insert(at, self.eos);
        }
        v
    }

    /// Valid first tokens (the root's children), ascending.
    pub fn first_tokens(&self) -> Vec<u32> {
        self.allowed_tokens(0)
    }

    /// The node reached by following `prefix` from the root (EOS not allowed in it).
    pub fn node_for_prefix(&self, prefix: &[u32]) -> Option<u32> {
        prefix.iter().try_fold(0u32, |n, &t| self.child(n, t))
    }

    /// Tokens allowed after the decoded `prefix` (the analogue of HF's
    /// `prefix_allowed_tokens_fn`); None when `prefix` leaves the trie.
    pub fn allowed_after(&self, prefix: &[u32]) -> Option<Vec<u32>> {
        self.node_for_prefix(prefix).map(|n| self.allowed_tokens(n))
    }

    /// Maps a decoded token sequence back to its item: the exact sequence of an
    /// item, optionally followed by one EOS. None for anything else.
    pub fn item_for_tokens(&self, tokens: &[u32]) -> Option<u32> {
        let body = match tokens.split_last() {
            Some((&last, body)) if last == self.eos => body,
            _ => tokens,
        };
        self.node_for_prefix(body).and_then(|n| self.leaf_item(n))
    }

    /// All items whose sequence starts with `prefix` (the prefix's own item
    /// included), ascending by item id. Empty when `prefix` leaves the trie.
    pub fn items_for_prefix(&self, prefix: &[u32]) -> Vec<u32> {
        let mut out = Vec::new();
        let Some(start) = self.node_for_prefix(prefix) else {
            return out;
        };
        let mut stack = vec![start];
        while let Some(n) = stack.pop() {
            out.extend(self.leaf_item(n));
            stack.extend(self.children(n).map(|(_, c)| c));
        }
        out.sort_unstable();
        out
    }

    /// The flattened arrays packed as the GPU reads them:
    /// `[node_off (N + 1) | node_item (N) | edge_tok (E) | edge_child (E)]`.
    pub fn packed(&self) -> Vec<u32> {
        let mut v = Vec::with_capacity(2 * self.num_nodes() + 1 + 2 * self.num_edges());
        v.extend_from_slice(&self.node_off);
        v.extend_from_slice(&self.node_item);
        v.extend_from_slice(&self.edge_tok);
        v.extend_from_slice(&self.edge_child);
        v
    }

    /// Uploads the trie once; the result is shared by every search.
    pub fn to_gpu(&self, gpu: &Gpu) -> Result<GpuTrie> {
        GpuTrie::upload(gpu, self)
    }
}

/// A [`Trie`] resident on the GPU (one packed u32 buffer, see [`Trie::packed`])
/// together with its host copy, for mapping results back to items.
#[derive(Clone, Debug)]
pub struct GpuTrie {
    trie: Arc<Trie>,
    packed: Tensor,
}

impl GpuTrie {
    /// Uploads `trie` (one buffer).
    pub fn upload(gpu: &Gpu, trie: &Trie) -> Result<GpuTrie> {
        let data = trie.packed();
        let packed = Tensor::from_u32(gpu, &data, &[data.len()])?;
        Ok(GpuTrie { trie: Arc::new(trie.clone()), packed })
    }
    /// The host copy.
    pub fn trie(&self) -> &Trie {
        &self.trie
    }
    /// The packed buffer: U32 `[2N + 1 + 2E]`.
    pub fn tensor(&self) -> &Tensor {
        &self.packed
    }
    pub fn gpu(&self) -> &Gpu {
        self.packed.gpu()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_csr_with_prefix_items_and_lookups() {
        // eos = 9; item 2 is a prefix of items 0 and 3 (uneven depth), item 4 single token.
        let items = vec![vec![1, 2, 3], vec![1, 4, 3], vec![1, 2], vec![1, 2, 5, 7], vec![6]];
        let t = Trie::new(&items, 9).unwrap();
        assert_eq!(t.num_items(), 5);
        assert_eq!(t.max_depth(), 4);
        assert_eq!(t.max_token(), 9);
        assert_eq!(t.num_nodes(), 9); // root, 1, 6, 12, 14, 123, 125, 143, 1257
        assert_eq!(t.num_edges(), 8);
        assert_eq!(t.first_tokens(), vec![1, 6]);
        // Breadth-first numbering: the root's children are nodes 1 and 2.
        assert_eq!(t.children(0).collect::<Vec<_>>(), vec![(1, 1), (6, 2)]);
        let n12 = t.node_for_prefix(&[1, 2]).unwrap();
        assert_eq!(t.depth(n12), Some(2));
        assert_eq!(t.leaf_item(n12), Some(2));
        // Internal and leaf at once: children and EOS both allowed.
        assert_eq!(t.allowed_tokens(n12), vec![3, 5, 9]);
        assert_eq!(t.allowed_after(&[1]), Some(vec![2, 4]));
        assert_eq!(t.allowed_after(&[6]), Some(vec![9]));
        assert_eq!(t.allowed_after(&[1, 4, 3]), Some(vec![9]));
        assert_eq!(t.allowed_after(&[7]), None);
        assert_eq!(t.item_for_tokens(&[1, 4, 3]), Some(1));
        assert_eq!(t.item_for_tokens(&[1, 4, 3, 9]), Some(1));
        assert_eq!(t.item_for_tokens(&[1, 2, 9]), Some(2));
        assert_eq!(t.item_for_tokens(&[1, 4]), None);
        assert_eq!(t.item_for_tokens(&[1, 2, 3, 9, 9]), None);
        assert_eq!(t.item_for_tokens(&[]), None);
        assert_eq!(t.items_for_prefix(&[1, 2]), vec![0, 2, 3]);
        assert_eq!(t.items_for_prefix(&[]), vec![0, 1, 2, 3, 4]);
        assert_eq!(t.items_for_prefix(&[2]), Vec::<u32>::new());
        assert_eq!(t.tokens(3), Some(&[1, 2, 5, 7][..]));
        assert_eq!(t.tokens(5), None);
        // Every item's path ends at a leaf holding that item.
        for (i, s) in items.iter().enumerate() {
            assert_eq!(t.item_for_tokens(s), Some(i as u32));
        }
        // Packed layout sizes and offsets.
        let p = t.packed();
        assert_eq!(p.len(), 2 * 9 + 1 + 2 * 8);
        assert_eq!(p[9], 8); // node_off[N] = E
                             // Unknown nodes are harmless.
        assert_eq!(t.children(99).count(), 0);
        assert!(t.allowed_tokens(99).is_empty());
        assert_eq!(t.leaf_item(99), None);
    }

    #[test]
    fn bad_inputs_are_errors_naming_items() {
        let e = Trie::new(&[vec![1, 2], vec![3], vec![1, 2]], 0).unwrap_err().to_string();
        assert!(e.contains("items 0 and 2") && e.contains("[1, 2]"), "{e}");
        let e = Trie::new(&[vec![1], vec![]], 0).unwrap_err().to_string();
        assert!(e.contains("item 1") && e.contains("empty"), "{e}");
        let e = Trie::new(&[vec![1, 5, 2]], 5).unwrap_err().to_string();
        assert!(e.contains("item 0") && e.contains("EOS") && e.contains("position 1"), "{e}");
        assert!(Trie::new(&[], 0).unwrap_err().to_string().contains("no items"));
    }

    #[test]
    fn uploads_packed_buffer() {
        let gpu = Gpu::shared().unwrap();
        let t = Trie::new(&[vec![3, 1], vec![3, 2], vec![0]], 4).unwrap();
        let g = t.to_gpu(&gpu).unwrap();
        assert_eq!(g.tensor().to_vec_u32().unwrap(), t.packed());
        assert_eq!(g.trie().num_items(), 3);
    }
}
