"""Spec-only reference of Huginn's adaptive-depth exit criteria (huginn-checkpoint-format.md §3.7).

Written from the spec text alone, independently of loopdyn.dynamics.exits: one token at a time,
one loop at a time, as the official `generate_with_adaptive_compute` runs (a check after each
step, exit at the first step whose check passes, else the last step). Inputs are what the
spec's forward produces (tests/huginn_reference.py): the states s_0..s_T of one token and the
logits after each loop 1..T (ln_f → coda → ln_f → head of s_t).

Spec table ("auto" thresholds):

    entropy-diff      |Δ entropy| < thr                         1e-3
    latent-diff       ‖s_t − s_{t−1}‖/‖s_t‖ < thr               0.03
    kl                KL(p_t ‖ p_{t−1}) < thr, from uniform     1e-3
    minp-kl           same as kl, after min-p 0.1 filtering     1e-5
    argmax-stability  argmax unchanged for thr steps            5
    cosine            1 − cos(s_t, s_{t−1}) < thr               1e-3

Where the spec is silent, this reference decides (and says so):
* entropy-diff has no previous entropy before the first step, so it cannot exit at step 1;
* argmax-stability counts the steps since the argmax last changed (0 at the first step, whose
  predecessor is "no argmax"), and exits when the count reaches thr;
* min-p filtering keeps every probability ≥ 0.1 × the largest; the others are floored at 1/V
  (not dropped: a dropped entry would make the KL infinite), then the distribution is renormalised;
* cosine between a state and the zero vector counts as 0 (1 − cos = 1).
"""
from __future__ import annotations

import math

import numpy as np

AUTO = {"entropy-diff": 1e-3, "latent-diff": 0.03, "kl": 1e-3, "minp-kl": 1e-5, "argmax-stability": 5,
        "cosine": 1e-3}


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


def _entropy(p: np.ndarray) -> float:
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum())


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    nz = p > 0
    return float((p[nz] * (np.log(p[nz]) - np.log(q[nz]))).sum())


def _min_p(p: np.ndarray, min_p: float = 0.1) -> np.ndarray:
    q = p.copy()
    q[p < min_p * p.max()] = 1.0 / p.size
    return q / q.sum()


def exit_step(criterion: str, states: list, logits: list, threshold=None) -> int:
    """The step (1..T) at which one token exits. states: s_0..s_T (1-D arrays); logits: the
    logits after steps 1..T (1-D arrays, length V)."""
    thr = AUTO[criterion] if threshold is None else threshold
    T = len(logits)
    V = logits[0].size
    prev_p = np.full(V, 1.0 / V)
    prev_entropy = None
    prev_argmax = None
    stable = 0
    for step in range(1, T + 1):
        s, s_prev = np.asarray(states[step], float), np.asarray(states[step - 1], float)
        p = _softmax(np.asarray(logits[step - 1], float))
        if criterion == "entropy-diff":
            h = _entropy(p)
            done = prev_entropy is not None and abs(h - prev_entropy) < thr
            prev_entropy = h
        elif criterion == "latent-diff":
            done = np.linalg.norm(s - s_prev) / np.linalg.norm(s) < thr
        elif criterion == "kl":
            done = _kl(p, prev_p) < thr
            prev_p = p
        elif criterion == "minp-kl":
            pf = _min_p(p)
            done = _kl(pf, prev_p) < thr
            prev_p = pf
        elif criterion == "argmax-stability":
            a = int(np.argmax(p))
            stable = stable + 1 if a == prev_argmax else 0
            prev_argmax = a
            done = stable >= thr
        elif criterion == "cosine":
            ns, np_ = np.linalg.norm(s), np.linalg.norm(s_prev)
            cos = float(s @ s_prev / (ns * np_)) if ns > 0 and np_ > 0 else 0.0
            done = 1 - cos < thr
        else:
            raise ValueError(criterion)
        if done:
            return step
    return T


def exit_value_trace(criterion: str, states: list, logits: list) -> list:
    """The checked value per step 1..T (for tests that skip steps whose value sits at the
    threshold to round-off); None where there is no value."""
    out = []
    T, V = len(logits), logits[0].size
    prev_p, prev_h, prev_a, stable = np.full(V, 1.0 / V), None, None, 0
    for step in range(1, T + 1):
        s, s_prev = np.asarray(states[step], float), np.asarray(states[step - 1], float)
        p = _softmax(np.asarray(logits[step - 1], float))
        if criterion == "entropy-diff":
            h = _entropy(p)
            out.append(None if prev_h is None else abs(h - prev_h))
            prev_h = h
        elif criterion == "latent-diff":
            out.append(float(np.linalg.norm(s - s_prev) / np.linalg.norm(s)))
        elif criterion == "kl":
            out.append(_kl(p, prev_p))
            prev_p = p
        elif criterion == "minp-kl":
            pf = _min_p(p)
            out.append(_kl(pf, prev_p))
            prev_p = pf
        elif criterion == "argmax-stability":
            a = int(np.argmax(p))
            stable = stable + 1 if a == prev_a else 0
            prev_a = a
            out.append(float(stable))
        elif criterion == "cosine":
            ns, np_ = np.linalg.norm(s), np.linalg.norm(s_prev)
            out.append(1 - (float(s @ s_prev / (ns * np_)) if ns > 0 and np_ > 0 else 0.0))
    return out


def near_threshold(values: list, thr: float, rtol: float = 1e-6) -> bool:
    """True when some checked value is within rtol of the threshold (an exit decided by round-off)."""
    return any(v is not None and math.isfinite(v) and abs(v - thr) <= rtol * max(abs(thr), 1e-12) for v in values)
