#!/usr/bin/env python3
"""Golden values for pipeline-train (stages/train/tests/golden.rs), computed by the reference
implementations themselves:
  * torch.optim.AdamW and torch.nn.utils.clip_grad_norm_ (float32, CPU), parameter groups with
    weight decay on matrices only (what our trainer does);
  * transformers' get_{cosine,linear,constant,constant_with_warmup}_schedule_with_warmup lr lambdas
    (warmup steps = ceil(total * warmup_ratio) unless warmup_steps is given, as TrainingArguments);
  * TRL's DPO loss (loss_type="sigmoid", label_smoothing, rpo_alpha) and KTO loss written in
    PyTorch on the same per-token log-probs (float64), with gradients from torch.autograd.

Run (torch + transformers; /work/venv-arch has both):
  python3 -m venv /tmp/v && /tmp/v/bin/pip install torch transformers numpy && /tmp/v/bin/python scripts/oracles/train_golden.py
Writes stages/train/tests/data/train_golden.json.
"""
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import (get_constant_schedule, get_constant_schedule_with_warmup,
                          get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup)

torch.set_num_threads(1)


# ---------------------------------------------------------------- schedules (transformers)
def warmup_steps(total, warmup_ratio, warmup_steps_arg):
    return warmup_steps_arg if warmup_steps_arg > 0 else math.ceil(total * warmup_ratio)


def lam(kind, step, w, n):
    """transformers' own lr lambda for the schedule `kind` (warm-up `w`, total `n`) at `step`."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = {
        "constant": lambda: get_constant_schedule(opt),
        "constant_with_warmup": lambda: get_constant_schedule_with_warmup(opt, w),
        "linear": lambda: get_linear_schedule_with_warmup(opt, w, n),
        "cosine": lambda: get_cosine_schedule_with_warmup(opt, w, n),
    }[kind]()
    return float(sched.lr_lambdas[0](step))


schedules = []
for kind in ["cosine", "linear", "constant", "constant_with_warmup"]:
    for total, ratio, wsteps in [(10, 0.0, 0), (10, 0.1, 0), (37, 0.05, 0), (20, 0.5, 3), (1, 0.5, 0)]:
        w = warmup_steps(total, ratio, wsteps)
        schedules.append({
            "kind": kind, "total_steps": total, "warmup_ratio": ratio, "warmup_steps_arg": wsteps,
            "warmup_steps": w, "factors": [lam(kind, s, w, total) for s in range(total + 2)],
        })


# ---------------------------------------------------------------- AdamW + clipping (torch)
def grad_at(step, shape, k):
    n = int(np.prod(shape))
    i = np.arange(n, dtype=np.float64)
    return (np.sin(0.7 * i + 1.3 * step + k) * (1.0 + 0.5 * k) * (3.0 if step % 3 == 0 else 0.5)).astype(np.float32).reshape(shape)


adamw_cases = []
for case in [
    dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, max_grad_norm=1.0, kind="cosine", total=8, warmup_ratio=0.25),
    dict(lr=3e-3, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1, max_grad_norm=0.0, kind="linear", total=6, warmup_ratio=0.0),
    dict(lr=5e-2, beta1=0.3, beta2=0.9, eps=1e-8, weight_decay=0.5, max_grad_norm=100.0, kind="constant", total=5, warmup_ratio=0.0),
]:
    names = ["layer.weight", "layer.bias", "norm.weight"]
    shapes = [(3, 4), (4,), (5,)]
    params = [torch.nn.Parameter(torch.from_numpy(np.cos(np.arange(np.prod(s)) * 0.37 + k).astype(np.float32).reshape(s)))
              for k, s in enumerate(shapes)]
    init = [p.detach().numpy().copy() for p in params]
    # bias and norm weights: no decay (our trainer's default groups)
    opt = torch.optim.AdamW([{"params": [params[0]], "weight_decay": case["weight_decay"]},
                             {"params": params[1:], "weight_decay": 0.0}],
                            lr=case["lr"], betas=(case["beta1"], case["beta2"]), eps=case["eps"], foreach=False)
    w = warmup_steps(case["total"], case["warmup_ratio"], 0)
    steps = []
    for s in range(case["total"]):
        grads = [grad_at(s, sh, k) for k, sh in enumerate(shapes)]
        raw = [g.reshape(-1).tolist() for g in grads]
        for p, g in zip(params, grads):
            p.grad = torch.from_numpy(g.copy())
        max_norm = case["max_grad_norm"] if case["max_grad_norm"] > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False))
        lr = case["lr"] * lam(case["kind"], s, w, case["total"])
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        steps.append({"lr": lr, "grads": raw, "grad_norm": norm, "params": [p.detach().numpy().reshape(-1).tolist() for p in params]})
    adamw_cases.append({**case, "names": names, "shapes": [list(s) for s in shapes],
                        "init": [p.reshape(-1).tolist() for p in init], "steps": steps})


# ---------------------------------------------------------------- DPO (TRL, sigmoid) and KTO, in torch
def dpo(tok, mask, ref, beta, eps, rpo):
    """TRL DPOTrainer.dpo_loss (sigmoid) [+ rpo_alpha * NLL of the chosen], on per-token log-probs."""
    rows, _ = tok.shape
    n = rows // 2
    t = torch.tensor(tok, dtype=torch.float64, requires_grad=True)
    m = torch.tensor(mask, dtype=torch.float64)
    r = torch.tensor(ref, dtype=torch.float64)
    seq = (t * m).sum(1)
    pc, pr, rc, rr = seq[:n], seq[n:], r[:n], r[n:]
    logits = (pc - pr) - (rc - rr)
    losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    loss = losses.mean()
    metrics = {}
    if rpo is not None:
        cm = m.clone()
        cm[n:] = 0
        nll = -(t * cm).sum() / cm.sum()
        loss = loss + rpo * nll
        metrics["nll_loss"] = nll
    loss.backward()
    with torch.no_grad():
        cr = beta * (pc - rc)
        rj = beta * (pr - rr)
        metrics.update({
            "rewards/chosen": cr.mean(), "rewards/rejected": rj.mean(),
            "rewards/accuracies": (cr > rj).double().mean(), "rewards/margins": (cr - rj).mean(),
            "logps/chosen": pc.mean(), "logps/rejected": pr.mean(),
        })
    return float(loss.detach()), {k: float(torch.as_tensor(v).detach()) for k, v in metrics.items()}, t.grad.numpy()


def kto(tok, mask, ref, desirable, pkl, rkl, beta, wd, wu):
    """TRL KTOTrainer.kto_loss: KL estimate z = clamp(mean(policy_kl - ref_kl), min=0), detached."""
    t = torch.tensor(tok, dtype=torch.float64, requires_grad=True)
    m = torch.tensor(mask, dtype=torch.float64)
    seq = (t * m).sum(1)
    z = (torch.tensor(pkl) - torch.tensor(rkl)).mean().clamp(min=0).detach()
    r = seq - torch.tensor(ref, dtype=torch.float64)
    des = torch.tensor(desirable)
    losses = torch.where(des, wd * (1 - torch.sigmoid(beta * (r - z))), wu * (1 - torch.sigmoid(beta * (z - r))))
    loss = losses.mean()
    loss.backward()
    with torch.no_grad():
        rew = beta * r
        metrics = {"kl": z}
        if des.any():
            metrics["rewards/chosen"] = rew[des].mean()
        if (~des).any():
            metrics["rewards/rejected"] = rew[~des].mean()
        if des.any() and (~des).any():
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return float(loss.detach()), {k: float(torch.as_tensor(v).detach()) for k, v in metrics.items()}, t.grad.numpy(), float(z)


rng = np.random.default_rng(20261128)
dpo_cases = []
for beta, eps, rpo, at_reference in [(0.1, 0.0, None, False), (0.5, 0.1, 1.0, False), (2.0, 0.0, 0.5, False), (0.1, 0.0, None, True)]:
    n, T = 3, 5
    tok = -rng.uniform(0.05, 3.0, size=(2 * n, T))
    mask = (rng.uniform(size=(2 * n, T)) < 0.75).astype(np.float64)
    mask[:, -1] = 1.0
    ref = (tok * mask).sum(1) + rng.normal(0, 1.5, size=2 * n)
    if at_reference:  # policy == reference: logits 0, where training starts with LoRA (B = 0)
        ref = (tok.astype(np.float32) * mask.astype(np.float32)).sum(1, dtype=np.float32).astype(np.float64)
    loss, metrics, grad = dpo(tok, mask, ref, beta, eps, rpo)
    dpo_cases.append({"at_reference": at_reference, "beta": beta, "label_smoothing": eps, "rpo_alpha": rpo, "rows": 2 * n, "seq": T,
                      "token_logps": tok.reshape(-1).tolist(), "mask": mask.reshape(-1).tolist(), "ref_logps": ref.tolist(),
                      "loss": loss, "metrics": metrics, "grad": grad.reshape(-1).tolist()})

kto_cases = []
for beta, wd, wu, shift in [(0.1, 1.0, 1.0, 0.0), (0.3, 1.33, 0.7, 2.0), (1.0, 1.0, 1.0, -50.0)]:
    n, T = 4, 4
    tok = -rng.uniform(0.05, 3.0, size=(n, T))
    mask = (rng.uniform(size=(n, T)) < 0.8).astype(np.float64)
    mask[:, 0] = 1.0
    ref = (tok * mask).sum(1) + rng.normal(0, 1.0, size=n)
    desirable = [True, False, True, False] if shift != 2.0 else [True, True, True, False]
    pkl = -rng.uniform(2, 8, size=n)
    rkl = pkl - rng.normal(shift, 0.5, size=n)
    loss, metrics, grad, z = kto(tok, mask, ref, desirable, pkl, rkl, beta, wd, wu)
    kto_cases.append({"beta": beta, "desirable_weight": wd, "undesirable_weight": wu, "rows": n, "seq": T,
                      "token_logps": tok.reshape(-1).tolist(), "mask": mask.reshape(-1).tolist(), "ref_logps": ref.tolist(),
                      "desirable": desirable, "policy_kl_logps": pkl.tolist(), "ref_kl_logps": rkl.tolist(),
                      "z": z, "loss": loss, "metrics": metrics, "grad": grad.reshape(-1).tolist()})

out = {
    "oracle": f"torch {torch.__version__} AdamW/clip_grad_norm_/autograd, transformers {transformers.__version__} schedules, TRL dpo_loss/kto_loss formulas in torch",
    "schedules": schedules, "adamw": adamw_cases, "dpo": dpo_cases, "kto": kto_cases,
}
path = os.path.join(os.path.dirname(__file__), "..", "..", "stages", "train", "tests", "data", "train_golden.json")
with open(path, "w") as f:
    json.dump(out, f, indent=1)
print("wrote", os.path.normpath(path))
