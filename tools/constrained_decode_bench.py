#!/usr/bin/env python3
"""Cost of trie-constrained decoding in HF transformers (`prefix_allowed_tokens_fn`), at the
shapes of genrec's `decode::beam::tests::stage_timing`: a TIGER-shaped trie (1682 items x 4
levels of 256 codes, token 1 + 256 * level + code, pad/start 0, EOS 1025, V = 1026), 64 users,
20 beams, 5 decoding steps.

Default: the decoding part of HF beam search alone, per step on fixed logits [users * beams, V]:
log_softmax, HF's `PrefixConstrainedLogitsProcessor` (driven by a `prefix_allowed_tokens_fn`
over a dict trie), adding beam scores and `torch.topk(2 * beams)` per user, for the 5 steps of a
search with valid prefixes. genrec's counterpart is the "decode kernels (row lse + select)" line of
`cargo test --release --lib decode::beam::tests::stage_timing -- --ignored --nocapture`.
With --full it also times `T5ForConditionalGeneration.generate` (small random T5, no download)
with and without the constraint (slow on CPU).

Usage: /work/pyref/bin/python tools/constrained_decode_bench.py [--device cpu|cuda] [--reps 3] [--full]
"""

import argparse
import time

import numpy as np
import torch
from transformers import T5Config, T5ForConditionalGeneration


def tiger_items(n, seed):
    rng = np.random.default_rng(seed)
    seen, items = {}, []
    for _ in range(n):
        s = tuple(int(1 + 256 * l + rng.integers(0, 256)) for l in range(4))
        c = seen.get(s, 0)
        seen[s] = c + 1
        items.append(s + ((1 + 3 * 256 + c),) if c else s)
    return items


def build_trie(items, eos):
    # prefix tuple -> allowed next tokens (EOS after a complete item)
    allowed = {}
    for s in items:
        for i in range(len(s)):
            allowed.setdefault(tuple(s[:i]), set()).add(s[i])
        allowed.setdefault(tuple(s), set()).add(eos)
    return {k: sorted(v) for k, v in allowed.items()}


def decode_only(args, items, trie, vocab, eos, pad, depth):
    from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor

    rows, k = args.users * args.beams, args.beams
    dev = args.device
    logits = torch.randn(rows, vocab, device=dev) * 4
    rng = np.random.default_rng(2)
    # Valid prefixes per step: each row decodes a random item (shorter items pad with EOS).
    paths = [items[i] for i in rng.integers(0, len(items), rows)]
    proc = PrefixConstrainedLogitsProcessor(lambda b, sent: trie.get(tuple(sent.tolist()[1:]), [eos]), args.beams)
    scores = torch.zeros(rows, device=dev)
    # input_ids per step (HF has them already; built outside the timed loops).
    ids_at = [torch.tensor([[pad] + [(list(p) + [eos] * 8)[j] for j in range(t)] for p in paths], device=dev)
              for t in range(depth + 1)]

    def search():
        for t in range(depth + 1):
            lp = torch.log_softmax(logits, dim=-1)
            lp = proc(ids_at[t], lp)
            cand = (lp + scores[:, None]).view(args.users, k * vocab)
            top, idx = torch.topk(cand, 2 * k, dim=1)
        if dev == "cuda":
            torch.cuda.synchronize()
        return top, idx

    search()
    t0 = time.perf_counter()
    for _ in range(args.reps):
        search()
    dt = (time.perf_counter() - t0) / args.reps
    print(f"device {dev}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"HF decode part (log_softmax + PrefixConstrainedLogitsProcessor + topk), {args.users} users x "
          f"{args.beams} beams, V={vocab}, {depth + 1} steps: {dt * 1e3:.1f} ms/search = {args.users / dt:.0f} users/s")
    t0 = time.perf_counter()
    for _ in range(args.reps):
        for t in range(depth + 1):
            proc(ids_at[t], logits)
    dt = (time.perf_counter() - t0) / args.reps
    print(f"  of which PrefixConstrainedLogitsProcessor alone: {dt * 1e3:.1f} ms/search")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--users", type=int, default=64)
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--full", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    vocab, eos, pad = 1026, 1025, 0
    items = tiger_items(1682, 1)
    depth = max(len(s) for s in items)
    trie = build_trie(items, eos)
    decode_only(args, items, trie, vocab, eos, pad, depth)
    if not args.full:
        return
    cfg = T5Config(vocab_size=vocab, d_model=128, d_kv=64, d_ff=1024, num_layers=4, num_decoder_layers=4,
                   num_heads=6, pad_token_id=pad, eos_token_id=eos, decoder_start_token_id=pad)
    model = T5ForConditionalGeneration(cfg).to(args.device).eval()
    hist = torch.randint(1, 1025, (args.users, 80), device=args.device)

    def allowed_fn(batch_id, sent):
        return trie.get(tuple(sent.tolist()[1:]), [eos])

    def run(constrained):
        kw = dict(num_beams=args.beams, num_return_sequences=10, max_new_tokens=depth + 1,
                  min_new_tokens=depth + 1 if not constrained else 0, early_stopping=True)
        if constrained:
            kw["prefix_allowed_tokens_fn"] = allowed_fn
        with torch.no_grad():
            return model.generate(input_ids=hist, **kw)

    for c in (False, True):
        run(c)  # warm-up
    res = {}
    for c in (False, True):
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.reps):
            out = run(c)
        if args.device == "cuda":
            torch.cuda.synchronize()
        res[c] = (time.perf_counter() - t0) / args.reps
    valid = {tuple(s) for s in items}
    seqs = out.view(args.users, 10, -1)[:, :, 1:].tolist()
    n_valid = sum(tuple(t for t in s if t not in (eos, pad)) in valid for u in seqs for s in u)
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{args.users} users x {args.beams} beams, V={vocab}, {depth + 1} steps, trie of {len(items)} items")
    print(f"HF generate unconstrained: {res[False] * 1e3:.1f} ms/search = {args.users / res[False]:.0f} users/s")
    print(f"HF generate + prefix_allowed_tokens_fn: {res[True] * 1e3:.1f} ms/search = {args.users / res[True]:.0f} users/s")
    print(f"constraint overhead: {(res[True] - res[False]) * 1e3:.1f} ms/search")
    print(f"valid items among constrained outputs: {n_valid}/{args.users * 10}")


if __name__ == "__main__":
    main()
