//! Tests of the T5 model: HF parity (fixture from tools/t5_parity.py), loading errors,
//! incremental decoding == teacher forcing (with reorders), and a toy training run.

use super::*;
use crate::autograd::{cross_entropy, CeOptions};
use crate::io::TestDir;
use rand::{Rng, SeedableRng};

fn fixture_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/t5_tiny")
}

/// The tiny configuration of the fixture (vocab 37, d 16, 3 heads x 8, ff 24, 2+2 layers,
/// 8 buckets, max distance 20), dropout as given.
fn tiny_cfg(dropout: f32) -> T5Config {
    T5Config {
        vocab: 37,
        d_model: 16,
        d_kv: 8,
        heads: 3,
        d_ff: 24,
        enc_layers: 2,
        dec_layers: 2,
        rel_buckets: 8,
        rel_max_distance: 20,
        dropout,
        eps: 1e-6,
        pad_id: 0,
        eos_id: 1,
        decoder_start_id: 0,
    }
}

/// max|a - b| / max(max|b|, 1e-12)
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let scale = b.iter().map(|y| y.abs()).fold(0f32, f32::max).max(1e-12);
    assert!(a.iter().all(|x| x.is_finite()), "non-finite values");
    diff / scale
}

fn ids_of(t: &HostTensor) -> Vec<u32> {
    t.data.iter().map(|&x| x as u32).collect()
}

#[test]
fn tiger_config_names_and_sizes() {
    let gpu = Gpu::shared().unwrap();
    let cfg = T5Config::tiger(1100);
    assert_eq!((cfg.d_model, cfg.heads, cfg.d_kv, cfg.d_ff, cfg.inner()), (128, 6, 64, 1024, 384));
    let m = T5::new(&gpu, cfg.clone(), 1).unwrap();
    let named = m.named_params();
    let names: BTreeSet<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.len(), named.len(), "duplicate names");
    // shared + enc (4 x 8 + rel + final) + dec (4 x 13 + rel + final)
    assert_eq!(named.len(), 1 + 4 * 8 + 2 + 4 * 13 + 2);
    let shape = |n: &str| named.iter().find(|(k, _)| k == n).unwrap().1.value.shape().to_vec();
    assert_eq!(shape("shared.weight"), [1100, 128]);
    assert_eq!(shape("encoder.block.0.layer.0.SelfAttention.q.weight"), [384, 128]);
    assert_eq!(shape("encoder.block.3.layer.0.SelfAttention.o.weight"), [128, 384]);
    assert_eq!(shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"), [32, 6]);
    assert_eq!(shape("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"), [32, 6]);
    assert_eq!(shape("decoder.block.2.layer.1.EncDecAttention.k.weight"), [384, 128]);
    assert_eq!(shape("decoder.block.3.layer.2.DenseReluDense.wi.weight"), [1024, 128]);
    assert_eq!(shape("decoder.block.3.layer.2.DenseReluDense.wo.weight"), [128, 1024]);
    assert_eq!(shape("encoder.final_layer_norm.weight"), [128]);
    assert_eq!(shape("decoder.block.1.layer.1.layer_norm.weight"), [128]);
    for (n, p) in &named {
        assert_eq!(&p.name, n);
    }
    // Attention 4 * 128 * 384, FFN 2 * 128 * 1024, norms 128 each.
    let (att, ffn, ln) = (4 * 128 * 384, 2 * 128 * 1024, 128);
    let want = 1100 * 128 + 4 * (att + ffn + 2 * ln) + 4 * (2 * att + ffn + 3 * ln) + 2 * ln + 2 * 32 * 6;
    assert_eq!(m.num_params(), want);
    // Serde round trip of the config.
    let back: T5Config = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(back, cfg);
    let mut bad = cfg.clone();
    bad.d_kv = 6;
    let e = T5::new(&gpu, bad, 0).err().expect("bad d_kv accepted").to_string();
    assert!(e.contains("d_kv"), "{e}");
}

#[test]
fn parity_with_hugging_face_logits_and_gradients() {
    let gpu = Gpu::shared().unwrap();
    let dir = fixture_dir();
    let model = T5::from_safetensors(&gpu, dir.join("model.safetensors")).unwrap();
    assert_eq!(model.cfg, tiny_cfg(0.0), "fixture config");
    let io = SafeTensorsFile::open(dir.join("io.safetensors")).unwrap();
    let (enc, mask, dec_in, labels) =
        (io.get("enc_ids").unwrap(), io.get("enc_mask").unwrap(), io.get("dec_in").unwrap(), io.get("labels").unwrap());
    let (b, s, t) = (enc.shape[0], enc.shape[1], dec_in.shape[1]);
    let batch = T5Batch {
        enc_ids: Tensor::from_u32(&gpu, &ids_of(&enc), &[b, s]).unwrap(),
        enc_valid: (0..b).map(|i| (0..s).map(|j| mask.data[i * s + j] > 0.5).collect()).collect(),
        dec_in: Tensor::from_u32(&gpu, &ids_of(&dec_in), &[b, t]).unwrap(),
    };
    let targets: Vec<i32> = labels.data.iter().map(|&x| x as i32).collect();
    let targets = Tensor::from_i32(&gpu, &targets, &[b * t]).unwrap();
    for p in model.params() {
        p.zero_grad();
    }
    let tape = Tape::new();
    let logits = model.forward(&tape, &batch, false, 0).unwrap();
    assert_eq!(logits.shape(), [b * t, 37]);
    let loss = cross_entropy(&logits, &targets, &CeOptions::default()).unwrap();
    tape.backward(&loss).unwrap();

    let e = rel_err(&logits.value.to_vec_f32().unwrap(), &io.get("logits").unwrap().data);
    assert!(e < 1e-4, "logits relative error {e}");
    let want_loss = io.get("loss").unwrap().data[0];
    let got_loss = loss.value.to_scalar().unwrap();
    assert!((got_loss - want_loss).abs() < 1e-4 * want_loss.abs(), "loss {got_loss} vs {want_loss}");
    let mut worst = (0f32, String::new());
    for (name, p) in model.named_params() {
        let want = io.get(&format!("grad.{name}")).unwrap();
        let got = p.grad().unwrap_or_else(|| panic!("{name}: no gradient")).to_vec_f32().unwrap();
        let e = rel_err(&got, &want.data);
        if e > worst.0 {
            worst = (e, name.clone());
        }
        assert!(e < 1e-3, "gradient of {name}: relative error {e}");
    }
    eprintln!("t5 parity: logits rel err {e:.2e}, worst grad rel err {:.2e} ({})", worst.0, worst.1);
}

#[test]
fn loading_rejects_missing_extra_and_misshaped_tensors() {
    let gpu = Gpu::shared().unwrap();
    let path = fixture_dir().join("model.safetensors");
    let good = crate::io::safetensors::load(&path).unwrap();
    let m = T5::new(&gpu, tiny_cfg(0.0), 3).unwrap();
    let src = "fixture.safetensors";
    let name = "decoder.block.1.layer.1.EncDecAttention.v.weight";

    let mut missing = good.clone();
    missing.remove(name);
    let e = m.load_tensors(&missing, src).unwrap_err().to_string();
    assert!(e.contains(src) && e.contains("missing") && e.contains(name), "{e}");

    let mut extra = good.clone();
    extra.insert("decoder.block.9.layer.0.SelfAttention.q.weight".into(), HostTensor::new(&[1], vec![0.0]).unwrap());
    let e = m.load_tensors(&extra, src).unwrap_err().to_string();
    assert!(e.contains(src) && e.contains("unexpected") && e.contains("decoder.block.9"), "{e}");

    let mut shaped = good.clone();
    shaped.insert(name.into(), HostTensor::new(&[16, 24], vec![0.0; 384]).unwrap());
    let e = m.load_tensors(&shaped, src).unwrap_err().to_string();
    assert!(e.contains(src) && e.contains(name) && e.contains("[16, 24]") && e.contains("[24, 16]"), "{e}");

    let mut untied = good.clone();
    let mut head = good["shared.weight"].clone();
    head.data[3] += 1.0;
    untied.insert("lm_head.weight".into(), head);
    let e = m.load_tensors(&untied, src).unwrap_err().to_string();
    assert!(e.contains("lm_head.weight") && e.contains("untied"), "{e}");

    // Tied copies equal to shared.weight are accepted; the loaded values land in the params.
    let mut tied = good.clone();
    tied.insert("lm_head.weight".into(), good["shared.weight"].clone());
    tied.insert("encoder.embed_tokens.weight".into(), good["shared.weight"].clone());
    m.load_tensors(&tied, src).unwrap();
    let host = m.to_host().unwrap();
    for (n, t) in &host {
        assert_eq!(t, &good[n], "{n}");
    }

    // Save / reload round trip keeps every tensor and the config.
    let dir = TestDir::new("t5-save");
    let p = dir.path().join("t5.safetensors");
    m.save_safetensors(&p).unwrap();
    let back = T5::from_safetensors(&gpu, &p).unwrap();
    assert_eq!(back.cfg, m.cfg);
    assert_eq!(back.to_host().unwrap(), host);

    // A corrupt file names the path.
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}").unwrap();
    let e = m.load_safetensors(&bad).unwrap_err().to_string();
    assert!(e.contains("bad.safetensors"), "{e}");
}

#[test]
fn hf_config_json_is_read_and_unsupported_variants_rejected() {
    let j = r#"{"vocab_size": 37, "d_model": 16, "d_kv": 8, "num_heads": 3, "d_ff": 24, "num_layers": 2,
        "num_decoder_layers": 2, "relative_attention_num_buckets": 8, "relative_attention_max_distance": 20,
        "dropout_rate": 0.0, "layer_norm_epsilon": 1e-6, "feed_forward_proj": "relu", "pad_token_id": 0,
        "eos_token_id": 1, "decoder_start_token_id": 0}"#;
    assert_eq!(T5Config::from_hf_json(j).unwrap(), tiny_cfg(0.0));
    let gated = j.replace("\"relu\"", "\"gated-gelu\"");
    assert!(T5Config::from_hf_json(&gated).unwrap_err().to_string().contains("gated-gelu"));
    let no_vocab = j.replace("\"vocab_size\": 37,", "");
    assert!(T5Config::from_hf_json(&no_vocab).unwrap_err().to_string().contains("vocab_size"));
}

/// Full teacher-forced logits of every row's history, at the last position: `[rows, V]`.
fn teacher_forced_last(m: &T5, enc_rows: &[Vec<u32>], hist: &[Vec<u32>]) -> Vec<f32> {
    let gpu = m.gpu().clone();
    let batch = T5Batch::new(&gpu, &m.cfg, enc_rows, hist).unwrap();
    let t = hist[0].len();
    let v = m.cfg.vocab;
    let logits = m.forward(&Tape::no_grad(), &batch, false, 0).unwrap().value.to_vec_f32().unwrap();
    (0..hist.len()).flat_map(|r| logits[(r * t + t - 1) * v..(r * t + t) * v].to_vec()).collect()
}

/// Drive a session with random tokens and random in-user reorders; compare every step's
/// logits with the full forward over the (reordered) histories.
fn check_incremental(cfg: T5Config, enc_lens: &[usize], beams: usize, max_len: usize, seed: u64) {
    let gpu = Gpu::shared().unwrap();
    let m = T5::new(&gpu, cfg.clone(), seed).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let users: Vec<Vec<u32>> =
        enc_lens.iter().map(|&n| (0..n).map(|_| rng.gen_range(2..cfg.vocab as u32)).collect()).collect();
    let batch = T5Batch::new(&gpu, &cfg, &users, &vec![vec![0]; users.len()]).unwrap();
    let enc = m.encode(&batch.enc_ids, &batch.enc_valid).unwrap();
    let mut sess = m.decode_session(&enc, beams, max_len).unwrap();
    let rows = users.len() * beams;
    assert_eq!(sess.rows(), rows);
    let enc_rows: Vec<Vec<u32>> = (0..rows).map(|r| users[r / beams].clone()).collect();
    let mut hist: Vec<Vec<u32>> = vec![Vec::new(); rows];
    for step in 0..max_len {
        let toks: Vec<u32> = if step == 0 {
            vec![cfg.decoder_start_id; rows]
        } else {
            (0..rows).map(|_| rng.gen_range(0..cfg.vocab as u32)).collect()
        };
        for (h, &tk) in hist.iter_mut().zip(&toks) {
            h.push(tk);
        }
        let got = sess.step(&Tensor::from_u32(&gpu, &toks, &[rows]).unwrap()).unwrap();
        assert_eq!(got.shape(), [rows, cfg.vocab]);
        let got = got.to_vec_f32().unwrap();
        let want = teacher_forced_last(&m, &enc_rows, &hist);
        let e = rel_err(&got, &want);
        assert!(e < 1e-4, "step {step} (beams {beams}): incremental vs teacher-forced relative error {e}");
        // Reorder after some steps (twice in a row once, to exercise a pending reorder).
        let n_reorders = match step % 3 {
            1 => 1,
            2 if step == 2 => 2,
            _ => 0,
        };
        for _ in 0..n_reorders {
            let parents: Vec<u32> = (0..rows).map(|r| ((r / beams) * beams + rng.gen_range(0..beams)) as u32).collect();
            sess.reorder(&Tensor::from_u32(&gpu, &parents, &[rows]).unwrap()).unwrap();
            hist = parents.iter().map(|&p| hist[p as usize].clone()).collect();
        }
    }
    let e = sess.step(&Tensor::from_u32(&gpu, &vec![0; rows], &[rows]).unwrap()).unwrap_err().to_string();
    assert!(e.contains("steps"), "{e}");
}

#[test]
fn incremental_decoding_matches_teacher_forcing_with_reorders() {
    // 2 users (5 and 2 encoder tokens) x 3 beams, 7 steps (awkward sizes).
    check_incremental(tiny_cfg(0.1), &[5, 2], 3, 7, 11);
}

#[test]
fn incremental_decoding_one_beam_and_one_user() {
    check_incremental(tiny_cfg(0.0), &[1, 4, 3], 1, 3, 12);
    check_incremental(tiny_cfg(0.0), &[9], 4, 5, 13);
    // TIGER's head size (d_kv 64: the other attention kernel variant), 32 buckets.
    let wide = T5Config { d_kv: 64, heads: 2, rel_buckets: 32, rel_max_distance: 128, ..tiny_cfg(0.0) };
    check_incremental(wide, &[3, 7], 2, 4, 14);
}

#[test]
fn bad_inputs_are_errors() {
    let gpu = Gpu::shared().unwrap();
    let cfg = tiny_cfg(0.0);
    let m = T5::new(&gpu, cfg.clone(), 5).unwrap();
    let e = T5Batch::new(&gpu, &cfg, &[vec![3, 37]], &[vec![0]]).unwrap_err().to_string();
    assert!(e.contains("37") && e.contains("encoder"), "{e}");
    let e = T5Batch::new(&gpu, &cfg, &[vec![3], vec![]], &[vec![0], vec![0]]).unwrap_err().to_string();
    assert!(e.contains("row 1"), "{e}");
    let batch = T5Batch::new(&gpu, &cfg, &[vec![3, 4], vec![5]], &[vec![0, 2], vec![0]]).unwrap();
    let mut wrong = batch.clone();
    wrong.enc_valid.pop();
    let e = m.forward(&Tape::no_grad(), &wrong, false, 0).unwrap_err().to_string();
    assert!(e.contains("enc_valid"), "{e}");
    let enc = m.encode(&batch.enc_ids, &batch.enc_valid).unwrap();
    assert!(m.decode_session(&enc, 0, 4).is_err());
    let mut sess = m.decode_session(&enc, 2, 4).unwrap();
    let e = sess.step(&Tensor::from_u32(&gpu, &[0; 3], &[3]).unwrap()).unwrap_err().to_string();
    assert!(e.contains("rows = 4") && e.contains("[3]"), "{e}");
    let e = sess.reorder(&Tensor::from_i32(&gpu, &[0; 4], &[4]).unwrap()).unwrap_err().to_string();
    assert!(e.contains("parents"), "{e}");
}

#[test]
fn dropout_is_deterministic_per_seed_and_off_in_eval() {
    let gpu = Gpu::shared().unwrap();
    let cfg = tiny_cfg(0.3);
    let m = T5::new(&gpu, cfg.clone(), 6).unwrap();
    let (batch, _) = T5Batch::from_labels(&gpu, &cfg, &[vec![5, 6, 7], vec![8, 1]], &[vec![9, 1], vec![4]]).unwrap();
    let run =
        |train: bool, seed: u32| m.forward(&Tape::new(), &batch, train, seed).unwrap().value.to_vec_f32().unwrap();
    let (a, b, c) = (run(true, 1), run(true, 1), run(true, 2));
    let (e1, e2) = (run(false, 1), run(false, 2));
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_eq!(e1, e2);
    assert_ne!(a, e1);
}

#[test]
fn from_labels_shifts_right_and_pads_with_ignore_index() {
    let gpu = Gpu::shared().unwrap();
    let cfg = tiny_cfg(0.0);
    let (b, tg) = T5Batch::from_labels(&gpu, &cfg, &[vec![5, 6, 7], vec![8]], &[vec![9, 10, 1], vec![4, 1]]).unwrap();
    assert_eq!(b.dec_in.to_vec_u32().unwrap(), vec![0, 9, 10, 0, 4, 0]);
    assert_eq!(tg.to_vec_i32().unwrap(), vec![9, 10, 1, 4, 1, -100]);
    assert_eq!(b.enc_ids.to_vec_u32().unwrap(), vec![5, 6, 7, 8, 0, 0]);
    assert_eq!(b.enc_valid, vec![vec![true, true, true], vec![true, false, false]]);
}

#[test]
fn training_on_a_toy_copy_task_drives_the_loss_down() {
    // Copy 2 random tokens (ids 2..12) then EOS; small T5 with dropout 0.1, AdamW.
    let gpu = Gpu::shared().unwrap();
    let cfg = T5Config {
        vocab: 12,
        d_model: 32,
        d_kv: 8,
        heads: 4,
        d_ff: 64,
        enc_layers: 2,
        dec_layers: 2,
        rel_buckets: 8,
        rel_max_distance: 16,
        dropout: 0.1,
        eps: 1e-6,
        pad_id: 0,
        eos_id: 1,
        decoder_start_id: 0,
    };
    let m = T5::new(&gpu, cfg.clone(), 21).unwrap();
    let hp = crate::ops::adamw::AdamW { lr: 1e-2, weight_decay: 0.0, ..Default::default() };
    let mut opt = crate::nn::optim::AdamW::new(m.params(), hp, Some(1.0)).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut losses = Vec::new();
    for step in 0..40 {
        let enc: Vec<Vec<u32>> = (0..16).map(|_| (0..2).map(|_| rng.gen_range(2..12)).collect()).collect();
        let labels: Vec<Vec<u32>> = enc.iter().map(|r| r.iter().copied().chain([1]).collect()).collect();
        let (batch, targets) = T5Batch::from_labels(&gpu, &cfg, &enc, &labels).unwrap();
        let tape = Tape::new();
        let logits = m.forward(&tape, &batch, true, step).unwrap();
        let loss = cross_entropy(&logits, &targets, &CeOptions::default()).unwrap();
        tape.backward(&loss).unwrap();
        opt.step().unwrap();
        losses.push(loss.value.to_scalar().unwrap());
    }
    let first = losses[..3].iter().sum::<f32>() / 3.0;
    let last = losses[losses.len() - 3..].iter().sum::<f32>() / 3.0;
    eprintln!("t5 toy copy: loss {first:.3} -> {last:.3} ({losses:?})");
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(last < 0.5 * first, "loss did not drop clearly: {first} -> {last}");
}
