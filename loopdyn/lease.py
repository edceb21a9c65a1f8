"""A coordinator's lease on a shared output folder: exclusivity that holds across machines.

`flock` is not honoured by every network file system (NFS among them), so a grid coordinator
running on one node could not see another one, on another node, writing the same `--out`.
The lease is a small JSON file, `out/.loopdyn.lease`:

    {"host": "node-a", "pid": 4121, "token": "9f…", "acquired": …, "renewed": …, "expires": …}

(times in seconds since the epoch, UTC). Its holder renews it from a background thread every
`ttl / 4` seconds, pushing `expires` to `now + ttl`. Another coordinator

- is refused while the lease is live (not expired), naming the holder's host and pid;
- takes it over once it has expired (its holder died, lost the network, or froze), or at once
  when the holder ran on this same host and its process is gone.

Only two operations that are atomic on NFS are used: `link` to create the file when absent
(fails if it exists) and `rename` to replace or remove it; nothing is ever written in place,
so a reader never sees half a lease. A takeover removes the expired lease under a guard file
(`.loopdyn.lease.takeover`, itself created by `link`), after checking again, under the guard,
that the lease is still the expired one: of several coordinators racing for an expired lease
one wins and the others are refused. Each renewal first checks that the file still holds
the holder's token: a holder that stalled past its expiry and was replaced learns it at its
next renewal (`check()` then raises) and stops instead of writing on. Expiry compares clocks
of different machines: they are assumed synchronised (NTP) to well within `ttl`.

`LOOPDYN_LEASE_SECONDS` sets the default ttl (60 s); `LOOPDYN_HOSTNAME` the host name
recorded (default: the machine's), e.g. where containers share one host name.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from loopdyn.models.errors import InputError

LEASE = ".loopdyn.lease"
DEFAULT_TTL = 60.0
TAKEOVER_STALE = 10.0  # seconds after which a takeover guard left by a dead coordinator is removed


def hostname() -> str:
    return os.environ.get("LOOPDYN_HOSTNAME") or socket.gethostname()


def default_ttl() -> float:
    try:
        return max(0.5, float(os.environ.get("LOOPDYN_LEASE_SECONDS", DEFAULT_TTL)))
    except ValueError:
        return DEFAULT_TTL


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def read_lease(path: Path) -> dict | None:
    """The lease at `path`, or None when there is none. A file that is not a lease reads as an
    empty dict (judged by its age)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


class LeaseLost(InputError):
    """Another coordinator took the lease over while this one still ran."""


class Lease:
    """Hold `out/.loopdyn.lease` for the life of a `with` block (nestable in one process)."""

    _held: dict[str, list] = {}  # realpath of a lease this process holds → [Lease, depth]

    def __init__(self, out: str | os.PathLike, ttl: float | None = None, host: str | None = None):
        self.out = Path(out)
        self.path = self.out / LEASE
        self.ttl = float(ttl) if ttl is not None else default_ttl()
        self.host = host or hostname()
        self.pid = os.getpid()
        self.token = uuid.uuid4().hex
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._owner: Lease | None = None  # the outer Lease when nested

    # ---- the file ------------------------------------------------------------------------

    def _content(self, acquired: float | None = None) -> dict:
        now = time.time()
        return {"host": self.host, "pid": self.pid, "token": self.token, "acquired": acquired or now,
                "renewed": now, "expires": now + self.ttl, "ttl": self.ttl}

    def _write_temp(self, content: dict) -> Path:
        tmp = self.out / f"{LEASE}.{self.token}.{time.monotonic_ns()}.tmp"
        with open(tmp, "w") as f:
            json.dump(content, f)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def holder_alive(self, lease: dict) -> bool:
        """Is the lease `lease` (read from the file) still in force?"""
        if not lease:  # not a lease: judge by the file's age
            try:
                return time.time() - self.path.stat().st_mtime < self.ttl
            except OSError:
                return False
        if lease.get("host") == self.host and isinstance(lease.get("pid"), int):
            if lease["pid"] == self.pid and lease.get("token") != self.token:
                return False  # an earlier lease of this very process (it was not released)
            if not pid_alive(lease["pid"]):
                return False  # same machine, its process is gone: no need to wait for expiry
        try:
            return float(lease.get("expires", 0)) > time.time()
        except (TypeError, ValueError):
            return False

    def describe(self, lease: dict) -> str:
        if not lease:
            return f"{self.out}: in use by another loopdyn coordinator (unreadable lease {self.path})"
        now = time.time()
        renewed = now - float(lease.get("renewed", now))
        left = float(lease.get("expires", now)) - now
        return (f"{self.out}: in use by a loopdyn coordinator on {lease.get('host')} (pid {lease.get('pid')}); "
                f"its lease was renewed {renewed:.0f} s ago and expires in {max(left, 0):.0f} s unless renewed; "
                f"wait for it to finish or choose another --out")

    # ---- acquire / renew / release -------------------------------------------------------

    def acquire(self) -> "Lease":
        key = os.path.realpath(self.path)
        held = Lease._held.get(key)
        if held is not None:  # this process holds it already (a command around run_grid)
            held[1] += 1
            self._owner = held[0]
            return self
        self.out.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            tmp = self._write_temp(self._content())
            try:
                os.link(tmp, self.path)  # atomic create-if-absent, also on NFS
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links: exclusive create (atomic on NFSv3+)
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    pass
                else:
                    with os.fdopen(fd, "w") as f:
                        json.dump(self._content(), f)
                    os.unlink(tmp)
                    return self._start(key)
            else:
                os.unlink(tmp)
                if (read_lease(self.path) or {}).get("token") == self.token:
                    return self._start(key)
                continue
            os.unlink(tmp)
            current = read_lease(self.path)
            if current is None:
                continue  # released meanwhile
            if self.holder_alive(current):
                raise InputError(self.describe(current))
            self._take_over(current)
        raise InputError(f"{self.out}: could not take the lease {self.path} (other coordinators keep racing for it)")

    def _take_over(self, expired: dict) -> None:
        """Remove the expired lease `expired`, under a short-lived guard file so that two
        coordinators never both remove a lease (the second would remove the first's new one)."""
        guard = self.out / f"{LEASE}.takeover"
        tmp = self._write_temp({"host": self.host, "pid": self.pid, "token": self.token})
        try:
            os.link(tmp, guard)
        except FileExistsError:
            try:
                stale = time.time() - guard.stat().st_mtime > TAKEOVER_STALE
            except FileNotFoundError:
                stale = False
            if stale:  # a coordinator died in the middle of a takeover
                self._remove(guard)
            else:
                time.sleep(0.05)
            return
        finally:
            os.unlink(tmp)
        try:
            current = read_lease(self.path)
            if current is not None and current.get("token") == expired.get("token") and not self.holder_alive(current):
                self._remove(self.path)
        finally:
            self._remove(guard)

    def _remove(self, path: Path) -> None:
        aside = path.with_name(f"{path.name}.removed.{self.token}")
        try:
            os.rename(path, aside)
            os.unlink(aside)
        except FileNotFoundError:
            pass

    def _start(self, key: str) -> "Lease":
        Lease._held[key] = [self, 1]
        self._acquired = time.time()
        self._thread = threading.Thread(target=self._heartbeat, name="loopdyn-lease", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        every = max(0.05, self.ttl / 4)
        while not self._stop.wait(every):
            try:
                self.renew()
            except OSError:
                pass  # a network hiccup: try again at the next beat (the lease lasts ttl)
            if self.lost:
                return

    def renew(self) -> None:
        if self.lost:
            return
        current = read_lease(self.path)
        if (current or {}).get("token") != self.token:
            who = f"{current.get('host')} (pid {current.get('pid')})" if current else "nobody (removed)"
            self.lost = (f"{self.out}: this coordinator lost its lease to {who}: it stalled past its expiry "
                         f"and another coordinator took over; stopping")
            return
        tmp = self._write_temp(self._content(self._acquired))
        os.replace(tmp, self.path)

    def check(self) -> None:
        """Raise LeaseLost if another coordinator took the lease over."""
        owner = self._owner or self
        if owner.lost:
            raise LeaseLost(owner.lost)

    def release(self) -> None:
        key = os.path.realpath(self.path)
        if self._owner is not None:
            held = Lease._held.get(key)
            if held is not None:
                held[1] -= 1
            self._owner = None
            return
        Lease._held.pop(key, None)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if not self.lost and (read_lease(self.path) or {}).get("token") == self.token:
            aside = self.out / f"{LEASE}.released.{self.token}"
            try:  # rename then unlink: never removes a lease another coordinator just wrote
                os.rename(self.path, aside)
                if (read_lease(aside) or {}).get("token") != self.token:
                    os.link(aside, self.path)
                os.unlink(aside)
            except OSError:
                pass

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
