"""Checkpoint weights read one tensor at a time into a model built on the `meta` device.

Every loader (loopdyn's own format, official Parcae, Huginn-0125/Raven, Ouro) goes through here:

1. `open_weights(path)` describes the stored tensors without reading them: a dict
   {stored key: StoredTensor}. A StoredTensor has the stored `shape` and `dtype` (from the
   safetensors header, or a pickle read with `torch.load(weights_only=True)`), so the key,
   shape and dtype checks run before any weight is read, and `load()` / `take()` read its data.
   Transformations a format needs (a transposed head, rows of a fused matrix) are `map` /
   `rows`, applied to the shape now and to the data when it is read.
2. The model is built under `torch.device("meta")`: no memory and no random initialisation
   (a random init of a 1.3B model costs minutes of orthogonal QRs, and is overwritten anyway).
3. `fill(model, tensors, dtype)` replaces every meta parameter and buffer by its stored tensor,
   read and cast to the compute dtype one tensor at a time: a bfloat16 checkpoint never has a
   second full copy alive. Peak memory = the model in `dtype` + one stored tensor (safetensors:
   each tensor is read through its own `safe_open`, so the memory-mapped file pages are released
   after every tensor instead of accumulating to the file's size). A pickled state dict is read
   whole (pickle has no index), and each tensor is dropped once its copy is in the model: the
   stored and the cast weights together never exceed the cast model + one tensor.

Tied parameters (one Parameter under two names) are filled once and stay one Parameter.
Buffers that are computed rather than stored (RoPE tables) are passed to `fill` as tensors.
"""
from __future__ import annotations

import contextlib
import functools
import pickle
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from loopdyn.models.errors import CheckpointError

# safetensors' dtype names → torch dtypes (torch ≥ 2.3 has the unsigned ones)
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16",
              "U32": "uint32", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
              "C64": "complex64", "C128": "complex128"}


class StoredTensor:
    """One stored tensor, not yet read: `shape`, `dtype`; `load()` reads it (as stored).

    `take()` is `load()` for the last use: the source may free its own copy (a pickled state
    dict drops the tensor). `map(fn)` applies `fn` (a shape-only function of a tensor: `.T`,
    indexing) to the metadata now and to the data on reading; `rows(a, b)` reads only rows
    a:b where the file allows it (safetensors slices)."""

    __slots__ = ("meta", "_load", "_take", "_rows")

    def __init__(self, meta: torch.Tensor, load: Callable[[], torch.Tensor],
                 take: Callable[[], torch.Tensor] | None = None,
                 rows: Callable[[int, int], torch.Tensor] | None = None):
        self.meta = meta  # a meta tensor: shape and dtype, no data
        self._load, self._take, self._rows = load, take or load, rows

    @property
    def shape(self) -> torch.Size:
        return self.meta.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.meta.dtype

    def is_floating_point(self) -> bool:
        return self.meta.is_floating_point()

    def load(self) -> torch.Tensor:
        return self._load()

    def take(self) -> torch.Tensor:
        return self._take()

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "StoredTensor":
        return StoredTensor(fn(self.meta), lambda: fn(self._load()), lambda: fn(self._take()))

    def rows(self, start: int, stop: int) -> "StoredTensor":
        if self._rows is None:  # the whole tensor stays in its source: other rows may follow
            return StoredTensor(self.meta[start:stop], lambda: self._load()[start:stop])
        return StoredTensor(self.meta[start:stop], lambda: self._rows(start, stop))


# ---- reading ----------------------------------------------------------------------------------

def all_finite(t: torch.Tensor) -> bool:
    """True when no entry of t is NaN or ±Inf.

    NaN and ±Inf propagate through a sum, so a finite sum proves every entry finite; the sum
    reads t once and allocates nothing, where `torch.isfinite(t).all()` writes a mask as large
    as t (a 1.3B model: 1.3 GB of masks, ~1 s per check). Only a sum that overflows (finite
    entries near the dtype's maximum) takes the exact check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def nonfinite_parameters(model: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers holding NaN or ±Inf."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    return [name for name, p in named if p.is_floating_point() and not all_finite(p)]


def open_weights(path: Path) -> dict[str, StoredTensor]:
    """{key: StoredTensor} of a `.safetensors` file (header only) or a pickled state dict
    (`torch.load(weights_only=True)`; a Lightning-Fabric checkpoint's "model" entry)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing weights file")
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        from loopdyn.io import describe_read_error

        raise CheckpointError(describe_read_error(err, path)) from None
    return _open_safetensors(path) if path.suffix == ".safetensors" else _open_pickle(path)


def _open_safetensors(path: Path) -> dict[str, StoredTensor]:
    from safetensors import SafetensorError, safe_open

    def unreadable(err) -> CheckpointError:
        return CheckpointError(f"{path}: unreadable safetensors file ({err})")

    try:
        with safe_open(str(path), framework="pt") as f:
            header = {key: (f.get_slice(key).get_shape(), f.get_slice(key).get_dtype()) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise unreadable(err) from None

    def read(key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        # one safe_open per tensor: the file is memory-mapped, and its touched pages stay resident
        # (counted in this process's memory) until the mapping is closed
        try:
            with safe_open(str(path), framework="pt") as f:
                # a view of the mapped file (copy-on-write); `fill` copies it, and the mapping is
                # released when the view dies
                return f.get_tensor(key) if start is None else f.get_slice(key)[start:stop]
        except (SafetensorError, OSError, ValueError) as err:
            raise unreadable(err) from None

    out = {}
    for key, (shape, name) in header.items():
        dtype = getattr(torch, _ST_DTYPES.get(name, ""), None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{path}: weight {key!r} has the unsupported dtype {name}")
        meta = torch.empty(shape, dtype=dtype, device="meta")
        out[key] = StoredTensor(meta, lambda k=key: read(k), rows=lambda a, b, k=key: read(k, a, b))
    return out


def _open_pickle(path: Path) -> dict[str, StoredTensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refuses anything but tensors and containers
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path}: refused to unpickle: not a plain tensor state dict "
                              f"(weights_only=True: {first[:160]})") from None
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path}: unreadable weights file, corrupt or truncated? ({first[:160]})") from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # a Lightning-Fabric training checkpoint
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict mapping names to tensors")
    state: dict = obj
    # load() leaves the tensor in the state dict; take() removes it, so that it is freed once
    # the model holds its cast copy
    return {key: StoredTensor(torch.empty(value.shape, dtype=value.dtype, device="meta"), lambda k=key: state[k],
                              lambda k=key: state.pop(k))
            for key, value in state.items()}


# ---- filling a meta-device model ----------------------------------------------------------------

# The draws modules make in their constructors; on the meta device they do nothing but cost
# time: torch's first meta-device normal_ imports its Python meta kernels (1–2 s).
_INIT_DRAWS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
               "xavier_normal_", "orthogonal_", "constant_", "ones_", "zeros_")


@contextlib.contextmanager
def _skip_meta_init_draws():
    real = {name: getattr(nn.init, name) for name in _INIT_DRAWS}

    def skipping(fn):
        @functools.wraps(fn)
        def draw(tensor, *args, **kwargs):
            return tensor if tensor.is_meta else fn(tensor, *args, **kwargs)
        return draw

    try:
        for name, fn in real.items():
            setattr(nn.init, name, skipping(fn))
        yield
    finally:
        for name, fn in real.items():
            setattr(nn.init, name, fn)


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """`factory()` under `torch.device("meta")`: shapes only, no memory, no random initialisation
    (torch.nn.init draws on meta tensors are skipped, not run)."""
    with torch.device("meta"), _skip_meta_init_draws():
        return factory()


def fill(model: nn.Module, tensors: Mapping[str, StoredTensor | torch.Tensor], dtype: torch.dtype,
         source: str | Path) -> nn.Module:
    """Replace the meta parameters and buffers of `model` by `tensors` ({state-dict name:
    StoredTensor or tensor}), one at a time; floating-point parameters are cast to `dtype` as
    each is read, buffers keep their dtype.

    A parameter reachable under several names (a tied head) is filled once, from the first of
    its names in `tensors`, and every name keeps pointing at the one new Parameter. A shape that
    differs from the model's, a name the model does not have, or a parameter or buffer left
    without data is a CheckpointError naming the key."""
    slots: dict[str, tuple[nn.Module, str, bool]] = {}
    groups: dict[int, list[tuple[nn.Module, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        for kind, table in ((True, module._parameters), (False, module._buffers)):
            for attr, value in table.items():
                if value is None:
                    continue
                slots[prefix + attr] = (module, attr, kind)
                places = groups.setdefault(id(value), [])
                if (module, attr) not in [(m, a) for m, a in places]:
                    places.append((module, attr))
    filled: set[int] = set()
    for name, stored in tensors.items():
        if name not in slots:
            raise CheckpointError(f"{source}: {name} is not a parameter or buffer of the model")
        module, attr, is_param = slots[name]
        old = getattr(module, attr)
        if id(old) in filled:
            continue  # a tied alias, filled under its first name
        if tuple(stored.shape) != tuple(old.shape):
            raise CheckpointError(f"{source}: {name} has shape {tuple(stored.shape)}, the config implies "
                                  f"{tuple(old.shape)}")
        read = stored.take() if isinstance(stored, StoredTensor) else stored
        value = read.to(dtype) if is_param and read.is_floating_point() else read
        if value.data_ptr() == read.data_ptr():  # no cast: own a copy (never a view of the file
            value = value.clone(memory_format=torch.contiguous_format)  # or of a caller's tensor)
        else:
            value = value.contiguous()
        del read
        new = nn.Parameter(value, requires_grad=old.requires_grad) if is_param else value
        for owner, owner_attr in groups[id(old)]:
            (owner._parameters if is_param else owner._buffers)[owner_attr] = new
        filled.add(id(new))
        del value, new
    empty = [name for name, (module, attr, _) in slots.items() if getattr(module, attr).is_meta]
    if empty:
        raise CheckpointError(f"{source}: no weights for {len(empty)} parameter(s)/buffer(s) "
                              f"({', '.join(empty[:4])}{', …' if len(empty) > 4 else ''})")
    return model
