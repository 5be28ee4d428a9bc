"""A unit worker: a loaded model on one device that turns units into written parts.

The same object runs inside the driver (the local executor), inside a pool process (one per
device) and inside a Ray actor. Scoring goes through `score_units`, the only loop that scores.
"""

from __future__ import annotations

import dataclasses
import logging
import os

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class WorkSpec:
    """What a worker needs to score units on its own, in any process: picklable and small."""

    cfg: object  # RunConfig
    kind: object  # families.ModelKind
    layout: object  # read.InputLayout
    sink: object  # storage.sink.SinkSpec: the run's checkpoint


class UnitWorker:
    def __init__(self, spec: WorkSpec, device: str | None = None):
        from pipeline.engines.score import Scorer

        cfg = spec.cfg
        if device is not None and device != cfg.device:
            cfg = dataclasses.replace(cfg, device=device)
        self.spec = dataclasses.replace(spec, cfg=cfg)
        self.scorer = Scorer.load(cfg, spec.kind)

    def run(self, units, on_batch=None, should_stop=None):
        """Score `units` (an iterator, pulled one ahead so reading and tokenizing overlap the
        device) and write each part into the checkpoint; yield (unit, info) as each is written."""
        from pipeline.scoring import score_units

        ck = self.spec.sink.attach()  # no lease: the driver holds the run's
        # kept_for lists the partials again for each unit: one may come from a worker that died.
        for unit, part, info in score_units(units, self.spec.layout, self.spec.cfg, self.scorer,
                                            on_batch=on_batch, should_stop=should_stop,
                                            kept_for=lambda u: ck.kept(u.id),
                                            save_partial=lambda items: ck.commit_partials(
                                                [(u.id, *a) for u, *a in items])):
            yield unit, ck.commit(unit.id, part, info)


def pool_worker_main(conn, device: str, spec: WorkSpec, log_level: int, cpu_threads: int) -> None:
    """Entry point of a pool process (see executors.pool)."""
    from pipeline.runtime.bytecode import use_pycache

    from .pool import DriverLink

    use_pycache()  # the driver's bytecode cache, written to as well (runtime/bytecode.py)

    logging.basicConfig(level=log_level, format=f"rerank-batch[{device}]: %(message)s", force=True)
    for noisy in ("transformers", "huggingface_hub", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    link = DriverLink(conn)
    _watch_for_stop(link)
    try:
        _limit_threads(device, cpu_threads)
        worker = UnitWorker(spec, device)
        link.send(("ready", {"device": device, "pid": os.getpid()}))
        for unit, info in worker.run(link.units(), on_batch=lambda p, t: link.send(("progress", p, t)),
                                     should_stop=link.should_stop):
            link.send(("done", unit.id, info))
    except KeyboardInterrupt:
        pass
    except BaseException as exc:  # noqa: BLE001 - reported to the driver, then this process ends
        from pipeline.errors import RerankError

        if isinstance(exc, RerankError) and exc.exit_code == 2:
            link.report_error(exc)  # bad input or model: stop the whole run
        else:
            log.error("worker on %s failed: %s", device, exc)
            os._exit(3)  # the driver sees a dead worker and hands its units to the others
    finally:
        try:
            conn.close()
        except OSError:
            pass


def _watch_for_stop(link) -> None:
    """SIGINT/SIGTERM go to the driver; workers ignore SIGINT (the terminal sends it to the
    whole process group) and stop when the driver says so or disappears."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _limit_threads(device: str, cpu_threads: int) -> None:
    """CPU workers share the host's cores: each gets its share instead of all of them."""
    if device == "cpu" and cpu_threads > 0:
        import torch

        torch.set_num_threads(cpu_threads)
