"""Units through Ray Data: an actor pool of workers, each holding a loaded model.

Ray schedules and retries; we do not. Each actor is a `UnitWorker` (the same code the local loop
and the device pool run): it reads its unit from the input, scores it and writes the unit's part
into the checkpoint, which must be where every node can reach it (object storage or a shared
file system). The driver records each finished unit as its row comes back, so a killed driver
leaves a checkpoint that the same command resumes, with Ray or without. A killed actor is
restarted by Ray and its unit retried (max_restarts / max_task_retries).
"""

from __future__ import annotations

import dataclasses
import json
import logging

from pipeline.errors import InputError

log = logging.getLogger(__name__)


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise InputError("--executor ray needs Ray: pip install 'rerank-batch[ray]' (or pip install 'ray[data]')") from None
    return ray


class RayUnitScorer:
    """The actor: loads the model once, then scores one unit per call."""

    def __init__(self, spec, cpu_threads: int = 0):
        import ray

        from pipeline.runtime.bytecode import use_pycache

        use_pycache()  # before the model's imports (runtime/bytecode.py)

        from .worker import UnitWorker

        gpus = ray.get_gpu_ids()
        device = "cuda:0" if gpus else "cpu"  # Ray narrows CUDA_VISIBLE_DEVICES to this actor's GPUs
        if device == "cpu" and cpu_threads > 0:
            import torch

            torch.set_num_threads(cpu_threads)
        self.worker = UnitWorker(spec, device)
        import os
        import socket

        self.device = f"{device}@{socket.gethostname()}:{os.getpid()}"  # one summary row per actor

    def __call__(self, batch):
        from pipeline.data.read import Unit

        ids, infos = [], []
        units = [Unit(**json.loads(s)) for s in batch["unit"]]
        for unit, info in self.worker.run(iter(units)):
            info["device"] = self.device
            ids.append(unit.id)
            infos.append(json.dumps(info))
        return {"unit_id": ids, "info": infos}


def run_ray(spec, units, on_done, on_progress=None, should_stop=None, *, address: str | None = None,
            workers: int | None = None, gpus_per_worker: float | None = None,
            cpus_per_worker: float = 1.0) -> list[dict]:
    """Score `units` on a Ray cluster (a local one when `address` is None). Returns per-worker rows."""
    ray = import_ray()
    started_here = False
    if not ray.is_initialized():
        kw = dict(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                  configure_logging=False)
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(**kw)
        started_here = True
    try:
        res = ray.cluster_resources()
        if gpus_per_worker is None:
            gpus_per_worker = 1.0 if res.get("GPU", 0) > 0 and spec.cfg.device != "cpu" else 0.0
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
            fn_constructor_kwargs={"spec": spec, "cpu_threads": threads},
        )  # Ray Data's actor pools restart dead actors and retry their tasks by default
        per_device: dict[str, dict] = {}
        for row in ds.iter_rows():
            if should_stop is not None and should_stop():
                raise KeyboardInterrupt
            info = json.loads(row["info"])
            unit = by_id[row["unit_id"]]
            on_done(unit, info)
            if on_progress is not None:
                resumed = info.get("resumed", {})  # pairs an earlier run committed were counted at the start
                on_progress(info["pairs"] + info["skipped_null"] - resumed.get("pairs", 0),
                            info["tokens"] - resumed.get("tokens", 0))
            d = per_device.setdefault(info.get("device", "?"), {"device": info.get("device", "?"), "units": 0,
                                                                "pairs": 0, "tokens": 0, "busy_seconds": 0.0})
            d["units"] += 1
            d["pairs"] += info["pairs"]
            d["tokens"] += info["tokens"]
            d["busy_seconds"] = round(d["busy_seconds"] + info.get("seconds", 0.0), 3)
        return list(per_device.values())
    finally:
        if started_here:
            ray.shutdown()
