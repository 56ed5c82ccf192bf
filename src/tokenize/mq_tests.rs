//! MQ-tokenizer tests: the mask op against its CPU reference and finite
//! differences, one forward/backward against an f64 CPU reference of the
//! straight-through losses (both variants), the mask being fresh and never
//! written into the batch, training on clustered data, determinism, bad input.

#![allow(clippy::needless_range_loop)]

use super::*;
use crate::autograd::check::check_gradients;
use crate::gpu::Gpu;
use crate::ops::testing::rand_vec;

#[test]
fn mask_input_matches_cpu_reference_at_awkward_sizes() {
    let gpu = Gpu::shared().unwrap();
    for (k, &n) in [1usize, 7, 33, 257, 1000].iter().enumerate() {
        for &ratio in &[0.0f32, 0.2, 0.5, 1.0] {
            let x = rand_vec(20 + k as u64, n, 2.0);
            let xt = Tensor::from_f32(&gpu, &x, &[n]).unwrap();
            let (seed, offset) = (99 + k as u32, 13 * k as u32);
            let got = mask_input(&xt, ratio, seed, offset).unwrap().to_vec_f32().unwrap();
            assert_eq!(got, mask_input_ref(&x, ratio, seed, offset), "n={n} ratio={ratio}");
            // The input buffer is untouched.
            assert_eq!(xt.to_vec_f32().unwrap(), x);
        }
    }
}

#[test]
fn mask_zeroes_about_ratio_per_element_without_rescaling() {
    let gpu = Gpu::shared().unwrap();
    let (b, d) = (400, 50);
    let x: Vec<f32> = rand_vec(1, b * d, 1.0).iter().map(|v| v + 2.0).collect(); // no zeros
    let xt = Tensor::from_f32(&gpu, &x, &[b, d]).unwrap();
    let y = mask_input(&xt, 0.2, 7, 0).unwrap().to_vec_f32().unwrap();
    let masked = y.iter().filter(|&&v| v == 0.0).count() as f64 / (b * d) as f64;
    // Binomial std sqrt(0.16 / 20000) = 0.0028; allow 4 sigma.
    assert!((masked - 0.2).abs() < 0.012, "masked fraction {masked}");
    assert!(y.iter().zip(&x).all(|(&v, &u)| v == 0.0 || v == u), "kept values must be unscaled");
    // Element-wise per row: rows do not share one mask (the authors' code does).
    let pattern = |r: usize| -> Vec<bool> { (0..d).map(|j| y[r * d + j] == 0.0).collect() };
    let distinct: std::collections::HashSet<Vec<bool>> = (0..b).map(pattern).collect();
    assert!(distinct.len() > b / 2, "only {} distinct row masks", distinct.len());
    // Different seeds give different masks.
    let z = mask_input(&xt, 0.2, 8, 0).unwrap().to_vec_f32().unwrap();
    assert_ne!(y, z);
    let e = mask_input(&xt, 1.5, 0, 0).unwrap_err().to_string();
    assert!(e.contains("mq::mask_input") && e.contains("[0, 1]"), "{e}");
}

#[test]
fn masked_backward_matches_finite_differences() {
    let gpu = Gpu::shared().unwrap();
    let x = rand_vec(3, 7 * 5, 1.0);
    check_gradients(&gpu, &[(x, vec![7, 5])], |_, v| masked(&v[0], 0.3, 11), 1e-2, 1e-3, 1e-4).unwrap();
}

#[test]
fn step_mask_seeds_are_distinct() {
    let s: std::collections::HashSet<u32> = (0..10_000).map(|t| step_mask_seed(42, t)).collect();
    assert_eq!(s.len(), 10_000);
    assert_ne!(step_mask_seed(1, 0), step_mask_seed(2, 0));
}

// ---- f64 CPU reference of one forward/backward ----

struct RefLayer {
    w: Vec<f64>, // [out, in]
    b: Vec<f64>,
    din: usize,
    dout: usize,
}

fn ref_mlp(snap: &super::super::rqvae::ParamValues, prefix: &str, dims: &[usize]) -> Vec<RefLayer> {
    let get = |n: &str| -> Vec<f64> {
        snap.iter().find(|s| s.0 == n).unwrap_or_else(|| panic!("no {n}")).2.iter().map(|&v| v as f64).collect()
    };
    (0..dims.len() - 1)
        .map(|i| RefLayer {
            w: get(&format!("{prefix}.{i}.weight")),
            b: get(&format!("{prefix}.{i}.bias")),
            din: dims[i],
            dout: dims[i + 1],
        })
        .collect()
}

/// Forward: returns the activations (input first, output last).
fn ref_forward(layers: &[RefLayer], x: &[f64], b: usize) -> Vec<Vec<f64>> {
    let mut acts = vec![x.to_vec()];
    for (li, l) in layers.iter().enumerate() {
        let h = acts.last().unwrap();
        let mut y = vec![0.0; b * l.dout];
        for r in 0..b {
            for o in 0..l.dout {
                let mut s = l.b[o];
                for i in 0..l.din {
                    s += h[r * l.din + i] * l.w[o * l.din + i];
                }
                y[r * l.dout + o] = if li + 1 < layers.len() { s.max(0.0) } else { s };
            }
        }
        acts.push(y);
    }
    acts
}

/// Backward: (dW, db) per layer.
fn ref_backward(layers: &[RefLayer], acts: &[Vec<f64>], gout: &[f64], b: usize) -> Vec<(Vec<f64>, Vec<f64>)> {
    let mut g = gout.to_vec();
    let mut out = Vec::new();
    for li in (0..layers.len()).rev() {
        let l = &layers[li];
        if li + 1 < layers.len() {
            for (gv, &a) in g.iter_mut().zip(&acts[li + 1]) {
                if a <= 0.0 {
                    *gv = 0.0;
                }
            }
        }
        let h = &acts[li];
        let mut dw = vec![0.0; l.dout * l.din];
        let mut db = vec![0.0; l.dout];
        let mut gin = vec![0.0; b * l.din];
        for r in 0..b {
            for o in 0..l.dout {
                let go = g[r * l.dout + o];
                db[o] += go;
                for i in 0..l.din {
                    dw[o * l.din + i] += go * h[r * l.din + i];
                    gin[r * l.din + i] += go * l.w[o * l.din + i];
                }
            }
        }
        out.push((dw, db));
        g = gin;
    }
    out.reverse();
    out
}

fn argmin_rows(a: &[f64], book: &[f64], dc: usize) -> Vec<usize> {
    a.chunks(dc)
        .map(|row| {
            let mut best = (f64::INFINITY, 0);
            for (c, e) in book.chunks(dc).enumerate() {
                let d: f64 = row.iter().zip(e).map(|(u, v)| (u - v) * (u - v)).sum();
                if d < best.0 {
                    best = (d, c);
                }
            }
            best.1
        })
        .collect()
}

fn assert_rel(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-6);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g as f64 - w).abs() <= tol * scale, "{what}[{i}]: got {g}, want {w} (scale {scale})");
    }
}

fn tiny_model_cfg(variant: MqVariant) -> MqModelConfig {
    MqModelConfig {
        in_dim: 5,
        code_dim: 4,
        books: 3,
        codebook_size: 6,
        enc_hidden: vec![7],
        dec_hidden: vec![6],
        variant,
        beta: 0.25,
        seed: 3,
        // The f64 reference below has plain Linear + ReLU MLPs.
        batch_norm: false,
        enc_dropout: 0.0,
        dec_dropout: 0.0,
    }
}

fn forward_backward_vs_reference(variant: MqVariant) {
    let gpu = Gpu::shared().unwrap();
    let cfg = tiny_model_cfg(variant);
    let model = MqTokenizer::new(&gpu, cfg.clone()).unwrap();
    let (b, d, dc, l, kk) = (9, 5, 4, 6, 3);
    let x = rand_vec(5, b * d, 1.5);
    // Codebooks from k-means of the (unmasked) latents so several codes get used.
    model.kmeans_init(&x, KmeansOpts { max_iter: 5, tol: 1e-4, seed: 1 }).unwrap();
    let xt = Tensor::from_f32(&gpu, &x, &[b, d]).unwrap();
    let (ratio, seed) = (0.2, 1234);
    let tape = Tape::new();
    let out = model.forward(&tape, &xt, Some((ratio, seed))).unwrap();
    tape.backward(&out.total).unwrap();

    // CPU reference.
    let snap = model.snapshot().unwrap();
    let xm: Vec<f64> = mask_input_ref(&x, ratio, seed, 0).iter().map(|&v| v as f64).collect();
    assert_eq!(out.input.to_vec_f32().unwrap(), mask_input_ref(&x, ratio, seed, 0));
    let xs: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let books: Vec<Vec<f64>> = (0..kk)
        .map(|k| snap.iter().find(|s| s.0 == format!("codebook.{k}")).unwrap().2.iter().map(|&v| v as f64).collect())
        .collect();
    let enc_dims = [d, 7, dc];
    let dec_dims = [dc, 6, d];
    let n_enc = if variant == MqVariant::Parallel { kk } else { 1 };
    let encs: Vec<Vec<RefLayer>> = (0..n_enc).map(|k| ref_mlp(&snap, &format!("encoder.{k}"), &enc_dims)).collect();
    let dec = ref_mlp(&snap, "decoder", &dec_dims);
    let enc_acts: Vec<Vec<Vec<f64>>> = encs.iter().map(|e| ref_forward(e, &xm, b)).collect();
    // Latents per book (a^k, or residuals r_k), codes and selected rows.
    let mut lat: Vec<Vec<f64>> = Vec::new();
    let mut codes: Vec<Vec<usize>> = Vec::new();
    let mut sel: Vec<Vec<f64>> = Vec::new();
    for k in 0..kk {
        let a = match variant {
            MqVariant::Parallel => enc_acts[k].last().unwrap().clone(),
            MqVariant::Residual if k == 0 => enc_acts[0].last().unwrap().clone(),
            MqVariant::Residual => lat[k - 1].iter().zip(&sel[k - 1]).map(|(r, e)| r - e).collect(),
        };
        let c = argmin_rows(&a, &books[k], dc);
        let e: Vec<f64> = c.iter().flat_map(|&ci| books[k][ci * dc..(ci + 1) * dc].to_vec()).collect();
        lat.push(a);
        codes.push(c);
        sel.push(e);
    }
    let pooled: Vec<f64> = (0..b * dc)
        .map(|j| {
            let s: f64 = sel.iter().map(|e| e[j]).sum();
            if variant == MqVariant::Parallel {
                s / kk as f64
            } else {
                s
            }
        })
        .collect();
    let dec_acts = ref_forward(&dec, &pooled, b);
    let r = dec_acts.last().unwrap();
    let nrec = (b * d) as f64;
    let recon: f64 = r.iter().zip(&xs).map(|(u, v)| (u - v) * (u - v)).sum::<f64>() / nrec;
    let nq = (b * dc) as f64;
    let sq: Vec<f64> =
        (0..kk).map(|k| lat[k].iter().zip(&sel[k]).map(|(u, v)| (u - v) * (u - v)).sum::<f64>() / nq).collect();
    let total = recon + sq.iter().map(|s| s * (1.0 + 0.25)).sum::<f64>();

    for k in 0..kk {
        let got = out.codes[k].to_vec_u32().unwrap();
        assert_eq!(got.iter().map(|&c| c as usize).collect::<Vec<_>>(), codes[k], "codes of book {k}");
        assert_rel(&format!("cb.{k}"), &[out.cb[k].to_scalar().unwrap()], &[sq[k]], 1e-5);
        assert_rel(&format!("cm.{k}"), &[out.cm[k].to_scalar().unwrap()], &[sq[k]], 1e-5);
    }
    assert!(codes[0].iter().collect::<std::collections::HashSet<_>>().len() >= 2, "degenerate test: one code");
    assert_rel("recon", &[out.recon.to_scalar().unwrap()], &[recon], 1e-5);
    assert_rel("total", &[out.total.value.to_scalar().unwrap()], &[total], 1e-5);

    // Gradients. Decoder: from recon.
    let gr: Vec<f64> = r.iter().zip(&xs).map(|(u, v)| 2.0 * (u - v) / nrec).collect();
    let dec_g = ref_backward(&dec, &dec_acts, &gr, b);
    // Gradient of the pooled decoder input (first layer's input gradient).
    let gp: Vec<f64> = {
        let l0 = &dec[0];
        let mut g = gr.clone();
        let mut gin = Vec::new();
        // Recompute the input gradient through the decoder.
        for li in (0..dec.len()).rev() {
            let ly = &dec[li];
            if li + 1 < dec.len() {
                for (gv, &a) in g.iter_mut().zip(&dec_acts[li + 1]) {
                    if a <= 0.0 {
                        *gv = 0.0;
                    }
                }
            }
            gin = vec![0.0; b * ly.din];
            for rr in 0..b {
                for o in 0..ly.dout {
                    for i in 0..ly.din {
                        gin[rr * ly.din + i] += g[rr * ly.dout + o] * ly.w[o * ly.din + i];
                    }
                }
            }
            g = gin.clone();
        }
        let _ = l0;
        gin
    };
    let mut book_g: Vec<Vec<f64>> = vec![vec![0.0; l * dc]; kk];
    let mut lat_g: Vec<Vec<f64>> = vec![vec![0.0; b * dc]; kk];
    for k in 0..kk {
        for j in 0..b * dc {
            let diff = lat[k][j] - sel[k][j];
            // cb: d/d e = -2 diff / nq (to the selected row); cm: d/d a = beta 2 diff / nq.
            book_g[k][codes[k][j / dc] * dc + j % dc] += -2.0 * diff / nq;
            lat_g[k][j] += 0.25 * 2.0 * diff / nq;
        }
    }
    let enc_out_g: Vec<Vec<f64>> = match variant {
        MqVariant::Parallel => {
            (0..kk).map(|k| (0..b * dc).map(|j| lat_g[k][j] + gp[j] / kk as f64).collect()).collect()
        }
        MqVariant::Residual => {
            // r_k = z - sum_{j<k} e_j: dz = gp + sum_k g_rk; d e_j -= sum_{k>j} g_rk.
            let mut gz = gp.clone();
            for k in 0..kk {
                for j in 0..b * dc {
                    gz[j] += lat_g[k][j];
                    for jj in 0..k {
                        book_g[jj][codes[jj][j / dc] * dc + j % dc] -= lat_g[k][j];
                    }
                }
            }
            vec![gz]
        }
    };
    let grad = |name: &str| -> Vec<f32> {
        model.params().iter().find(|p| p.name == name).unwrap().grad().expect(name).to_vec_f32().unwrap()
    };
    for (i, (dw, db)) in dec_g.iter().enumerate() {
        assert_rel(&format!("decoder.{i}.weight"), &grad(&format!("decoder.{i}.weight")), dw, 1e-4);
        assert_rel(&format!("decoder.{i}.bias"), &grad(&format!("decoder.{i}.bias")), db, 1e-4);
    }
    for (e, (enc, g)) in encs.iter().zip(&enc_out_g).enumerate() {
        let eg = ref_backward(enc, &enc_acts[e], g, b);
        for (i, (dw, db)) in eg.iter().enumerate() {
            assert_rel(&format!("encoder.{e}.{i}.weight"), &grad(&format!("encoder.{e}.{i}.weight")), dw, 1e-4);
            assert_rel(&format!("encoder.{e}.{i}.bias"), &grad(&format!("encoder.{e}.{i}.bias")), db, 1e-4);
        }
    }
    for k in 0..kk {
        assert_rel(&format!("codebook.{k}"), &grad(&format!("codebook.{k}")), &book_g[k], 1e-4);
    }
}

#[test]
fn parallel_forward_backward_matches_cpu_reference() {
    forward_backward_vs_reference(MqVariant::Parallel);
}

#[test]
fn residual_forward_backward_matches_cpu_reference() {
    forward_backward_vs_reference(MqVariant::Residual);
}

#[test]
fn training_step_leaves_the_batch_unchanged_and_masks_afresh() {
    let gpu = Gpu::shared().unwrap();
    let model = MqTokenizer::new(&gpu, tiny_model_cfg(MqVariant::Parallel)).unwrap();
    let (b, d) = (64, 5);
    let x: Vec<f32> = rand_vec(9, b * d, 1.0).iter().map(|v| v + 3.0).collect(); // no zeros
    let xt = Tensor::from_f32(&gpu, &x, &[b, d]).unwrap();
    let mut opt = AdamW::new(model.params(), AdamWHp::default(), None).unwrap();
    let mut inputs = Vec::new();
    for step in 0..2 {
        let tape = Tape::new();
        let out = model.forward(&tape, &xt, Some((0.2, step_mask_seed(42, step)))).unwrap();
        tape.backward(&out.total).unwrap();
        opt.step().unwrap();
        // The batch buffer still holds x exactly, row 0 included.
        assert_eq!(xt.to_vec_f32().unwrap(), x, "step {step} modified the batch");
        let xin = out.input.to_vec_f32().unwrap();
        assert!(xin.iter().zip(&x).all(|(&m, &u)| m == 0.0 || m == u));
        let zeros = xin.iter().filter(|&&v| v == 0.0).count();
        assert!(zeros > 0 && zeros < b * d / 2, "step {step}: {zeros} masked of {}", b * d);
        inputs.push(xin);
    }
    assert_ne!(inputs[0], inputs[1], "the mask must be fresh every step");
    // No mask: the encoder sees x itself.
    let out = model.forward(&Tape::no_grad(), &xt, None).unwrap();
    assert_eq!(out.input.to_vec_f32().unwrap(), x);
}

/// `n` rows in `d` dimensions around `k` well-separated Gaussian centres.
fn clusters(n: usize, d: usize, k: usize, seed: u64) -> Vec<f32> {
    let centres = crate::nn::normal_init(seed, k * d, 1.0);
    let noise = crate::nn::normal_init(seed + 1, n * d, 0.1);
    (0..n * d).map(|j| centres[(j / d % k) * d + j % d] + noise[j]).collect()
}

fn small_cfg(variant: MqVariant) -> MqTokenizerConfig {
    MqTokenizerConfig {
        code_dim: 8,
        codebook_size: 16,
        enc_hidden: vec![16],
        dec_hidden: vec![16],
        variant,
        epochs: 24,
        batch_size: 64,
        lr: 3e-3,
        kmeans_every: 8,
        kmeans_iters: 10,
        eval_every: 4,
        progress: false,
        ..MqTokenizerConfig::tokenrec(16)
    }
}

#[test]
fn trains_on_clusters_with_high_utilization_and_is_deterministic() {
    let gpu = Gpu::shared().unwrap();
    let (n, d) = (240, 8);
    let x = clusters(n, d, 12, 4);
    let cfg = small_cfg(MqVariant::Parallel);
    let (model, ids, rep) = train_mq(&gpu, &x, n, &cfg, "item").unwrap();
    assert_eq!((rep.n_train, rep.n_valid), (192, 48));
    assert_eq!(rep.base.epochs.len(), 24);
    let (first, last) = (rep.base.epochs[0].recon, rep.base.epochs.last().unwrap().recon);
    assert!(last < 0.7 * first, "reconstruction loss should drop: {first} -> {last}");
    assert!(rep.evals.len() == 6 && rep.evals.iter().all(|e| e.loss.is_finite()));
    assert_eq!(rep.kmeans_runs, 3); // before training, epochs 8 and 16
    ids.validate("mq").unwrap();
    assert_eq!(ids.n_items(), n);
    assert!(ids.codes.iter().all(|c| c.len() == 3));
    // 12 clusters x 20 rows into 16 codes per book: every book uses most codes.
    for (k, s) in rep.base.per_level.iter().enumerate() {
        assert!(s.used >= 10, "book {k} uses {} of 16 codes: {:?}", s.used, rep.base.per_level);
    }
    // Same-cluster rows share their codes far more often than other rows (the
    // code similarity of CF neighbours, which are same-cluster rows here).
    assert!(rep.base.code_similarity.unwrap() > 0.5, "{:?}", rep.base.code_similarity);
    // Same seed, same identifiers; save + load gives the same codes.
    let (_, ids2, _) = train_mq(&gpu, &x, n, &cfg, "item").unwrap();
    assert_eq!(ids, ids2);
    let dir = crate::io::TestDir::new("mq_model");
    let p = dir.path().join("m.safetensors");
    model.save(&p).unwrap();
    let back = MqTokenizer::load(&gpu, &p).unwrap();
    assert_eq!(back.cfg, model.cfg);
    assert_eq!(back.codes_host(&x, 100).unwrap(), model.codes_host(&x, 100).unwrap());
    // unique_ids: the existing disambiguation makes every identifier distinct.
    let (_, uids, urep) =
        train_mq(&gpu, &x, n, &MqTokenizerConfig { unique_ids: true, epochs: 4, ..cfg }, "item").unwrap();
    assert!(uids.is_unique());
    assert_eq!(urep.base.collision_rate_final, 0.0);
}

#[test]
fn residual_variant_and_both_tokenizers_train() {
    let gpu = Gpu::shared().unwrap();
    let (nu, ni, d) = (100, 160, 6);
    let users = clusters(nu, d, 6, 11);
    let items = clusters(ni, d, 10, 12);
    let mut cfg = small_cfg(MqVariant::Residual);
    cfg.epochs = 20;
    cfg.lr = 1e-2;
    let out = tokenize_users_items(&gpu, &users, nu, &items, ni, &cfg, &cfg).unwrap();
    assert_eq!(out.users.n_items(), nu);
    assert_eq!(out.items.n_items(), ni);
    assert_eq!(out.user_report.base.method, "mq-users");
    let r = &out.item_report.base;
    assert!(r.epochs.last().unwrap().recon < 0.7 * r.epochs[0].recon, "{:?}", r.epochs);
    assert_eq!(out.item_model.encoders.len(), 1);
}

#[test]
fn bad_inputs_give_clear_errors() {
    let gpu = Gpu::shared().unwrap();
    let cfg = small_cfg(MqVariant::Parallel);
    let mut x = clusters(40, 6, 4, 1);
    // Fewer training rows than codes: 40 rows, 32 for training, 16 codes is fine;
    // 15 rows (12 for training) is not.
    let e = train_mq(&gpu, &x[..15 * 6], 15, &cfg, "user").unwrap_err().to_string();
    assert!(e.contains("12 user rows") && e.contains("16 codes"), "{e}");
    // Ragged.
    let e = train_mq(&gpu, &x[..41], 40, &cfg, "item").unwrap_err().to_string();
    assert!(e.contains("not a [40, d] matrix"), "{e}");
    // Width mismatch between users and items, and at tokenization time.
    let e = tokenize_users_items(&gpu, &x, 40, &vec![0.5; 40 * 5], 40, &cfg, &cfg).unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("5-d but 6-d") && e.contains("same width"), "{e}");
    let model = MqTokenizer::new(&gpu, tiny_model_cfg(MqVariant::Parallel)).unwrap();
    let e = model.codes_host(&[0.0; 12], 8).unwrap_err().to_string();
    assert!(e.contains("input width 5"), "{e}");
    let wrong = Tensor::from_f32(&gpu, &[0.0; 12], &[2, 6]).unwrap();
    let e = model.codes(&wrong).unwrap_err().to_string();
    assert!(e.contains("[B, 5]") && e.contains("[2, 6]"), "{e}");
    // Bad settings.
    let e = train_mq(&gpu, &x, 40, &MqTokenizerConfig { mask_ratio: 1.5, ..cfg.clone() }, "item").unwrap_err();
    assert!(e.to_string().contains("mask ratio 1.5"), "{e}");
    // NaN / inf.
    x[7] = f32::NAN;
    x[9] = f32::INFINITY;
    let e = train_mq(&gpu, &x, 40, &cfg, "item").unwrap_err().to_string();
    assert!(e.contains("item embeddings") && e.contains("2 non-finite"), "{e}");
}

// ---- BatchNorm + dropout wiring ----

fn bn_model_cfg(variant: MqVariant) -> MqModelConfig {
    MqModelConfig { batch_norm: true, enc_dropout: 0.5, dec_dropout: 0.2, ..tiny_model_cfg(variant) }
}

#[test]
fn batch_norm_layers_are_wired_saved_and_used_in_eval_mode() {
    let gpu = Gpu::shared().unwrap();
    for variant in [MqVariant::Parallel, MqVariant::Residual] {
        let model = MqTokenizer::new(&gpu, bn_model_cfg(variant)).unwrap();
        // Hidden layers: Linear (no fused ReLU) -> BN -> dropout -> ReLU; the
        // last layer is a plain Linear.
        for mlp in model.encoders.iter().chain(std::iter::once(&model.decoder)) {
            let (last, hidden) = mlp.split_last().unwrap();
            assert!(last.bn.is_none() && last.dropout == 0.0 && !last.relu && last.linear.act == Act::None);
            for l in hidden {
                assert!(l.bn.is_some() && l.relu && l.linear.act == Act::None);
            }
        }
        assert_eq!(model.encoders[0][0].dropout, 0.5);
        assert_eq!(model.decoder[0].dropout, 0.2);
        let names: Vec<String> = model.state_tensors().into_iter().map(|t| t.0).collect();
        for n in ["encoder.0.0.bn.weight", "encoder.0.0.bn.running_mean", "decoder.0.bn.running_var"] {
            assert!(names.iter().any(|m| m == n), "{variant:?}: no {n} in {names:?}");
        }
        let (b, d) = (40, 5);
        let x: Vec<f32> = rand_vec(21, b * d, 0.2).iter().map(|v| v + 0.05).collect();
        model.kmeans_init(&x, KmeansOpts { max_iter: 5, tol: 1e-4, seed: 1 }).unwrap();
        let xt = Tensor::from_f32(&gpu, &x, &[b, d]).unwrap();
        let rm0 = model.encoders[0][0].bn.as_ref().unwrap().running_mean.to_vec_f32().unwrap();
        let mut opt = AdamW::new(model.params(), AdamWHp::default(), None).unwrap();
        for step in 0..3 {
            let tape = Tape::new();
            let out = model.forward(&tape, &xt, Some((0.2, step_mask_seed(7, step)))).unwrap();
            tape.backward(&out.total).unwrap();
            opt.step().unwrap();
        }
        // Training updated the running statistics ...
        let rm1 = model.encoders[0][0].bn.as_ref().unwrap().running_mean.to_vec_f32().unwrap();
        assert_ne!(rm0, rm1, "{variant:?}: running mean not updated");
        // ... evaluation uses them: deterministic, no update, and a row's codes
        // do not depend on the other rows of its chunk.
        let e1 = model.forward(&Tape::no_grad(), &xt, None).unwrap().recon_x.to_vec_f32().unwrap();
        let e2 = model.forward(&Tape::no_grad(), &xt, None).unwrap().recon_x.to_vec_f32().unwrap();
        assert_eq!(e1, e2, "{variant:?}: eval forward is not deterministic");
        assert_eq!(rm1, model.encoders[0][0].bn.as_ref().unwrap().running_mean.to_vec_f32().unwrap());
        assert_eq!(model.codes_host(&x, 1).unwrap(), model.codes_host(&x, 40).unwrap());
        // Save + load keeps the running statistics (same eval output).
        let dir = crate::io::TestDir::new("mq_bn_model");
        let p = dir.path().join("m.safetensors");
        model.save(&p).unwrap();
        let back = MqTokenizer::load(&gpu, &p).unwrap();
        let e3 = back.forward(&Tape::no_grad(), &xt, None).unwrap().recon_x.to_vec_f32().unwrap();
        assert_eq!(e1, e3, "{variant:?}: reloaded model differs");
        // A BatchNorm model file without its running statistics (e.g. written
        // before they were saved) is an error naming the missing tensor.
        let f = crate::io::safetensors::SafeTensorsFile::open(&p).unwrap();
        let mut t = std::collections::BTreeMap::new();
        for n in f.names() {
            if n != "encoder.0.1.bn.running_var" && n != "encoder.0.0.bn.running_var" {
                t.insert(n.clone(), f.get(&n).unwrap());
            }
        }
        let old = dir.path().join("old.safetensors");
        crate::io::safetensors::save(&old, &t, Some(&f.metadata()), crate::io::safetensors::StoreDtype::F32).unwrap();
        let e = format!("{:#}", MqTokenizer::load(&gpu, &old).unwrap_err());
        assert!(e.contains("encoder.0.0.bn.running_var") && e.contains("old.safetensors"), "{e}");
    }
    // A config saved before the BatchNorm fields existed reads as a model
    // without BatchNorm or dropout (what those models were).
    let mut json = serde_json::to_value(tiny_model_cfg(MqVariant::Parallel)).unwrap();
    for k in ["batch_norm", "enc_dropout", "dec_dropout"] {
        json.as_object_mut().unwrap().remove(k);
    }
    let cfg: MqModelConfig = serde_json::from_value(json).unwrap();
    assert!(!cfg.batch_norm && cfg.enc_dropout == 0.0 && cfg.dec_dropout == 0.0);
    let e = MqTokenizer::new(&gpu, MqModelConfig { enc_dropout: 1.0, ..bn_model_cfg(MqVariant::Parallel) });
    assert!(e.unwrap_err().to_string().contains("enc_dropout = 1"));
}

#[test]
fn batch_norm_keeps_small_scale_inputs_from_collapsing() {
    // Unit-scale clusters shrunk to LightGCN's scale (per-dimension variance
    // ~0.03): without BatchNorm the codebooks collapse onto a few codes, with
    // it they stay spread over the clusters.
    let gpu = Gpu::shared().unwrap();
    let (n, d) = (240, 8);
    let x: Vec<f32> = clusters(n, d, 12, 4).iter().map(|v| v * 0.17).collect();
    let used = |batch_norm: bool| {
        let cfg = MqTokenizerConfig {
            batch_norm,
            enc_dropout: 0.0,
            dec_dropout: 0.0,
            variant: MqVariant::Residual,
            ..small_cfg(MqVariant::Residual)
        };
        let (_, _, rep) = train_mq(&gpu, &x, n, &cfg, "item").unwrap();
        (rep.base.per_level.iter().map(|s| s.used).collect::<Vec<_>>(), rep.base.best_collision_rate)
    };
    let (with, cr_with) = used(true);
    let (without, cr_without) = used(false);
    eprintln!("codes used with BatchNorm {with:?} (collisions {cr_with}), without {without:?} ({cr_without})");
    assert!(cr_with < cr_without, "with {with:?} {cr_with}, without {without:?} {cr_without}");
}
