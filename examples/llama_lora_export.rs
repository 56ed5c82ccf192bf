//! Fine-tune LoRA adapters on the tiny parity LLaMA (tests/fixtures/llama_tiny/untied), export
//! them in PEFT's layout, and write the adapted model's logits for a fixed batch, so that
//! `tools/peft_check.py` can load the adapter with `peft` and compare.
//! `cargo run --example llama_lora_export -- OUT_DIR`

use std::collections::BTreeMap;
use std::path::PathBuf;

use genrec::autograd::{cross_entropy, CeOptions, Tape};
use genrec::gpu::{Gpu, Tensor};
use genrec::io::HostTensor;
use genrec::models::llama::Llama;
use genrec::nn::lora::LoraConfig;
use genrec::nn::optim::AdamW;

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "target/peft_tiny".into()));
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_tiny/untied");
    let gpu = Gpu::shared()?;
    let mut m = Llama::from_hf_dir(&gpu, &base)?;
    let cfg = LoraConfig::new(4, 8.0, 0.0, &["q", "k", "v", "o", "gate", "up", "down"])?;
    m.apply_lora(&cfg, false, 7)?;
    let (b, t) = (2, 6);
    let ids: Vec<u32> = (0..b * t).map(|i| ((i * 17 + 3) % 61) as u32).collect();
    let ids_t = Tensor::from_u32(&gpu, &ids, &[b, t])?;
    let mask = Llama::padding_mask(&gpu, &vec![vec![true; t]; b])?;
    let targets: Vec<i32> = (0..b * t).map(|i| if i % t == t - 1 { -100 } else { ids[i + 1] as i32 }).collect();
    let tg = Tensor::from_i32(&gpu, &targets, &[b * t])?;
    let mut opt = AdamW::new(m.params(), genrec::ops::adamw::AdamW { lr: 2e-2, ..Default::default() }, None)?;
    for step in 0..10 {
        let tape = Tape::new();
        let logits = m.forward(&tape, &ids_t, &mask, None)?;
        let loss = cross_entropy(&logits, &tg, &CeOptions::default())?;
        println!("step {step}: loss {:.4}", loss.value.to_scalar()?);
        tape.backward(&loss)?;
        opt.step()?;
    }
    m.export_peft(&out, &cfg, &base.display().to_string())?;
    let logits = m.forward(&Tape::no_grad(), &ids_t, &mask, None)?.value.to_vec_f32()?;
    let mut io = BTreeMap::new();
    io.insert("input_ids".to_string(), HostTensor::new(&[b, t], ids.iter().map(|&x| x as f32).collect())?);
    io.insert("logits".to_string(), HostTensor::new(&[b, t, m.cfg.vocab], logits)?);
    genrec::io::safetensors::save(
        out.join("genrec_logits.safetensors"),
        &io,
        None,
        genrec::io::safetensors::StoreDtype::F32,
    )?;
    println!("wrote {}", out.display());
    Ok(())
}
