#!/usr/bin/env python3
"""Cross-check genrec's GGUF dequantization against the reference `gguf` package.

Usage (dev only; needs `pip install gguf numpy`):
  GENREC_GGUF_DUMP=/tmp/smollm2_dq.safetensors \
    cargo test --lib io::gguf::tests::real_smollm2_when_present -- --nocapture
  python3 tools/gguf_crosscheck.py <model.gguf> /tmp/smollm2_dq.safetensors

The dump holds every tensor as genrec dequantized it (GGUF names, row-major
shape = ne reversed) plus `hf.<name>` for layer 0's q_proj/k_proj in Hugging
Face row order. This script dequantizes with gguf.quants.dequantize, prints
the max abs difference per tensor type, and re-applies llama.cpp's `permute`
(convert_hf_to_gguf.py) to genrec's HF q/k to show it gives back the GGUF rows.
"""
import json
import struct
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", (name, info["dtype"])
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype="<f4").reshape(info["shape"])
    return out


def permute(w, n_head):  # convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def main():
    model, dump = sys.argv[1], sys.argv[2]
    ours = read_safetensors(dump)
    r = GGUFReader(model)
    worst = {}
    for t in r.tensors:
        ref = dequantize(t.data, t.tensor_type).astype(np.float32)
        mine = ours[t.name]
        assert mine.shape == ref.shape, (t.name, mine.shape, ref.shape)
        d = float(np.max(np.abs(mine - ref))) if ref.size else 0.0
        k = t.tensor_type.name
        if d >= worst.get(k, (-1.0, ""))[0]:
            worst[k] = (d, t.name)
    print(f"{len(r.tensors)} tensors compared")
    for k, (d, name) in sorted(worst.items()):
        print(f"  {k}: max |genrec - gguf.quants| = {d:.3g} (at {name})")
    n_head = int(r.fields["llama.attention.head_count"].contents())
    n_kv = int(r.fields["llama.attention.head_count_kv"].contents())
    for proj, gname, h in [("q_proj", "blk.0.attn_q.weight", n_head), ("k_proj", "blk.0.attn_k.weight", n_kv)]:
        hf = ours[f"hf.model.layers.0.self_attn.{proj}.weight"]
        d = float(np.max(np.abs(permute(hf, h) - ours[gname])))
        print(f"  permute(genrec HF {proj}, {h}) vs GGUF rows: max abs diff {d:.3g}")
    ok = all(d == 0.0 for d, _ in worst.values())
    print("OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
