"""CPU threads for scoring on the CPU: torch's intra-op pool and the tokenizer's pool share the cores.

The tokenizer runs in the prefetch thread while torch runs the model, so with both pools sized to
every core a small machine runs twice as many busy threads as it has cores, and each pool waits
on the other (measured: docs/PERFORMANCE.md). On a CPU run, torch gets the cores this process may
use (os.sched_getaffinity, not the machine's count, which containers and taskset narrow), and on
machines of at most TOKENIZER_SERIAL_CORES cores the tokenizer runs single-threaded. A user's own
OMP_NUM_THREADS, RERANK_CPU_THREADS or TOKENIZERS_PARALLELISM wins.

Runs on an accelerator never come here: their tokenizer keeps its own threads on every core
(the model does not need the CPU), which the host side needs to keep up with the GPU once
prefixes are shared. Pool workers are spawned with the driver's environment, so they
see the same setting.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

TOKENIZER_SERIAL_CORES = 4


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def configure_cpu() -> dict:
    """Set the pools for a CPU run; return what was chosen (for the log)."""
    cores = usable_cores()
    chosen = {}
    env = os.environ
    if env.get("RERANK_CPU_THREADS"):
        torch.set_num_threads(max(1, int(env["RERANK_CPU_THREADS"])))
    elif "OMP_NUM_THREADS" not in env and torch.get_num_threads() != cores:
        torch.set_num_threads(cores)
    chosen["torch_threads"] = torch.get_num_threads()
    if "TOKENIZERS_PARALLELISM" not in env and cores <= TOKENIZER_SERIAL_CORES:
        # Read by the tokenizers library at each batch call, so setting it now takes effect.
        env["TOKENIZERS_PARALLELISM"] = "false"
    chosen["tokenizer_parallel"] = env.get("TOKENIZERS_PARALLELISM", "true") != "false"
    log.info("CPU threads: torch %d, tokenizer %s (%d usable cores)", chosen["torch_threads"],
             "parallel" if chosen["tokenizer_parallel"] else "serial", cores)
    return chosen
