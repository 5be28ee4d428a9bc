"""The unit worker: a loaded engine on one device that turns units into parts in the checkpoint.

Every executor runs it: the local executor in the driver's process (on the engine the run
loaded, committing through the driver's checkpoint), the pool in one process per device, Ray in
each actor. Scoring goes through `pipeline.scoring.score_units`, the only loop that scores.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from pipeline.cache import open_cache
from pipeline.cache.runwide import open_run_dedup
from pipeline.config import RunConfig
from pipeline.errors import ScoringError
from pipeline.runtime import startup
from pipeline.runtime.stop import StopToken
from pipeline.runtime.timing import Timer
from pipeline.scoring import score_units
from pipeline.storage.sink import CheckpointSink

from .specs import WorkSpec

log = logging.getLogger(__name__)


class UnitWorker:
    """`UnitWorker(work, device)` loads the engine of `work.cfg` on `device` (None: the config's)
    and commits into the run's checkpoint (`work.sink`). The local executor hands in what the driver holds instead:
    `engine`, `checkpoint` (the driver's own, with the lease) and `timeline` (the run's)."""

    def __init__(self, work: WorkSpec, device: str | None = None, *, engine=None,
                 checkpoint: CheckpointSink | None = None, timeline: startup.Timeline | None = None):
        cfg = work.cfg
        if device is not None and device != cfg.device:
            cfg = dataclasses.replace(cfg, device=device)
        self.work = dataclasses.replace(work, cfg=cfg)
        self.device = cfg.device
        # A worker process's own timeline starts with its process; its marks go back to the driver.
        self.timeline = timeline if timeline is not None else startup.Timeline.begin("worker_process")
        # The driver's checkpoint is the only writer of its directory: the partials it listed at
        # the start and those it writes are all there are. A worker in another process lists them
        # again for each unit: some may come from a worker that died.
        self.sole_writer = checkpoint is not None
        self.checkpoint = checkpoint if checkpoint is not None else work.sink.attach()  # no lease: the driver holds it
        if engine is None:
            with startup.recording(self.timeline):
                engine = load_engine(cfg, work.kind)
        self.engine = engine
        # The score cache (--cache) and the run's dedup store (in the checkpoint folder): every
        # worker opens its own, in its process, for the scope of its engine (a file read once
        # stays known to the worker for its next units).
        self.dedup = open_run_dedup(cfg, engine, self.checkpoint.root, open_cache(cfg, engine))
        self.timer = Timer()  # waiting for input, writing parts
        self.units = self.pairs = self.tokens = 0
        self.busy_s = 0.0

    def run(self, units, on_batch=None, stop: StopToken | None = None, group_small: bool = False):
        """Score `units` (an iterator, pulled one ahead so reading and tokenizing overlap the
        device), commit each unit's part and record, and yield (unit, record) as each lands.
        `on_batch(pairs, tokens)` after each batch; `stop` is checked before each unit and between
        batches; `group_small`: score small units together (only for a list that never waits on
        this worker's results: see score_units)."""
        ck = self.checkpoint
        # Units scored together (many small ones) are committed together: one part and one record
        # for the group, so thousands of one-row inputs do not cost thousands of objects.
        for together in score_units(units, self.work.layout, self.work.cfg, self.engine,
                                    on_batch=self._counted(on_batch), stop=stop, timer=self.timer,
                                    group_small=group_small,
                                    kept_for=lambda u: ck.kept(u.id, refresh=not self.sole_writer),
                                    save_partial=lambda items: ck.commit_partials([(u.id, *a) for u, *a in items]),
                                    batches=True, dedup=self.dedup):
            t0 = time.perf_counter()
            records = ck.commit_group([(unit.id, part, info) for unit, part, info in together])
            self.timer.add("writing_parts", t0)
            for (unit, _, info), record in zip(together, records):
                self.units += 1
                self.busy_s += info.get("seconds", 0.0)
                yield unit, record

    def close(self) -> None:
        """Let go of the stores' open files (and log what the cache gave)."""
        if self.dedup is not None:
            self.dedup.close()
            self.dedup = None

    def _counted(self, on_batch):
        def counted(pairs: int, tokens: int) -> None:
            if not self.timeline.seen("first_batch"):
                self.engine.synchronize()  # done, not only launched
                self.timeline.mark("first_batch")
            self.pairs += pairs
            self.tokens += tokens
            if on_batch is not None:
                on_batch(pairs, tokens)

        return counted

    def row(self) -> dict:
        """This worker's row of the summary's per-device table."""
        return {"device": self.device, "units": self.units, "pairs": self.pairs, "tokens": self.tokens,
                "busy_seconds": round(self.busy_s, 3),
                "stage_seconds": {k: round(v, 3) for k, v in self.timer.seconds.items()},
                "startup": self.timeline.stages()}


def load_engine(cfg: RunConfig, kind):
    """The engine of `cfg` on `cfg.device`, with GPU memory failures as one line naming the free
    memory and the fix."""
    # torch and the engines load here, not when the driver imports the executors: `--help`,
    # planning and input errors stay fast, and workers set their bytecode cache first.
    import torch

    from pipeline.engines.score import load_engine as load

    try:
        return load(cfg, kind)
    except (torch.OutOfMemoryError, torch.AcceleratorError if hasattr(torch, "AcceleratorError") else RuntimeError
            ) as exc:
        if not isinstance(exc, torch.OutOfMemoryError) and "CUDA" not in str(exc):
            raise
        free = ""
        try:
            free_b, total_b = torch.cuda.mem_get_info()
            free = f" ({free_b / 2**20:.0f} MiB free of {total_b / 2**30:.0f} GiB)"
        except Exception:  # no CUDA context to ask: say nothing rather than guess
            pass
        raise ScoringError(
            f"model {cfg.model}: the GPU has not enough free memory to load it{free}; another process may hold "
            "it: free the GPU, pick another with --device cuda:N, or pass --device cpu"
        ) from None

