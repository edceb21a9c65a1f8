"""The Slurm launcher: one Slurm job array per grid, through submitit.

Each run is one array task asking for `--cpus-per-run` cores, `--gpus-per-run` GPUs and
`--mem-per-run` GiB on `--slurm-partition` for `--slurm-time`, plus any `--slurm-sbatch`
lines; `--jobs` caps how many run at once (`--array=0-N%jobs`). The array is submitted from
this machine (a login node) with `sbatch`, and runs on the nodes; the coordinator stays here,
watching the shared `--out`.

Preemption and time limits: the script carries `#SBATCH --requeue` and
`#SBATCH --signal=USR2@120`. A run that receives SIGTERM (preemption) or USR2 (the time
limit is near) is checkpointed by submitit (`__submitit_checkpoint__`: the same run again)
and requeued, at most `--retries` times for time limits; the requeued run starts afresh in a
new attempt folder (the interrupted attempt leaves nothing in `runs/`).

Logs are where submitit puts them, in `--out/slurm/`: `<jobid>_<index>_0_log.out` and
`..._log.err` (index = the run's place in the grid); the submitted script is next to them.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from loopdyn.gridstore import Resources, Task, execute
from loopdyn.launchers.base import Event, Launcher, need
from loopdyn.models.errors import InputError

SIGNAL_DELAY = 120  # seconds between submitit's USR2 and the time limit


class SlurmRun:
    """The callable each array task runs: one grid run, requeued when preempted."""

    def __call__(self, task: Task) -> dict:
        import submitit

        env = submitit.JobEnvironment()
        usr = signal.getsignal(env._usr_sig())
        if callable(usr):  # submitit's checkpoint-and-requeue handler: SIGTERM (preemption) takes it too
            signal.signal(signal.SIGTERM, usr)
        try:
            log = str(env.paths.stderr)
        except Exception:  # noqa: BLE001 - only the log's path
            log = None
        return execute(task, log_path=log)

    def __submitit_checkpoint__(self, task: Task):
        """On preemption or time-out: requeue the same run (it starts afresh in a new attempt)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, task)


def _reason(err: BaseException) -> str:
    """The last line of a failed job's traceback, e.g. 'RuntimeError: CUDA out of memory'."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in reversed(lines):
        if ":" in line and not line.startswith(("File ", "raise ", "^")):
            return line[:300]
    return (lines[-1] if lines else type(err).__name__)[:300]


class SlurmLauncher(Launcher):
    name = "slurm"

    def __init__(self, resources: Resources | None = None, partition: str | None = None, time_min: int = 60,
                 extra: dict | None = None, retries: int = 3, parallelism: int | None = None,
                 cluster: str = "slurm", job_name: str = "loopdyn-compare"):
        self.submitit = need("submitit", "slurm", "--launcher slurm")
        self.resources = resources or Resources()
        self.partition, self.time_min, self.extra = partition, int(time_min), dict(extra or {})
        self.retries_on_loss = retries
        self.parallelism = parallelism
        self.cluster = cluster  # "slurm", or "local": submitit's LocalExecutor (real subprocesses, no sbatch)
        self.job_name = job_name
        self.threads = self.resources.cpus
        self.jobs = parallelism or 1
        self._jobs: dict = {}  # submitit Job → run name
        if cluster == "slurm":
            import shutil

            if shutil.which("sbatch") is None or shutil.which("srun") is None:
                raise InputError("--launcher slurm: sbatch/srun not found on this machine; run loopdyn compare "
                                 "on a Slurm login node")

    def describe(self) -> str:
        r = self.resources
        return (f"slurm{'' if self.cluster == 'slurm' else ' (submitit local executor)'}"
                f"{f' partition {self.partition}' if self.partition else ''}: {r.cpus} CPU(s)"
                + (f", {r.gpus} GPU(s)" if r.gpus else "") + (f", {r.mem_gb:g} GiB" if r.mem_gb else "")
                + f", {self.time_min} min per run")

    def parameters(self) -> dict:
        """submitit.SlurmExecutor parameters (= the #SBATCH options) for one run."""
        from submitit.slurm.slurm import _convert_mem

        r = self.resources
        params: dict = {"job_name": self.job_name, "time": self.time_min, "cpus_per_task": r.cpus,
                        "signal_delay_s": SIGNAL_DELAY, "stderr_to_stdout": False,
                        "additional_parameters": {"requeue": True, **self.extra}}
        if self.partition:
            params["partition"] = self.partition
        if r.gpus:
            params["gpus_per_node"] = r.gpus
        if r.mem_gb:
            params["mem"] = _convert_mem(r.mem_gb)
        if self.parallelism:
            params["array_parallelism"] = self.parallelism
        return params

    def script(self, n_runs: int, folder: str | os.PathLike) -> str:
        """The sbatch script of the grid's job array (the text submitit hands to sbatch)."""
        from submitit.slurm.slurm import _make_sbatch_string

        command = " ".join([sys.executable, "-u -m submitit.core._submit", str(folder)])
        try:
            return _make_sbatch_string(command=command, folder=folder, map_count=n_runs, **self.parameters())
        except ValueError as err:
            raise InputError(f"--launcher slurm: {str(err).splitlines()[0]}") from None

    def executor(self, folder: Path):
        submitit = self.submitit
        if self.cluster == "local":
            ex = submitit.LocalExecutor(folder=folder, max_num_timeout=self.retries_on_loss)
            ex.update_parameters(timeout_min=self.time_min, signal_delay_s=min(SIGNAL_DELAY, 10))
            return ex
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=self.retries_on_loss)
        ex.update_parameters(**self.parameters())
        return ex

    def submit(self, tasks: list[Task], out: Path) -> None:
        if not tasks:
            return
        folder = Path(out).resolve() / "slurm"
        folder.mkdir(parents=True, exist_ok=True)
        ex = self.executor(folder)
        if self.cluster == "slurm":
            from loopdyn.io import atomic_write_text

            atomic_write_text(folder / f"array-{time.strftime('%Y%m%d-%H%M%S')}.sbatch", self.script(len(tasks), folder))
        try:
            jobs = ex.map_array(SlurmRun(), tasks)
        except Exception as err:  # noqa: BLE001 - sbatch refused the array: say why in one line
            raise InputError(f"--launcher slurm: submitting the job array failed: {_reason(err)}") from None
        for job, task in zip(jobs, tasks):
            self._jobs[job] = task.name

    def log_path(self, job) -> str:
        try:
            return str(job.paths.stderr)
        except Exception:  # noqa: BLE001
            return ""

    def poll(self, timeout: float) -> list[Event]:
        deadline = time.monotonic() + timeout
        events: list[Event] = []
        while not events:
            for job in list(self._jobs):
                if not job.done():
                    continue
                name = self._jobs.pop(job)
                try:
                    job.result()
                    events.append(Event(name, "ended", log=self.log_path(job)))
                except Exception as err:  # noqa: BLE001 - the job failed: keep why and where its log is
                    events.append(Event(name, "failed", _reason(err), log=self.log_path(job)))
            if events or time.monotonic() >= deadline:
                break
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        return events

    def shutdown(self, cancel: bool = False) -> None:
        if cancel:
            for job in list(self._jobs):
                try:
                    job.cancel(check=False)
                except Exception:  # noqa: BLE001 - best effort on the way out
                    pass
        self._jobs.clear()
