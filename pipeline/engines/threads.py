"""CPU threads: torch's intra-op pool and the tokenizer's pool share the cores.

On a CPU run the tokenizer runs in the prefetch thread while torch runs the model, so with both
pools sized to every core a small machine runs twice as many busy threads as it has cores, and
each pool waits on the other (measured: docs/PERFORMANCE.md). There torch gets the cores this
process may use (os.sched_getaffinity, not the machine's count, which containers and taskset
narrow), and on machines of at most TOKENIZER_SERIAL_CORES cores the tokenizer runs
single-threaded.

On an accelerator the model needs no CPU threads: the host's torch work is copies of each
batch's arrays into pinned memory. A pool on every core still wakes for those copies and its
threads spin after each one, on the cores the tokenizer's own pool (every core: the host side has
to keep up with the GPU) and the thread that launches the kernels need; so torch gets
ACCELERATOR_TORCH_THREADS (measured with MiniLM-L6 on an H100: docs/PERFORMANCE.md).

A user's own OMP_NUM_THREADS, RERANK_CPU_THREADS or TOKENIZERS_PARALLELISM wins. Pool workers
are spawned with the driver's environment, so they see the same setting; CPU workers of a pool or
of Ray each get their share of the cores instead (share_for_worker).
"""

from __future__ import annotations

import logging
import os

import torch

from pipeline.errors import InputError

log = logging.getLogger(__name__)

TOKENIZER_SERIAL_CORES = 4
ACCELERATOR_TORCH_THREADS = 1
_SERIAL_SET = False  # TOKENIZERS_PARALLELISM=false is ours (configure_cpu), not the user's


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def env_threads() -> int | None:
    """RERANK_CPU_THREADS as a count of threads, or None where it is unset or empty."""
    raw = os.environ.get("RERANK_CPU_THREADS", "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise InputError(f"RERANK_CPU_THREADS={raw!r} is not a count of threads; set it to a whole number "
                         "of at least 1 (such as 4), or unset it")
    return n


def share_for_worker(threads: int) -> None:
    """A CPU worker of a run on several workers (the device pool, Ray): torch gets its share of the
    host's cores, which configure_cpu keeps when the worker's engine loads (through
    RERANK_CPU_THREADS; a user's own value wins)."""
    if env_threads() is None:
        os.environ["RERANK_CPU_THREADS"] = str(threads)
    _set_torch_threads(None)


def _set_torch_threads(default: int | None) -> int:
    """torch's pool: RERANK_CPU_THREADS where set, else as it is under the user's OMP_NUM_THREADS,
    else `default` (None: as it is)."""
    threads = env_threads()
    if threads is None and "OMP_NUM_THREADS" not in os.environ:
        threads = default
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def configure_cpu() -> dict:
    """Set the pools for a CPU run; return what was chosen (for the log)."""
    global _SERIAL_SET
    cores = usable_cores()
    env = os.environ
    chosen = {"torch_threads": _set_torch_threads(cores)}
    if "TOKENIZERS_PARALLELISM" not in env and cores <= TOKENIZER_SERIAL_CORES:
        # Read by the tokenizers library at each batch call, so setting it now takes effect.
        env["TOKENIZERS_PARALLELISM"] = "false"
        _SERIAL_SET = True
    chosen["tokenizer_parallel"] = env.get("TOKENIZERS_PARALLELISM", "true") != "false"
    log.info("CPU threads: torch %d, tokenizer %s (%d usable cores)", chosen["torch_threads"],
             "parallel" if chosen["tokenizer_parallel"] else "serial", cores)
    return chosen


def configure_accelerator() -> dict:
    """Set torch's pool for a run on an accelerator; return what was chosen (for the log)."""
    global _SERIAL_SET
    env = os.environ
    chosen = {"torch_threads": _set_torch_threads(ACCELERATOR_TORCH_THREADS)}
    if _SERIAL_SET and env.get("TOKENIZERS_PARALLELISM") == "false":
        # A CPU engine of this process made the tokenizer serial; this one needs every core.
        del env["TOKENIZERS_PARALLELISM"]
        _SERIAL_SET = False
    log.info("CPU threads: torch %d (the model runs on the accelerator), tokenizer %s", chosen["torch_threads"],
             "serial" if env.get("TOKENIZERS_PARALLELISM") == "false" else "parallel")
    return chosen


def configure(device) -> dict:
    """The pools for a run on `device` (a torch.device)."""
    return configure_cpu() if device.type == "cpu" else configure_accelerator()
