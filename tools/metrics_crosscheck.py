#!/usr/bin/env python3
"""Cross-check genrec's Recall@K / NDCG@K against RecBole's formulas (numpy only).

Input: a JSON file written by `cargo run --example metrics_fixture -- FILE` with
  n_items, ks, cases [{user, seen, targets}], scores [[n_items floats] per case].
Output: the same file with "expected" added:
  {"exclude_history=false": {"Recall@5": mean, ...}, "exclude_history=true": {...}}

Formulas: RecBole 1.2.1, recbole/evaluator/metrics.py
  Recall.metric_info:  np.cumsum(pos_index, axis=1) / pos_len
  NDCG.metric_info:    idcg_len = min(pos_len, max_k); idcg = cumsum(1/log2(rank+1)) held
                       constant after idcg_len; dcg = cumsum(where(pos_index, 1/log2(rank+1), 0));
                       result = dcg / idcg
  TopkMetric.topk_result: mean over users of column k-1.
pos_index comes from RecBole's full-sort collector: history items get -inf
(only when excluding history), then top-max(k) by score. RecBole uses
torch.topk, whose tie order is unspecified; here ties go to the lower item id
(np.argsort(-scores, kind="stable")), which is genrec's documented rule.
"""
import json
import sys

import numpy as np


def recbole_metrics(scores, cases, ks, exclude_history):
    max_k = max(ks)
    pos_index = np.zeros((len(cases), max_k), dtype=bool)
    pos_len = np.zeros(len(cases), dtype=np.int64)
    for r, case in enumerate(cases):
        s = np.asarray(scores[r], dtype=np.float64).copy()
        if exclude_history and case["seen"]:
            s[np.asarray(case["seen"], dtype=np.int64)] = -np.inf
        order = np.argsort(-s, kind="stable")[:max_k]
        targets = set(case["targets"])
        pos_index[r] = [int(i) in targets for i in order]
        pos_len[r] = len(targets)

    # Recall (RecBole Recall.metric_info)
    recall = np.cumsum(pos_index, axis=1) / pos_len.reshape(-1, 1)

    # NDCG (RecBole NDCG.metric_info, with np.float -> float)
    len_rank = np.full_like(pos_len, pos_index.shape[1])
    idcg_len = np.where(pos_len > len_rank, len_rank, pos_len)
    iranks = np.zeros_like(pos_index, dtype=float)
    iranks[:, :] = np.arange(1, pos_index.shape[1] + 1)
    idcg = np.cumsum(1.0 / np.log2(iranks + 1), axis=1)
    for row, idx in enumerate(idcg_len):
        idcg[row, idx:] = idcg[row, idx - 1]
    ranks = np.zeros_like(pos_index, dtype=float)
    ranks[:, :] = np.arange(1, pos_index.shape[1] + 1)
    dcg = 1.0 / np.log2(ranks + 1)
    dcg = np.cumsum(np.where(pos_index, dcg, 0), axis=1)
    ndcg = dcg / idcg

    out = {}
    for k in ks:
        out[f"Recall@{k}"] = float(recall.mean(axis=0)[k - 1])
    for k in ks:
        out[f"NDCG@{k}"] = float(ndcg.mean(axis=0)[k - 1])
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: metrics_crosscheck.py FIXTURE.json  (adds 'expected' in place)")
    path = sys.argv[1]
    with open(path) as f:
        doc = json.load(f)
    doc["expected"] = {
        f"exclude_history={str(ex).lower()}": recbole_metrics(doc["scores"], doc["cases"], doc["ks"], ex)
        for ex in (False, True)
    }
    with open(path, "w") as f:
        json.dump(doc, f)
    print(json.dumps(doc["expected"], indent=1))


if __name__ == "__main__":
    main()
