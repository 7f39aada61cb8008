"""Several hosts through JAX's own multi-process runtime (`jax.distributed`).

`initialize()` must run before anything touches a device. Settings come from flags or the
GROKCTL_COORDINATOR / GROKCTL_NUM_PROCESSES / GROKCTL_PROCESS_ID environment variables.
"""

from __future__ import annotations

import jax

from grokctl.errors import UsageError

_initialized = False


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None) -> bool:
    """Join a multi-process run when a coordinator is given; returns True if distributed."""
    global _initialized
    if not coordinator:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise UsageError("--num-processes/--process-id need --coordinator HOST:PORT")
        return False
    if num_processes is None or process_id is None:
        raise UsageError("--coordinator needs --num-processes N and --process-id I")
    if not 0 <= process_id < num_processes:
        raise UsageError(f"--process-id {process_id} must be in 0..{num_processes - 1}")
    if ":" not in coordinator:
        raise UsageError(f"--coordinator {coordinator!r}: expected HOST:PORT")
    if _initialized:
        return True
    try:  # CPU devices need a collectives backend across processes; GPUs use NCCL regardless
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:  # pragma: no cover - older jax
        pass
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
    _initialized = True
    return True


def is_primary() -> bool:
    """Results are printed once, by process 0."""
    return jax.process_index() == 0
