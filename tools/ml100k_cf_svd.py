#!/usr/bin/env python3
"""32-d CF item embeddings for the tokenizer benchmark on a genrec-prepared
dataset: truncated SVD of the binary user x item matrix of the TRAINING
interactions (split == 0), item factors V * sqrt(S). Rows follow the prepared
dataset's dense item ids, like genrec's MiniLM item-embedding cache.

This stands in for LETTER's SASRec item embeddings (not exported by genrec's
CLI yet); the benchmark says so.

Usage: /work/pyref/bin/python tools/ml100k_cf_svd.py <prepared dir> <out.safetensors> [dim]
"""
import json
import os
import sys

import numpy as np
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file


def main():
    prep, out = sys.argv[1], sys.argv[2]
    dim = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    arr = load_file(os.path.join(prep, "arrays.safetensors"))
    man = json.load(open(os.path.join(prep, "manifest.json")))
    n_users, n_items = man["n_users"], man["n_items"]
    items, offsets, split = arr["items"].astype(np.int64), arr["offsets"], arr["split"]
    m = np.zeros((n_users, n_items), dtype=np.float64)
    for u in range(n_users):
        for j in range(offsets[u], offsets[u + 1]):
            if split[j] == 0:
                m[u, items[j]] = 1.0
    u_, s, vt = np.linalg.svd(m, full_matrices=False)
    emb = np.ascontiguousarray((vt[:dim].T * np.sqrt(s[:dim])).astype(np.float32))
    save_file({"cf": torch.from_numpy(emb)}, out, metadata={"source": "truncated SVD of train interactions", "dim": str(dim)})
    print(f"wrote {out}: {emb.shape}, mean row norm {np.linalg.norm(emb, axis=1).mean():.3f}")


if __name__ == "__main__":
    main()
