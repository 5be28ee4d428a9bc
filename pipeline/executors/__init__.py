"""Executors turn planned units into written parts; the driver records them in the checkpoint.

  local     this process, one device (run.py's loop over `stream.score_units`)
  pool      one worker process per device of this host (`--devices`)
  ray       an actor pool through Ray Data, on one machine or a cluster (`--executor ray`)

Every executor runs the same `UnitWorker` over the same units, so their parts are identical.
"""

from __future__ import annotations

import logging
import os


def execute_remote(cfg, spec, units, record, on_progress, should_stop) -> list[dict]:
    """Run `units` on worker processes (the device pool or Ray); `record(unit_id, info)` is called
    in this process as each unit's part lands. Returns the per-device rows of the summary."""
    on_done = lambda unit, info: record(unit.id, info)  # noqa: E731
    if cfg.executor == "ray":
        from .ray_data import run_ray

        return run_ray(spec, units, on_done, on_progress, should_stop, address=cfg.ray_address,
                       workers=cfg.workers, gpus_per_worker=cfg.gpus_per_worker,
                       cpus_per_worker=cfg.cpus_per_worker)
    from .pool import parse_devices, run_pool
    from .worker import pool_worker_main

    devices = parse_devices(cfg.devices, _cuda_count())
    cpu_workers = sum(d == "cpu" for d in devices)
    threads = max(1, _cores() // cpu_workers) if cpu_workers else 0
    level = logging.getLogger().getEffectiveLevel()
    return run_pool(devices, pool_worker_main, (spec, level, threads), units, on_done, on_progress,
                    should_stop)


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
