"""Byte-level text data: the embedded default corpus (the Python standard library's own
sources, which every Python install carries) or any text file or folder.

Tokens are bytes (vocabulary 256). Files are split deterministically into train and
validation by a hash of their path (about 1 in 10 goes to validation), so no file
contributes to both. When that leaves one side empty (a folder of one or a few files), or for
a single file, the text is split by position instead: the last 10% is validation.
`TextData.split` says which split was used.

Only regular files and folders are read: a FIFO, a socket or a device (`/dev/zero`) is refused
at once instead of blocking or reading forever; inside a folder such entries are skipped.

A corpus larger than `IN_MEMORY_LIMIT` is never read whole: its train and validation streams are
`ByteStream`s, byte ranges of its files read by offset (`os.pread`), so a training batch reads
only its windows at random positions and a corpus larger than memory (or than the address
space) trains. The split is the same as in memory (by file, or the last 10% by position), so
validation stays deterministic; the unigram baseline is then estimated from evenly spaced
`SAMPLE_CHUNKS` chunks of the training stream.
"""
from __future__ import annotations

import os
import stat
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loopdyn.models.errors import InputError

IN_MEMORY_LIMIT = 256 << 20  # larger corpora are read by offset, window by window
SAMPLE_CHUNKS, SAMPLE_CHUNK = 64, 1 << 20  # the unigram baseline of a corpus read by offset
VOCAB_SIZE = 256
VALIDATION_EVERY = 10  # one file in ten (by path hash) is validation
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


class ByteStream:
    """Bytes [start, stop) of a sequence of files, read by offset: `len()` and `[a:b]` (a uint8
    array) like a NumPy array, without holding the bytes. Segments are (path, start, stop)."""

    dtype = np.dtype(np.uint8)

    def __init__(self, segments: list[tuple[Path, int, int]]):
        self.segments = [(Path(p), int(a), int(b)) for p, a, b in segments if b > a]
        self._ends = np.cumsum([b - a for _, a, b in self.segments], dtype=np.int64)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a ByteStream is read by contiguous slices [a:b]")
        start, stop, _ = key.indices(len(self))
        out = bytearray()
        pos = start
        while pos < stop:
            i = int(np.searchsorted(self._ends, pos, side="right"))
            path, a, b = self.segments[i]
            first = int(self._ends[i]) - (b - a)
            offset = a + pos - first
            n = min(stop - pos, b - offset)
            out += _pread(path, offset, n)
            pos += n
        return np.frombuffer(bytes(out), dtype=np.uint8)

    def sample(self, chunks: int = SAMPLE_CHUNKS, size: int = SAMPLE_CHUNK) -> np.ndarray:
        """`chunks` evenly spaced slices of `size` bytes (all of it when that is smaller)."""
        n = len(self)
        if n <= chunks * size:
            return self[0:n]
        starts = np.linspace(0, n - size, chunks).astype(np.int64)
        return np.concatenate([self[int(a): int(a) + size] for a in starts])


def _pread(path: Path, offset: int, n: int) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    try:
        data = os.pread(fd, n, offset)
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    finally:
        os.close(fd)
    if len(data) != n:
        raise InputError(f"{path}: the file shrank while it was read (expected {n} bytes at {offset})")
    return data


@dataclass
class TextData:
    """Train and validation byte streams (uint8 arrays) and where they came from."""

    train: np.ndarray
    val: np.ndarray
    source: str
    n_files: int
    split: str = "by file"  # "by file" (path hash) or "by position" (the last 10% is validation)
    split_reason: str = ""

    def describe(self) -> str:
        """One line: files, bytes, and how train and validation were split."""
        files = f"{self.n_files} file{'s' if self.n_files != 1 else ''}"
        how = ("split by file (1 in 10 by a hash of the path)" if self.split == "by file"
               else f"split by position, the last {100 // VALIDATION_EVERY}% is validation"
                    + (f" ({self.split_reason})" if self.split_reason else ""))
        return f"{files}, {len(self.train):,} training and {len(self.val):,} validation bytes; {how}"

    def batch(self, batch_size: int, seq_len: int, generator: torch.Generator, split: str = "train"):
        """Random windows: inputs (B, S) and next-byte targets (B, S), int64."""
        data = self.train if split == "train" else self.val
        if len(data) <= seq_len + 1:
            raise InputError(f"{self.source}: the {split} split has {len(data)} bytes, fewer than one "
                             f"sequence of {seq_len + 1}")
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator).numpy()
        return _windows(data, starts, seq_len)

    def val_batches(self, n_batches: int, batch_size: int, seq_len: int):
        """A fixed set of evenly spaced validation windows (the same every call)."""
        span = len(self.val) - seq_len - 1
        if span <= 0:
            raise InputError(f"{self.source}: the validation split has {len(self.val)} bytes, fewer than "
                             f"one sequence of {seq_len + 1}")
        starts = np.linspace(0, span, n_batches * batch_size).astype(np.int64)
        return [_windows(self.val, s, seq_len) for s in starts.reshape(n_batches, batch_size)]

    def unigram_loss(self) -> float:
        """Cross-entropy (nats per byte) of the validation bytes under the training bytes'
        unigram distribution (add-one smoothed): the baseline a model must beat."""
        train = self.train.sample() if isinstance(self.train, ByteStream) else self.train
        val = self.val.sample() if isinstance(self.val, ByteStream) else self.val
        counts = np.bincount(train, minlength=VOCAB_SIZE).astype(np.float64) + 1.0
        logp = np.log(counts / counts.sum())
        val_counts = np.bincount(val, minlength=VOCAB_SIZE)
        return float(-(val_counts * logp).sum() / max(val_counts.sum(), 1))


def _windows(data: np.ndarray, starts: np.ndarray, seq_len: int):
    rows = np.stack([data[s: s + seq_len + 1] for s in starts]).astype(np.int64)
    t = torch.from_numpy(rows)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def _is_validation(relative_path: str) -> bool:
    return zlib.crc32(relative_path.encode("utf-8", "surrogateescape")) % VALIDATION_EVERY == 0


def stdlib_files() -> tuple[Path, list[Path]]:
    """The standard library's .py sources (without tests and site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]  # prune: never walk site-packages
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    return root, sorted(files)


def load_text(path: str | Path | None = None, max_bytes: int | None = None) -> TextData:
    """Load `path` (a text file or a folder of files), or the embedded default corpus if None.

    A single file is split 90/10 by position (the tail is validation); a folder is split by
    file. `max_bytes` caps the corpus (files are taken in sorted order).
    """
    if path is None:
        root, files = stdlib_files()
        source = f"python-stdlib ({root})"
    else:
        root = Path(path)
        kind = _kind(root)
        if kind == "missing":
            raise InputError(f"{root}: no such file or folder")
        if kind not in ("file", "folder"):
            raise InputError(f"{root}: is {kind}, not a text file or folder")
        if kind == "file":
            size = _size(root)
            if max_bytes is not None:
                size = min(size, max_bytes)
            data = _read(root, size) if size <= IN_MEMORY_LIMIT else ByteStream([(root, 0, size)])
            if len(data) < 1000:
                raise InputError(f"{root}: only {len(data)} bytes of text; need at least 1000")
            return _by_position(data, str(root), 1, "a single file")
        files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
        source = str(root)
    if max_bytes is not None:
        files = files[: _count_until(files, max_bytes)]
    sizes = {p: _size(p) for p in files}
    in_memory = sum(sizes.values()) <= IN_MEMORY_LIMIT

    def stream(paths: list[Path]):
        if in_memory:
            return np.concatenate([_read(p, sizes[p]) for p in paths]) if paths else np.zeros(0, np.uint8)
        return ByteStream([(p, 0, sizes[p]) for p in paths])

    train, val = [], []
    for p in files:
        (val if _is_validation(str(p.relative_to(root))) else train).append(p)
    total = sum(sizes.values())
    if not files or total == 0:
        raise InputError(f"{source}: no text found (empty folder?)")
    if not train or not val or sum(sizes[p] for p in train) == 0 or sum(sizes[p] for p in val) == 0:
        # one or a few files all on one side of the hash split: split the text by position
        reason = (f"the folder holds {len(files)} file{'s' if len(files) != 1 else ''}, "
                  f"all on the {'validation' if not train else 'training'} side of the split by file")
        return _by_position(stream(train + val), source, len(files), reason)
    return TextData(stream(train), stream(val), source, len(files))


def _by_position(data, source: str, n_files: int, reason: str) -> TextData:
    cut = int(len(data) * (1 - 1 / VALIDATION_EVERY))
    if isinstance(data, ByteStream):
        train, val = _split_stream(data, cut)
    else:
        train, val = data[:cut], data[cut:]
    return TextData(train, val, source, n_files, split="by position", split_reason=reason)


def _split_stream(data: ByteStream, cut: int) -> tuple[ByteStream, ByteStream]:
    """The stream's bytes before and after position `cut`, as two streams."""
    before, after, pos = [], [], 0
    for path, a, b in data.segments:
        n = b - a
        if pos + n <= cut:
            before.append((path, a, b))
        elif pos >= cut:
            after.append((path, a, b))
        else:
            before.append((path, a, a + cut - pos))
            after.append((path, a + cut - pos, b))
        pos += n
    return ByteStream(before), ByteStream(after)


def _kind(path: Path) -> str:
    """'file', 'folder', 'missing', or what else it is ('a FIFO (named pipe)', 'a device', ...)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    from loopdyn.io import file_kind

    return file_kind(mode)


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None


def _read(path: Path, size: int | None = None) -> np.ndarray:
    """The file's bytes (its first `size` bytes), read whole: for files below IN_MEMORY_LIMIT."""
    try:
        with open(path, "rb") as f:
            data = f.read() if size is None else f.read(size)
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    return np.frombuffer(data, dtype=np.uint8)


def _count_until(files: list[Path], max_bytes: int) -> int:
    total = 0
    for i, p in enumerate(files):
        total += p.stat().st_size
        if total >= max_bytes:
            return i + 1
    return len(files)
