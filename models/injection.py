"""Injections: how a loop combines the state h (width ds) with the prelude output e (width d).

Each injection is affine in (h, e): u = Ā h + B̄ e (+ b). `linear_part()` returns Ā and B̄ in
structured form, so analysis code never has to guess (docs/design.md §1):

| kind       | Ā                                   | B̄                                     |
|------------|-------------------------------------|---------------------------------------|
| diagonal   | exp(−Δ·a), a = exp(A_log), Δ = softplus(dt_bias) | Δ·B (euler) or (1 − e^{−Δa})/a ⊙ B (zoh) |
| linear     | W[:, :ds] of Linear(concat[h, e])   | W[:, ds:]                             |
| additive   | I                                   | I                                     |
| autonomous | none: u = h, no input (Ouro-style; the model renormalises h each step) | none |

The diagonal Ā has every entry in (0, 1) for every finite parameter value: Δ·a is floored at
MIN_DECAY_RATE, so even in float32 exp(−Δ·a) never rounds to 1, and 0·∞ is avoided.
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from loopdyn.models.operator import DenseOperator, DiagonalOperator, IdentityOperator
from loopdyn.models.protocol import LinearPart

# Smallest Δ·a. exp(−1e-6) = 1 − 1e-6 is representable in float32 (spacing below 1 is 6e-8).
# Official checkpoints never come near it; if one did, Ā would differ by at most 1e-6.
MIN_DECAY_RATE = 1e-6
# Official init: Ā₀ = sqrt(1/5), i.e. Δ₀ = −ln sqrt(1/5) ≈ 0.8047 with a = 1.
INIT_DECAY = math.sqrt(1 / 5)


def log_softplus(x: torch.Tensor) -> torch.Tensor:
    """log(softplus(x)) without underflow: softplus(x) ≈ eˣ for x ≪ 0."""
    return torch.where(x < -20, x, torch.log(F.softplus(x).clamp_min(1e-38)))


class DiagonalInjection(nn.Module):
    """Parcae: u = Ā ⊙ h + g ⊙ (B e), Ā = exp(−Δ·a) per channel, g = Δ (euler) or (1 − e^{−Δa})/a (zoh)."""

    kind = "diagonal"

    def __init__(self, d_state: int, d_model: int, input_gain: str = "euler"):
        super().__init__()
        self.d_state, self.d_model, self.input_gain = d_state, d_model, input_gain
        self.A_log = nn.Parameter(torch.zeros(d_state))
        self.dt_bias = nn.Parameter(torch.zeros(d_state))
        self.B = nn.Parameter(torch.zeros(d_state, d_model))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        delta0 = -math.log(INIT_DECAY)
        self.A_log.zero_()
        self.dt_bias.fill_(delta0 + math.log(-math.expm1(-delta0)))  # softplus⁻¹(Δ₀) ≈ 0.2119
        if self.d_state == self.d_model:
            self.B.copy_(torch.eye(self.d_state))
        else:
            nn.init.orthogonal_(self.B)

    def _raw_decay_rate(self) -> torch.Tensor:
        """Δ·a, computed as softplus(dt_bias)·exp(A_log) like the official code (for bitwise
        parity), falling back to exp(log Δ + A_log) where that product is 0·∞ = NaN."""
        rate = F.softplus(self.dt_bias) * torch.exp(self.A_log)
        safe = torch.exp(log_softplus(self.dt_bias) + self.A_log)
        return torch.where(torch.isnan(rate), safe, rate)

    def decay_rate(self) -> torch.Tensor:
        """Δ·a, floored at MIN_DECAY_RATE."""
        return self._raw_decay_rate().clamp_min(MIN_DECAY_RATE)

    def A_bar(self) -> torch.Tensor:
        return torch.exp(-self.decay_rate())

    def input_gains(self) -> torch.Tensor:
        """g with B̄ = diag(g)·B: Δ (euler) or (1 − e^{−Δa})/a (exact zero-order hold).

        The ZOH gain is evaluated as Δ·φ(Δa), φ(x) = −expm1(−x)/x, on the unfloored Δa: it stays
        ≤ Δ and finite as a → 0 (where φ → 1), instead of MIN_DECAY_RATE/a.
        """
        delta = F.softplus(self.dt_bias)
        if self.input_gain == "euler":
            return delta
        x = self._raw_decay_rate().clamp_min(1e-30)
        return delta * (-torch.expm1(-x) / x)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.A_bar() * h + self.input_gains() * (e @ self.B.T)

    def split(self, e: torch.Tensor):
        """(h ↦ Ā h, B̄ e): forward(h, e) = the first applied to h + the second, with the parts
        that do not depend on h computed once (the loop reuses them); bit-identical to forward."""
        A = self.A_bar()
        return (lambda h: A * h), self.input_gains() * (e @ self.B.T)

    @torch.no_grad()
    def linear_part(self) -> LinearPart:
        return LinearPart(DiagonalOperator(self.A_bar().detach().clone()),
                          DenseOperator((self.input_gains()[:, None] * self.B).detach().clone()))


class LinearInjection(nn.Module):
    """Huginn/RDM: u = W · concat[h, e] (+ b), the state first; Ā = W[:, :ds], B̄ = W[:, ds:]."""

    kind = "linear"

    def __init__(self, d_state: int, d_model: int, bias: bool = False):
        super().__init__()
        self.d_state, self.d_model = d_state, d_model
        self.W = nn.Linear(d_state + d_model, d_state, bias=bias)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = math.sqrt(2 / (5 * self.d_model))
        nn.init.trunc_normal_(self.W.weight, std=std, a=-3 * std, b=3 * std)
        if self.W.bias is not None:
            self.W.bias.zero_()

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.W(torch.cat([h, e], dim=-1))

    @torch.no_grad()
    def linear_part(self) -> LinearPart:
        W = self.W.weight.detach()
        bias = None if self.W.bias is None else self.W.bias.detach().clone()
        return LinearPart(DenseOperator(W[:, : self.d_state].clone()), DenseOperator(W[:, self.d_state:].clone()), bias)


class _ParameterFree(nn.Module):
    """An injection without parameters (additive, autonomous)."""

    def __init__(self, d_state: int, d_model: int):
        super().__init__()
        self.d_state, self.d_model = d_state, d_model

    def reset_parameters(self) -> None:
        pass


class AdditiveInjection(_ParameterFree):
    """u = h + e; Ā = B̄ = I, spectral radius exactly 1 (marginal)."""

    kind = "additive"

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return h + e

    def split(self, e: torch.Tensor):
        """(h ↦ h, e)."""
        return (lambda h: h), e

    def linear_part(self) -> LinearPart:
        return LinearPart(IdentityOperator(self.d_state), IdentityOperator(self.d_state, self.d_model))


class AutonomousInjection(_ParameterFree):
    """No injection, u = h: the loop h_{t+1} = Norm(core(h_t)) never sees e again (Ouro-style;
    LoopedLM adds the state norm and starts from h_0 = e). It has no LTI part: linear_part() is None."""

    kind = "autonomous"

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return h

    def linear_part(self) -> None:
        return None


def make_injection(kind: str, d_state: int, d_model: int, *, input_gain: str = "euler", bias: bool = False) -> nn.Module:
    if kind == "diagonal":
        return DiagonalInjection(d_state, d_model, input_gain)
    if kind == "linear":
        return LinearInjection(d_state, d_model, bias)
    if kind == "autonomous":
        return AutonomousInjection(d_state, d_model)
    return AdditiveInjection(d_state, d_model)
