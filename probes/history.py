"""Recorded signals: device-side pending values and the host-side history.

Per-step values are 0-d tensors produced on the model's device. `SignalBuffer.add` only keeps
a reference (no copy, no sync). `flush()` moves what is pending to the host as ONE stacked
transfer per device: on CUDA asynchronously (pinned memory + an event polled later, no stall)
or, when asked to block, with a single synchronising read — which the monitor does only
every `sync_every` steps, in skip mode (the decision must precede the step), and when
`history` is read. CPU values need no transfer at all.

The host history is one pair of compact arrays (steps, values) per signal; `History` is a
read-only mapping signal → `Series` built on access.
"""
from __future__ import annotations

from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Series:
    """One signal: steps (int64) and values (float64), in step order."""

    steps: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self) -> Iterator[tuple[int, float]]:
        return iter(zip(self.steps.tolist(), self.values.tolist()))

    @property
    def last(self) -> tuple[int, float] | None:
        return (int(self.steps[-1]), float(self.values[-1])) if len(self.steps) else None

    def at(self, step: int) -> float | None:
        hit = np.nonzero(self.steps == step)[0]
        return float(self.values[hit[-1]]) if len(hit) else None


class History(Mapping):
    """Read-only view: `history["loss"]` → Series; `history.as_dict()` → {signal: [(step, value), ...]};
    `history.to_pandas()` → a DataFrame indexed by step (when pandas is installed)."""

    def __init__(self, store: dict[str, tuple[array, array]]):
        self._store = store

    def __getitem__(self, name: str) -> Series:
        steps, values = self._store[name]
        return Series(np.array(steps, dtype=np.int64), np.array(values, dtype=np.float64))

    def __iter__(self):
        return iter(sorted(self._store))

    def __len__(self) -> int:
        return len(self._store)

    def as_dict(self) -> dict[str, list[tuple[int, float]]]:
        return {name: list(self[name]) for name in self}

    def to_pandas(self):
        """A pandas DataFrame: one row per step (index "step"), one column per signal, NaN where
        a signal was not recorded at that step. Needs pandas (`pip install pandas`)."""
        try:
            import pandas as pd
        except ImportError as err:
            raise ImportError("History.to_pandas needs pandas (pip install pandas)") from err
        frame = pd.DataFrame({name: pd.Series(self[name].values, index=self[name].steps) for name in self})
        frame.index.name = "step"
        return frame.sort_index()


class SignalBuffer:
    """Pending device values and the host history they are flushed into."""

    def __init__(self, limit: int | None = None):
        self.pending: list[tuple[str, int, torch.Tensor | float]] = []
        self.store: dict[str, tuple[array, array]] = {}
        self.limit = limit  # keep at most this many points per signal (None: all)
        self.syncs = 0  # blocking device→host reads done
        self.in_flight: list = []  # asynchronous CUDA copies not yet complete

    def add(self, name: str, step: int, value) -> None:
        """Queue a value: a tensor (kept on its device, no sync) or a Python number."""
        if isinstance(value, torch.Tensor):
            value = value.detach().reshape(())
        else:
            value = float(value)
        self.pending.append((name, step, value))

    def flush(self, block: bool = True) -> list[tuple[str, int, float]]:
        """Move pending values to the host; return those now on the host as (name, step, value).

        CPU values: read at once (no device, nothing to wait for). CUDA values: one stacked
        tensor per device; with block=False it is copied into pinned host memory
        asynchronously and returned by a later call once its CUDA event has completed (polled,
        never waited on), so the training stream never stalls; block=True waits. Values on
        other accelerators stay pending until a blocking flush.
        """
        pending, self.pending = self.pending, []
        ready: list[tuple[str, int, float]] = []
        by_device: dict[torch.device, list[tuple[str, int, torch.Tensor]]] = {}
        for name, step, v in pending:
            if not isinstance(v, torch.Tensor):
                ready.append((name, step, v))
            elif v.device.type == "cpu":
                by_device.setdefault(v.device, []).append((name, step, v))
            else:
                by_device.setdefault(v.device, []).append((name, step, v))
        for device, entries in by_device.items():
            stacked = torch.stack([t.to(torch.float64) for _, _, t in entries])
            keys = [(n, s) for n, s, _ in entries]
            if device.type == "cpu" or block:
                ready.extend((n, s, v) for (n, s), v in zip(keys, stacked.tolist()))
                self.syncs += device.type != "cpu"
            elif device.type == "cuda":
                host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
                host.copy_(stacked, non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(device))
                self.in_flight.append((keys, host, event))
            else:
                self.pending.extend(entries)  # wait for a blocking flush
        still = []
        for keys, host, event in self.in_flight:
            if block or event.query():
                if block:
                    event.synchronize()
                ready.extend((n, s, v) for (n, s), v in zip(keys, host.tolist()))
            else:
                still.append((keys, host, event))
        self.in_flight = still
        for name, step, v in ready:
            self._append(name, step, v)
        return ready

    def _append(self, name: str, step: int, value: float) -> None:
        steps, values = self.store.setdefault(name, (array("q"), array("d")))
        steps.append(int(step))
        values.append(value)
        if self.limit is not None and len(steps) > self.limit * 2:  # amortised trimming
            del steps[: len(steps) - self.limit]
            del values[: len(values) - self.limit]

    def last(self, name: str) -> float | None:
        entry = self.store.get(name)
        return entry[1][-1] if entry and len(entry[1]) else None

    def state_dict(self) -> dict:
        return {name: {"steps": list(s), "values": list(v)} for name, (s, v) in self.store.items()}

    def load_state_dict(self, state: dict) -> None:
        self.store = {name: (array("q", d["steps"]), array("d", d["values"])) for name, d in state.items()}

