"""The monitor on ANY looped model, through the LoopedModel protocol only.

A looped transformer written here in plain PyTorch (no loopdyn class: embedding, pre-norm
input, a linear injection on [h, e], one pre-norm attention + MLP block with RoPE and QK-norm,
a readout and a tied head) gets the same weights as a native LoopedLM. Trained side by side
on the same batches, the monitor's loop signals on `LoopAdapter.from_module(plain)` (the core
module is the state tap) equal those on the native model: per-loop state norms, relative
residual, state growth, ρ(Ā) and ‖Ā‖ from `linear_part()`, and the loop Jacobian σ_max. A loop
without a state tap gets the same signals from a periodic probe unroll, checked by hand."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loopdyn.models import LoopAdapter, LoopConfig, LoopedLM
from loopdyn.probes import StabilityMonitor

D, HEADS, T, V = 32, 2, 3, 256


class PlainBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.n1, self.n2 = nn.RMSNorm(D, eps=1e-5), nn.RMSNorm(D, eps=1e-5)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D, bias=False) for _ in range(4))
        self.fc, self.proj = nn.Linear(D, 4 * D, bias=False), nn.Linear(4 * D, D, bias=False)

    def attend(self, a, angles):
        B, S, _ = a.shape
        hd = D // HEADS

        def heads(t):
            t = t.view(B, S, HEADS, hd)
            z = torch.view_as_complex(t.float().reshape(B, S, HEADS, hd // 2, 2))  # interleaved pairs
            t = torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)[None, :, None]).flatten(-2)
            return F.rms_norm(t, (hd,)).transpose(1, 2)

        q, k, v = heads(self.q(a)), heads(self.k(a)), self.v(a).view(B, S, HEADS, hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, S, D))

    def forward(self, u, angles):
        u = u + self.attend(self.n1(u), angles)
        return u + self.proj(0.5 * torch.relu(self.fc(self.n2(u))).square())


class PlainCore(nn.Module):
    """h_{t+1} = block(W·[h, e]): the module applied T times."""

    def __init__(self):
        super().__init__()
        self.W = nn.Linear(2 * D, D, bias=False)
        self.block = PlainBlock()
        self.angles = None

    def forward(self, h, e):
        return self.block(self.W(torch.cat([h, e], -1)), self.angles[: h.shape[1]])


class PlainLoopedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.in_norm = nn.RMSNorm(D, eps=1e-5)
        self.core = PlainCore()
        self.readout = nn.Linear(D, D, bias=False)
        self.out_norm = nn.RMSNorm(D, eps=1e-5)
        self.n_loops = T
        inv = 1.0 / (50000.0 ** (torch.arange(0, D // HEADS, 2).float() / (D // HEADS)))
        self.core.angles = torch.outer(torch.arange(256).float(), inv)

    def embed(self, idx):
        return self.in_norm(self.emb(idx))

    def head(self, h):
        return self.out_norm(self.readout(h)) @ self.emb.weight.T

    def forward(self, idx):
        e = self.embed(idx)
        h = torch.zeros_like(e)
        for _ in range(self.n_loops):
            h = self.core(h, e)
        return self.head(h)


def native_and_plain(seed=0):
    torch.manual_seed(seed)
    cfg = LoopConfig.preset("tiny", injection="linear", d_model=D, n_heads=HEADS, d_mlp=4 * D, n_prelude=0,
                            n_core=1, n_coda=0, value_embeds=False, state_init="zero", mean_loops=T,
                            backprop_loops=T, depth_sampling="fixed")
    native = LoopedLM(cfg).train()
    with torch.no_grad():  # leave the official zero init: the block is not the identity
        for name, p in native.named_parameters():
            if name.endswith(("c_proj.weight", "mlp.proj.weight")):
                p.normal_(0, 0.05)
    plain = PlainLoopedLM().train()
    blk = native.core[0]
    pairs = {"emb.weight": native.wte.weight, "in_norm.weight": native.ln_prelude.weight,
             "core.W.weight": native.injection.W.weight, "core.block.n1.weight": blk.norm_1.weight,
             "core.block.n2.weight": blk.norm_2.weight, "core.block.q.weight": blk.attn.c_q.weight,
             "core.block.k.weight": blk.attn.c_k.weight, "core.block.v.weight": blk.attn.c_v.weight,
             "core.block.o.weight": blk.attn.c_proj.weight, "core.block.fc.weight": blk.mlp.fc.weight,
             "core.block.proj.weight": blk.mlp.proj.weight, "readout.weight": native.readout.weight,
             "out_norm.weight": native.ln_f.weight}
    with torch.no_grad():
        own = dict(plain.named_parameters())
        assert set(own) == set(pairs)
        for name, value in pairs.items():
            own[name].copy_(value)
    return native, plain


def adapter(plain):
    return LoopAdapter.from_module(plain, linear_part=lambda: (plain.core.W.weight[:, :D], plain.core.W.weight[:, D:]))


def batches(n, B=3, S=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randint(0, V, (B, S + 1), generator=g)
        yield x[:, :-1], x[:, 1:]


LOOP_SIGNALS = ("state_norm", "rel_residual", "state_norm_max", "state_growth", "injection_radius",
                "injection_norm", "jacobian_norm")


def test_plain_model_computes_what_the_native_one_does():
    native, plain = native_and_plain()
    x, y = next(batches(1))
    torch.testing.assert_close(plain(x), native(x, y).logits, rtol=1e-5, atol=1e-5)


def test_monitor_loop_signals_on_an_adapted_model_equal_the_native_ones():
    native, plain = native_and_plain()
    loop = adapter(plain)
    opts = dict(console=False, jacobian_every=2, spectral_every=1, jacobian_tokens=8, loop_every=2)
    runs = {}
    for name, model in (("native", native), ("plain", plain)):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        monitor = StabilityMonitor(model, opt, loop=loop if name == "plain" else None, **opts)
        assert monitor.loop is (loop if name == "plain" else native)
        for x, y in batches(4):
            if name == "native":
                loss = model(x, y).loss
            else:
                loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
                monitor.record_loss(loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        monitor.close()
        runs[name] = monitor.history
    for signal in LOOP_SIGNALS + ("loss", "grad_norm"):
        a, b = runs["native"][signal], runs["plain"][signal]
        assert a.steps.tolist() == b.steps.tolist() and len(a) >= 2, signal
        np.testing.assert_allclose(b.values, a.values, rtol=2e-4, err_msg=signal)
    # independent check of one value: ρ(Ā) of the plain model's own W after the last step
    A = plain.core.W.weight.detach().double().numpy()[:, :D]
    assert runs["plain"]["injection_radius"].values[-1] == pytest.approx(np.abs(np.linalg.eigvals(A)).max(), rel=1e-6)
    assert runs["plain"]["injection_norm"].values[-1] == pytest.approx(np.linalg.norm(A, 2), rel=1e-6)


def test_a_loop_without_a_state_tap_gets_a_periodic_probe_unroll():
    _, plain = native_and_plain()
    loop = LoopAdapter(encode=plain.embed, step=lambda h, e: plain.core(h, e), decode=lambda h, e: plain.head(h),
                       mean_loops=T, module=plain)  # no state_tap, no linear_part
    opt = torch.optim.SGD(plain.parameters(), lr=0.0)  # fixed weights: the unroll is reproducible
    monitor = StabilityMonitor(plain, opt, loop=loop, console=False, loop_every=2, loop_batch=2)
    seen = []
    for x, y in batches(4):
        seen.append(x)
        loss = F.cross_entropy(plain(x).flatten(0, 1), y.flatten())
        monitor.record_loss(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    hist = monitor.history
    monitor.close()
    assert hist["state_norm"].steps.tolist() == [2, 4] and "injection_radius" not in hist
    with torch.no_grad():  # by hand: the first two sequences of the step-4 batch
        e = plain.embed(seen[3][:2])
        hs = [torch.zeros_like(e)]
        for _ in range(T):
            hs.append(plain.core(hs[-1], e))
    norm = lambda h: float(h.norm(dim=-1).mean())  # noqa: E731
    assert hist["state_norm"].at(4) == pytest.approx(norm(hs[-1]), rel=1e-5)
    assert hist["rel_residual"].at(4) == pytest.approx(norm(hs[-1] - hs[-2]) / norm(hs[-1]), rel=1e-5)
    assert hist["state_growth"].at(4) == pytest.approx(norm(hs[-1]) / norm(hs[-2]), rel=1e-5)
    assert hist["state_norm_max"].at(4) == pytest.approx(max(norm(h) for h in hs[1:]), rel=1e-5)
    assert math.isfinite(hist["loss"].at(4))
