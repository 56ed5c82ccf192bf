//! BERT tests: parity with transformers on the committed tiny fixture (hidden states,
//! pooled embeddings, every parameter gradient), loading variants and bad checkpoints,
//! tokenization with a hand-made WordPiece tokenizer.json, batching invariance, and the
//! real all-MiniLM-L6-v2 against sentence-transformers (skipped when not cached).

use super::*;
use crate::io::safetensors::{save, StoreDtype};
use crate::io::{HostTensor, TestDir};
use std::collections::BTreeMap;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bert_tiny")
}

fn tiny(gpu: &Gpu) -> Bert {
    Bert::load(gpu, &fixture_dir()).unwrap()
}

/// An I64 tensor of the io fixture as u32.
fn ids(f: &SafeTensorsFile, name: &str) -> (Vec<usize>, Vec<u32>) {
    let (dt, shape) = f.dtype_shape(name).unwrap();
    assert_eq!(dt, "I64", "{name}");
    let v = f.raw(name).unwrap().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect();
    (shape, v)
}

fn fixture_input(io: &SafeTensorsFile) -> BertInput {
    let (shape, input_ids) = ids(io, "input_ids");
    BertInput {
        batch: shape[0],
        seq_len: shape[1],
        input_ids,
        token_type_ids: ids(io, "token_type_ids").1,
        attention_mask: ids(io, "attention_mask").1,
    }
}

/// max |got - want| / max |want|.
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    got.iter().zip(want).fold(0f32, |m, (g, w)| m.max((g - w).abs())) / scale
}

#[test]
fn tiny_model_matches_transformers_forward_and_gradients() {
    let gpu = Gpu::shared().unwrap();
    let model = tiny(&gpu);
    let io = SafeTensorsFile::open(fixture_dir().join("io.safetensors")).unwrap();
    let input = fixture_input(&io);
    assert_eq!(input.lengths(), vec![7, 4, 1]);

    let tape = Tape::new();
    let hidden = model.forward(&tape, &input).unwrap();
    let want_h = io.get("last_hidden_state").unwrap();
    assert_eq!(hidden.shape(), want_h.shape.as_slice());
    let e_h = rel_err(&hidden.value.to_vec_f32().unwrap(), &want_h.data);
    let pooled = l2_normalize(&mean_pool(&hidden, &input).unwrap(), NORMALIZE_EPS).unwrap();
    let e_p = rel_err(&pooled.value.to_vec_f32().unwrap(), &io.get("pooled").unwrap().data);
    println!("tiny BERT: hidden rel err {e_h:.2e}, pooled rel err {e_p:.2e}");
    assert!(e_h < 1e-4, "last_hidden_state relative error {e_h}");
    assert!(e_p < 1e-4, "pooled relative error {e_p}");

    // loss = sum(pooled * w); gradients of every parameter against torch's.
    let w = io.get("loss_weight").unwrap();
    let wv = tape.constant(Tensor::from_f32(&gpu, &w.data, &w.shape).unwrap());
    let loss = pooled.mul(&wv).unwrap().sum_all().unwrap();
    let want_loss = io.get("loss").unwrap().data[0];
    let got_loss = loss.value.to_scalar().unwrap();
    assert!((got_loss - want_loss).abs() <= 1e-4 * want_loss.abs().max(1.0), "loss {got_loss} vs {want_loss}");
    tape.backward(&loss).unwrap();
    let mut worst = (0f32, String::new());
    let mut checked = 0;
    for p in model.params() {
        let name = format!("grad.{}", p.name);
        let want = io.get(&name).unwrap_or_else(|e| panic!("fixture lacks {name}: {e}"));
        let got = p.grad().unwrap_or_else(|| panic!("{} got no gradient", p.name)).to_vec_f32().unwrap();
        if p.name.ends_with("attention.self.key.bias") {
            // Analytically zero (it shifts every score of a query row equally, which the
            // softmax ignores): both sides are rounding noise, compare absolutely.
            let m = got.iter().chain(&want.data).fold(0f32, |m, v| m.max(v.abs()));
            assert!(m < 1e-5, "{}: expected a ~zero gradient, got max |g| {m}", p.name);
            checked += 1;
            continue;
        }
        let e = rel_err(&got, &want.data);
        if e > worst.0 {
            worst = (e, p.name.clone());
        }
        checked += 1;
    }
    println!("tiny BERT: {checked} parameter gradients, worst rel err {:.2e} ({})", worst.0, worst.1);
    assert_eq!(checked, 5 + 16 * model.config.num_hidden_layers);
    assert!(worst.0 < 1e-3, "gradient of {} relative error {}", worst.1, worst.0);
    // The fixture holds no gradient the model does not know (pooler aside, which BERT's
    // sentence embedding does not use: torch gives it no gradient).
    let names: std::collections::HashSet<String> = model.params().iter().map(|p| p.name.clone()).collect();
    for n in io.names().iter().filter_map(|n| n.strip_prefix("grad.")) {
        assert!(names.contains(n) || n.starts_with("pooler."), "fixture gradient {n} has no parameter");
    }
}

#[test]
fn no_grad_inference_equals_the_training_forward() {
    let gpu = Gpu::shared().unwrap();
    let model = tiny(&gpu);
    let io = SafeTensorsFile::open(fixture_dir().join("io.safetensors")).unwrap();
    let input = fixture_input(&io);
    let a = model.embed(&Tape::no_grad(), &input).unwrap().value.to_vec_f32().unwrap();
    let b = model.embed(&Tape::new(), &input).unwrap().value.to_vec_f32().unwrap();
    assert_eq!(a, b);
    for row in a.chunks(model.config.hidden_size) {
        let n: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((n - 1.0).abs() < 1e-5, "pooled row norm {n}");
    }
}

#[test]
fn padding_does_not_change_valid_rows() {
    // Row 1 alone (length 4, no padding) must give the same embedding as inside the
    // padded batch, and a batch of size 1 with trailing pads the same again.
    let gpu = Gpu::shared().unwrap();
    let model = tiny(&gpu);
    let rows = vec![vec![5, 9, 13, 2, 7, 30, 41], vec![3, 17, 22, 8], vec![11]];
    let batch = BertInput::from_rows(&rows, 0).unwrap();
    let all = model.embed(&Tape::no_grad(), &batch).unwrap().value.to_vec_f32().unwrap();
    let h = model.config.hidden_size;
    for (r, row) in rows.iter().enumerate() {
        let one = BertInput::from_rows(std::slice::from_ref(row), 0).unwrap();
        let e = model.embed(&Tape::no_grad(), &one).unwrap().value.to_vec_f32().unwrap();
        assert!(rel_err(&e, &all[r * h..(r + 1) * h]) < 1e-5, "row {r}");
    }
}

#[test]
fn pooling_and_normalization_gradients_match_finite_differences() {
    let gpu = Gpu::shared().unwrap();
    let input = BertInput::from_rows(&[vec![1, 2, 3], vec![4]], 0).unwrap();
    let x = crate::ops::testing::rand_vec(3, 2 * 3 * 8, 1.0);
    crate::autograd::check::check_gradients(
        &gpu,
        &[(x, vec![2, 3, 8])],
        |_, v| l2_normalize(&mean_pool(&v[0], &input)?, NORMALIZE_EPS),
        1e-2,
        2e-2,
        1e-3,
    )
    .unwrap();
}

/// The tiny model's tensors as a map (for rewritten checkpoints).
fn tiny_tensors() -> BTreeMap<String, HostTensor> {
    crate::io::safetensors::load(fixture_dir().join("model.safetensors")).unwrap()
}

fn tiny_config() -> BertConfig {
    BertConfig::load(&fixture_dir().join("config.json")).unwrap()
}

fn write_model(dir: &Path, tensors: &BTreeMap<String, HostTensor>) -> SafeTensorsFile {
    let p = dir.join("model.safetensors");
    save(&p, tensors, None, StoreDtype::F32).unwrap();
    SafeTensorsFile::open(&p).unwrap()
}

#[test]
fn loads_prefixed_and_legacy_names() {
    let gpu = Gpu::shared().unwrap();
    let t = TestDir::new("bert-prefix");
    let base = tiny(&gpu);
    let input = BertInput::from_rows(&[vec![1, 2, 3, 4], vec![5, 6]], 0).unwrap();
    let want = base.embed(&Tape::no_grad(), &input).unwrap().value.to_vec_f32().unwrap();
    for prefix in ["bert.", "0.auto_model."] {
        let mut m = BTreeMap::new();
        for (k, v) in tiny_tensors() {
            // Legacy LayerNorm names for the embeddings; a head tensor to be ignored.
            let k = k.replace("embeddings.LayerNorm.weight", "embeddings.LayerNorm.gamma");
            let k = k.replace("embeddings.LayerNorm.bias", "embeddings.LayerNorm.beta");
            m.insert(format!("{prefix}{k}"), v);
        }
        m.insert("cls.predictions.bias".into(), HostTensor::new(&[50], vec![0.0; 50]).unwrap());
        let f = write_model(t.path(), &m);
        assert_eq!(detect_prefix(&f).unwrap(), prefix);
        let model = Bert::from_safetensors(&gpu, tiny_config(), &f).unwrap();
        let got = model.embed(&Tape::no_grad(), &input).unwrap().value.to_vec_f32().unwrap();
        assert_eq!(got, want, "prefix {prefix}");
        assert_eq!(model.params()[3].name, "embeddings.LayerNorm.weight");
    }
}

#[test]
fn bad_checkpoints_give_errors_naming_file_and_tensor() {
    let gpu = Gpu::shared().unwrap();
    let t = TestDir::new("bert-bad");
    // Missing tensors: all are listed with the file.
    let mut m = tiny_tensors();
    m.remove("encoder.layer.1.output.dense.bias");
    m.remove("encoder.layer.0.attention.self.key.weight");
    let f = write_model(t.path(), &m);
    let e = format!("{:#}", Bert::from_safetensors(&gpu, tiny_config(), &f).err().unwrap());
    assert!(
        e.contains("model.safetensors")
            && e.contains("encoder.layer.1.output.dense.bias")
            && e.contains("encoder.layer.0.attention.self.key.weight")
            && e.contains("2 BERT tensor(s) missing"),
        "{e}"
    );
    // Misshaped tensor: named with both shapes.
    let mut m = tiny_tensors();
    m.insert("encoder.layer.0.intermediate.dense.weight".into(), HostTensor::new(&[16, 24], vec![0.0; 384]).unwrap());
    let f = write_model(t.path(), &m);
    let e = format!("{:#}", Bert::from_safetensors(&gpu, tiny_config(), &f).err().unwrap());
    assert!(e.contains("intermediate.dense.weight") && e.contains("[16, 24]") && e.contains("[24, 16]"), "{e}");
    // Not a BERT checkpoint at all.
    let mut m = BTreeMap::new();
    m.insert("model.embed_tokens.weight".to_string(), HostTensor::new(&[4, 4], vec![0.0; 16]).unwrap());
    let f = write_model(t.path(), &m);
    let e = format!("{:#}", Bert::from_safetensors(&gpu, tiny_config(), &f).err().unwrap());
    assert!(e.contains("no BERT word embedding") && e.contains("model.safetensors"), "{e}");
    // Corrupt safetensors header.
    let p = t.path().join("corrupt.safetensors");
    std::fs::write(&p, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}").unwrap();
    let e = format!("{:#}", SafeTensorsFile::open(&p).unwrap_err());
    assert!(e.contains("corrupt.safetensors"), "{e}");
    // Unknown architecture / unsupported settings in config.json.
    let cfg_path = t.path().join("config.json");
    let text = std::fs::read_to_string(fixture_dir().join("config.json")).unwrap();
    for (from, to, want) in [
        ("\"model_type\": \"bert\"", "\"model_type\": \"llama\"", "unknown architecture"),
        ("\"hidden_act\": \"gelu\"", "\"hidden_act\": \"swish\"", "hidden_act"),
        ("\"num_attention_heads\": 4", "\"num_attention_heads\": 3", "not a multiple"),
    ] {
        std::fs::write(&cfg_path, text.replace(from, to)).unwrap();
        let e = format!("{:#}", BertConfig::load(&cfg_path).unwrap_err());
        assert!(e.contains(want) && e.contains("config.json"), "{e}");
    }
    std::fs::write(&cfg_path, "{\"hidden_size\": 16}").unwrap();
    let e = format!("{:#}", BertConfig::load(&cfg_path).unwrap_err());
    assert!(e.contains("config.json") && e.contains("not a BERT config"), "{e}");
}

#[test]
fn bad_inputs_are_errors() {
    let gpu = Gpu::shared().unwrap();
    let model = tiny(&gpu);
    let tape = Tape::no_grad();
    let e = model.forward(&tape, &BertInput::from_rows(&[vec![1, 50]], 0).unwrap()).err().unwrap().to_string();
    assert!(e.contains("input_ids[1] = 50") && e.contains("vocabulary of 50"), "{e}");
    let long = BertInput::from_rows(&[vec![1; 33]], 0).unwrap();
    let e = model.forward(&tape, &long).err().unwrap().to_string();
    assert!(e.contains("max_position_embeddings 32"), "{e}");
    let mut bad = BertInput::from_rows(&[vec![1, 2]], 0).unwrap();
    bad.token_type_ids = vec![0, 2];
    assert!(model.forward(&tape, &bad).err().unwrap().to_string().contains("token_type_ids[1] = 2"));
    bad.attention_mask.pop();
    assert!(model.forward(&tape, &bad).err().unwrap().to_string().contains("attention_mask has 1 values"));
    assert!(BertInput::from_rows(&[], 0).is_err());
}

#[test]
fn hidden_dropout_only_when_training_and_reproducible() {
    let gpu = Gpu::shared().unwrap();
    let mut model = tiny(&gpu);
    let input = BertInput::from_rows(&[vec![1, 2, 3, 4], vec![5, 6]], 0).unwrap();
    let run = |m: &Bert, tape: Tape| m.forward(&tape, &input).unwrap().value.to_vec_f32().unwrap();
    let plain = run(&model, Tape::no_grad());
    model.dropout = Some(BertDropout { p: 0.5, seed: 7 });
    // Inference ignores dropout; training applies it, the same way for the same seed.
    assert_eq!(run(&model, Tape::no_grad()), plain);
    let a = run(&model, Tape::new());
    assert_ne!(a, plain);
    assert_eq!(run(&model, Tape::new()), a);
    model.dropout = Some(BertDropout { p: 0.5, seed: 8 });
    assert_ne!(run(&model, Tape::new()), a);
}

#[test]
fn random_init_trains_down() {
    // A few AdamW steps on a tiny random BERT: the loss (pull pooled embeddings toward
    // fixed targets) goes down, so the whole stack is trainable end to end.
    let gpu = Gpu::shared().unwrap();
    let cfg = BertConfig { vocab_size: 20, max_position_embeddings: 8, ..tiny_config() };
    let model = Bert::new(&gpu, cfg, 5).unwrap();
    let input = BertInput::from_rows(&[vec![1, 2, 3], vec![4, 5], vec![6, 7, 8, 9]], 0).unwrap();
    let target = crate::ops::testing::rand_vec(9, 3 * 16, 1.0);
    let hp = crate::ops::adamw::AdamW { lr: 1e-2, ..Default::default() };
    let mut opt = crate::nn::optim::AdamW::new(model.params(), hp, None).unwrap();
    let mut losses = Vec::new();
    for _ in 0..8 {
        let tape = Tape::new();
        let e = model.embed(&tape, &input).unwrap();
        let t = tape.constant(Tensor::from_f32(&gpu, &target, &[3, 16]).unwrap());
        let loss = e.mul(&t).unwrap().sum_all().unwrap().scale(-1.0).unwrap();
        losses.push(loss.value.to_scalar().unwrap());
        tape.backward(&loss).unwrap();
        opt.step().unwrap();
    }
    assert!(losses[7] < losses[0] - 0.1, "loss did not decrease: {losses:?}");
}

/// A hand-made WordPiece tokenizer.json in the format of MiniLM's (BertNormalizer,
/// BertPreTokenizer, [CLS] $A [SEP] template, fixed padding that must be overridden).
pub(crate) const TINY_TOKENIZER: &str = r###"{
  "version": "1.0",
  "truncation": null,
  "padding": {"strategy": {"Fixed": 16}, "direction": "Right", "pad_to_multiple_of": null,
              "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
  "added_tokens": [
    {"id": 0, "content": "[PAD]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 1, "content": "[UNK]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 2, "content": "[CLS]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 3, "content": "[SEP]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
  ],
  "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                 "strip_accents": null, "lowercase": true},
  "pre_tokenizer": {"type": "BertPreTokenizer"},
  "post_processor": {"type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
               {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
    "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
             {"SpecialToken": {"id": "[SEP]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
             {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
    "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                       "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}},
  "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
  "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100,
            "vocab": {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "toy": 4, "story": 5, "the": 6,
                      "cat": 7, "##s": 8, "sat": 9, "on": 10, "mat": 11, ",": 12, ".": 13, "play": 14,
                      "##ing": 15, "cafe": 16}}
}"###;

pub(crate) fn tiny_tokenizer_dir() -> TestDir {
    let t = TestDir::new("bert-tok");
    std::fs::write(t.path().join("tokenizer.json"), TINY_TOKENIZER).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture_dir().join(f), t.path().join(f)).unwrap();
    }
    t
}

#[test]
fn wordpiece_tokenizer_lowercases_strips_accents_truncates_and_pads() {
    let t = tiny_tokenizer_dir();
    let tok = BertTokenizer::from_file(&t.path().join("tokenizer.json"), 128).unwrap();
    assert_eq!(tok.pad_id, 0);
    assert_eq!(tok.vocab_size(), 17);
    assert_eq!(tok.encode("Toy Story").unwrap().0, vec![2, 4, 5, 3]);
    assert_eq!(tok.encode("cats Playing, Café.").unwrap().0, vec![2, 7, 8, 14, 15, 12, 16, 13, 3]);
    assert_eq!(tok.encode("xyz").unwrap().0, vec![2, 1, 3]);
    assert_eq!(tok.encode("").unwrap().0, vec![2, 3]);
    let short = BertTokenizer::from_file(&t.path().join("tokenizer.json"), 4).unwrap();
    assert_eq!(short.encode("the cat sat on the mat").unwrap().0, vec![2, 6, 7, 3]);
    // Padding to the longest of the batch (not the file's fixed 16).
    let b = tok.encode_batch(&["toy", "the cat sat"]).unwrap();
    assert_eq!((b.batch, b.seq_len), (2, 5));
    assert_eq!(b.input_ids, vec![2, 4, 3, 0, 0, 2, 6, 7, 9, 3]);
    assert_eq!(b.attention_mask, vec![1, 1, 1, 0, 0, 1, 1, 1, 1, 1]);
    assert_eq!(b.token_type_ids, vec![0; 10]);
    // A tokenizer with more tokens than the model's vocabulary is refused.
    let small = BertConfig { vocab_size: 10, ..tiny_config() };
    let e = tok.check_vocab(&small).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json") && e.contains("mismatch"), "{e}");
    let e = BertTokenizer::from_file(&t.path().join("nope.json"), 16).err().unwrap().to_string();
    assert!(e.contains("nope.json"), "{e}");
}

#[test]
fn text_encoder_output_is_independent_of_batching_and_order() {
    let gpu = Gpu::shared().unwrap();
    let t = tiny_tokenizer_dir();
    let enc = TextEncoder::load(&gpu, t.path(), 16).unwrap();
    let texts = ["the cat sat on the mat", "toy", "cafe story", "", "playing cats", "toy story, the cat."];
    let mut calls = Vec::new();
    let a = enc.embed(&texts, 4, &mut |d| calls.push(d)).unwrap();
    assert_eq!(calls, vec![4, 6]);
    let b = enc.embed(&texts, 1, &mut |_| {}).unwrap();
    assert!(rel_err(&a, &b) < 1e-5, "batch 4 vs batch 1: {}", rel_err(&a, &b));
    // Row i is text i: compare with a direct single-text forward.
    let h = enc.dim();
    for (i, text) in texts.iter().enumerate() {
        let input = enc.tokenizer.encode_batch(&[text]).unwrap();
        let e = enc.model.embed(&Tape::no_grad(), &input).unwrap().value.to_vec_f32().unwrap();
        assert!(rel_err(&a[i * h..(i + 1) * h], &e) < 1e-5, "text {i}");
    }
    assert!(enc.embed(&texts, 0, &mut |_| {}).is_err());
    assert!(enc.embed(&[], 4, &mut |_| {}).unwrap().is_empty());
}

#[derive(serde::Deserialize)]
struct Titles {
    titles: Vec<String>,
    embeddings: Vec<Vec<f32>>,
}

#[test]
fn minilm_matches_sentence_transformers_on_20_titles() {
    let Some(dir) = crate::io::fetch::local("minilm") else {
        println!("SKIPPED minilm_matches_sentence_transformers_on_20_titles: MiniLM is not cached (run `genrec fetch minilm`)");
        return;
    };
    let gpu = Gpu::shared().unwrap();
    let enc = TextEncoder::load(&gpu, &dir, DEFAULT_MAX_LEN).unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/minilm_titles.json");
    let fx: Titles = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!((fx.titles.len(), fx.embeddings.len()), (20, 20));
    let refs: Vec<&str> = fx.titles.iter().map(String::as_str).collect();
    let got = enc.embed(&refs, 8, &mut |_| {}).unwrap();
    let mut min = (f32::MAX, 0);
    for (i, want) in fx.embeddings.iter().enumerate() {
        let g = &got[i * 384..(i + 1) * 384];
        let dot: f32 = g.iter().zip(want).map(|(a, b)| a * b).sum();
        let na: f32 = g.iter().map(|a| a * a).sum::<f32>().sqrt();
        let nb: f32 = want.iter().map(|a| a * a).sum::<f32>().sqrt();
        let cos = dot / (na * nb);
        if cos < min.0 {
            min = (cos, i);
        }
    }
    println!("MiniLM vs sentence-transformers: min cosine {:.8} (title {}: {:?})", min.0, min.1, fx.titles[min.1]);
    assert!(min.0 > 0.999, "title {} {:?}: cosine {}", min.1, fx.titles[min.1], min.0);
}

/// CPU seconds (user + system) of this process so far, from /proc (Linux), for
/// throughput numbers that survive a shared machine; None elsewhere.
fn cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    let f: Vec<&str> = s.rsplit(')').next()?.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Throughput of MiniLM over ml-100k item texts (needs MiniLM and a prepared ml-100k in
/// the cache): `cargo test --release --lib models::bert::tests::bench_minilm -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_minilm_ml100k_items() {
    let (Some(dir), Ok(cache)) = (crate::io::fetch::local("minilm"), crate::io::fetch::cache_dir()) else {
        println!("SKIPPED: MiniLM not cached");
        return;
    };
    let Ok(p) = crate::data::Prepared::load(&cache.join("prepared/ml-100k-loo")) else {
        println!("SKIPPED: no prepared ml-100k (run `genrec embed --dataset ml-100k` once)");
        return;
    };
    let n: usize = std::env::var("BENCH_ITEMS").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    let gpu = Gpu::shared().unwrap();
    let enc = TextEncoder::load(&gpu, &dir, DEFAULT_MAX_LEN).unwrap();
    let texts = crate::models::embed::item_texts(&p, crate::models::embed::DEFAULT_TEMPLATE).unwrap();
    let texts: Vec<&str> = texts.iter().take(n).map(String::as_str).collect();
    let tokens: usize = enc.tokenizer.encode_many(&texts).unwrap().iter().map(|e| e.0.len()).sum();
    enc.embed(&texts[..8], 8, &mut |_| {}).unwrap(); // compile pipelines
    let (t0, c0) = (std::time::Instant::now(), cpu_seconds());
    enc.embed(&texts, 64, &mut |_| {}).unwrap();
    let (wall, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds().zip(c0).map(|(a, b)| a - b));
    println!(
        "MiniLM on {} ml-100k items ({tokens} tokens, batch 64, {}): {wall:.1}s wall = {:.1} items/s; {:.1} CPU-s = {:.1} items per CPU-s",
        texts.len(),
        gpu.describe(),
        texts.len() as f64 / wall,
        cpu.unwrap_or(f64::NAN),
        texts.len() as f64 / cpu.unwrap_or(f64::NAN)
    );
}
