"""Where `loopdyn compare` runs its grid: `--launcher local|ray|slurm`.

- local (default): a process pool on this machine (loopdyn.launchers.local);
- ray: one Ray task per run on the cluster at `--ray-address` (loopdyn.launchers.ray);
- slurm: one Slurm job array per grid through submitit (loopdyn.launchers.slurm).

Ray and Slurm are optional extras (`pip install 'loopdyn[ray]'`, `'loopdyn[slurm]'`). Every
launcher's tasks write into the shared `--out` the same way (loopdyn.gridstore), so a grid
started on one launcher can be resumed on another.
"""
from __future__ import annotations

import argparse

from loopdyn.gridstore import Resources
from loopdyn.launchers.base import Event, Launcher
from loopdyn.models.errors import InputError

LAUNCHERS = ("local", "ray", "slurm")
__all__ = ["LAUNCHERS", "Event", "Launcher", "Resources", "add_launcher_options", "launcher_from_args",
           "launcher_options", "resources_from_args"]


def add_launcher_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where the runs execute (docs/cluster.md)")
    g.add_argument("--launcher", default="local", type=str.lower, choices=LAUNCHERS,
                   help="local: a process pool here; ray: tasks on a Ray cluster (pip install 'loopdyn[ray]'); "
                        "slurm: one Slurm job array (pip install 'loopdyn[slurm]') (default: local)")
    g.add_argument("--cpus-per-run", type=int, default=None, metavar="N",
                   help="CPU cores per run on ray/slurm, also its torch threads (default: --threads, else 1)")
    g.add_argument("--gpus-per-run", "--slurm-gpus-per-run", dest="gpus_per_run", type=int, default=0, metavar="N",
                   help="GPUs per run on ray/slurm (default: 0)")
    g.add_argument("--mem-per-run", "--slurm-mem", dest="mem_per_run", type=float, default=None, metavar="GB",
                   help="memory per run in GiB on ray/slurm (default: the scheduler's)")
    g.add_argument("--retries", type=int, default=3, metavar="N",
                   help="times a run is restarted after its worker is lost (ray) or it is preempted or times "
                        "out (slurm) (default: 3)")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="Ray cluster: 'auto' (the one this node belongs to), 'ray://HOST:PORT' (Ray client), "
                        "HOST:PORT (default: start a local Ray instance on this machine)")
    g.add_argument("--slurm-partition", default=None, metavar="NAME", help="Slurm partition (default: the cluster's)")
    g.add_argument("--slurm-time", default="60", metavar="TIME",
                   help="time limit per run: minutes, or HH:MM:SS, or D-HH:MM:SS (default: 60)")
    g.add_argument("--slurm-sbatch", action="append", default=[], metavar="LINE",
                   help="an extra #SBATCH option, e.g. --slurm-sbatch account=proj --slurm-sbatch=--qos=high; "
                        "repeatable (default: none)")


def slurm_minutes(text: str) -> int:
    """Minutes from a Slurm time: MM, HH:MM:SS, D-HH:MM:SS, D-HH (as sbatch reads them)."""
    text = str(text).strip()
    try:
        days, _, rest = text.rpartition("-")
        d = int(days) if days else 0
        parts = [int(x) for x in rest.split(":")]
        if d and len(parts) == 1:
            h, m, s = parts[0], 0, 0
        elif len(parts) == 1:
            h, m, s = 0, parts[0], 0
        elif len(parts) == 2:
            h, m, s = (parts[0], parts[1], 0) if d else (0, parts[0], parts[1])
        elif len(parts) == 3:
            h, m, s = parts
        else:
            raise ValueError
    except ValueError:
        raise InputError(f"--slurm-time: cannot read {text!r}; give minutes, HH:MM:SS or D-HH:MM:SS") from None
    minutes = d * 1440 + h * 60 + m + (1 if s else 0)
    if minutes < 1:
        raise InputError("--slurm-time must be at least one minute")
    return minutes


def sbatch_lines(lines: list[str]) -> dict[str, object]:
    """Extra `#SBATCH` lines ('--account=proj', '#SBATCH --qos=high', 'exclusive') as submitit's
    additional_parameters."""
    extra: dict[str, object] = {}
    for line in lines:
        text = line.strip()
        if text.startswith("#SBATCH"):
            text = text[len("#SBATCH"):].strip()
        text = text.lstrip("-")
        if not text or " " in text.split("=", 1)[0]:
            raise InputError(f"--slurm-sbatch: cannot read {line!r}; give one option like '--account=proj'")
        key, eq, value = text.partition("=")
        extra[key] = value if eq else True
    return extra


def resources_from_args(args: argparse.Namespace) -> Resources:
    if args.cpus_per_run is not None and args.cpus_per_run < 1:
        raise InputError("--cpus-per-run must be ≥ 1")
    if args.gpus_per_run < 0:
        raise InputError("--gpus-per-run must be ≥ 0")
    cpus = args.cpus_per_run or args.threads or 1
    if args.mem_per_run is not None and not args.mem_per_run > 0:
        raise InputError("--mem-per-run must be a positive number of GiB")
    if args.retries < 0:
        raise InputError("--retries must be ≥ 0")
    return Resources(cpus=cpus, gpus=args.gpus_per_run, mem_gb=args.mem_per_run)


def launcher_from_args(args: argparse.Namespace) -> Launcher:
    """The launcher the options ask for, its options checked (before any work)."""
    if args.launcher == "local":
        from loopdyn.launchers.local import LocalLauncher

        return LocalLauncher(args.jobs, args.threads)
    resources = resources_from_args(args)
    if args.launcher == "ray":
        from loopdyn.launchers.ray import RayLauncher

        return RayLauncher(address=args.ray_address, resources=resources, retries=args.retries)
    from loopdyn.launchers.slurm import SlurmLauncher

    return SlurmLauncher(resources=resources, partition=args.slurm_partition,
                         time_min=slurm_minutes(args.slurm_time), extra=sbatch_lines(args.slurm_sbatch),
                         retries=args.retries, parallelism=args.jobs)


def launcher_options(args: argparse.Namespace) -> list[tuple[str, object]]:
    """The launcher's options as given, for the report's exact command."""
    if args.launcher == "local":
        return []
    opts: list[tuple[str, object]] = [("--launcher", args.launcher), ("--cpus-per-run", args.cpus_per_run),
                                      ("--gpus-per-run", args.gpus_per_run or None),
                                      ("--mem-per-run", args.mem_per_run), ("--retries", args.retries)]
    if args.launcher == "ray":
        opts.append(("--ray-address", args.ray_address))
    else:
        opts += [("--slurm-partition", args.slurm_partition), ("--slurm-time", args.slurm_time)]
        opts += [("--slurm-sbatch", line) for line in args.slurm_sbatch]
    return opts
