"""What `loopdyn audit` reads: the model behind PATH (a checkpoint, or your own model as
MODULE:FUNCTION / FILE.py:FUNCTION) and a probe batch of text (docs/design.md, "loopdyn audit").

Probe tokens are bytes of text (ids 0..255). For a model with a larger vocabulary (the
official models have 32768 ids) byte ids are valid ids of its embedding, though not what its
tokenizer would produce from that text: the audit probes the loop's dynamics on real
embeddings, not the model's language modelling. For a vocabulary smaller than 256 (test
models) the ids are taken modulo the vocabulary size.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from loopdyn.models.errors import InputError

if TYPE_CHECKING:
    import torch

DEFAULT_SEQ_LEN = 256
CORPUS_BYTES = 4_000_000  # enough of the default corpus for a probe window, and fast to read


def load_model(path: str, device: str = "cpu", dtype=None):
    """The LoopedModel behind PATH: `user_factory(path)()` for MODULE:FUNCTION, else the checkpoint
    (`loopdyn.models.load`), in the precision `dtype` (models/precision.py: parameters cast for a
    pure precision, an autocast wrapper for a mixed one; default: as loaded). A model that is not
    looped is an InputError naming PATH."""
    from loopdyn.models import load, protocol
    from loopdyn.models.precision import precision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # non-finite weights are reported in the verdict
        factory = user_factory(str(path))
        model = load(path, device=device, dtype=dtype) if factory is None else factory()
    if dtype is not None:
        model = precision(dtype).wrap(model)
    try:
        protocol.require_looped(model)
    except protocol.ProtocolError as err:
        raise InputError(f"{path}: {err}") from None
    return model


def model_input(option: str, spec: str):
    """What loading the model at `spec` reads (`loopdyn.iocheck.Input`): a checkpoint's files, or
    the FILE.py of FILE.py:FUNCTION (nothing for MODULE:FUNCTION); nothing is imported."""
    from loopdyn.iocheck import checkpoint_input, file_input

    where = user_factory(str(spec), load=False)
    if where is None:
        return checkpoint_input(option, spec)
    return file_input(option, where) if where.endswith(".py") else None


def user_error(err: BaseException) -> str:
    """"FILE, line N: Type: message" for an exception raised in a user's code: the innermost
    frame outside loopdyn, the standard library and site-packages (a SyntaxError names its own)."""
    import os
    import sys
    import sysconfig
    import traceback

    if isinstance(err, SyntaxError):
        return f"{err.filename}, line {err.lineno}: SyntaxError: {err.msg}"
    import loopdyn.dynamics
    import loopdyn.models
    import loopdyn.probes

    ours = [p for pkg in (sys.modules["loopdyn"], loopdyn.models, loopdyn.dynamics, loopdyn.probes)
            for p in getattr(pkg, "__path__", [])]
    paths = sysconfig.get_paths()
    skip = tuple(os.path.abspath(p) + os.sep for p in ours + [paths["stdlib"], paths["purelib"], paths["platlib"]])
    skip += ("<frozen",)
    frames = traceback.extract_tb(err.__traceback__)
    theirs = [f for f in frames if not f.filename.startswith(skip)] or frames
    where = f"{theirs[-1].filename}, line {theirs[-1].lineno}: " if theirs else ""
    text = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
    return f"{where}{type(err).__name__}{': ' + text if text else ''}"


def user_factory(spec: str, load: bool = True):
    """For PATH = MODULE:FUNCTION or FILE.py:FUNCTION (and no such file or folder), the function;
    else None. The function is called with no arguments and must return a LoopedModel. With
    load=False, the module or file named instead (nothing is imported). Failures of the user's
    code are `InputError`s naming its file, line and exception (`user_error`)."""
    import importlib
    import importlib.util
    from pathlib import Path

    if ":" not in spec or Path(spec).exists():
        return None
    where, _, name = spec.rpartition(":")
    if not where or not name.isidentifier():
        return None
    if not load:
        return where
    try:
        if where.endswith(".py"):
            if not Path(where).is_file():
                raise InputError(f"{spec}: no file {where}")
            module_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except InputError:
        raise
    except ImportError as err:
        raise InputError(f"{spec}: cannot import {where}: {err}") from None
    except Exception as err:  # the user's code failed: their error, named with its file and line
        raise InputError(f"{spec}: importing {where} failed: {user_error(err)}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise InputError(f"{spec}: {where} has no function {name}")

    def build():
        from loopdyn.models import protocol

        try:
            model = fn()
        except Exception as err:  # noqa: BLE001 - the user's function failed
            raise InputError(f"{spec}: {name}() failed: {user_error(err)}") from None
        if hasattr(model, "eval"):
            model.eval()
        if not protocol.is_looped(model):
            protocol.require_looped(model)  # raises the one-line reason
        return model
    return build


def probe_batch(model, data: str | None = None, batch_size: int = 1, seq_len: int | None = None,
                device: str = "cpu") -> tuple[torch.Tensor, str]:
    """(idx, description): a probe batch of `batch_size` × `seq_len` byte ids of text for `model`.

    The text is the validation part of `data` (a file or folder; default: the first
    CORPUS_BYTES of the Python standard library's sources); `seq_len` defaults to
    min(DEFAULT_SEQ_LEN, the model's context). Byte ids are taken modulo a vocabulary smaller than
    256; for a larger one they are valid ids, though not what its tokenizer would produce."""
    from loopdyn.data import load_text
    from loopdyn.models import protocol

    vocab, max_len = protocol.token_limits(model)
    S = seq_len if seq_len is not None else min(DEFAULT_SEQ_LEN, max_len or DEFAULT_SEQ_LEN)
    if S < 2:
        raise InputError(f"--seq-len must be at least 2, got {S}")
    if max_len is not None and S > max_len:
        raise InputError(f"a probe of {S} tokens is longer than the model's context ({max_len} tokens)")
    if not 1 <= batch_size <= 64:
        raise InputError(f"--batch-size must be in [1, 64], got {batch_size}")
    text = load_text(data, max_bytes=None if data else CORPUS_BYTES)
    x, _ = text.val_batches(1, batch_size, S)[0]
    note = ""
    if vocab is not None and vocab < 256:
        x = x % vocab
        note = f", byte ids modulo the vocabulary ({vocab})"
    elif vocab is not None and vocab > 256:
        note = f"; byte ids < 256 are valid ids of the {vocab}-id vocabulary (not its tokenizer's text)"
    return x.to(device), f"{batch_size} × {S} byte ids from {text.source}{note}"
