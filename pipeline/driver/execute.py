"""Execute a plan, the driver's side: pick the executor once, hand it the units not yet in the
checkpoint, record each unit as its part lands, then read every finished unit's record again.
The executors (pipeline/executors) run the units, each through the same unit worker and scoring
loop (pipeline/scoring.py)."""

from __future__ import annotations

import dataclasses

from pipeline.config import RunConfig
from pipeline.engines.threads import usable_cores
from pipeline.errors import InputError
from pipeline.executors import ExecutorSpec, WorkSpec, run_units
from pipeline.runtime.signals import polled
from pipeline.runtime.startup import Timeline
from pipeline.runtime.stop import StopToken


def pick_executor(cfg: RunConfig) -> ExecutorSpec:
    """Where this run's units go: Ray (`--executor ray`), a pool of one process per device
    (`--devices`), or this process."""
    if cfg.executor == "ray":
        return ExecutorSpec("ray", ray_address=cfg.ray_address, workers=cfg.workers,
                            gpus_per_worker=cfg.gpus_per_worker, cpus_per_worker=cfg.cpus_per_worker)
    if cfg.devices:
        devices = parse_devices(cfg.devices, cuda_count())
        cpu_workers = sum(d == "cpu" for d in devices)
        return ExecutorSpec("pool", devices=tuple(devices),
                            cpu_threads=max(1, usable_cores() // cpu_workers) if cpu_workers else 0)
    return ExecutorSpec("local")


def parse_devices(spec: str, cuda_count: int) -> list[str]:
    """--devices as one device name per pool worker: `all`, a count, or a comma-separated list
    (cuda:0,cuda:2, cpu,cpu, 0,1), checked against the `cuda_count` devices visible."""
    spec = spec.strip()
    if spec == "all":
        if cuda_count == 0:
            raise InputError("--devices all: no CUDA device is visible; pass --devices cpu or a count of CPU workers")
        return [f"cuda:{i}" for i in range(cuda_count)]
    if spec.isdigit():
        n = int(spec)
        if n < 1:
            raise InputError(f"--devices {spec}: give at least one device")
        if cuda_count == 0:
            return ["cpu"] * n
        if n > cuda_count:
            raise InputError(f"--devices {spec}: only {cuda_count} CUDA device(s) are visible; pass at most "
                             f"{cuda_count} or `all`")
        return [f"cuda:{i}" for i in range(n)]
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if item.isdigit():
            item = f"cuda:{item}"
        if item == "cpu" or item == "cuda":
            out.append("cuda:0" if item == "cuda" else item)
            continue
        if item.startswith("cuda:") and item[5:].isdigit():
            if int(item[5:]) >= cuda_count:
                raise InputError(f"--devices {spec}: {item} is not visible ({cuda_count} CUDA device(s)); "
                                 "check CUDA_VISIBLE_DEVICES")
            out.append(item)
            continue
        raise InputError(f"--devices {spec}: {item!r} is not a device; write all, a count, or a list like "
                         "cuda:0,cuda:2 or cpu,cpu")
    if not out:
        raise InputError("--devices: give all, a count, or a list of devices")
    return out


def execute(plan, executor: ExecutorSpec, progress, stop: StopToken | None, *, engine=None,
            timeline: Timeline | None = None) -> list[dict]:
    """Score every unit of `plan` not yet in its checkpoint, one committed part per unit, and
    verify their records (CheckpointSink.verify). `engine`: the one the run loaded (the local executor
    scores on it); `timeline`: the run's startup timeline. Stops (KeyboardInterrupt) at a check
    point once `stop` is set. Returns the executor's per-device rows."""
    def score() -> list[dict]:
        return score_pending(plan, executor, progress, stop, engine=engine, timeline=timeline)

    rows = score()
    plan.ckpt.verify(plan.unit_ids, score)
    return rows


def score_pending(plan, executor: ExecutorSpec, progress, stop: StopToken | None, *, engine=None,
                  timeline: Timeline | None = None) -> list[dict]:
    """Score the units of `plan` not yet in its checkpoint (execute, without the check)."""
    ck = plan.ckpt
    pending = [u for u in plan.units if u.id not in ck.done]
    work = WorkSpec(cfg=plan.cfg, kind=plan.kind, layout=plan.layout, sink=ck.spec())
    executor = dataclasses.replace(executor, timeline=timeline)
    if executor.kind == "local":
        executor = dataclasses.replace(executor, engine=engine, checkpoint=ck)

    def landed(unit, record: dict) -> None:
        if ck.done.get(unit.id) is record:
            return  # committed through this very checkpoint (the local executor), which recorded it
        ck.landed(unit.id, record)

    with polled(stop):
        return run_units(executor, work, pending, landed, progress, stop)


def cuda_count() -> int:
    import torch  # only a run with --devices asks, and it is about to use the devices

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
