//! Tests of the LLaMA decoder: parity with transformers (tests/fixtures/llama_tiny, made by
//! tools/llama_parity.py), KV-cache decoding vs the full forward, greedy generation, vocabulary
//! growth, LoRA training/export, GGUF loading, bad inputs, and SmolLM2 real weights (skipped
//! with a message when the asset is not cached).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::*;
use crate::autograd::{cross_entropy, CeOptions};
use crate::io::gguf::{permute_rows, GgmlType, GgufWriter, MetaValue};
use crate::io::TestDir;
use crate::nn::optim::AdamW;
use crate::ops::testing::assert_close;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_tiny").join(name)
}

fn gpu() -> Gpu {
    Gpu::shared().unwrap()
}

/// Logits `[T, V]` of one unpadded sequence (no cache).
fn full_logits(m: &Llama, seq: &[u32]) -> Vec<f32> {
    let g = m.gpu();
    let ids = Tensor::from_u32(g, seq, &[1, seq.len()]).unwrap();
    let mask = Llama::padding_mask(g, &[vec![true; seq.len()]]).unwrap();
    m.forward(&Tape::no_grad(), &ids, &mask, None).unwrap().value.to_vec_f32().unwrap()
}

fn last_row(x: &[f32], v: usize) -> &[f32] {
    &x[x.len() - v..]
}

fn max_abs(x: &[f32]) -> f32 {
    x.iter().fold(0f32, |m, v| m.max(v.abs()))
}

struct Batch {
    ids: Tensor,
    valid: Vec<Vec<bool>>,
    targets: Tensor,
}

/// The fixture's padded batch and next-token targets (-100 where either token is padding).
fn batch(g: &Gpu, io: &BTreeMap<String, HostTensor>) -> Batch {
    let (b, t) = (io["input_ids"].shape[0], io["input_ids"].shape[1]);
    let ids: Vec<u32> = io["input_ids"].data.iter().map(|&x| x as u32).collect();
    let valid: Vec<Vec<bool>> =
        io["attention_mask"].data.chunks(t).map(|r| r.iter().map(|&x| x > 0.5).collect()).collect();
    let mut targets = vec![-100i32; b * t];
    for r in 0..b {
        for s in 0..t - 1 {
            if valid[r][s] && valid[r][s + 1] {
                targets[r * t + s] = ids[r * t + s + 1] as i32;
            }
        }
    }
    Batch {
        ids: Tensor::from_u32(g, &ids, &[b, t]).unwrap(),
        valid,
        targets: Tensor::from_i32(g, &targets, &[b * t]).unwrap(),
    }
}

fn parity(name: &str) {
    let g = gpu();
    let dir = fixture(name);
    let model = Llama::from_hf_dir(&g, &dir).unwrap();
    let io = crate::io::safetensors::load(dir.join("io.safetensors")).unwrap();
    let bt = batch(&g, &io);
    let v = model.cfg.vocab;
    let mask = Llama::padding_mask(&g, &bt.valid).unwrap();
    let tape = Tape::new();
    let logits = model.forward(&tape, &bt.ids, &mask, None).unwrap();
    let got = logits.value.to_vec_f32().unwrap();
    let want = &io["logits"].data;
    let scale = max_abs(want);
    let t = bt.valid[0].len();
    for (r, row) in bt.valid.iter().enumerate() {
        for (s, &ok) in row.iter().enumerate() {
            if ok {
                let i = (r * t + s) * v;
                // 1e-4 relative to the logits' magnitude.
                assert_close(&format!("{name} logits[{r}, {s}]"), &got[i..i + v], &want[i..i + v], 1e-4, 1e-4 * scale);
            }
        }
    }
    let loss = cross_entropy(&logits, &bt.targets, &CeOptions::default()).unwrap();
    let lv = loss.value.to_scalar().unwrap();
    assert_close(&format!("{name} loss"), &[lv], &io["loss"].data, 1e-5, 0.0);
    tape.backward(&loss).unwrap();
    let params = model.named_params();
    let n_grads = io.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(params.len(), n_grads, "{name}: parameter count vs fixture gradients");
    for (pname, p) in &params {
        let want = &io[&format!("grad.{pname}")];
        let got = p.grad().unwrap_or_else(|| panic!("{name}: no gradient for {pname}")).to_vec_f32().unwrap();
        assert_eq!(p.value.shape(), want.shape.as_slice(), "{pname}");
        // 1e-3 relative to each tensor's largest gradient.
        assert_close(&format!("{name} grad {pname}"), &got, &want.data, 1e-3, 1e-3 * max_abs(&want.data));
    }
}

#[test]
fn parity_untied_logits_and_gradients() {
    parity("untied");
}

#[test]
fn parity_tied_logits_and_gradients() {
    parity("tied");
}

#[test]
fn parity_qwen2_bias_logits_and_gradients() {
    parity("qwen2");
}

#[test]
fn kv_cache_decoding_matches_full_forward_with_padding_beams_and_reorder() {
    let g = gpu();
    let m = Llama::from_hf_dir(&g, fixture("untied")).unwrap();
    let v = m.cfg.vocab;
    let a: Vec<u32> = vec![5, 17, 3, 42, 8, 60, 1, 33, 21];
    let full = full_logits(&m, &a);
    // One row: prefill 4 tokens, then decode one at a time.
    let (mut s, logits) = m.session(&[a[..4].to_vec()], 1, 12).unwrap();
    assert_close("prefill", &logits.to_vec_f32().unwrap(), &full[3 * v..4 * v], 1e-4, 1e-4);
    for t in 4..a.len() {
        let l = s.step(&Tensor::from_u32(&g, &[a[t]], &[1]).unwrap()).unwrap();
        assert_close(&format!("decode step {t}"), &l.to_vec_f32().unwrap(), &full[t * v..(t + 1) * v], 1e-4, 1e-4);
    }
    // Two prompts of different lengths (left padding), two beams each, then a reorder.
    let b: Vec<u32> = vec![9, 2];
    let (mut s, logits) = m.session(&[a[..5].to_vec(), b.clone()], 2, 10).unwrap();
    let l0 = logits.to_vec_f32().unwrap();
    let (la, lb) = (full_logits(&m, &a[..5]), full_logits(&m, &b));
    for r in 0..4 {
        let want = if r < 2 { last_row(&la, v) } else { last_row(&lb, v) };
        assert_close(&format!("beam prefill row {r}"), &l0[r * v..(r + 1) * v], want, 1e-4, 1e-4);
    }
    let step1 = [11u32, 12, 13, 14];
    s.step(&Tensor::from_u32(&g, &step1, &[4]).unwrap()).unwrap();
    // Rows 0 and 1 both continue old row 1; rows 2, 3 swap.
    s.reorder(&Tensor::from_u32(&g, &[1, 1, 3, 2], &[4]).unwrap()).unwrap();
    let step2 = [20u32, 21, 22, 23];
    let l2 = s.step(&Tensor::from_u32(&g, &step2, &[4]).unwrap()).unwrap().to_vec_f32().unwrap();
    let seqs = [
        [&a[..5], &[12, 20][..]].concat(),
        [&a[..5], &[12, 21][..]].concat(),
        [&b[..], &[14, 22][..]].concat(),
        [&b[..], &[13, 23][..]].concat(),
    ];
    for (r, seq) in seqs.iter().enumerate() {
        let f = full_logits(&m, seq);
        assert_close(&format!("after reorder row {r} ({seq:?})"), &l2[r * v..(r + 1) * v], last_row(&f, v), 1e-4, 1e-4);
    }
    assert!(s.step(&Tensor::from_u32(&g, &[1, 2], &[2]).unwrap()).is_err(), "wrong row count must be an error");
}

#[test]
fn greedy_generation_matches_uncached_argmax_and_batching() {
    let g = gpu();
    let m = Llama::from_hf_dir(&g, fixture("tied")).unwrap();
    let v = m.cfg.vocab;
    let prompts = vec![vec![3u32, 14, 15, 9, 26], vec![53u32], vec![5, 8, 9]];
    let n = 5;
    let batched = m.generate_greedy_batch(&prompts, n).unwrap();
    for (p, got) in prompts.iter().zip(&batched) {
        // Reference: full forward over the growing sequence, argmax of the last row.
        let mut seq = p.clone();
        let mut want = Vec::new();
        for _ in 0..n {
            let f = full_logits(&m, &seq);
            let row = last_row(&f, v);
            let best = (0..v).fold(0, |b, i| if row[i] > row[b] { i } else { b }) as u32;
            want.push(best);
            seq.push(best);
        }
        assert_eq!(got, &want, "greedy for prompt {p:?}");
        assert_eq!(&m.generate_greedy(p, n).unwrap(), got, "single vs batched for {p:?}");
    }
}

#[test]
fn add_tokens_keeps_old_logits_and_trains_new_rows() {
    let g = gpu();
    for name in ["untied", "tied"] {
        let mut m = Llama::from_hf_dir(&g, fixture(name)).unwrap();
        let v = m.cfg.vocab;
        let seq = vec![1u32, 7, 30, 59];
        let before = full_logits(&m, &seq);
        let first = m.add_tokens(3, 5).unwrap();
        assert_eq!(first as usize, v);
        assert_eq!(m.cfg.vocab, v + 3);
        assert_eq!(m.embed.value.shape(), &[v + 3, m.cfg.d]);
        assert_eq!(m.lm_head.is_none(), name == "tied");
        let after = full_logits(&m, &seq);
        for t in 0..seq.len() {
            assert_close(
                &format!("{name} old logits t {t}"),
                &after[t * (v + 3)..t * (v + 3) + v],
                &before[t * v..(t + 1) * v],
                1e-5,
                1e-5,
            );
        }
        // New rows sit near the mean row, distinct from each other.
        let e = m.embed.value.to_vec_f32().unwrap();
        let d = m.cfg.d;
        let mean: Vec<f32> = (0..d).map(|j| (0..v).map(|i| e[i * d + j]).sum::<f32>() / v as f32).collect();
        for k in 0..3 {
            let row = &e[(v + k) * d..(v + k + 1) * d];
            assert_close("new row ~ mean", row, &mean, 0.0, 0.1);
            assert_ne!(row, &e[(v + (k + 1) % 3) * d..(v + (k + 1) % 3 + 1) * d]);
        }
        // A new token takes part in training: its embedding row gets a gradient.
        let ids = Tensor::from_u32(&g, &[first + 1, 4, first], &[1, 3]).unwrap();
        let mask = Llama::padding_mask(&g, &[vec![true; 3]]).unwrap();
        let tape = Tape::new();
        let logits = m.forward(&tape, &ids, &mask, None).unwrap();
        let tg = Tensor::from_i32(&g, &[4, first as i32 + 2, -100], &[3]).unwrap();
        tape.backward(&cross_entropy(&logits, &tg, &CeOptions::default()).unwrap()).unwrap();
        let ge = m.embed.grad().unwrap().to_vec_f32().unwrap();
        assert!(ge[(v + 1) * d..(v + 2) * d].iter().any(|&x| x != 0.0), "{name}: new row got no gradient");
    }
}

#[test]
fn lora_finetune_changes_only_adapters_and_exports_peft() {
    let g = gpu();
    for f16 in [false, true] {
        let mut m = Llama::from_hf_dir(&g, fixture("untied")).unwrap();
        let base: BTreeMap<String, Vec<f32>> =
            m.named_params().iter().map(|(k, p)| (k.clone(), p.value.to_vec_f32().unwrap())).collect();
        let cfg = LoraConfig::new(4, 8.0, 0.05, &["q", "v", "o", "gate", "up", "down"]).unwrap();
        m.apply_lora(&cfg, f16, 3).unwrap();
        let trainable = m.params();
        assert_eq!(trainable.len(), m.cfg.layers * 6 * 2, "only A and B train");
        assert!(trainable.iter().all(|p| p.name.contains(".lora_")));
        if f16 {
            assert_eq!(m.layers[0].q.weight.value.dtype(), DType::F16);
            assert_eq!(m.layers[0].k.weight.value.dtype(), DType::F32, "k is not a target");
        }
        let io = crate::io::safetensors::load(fixture("untied").join("io.safetensors")).unwrap();
        let bt = batch(&g, &io);
        let mask = Llama::padding_mask(&g, &bt.valid).unwrap();
        let hp = crate::ops::adamw::AdamW { lr: 2e-2, weight_decay: 0.0, ..Default::default() };
        let mut opt = AdamW::new(trainable, hp, Some(1.0)).unwrap();
        let mut losses = Vec::new();
        for _ in 0..8 {
            let tape = Tape::new();
            let logits = m.forward(&tape, &bt.ids, &mask, None).unwrap();
            let loss = cross_entropy(&logits, &bt.targets, &CeOptions::default()).unwrap();
            losses.push(loss.value.to_scalar().unwrap());
            tape.backward(&loss).unwrap();
            opt.step().unwrap();
        }
        assert!(losses[7] < losses[0] - 0.1, "f16 {f16}: loss did not decrease: {losses:?}");
        for (k, p) in m.named_params() {
            if let Some(b) = base.get(&k) {
                let now = p.value.to_vec_f32().unwrap();
                let tol = if f16 && p.value.dtype() == DType::F16 { 2e-3 } else { 0.0 };
                assert_close(&format!("frozen {k}"), &now, b, tol, 0.0);
                assert!(p.grad().is_none(), "{k} got a gradient");
            }
        }
        // Export in PEFT's layout.
        let dir = TestDir::new("peft");
        m.export_peft(dir.path(), &cfg, "tiny-llama").unwrap();
        let st = crate::io::safetensors::load(dir.path().join("adapter_model.safetensors")).unwrap();
        assert_eq!(st.len(), m.cfg.layers * 6 * 2);
        let a = &st["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"];
        assert_eq!(a.shape, vec![4, m.cfg.d]);
        let b = &st["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"];
        assert_eq!(b.shape, vec![m.cfg.d, 4]);
        assert!(b.data.iter().any(|&x| x != 0.0), "B trained away from zero");
        let c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!(c["peft_type"], "LORA");
        assert_eq!(c["task_type"], "CAUSAL_LM");
        assert_eq!(c["r"], 4);
        assert_eq!(c["lora_alpha"], 8.0);
        assert_eq!(c["base_model_name_or_path"], "tiny-llama");
        assert_eq!(c["target_modules"].as_array().unwrap().len(), 6);
        // Merging gives the same logits as the adapters.
        let seq = [4u32, 9, 16, 25];
        let unmerged = full_logits(&m, &seq);
        m.merge_lora().unwrap();
        assert!(m.adapters().is_empty());
        let tol = if f16 { 5e-3 } else { 1e-4 };
        assert_close("merged vs unmerged", &full_logits(&m, &seq), &unmerged, tol, tol);
    }
}

/// The fixture model written as a llama.cpp-style GGUF (F32 or quantized, Q/K rows permuted).
fn write_gguf(path: &Path, ty: GgmlType) -> Llama {
    let g = gpu();
    let dir = fixture("untied");
    let m = Llama::from_hf_dir(&g, &dir).unwrap();
    let c = m.cfg.clone();
    let st = crate::io::safetensors::load(dir.join("model.safetensors")).unwrap();
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::Str("llama".into()))
        .meta("llama.block_count", MetaValue::U32(c.layers as u32))
        .meta("llama.embedding_length", MetaValue::U32(c.d as u32))
        .meta("llama.feed_forward_length", MetaValue::U32(c.ffn as u32))
        .meta("llama.attention.head_count", MetaValue::U32(c.heads as u32))
        .meta("llama.attention.head_count_kv", MetaValue::U32(c.kv_heads as u32))
        .meta("llama.rope.freq_base", MetaValue::F32(c.rope_theta))
        .meta("llama.attention.layer_norm_rms_epsilon", MetaValue::F32(c.eps))
        .meta("llama.vocab_size", MetaValue::U32(c.vocab as u32));
    let gg = |hf: &str| -> String {
        match hf {
            "model.embed_tokens.weight" => "token_embd.weight".into(),
            "model.norm.weight" => "output_norm.weight".into(),
            "lm_head.weight" => "output.weight".into(),
            _ => {
                let rest = hf.strip_prefix("model.layers.").unwrap();
                let (l, rest) = rest.split_once('.').unwrap();
                let part = match rest.trim_end_matches(".weight") {
                    "input_layernorm" => "attn_norm",
                    "self_attn.q_proj" => "attn_q",
                    "self_attn.k_proj" => "attn_k",
                    "self_attn.v_proj" => "attn_v",
                    "self_attn.o_proj" => "attn_output",
                    "post_attention_layernorm" => "ffn_norm",
                    "mlp.gate_proj" => "ffn_gate",
                    "mlp.up_proj" => "ffn_up",
                    "mlp.down_proj" => "ffn_down",
                    o => panic!("{o}"),
                };
                format!("blk.{l}.{part}.weight")
            }
        }
    };
    for (name, t) in &st {
        let mut data = t.data.clone();
        if name.contains("q_proj") {
            data = permute_rows(&data, t.shape[0], t.shape[1], c.heads).unwrap();
        } else if name.contains("k_proj") {
            data = permute_rows(&data, t.shape[0], t.shape[1], c.kv_heads).unwrap();
        }
        let ty = if t.shape.len() == 2 && t.shape[1] % 32 == 0 { ty } else { GgmlType::F32 };
        w.tensor_f32(&gg(name), &t.shape, &data, ty).unwrap();
    }
    w.write(path).unwrap();
    m
}

#[test]
fn gguf_load_matches_hf_weights() {
    let dir = TestDir::new("llama_gguf");
    let p = dir.path().join("tiny.gguf");
    let hf = write_gguf(&p, GgmlType::F32);
    let m = Llama::from_gguf(hf.gpu(), &p).unwrap();
    assert_eq!(m.cfg.vocab, hf.cfg.vocab);
    assert!(!m.cfg.tied);
    let seq = [1u32, 2, 3, 50, 8];
    assert_close("gguf f32 logits", &full_logits(&m, &seq), &full_logits(&hf, &seq), 1e-5, 1e-5);
    // Q8_0 still tracks the f32 logits closely.
    let p8 = dir.path().join("tiny_q8.gguf");
    write_gguf(&p8, GgmlType::Q8_0);
    let m8 = Llama::from_gguf(hf.gpu(), &p8).unwrap();
    let want = full_logits(&hf, &seq);
    assert_close("gguf q8_0 logits", &full_logits(&m8, &seq), &want, 0.05, 0.05 * max_abs(&want));
}

#[test]
fn bad_checkpoints_are_errors_naming_file_and_tensor() {
    let g = gpu();
    let dir = fixture("untied");
    let cfg = LlamaConfig::from_hf_json(&dir.join("config.json")).unwrap();
    let st = crate::io::safetensors::load(dir.join("model.safetensors")).unwrap();
    let mut missing = st.clone();
    missing.remove("model.layers.1.mlp.up_proj.weight");
    let e = Llama::from_tensors(&g, cfg.clone(), &missing, "ckpt.safetensors").err().unwrap().to_string();
    assert!(e.contains("ckpt.safetensors") && e.contains("model.layers.1.mlp.up_proj.weight"), "{e}");
    let mut bad = st.clone();
    bad.insert("model.layers.0.self_attn.k_proj.weight".into(), HostTensor::new(&[3, 32], vec![0.0; 96]).unwrap());
    let e = Llama::from_tensors(&g, cfg.clone(), &bad, "ckpt.safetensors").err().unwrap().to_string();
    assert!(e.contains("k_proj") && e.contains("[3, 32]") && e.contains("[16, 32]"), "{e}");
    // Unknown architecture.
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    v["model_type"] = "gpt_neox".into();
    let e = LlamaConfig::from_hf_value(&v, "x/config.json").unwrap_err().to_string();
    assert!(e.contains("x/config.json") && e.contains("gpt_neox"), "{e}");
    // Corrupt GGUF and safetensors headers.
    let t = TestDir::new("llama_bad");
    let p = t.path().join("corrupt.gguf");
    std::fs::write(&p, b"GGUF\x03\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\xff garbage").unwrap();
    let e = format!("{:#}", Llama::from_gguf(&g, &p).err().unwrap());
    assert!(e.contains("corrupt.gguf"), "{e}");
    let d = t.path().join("hf");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(dir.join("config.json"), d.join("config.json")).unwrap();
    std::fs::write(d.join("model.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{not json").unwrap();
    let e = format!("{:#}", Llama::from_hf_dir(&g, &d).err().unwrap());
    assert!(e.contains("model.safetensors"), "{e}");
    // Out-of-vocabulary prompt ids.
    let m = Llama::from_tensors(&g, cfg, &st, "ok").unwrap();
    assert!(m.session(&[vec![1, 61]], 1, 4).err().unwrap().to_string().contains("61"));
}

/// SmolLM2-135M-Instruct (GGUF, Q4_1/Q8_0) vs transformers on the same dequantized weights:
/// next-token logits (top 50 of the last position of 3 prompts) within 1e-3 relative, and 20
/// greedy tokens identical. Reference: tests/fixtures/smollm2/reference.json
/// (tools/smollm2_reference.py).
#[test]
fn smollm2_real_weights_match_transformers() {
    let Some(dir) = crate::io::fetch::local("smollm2") else {
        eprintln!(
            "SKIPPED smollm2_real_weights_match_transformers: asset smollm2 not cached (run `genrec fetch smollm2`)"
        );
        return;
    };
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let refp = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2/reference.json");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&refp).unwrap()).unwrap();
    let g = gpu();
    let m = Llama::from_gguf(&g, &path).unwrap();
    let tok = crate::models::llama_tokenizer::LlamaTokenizer::from_gguf_file(&path).unwrap();
    tok.check_model_vocab(m.cfg.vocab, "smollm2").unwrap();
    for case in r["prompts"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode(text, false).unwrap(), ids, "tokenization of {text:?} vs transformers");
        let (_, logits) = m.session(std::slice::from_ref(&ids), 1, ids.len() + 1).unwrap();
        let l = logits.to_vec_f32().unwrap();
        let top_i: Vec<usize> =
            case["top_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        let top_v: Vec<f32> =
            case["top_logits"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        let got: Vec<f32> = top_i.iter().map(|&i| l[i]).collect();
        let scale = max_abs(&top_v);
        let worst = got.iter().zip(&top_v).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        eprintln!("smollm2 {text:?}: top-50 logits max |ours - transformers| = {worst:.2e} (max |logit| {scale:.2})");
        assert_close(&format!("smollm2 logits for {text:?}"), &got, &top_v, 1e-3, 1e-3 * scale);
        let want: Vec<u32> = case["greedy"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let gen = m.generate_greedy(&ids, want.len()).unwrap();
        assert_eq!(gen, want, "greedy continuation of {text:?}: ours {:?}", tok.decode(&gen, false));
        eprintln!("smollm2 {text:?} -> {:?}", tok.decode(&gen, false).unwrap());
    }
}

#[test]
fn config_json_round_trip_and_random_init_forward() {
    let g = gpu();
    let cfg = LlamaConfig::from_hf_json(&fixture("qwen2").join("config.json")).unwrap();
    assert!(cfg.qkv_bias && !cfg.o_bias && cfg.tied && cfg.arch == "qwen2");
    // transformers-4 style (rope_theta at the top level) reads back the same.
    let back = LlamaConfig::from_hf_value(&cfg.to_hf_json(), "exported").unwrap();
    assert_eq!(LlamaConfig { max_positions: cfg.max_positions, ..back }, cfg);
    let m = Llama::new_random(&g, cfg.clone(), 11).unwrap();
    let l = full_logits(&m, &[1, 2, 3]);
    assert_eq!(l.len(), 3 * cfg.vocab);
    assert!(l.iter().all(|x| x.is_finite()) && l.iter().any(|&x| x != 0.0));
}
