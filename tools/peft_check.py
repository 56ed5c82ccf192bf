#!/usr/bin/env python3
"""Check that a LoRA adapter exported by genrec (examples/llama_lora_export.rs) loads in `peft`
and reproduces genrec's logits.

Run: cargo run --example llama_lora_export -- /tmp/peft_tiny
     /work/pyref/bin/python tools/peft_check.py /tmp/peft_tiny
The base model is the one named in adapter_config.json (base_model_name_or_path).
"""
import json
import os
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main():
    d = sys.argv[1]
    cfg = json.load(open(os.path.join(d, "adapter_config.json")))
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"], dtype=torch.float32,
                                                attn_implementation="eager")
    model = PeftModel.from_pretrained(base, d)
    model.eval()
    io = load_file(os.path.join(d, "genrec_logits.safetensors"))
    ids = io["input_ids"].long()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    want = io["logits"]
    err = (logits - want).abs().max().item()
    scale = want.abs().max().item()
    n_lora = sum(1 for n, _ in model.named_parameters() if "lora_" in n)
    with model.disable_adapter():
        with torch.no_grad():
            plain = model(input_ids=ids).logits
    effect = (plain - want).abs().max().item()
    print(f"peft loaded {n_lora} LoRA tensors; max |peft - genrec| = {err:.3e} (logit scale {scale:.3f}); "
          f"adapter effect max |base - adapted| = {effect:.3e}")
    ok = err <= 1e-4 * max(scale, 1.0) and effect > 1e-3
    print("OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
