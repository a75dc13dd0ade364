#!/usr/bin/env python3
"""Golden values for pipeline-train (stages/train/tests/golden.rs).

Oracle: NumPy transcriptions of the reference algorithms, because PyPI's Linux torch wheel pulls
gigabytes of CUDA libraries and no other torch index is reachable here:
  * torch.optim.AdamW (single-tensor path, torch/optim/adamw.py in torch 2.x) and
    torch.nn.utils.clip_grad_norm_, in float32 with torch's operation order;
  * transformers.optimization get_{cosine,linear,constant}_schedule_with_warmup lambdas and
    TrainingArguments.get_warmup_steps;
  * TRL's DPOTrainer.dpo_loss (loss_type="sigmoid", label_smoothing, rpo_alpha) and
    KTOTrainer.kto_loss, in float64, with gradients derived by hand (checked here by finite
    differences before writing).

Run: python3 -m venv /tmp/v && /tmp/v/bin/pip install numpy && /tmp/v/bin/python scripts/oracles/train_golden.py
Writes stages/train/tests/data/train_golden.json.
"""
import json
import math
import os

import numpy as np

f32 = np.float32


# ---------------------------------------------------------------- schedules (transformers)
def warmup_steps(total, warmup_ratio, warmup_steps_arg):
    return warmup_steps_arg if warmup_steps_arg > 0 else math.ceil(total * warmup_ratio)


def lam(kind, step, w, n):
    if kind == "constant":
        return 1.0
    if step < w:
        return float(step) / float(max(1, w))
    if kind == "constant_with_warmup":
        return 1.0
    if kind == "linear":
        return max(0.0, float(n - step) / float(max(1, n - w)))
    if kind == "cosine":
        progress = float(step - w) / float(max(1, n - w))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(0.5) * 2.0 * progress)))
    raise ValueError(kind)


schedules = []
for kind in ["cosine", "linear", "constant", "constant_with_warmup"]:
    for total, ratio, wsteps in [(10, 0.0, 0), (10, 0.1, 0), (37, 0.05, 0), (20, 0.5, 3), (1, 0.5, 0)]:
        w = warmup_steps(total, ratio, wsteps)
        schedules.append({
            "kind": kind, "total_steps": total, "warmup_ratio": ratio, "warmup_steps_arg": wsteps,
            "warmup_steps": w, "factors": [lam(kind, s, w, total) for s in range(total + 2)],
        })


# ---------------------------------------------------------------- AdamW + clipping (torch)
def clip_grad_norm_(grads, max_norm):
    norms = [np.sqrt(np.sum(g.astype(np.float32) * g.astype(np.float32), dtype=np.float32), dtype=np.float32) for g in grads]
    total = np.sqrt(np.sum(np.array(norms, dtype=np.float32) ** 2, dtype=np.float32), dtype=np.float32)
    if max_norm > 0:
        coef = f32(max_norm) / (total + f32(1e-6))
        coef = min(coef, f32(1.0))
        grads = [(g * f32(coef)).astype(np.float32) for g in grads]
    return grads, float(total)


def adamw_step(p, g, m, v, step, lr, beta1, beta2, eps, wd):
    p = (p * f32(1 - lr * wd)).astype(np.float32)
    w = f32(1 - beta1)
    m = (m + w * (g - m)).astype(np.float32) if w < 0.5 else (g - (g - m) * (f32(1) - w)).astype(np.float32)
    v = (v * f32(beta2) + f32(1 - beta2) * g * g).astype(np.float32)
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    step_size = lr / bc1
    bc2_sqrt = math.sqrt(bc2)
    denom = (np.sqrt(v) / f32(bc2_sqrt) + f32(eps)).astype(np.float32)
    p = (p + f32(-step_size) * m / denom).astype(np.float32)
    return p, m, v


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
    params = [(np.cos(np.arange(np.prod(s)) * 0.37 + k).astype(np.float32).reshape(s)) for k, s in enumerate(shapes)]
    init = [p.copy() for p in params]
    ms = [np.zeros_like(p) for p in params]
    vs = [np.zeros_like(p) for p in params]
    w = warmup_steps(case["total"], case["warmup_ratio"], 0)
    steps = []
    for s in range(case["total"]):
        grads = [grad_at(s, sh, k) for k, sh in enumerate(shapes)]
        raw = [g.reshape(-1).tolist() for g in grads]
        grads, norm = clip_grad_norm_(grads, case["max_grad_norm"])
        lr = case["lr"] * lam(case["kind"], s, w, case["total"])
        for k in range(3):
            wd = case["weight_decay"] if k == 0 else 0.0  # bias and norm weights: no decay
            params[k], ms[k], vs[k] = adamw_step(params[k], grads[k], ms[k], vs[k], s + 1, lr, case["beta1"], case["beta2"], case["eps"], wd)
        steps.append({"lr": lr, "grads": raw, "grad_norm": norm, "params": [p.reshape(-1).tolist() for p in params]})
    adamw_cases.append({**case, "names": names, "shapes": [list(s) for s in shapes],
                        "init": [p.reshape(-1).tolist() for p in init], "steps": steps})


# ---------------------------------------------------------------- DPO (TRL, sigmoid)
def logsig(x):
    return -np.logaddexp(0.0, -x)


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def dpo(tok, mask, ref, beta, eps, rpo):
    rows, T = tok.shape
    n = rows // 2
    seq = (tok * mask).sum(1)
    pc, pr, rc, rr = seq[:n], seq[n:], ref[:n], ref[n:]
    logits = (pc - pr) - (rc - rr)
    losses = -logsig(beta * logits) * (1 - eps) - logsig(-beta * logits) * eps
    loss = losses.mean()
    # dL/dlogits
    dl = (-(1 - eps) * beta * sig(-beta * logits) + eps * beta * sig(beta * logits)) / n
    dseq = np.concatenate([dl, -dl])
    grad = dseq[:, None] * mask
    metrics = {}
    if rpo is not None:
        cm = mask.copy()
        cm[n:] = 0
        cnt = cm.sum()
        nll = -(tok * cm).sum() / cnt
        loss = loss + rpo * nll
        grad = grad + rpo * (-cm / cnt)
        metrics["nll_loss"] = nll
    cr = beta * (pc - rc)
    rj = beta * (pr - rr)
    metrics.update({
        "rewards/chosen": cr.mean(), "rewards/rejected": rj.mean(),
        "rewards/accuracies": (cr > rj).astype(np.float64).mean(), "rewards/margins": (cr - rj).mean(),
        "logps/chosen": pc.mean(), "logps/rejected": pr.mean(),
    })
    return float(loss), {k: float(v) for k, v in metrics.items()}, grad


def kto(tok, mask, ref, desirable, pkl, rkl, beta, wd, wu):
    seq = (tok * mask).sum(1)
    z = max(0.0, float(np.mean(pkl - rkl)))
    r = seq - ref
    des = np.array(desirable)
    losses = np.where(des, wd * (1 - sig(beta * (r - z))), wu * (1 - sig(beta * (z - r))))
    loss = losses.mean()
    s_d = sig(beta * (r - z))
    s_u = sig(beta * (z - r))
    dr = np.where(des, -wd * beta * s_d * (1 - s_d), wu * beta * s_u * (1 - s_u)) / len(r)
    grad = dr[:, None] * mask
    rew = beta * r
    metrics = {"kl": z}
    if des.any():
        metrics["rewards/chosen"] = rew[des].mean()
    if (~des).any():
        metrics["rewards/rejected"] = rew[~des].mean()
    if des.any() and (~des).any():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return float(loss), {k: float(v) for k, v in metrics.items()}, grad, z


def check_grad(f, tok, grad):
    h = 1e-6
    for idx in [(0, 0), (tok.shape[0] - 1, tok.shape[1] - 1), (1, 1)]:
        t2 = tok.copy()
        t2[idx] += h
        t3 = tok.copy()
        t3[idx] -= h
        num = (f(t2) - f(t3)) / (2 * h)
        assert abs(num - grad[idx]) < 1e-6, (idx, num, grad[idx])


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
    check_grad(lambda t: dpo(t, mask, ref, beta, eps, rpo)[0], tok, grad)
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
    check_grad(lambda t: kto(t, mask, ref, desirable, pkl, rkl, beta, wd, wu)[0], tok, grad)
    kto_cases.append({"beta": beta, "desirable_weight": wd, "undesirable_weight": wu, "rows": n, "seq": T,
                      "token_logps": tok.reshape(-1).tolist(), "mask": mask.reshape(-1).tolist(), "ref_logps": ref.tolist(),
                      "desirable": desirable, "policy_kl_logps": pkl.tolist(), "ref_kl_logps": rkl.tolist(),
                      "z": z, "loss": loss, "metrics": metrics, "grad": grad.reshape(-1).tolist()})

out = {
    "oracle": f"numpy {np.__version__} transcription of torch 2.x AdamW/clip_grad_norm_, transformers schedules, TRL dpo_loss/kto_loss",
    "schedules": schedules, "adamw": adamw_cases, "dpo": dpo_cases, "kto": kto_cases,
}
path = os.path.join(os.path.dirname(__file__), "..", "..", "stages", "train", "tests", "data", "train_golden.json")
with open(path, "w") as f:
    json.dump(out, f, indent=1)
print("wrote", os.path.normpath(path))
