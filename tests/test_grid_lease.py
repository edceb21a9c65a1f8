"""The coordinator's lease on a shared --out: refused while held, taken over when expired or
when its holder (same host) is gone, lost by a holder that stalled past its expiry. Holders are
real processes; "other hosts" are simulated with LOOPDYN_HOSTNAME (the folder is shared)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from loopdyn.cli import main
from loopdyn.lease import LEASE, Lease, LeaseLost, read_lease
from loopdyn.models.errors import InputError

ROOT = Path(__file__).resolve().parents[1]

HOLDER = textwrap.dedent("""
    import sys, time
    from loopdyn.lease import Lease, LeaseLost
    lease = Lease(sys.argv[1], ttl=float(sys.argv[2])).acquire()
    print("held", flush=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            lease.check()
        except LeaseLost as err:
            print("lost:", err, flush=True)
            sys.exit(0)
        time.sleep(0.05)
""")


def holder(out: Path, ttl: float, host: str | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    if host:
        env["LOOPDYN_HOSTNAME"] = host
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(ttl)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_same_host_refused_while_held_and_a_dead_holder_is_taken_over_at_once(tmp_path):
    out = tmp_path / "cmp"
    proc = holder(out, ttl=60)
    try:
        with pytest.raises(InputError) as info:
            Lease(out, ttl=60).acquire()
        message = str(info.value)
        assert f"on {socket.gethostname()} (pid {proc.pid})" in message and "in use" in message
        assert "\n" not in message
    finally:
        stop(proc)  # kill -9: the lease stays behind, 60 s from expiry
    lease = read_lease(out / LEASE)
    assert lease["pid"] == proc.pid and lease["expires"] > time.time() + 30
    start = time.time()
    with Lease(out, ttl=60) as mine:  # same host, its process is gone: no waiting for the expiry
        assert time.time() - start < 5
        assert read_lease(out / LEASE)["token"] == mine.token
        with Lease(out):  # the same process may nest
            pass
        assert (out / LEASE).exists()
    assert not (out / LEASE).exists()  # released


def test_other_host_refused_while_it_renews_then_taken_over_after_expiry(tmp_path):
    out, ttl = tmp_path / "shared", 2.0
    proc = holder(out, ttl=ttl, host="node-a")
    try:
        first = read_lease(out / LEASE)
        time.sleep(1.5 * ttl)  # longer than one lease: only the heartbeat keeps it
        renewed = read_lease(out / LEASE)
        assert renewed["token"] == first["token"] and renewed["expires"] > first["expires"]
        with pytest.raises(InputError, match="on node-a"):
            Lease(out, ttl=ttl, host="node-b").acquire()
        proc.kill()  # node-a dies: node-b cannot see its process, it must wait for the expiry
        proc.wait()
        expires = read_lease(out / LEASE)["expires"]
        while time.time() < expires - 0.3:
            with pytest.raises(InputError, match="on node-a"):
                Lease(out, ttl=ttl, host="node-b").acquire()
            time.sleep(0.2)
        time.sleep(max(0.0, expires - time.time()) + 0.05)
        with Lease(out, ttl=ttl, host="node-b") as lease:
            assert time.time() >= expires
            assert read_lease(out / LEASE)["host"] == "node-b" and read_lease(out / LEASE)["token"] == lease.token
    finally:
        stop(proc)


def test_a_holder_that_stalls_past_its_expiry_loses_the_lease_and_stops(tmp_path):
    out, ttl = tmp_path / "shared", 1.0
    proc = holder(out, ttl=ttl, host="node-a")
    try:
        os.kill(proc.pid, signal.SIGSTOP)  # frozen (a suspended VM, a long GC, a network partition)
        time.sleep(ttl + 0.5)
        with Lease(out, ttl=30, host="node-b") as lease:
            os.kill(proc.pid, signal.SIGCONT)
            line = proc.stdout.readline()
            assert line.startswith("lost:") and "node-b" in line, line
            assert proc.wait(timeout=60) == 0
            assert read_lease(out / LEASE)["token"] == lease.token  # its renewal did not overwrite ours
            lease.check()
    finally:
        os.kill(proc.pid, signal.SIGCONT) if proc.poll() is None else None
        stop(proc)


RACER = textwrap.dedent("""
    import sys, time
    from loopdyn.lease import Lease
    from loopdyn.models.errors import InputError
    while time.time() < float(sys.argv[2]):
        time.sleep(0.001)
    try:
        Lease(sys.argv[1], ttl=60).acquire()
        print("won", flush=True)
        time.sleep(3)
    except InputError as err:
        print("refused", flush=True)
""")


def test_racing_coordinators_on_an_expired_lease_one_wins(tmp_path):
    out = tmp_path / "shared"
    out.mkdir()
    (out / LEASE).write_text(json.dumps({"host": "node-z", "pid": 1, "token": "old", "renewed": 0, "expires": 1}))
    go = time.time() + 8  # all start together, after their imports
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(out), str(go)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "LOOPDYN_HOSTNAME": f"node-{i}"}) for i in range(3)]
    try:
        results = [p.communicate(timeout=120)[0].strip() for p in procs]
    finally:
        for p in procs:
            stop(p)
    assert sorted(results) == ["refused", "refused", "won"], results


def test_compare_is_refused_with_one_line_while_another_host_holds_the_lease(tmp_path, capsys, monkeypatch):
    out = tmp_path / "cmp"
    proc = holder(out, ttl=30, host="node-a")
    try:
        monkeypatch.setenv("LOOPDYN_HOSTNAME", "node-b")
        code = main(["compare", "--injections", "diagonal", "--lrs", "0.01", "--steps", "1", "--out", str(out),
                     "--no-progress"])
        err = capsys.readouterr().err
        assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert "on node-a" in err and f"pid {proc.pid}" in err
        assert not (out / "runs").exists()
    finally:
        stop(proc)


def test_lease_lost_is_an_input_error():
    assert issubclass(LeaseLost, InputError)
