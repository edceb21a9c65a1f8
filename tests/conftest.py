"""Test settings: one intra-op thread (tiny models gain little from two, and on a shared
machine two spinning threads per process slow everything down by orders of magnitude),
and a hypothesis profile without deadlines (timings on a shared machine are noisy)."""
import os

import torch
from hypothesis import settings

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

settings.register_profile("loopdyn", deadline=None, max_examples=60, derandomize=True)
settings.load_profile("loopdyn")
