#!/usr/bin/env python3
"""Peer timings for genrec's quantization benchmarks (benches/quant.rs) on this CPU.

Same shapes: nearest codeword for 100k x 32 vs 256 codes and 1M x 64 vs 4096
codes (scikit-learn's pairwise_distances_argmin_min, BLAS-backed; faiss-cpu's
IndexFlatL2 when installed), and Lloyd k-means iteration time for 100k x 32,
k = 256 (scikit-learn KMeans, algorithm="lloyd", fixed init, tol = 0).
Prints one JSON object per measurement. Usage:
    pip install scikit-learn [faiss-cpu]
    python3 tools/quant_peer_bench.py [--big-rows N]
"""
import argparse
import json
import time

import numpy as np


def report(name, **fields):
    print(json.dumps({"bench": name, **fields}))


def nearest_sklearn(x, e, name):
    from sklearn.metrics import pairwise_distances_argmin_min

    pairwise_distances_argmin_min(x[:1024], e)
    t = time.perf_counter()
    pairwise_distances_argmin_min(x, e)
    s = time.perf_counter() - t
    n, d = x.shape
    report(f"sklearn_{name}", seconds=s, vectors_per_s=n / s, gflops=2.0 * n * e.shape[0] * d / s / 1e9)


def nearest_faiss(x, e, name):
    try:
        import faiss
    except ImportError:
        report(f"faiss_{name}", skipped="faiss-cpu not installed")
        return
    index = faiss.IndexFlatL2(e.shape[1])
    index.add(e)
    index.search(x[:1024], 1)
    t = time.perf_counter()
    index.search(x, 1)
    s = time.perf_counter() - t
    n, d = x.shape
    report(f"faiss_{name}", seconds=s, vectors_per_s=n / s, gflops=2.0 * n * e.shape[0] * d / s / 1e9)


def kmeans_sklearn(x, k, iters):
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, init=x[:k], n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd")
    t = time.perf_counter()
    km.fit(x)
    s = time.perf_counter() - t
    report(f"sklearn_kmeans_{x.shape[0]}x{x.shape[1]}_k{k}", iterations=int(km.n_iter_),
           seconds_per_iteration=s / km.n_iter_)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--big-rows", type=int, default=1_000_000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (100_000, 32)).astype(np.float32)
    e = rng.uniform(-1, 1, (256, 32)).astype(np.float32)
    nearest_sklearn(x, e, "nearest_100000x32_vs_256")
    nearest_faiss(x, e, "nearest_100000x32_vs_256")
    kmeans_sklearn(x, 256, 10)
    xb = rng.uniform(-1, 1, (args.big_rows, 64)).astype(np.float32)
    eb = rng.uniform(-1, 1, (4096, 64)).astype(np.float32)
    nearest_sklearn(xb, eb, f"nearest_{args.big_rows}x64_vs_4096")
    nearest_faiss(xb, eb, f"nearest_{args.big_rows}x64_vs_4096")


if __name__ == "__main__":
    main()
