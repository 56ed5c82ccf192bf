use super::*;

fn case(user: u32, seen: &[u32], targets: &[u32]) -> EvalCase {
    EvalCase { user, history: seen.to_vec(), seen: seen.to_vec(), targets: targets.to_vec() }
}

fn close(a: f64, b: f64) {
    assert!((a - b).abs() < 1e-12, "{a} vs {b}");
}

#[test]
fn hand_computed_single_target() {
    // Target at rank 2 (0-based position 1).
    let (r, n) = user_metrics(&[3, 1, 2], &[1], &[1, 2, 3]);
    assert_eq!(r, vec![0.0, 1.0, 1.0]);
    close(n[0], 0.0);
    close(n[1], 1.0 / 3f64.log2());
    close(n[2], 1.0 / 3f64.log2());
    // Miss entirely; and a hit at rank 1.
    assert_eq!(user_metrics(&[4, 5], &[1], &[5]), (vec![0.0], vec![0.0]));
    assert_eq!(user_metrics(&[1, 5], &[1], &[5]), (vec![1.0], vec![1.0]));
}

#[test]
fn hand_computed_multi_target() {
    // T = {1, 2}; ranked 1 (hit), 5, 2 (hit).
    let (r, n) = user_metrics(&[1, 5, 2], &[1, 2], &[1, 2, 3]);
    assert_eq!(r, vec![0.5, 0.5, 1.0]);
    close(n[0], 1.0); // IDCG@1 = 1
    close(n[1], 1.0 / (1.0 + 1.0 / 3f64.log2()));
    close(n[2], (1.0 + 0.5) / (1.0 + 1.0 / 3f64.log2()));
    // |T| = 3 > K = 2: IDCG uses min(|T|, K) = 2 ideal hits; Recall divides by |T|.
    let (r, n) = user_metrics(&[7, 8], &[7, 8, 9], &[2]);
    close(r[0], 2.0 / 3.0);
    close(n[0], 1.0);
}

#[test]
fn top_k_breaks_ties_by_lower_id_and_rejects_nan() {
    assert_eq!(top_k(&[1.0, 2.0, 2.0, 0.0, 2.0], 3, |_| true).unwrap(), vec![1, 2, 4]);
    assert_eq!(top_k(&[1.0, 2.0, 2.0, 0.0], 10, |_| true).unwrap(), vec![1, 2, 0, 3]);
    assert_eq!(top_k(&[1.0, 2.0, 2.0, 0.0], 2, |i| i != 1).unwrap(), vec![2, 0]);
    assert_eq!(top_k(&[f32::NEG_INFINITY, f32::INFINITY], 2, |_| true).unwrap(), vec![1, 0]);
    let e = top_k(&[1.0, f32::NAN], 1, |_| true).unwrap_err();
    assert!(e.to_string().contains("NaN"), "{e}");
}

#[test]
fn scores_with_and_without_history_masking() {
    let scores = [0.9f32, 0.8, 0.7, 0.1];
    let c = case(0, &[0], &[1]);
    let p = Protocol { ks: vec![1, 2], bootstrap: 0, ..Default::default() };
    let r = evaluate_scores(&scores, 4, std::slice::from_ref(&c), &p, None).unwrap();
    let all = r.subset(Subset::All).unwrap();
    close(all.get("Recall@1").unwrap().mean, 0.0);
    close(all.get("NDCG@2").unwrap().mean, 1.0 / 3f64.log2());
    let p = Protocol { exclude_history: true, ..p };
    let r = evaluate_scores(&scores, 4, &[c], &p, None).unwrap();
    close(r.subset(Subset::All).unwrap().get("Recall@1").unwrap().mean, 1.0);
    close(r.subset(Subset::All).unwrap().get("NDCG@1").unwrap().mean, 1.0);
}

#[test]
fn warm_and_cold_subsets() {
    // Items 0,1 warm; 2,3 cold. Target {1, 3}.
    let warm = vec![true, true, false, false];
    let scores = [0.1f32, 0.5, 0.9, 0.8];
    let p = Protocol { ks: vec![1], bootstrap: 0, ..Default::default() };
    let r = evaluate_scores(&scores, 4, &[case(0, &[], &[1, 3])], &p, Some(warm.clone())).unwrap();
    // all: top-1 = item 2, miss.
    close(r.subset(Subset::All).unwrap().get("Recall@1").unwrap().mean, 0.0);
    // warm: candidates {0,1}, top-1 = 1, GT {1}.
    close(r.subset(Subset::Warm).unwrap().get("Recall@1").unwrap().mean, 1.0);
    // cold: candidates {2,3}, top-1 = 2, GT {3}.
    close(r.subset(Subset::Cold).unwrap().get("Recall@1").unwrap().mean, 0.0);
    // A user with only warm targets is absent from the cold subset.
    let r = evaluate_scores(&scores, 4, &[case(0, &[], &[1])], &p, Some(warm.clone())).unwrap();
    assert!(r.subset(Subset::Cold).is_none());
    assert_eq!(r.subset(Subset::Warm).unwrap().users, 1);
    // Rankings: filtered to the subset.
    let r = evaluate_rankings(&[vec![2, 3, 1]], 4, &[case(0, &[], &[3])], &p, Some(warm)).unwrap();
    close(r.subset(Subset::All).unwrap().get("Recall@1").unwrap().mean, 0.0);
    close(r.subset(Subset::Cold).unwrap().get("Recall@1").unwrap().mean, 0.0);
    let p2 = Protocol { ks: vec![2], ..p };
    let r = evaluate_rankings(&[vec![2, 3, 1]], 4, &[case(0, &[], &[3])], &p2, Some(vec![true, true, false, false]))
        .unwrap();
    close(r.subset(Subset::Cold).unwrap().get("NDCG@2").unwrap().mean, 1.0 / 3f64.log2());
}

#[test]
fn rankings_dedup_mask_and_errors() {
    let p = Protocol { ks: vec![2], bootstrap: 0, ..Default::default() };
    // Repeated 5 keeps its first position, so the target 1 is at rank 2.
    let r = evaluate_rankings(&[vec![5, 5, 1]], 6, &[case(0, &[], &[1])], &p, None).unwrap();
    close(r.subset(Subset::All).unwrap().get("Recall@2").unwrap().mean, 1.0);
    // History masking drops seen items from a ranking too.
    let p3 = Protocol { ks: vec![1], exclude_history: true, ..p.clone() };
    let r = evaluate_rankings(&[vec![5, 1]], 6, &[case(0, &[5], &[1])], &p3, None).unwrap();
    close(r.subset(Subset::All).unwrap().get("Recall@1").unwrap().mean, 1.0);
    // Errors, not panics.
    let e = evaluate_rankings(&[vec![9]], 6, &[case(3, &[], &[1])], &p, None).unwrap_err();
    assert!(e.to_string().contains("item 9") && e.to_string().contains("user 3"), "{e}");
    assert!(evaluate_rankings(&[vec![1]], 6, &[case(0, &[], &[])], &p, None).is_err());
    assert!(evaluate_rankings(&[vec![1]], 6, &[case(0, &[], &[6])], &p, None).is_err());
    assert!(evaluate_rankings(&[], 6, &[case(0, &[], &[1])], &p, None).is_err());
    assert!(evaluate_scores(&[0.0; 5], 6, &[case(0, &[], &[1])], &p, None).is_err());
    assert!(evaluate_scores(&[0.0, f32::NAN], 2, &[case(0, &[], &[1])], &p, None).is_err());
    assert!(Evaluator::new(&Protocol { ks: vec![], ..p.clone() }, 3, None).is_err());
    assert!(Evaluator::new(&p, 3, Some(vec![true])).is_err());
}

#[test]
fn bootstrap_is_seeded_and_brackets_the_mean() {
    let rows: Vec<Vec<f64>> =
        (0..200).map(|i| vec![(i % 7) as f64 / 7.0, if i % 3 == 0 { 1.0 } else { 0.0 }]).collect();
    let (lo, hi) = bootstrap_ci(&rows, 500, 11);
    let (lo2, hi2) = bootstrap_ci(&rows, 500, 11);
    assert_eq!((lo.clone(), hi.clone()), (lo2, hi2));
    let (lo3, _) = bootstrap_ci(&rows, 500, 12);
    assert_ne!(lo, lo3);
    for j in 0..2 {
        let mean = rows.iter().map(|r| r[j]).sum::<f64>() / 200.0;
        assert!(lo[j] < mean && mean < hi[j], "{} {mean} {}", lo[j], hi[j]);
        // Standard error of a mean of 200 values in [0,1] is < 0.036: a 95% CI is narrower than 0.15.
        assert!(hi[j] - lo[j] < 0.15 && hi[j] - lo[j] > 0.01);
    }
    let (lo0, hi0) = bootstrap_ci(&rows, 0, 1);
    assert_eq!(lo0, hi0);
}

#[test]
fn report_table_and_json() {
    let p = Protocol::default();
    let cases: Vec<EvalCase> = (0..30).map(|u| case(u, &[], &[u % 25])).collect();
    let lists: Vec<Vec<u32>> = (0..30).map(|u| (0..25).map(|i| (i + u) % 25).collect()).collect();
    let r = evaluate_rankings(&lists, 25, &cases, &p, None).unwrap();
    let s = r.to_string();
    assert!(s.contains("Recall@20") && s.contains("NDCG@5") && s.contains("all"), "{s}");
    let back: EvalReport = serde_json::from_str(&r.to_json()).unwrap();
    assert_eq!(back, r);
    // Every target is at rank 1 (list starts at u % 25 == target).
    close(r.subset(Subset::All).unwrap().get("NDCG@5").unwrap().mean, 1.0);
}

/// Compares with tools/metrics_crosscheck.py (RecBole 1.2.1 formulas) on the
/// committed fixture made by `examples/metrics_fixture.rs`.
#[test]
fn matches_recbole_formulas_on_fixture() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/metrics_crosscheck.json");
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let n_items = doc["n_items"].as_u64().unwrap() as usize;
    let ks: Vec<usize> = doc["ks"].as_array().unwrap().iter().map(|k| k.as_u64().unwrap() as usize).collect();
    let cases: Vec<EvalCase> = serde_json::from_value(doc["cases"].clone()).unwrap();
    let scores: Vec<f32> = doc["scores"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32))
        .collect();
    assert!(cases.iter().any(|c| c.targets.len() > 1));
    for ex in [false, true] {
        let p = Protocol { ks: ks.clone(), exclude_history: ex, bootstrap: 0, seed: 0 };
        let r = evaluate_scores(&scores, n_items, &cases, &p, None).unwrap();
        let exp = &doc["expected"][format!("exclude_history={ex}")];
        let all = r.subset(Subset::All).unwrap();
        assert_eq!(all.users, cases.len());
        for m in &all.metrics {
            let want = exp[&m.name].as_f64().unwrap_or_else(|| panic!("fixture lacks {}", m.name));
            assert!((m.mean - want).abs() < 1e-6, "{} (exclude_history={ex}): {} vs RecBole {want}", m.name, m.mean);
        }
    }
}
