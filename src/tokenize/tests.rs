//! Tokenizer tests: parity with LETTER's published training step (fixture from
//! `tools/letter_rqvae_parity.py`), training on synthetic clusters,
//! determinism, bad input.

use super::*;
use crate::gpu::Gpu;
use crate::io::safetensors::SafeTensorsFile;

fn fixture(name: &str) -> SafeTensorsFile {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/letter_rqvae").join(name);
    SafeTensorsFile::open(&p).unwrap_or_else(|e| panic!("committed fixture {}: {e:#}", p.display()))
}

fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}[{i}]: got {g}, want {w} (tol {tol})");
    }
}

/// The authors' straight-through residual chain (`step.safetensors`).
#[test]
fn letter_one_step_matches_pytorch_reference() {
    one_step_parity("step.safetensors", true);
}

/// The pure-math variant (`st_chain = false`, `step_pure.safetensors`): residuals
/// keep their gradient, x_q = z + sg(sum e - z).
#[test]
fn pure_math_one_step_matches_pytorch_reference() {
    one_step_parity("step_pure.safetensors", false);
}

fn one_step_parity(file: &str, st_chain: bool) {
    let gpu = Gpu::shared().unwrap();
    let f = fixture(file);
    let cfg = RqVaeConfig {
        in_dim: 24,
        hidden: vec![16, 8],
        e_dim: 4,
        levels: 3,
        codebook_size: 8,
        mu: 0.25,
        st_chain,
        seed: 0,
    };
    let model = RqVae::new(&gpu, cfg).unwrap();
    model.load_params(&|name| f.get(&format!("init.{name}")).ok().map(|t| (t.shape.clone(), t.data.clone()))).unwrap();
    let x = f.get("x").unwrap();
    let h = f.get("cf").unwrap();
    let labels: Vec<Vec<u32>> =
        f.get("labels").unwrap().data.chunks(8).map(|r| r.iter().map(|&v| v as u32).collect()).collect();
    let pos: Vec<Vec<u32>> =
        f.get("positives").unwrap().data.chunks(12).map(|r| r.iter().map(|&v| v as u32).collect()).collect();
    let xt = Tensor::from_f32(&gpu, &x.data, &x.shape).unwrap();
    let ht = Tensor::from_f32(&gpu, &h.data, &h.shape).unwrap();
    let opts = StepOptions { alpha: 0.1, beta: 0.1, sinkhorn: Some(SinkhornOpts::letter()) };
    let tape = Tape::new();
    let out = model
        .forward_train(&tape, &xt, Some(&ht), Some(&DiversityClusters { labels }), Positives::Given(&pos), &opts)
        .unwrap();

    // Codes [B, L] (the last level by Sinkhorn).
    let want_codes = f.get("codes").unwrap().data;
    for i in 0..12 {
        for l in 0..3 {
            assert_eq!(out.codes[l][i], want_codes[i * 3 + l] as u32, "code of row {i} level {l}");
        }
    }
    let scalar = |t: &Tensor| t.to_scalar().unwrap();
    let want = |n: &str| f.get(n).unwrap().data[0];
    let tol = 1e-4;
    close("loss_total", &[scalar(&out.total.value)], &[want("loss_total")], tol);
    close("loss_recon", &[scalar(&out.recon)], &[want("loss_recon")], tol);
    close("loss_quant", &[scalar(&out.quant)], &[want("loss_quant")], tol);
    close("loss_cf", &[scalar(out.cf.as_ref().unwrap())], &[want("loss_cf")], tol);
    for l in 0..3 {
        close(&format!("loss_cb.{l}"), &[scalar(&out.cb[l])], &[want(&format!("loss_cb.{l}"))], tol);
        close(&format!("loss_cm.{l}"), &[scalar(&out.cm[l])], &[want(&format!("loss_cm.{l}"))], tol);
        close(&format!("loss_div.{l}"), &[scalar(&out.div[l])], &[want(&format!("loss_div.{l}"))], tol);
    }
    close("xq", &out.xq.to_vec_f32().unwrap(), &f.get("xq").unwrap().data, tol);

    tape.backward(&out.total).unwrap();
    for p in model.params() {
        let g = p.grad().unwrap_or_else(|| panic!("{} got no gradient", p.name)).to_vec_f32().unwrap();
        close(&format!("grad.{}", p.name), &g, &f.get(&format!("grad.{}", p.name)).unwrap().data, tol);
    }
    let mut opt =
        AdamW::new(model.params(), AdamWHp { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-4 }, None)
            .unwrap();
    opt.step().unwrap();
    for p in model.params() {
        close(
            &format!("new.{}", p.name),
            &p.value.to_vec_f32().unwrap(),
            &f.get(&format!("new.{}", p.name)).unwrap().data,
            tol,
        );
    }
}

/// `m` items in `dim` dimensions around `k` well-separated Gaussian centres.
fn clusters(m: usize, dim: usize, k: usize, seed: u64) -> Vec<f32> {
    let centres = crate::nn::normal_init(seed, k * dim, 1.0);
    let noise = crate::nn::normal_init(seed + 1, m * dim, 0.15);
    (0..m * dim).map(|j| centres[(j / dim % k) * dim + j % dim] + noise[j]).collect()
}

fn small_cfg(method: Method) -> TokenizerConfig {
    TokenizerConfig {
        hidden: Some(vec![16]),
        e_dim: 4,
        levels: 2,
        codebook_size: 16,
        epochs: 12,
        batch_size: 32,
        lr: 3e-3,
        eval_every: 4,
        div_n_init: 2,
        init_n_init: 2,
        progress: false,
        ..TokenizerConfig::for_method(method)
    }
}

#[test]
fn rqvae_trains_on_gaussian_clusters_and_ids_are_unique_and_deterministic() {
    let gpu = Gpu::shared().unwrap();
    let (m, dim) = (160, 12);
    let sem = clusters(m, dim, 8, 5);
    let cfg = small_cfg(Method::RqVae);
    let (ids, rep) = train_tokenizer(&gpu, &sem, m, None, &cfg).unwrap();
    assert_eq!(rep.epochs.len(), 12);
    let (first, last) = (rep.epochs[0].recon, rep.epochs.last().unwrap().recon);
    assert!(last < 0.8 * first, "reconstruction loss should drop: {first} -> {last}");
    assert_eq!(ids.n_items(), m);
    assert!(ids.is_unique());
    ids.validate("trained").unwrap();
    // 8 clusters x 20 items: level 0 should use most of its 16 codes.
    assert!(rep.per_level[0].used >= 8, "level-0 utilization too low: {:?}", rep.per_level);
    assert_eq!(rep.first_level_histogram.iter().sum::<usize>(), m);
    assert!(rep.best_collision_rate <= rep.epochs.iter().filter_map(|e| e.collision_rate).fold(1.0, f64::min) + 1e-12);
    // Same seed, same identifiers; the saved model gives the same argmin codes.
    let (model, ids2, _) = train_tokenizer_model(&gpu, &sem, m, None, &cfg).unwrap();
    assert_eq!(ids, ids2);
    let dir = crate::io::TestDir::new("tok_model");
    let p = dir.path().join("model.safetensors");
    model.save(&p).unwrap();
    let back = RqVae::load(&gpu, &p).unwrap();
    assert_eq!(back.cfg, model.cfg);
    let x = Tensor::from_f32(&gpu, &sem, &[m, dim]).unwrap();
    assert_eq!(back.codes(&x).unwrap().0, model.codes(&x).unwrap().0);
}

#[test]
fn letter_trains_with_cf_and_diversity() {
    let gpu = Gpu::shared().unwrap();
    let (m, dim) = (128, 12);
    let sem = clusters(m, dim, 8, 9);
    let cf = crate::nn::normal_init(3, m * 4, 1.0);
    let mut cfg = small_cfg(Method::Letter);
    cfg.epochs = 4;
    cfg.eval_every = 2;
    cfg.alpha = 0.1;
    cfg.beta = 0.01;
    let (ids, rep) = train_tokenizer(&gpu, &sem, m, Some(&cf), &cfg).unwrap();
    assert!(ids.is_unique());
    assert!(rep.epochs.iter().all(|e| e.cf > 0.0 && e.total.is_finite()), "{:?}", rep.epochs);
    let s = rep.code_similarity.unwrap();
    assert!((0.0..=1.0).contains(&s), "{s}");
    assert!(rep.ids.collision_rate_sinkhorn <= rep.ids.collision_rate_argmin);
}

#[test]
fn bad_inputs_give_clear_errors() {
    let gpu = Gpu::shared().unwrap();
    let cfg = small_cfg(Method::RqVae);
    let mut sem = clusters(40, 6, 4, 1);
    // Fewer items than codes.
    let e = train_tokenizer(&gpu, &sem[..10 * 6], 10, None, &cfg).unwrap_err().to_string();
    assert!(e.contains("10 items") && e.contains("16 codes"), "{e}");
    // Rows do not divide.
    let e = train_tokenizer(&gpu, &sem[..41], 40, None, &cfg).unwrap_err().to_string();
    assert!(e.contains("not a [40, D]"), "{e}");
    // LETTER without CF, and with CF of the wrong width.
    let lc = small_cfg(Method::Letter);
    let e = train_tokenizer(&gpu, &sem, 40, None, &lc).unwrap_err().to_string();
    assert!(e.contains("needs CF embeddings"), "{e}");
    let e = train_tokenizer(&gpu, &sem, 40, Some(&vec![0.5; 40 * 3]), &lc).unwrap_err().to_string();
    assert!(e.contains("3-d") && e.contains("4-d"), "{e}");
    // NaN / inf.
    sem[7] = f32::NAN;
    sem[8] = f32::INFINITY;
    let e = train_tokenizer(&gpu, &sem, 40, None, &cfg).unwrap_err().to_string();
    assert!(e.contains("semantic embeddings") && e.contains("2 non-finite"), "{e}");
}

#[test]
fn diversity_bounds_and_positives() {
    assert_eq!(diversity_bounds(256, 10), (10, 10, 60));
    let (k, lo, hi) = diversity_bounds(8, 10);
    assert_eq!(k, 4);
    assert!(lo >= 2 && k * lo <= 8 && k * hi >= 8);
    let labels = vec![0, 1, 0, 2, 1, 2, 0];
    let codes = vec![0, 2, 6, 1, 4, 3, 5, 0];
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..200 {
        let p = rqvae::sample_positives(&labels, &codes, &mut rng).unwrap();
        for (&c, &q) in codes.iter().zip(&p) {
            assert_ne!(c, q);
            assert_eq!(labels[c as usize], labels[q as usize]);
        }
        seen.insert(p[0]);
    }
    // Code 0's cluster {0, 2, 6}: both other members get drawn.
    assert_eq!(seen, [2u32, 6].into_iter().collect());
    let e = rqvae::sample_positives(&[0, 1, 1], &[0], &mut rng).unwrap_err().to_string();
    assert!(e.contains("no other member"), "{e}");
}

#[test]
fn default_hidden_sizes() {
    assert_eq!(RqVaeConfig::default_hidden(4096, 32), vec![2048, 1024, 512, 256, 128, 64]);
    assert_eq!(RqVaeConfig::default_hidden(384, 32), vec![256, 128, 64]);
    assert_eq!(RqVaeConfig::default_hidden(32, 32), Vec::<usize>::new());
}
