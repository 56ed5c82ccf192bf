#!/usr/bin/env python3
"""SmolLM2-135M-Instruct throughput: genrec (examples/llama_bench.rs, on whatever adapter it
picks) next to PyTorch running the same dequantized GGUF weights (transformers, f32, KV cache)
on this machine's CPU, measured in one run, same prompt length and decode steps.

Run: cargo build --release --example llama_bench
     /work/pyref/bin/python tools/llama_peer_bench.py <dir with the GGUF> [P] [STEPS] [genrec binary]
"""
import re
import subprocess
import sys
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache

FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def torch_bench(d, p, steps):
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file=FILE, dtype=torch.float32, attn_implementation="sdpa")
    m.eval()
    prompt = torch.tensor([[(i * 37 % 5000 + 100) for i in range(p)]])
    out = {}
    with torch.no_grad():
        m(input_ids=prompt[:, :8])  # warm-up
        t = time.perf_counter()
        m(input_ids=prompt)
        s = time.perf_counter() - t
        out["prefill"] = p / s
        for rows in (1, 16):
            ids = prompt[:, :16].repeat(rows, 1)
            cache = DynamicCache()
            r = m(input_ids=ids, past_key_values=cache, use_cache=True)
            nxt = r.logits[:, -1].argmax(-1, keepdim=True)
            r = m(input_ids=nxt, past_key_values=r.past_key_values, use_cache=True)  # warm-up step
            nxt = r.logits[:, -1].argmax(-1, keepdim=True)
            t = time.perf_counter()
            for _ in range(steps):
                r = m(input_ids=nxt, past_key_values=r.past_key_values, use_cache=True)
                nxt = r.logits[:, -1].argmax(-1, keepdim=True)
            s = time.perf_counter() - t
            out[f"decode{rows}"] = rows * steps / s
    return out


def genrec_bench(binary, p, steps):
    txt = subprocess.run([binary, str(p), str(steps)], capture_output=True, text=True, check=True).stdout
    print(txt.strip())
    out = {"prefill": float(re.search(r"prefill batch 1, \d+ tokens: [\d.]+ s = ([\d.]+) tokens/s", txt).group(1))}
    for rows in (1, 16):
        out[f"decode{rows}"] = float(re.search(rf"decode batch {rows}: .* ([\d.]+) tokens/s", txt).group(1))
    return out


def main():
    d = sys.argv[1]
    p = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    binary = sys.argv[4] if len(sys.argv) > 4 else "target/release/examples/llama_bench"
    g = genrec_bench(binary, p, steps)
    t = torch_bench(d, p, steps)
    print(f"torch {torch.__version__} CPU threads {torch.get_num_threads()}")
    print(f"{'':12} {'genrec tok/s':>14} {'torch tok/s':>12} {'genrec/torch':>13}")
    for k, name in [("prefill", f"prefill {p}"), ("decode1", "decode b=1"), ("decode16", "decode b=16")]:
        print(f"{name:12} {g[k]:14.2f} {t[k]:12.2f} {g[k] / t[k]:13.3f}")


if __name__ == "__main__":
    main()
