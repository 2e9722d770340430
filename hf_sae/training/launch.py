"""Launchers that cannot misfire: a multi-process launch either really runs N Accelerate processes or stops
before any work, with the command that works; and one output folder is written by one run at a time.

What each launcher does on a CPU machine (accelerate 1.x):

- ``ACCELERATE_USE_CPU=true torchrun --nproc_per_node N scripts/train.py ...`` and
  ``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N scripts/train.py ...``:
  N processes in one gloo process group (MULTI_CPU). These are the working forms.
- ``torchrun --nproc_per_node N ...`` (or ``accelerate launch --multi_gpu``) without ``ACCELERATE_USE_CPU``
  on a machine without GPUs: Accelerate alone would run N processes that each believe they are alone
  (``WORLD_SIZE`` is N, Accelerate sees 1). The trainer asks Accelerate for CPU processes in that case
  (:func:`launched_without_gpus`), so this works like the forms above; :func:`check_launch` stops any
  other launch where ``WORLD_SIZE`` and Accelerate disagree.
- ``accelerate launch --cpu --num_processes N ...`` (or without ``--cpu``, no GPU): Accelerate's simple
  launcher starts ONE process (its multi-CPU mode needs ``mpirun``), only exporting ``MASTER_PORT`` ->
  stopped too.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys

LOCK_NAME = ".hf_sae_train.lock"


class LaunchError(RuntimeError):
    """The processes that started are not the processes that were asked for."""


def working_command(n: int, argv: list[str] | None = None) -> str:
    """The command that runs ``n`` CPU/GPU processes for this script and its arguments."""
    argv = list(sys.argv if argv is None else argv)
    script = " ".join(shlex.quote(a) for a in argv) or "scripts/train.py ..."
    if script.endswith("hf-sae") or os.path.basename(argv[0] if argv else "") == "hf-sae":
        script = "scripts/train.py " + " ".join(shlex.quote(a) for a in argv[2:])  # torchrun needs a script
    return f"ACCELERATE_USE_CPU=true torchrun --nproc_per_node {n} {script}"


def launched_without_gpus(env: dict | None = None) -> bool:
    """True when a multi-process launcher (``WORLD_SIZE`` > 1) started this process on a machine where torch
    sees no GPU: the processes must then form a CPU (gloo) group, as ``ACCELERATE_USE_CPU=true`` asks."""
    env = os.environ if env is None else env
    if int(env.get("WORLD_SIZE", "1") or 1) <= 1:
        return False
    import torch

    accel = getattr(torch, "accelerator", None)
    has_device = accel.is_available() if accel is not None and hasattr(accel, "is_available") \
        else torch.cuda.is_available()
    return not has_device


def check_launch(num_processes: int, env: dict | None = None, argv: list[str] | None = None) -> None:
    """Raise :class:`LaunchError` when the launcher asked for more processes than Accelerate runs.

    Args:
        num_processes: ``accelerator.num_processes`` of this process.
        env: the environment (default ``os.environ``).
    """
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world > 1 and num_processes == 1:
        gpu = (
            "; on GPUs, check that torch sees them"
            if env.get("ACCELERATE_USE_CPU", "").lower() in ("", "false", "0")
            else ""
        )
        raise LaunchError(
            f"the launcher started {world} processes (WORLD_SIZE={world}) but Accelerate runs this one alone, so "
            f"{world} independent trainings would write the same folder. On CPUs run: "
            f"{working_command(world, argv)}{gpu}."
        )
    if num_processes == 1 and "WORLD_SIZE" not in env and "ACCELERATE_MIXED_PRECISION" in env and "MASTER_PORT" in env:
        raise LaunchError(
            "`accelerate launch --num_processes N` started ONE process here (Accelerate's CPU launcher needs "
            "mpirun for more), so the run would silently train on 1 process. Run: "
            f"{working_command(2, argv)} (or ACCELERATE_USE_CPU=true accelerate launch --multi_gpu "
            "--num_processes 2 ...), or drop --num_processes for one process."
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputDirLock:
    """``<output_dir>/.hf_sae_train.lock`` held by the main process of a run while it trains: a second run
    (another launch, or a mis-launched twin process) that finds a live holder stops at once. A lock whose
    process is gone (killed run) is taken over."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.held = False

    def acquire(self) -> OutputDirLock:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        me = f"{socket.gethostname()} {os.getpid()}\n"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    host, pid = open(self.path).read().split()
                    pid = int(pid)
                except (OSError, ValueError):
                    host, pid = "", -1
                if host == socket.gethostname() and pid > 0 and pid != os.getpid() and _alive(pid):
                    raise LaunchError(
                        f"another training (pid {pid}) is writing {os.path.dirname(self.path)}; wait for it, or "
                        "choose another --output_dir. (Several processes of one launch mean the launcher did not "
                        f"start them as one group: use {working_command(2)}.)"
                    ) from None
                if host not in ("", socket.gethostname()):
                    raise LaunchError(
                        f"{os.path.dirname(self.path)} is being written by a run on host {host} "
                        f"(delete {self.path} if that run is gone)."
                    ) from None
                os.unlink(self.path)  # stale: that process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held = True
            return self
        raise LaunchError(f"could not take the lock {self.path}; delete it if no run is using the folder.")

    def release(self) -> None:
        if self.held:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.held = False
