#!/usr/bin/env python3
"""PyTorch peer of `examples/t5_speed.rs`: the TIGER-size T5 (letter.spec.md §2.4) from Hugging Face
transformers, same shapes (encoder 81 tokens, decoder 5), measured on the same machine.

  training: samples/s of forward + backward + AdamW on random batches (train mode, dropout 0.1)
  decoding: users/s of encode + 5 decoder steps with `beams` beams per user (HF generate,
            unconstrained beam search, KV cache), the workload `T5DecodeSession` serves
  recommendation: users/s of HF generate with `prefix_allowed_tokens_fn` over a trie of 1,682
            TIGER-like items (4 levels x 256 codes, a 5th token on collisions), returning the top
            `beams` sequences: what genrec's trie-constrained `beam_search` does for eval/recommend

With --rust it also runs `cargo run --release --example t5_speed` with the same sizes and prints
both results and the ratios from one run.

Usage: /work/pyref/bin/python tools/t5_speed_torch.py [--batch 32] [--steps 3] [--vocab 1100]
       [--users 16] [--beams 20] [--threads N] [--device cpu|cuda] [--rust]
"""

import argparse
import json
import os
import re
import subprocess
import tempfile
import time

import numpy as np

import torch
from transformers import T5Config, T5ForConditionalGeneration

from constrained_decode_bench import build_trie  # tools/ is on sys.path when run as a script


def tiger_config(vocab):
    return T5Config(
        vocab_size=vocab,
        d_model=128,
        d_kv=64,
        num_heads=6,
        d_ff=1024,
        num_layers=4,
        num_decoder_layers=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.1,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="relu",
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def sample(g, n, length, vocab, device):
    x = torch.randint(2, vocab, (n, length), generator=g)
    x[:, -1] = 1
    return x.to(device)


def tiger_items(n, seed):
    """TIGER-like identifiers in genrec's token layout (PAD 0, EOS 1, token 2 + 256 * level + code):
    4 random codes, and a 5th token 2 + 1024 + c for the c-th repeat of a code tuple."""
    rng = np.random.default_rng(seed)
    seen, items = {}, []
    for _ in range(n):
        s = tuple(int(2 + 256 * l + rng.integers(0, 256)) for l in range(4))
        c = seen.get(s, 0)
        seen[s] = c + 1
        items.append(s + (2 + 4 * 256 + c,) if c else s)
    return items


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=1100)
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rust", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = a.device
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = T5ForConditionalGeneration(tiger_config(a.vocab)).to(dev)
    print(f"torch {torch.__version__}, device {dev}, threads {torch.get_num_threads()}")
    print(f"TIGER T5: {sum(p.numel() for p in model.parameters())} parameters, vocab {a.vocab}")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    times = []
    for step in range(a.steps + 1):
        enc = sample(g, a.batch, 81, a.vocab, dev)
        labels = sample(g, a.batch, 5, a.vocab, dev)
        t0 = time.perf_counter()
        loss = model(input_ids=enc, attention_mask=torch.ones_like(enc), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        l = loss.item()
        sync(dev)
        dt = time.perf_counter() - t0
        print(f"train step {step}: loss {l:.4f}, {dt:.3f} s{' (warm-up)' if step == 0 else ''}")
        if step:
            times.append(dt)
    train_sps = a.batch / (sum(times) / len(times))
    print(f"training: batch {a.batch}, {train_sps:.1f} samples/s")

    model.eval()

    def timed_generate(label, **kw):
        """users/s of HF generate over 3 fresh batches (the first a warm-up), and the last output."""
        times, out = [], None
        with torch.no_grad():
            for rep in range(3):
                enc = sample(g, a.users, 81, a.vocab, dev)
                t0 = time.perf_counter()
                out = model.generate(input_ids=enc, attention_mask=torch.ones_like(enc), num_beams=a.beams,
                                     num_return_sequences=a.beams, do_sample=False, **kw)
                sync(dev)
                dt = time.perf_counter() - t0
                print(f"{label} rep {rep}: {dt:.3f} s{' (warm-up)' if rep == 0 else ''}")
                if rep:
                    times.append(dt)
        return a.users / (sum(times) / len(times)), out

    dec_ups, _ = timed_generate("decode", max_new_tokens=5, min_new_tokens=5, early_stopping=False)
    print(f"decoding (HF generate, {a.beams} beams, 5 steps): {dec_ups:.1f} users/s")

    # Recommendation: constrained beam search over the same trie genrec searches.
    items = tiger_items(1682, 1)
    trie = build_trie(items, 1)
    depth = max(len(s) for s in items)
    assert max(max(s) for s in items) < a.vocab, "vocabulary too small for the items"

    def allowed_fn(batch_id, sent):
        # sent = [decoder start, tokens so far]; after EOS only padding follows.
        return trie.get(tuple(sent.tolist()[1:]), [0])

    rec_ups, out = timed_generate("recommend", max_new_tokens=depth + 1, early_stopping=True,
                                  prefix_allowed_tokens_fn=allowed_fn)
    valid = {tuple(s) for s in items}
    seqs = out[:, 1:].tolist()
    n_out = len(seqs)
    n_valid = sum(tuple(t for t in s if t not in (0, 1)) in valid for s in seqs)
    print(f"recommendation (HF generate + prefix_allowed_tokens_fn, {a.beams} beams, top {a.beams}, "
          f"trie of {len(items)} items): {rec_ups:.1f} users/s ({n_valid}/{n_out} valid items)")

    if a.rust:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump([list(s) for s in items], f)
        args = [str(x) for x in (a.batch, a.steps, a.vocab, a.users, a.beams)] + [f.name]
        try:
            out = subprocess.run(
                ["cargo", "run", "--release", "--example", "t5_speed", "--", *args],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        finally:
            os.unlink(f.name)
        print(out)
        rs_train = float(re.search(r"training: batch \d+, ([\d.]+) samples/s", out).group(1))
        rs_dec = float(re.search(r"decoding .*: ([\d.]+) users/s", out).group(1))
        rs_rec = float(re.search(r"recommendation .*: ([\d.]+) users/s", out).group(1))
        print(f"ratio genrec / torch: training {rs_train / train_sps:.2f}x, decoding {rs_dec / dec_ups:.2f}x, "
              f"recommendation {rs_rec / rec_ups:.2f}x")


if __name__ == "__main__":
    main()
