"""Several hosts through JAX's own multi-process runtime (`jax.distributed`).

`initialize()` must run before anything touches a device. Settings come from flags or the
GROKCTL_COORDINATOR / GROKCTL_NUM_PROCESSES / GROKCTL_PROCESS_ID environment variables (the
caller resolves them with `grokctl.config.Settings`). After it, `jax.devices()` lists the
devices of every process; a mesh over them spans the hosts, each process reads only the
checkpoint shards of its own devices, and results are replicated so every process holds them.
CPU devices talk through gloo collectives (the default on jax >= 0.4.36), GPUs through NCCL.
"""

from __future__ import annotations

import os
import socket
import sys
import time

from grokctl.errors import MissingResourceError, UsageError

DEFAULT_TIMEOUT_S = 300
_initialized = False


def check_settings(
    coordinator: str | None, num_processes: int | None, process_id: int | None
) -> bool:
    """Validate the three settings together; True when they ask for a multi-process run."""
    if not coordinator:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise UsageError("--num-processes/--process-id need --coordinator HOST:PORT")
        return False
    if num_processes is None or process_id is None:
        raise UsageError("--coordinator needs --num-processes N and --process-id I")
    if num_processes < 1:
        raise UsageError(f"--num-processes {num_processes} must be >= 1")
    if not 0 <= process_id < num_processes:
        raise UsageError(f"--process-id {process_id} must be in 0..{num_processes - 1}")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--coordinator {coordinator!r}: expected HOST:PORT, e.g. 10.0.0.1:1234")
    return True


def initialize(
    coordinator: str | None,
    num_processes: int | None,
    process_id: int | None,
    timeout_s: int = DEFAULT_TIMEOUT_S,
) -> bool:
    """Join a multi-process run when a coordinator is given; returns True if distributed.

    Process 0 serves the coordinator at HOST:PORT; every process must call this with the same
    coordinator and process count before using a device.
    """
    global _initialized
    if not check_settings(coordinator, num_processes, process_id):
        return False
    if _initialized:
        return True
    import jax

    try:  # CPU devices need a collectives backend across processes; GPUs use NCCL regardless
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):  # pragma: no cover - older jax
        pass
    if process_id:  # process 0 serves the coordinator; the others wait until it listens
        wait_for_coordinator(coordinator, timeout_s)  # type: ignore[arg-type]
    _route_native_stdout_to_stderr()
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=int(timeout_s),
        )
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "before" in first and "initialize" in first:
            raise UsageError(f"jax.distributed: {first}") from None
        raise MissingResourceError(
            f"--coordinator {coordinator}: process {process_id} of {num_processes} could not "
            f"join the run within {timeout_s}s ({first})"
        ) from None
    _initialized = True
    return True


def wait_for_coordinator(coordinator: str, timeout_s: float) -> None:
    """Block until HOST:PORT accepts a TCP connection, or fail with one clear line.

    jax.distributed aborts the whole process (no exception) when it cannot reach the
    coordinator, so a joining process checks first."""
    host, _, port = coordinator.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise MissingResourceError(
                    f"--coordinator {coordinator}: nothing listening after {timeout_s:g}s "
                    f"({exc.strerror or exc}); start process 0 there first, or raise "
                    "GROKCTL_INIT_TIMEOUT"
                ) from None
            time.sleep(0.25)


def _route_native_stdout_to_stderr() -> None:
    """Keep stdout for results: native libraries (gloo) print connection logs to file
    descriptor 1. Point fd 1 at stderr and give Python's sys.stdout a private copy of the
    original stdout, so `--json` output stays one clean document."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(2, 1)
        sys.stdout = os.fdopen(saved, "w", buffering=1, encoding=sys.stdout.encoding or "utf-8")
    except (OSError, AttributeError, ValueError):  # no real file descriptors (embedded use)
        pass


def process_index() -> int:
    import jax

    return int(jax.process_index())


def process_count() -> int:
    import jax

    return int(jax.process_count())


def is_primary() -> bool:
    """Results are printed once, by process 0."""
    return process_index() == 0
