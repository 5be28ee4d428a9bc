"""Units through Ray Data: an actor pool of workers, each holding a loaded model.

Ray schedules and retries; we do not. Each actor runs a `UnitWorker` (the same class the local
executor and the device pool run): it reads its unit from the input, scores it and writes the
unit's part into the checkpoint, which must be where every node can reach it (object storage or a
shared file system). The driver records each finished unit as its row comes back, so a killed
driver leaves a checkpoint that the same command resumes, with Ray or without. A killed actor is
restarted by Ray and its unit retried (max_restarts / max_task_retries).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket

from pipeline.data.read import Unit
from pipeline.errors import InputError
from pipeline.runtime.bytecode import use_pycache
from pipeline.runtime.startup import Timeline

from .specs import ExecutorSpec, WorkSpec
from .worker import UnitWorker

log = logging.getLogger(__name__)


def import_ray():
    # Ray is an optional dependency, imported only by runs that ask for it.
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise InputError("--executor ray needs Ray: pip install 'rerank-batch[ray]' (or pip install 'ray[data]')") from None
    return ray


class RayUnitScorer:
    """The actor: a UnitWorker, loaded once, that scores one unit per call."""

    def __init__(self, work: WorkSpec, cpu_threads: int = 0):
        use_pycache()  # before the model's imports (runtime/bytecode.py)
        import ray  # inside the actor's process, which Ray started

        gpus = ray.get_gpu_ids()
        device = "cuda:0" if gpus else "cpu"  # Ray narrows CUDA_VISIBLE_DEVICES to this actor's GPUs
        if device == "cpu" and cpu_threads > 0:
            from pipeline.engines.threads import share_for_worker  # imports torch, which the engine loads next

            share_for_worker(cpu_threads)
        self.worker = UnitWorker(work, device)
        self.device = f"{device}@{socket.gethostname()}:{os.getpid()}"  # one summary row per actor

    def __call__(self, batch):
        ids, records = [], []
        units = [Unit(**json.loads(s)) for s in batch["unit"]]
        for unit, record in self.worker.run(iter(units)):
            ids.append(unit.id)
            records.append(json.dumps(record))
        # The actor's startup timeline (ends at its first batch), for the driver's summary.
        startup = json.dumps(self.worker.timeline.marks if self.worker.timeline.seen("first_batch") else [])
        return {"unit_id": ids, "record": records, "device": [self.device] * len(ids), "startup": [startup] * len(ids)}


def run_ray(executor: ExecutorSpec, work: WorkSpec, units, on_unit_done, progress=None, stop=None) -> list[dict]:
    """Score `units` on a Ray cluster (a local one when `executor.ray_address` is None).
    `on_unit_done(unit, record)` as each unit's row comes back; `progress` per unit (Ray reports
    units, not batches). The first row's actor continues the run's timeline. Returns per-actor rows."""
    ray = import_ray()
    started_here = False
    if not ray.is_initialized():
        kw = dict(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                  configure_logging=False)
        if executor.ray_address:
            ray.init(address=executor.ray_address, **kw)
        else:
            ray.init(**kw)
        started_here = True
    try:
        res = ray.cluster_resources()
        gpus_per_worker, cpus_per_worker, workers = executor.gpus_per_worker, executor.cpus_per_worker, executor.workers
        if gpus_per_worker is None:
            gpus_per_worker = 1.0 if res.get("GPU", 0) > 0 and work.cfg.device != "cpu" else 0.0
        if workers is None:
            workers = (max(1, int(res.get("GPU", 0) // gpus_per_worker)) if gpus_per_worker
                       else max(1, int(res.get("CPU", 1) // max(cpus_per_worker, 1e-9))))
        log.info("ray: %d worker(s), %g GPU and %g CPU each", workers, gpus_per_worker, cpus_per_worker)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # our progress is the pairs; Ray's would interleave with it
        if log.getEffectiveLevel() > logging.DEBUG:
            logging.getLogger("ray.data").setLevel(logging.WARNING)
        by_id = {u.id: u for u in units}
        items = [{"unit": json.dumps(dataclasses.asdict(u))} for u in units]
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        threads = max(1, int(cpus_per_worker)) if gpus_per_worker == 0 else 0
        ds = ds.map_batches(
            RayUnitScorer, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers),
            num_gpus=gpus_per_worker or None, num_cpus=cpus_per_worker,
            fn_constructor_kwargs={"work": work, "cpu_threads": threads},
        )  # Ray Data's actor pools restart dead actors and retry their tasks by default
        per_device: dict[str, dict] = {}
        timeline = executor.timeline
        for row in ds.iter_rows():
            if stop is not None:
                stop.check()  # a check point: between finished units
            record = json.loads(row["record"])
            on_unit_done(by_id[row["unit_id"]], record)
            if progress is not None:
                resumed = record.get("resumed", {})  # pairs an earlier run committed were counted at the start
                progress(record["pairs"] + record["skipped_null"] - resumed.get("pairs", 0),
                         record["tokens"] - resumed.get("tokens", 0))
            marks = json.loads(row["startup"])
            d = per_device.setdefault(row["device"], {"device": row["device"], "units": 0, "pairs": 0, "tokens": 0,
                                                      "busy_seconds": 0.0})
            if marks and "startup" not in d:
                d["startup"] = Timeline(marks).stages()
                if timeline is not None and not timeline.seen("first_batch"):  # the first actor to report
                    timeline.then(marks, "spawn_workers")
            d["units"] += 1
            d["pairs"] += record["pairs"]
            d["tokens"] += record["tokens"]
            d["busy_seconds"] = round(d["busy_seconds"] + record.get("seconds", 0.0), 3)
        return list(per_device.values())
    finally:
        if started_here:
            ray.shutdown()
