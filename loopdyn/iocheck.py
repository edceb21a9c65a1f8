"""An output may never be an input: one check of every output path against every input of a command.

A command names its inputs (`Input`: the files it reads, and the folders whose whole content it
reads) and its outputs (option → path, a file or a folder). `check_outputs_against_inputs`
refuses, in one line and before any work, an output that

- is an input file, by resolved path (symlinks, `..`) or by inode (a hard link);
- is a folder that is read (a checkpoint folder, a `--data` folder, the default corpus);
- is an existing file inside a folder whose whole content is read (it would be read, then
  overwritten), or an output folder inside one (its files would join the corpus).

A checkpoint's inputs are all the files `loopdyn.models.load` may read from its folder: the
config, every weights file of any layout, the index and the shards it lists, and the copy kept in
`.loopdyn-backup/` (`checkpoint_input`).
"""
from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from loopdyn.io import WriteError


@dataclass(frozen=True)
class Input:
    """What one input option reads: `files` (each read whole), `folders` (read with every file
    inside them) and `protected` (folders that are read, but not all of whose files are inputs,
    e.g. a checkpoint folder: the folder itself may not be an output)."""

    option: str
    path: str
    files: tuple[Path, ...] = ()
    folders: tuple[Path, ...] = ()
    protected: tuple[Path, ...] = field(default=())


def _key(path: Path) -> tuple[str, tuple[int, int] | None]:
    """(resolved path, (device, inode) or None when it does not exist)."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
        ident = (st.st_dev, st.st_ino)
    except OSError:
        ident = None
    return real, ident


def file_input(option: str, path: str | os.PathLike | None) -> Input | None:
    """An input that is one file (a CSV, a FILE.py) or, when `path` is a folder, all of it."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        return Input(option, str(path), folders=(p,))
    return Input(option, str(path), files=(p,))


def data_input(option: str, path: str | os.PathLike | None) -> Input:
    """`--data PATH`: the file or folder; without one, the default corpus (the standard library)."""
    if path is None:
        import sysconfig

        root = Path(sysconfig.get_paths()["stdlib"])
        return Input(option, f"the default corpus ({root})", folders=(root,))
    return file_input(option, path)


# Files of a checkpoint folder besides the ones loopdyn reads, which other tools need (Hugging
# Face's generation config, tokenizer and remote code): an output may not overwrite them either.
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".py", ".model", ".tiktoken")
CHECKPOINT_PREFIXES = ("config", "generation_config", "tokenizer", "special_tokens_map", "vocab", "merges",
                       "added_tokens", "preprocessor_config", "chat_template")


def checkpoint_input(option: str, path: str | os.PathLike | None) -> Input | None:
    """Every file `loopdyn.models.load(path)` may read (config, weights of any layout, index,
    the shards it lists, the copy in `.loopdyn-backup/`), the checkpoint's other files (tokenizer,
    generation config, code: `CHECKPOINT_SUFFIXES`, `CHECKPOINT_PREFIXES`), and the folder."""
    if path is None:
        return None
    from loopdyn.models.checkpoint import BACKUP_DIR, OWN_FILES
    from loopdyn.models.importers.parcae import OFFICIAL_WEIGHT_FILES
    from loopdyn.models.formats import INDEX_FILES, SINGLE_FILES

    p = Path(path)
    if not os.path.lexists(p):
        return Input(option, str(path), files=(p,))
    directory = p if p.is_dir() else p.parent
    names = set(OWN_FILES) | set(OFFICIAL_WEIGHT_FILES) | set(SINGLE_FILES) | set(INDEX_FILES)
    files = [] if p.is_dir() else [p]
    for folder in (directory, directory / BACKUP_DIR):
        try:
            present = sorted(os.listdir(folder))
        except OSError:
            continue
        for name in present:
            if not (name in names or name.endswith(CHECKPOINT_SUFFIXES) or name.startswith(CHECKPOINT_PREFIXES)):
                continue
            files.append(folder / name)
            if name in INDEX_FILES:
                files += [folder / s for s in _shards(folder / name)]
    return Input(option, str(path), files=tuple(files), protected=(directory, directory / BACKUP_DIR))


def _shards(index: Path, limit: int = 64 << 20) -> list[str]:
    """The shard file names an index lists (none if it cannot be read: loading reports that)."""
    from loopdyn.io import read_small_json

    try:
        weight_map = read_small_json(index, limit, "weight index").get("weight_map", {})
        return sorted({v for v in weight_map.values() if isinstance(v, str) and Path(v).name == v})
    except (OSError, ValueError, AttributeError):
        return []


def _inside(real: str, folder_real: str) -> bool:
    return real == folder_real or real.startswith(folder_real.rstrip(os.sep) + os.sep)


def _linked_into(ident: tuple[int, int], folder: Path, limit: int = 200_000) -> Path | None:
    """A file inside `folder` with this (device, inode), if any (for hard links to a read file)."""
    seen = 0
    for root, dirs, names in os.walk(folder):
        for name in names:
            seen += 1
            if seen > limit:
                return None
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == ident:
                return Path(root, name)
    return None


def check_outputs_against_inputs(outputs: dict[str, tuple[str | os.PathLike | None, str]],
                                 inputs: list[Input | None]) -> None:
    """Refuse any output (option → (path, "file" | "dir")) that is, or would overwrite, an input.

    Raises `WriteError` (one line, exit 1 on the command line) naming both options and paths.
    Also refuses two outputs naming the same file or folder."""
    inputs = [i for i in inputs if i is not None]
    seen: dict[object, str] = {}
    for option, (path, kind) in outputs.items():
        if path is None:
            continue
        real, ident = _key(Path(path))
        where = f"{option} {path}"
        for key in (real, ident):
            if key is None:
                continue
            if key in seen and seen[key] != where:
                raise WriteError(f"{where}: the same file as {seen[key]}")
            seen[key] = where
        for inp in inputs:
            for f in inp.files:
                f_real, f_ident = _key(f)
                if real == f_real or (ident is not None and ident == f_ident):
                    what = "" if str(f) == inp.path else f" (read from {inp.path})"
                    raise WriteError(f"{where}: is the input {f} of {inp.option}{what}; "
                                     f"an output may not overwrite an input")
            for folder in inp.folders + inp.protected:
                f_real, f_ident = _key(folder)
                if f_ident is None:
                    continue
                if real == f_real or (ident is not None and ident == f_ident):
                    raise WriteError(f"{where}: is the folder {folder} that {inp.option} reads; "
                                     f"an output may not be an input")
            for folder in inp.folders:
                f_real, f_ident = _key(folder)
                if f_ident is None:
                    continue
                if _inside(real, f_real) and (kind == "dir" or ident is not None):
                    what = "an output folder" if kind == "dir" else "an existing file"
                    raise WriteError(f"{where}: is {what} inside {folder}, which {inp.option} reads; "
                                     f"an output may not be an input")
                if ident is not None and kind == "file":
                    try:
                        links = os.stat(real).st_nlink
                    except OSError:
                        links = 1
                    if links > 1:
                        twin = _linked_into(ident, folder)
                        if twin is not None:
                            raise WriteError(f"{where}: is a hard link of the input {twin} of {inp.option}; "
                                             f"an output may not overwrite an input")
