"""Progress for long work: a tqdm bar on a terminal, periodic log lines otherwise.

When stderr is not a terminal (a log file, a pipe, CI, nohup) a bar would write thousands of
carriage-return frames; `Progress` prints instead one plain line every tenth of the work (and
at the end), e.g. `train: 120/300 steps (40%), 13.2 steps/s, about 14 s left, loss=2.31`.
"""
from __future__ import annotations

import sys
import time


class LineProgress:
    """The tqdm subset loopdyn uses (update, set_postfix, write, close), as log lines."""

    def __init__(self, total: int, desc: str, unit: str = "step", lines: int = 10, file=None):
        self.total, self.desc, self.unit = max(int(total), 0), desc, unit
        self.n = 0
        self.file = file if file is not None else sys.stderr
        self.every = max(1, -(-self.total // max(lines, 1))) if self.total else 1
        self._next = self.every
        self._start = time.perf_counter()
        self._postfix: dict[str, str] = {}
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n >= self._next or (self.total and self.n >= self.total):
            while self._next <= self.n:
                self._next += self.every
            self._line()

    def set_postfix(self, **kwargs) -> None:
        self._postfix = {k: str(v) for k, v in kwargs.items()}

    def write(self, line: str) -> None:
        print(line, file=self.file, flush=True)

    def _line(self) -> None:
        elapsed = time.perf_counter() - self._start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.n}/{self.total} {self.unit}s"
                 + (f" ({100 * self.n // self.total}%)" if self.total else "")]
        if rate > 0:
            parts.append(f"{rate:.3g} {self.unit}s/s")
            if self.total and self.n < self.total:
                parts.append(f"about {(self.total - self.n) / rate:.0f} s left")
        parts += [f"{k}={v}" for k, v in self._postfix.items()]
        self.write(", ".join(parts))

    def close(self) -> None:
        self._closed = True


def progress(total: int, desc: str, unit: str = "step", enabled: bool = True, leave: bool = False):
    """A tqdm bar when stderr is a terminal, `LineProgress` lines when it is not, None when
    progress is switched off (`--no-progress`)."""
    if not enabled or total <= 0:
        return None
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=leave, file=sys.stderr)
    return LineProgress(total, desc, unit)


def stages(desc: str, enabled: bool = True):
    """(bar, update) for work reported as update(stage, done, total) (the audit's `progress`
    callback): a tqdm bar showing the stage on a terminal, one log line per new stage otherwise;
    (None, None) when progress is switched off. Close the bar when done."""
    bar = progress(1, desc, enabled=enabled)
    if bar is None:
        return None, None
    seen: list[str] = []

    def update(stage: str, done: int, total: int) -> None:
        if isinstance(bar, LineProgress):
            if not seen or seen[-1] != stage:
                bar.write(f"{desc}: {stage}")
        else:
            bar.set_description(f"{desc}: {stage}")
            if bar.total != total:
                bar.reset(total=max(total, 1))
            bar.n = done
            bar.refresh()
        seen.append(stage)

    return bar, update
