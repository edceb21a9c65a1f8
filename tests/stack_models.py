"""A user's own looped language model (no loopdyn class) for the training-stack tests:
h_{t+1} = tanh(A h + B e), T = 4 loops, h_0 = 0, logits = head(h_T); monitored through
`LoopAdapter` (encode / step / decode and linear_part Ā = A, no state tap)."""
import torch
import torch.nn.functional as F
from torch import nn

from loopdyn.models import LoopAdapter

V, D, T = 64, 16, 4


class UserLoopNet(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Embedding(V, D)
        self.A, self.B = nn.Linear(D, D, bias=False), nn.Linear(D, D, bias=False)
        self.out = nn.Linear(D, V, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))

    def encode(self, idx):  # (B, S) → e (B, S, D)
        return self.emb(idx)

    def step(self, h, e):
        return torch.tanh(self.A(h) + self.B(e))

    def decode(self, h, e=None):  # (B, S, D) → logits (B, S, V)
        return self.out(h)

    def forward(self, idx, targets=None):
        e = self.encode(idx)
        h = torch.zeros_like(e)
        for _ in range(T):
            h = self.step(h, e)
        logits = self.decode(h)
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def adapter(net: UserLoopNet) -> LoopAdapter:
    """The LoopedModel view of the user's network (through the protocol only)."""
    net = getattr(net, "_orig_mod", net)
    return LoopAdapter(encode=net.encode, step=net.step, decode=net.decode, mean_loops=T, module=net,
                       linear_part=lambda: (net.A.weight, net.B.weight))


def token_batches(n, B=4, S=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, V, (n, B, S + 1), generator=g)
    return [(d[:, :-1], d[:, 1:]) for d in data]


LOOP_SIGNALS = ("state_norm", "rel_residual", "state_growth")
