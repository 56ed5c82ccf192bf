//! Writes a random score matrix with targets and seen items to a JSON file for
//! `tools/metrics_crosscheck.py`, which appends RecBole-formula metrics.
//!
//! cargo run --example metrics_fixture -- tests/fixtures/metrics_crosscheck.json
//! python3 tools/metrics_crosscheck.py tests/fixtures/metrics_crosscheck.json

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

fn main() -> anyhow::Result<()> {
    let out = std::env::args().nth(1).unwrap_or_else(|| "metrics_crosscheck.json".into());
    let (n_users, n_items) = (40usize, 60usize);
    let mut rng = StdRng::seed_from_u64(7);
    let mut cases = Vec::new();
    let mut scores = Vec::new();
    for u in 0..n_users {
        // Every fifth user gets coarse scores, so that ties occur.
        let coarse = u % 5 == 0;
        let row: Vec<f32> = (0..n_items)
            .map(|_| {
                let x: f32 = rng.gen_range(-1.0..1.0);
                if coarse {
                    (x * 4.0).round() / 4.0
                } else {
                    x
                }
            })
            .collect();
        let mut items: Vec<u32> = (0..n_items as u32).collect();
        for i in (1..items.len()).rev() {
            items.swap(i, rng.gen_range(0..=i));
        }
        let n_t = 1 + (u % 4) * (u % 3); // 1..7 targets
        let n_s = rng.gen_range(0..12);
        let targets: Vec<u32> = items[..n_t].to_vec();
        let mut seen: Vec<u32> = items[n_t..n_t + n_s].to_vec();
        seen.sort_unstable();
        cases.push(json!({"user": u, "history": [], "seen": seen, "targets": targets}));
        scores.push(row);
    }
    let doc = json!({
        "about": "random score matrix for the metrics cross-check; 'expected' is written by tools/metrics_crosscheck.py",
        "n_items": n_items,
        "ks": [5, 10, 20],
        "cases": cases,
        "scores": scores,
    });
    std::fs::write(&out, serde_json::to_string(&doc)?)?;
    println!("wrote {out}");
    Ok(())
}
