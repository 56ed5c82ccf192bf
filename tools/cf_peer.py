#!/usr/bin/env python3
"""PyTorch peer of `genrec cf`: SASRec, LightGCN and BPR-MF built the way genrec builds them,
trained on genrec's own prepared dataset and evaluated with the same protocol, so the two
implementations can be compared number for number (docs/BENCHMARKS.md, "CF baselines").

It mirrors src/cf/{sasrec,lightgcn,mf}.rs and src/eval:
- data: `<cache>/prepared/ml-100k-loo` (arrays.safetensors: offsets, items, split; 0 train,
  1 valid, 2 test), eval cases = the user's earlier items (history truncated to the last
  `max_history` for SASRec's input, all earlier items for masking), targets of the split;
- SASRec (pmixer/SASRec.pytorch layout): item embedding * sqrt(d) + learned positions, dropout,
  `blocks` x [q = LN(x); x = q + MHA(q, x, x) causal; x = LN(x); x = x + FFN(x)], final LN, logits
  = h @ item_emb^T, cross-entropy over all items at every position; training windows of
  max_len + 1 overlapping by one; AdamW (0.9, 0.98), grad-norm clip 5;
- LightGCN: symmetric D^-1/2 A D^-1/2 over users+items, layer mean, BPR on (u, i, j) with a
  uniform negative among unseen items, + l2/B * squared norm of the batch's ego embeddings; Adam;
  MF = the same with 0 layers;
- metrics: full ranking over all items, higher score first, ties to the lower item id; Recall@K and
  NDCG@K for K in 5/10/20; "history masked" removes every earlier item of the user.
- early stopping on validation NDCG@10 (main protocol) every `--eval-every` epochs, `--patience`
  evaluations, best weights restored; the JSON report has genrec's `--report` layout, so
  tools/cf_baseline_table.py reads both.

usage: tools/cf_peer.py --model sasrec|lightgcn|mf [--seed S] [--lr X] [--batch-size N]
                        [--epochs E] [--patience P] [--eval-every K] [--max-train-minutes M]
                        [--report out.json]
       tools/cf_peer.py --selfcheck      (metric code vs hand-computed cases)
Needs torch, numpy, safetensors. Single-threaded by default (`--threads`), to share a small machine.
"""
import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

KS = [5, 10, 20]


# ---------------------------------------------------------------- data


def load_prepared(path):
    from safetensors.numpy import load_file

    a = load_file(os.path.join(path, "arrays.safetensors"))
    man = json.load(open(os.path.join(path, "manifest.json")))
    off, items, split = a["offsets"].astype(np.int64), a["items"].astype(np.int64), a["split"].astype(np.int64)
    n_users, n_items = man["n_users"], man["n_items"]
    max_history = man["options"]["max_history"]
    users = []
    for u in range(n_users):
        s, e = off[u], off[u + 1]
        users.append((items[s:e], split[s:e]))
    return users, n_users, n_items, max_history


def train_sequence(users, u):
    it, sp = users[u]
    return it[sp == 0].tolist()


def eval_cases(users, which, max_history):
    """which: 1 valid, 2 test. (user, history[-max_history:], seen (sorted unique), targets)."""
    out = []
    for u, (it, sp) in enumerate(users):
        hist = it[sp < which].tolist()
        targets = []
        for x in it[sp == which].tolist():
            if x not in targets:
                targets.append(x)
        if not targets:
            continue
        seen = sorted(set(hist))
        out.append((u, hist[-max_history:] if max_history else hist, seen, targets))
    return out


# ---------------------------------------------------------------- metrics


def rank_metrics(scores, seen, targets, exclude_history):
    """scores: 1-D float64 numpy over all items. Returns {recall@K, ndcg@K}."""
    s = scores.copy()
    if exclude_history and seen:
        s[np.asarray(seen)] = -np.inf
    n = len(s)
    ids = np.arange(n)
    ranks = []
    for t in targets:
        st = s[t]
        ranks.append(int(np.sum(s > st) + np.sum((s == st) & (ids < t))))
    out = {}
    for k in KS:
        hits = [r for r in ranks if r < k]
        out[f"recall@{k}"] = len(hits) / len(targets)
        dcg = sum(1.0 / math.log2(r + 2) for r in hits)
        idcg = sum(1.0 / math.log2(i + 2) for i in range(min(len(targets), k)))
        out[f"ndcg@{k}"] = dcg / idcg
    return out


def mean_metrics(rows):
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def selfcheck():
    s = np.array([0.1, 0.9, 0.5, 0.9, 0.3])
    # target 3 ties with item 1 (lower id wins): rank 1 -> NDCG 1/log2(3)
    m = rank_metrics(s, [], [3], False)
    assert abs(m["ndcg@5"] - 1 / math.log2(3)) < 1e-12 and m["recall@5"] == 1.0, m
    # masking item 1 moves target 3 to rank 0
    m = rank_metrics(s, [1], [3], True)
    assert abs(m["ndcg@5"] - 1.0) < 1e-12, m
    # target 0 is last (rank 4): inside @5, NDCG 1/log2(6)
    m = rank_metrics(s, [], [0], False)
    assert abs(m["ndcg@5"] - 1 / math.log2(6)) < 1e-12, m
    print("cf_peer selfcheck: ok")


# ---------------------------------------------------------------- SASRec


class SasRec(nn.Module):
    def __init__(self, n_items, d=64, blocks=2, heads=1, max_len=20, dropout=0.2):
        super().__init__()
        self.n_items, self.d, self.max_len = n_items, d, max_len
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=n_items)  # row n_items = padding
        self.pos_emb = nn.Embedding(max_len, d)
        nn.init.normal_(self.item_emb.weight, std=0.05)
        nn.init.normal_(self.pos_emb.weight, std=0.05)
        with torch.no_grad():
            self.item_emb.weight[n_items].zero_()
        self.drop = nn.Dropout(dropout)
        self.ln_attn = nn.ModuleList([nn.LayerNorm(d, eps=1e-8) for _ in range(blocks)])
        self.attn = nn.ModuleList([nn.MultiheadAttention(d, heads, batch_first=True) for _ in range(blocks)])
        self.ln_ffn = nn.ModuleList([nn.LayerNorm(d, eps=1e-8) for _ in range(blocks)])
        self.ff1 = nn.ModuleList([nn.Linear(d, d) for _ in range(blocks)])
        self.ff2 = nn.ModuleList([nn.Linear(d, d) for _ in range(blocks)])
        self.ln_final = nn.LayerNorm(d, eps=1e-8)

    def encode(self, ids):
        """ids: [B, L] left-padded with n_items. -> [B, L, d]"""
        b, l = ids.shape
        pad = ids == self.n_items
        x = self.item_emb(ids) * math.sqrt(self.d) + self.pos_emb.weight[None, :l]
        x = self.drop(x)
        causal = torch.triu(torch.ones(l, l, dtype=torch.bool), 1)
        # A fully padded query row would see nothing: let it see itself (its output is unused).
        key_mask = pad.clone()
        for i in range(len(self.attn)):
            q = self.ln_attn[i](x)
            mask = causal[None] | key_mask[:, None, :]
            mask = mask & ~torch.eye(l, dtype=torch.bool)[None]
            mask = mask.repeat_interleave(self.attn[i].num_heads, 0)
            a, _ = self.attn[i](q, x, x, attn_mask=mask, need_weights=False)
            x = q + self.drop(a)
            x = self.ln_ffn[i](x)
            h = self.drop(F.relu(self.ff1[i](x)))
            x = x + self.drop(self.ff2[i](h))
        return self.ln_final(x)

    def logits(self, h):
        return h @ self.item_emb.weight[: self.n_items].T


def left_pad(seqs, l, pad):
    out = torch.full((len(seqs), l), pad, dtype=torch.long)
    for r, s in enumerate(seqs):
        s = s[-l:]
        if s:
            out[r, l - len(s):] = torch.tensor(s)
    return out


def sasrec_windows(users, n_users, l):
    seqs = []
    for u in range(n_users):
        s = train_sequence(users, u)
        end = len(s)
        while end >= 2:
            start = max(0, end - (l + 1))
            seqs.append(s[start:end])
            if start == 0:
                break
            end = start + 1
    return seqs


# ---------------------------------------------------------------- LightGCN / MF


class LightGcn(nn.Module):
    def __init__(self, users, n_users, n_items, d=64, layers=3):
        super().__init__()
        self.nu, self.ni, self.layers = n_users, n_items, layers
        self.train_sets = [set(train_sequence(users, u)) for u in range(n_users)]
        n = n_users + n_items
        deg = np.zeros(n)
        for u, s in enumerate(self.train_sets):
            deg[u] += len(s)
            for i in s:
                deg[n_users + i] += 1
        rows, cols, vals = [], [], []
        for u, s in enumerate(self.train_sets):
            for i in s:
                j = n_users + i
                w = 1.0 / (math.sqrt(deg[u]) * math.sqrt(deg[j]))
                rows += [u, j]
                cols += [j, u]
                vals += [w, w]
        self.adj = torch.sparse_coo_tensor(torch.tensor([rows, cols]), torch.tensor(vals, dtype=torch.float32), (n, n)).coalesce()
        self.emb = nn.Parameter(torch.randn(n, d) * 0.1)
        self.pairs = [(u, i) for u, s in enumerate(self.train_sets) for i in s]

    def propagate(self):
        e = self.emb
        acc = e
        for _ in range(self.layers):
            e = torch.sparse.mm(self.adj, e)
            acc = acc + e
        return acc / (self.layers + 1)

    def loss(self, trip, l2):
        fin = self.propagate()
        u, i, j = trip[:, 0], self.nu + trip[:, 1], self.nu + trip[:, 2]
        eu, ei, ej = fin[u], fin[i], fin[j]
        sp, sn = (eu * ei).sum(1), (eu * ej).sum(1)
        bpr = F.softplus(sn - sp).mean()
        reg = (self.emb[u].pow(2).sum() + self.emb[i].pow(2).sum() + self.emb[j].pow(2).sum()) * l2 / len(trip)
        return bpr + reg


# ---------------------------------------------------------------- training / evaluation


def evaluate(model, kind, cases, exclude_history, n_items, max_len):
    model.eval()
    rows = []
    with torch.no_grad():
        if kind == "sasrec":
            for c0 in range(0, len(cases), 256):
                chunk = cases[c0 : c0 + 256]
                ids = left_pad([c[1] for c in chunk], max_len, n_items)
                h = model.encode(ids)[:, -1]
                sc = model.logits(h).double().numpy()
                for r, c in enumerate(chunk):
                    rows.append(rank_metrics(sc[r], c[2], c[3], exclude_history))
        else:
            fin = model.propagate()
            ue, ie = fin[: model.nu], fin[model.nu :]
            sc_all = (ue @ ie.T).double().numpy()
            for c in cases:
                rows.append(rank_metrics(sc_all[c[0]], c[2], c[3], exclude_history))
    model.train()
    return mean_metrics(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["sasrec", "lightgcn", "mf"])
    ap.add_argument("--data", default=os.path.join(os.environ.get("GENREC_CACHE", os.path.expanduser("~/.cache/genrec")), "prepared", "ml-100k-loo"))
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--eval-every", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-train-minutes", type=float, help="stop at the first epoch end after this many minutes")
    ap.add_argument("--report")
    ap.add_argument("--selfcheck", action="store_true")
    a = ap.parse_args()
    if a.selfcheck:
        selfcheck()
        return
    if not a.model:
        ap.error("--model is required")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    np.random.seed(a.seed)
    users, n_users, n_items, max_history = load_prepared(a.data)
    valid, test = eval_cases(users, 1, max_history), eval_cases(users, 2, max_history)
    kind = a.model
    main_masked = kind != "sasrec"
    if kind == "sasrec":
        lr, bs = a.lr or 1e-3, a.batch_size or 128
        max_len = max(1, max_history)
        model = SasRec(n_items, d=a.dim, max_len=max_len)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)
        windows = sasrec_windows(users, n_users, max_len)
        config = {"d_model": a.dim, "blocks": 2, "heads": 1, "max_len": max_len, "dropout": 0.2, "lr": lr, "batch_size": bs}
    else:
        lr, bs = a.lr or 1e-3, a.batch_size or 2048
        max_len = 0
        layers = 3 if kind == "lightgcn" else 0
        model = LightGcn(users, n_users, n_items, d=a.dim, layers=layers)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        config = {"d": a.dim, "layers": layers, "l2": 1e-4, "lr": lr, "batch_size": bs}
    rng = random.Random(a.seed)
    best, best_state, since, log, train_secs, stopped = None, None, 0, [], 0.0, "max epochs"
    epochs_done = 0
    t_start = time.time()
    for epoch in range(a.epochs):
        t0 = time.time()
        losses = []
        if kind == "sasrec":
            order = list(range(len(windows)))
            rng.shuffle(order)
            for b0 in range(0, len(order), bs):
                batch = [windows[k] for k in order[b0 : b0 + bs]]
                ids = left_pad([s[:-1] for s in batch], max_len, n_items)
                tgt = left_pad([s[1:] for s in batch], max_len, -100)
                h = model.encode(ids)
                loss = F.cross_entropy(model.logits(h).reshape(-1, n_items), tgt.reshape(-1), ignore_index=-100)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                opt.step()
                losses.append(loss.item())
        else:
            order = list(range(len(model.pairs)))
            rng.shuffle(order)
            for b0 in range(0, len(order), bs):
                trip = []
                for k in order[b0 : b0 + bs]:
                    u, i = model.pairs[k]
                    j = rng.randrange(n_items)
                    while j in model.train_sets[u] and len(model.train_sets[u]) < n_items:
                        j = rng.randrange(n_items)
                    trip.append((u, i, j))
                loss = model.loss(torch.tensor(trip), 1e-4)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        train_secs += time.time() - t0
        epochs_done = epoch + 1
        entry = {"epoch": epoch + 1, "loss": float(np.mean(losses))}
        if (epoch + 1) % a.eval_every == 0:
            v = evaluate(model, kind, valid, main_masked, n_items, max_len)["ndcg@10"]
            entry["valid_ndcg10"] = v
            if best is None or v > best[1]:
                best, since = (epoch + 1, v), 0
                best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
            else:
                since += 1
            print(f"{kind} seed {a.seed} epoch {epoch + 1}: loss {entry['loss']:.4f} valid NDCG@10 {v:.4f} (best {best[1]:.4f} @ {best[0]})", flush=True)
            if a.patience and since >= a.patience:
                stopped = "patience"
                log.append(entry)
                break
        log.append(entry)
        if a.max_train_minutes and time.time() - t_start > 60 * a.max_train_minutes:
            stopped = "time budget"
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    tests = {
        "all_items": evaluate(model, kind, test, False, n_items, max_len),
        "history_masked": evaluate(model, kind, test, True, n_items, max_len),
    }
    print(json.dumps(tests["history_masked" if main_masked else "all_items"], indent=1))
    report = {
        "model": kind,
        "implementation": f"PyTorch {torch.__version__} (tools/cf_peer.py), CPU, {a.threads} thread(s)",
        "dataset": os.path.basename(a.data.rstrip("/")),
        "seed": a.seed,
        "config": config,
        "epochs_trained": epochs_done,
        "train_seconds": train_secs,
        "seconds_per_epoch": train_secs / max(1, epochs_done),
        "best_epoch": best[0] if best else None,
        "best_valid_ndcg10": best[1] if best else None,
        "stopped_by": stopped,
        "main_protocol_history_masked": main_masked,
        "test": tests,
        "epochs": log,
    }
    if a.report:
        tmp = a.report + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, a.report)


if __name__ == "__main__":
    main()
