#!/usr/bin/env python3
"""Parity fixtures for genrec's LLaMA-family decoder (src/models/llama.rs).

Builds tiny random-weight causal LMs with transformers (f32, eager attention) and writes, per
configuration, into tests/fixtures/llama_tiny/<name>/:
  config.json        the HF config (what `LlamaConfig::from_hf_json` reads)
  model.safetensors  the weights under HF names
  io.safetensors     inputs and references:
                       input_ids      [B, T] (as f32; right padded with 0)
                       attention_mask [B, T] (1 = token, 0 = padding)
                       logits         [B, T, V]  (only unpadded positions are compared)
                       loss           [1]        mean CE of next-token prediction over unpadded pairs
                       grad.<name>    d loss / d parameter, for every parameter

Configurations: "untied" (tie_word_embeddings false), "tied" (true), both
vocab 61, hidden 32, 2 layers, 4 heads, 2 KV heads, intermediate 48, rope_theta 1e4;
and "qwen2" (Qwen2ForCausalLM: q/k/v bias, tied) to cover the bias path.

Weights are drawn larger than the HF default (std 0.02) so that every block changes the
logits measurably, and the RMSNorm weights are random too.

Run: /work/pyref/bin/python tools/llama_parity.py [out_dir]
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "llama_tiny")

COMMON = dict(
    vocab_size=61,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
    rms_norm_eps=1e-5,
    max_position_embeddings=64,
)


def build(name, seed):
    torch.manual_seed(seed)
    if name == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        cfg = Qwen2Config(**COMMON, rope_theta=10000.0, tie_word_embeddings=True)
        cfg._attn_implementation = "eager"
        model = Qwen2ForCausalLM(cfg)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(**COMMON, rope_theta=10000.0, tie_word_embeddings=(name == "tied"))
        cfg._attn_implementation = "eager"
        model = LlamaForCausalLM(cfg)
    model = model.float()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "bias" in pname:
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(0.25 * torch.randn_like(p))
    return cfg, model


def main():
    for i, name in enumerate(["untied", "tied", "qwen2"]):
        cfg, model = build(name, 1234 + i)
        model.train()  # no dropout configured; train() only matters for gradients
        b, t = 3, 7
        g = torch.Generator().manual_seed(99 + i)
        ids = torch.randint(0, cfg.vocab_size, (b, t), generator=g)
        lengths = [7, 4, 1]
        mask = torch.zeros(b, t, dtype=torch.long)
        for r, n in enumerate(lengths):
            mask[r, :n] = 1
        ids = ids * mask  # padding token 0
        out = model(input_ids=ids, attention_mask=mask)
        logits = out.logits  # [B, T, V]
        # Next-token CE over pairs (t, t + 1) with both tokens unpadded.
        labels = ids.clone()
        labels[mask == 0] = -100
        shift_logits = logits[:, :-1, :].reshape(-1, cfg.vocab_size)
        shift_labels = labels[:, 1:].reshape(-1)
        loss = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
        loss.backward()

        d = os.path.join(OUT, name)
        os.makedirs(d, exist_ok=True)
        cfg_dict = cfg.to_dict()
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg_dict, f, indent=1, sort_keys=True)
        # Tied models list lm_head.weight among named_parameters only once (as embed_tokens).
        weights = {k: v.detach().contiguous() for k, v in model.named_parameters()}
        save_file(weights, os.path.join(d, "model.safetensors"))
        io = {
            "input_ids": ids.float().contiguous(),
            "attention_mask": mask.float().contiguous(),
            "logits": logits.detach().contiguous(),
            "loss": loss.detach().reshape(1),
        }
        for k, v in model.named_parameters():
            io["grad." + k] = v.grad.detach().contiguous()
        save_file(io, os.path.join(d, "io.safetensors"))
        sizes = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
        print(f"{name}: loss {loss.item():.6f}, {len(weights)} tensors, {sizes} bytes in {d}")


if __name__ == "__main__":
    main()
