#!/usr/bin/env python3
"""Parity fixture for genrec's LETTER / RQ-VAE tokenizer (issue 5).

Reproduces, in PyTorch on the CPU, ONE training step of the LETTER tokenizer
as the authors' published code computes it (HonghuiBao2000/LETTER, commit
0d4a115, RQ-VAE/models/{vq,rq,rqvae}.py and trainer.py), written from scratch
from the semantics documented in /work/shared/papers/letter.spec.md:

- MLP encoder/decoder (Xavier-normal weights, zero biases, ReLU except after
  the last layer; the decoder mirrors the encoder sizes).
- Residual quantisation. Level l: squared distances |r|^2 + |e|^2 - 2 r.e;
  argmin codes on levels < L-1; on the last level Sinkhorn-Knopp on the
  min-max-centred distances (eps 0.003, 50 iterations, float64) and the row
  argmax of the plan. The straight-through output x_res = r + sg(e - r) is what
  the next residual is computed from (r_next = r - x_res), so gradients reach
  the encoder only through level 0's identity path.
- Per-level loss = mse(e, sg r) + mu * mse(sg e, r) + beta * diversity, where
  diversity = CE over logits e_c . E^T with the own code's logit lowered by
  1e12 and a same-cluster positive; the levels are averaged.
- Total = mse(dec(x_q), x) + mean_l(level loss) + alpha * CE(x_q h^T, diag).
- One AdamW step (lr 1e-3, weight decay 1e-4, PyTorch defaults otherwise).

The cluster labels and the positives are inputs (the Rust test feeds the same
ones), so both sides are deterministic. alpha and beta are larger than LETTER's
defaults (0.02 / 1e-4) so every term visibly moves the gradients.

A second fixture, step_pure.safetensors, uses the "pure math" straight-through
variant (genrec's `st_chain = false`): the next residual is r - e (gradient
kept) and x_q = z + sg(sum_l e_l - z), so every level's commitment term reaches
the encoder and the earlier codebooks. Same weights, batch and draws.

Run:  /work/pyref/bin/python tools/letter_rqvae_parity.py
Writes tests/fixtures/letter_rqvae/{step,step_pure}.safetensors (all f32).
"""
import os
import random

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

IN_DIM, HIDDEN, E_DIM = 24, [16, 8], 4
LEVELS, N_CODES, BATCH = 3, 8, 12
MU, ALPHA, BETA = 0.25, 0.1, 0.1
LR, WD = 1e-3, 1e-4
SK_EPS, SK_ITERS = 0.003, 50
SEED = 1234

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "letter_rqvae")


def make_mlp(dims, prefix, params):
    """Linear layers dims[i] -> dims[i+1]; weights [out, in] Xavier-normal, zero bias."""
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        w = torch.empty(b, a)
        torch.nn.init.xavier_normal_(w)
        w.requires_grad_(True)
        bias = torch.zeros(b, requires_grad=True)
        params[f"{prefix}.{i}.weight"] = w
        params[f"{prefix}.{i}.bias"] = bias
        layers.append((w, bias))
    return layers


def run_mlp(x, layers):
    for i, (w, b) in enumerate(layers):
        x = x @ w.t() + b
        if i + 1 < len(layers):
            x = torch.relu(x)
    return x


def sq_dists(r, e):
    # [B, N] = |r|^2 + |e|^2 - 2 r e^T, in f32 as the reference computes it
    return (r**2).sum(1, keepdim=True) + (e**2).sum(1, keepdim=True).t() - 2 * r @ e.t()


def sinkhorn_plan(dist, eps, iters):
    """Min-max centring to [-1, 1] (f32), then Sinkhorn-Knopp in float64."""
    hi, lo = dist.max(), dist.min()
    mid = (hi + lo) / 2
    amp = hi - mid + 1e-5
    c = ((dist - mid) / amp).double()
    q = torch.exp(-c / eps)
    q = q / q.sum()
    n, k = q.shape
    for _ in range(iters):
        q = q / q.sum(1, keepdim=True) / n
        q = q / q.sum(0, keepdim=True) / k
    return q * n


def main(pure):
    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    params = {}
    dims = [IN_DIM] + HIDDEN + [E_DIM]
    enc = make_mlp(dims, "encoder", params)
    dec = make_mlp(dims[::-1], "decoder", params)
    x = torch.randn(BATCH, IN_DIM)
    h = torch.randn(BATCH, E_DIM)
    with torch.no_grad():
        z0 = run_mlp(x, enc)
        scale = z0.std().item()
    books = []
    for l in range(LEVELS):
        cb = (torch.randn(N_CODES, E_DIM) * scale * (0.6**l)).requires_grad_(True)
        params[f"codebook.{l}"] = cb
        books.append(cb)
    # Diversity clusters of each codebook: 3 clusters of sizes 3, 3, 2.
    labels = []
    for l in range(LEVELS):
        lab = [0, 0, 0, 1, 1, 1, 2, 2]
        rng.shuffle(lab)
        labels.append(lab)

    init = {k: v.detach().clone() for k, v in params.items()}

    z = run_mlp(x, enc)
    r = z
    xq = 0
    codes, positives, level_losses = [], [], []
    parts = {}
    margins = []
    for l in range(LEVELS):
        e = books[l]
        d = sq_dists(r, e)
        if l + 1 < LEVELS:
            idx = torch.argmin(d, dim=-1)
            srt = torch.sort(d.detach(), dim=-1).values
            margins.append(("argmin", l, (srt[:, 1] - srt[:, 0]).min().item()))
        else:
            q = sinkhorn_plan(d.detach(), SK_EPS, SK_ITERS)
            idx = torch.argmax(q, dim=-1)
            srt = torch.sort(q, dim=-1, descending=True).values
            margins.append(("sinkhorn", l, (srt[:, 0] - srt[:, 1]).min().item()))
        codes.append(idx)
        eq = e[idx]
        # same-cluster positive, uniform, never the code itself
        pos = []
        for c in idx.tolist():
            members = [j for j in range(N_CODES) if labels[l][j] == labels[l][c] and j != c]
            pos.append(rng.choice(members))
        pos = torch.tensor(pos)
        positives.append(pos)
        sim = eq @ e.t() - 1e12 * F.one_hot(idx, N_CODES).float()
        div = F.cross_entropy(sim, pos)
        cmt = F.mse_loss(eq.detach(), r)
        cbk = F.mse_loss(eq, r.detach())
        parts[f"loss_cb.{l}"] = cbk
        parts[f"loss_cm.{l}"] = cmt
        parts[f"loss_div.{l}"] = div
        level_losses.append(cbk + MU * cmt + BETA * div)
        if pure:
            r = r - eq
            xq = xq + eq
        else:
            xres = r + (eq - r).detach()
            r = r - xres
            xq = xq + xres
    if pure:
        xq = z + (xq - z).detach()
    quant = torch.stack(level_losses).mean()
    out = run_mlp(xq, dec)
    recon = F.mse_loss(out, x)
    cf = F.cross_entropy(xq @ h.t(), torch.arange(BATCH))
    total = recon + quant + ALPHA * cf
    total.backward()

    for kind, l, m in margins:
        print(f"level {l} {kind} margin {m:.3e}")
        assert m > 1e-3, "ambiguous code choice: pick another SEED"

    grads = {k: v.grad.detach().clone() for k, v in params.items()}
    opt = torch.optim.AdamW(list(params.values()), lr=LR, weight_decay=WD)
    opt.step()

    t = {}
    t["x"] = x
    t["cf"] = h
    for k, v in init.items():
        t[f"init.{k}"] = v
    for k, v in grads.items():
        t[f"grad.{k}"] = v
    for k, v in params.items():
        t[f"new.{k}"] = v.detach()
    t["labels"] = torch.tensor(labels, dtype=torch.float32)  # [L, N]
    t["positives"] = torch.stack(positives).float()  # [L, B]
    t["codes"] = torch.stack(codes, dim=1).float()  # [B, L]
    t["z"] = z.detach()
    t["xq"] = xq.detach()
    t["loss_total"] = total.detach().reshape(1)
    t["loss_recon"] = recon.detach().reshape(1)
    t["loss_cf"] = cf.detach().reshape(1)
    t["loss_quant"] = quant.detach().reshape(1)
    for k, v in parts.items():
        t[k] = v.detach().reshape(1)
    t = {k: v.contiguous().float() for k, v in t.items()}
    os.makedirs(OUT, exist_ok=True)
    meta = {
        "in_dim": str(IN_DIM),
        "hidden": ",".join(map(str, HIDDEN)),
        "e_dim": str(E_DIM),
        "levels": str(LEVELS),
        "n_codes": str(N_CODES),
        "mu": str(MU),
        "alpha": str(ALPHA),
        "beta": str(BETA),
        "lr": str(LR),
        "weight_decay": str(WD),
        "sk_eps": str(SK_EPS),
        "sk_iters": str(SK_ITERS),
        "generator": "tools/letter_rqvae_parity.py",
    }
    meta["st_chain"] = str(not pure)
    path = os.path.join(OUT, "step_pure.safetensors" if pure else "step.safetensors")
    save_file(t, path, metadata=meta)
    print(f"codes {t['codes'].long().tolist()}")
    print(f"losses total {total.item():.6f} recon {recon.item():.6f} quant {quant.item():.6f} cf {cf.item():.6f}")
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    for pure in (False, True):
        np.random.seed(SEED)
        main(pure)
