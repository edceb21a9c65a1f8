"""File safety in one place: outputs that never lose data and never overwrite an input.

docs/design.md ("Files loopdyn writes") states the rules; this module is their only home.
It imports only the standard library and `filelock`, so every package (`loopdyn.models` too)
uses it without importing torch.

- `atomic_write_bytes` (and the text/JSON forms) write to a temporary file in the target's
  folder, then rename it over the target: a killed process leaves the old file or the whole new
  one, never half a file. The temporary name is recognisably loopdyn's (`temp_name`),
  `.<name>.loopdyn-<pid>-<random>.tmp`; it is removed on every exit path Python sees, and one left
  by a process that was killed outright (kill -9) is removed by the next write into that folder
  (any such name whose pid is dead; nothing else is ever touched).
- Results get the permissions a plain `open(path, "w")` would give: an existing file keeps its
  mode, a new one gets 0666 minus the umask (mkstemp alone would give 0600).
- `JsonlWriter` appends one JSON object per line and never leaves half a line: each line is one
  write whose byte count is checked; a short write (a full disk) is cut back and reported.
- `check_output` / `check_outputs` look at output paths before any work starts, so a bad
  `--json` or `--save` costs nothing, and refuse an output that names another
  output, or is or would overwrite an input (`loopdyn.iocheck`).
- `OutLock`: one process per output folder (`--out`), a `filelock.FileLock` on
  `<out>/.loopdyn.lock`, which holds the owner's pid.
- Errors name the user's path, never a temporary name: `WriteError` (an `InputError`, so the
  command line prints one line and exits 1).
"""
from __future__ import annotations

import contextlib
import enum
import errno
import json
import math
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any

import filelock

from loopdyn.errors import InputError

TMP_TAG = "loopdyn"  # every temporary name loopdyn makes contains ".loopdyn-<pid>-"
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.loopdyn-(?P<pid>\d+)-[0-9a-f]+\.tmp$")


class WriteError(InputError):
    """An output could not be written (full disk, no permission, a folder in the way, ...)."""


def describe_os_error(err: OSError) -> str:
    """'no space left on device' style text for an OSError, without its file name."""
    if err.errno == errno.ENOSPC:
        return "no space left on device (disk full)"
    if err.errno == errno.EDQUOT:
        return "disk quota exceeded"
    if err.errno == errno.EFBIG:
        return "file too large for this file system (or the file size limit)"
    return (err.strerror or str(err)).lower() if err.strerror else str(err)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file under the current umask."""
    return 0o666 & ~_umask()


def _target_mode(path: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)  # a plain overwrite keeps the file's mode
    except OSError:
        return new_file_mode()


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{TMP_TAG}-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return True
    return True


def remove_stale_temps(folder: Path, name: str | None = None) -> list[Path]:
    """Remove temporary files loopdyn left in `folder` when its process was killed outright.

    Only names of loopdyn's own pattern whose process is gone are touched (and, with `name`,
    only those of that target). Returns the removed paths."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TMP_RE.match(entry.name)
        if not m or (name is not None and m.group("name") != name):
            continue
        if _pid_alive(int(m.group("pid"))):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def fill_temp(path: Path, write, mode: int | None = None) -> Path:
    """Write a temporary file next to `path` through `write(tmp_path)`, fsync it and give it
    the final mode; return its name. It is removed if anything fails (KeyboardInterrupt too);
    OSErrors become a `WriteError` naming `path`."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WriteError(f"{path}: cannot create the folder {folder} ({describe_os_error(err)})") from None
    remove_stale_temps(folder)  # of any name: every write to a folder cleans what dead processes left
    if path.is_dir():
        raise WriteError(f"{path}: is a folder, not a file")
    tmp = temp_name(path)
    final_mode = _target_mode(path) if mode is None else mode
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, final_mode)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise WriteError(f"{path}: cannot write: {describe_os_error(err)}") from None
        raise
    return tmp


def write_file_atomically(path: str | os.PathLike, write, mode: int | None = None) -> Path:
    """Create `path` through `write(tmp_path)`, then rename it into place (see `fill_temp`)."""
    path = Path(path)
    tmp = fill_temp(path, write, mode)
    try:
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise WriteError(f"{path}: cannot write: {describe_os_error(err)}") from None
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            view = memoryview(data)
            while view:
                n = f.write(view)
                if not n:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                view = view[n:]
            f.flush()

    return write_file_atomically(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(json_safe(obj), indent=indent, allow_nan=False) + "\n")


# ---- output paths, checked before any work -------------------------------------------------

def _first_existing(path: Path) -> Path:
    p = path
    while not os.path.lexists(p):
        if p.parent == p:
            break
        p = p.parent
    return p


def check_output(path: str | os.PathLike | None, option: str, kind: str = "file") -> Path | None:
    """Check that `path` can be written as a `kind` ("file" or "dir") before the work starts.

    The folders it needs may not exist yet (they are made on writing), but the nearest existing
    one must be a writable folder; an existing file must not be a folder (and a folder not a
    file), a FIFO or a device. Raises `WriteError` naming the option and the user's path."""
    if path is None:
        return None
    path = Path(path)
    where = f"{option} {path}" if option else str(path)
    if str(path) == "":
        raise WriteError(f"{option}: empty path")
    if os.path.lexists(path):
        try:
            st = os.stat(path)
        except OSError as err:
            raise WriteError(f"{where}: {describe_os_error(err)}") from None
        if kind == "file":
            if stat.S_ISDIR(st.st_mode):
                raise WriteError(f"{where}: is a folder, not a file")
            if not stat.S_ISREG(st.st_mode):
                raise WriteError(f"{where}: is not a regular file (a FIFO or a device?)")
            folder = path.parent
        else:
            if not stat.S_ISDIR(st.st_mode):
                raise WriteError(f"{where}: exists and is not a folder")
            folder = path
    else:
        folder = path.parent
    anchor = _first_existing(folder)
    if not anchor.is_dir():
        raise WriteError(f"{where}: {anchor} is a file, not a folder")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise WriteError(f"{where}: no permission to write in {anchor}")
    return path


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync a folder, so the renames made in it survive a power cut (where the OS allows)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_outputs(files: dict[str, str | os.PathLike | None] | None = None,
                  dirs: dict[str, str | os.PathLike | None] | None = None,
                  inputs: dict[str, str | os.PathLike | None] | list | None = None) -> None:
    """Check every output path (option → path) before any work, and that no two outputs are the
    same file and no output is, or would overwrite, an input (`loopdyn.iocheck`: by resolved
    path and inode, a checkpoint's files, a folder that is read). `inputs` is a list of
    `loopdyn.iocheck.Input` (or option → path of a file or folder that is read). Errors name the
    option and the user's path."""
    from loopdyn.iocheck import check_outputs_against_inputs, file_input

    files, dirs = dict(files or {}), dict(dirs or {})
    for option, path in files.items():
        check_output(path, option, kind="file")
    for option, path in dirs.items():
        check_output(path, option, kind="dir")
    if isinstance(inputs, dict):
        inputs = [file_input(option, path) for option, path in inputs.items()]
    outputs = {**{o: (p, "file") for o, p in files.items()}, **{o: (p, "dir") for o, p in dirs.items()}}
    check_outputs_against_inputs(outputs, list(inputs or []))


# ---- JSON Lines ----------------------------------------------------------------------------

def write_whole(f, data: bytes, path: str | os.PathLike) -> None:
    """Append `data` to the unbuffered binary file `f` completely, or not at all.

    Checks the byte count of every write; on a short or failed write the file is truncated
    back to where it was, so it never ends in a partial line, and a `WriteError` naming `path`
    is raised."""
    start = f.seek(0, os.SEEK_END)
    view = memoryview(data)
    try:
        while view:
            n = f.write(view)
            if n is None or n <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = view[n:]
    except OSError as err:
        with contextlib.suppress(OSError, ValueError):
            f.truncate(start)
        raise WriteError(f"{path}: cannot write: {describe_os_error(err)}; "
                         f"the file keeps its {'first ' if start else ''}complete lines") from None
    except BaseException:
        with contextlib.suppress(OSError, ValueError):
            f.truncate(start)
        raise


class JsonlWriter:
    """Append JSON objects to a file, one per line, each with one checked write.

    Every line is complete on disk as soon as `write` returns (no buffering), so a run that is
    killed leaves only whole lines; a short write (full disk) is cut back (`write_whole`).
    `fresh=True` truncates the file first."""

    def __init__(self, path: str | os.PathLike, fresh: bool = True):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if fresh else 0)
            fd = os.open(self.path, flags, 0o666)
        except OSError as err:
            raise WriteError(f"{self.path}: cannot write: {describe_os_error(err)}") from None
        self._file = os.fdopen(fd, "ab", buffering=0)

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            raise ValueError(f"{self.path}: writer is closed")
        line = (json.dumps(json_safe(record), allow_nan=False) + "\n").encode("utf-8")
        write_whole(self._file, line, self.path)

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def json_safe(obj: Any) -> Any:
    """Plain JSON types: 0-d tensors and numpy scalars become numbers, paths strings, tuples
    lists, enums their values (the verdict words), and NaN/±Inf null (JSON has no such numbers)."""
    if isinstance(obj, enum.Enum):
        return json_safe(obj.value)
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return json_safe(obj.tolist())  # tensors and numpy arrays/scalars
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ---- one process per output folder --------------------------------------------------------

class OutLock:
    """An exclusive lock on an output folder, so two processes never write one `--out`.

    The lock is a `filelock.FileLock` on `out/.loopdyn.lock` (an `flock`, which the kernel
    releases when the process ends in any way, kill -9 included, so a lock left by a dead
    process is simply taken over; filelock falls back to its own marker file where flock does
    not exist). The file holds the owner's pid, which the refusal names. The same process may
    nest the lock (a command holding it around `run_grid`); the outermost release removes the
    file. Acquiring never waits: a folder in use is refused at once with an `InputError`."""

    NAME = ".loopdyn.lock"

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.path = self.out / self.NAME
        self._lock: filelock.BaseFileLock | None = None

    def acquire(self) -> "OutLock":
        if self._lock is not None:
            raise RuntimeError(f"{self.path}: this OutLock is held already")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise WriteError(f"{self.out}: cannot create the folder ({describe_os_error(err)})") from None
        # one FileLock per path in this process (is_singleton), shared by every thread: nesting
        # only counts up, and a second OutLock on the same folder is that nesting
        lock = filelock.FileLock(self.path, timeout=0, thread_local=False, is_singleton=True)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            holder = self.holder()
            raise InputError(f"{self.out}: in use by another loopdyn process"
                             f"{f' (pid {holder})' if holder else ''}; wait for it to finish or "
                             f"choose another --out") from None
        except OSError as err:
            raise WriteError(f"{self.path}: cannot take the lock ({describe_os_error(err)})") from None
        self._lock = lock
        if lock.lock_counter == 1 and not _soft_marker(lock):
            try:
                fd = os.open(self.path, os.O_WRONLY)
                try:
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                finally:
                    os.close(fd)
            except BaseException:
                self.release()
                raise
        return self

    def holder(self) -> int | None:
        """The pid written in the lock file (its owner's, or a dead owner's), if any."""
        try:
            with open(self.path, "rb") as f:
                text = f.read(64).decode("ascii", "replace").split("\n", 1)[0].strip()
            return int(text) if text else None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is None:
            return
        if lock.lock_counter == 1 and not _soft_marker(lock):
            # unlinked while still held: a process that opened the old file sees it gone
            # (filelock checks the link count after locking) and retries on a new one
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        lock.release()

    def __enter__(self) -> "OutLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _soft_marker(lock: filelock.BaseFileLock) -> bool:
    """Whether filelock fell back to its own marker file (no flock here): the file is then
    filelock's, holding its own owner record, and loopdyn neither writes nor removes it."""
    try:
        lock.pid  # only the soft fallback has a marker to read
    except AttributeError:
        return False
    return True
# ---- small input files, read bounded ---------------------------------------------------------

CONFIG_LIMIT = 16 << 20  # a config.json is kilobytes; 16 MiB leaves room for embedded tables
INDEX_LIMIT = 256 << 20  # a weight index lists every tensor: megabytes for the largest models
CSV_LIMIT = 256 << 20  # measurements: one row per (model, setting)


def describe_read_error(err: OSError, path: str | os.PathLike) -> str:
    """'PATH: no permission to read it' style text naming the cause of a failed read."""
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"{path}: no permission to read it ({describe_os_error(err)})"
    if err.errno == errno.ELOOP:
        return f"{path}: a symlink loop (the link points, directly or not, back to itself)"
    if err.errno == errno.ENOENT:
        return f"{path}: no such file"
    if err.errno == errno.EISDIR:
        return f"{path}: is a folder, not a file"
    return f"{path}: cannot read ({describe_os_error(err)})"


def file_kind(mode: int) -> str:
    """'a FIFO (named pipe)', 'a device', ... for a file that is not a regular file or a folder."""
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def read_small(path: str | os.PathLike, limit: int, what: str = "file") -> bytes:
    """The bytes of a small regular file, refused (InputError naming the file and the limit)
    before reading when it is larger than `limit`; a FIFO or a device is refused at once (opened
    without blocking), and errors name their cause (permission, symlink loop, missing)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise InputError(describe_read_error(err, path)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{path}: is {file_kind(st.st_mode)}, not a regular {what}")
        if st.st_size > limit:
            raise InputError(f"{path}: {st.st_size:,} bytes, more than the {limit:,} a {what} may have; "
                             f"not reading it")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise InputError(f"{path}: more than the {limit:,} bytes a {what} may have; not reading it")
        return b"".join(chunks)
    except OSError as err:
        raise InputError(describe_read_error(err, path)) from None
    finally:
        os.close(fd)


def read_small_json(path: str | os.PathLike, limit: int = CONFIG_LIMIT, what: str = "JSON file") -> Any:
    """A small JSON file (`read_small`): InputError for bad UTF-8, bad JSON or nesting too deep."""
    data = read_small(path, limit, what)
    try:
        return json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply to be a {what}") from None
