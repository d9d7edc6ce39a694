"""Local multi-process launcher: ``python -m bagjax.launch --processes N --devices-per-process K -- SCRIPT ARGS``.

Starts N copies of ``python SCRIPT ARGS`` on this machine, each a JAX process with K CPU devices, wired
together through ``jax.distributed.initialize`` by the environment that ``bagjax.training.loop`` reads:
``JAX_COORDINATOR_ADDRESS`` (127.0.0.1 and a free port), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; the
CPU devices come from ``XLA_FLAGS=--xla_force_host_platform_device_count=K`` and ``JAX_PLATFORMS=cpu``, and
cross-process collectives use gloo (``JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo``). It rehearses a multi-host
run (e.g. 2 processes x 2 devices behaves like 2 hosts of 2 accelerators) without a cluster.

Each output line is prefixed with its process's rank (``[0] ...``). If a process fails, the others are
killed and the launcher exits with the failed process's status; SIGINT/SIGTERM are passed on to every
process, so ``train.py`` checkpoints and exits as on a preemption.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Sequence

from bagjax import cli
from bagjax.errors import UserError

# After a failure, the other processes usually sit in a collective waiting for the dead one: kill, don't wait.
_POLL_SECONDS = 0.1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict[str, str], *, rank: int, processes: int, devices_per_process: int,
                coordinator: str) -> dict[str, str]:
    """The environment of process ``rank``: coordinator, rank, process count and K CPU devices."""
    env = dict(base)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).split()
    env.update({
        "JAX_COORDINATOR_ADDRESS": coordinator,
        "JAX_NUM_PROCESSES": str(processes),
        "JAX_PROCESS_ID": str(rank),
        "JAX_PLATFORMS": "cpu",
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
        "XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"]),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _pump(stream: IO[bytes], rank: int, out: IO[str], lock: threading.Lock) -> None:
    """Copy a process's output to ``out`` line by line, each line prefixed with ``[rank] ``."""
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace").rstrip("\n")
        with lock:
            out.write(f"[{rank}] {line}\n")
            out.flush()
    stream.close()


def _exit_status(returncode: int) -> int:
    """A shell-style status: a process killed by signal S gives 128 + S."""
    return returncode if returncode >= 0 else 128 - returncode


def _kill(procs: Sequence[subprocess.Popen], sig: int) -> None:
    """Signal the process group of every rank, also of a rank that exited: its children may live on
    (holding its output pipe open, which the launcher would otherwise wait on forever)."""
    for p in procs:
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):  # the whole group is gone
            pass


def launch(command: Sequence[str], *, processes: int, devices_per_process: int, port: int = 0,
           out: IO[str] | None = None) -> int:
    """Run ``python COMMAND`` as ``processes`` JAX processes; 0 if all succeed, else the first failure's status."""
    if processes < 1 or devices_per_process < 1:
        raise UserError(f"--processes={processes} and --devices-per-process={devices_per_process} must be >= 1")
    if not command:
        raise UserError("nothing to run: put the script and its arguments after --, e.g. -- train.py --config ...")
    out = sys.stdout if out is None else out
    coordinator = f"127.0.0.1:{port or free_port()}"
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    forwarded: list[int] = []

    def forward(signum, frame):
        forwarded.append(signum)
        _kill(procs, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for rank in range(processes):
            env = process_env(os.environ, rank=rank, processes=processes, devices_per_process=devices_per_process,
                              coordinator=coordinator)
            # Own session: the launcher decides which signals reach a process and can kill its children too.
            p = subprocess.Popen([sys.executable, *command], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(p)
            t = threading.Thread(target=_pump, args=(p.stdout, rank, out, lock), daemon=True)
            t.start()
            pumps.append(t)
        status = 0
        while [p.poll() for p in procs].count(None):  # poll every process, not just up to the first running one
            failed = [(rank, p.returncode) for rank, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed and not forwarded:
                rank, code = failed[0]
                with lock:
                    out.write(f"launch: process {rank} exited with status {_exit_status(code)}; "
                              "killing the other processes\n")
                    out.flush()
                _kill(procs, signal.SIGKILL)
                status = _exit_status(code)
                break
            time.sleep(_POLL_SECONDS)
        for p in procs:
            p.wait()
        _kill(procs, signal.SIGKILL)  # children a rank left behind would keep its output pipe open
        for t in pumps:
            t.join()
        if status == 0:
            status = next((_exit_status(p.returncode) for p in procs if p.returncode != 0), 0)
        return status
    finally:
        _kill(procs, signal.SIGKILL)
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1:]
    parser = cli.ArgumentParser(
        prog="python -m bagjax.launch", description=__doc__.splitlines()[0],
        epilog="example: python -m bagjax.launch --processes 2 --devices-per-process 2 -- "
               "train.py --config configs/demo.py --workdir runs/demo2x2")
    parser.add_argument("--processes", type=int, default=2, help="number of JAX processes (default 2)")
    parser.add_argument("--devices-per-process", type=int, default=1, help="CPU devices per process (default 1)")
    parser.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (default: a free one)")
    args, extra = parser.parse_known_args(argv)
    if extra:
        hint = "" if command else f"; put the command after --: python -m bagjax.launch ... -- {' '.join(extra)}"
        parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    try:
        return launch(command, processes=args.processes, devices_per_process=args.devices_per_process,
                      port=args.port)
    except UserError as e:  # a flag's value: one line with the --help hint
        parser.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
