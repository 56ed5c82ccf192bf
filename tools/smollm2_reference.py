#!/usr/bin/env python3
"""Reference outputs of SmolLM2-135M-Instruct (the GGUF genrec fetches as asset `smollm2`) from
transformers, for src/models/llama/tests.rs::smollm2_real_weights_match_transformers.

transformers loads the GGUF itself (dequantized by the `gguf` package, Q/K permutation undone
by transformers' converter), in float32, eager attention; the tokenizer is built from the same
GGUF metadata. For 3 prompts it records the token ids, the top-50 next-token logits (values and
indices) at the last prompt position, and a 20-token greedy continuation (argmax, no stop token).

Run: /work/pyref/bin/python tools/smollm2_reference.py <dir holding SmolLM2-135M-Instruct.Q4_1.gguf> [out.json]
"""
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nRecommend a movie like Toy Story (1995).<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    # 12 steps",
]


def main():
    d = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(
        os.path.dirname(__file__), "..", "tests", "fixtures", "smollm2", "reference.json"
    )
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=FILE)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=FILE, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    cases = []
    with torch.no_grad():
        for text in PROMPTS:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0, -1]
            top = torch.topk(logits, 50)
            seq = list(ids)
            greedy = []
            for _ in range(20):
                nxt = int(torch.argmax(model(input_ids=torch.tensor([seq])).logits[0, -1]))
                greedy.append(nxt)
                seq.append(nxt)
            cases.append(
                {
                    "text": text,
                    "ids": ids,
                    "top_ids": [int(i) for i in top.indices],
                    "top_logits": [float(v) for v in top.values],
                    "greedy": greedy,
                    "greedy_text": tok.decode(greedy),
                }
            )
            print(repr(text), "->", repr(tok.decode(greedy)))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"model": FILE, "transformers": __import__("transformers").__version__, "prompts": cases}, f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
