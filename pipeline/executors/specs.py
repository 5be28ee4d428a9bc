"""What an executor is given: where units run (ExecutorSpec) and what scoring them needs (WorkSpec)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import RunConfig
from pipeline.data.read import InputLayout


@dataclass(frozen=True)
class WorkSpec:
    """What a unit worker needs to score units on its own, in any process: picklable and small."""

    cfg: RunConfig
    kind: object  # engines.resolve.ModelKind
    layout: InputLayout
    sink: object  # storage.sink.SinkSpec: the run's checkpoint, which a worker attaches to (no lease)


@dataclass(frozen=True)
class ExecutorSpec:
    """Where units run; the driver picks it once per run (driver/execute.pick_executor)."""

    kind: str = "local"  # "local" (this process), "pool" (one process per device) or "ray"
    # pool: one worker process per item ("cuda:0", "cpu"); torch threads of each CPU worker (0: all).
    devices: tuple[str, ...] = ()
    cpu_threads: int = 0
    # ray: the cluster (None: start a local Ray), actors (None: one per GPU, else per CPU), and
    # resources per actor (gpus None: 1 where the cluster has GPUs, else 0).
    ray_address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None
    cpus_per_worker: float = 1.0
    # local: what this process already holds, used instead of loading or opening its own: the
    # loaded engine, the driver's open checkpoint (it holds the lease, so nobody else writes
    # there) and the run's startup timeline.
    engine: object = None
    checkpoint: object = None
    timeline: object = None
