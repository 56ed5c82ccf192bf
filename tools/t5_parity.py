#!/usr/bin/env python3
"""Parity fixture for genrec's T5 (src/models/t5.rs).

Builds a tiny random-weight Hugging Face `T5ForConditionalGeneration` (ReLU FFN, tied
embeddings, no dropout), runs a padded batch through it in float64 and writes

  tests/fixtures/t5_tiny/model.safetensors  weights under Hugging Face names (f32), with the
                                            config as JSON in the `__metadata__` entry "config"
  tests/fixtures/t5_tiny/io.safetensors     enc_ids [B, S], enc_mask [B, S], dec_in [B, T],
                                            labels [B, T] (ids as exact f32; -100 = ignored),
                                            logits [B*T, V], loss [1], and "grad.<name>" for
                                            every parameter (d mean-CE / d param)

The forward runs in float64 from the f32 weights, so the stored logits and gradients are the
exact values the f32 GPU implementation approximates.

Usage: /work/pyref/bin/python tools/t5_parity.py [--out tests/fixtures/t5_tiny]
"""

import argparse
import json
import os

import torch
from safetensors.torch import save_file
from transformers import T5Config, T5ForConditionalGeneration

CFG = dict(
    vocab_size=37,
    d_model=16,
    d_kv=8,
    num_heads=3,
    d_ff=24,
    num_layers=2,
    num_decoder_layers=2,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    dropout_rate=0.0,
    layer_norm_epsilon=1e-6,
    feed_forward_proj="relu",
    tie_word_embeddings=True,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "t5_tiny"))
    args = ap.parse_args()
    torch.manual_seed(1234)

    config = T5Config(**CFG)
    config._attn_implementation = "eager"
    # transformers >= 5 decides the d_model^-0.5 output scaling from tie_word_embeddings at
    # config creation; older versions test tie_word_embeddings in forward. Both must scale here.
    assert getattr(config, "scale_decoder_outputs", True), "tied T5 must scale decoder outputs"
    model = T5ForConditionalGeneration(config)
    model.eval()
    # Non-trivial norm weights so their gradients are exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model = model.double()

    B, S, T, V = 3, 9, 6, CFG["vocab_size"]
    enc_len = [9, 5, 1]
    enc_ids = torch.randint(2, V, (B, S))
    enc_mask = torch.zeros(B, S, dtype=torch.long)
    for b, n in enumerate(enc_len):
        enc_mask[b, :n] = 1
        enc_ids[b, n - 1] = CFG["eos_token_id"]
        enc_ids[b, n:] = CFG["pad_token_id"]
    labels = torch.randint(2, V, (B, T))
    labels[0, T - 1] = CFG["eos_token_id"]
    labels[1, 3] = CFG["eos_token_id"]
    labels[1, 4:] = -100
    labels[2, 2:5] = -100  # ignored positions inside a row too
    dec_in = model._shift_right(labels)

    out = model(input_ids=enc_ids, attention_mask=enc_mask, decoder_input_ids=dec_in, labels=labels)
    out.loss.backward()
    # Cross-check the tied-output scaling the Rust side implements.
    with torch.no_grad():
        dec_h = model.decoder(
            input_ids=dec_in, encoder_hidden_states=out.encoder_last_hidden_state, encoder_attention_mask=enc_mask
        ).last_hidden_state
        manual = (dec_h * CFG["d_model"] ** -0.5) @ model.shared.weight.T
        assert torch.allclose(manual, out.logits, atol=1e-12), "tied LM head scaling differs from expectation"

    os.makedirs(args.out, exist_ok=True)
    weights = {}
    grads = {}
    for name, p in model.named_parameters():  # tied copies appear once, as shared.weight
        weights[name] = p.detach().float().contiguous()
        grads["grad." + name] = p.grad.detach().float().contiguous()
    meta_cfg = {k: v for k, v in CFG.items()}
    save_file(weights, os.path.join(args.out, "model.safetensors"), metadata={"config": json.dumps(meta_cfg)})
    io = {
        "enc_ids": enc_ids.float(),
        "enc_mask": enc_mask.float(),
        "dec_in": dec_in.float(),
        "labels": labels.float(),
        "logits": out.logits.detach().reshape(B * T, V).float().contiguous(),
        "loss": out.loss.detach().reshape(1).float(),
    }
    io.update(grads)
    save_file(io, os.path.join(args.out, "io.safetensors"))
    print(f"wrote {len(weights)} weights, loss {out.loss.item():.6f}, to {args.out}")
    for name in weights:
        print(f"  {name} {list(weights[name].shape)}")


if __name__ == "__main__":
    main()
