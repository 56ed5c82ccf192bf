//! Collaborative models trained on the GPU: SASRec (sequential), LightGCN and
//! BPR-MF (graph / general), and the popularity baseline. They are baselines
//! in the results table and export item (and user) embeddings for the
//! tokenizers (`save_embeddings`).

pub mod lightgcn;
pub mod mf;
pub mod sasrec;

use crate::data::{EvalCase, Prepared};
use crate::eval::{EvalReport, Evaluator, Protocol};
use anyhow::Result;

/// Most-popular baseline: scores every item by its training frequency.
pub fn popularity_scores(data: &Prepared) -> Vec<f32> {
    let mut counts = vec![0f32; data.n_items()];
    for u in 0..data.n_users() {
        for i in data.train_sequence(u) {
            counts[i as usize] += 1.0;
        }
    }
    counts
}

/// Evaluate the popularity baseline on `cases`.
pub fn evaluate_popularity(data: &Prepared, cases: &[EvalCase], protocol: &Protocol) -> Result<EvalReport> {
    let scores = popularity_scores(data);
    let mut ev = Evaluator::new(protocol, data.n_items(), None)?;
    for c in cases {
        ev.add_scores(c, &scores)?;
    }
    Ok(ev.finish())
}

/// A synthetic dataset with planted sequential structure, for tests: each
/// user walks a cycle over `n_items` items with a user-specific stride, so
/// the next item is a deterministic function of the previous two (not of
/// popularity, which is uniform).
pub fn synthetic_cycles(n_users: usize, n_items: usize, len: usize, seed: u64) -> crate::data::RawDataset {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut raw = crate::data::RawDataset { name: "synthetic-cycles".into(), ..Default::default() };
    for u in 0..n_users {
        let stride = [1usize, 2, 3][u % 3];
        let mut item = rng.gen_range(0..n_items);
        for t in 0..len {
            raw.interactions.push(crate::data::RawInteraction {
                user: format!("u{u}"),
                item: format!("i{item}"),
                timestamp: t as i64,
                rating: None,
            });
            item = (item + stride) % n_items;
        }
    }
    raw
}

/// A synthetic dataset with planted community structure, for tests: users in
/// group g interact only with items of block g (`n_items / groups` items).
pub fn synthetic_blocks(
    n_users: usize,
    n_items: usize,
    groups: usize,
    per_user: usize,
    seed: u64,
) -> crate::data::RawDataset {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let block = n_items / groups;
    let mut raw = crate::data::RawDataset { name: "synthetic-blocks".into(), ..Default::default() };
    for u in 0..n_users {
        let g = u % groups;
        let mut items: Vec<usize> = (g * block..(g + 1) * block).collect();
        items.shuffle(&mut rng);
        for (t, &i) in items.iter().take(per_user).enumerate() {
            raw.interactions.push(crate::data::RawInteraction {
                user: format!("u{u}"),
                item: format!("i{i}"),
                timestamp: t as i64,
                rating: None,
            });
        }
    }
    raw
}

/// Writes CF embeddings as safetensors (`item_emb` [n_items, d], and
/// `user_emb` [n_users, d] when given), atomically. Row i is internal id i of
/// the prepared dataset. `__metadata__` records the model and dataset name.
pub fn save_embeddings(
    path: &std::path::Path,
    model: &str,
    dataset: &str,
    d: usize,
    items: &[f32],
    users: Option<&[f32]>,
) -> Result<()> {
    use crate::io::safetensors::{save, StoreDtype};
    use crate::io::HostTensor;
    let mut t = std::collections::BTreeMap::new();
    if d == 0 || items.is_empty() || items.len() % d != 0 {
        anyhow::bail!("save_embeddings {}: {} item values is not a multiple of d = {d}", path.display(), items.len());
    }
    t.insert("item_emb".to_string(), HostTensor::new(&[items.len() / d, d], items.to_vec())?);
    if let Some(u) = users {
        if u.is_empty() || u.len() % d != 0 {
            anyhow::bail!("save_embeddings {}: {} user values is not a multiple of d = {d}", path.display(), u.len());
        }
        t.insert("user_emb".to_string(), HostTensor::new(&[u.len() / d, d], u.to_vec())?);
    }
    let mut meta = std::collections::HashMap::new();
    meta.insert("genrec.model".to_string(), model.to_string());
    meta.insert("genrec.dataset".to_string(), dataset.to_string());
    save(path, &t, Some(&meta), StoreDtype::F32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{prepare::prepare, PrepareOptions, Split};
    use crate::gpu::Gpu;

    /// Trains a BPR model (LightGCN or MF) on planted communities and checks
    /// that it learns them: the loss falls and recall@10 far exceeds popularity.
    fn assert_learns_blocks(what: &str, data: &crate::data::Prepared, model: &lightgcn::LightGcn) {
        let losses = model.fit(|_, _| Ok(true)).unwrap();
        assert!(losses.last().unwrap() < &(losses[0] * 0.7), "{what}: BPR loss did not fall: {losses:?}");
        let cases = data.eval_cases(Split::Test);
        let protocol = Protocol { bootstrap: 0, exclude_history: true, ..Default::default() };
        let r = model.evaluate(&cases, &protocol).unwrap().metric("recall", 10).unwrap();
        let p = evaluate_popularity(data, &cases, &protocol).unwrap().metric("recall", 10).unwrap();
        // 12 unseen items of the user's block vs 20 of the other: ranking the
        // block first gives recall@10 ~ 10/12; uniform ranking ~ 10/32.
        assert!(r > 0.7 && r > p + 0.25, "{what} recall@10 {r} vs popularity {p}");
    }

    #[test]
    fn lightgcn_learns_planted_communities_and_beats_popularity() {
        let gpu = Gpu::shared().unwrap();
        let raw = synthetic_blocks(80, 40, 2, 10, 5);
        let data = prepare(&raw, &PrepareOptions { kcore: 0, ..Default::default() }).unwrap();
        let cfg = lightgcn::LightGcnConfig { d: 16, epochs: 60, batch_size: 256, lr: 1e-2, ..Default::default() };
        assert_learns_blocks("LightGCN", &data, &lightgcn::LightGcn::new(&gpu, &data, cfg).unwrap());
    }

    #[test]
    fn mf_learns_planted_communities_and_beats_popularity() {
        let gpu = Gpu::shared().unwrap();
        let raw = synthetic_blocks(80, 40, 2, 10, 6);
        let data = prepare(&raw, &PrepareOptions { kcore: 0, ..Default::default() }).unwrap();
        let cfg = mf::MfConfig { d: 16, epochs: 60, batch_size: 256, lr: 1e-2, ..Default::default() };
        let model = mf::new(&gpu, &data, &cfg).unwrap();
        assert_eq!(model.cfg.layers, 0);
        assert_learns_blocks("MF", &data, &model);

        // Export round trip.
        let dir = crate::io::TestDir::new("mf-export");
        let path = dir.path().join("emb.safetensors");
        let (u, i) = model.embeddings().unwrap();
        save_embeddings(&path, "mf", &data.name, 16, &i, Some(&u)).unwrap();
        let f = crate::io::safetensors::SafeTensorsFile::open(&path).unwrap();
        assert_eq!(f.get("item_emb").unwrap().shape, vec![data.n_items(), 16]);
        assert_eq!(f.get("user_emb").unwrap().data, u);
        assert!(save_embeddings(&path, "mf", "x", 16, &i[..15], None).is_err());
    }

    #[test]
    fn sasrec_learns_planted_sequences_and_beats_popularity() {
        let gpu = Gpu::shared().unwrap();
        // Sequences of 12 over 40 items: no item repeats inside a sequence for
        // strides 1..3, so dedup and 5-core keep everything.
        let raw = synthetic_cycles(120, 40, 12, 3);
        let data = prepare(&raw, &PrepareOptions { kcore: 0, ..Default::default() }).unwrap();
        let cfg = sasrec::SasRecConfig {
            d_model: 32,
            max_len: 12,
            epochs: 40,
            batch_size: 64,
            dropout: 0.0,
            lr: 5e-3,
            ..Default::default()
        };
        let model = sasrec::SasRec::new(&gpu, data.n_items(), cfg).unwrap();
        let losses = model.fit(&data, |_, _| Ok(true)).unwrap();
        assert!(losses.last().unwrap() < &(losses[0] * 0.5), "loss did not fall: {losses:?}");
        let cases = data.eval_cases(Split::Test);
        let protocol = Protocol { bootstrap: 0, ..Default::default() };
        let r = model.evaluate(&cases, &protocol).unwrap();
        let pop = evaluate_popularity(&data, &cases, &protocol).unwrap();
        let (m, p) = (r.metric("ndcg", 10).unwrap(), pop.metric("ndcg", 10).unwrap());
        // Random ranking of 40 items gives NDCG@10 ~ 0.1; the planted
        // structure makes the next item predictable from the last two.
        assert!(m > 0.6 && m > 2.0 * p, "SASRec NDCG@10 {m} vs popularity {p}");
    }
}
