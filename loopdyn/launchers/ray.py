"""The Ray launcher: one Ray task per grid run, on the cluster at `--ray-address`.

- `--ray-address auto` joins the cluster this machine belongs to (`ray start` ran here),
  `ray://HOST:PORT` connects through the Ray client, HOST:PORT to a head node; without it a
  local Ray instance is started on this machine for the grid and stopped after it.
- Each task asks for `num_cpus` (= --cpus-per-run, also its torch threads), `num_gpus`
  (--gpus-per-run) and `memory` (--mem-per-run); Ray places it on a node that has them.
- A task whose worker process or node is lost is retried by Ray (`max_retries` = --retries);
  an exception inside the run is not retried (it would fail the same way): the run is failed,
  with the reason and its log path.

Every node must see the shared `--out` at the same path, and have loopdyn installed.
If Ray is already initialised in this process (a notebook, a test), that cluster is used
and left running.
"""
from __future__ import annotations

from pathlib import Path

from loopdyn.gridstore import Resources, Task, execute
from loopdyn.launchers.base import Event, Launcher, need


def _run(task: Task) -> dict:
    return execute(task)


class RayLauncher(Launcher):
    name = "ray"

    def __init__(self, address: str | None = None, resources: Resources | None = None, retries: int = 3,
                 init_kwargs: dict | None = None):
        self.ray = need("ray", "ray", "--launcher ray")
        self.address = address
        self.resources = resources or Resources()
        self.retries_on_loss = retries
        self.init_kwargs = init_kwargs or {}
        self.threads = self.resources.cpus
        self.jobs = 1
        self._refs: dict = {}  # ObjectRef → (run name, log path)
        self._owned = False  # this launcher started / connected Ray, and disconnects it after

    def describe(self) -> str:
        r = self.resources
        where = self.address or "a local Ray instance"
        return (f"ray ({where}): {r.cpus} CPU(s)"
                + (f", {r.gpus} GPU(s)" if r.gpus else "")
                + (f", {r.mem_gb:g} GiB" if r.mem_gb else "") + " per run")

    def _connect(self) -> None:
        ray = self.ray
        if ray.is_initialized():
            return
        from loopdyn.models.errors import InputError

        kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False,
                  **self.init_kwargs}
        try:
            ray.init(address=self.address or "local", **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as err:
            where = f"--ray-address {self.address}" if self.address else "a local Ray instance"
            raise InputError(f"--launcher ray: cannot connect to {where}: {str(err).splitlines()[0]}") from None
        self._owned = True
        try:
            cpus = int(ray.cluster_resources().get("CPU", 0))
            self.jobs = max(1, cpus // max(1, self.resources.cpus))
        except Exception:  # noqa: BLE001 - only for the report's header
            pass

    def submit(self, tasks: list[Task], out: Path) -> None:
        if not tasks:
            return
        self._connect()
        r = self.resources
        options = {"num_cpus": r.cpus, "num_gpus": r.gpus, "max_retries": self.retries_on_loss,
                   "retry_exceptions": False}
        if r.mem_gb:
            options["memory"] = int(r.mem_gb * 2 ** 30)
        remote = self.ray.remote(_run)
        for task in tasks:
            ref = remote.options(name=f"loopdyn {task.name}", **options).remote(task)
            self._refs[ref] = task.name

    def poll(self, timeout: float) -> list[Event]:
        if not self._refs:
            import time

            time.sleep(timeout)
            return []
        ray = self.ray
        ready, _ = ray.wait(list(self._refs), num_returns=len(self._refs), timeout=timeout, fetch_local=True)
        events = []
        for ref in ready:
            name = self._refs.pop(ref)
            try:
                ray.get(ref)
                events.append(Event(name, "ended"))
            except ray.exceptions.RayTaskError as err:  # the run raised: not retried
                cause = getattr(err, "cause", None) or err
                events.append(Event(name, "failed", f"{type(cause).__name__}: {cause}".splitlines()[0][:300]))
            except ray.exceptions.RayError as err:  # worker or node lost more than --retries times
                events.append(Event(name, "failed", f"{type(err).__name__}: lost its worker "
                                                    f"{self.retries_on_loss + 1} time(s) "
                                                    f"({str(err).splitlines()[0][:200]})"))
        return events

    def shutdown(self, cancel: bool = False) -> None:
        ray = self.ray
        if cancel and ray.is_initialized():
            for ref in list(self._refs):
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 - best effort on the way out
                    pass
        self._refs.clear()
        if self._owned and ray.is_initialized():
            ray.shutdown()
            self._owned = False
