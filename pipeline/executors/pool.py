"""Several devices on one host: one worker process per device, units handed out as workers ask.

The driver (this process) owns the plan, the checkpoint records and the progress; each worker
process runs a `UnitWorker` (executors/worker.py): it loads the model once on its device, then
asks for a unit, scores it, writes its part into the checkpoint and reports the unit's record.
Nothing is split in advance, so a slow device takes fewer units. A worker that dies (killed, a
CUDA error) loses only the units it held, which go back to the front of the queue for the
others; the run fails only when every worker is gone, or when a worker reports a domain error
(bad input is bad on every device).

The channel is one `multiprocessing` pipe per worker. Messages, worker to driver:
  ("ready", info)                 the model is loaded
  ("want",)                       give me a unit (the worker asks one unit ahead, to prefetch)
  ("progress", pairs, tokens)     a batch was scored
  ("startup", marks)              its startup timeline, once its first batch is done
  ("done", unit_id, record)       the unit's part is written
  ("error", exit_code, message)   a domain error: stop the run with it
driver to worker: ("unit", unit), ("end",) and ("stop",).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait

from pipeline.errors import RerankError, first_line
from pipeline.runtime.bytecode import use_pycache
from pipeline.runtime.startup import Timeline
from pipeline.runtime.stop import StopToken

from .specs import ExecutorSpec, WorkSpec
from .worker import UnitWorker

log = logging.getLogger(__name__)

# A unit whose worker died this many times is not handed out again: the run stops with an
# error instead of letting one poisonous unit kill every worker in turn.
MAX_ATTEMPTS = 3
# How often the driver looks at the stop token while no worker says anything.
POLL_S = 0.2


@dataclass
class WorkerState:
    index: int
    device: str
    proc: mp.Process
    conn: object
    held: deque = field(default_factory=deque)  # units sent and not yet done, oldest first
    waiting: int = 0  # "want" requests not yet answered
    ready: bool = False
    alive: bool = True
    units: int = 0
    pairs: int = 0
    tokens: int = 0
    busy_s: float = 0.0
    started: float = 0.0
    load_s: float = 0.0
    exit_reason: str = ""
    startup: list = field(default_factory=list)  # its timeline's marks, once its first batch is done


class DeviceError(RerankError):
    """Every worker is gone, or a unit killed its workers too often."""

    exit_code = 1


class _RemoteDomainError(RerankError):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def run_pool(executor: ExecutorSpec, work: WorkSpec, units, on_unit_done, progress=None, stop=None) -> list[dict]:
    """Run `units` on one worker process per device of `executor.devices`. `on_unit_done(unit,
    record)` records a finished unit; it runs in this process, in the order units finish. The
    first worker to score a batch continues the run's timeline (`executor.timeline`) with its
    own. Returns one row per device for the summary."""
    ctx = mp.get_context("spawn")  # not fork: CUDA cannot be used in a forked child
    queue = deque(units)
    by_id = {u.id: u for u in units}
    attempts: dict[str, int] = {}
    workers: list[WorkerState] = []
    level = logging.getLogger().getEffectiveLevel()
    timeline = executor.timeline
    t_start = time.monotonic()
    try:
        for i, dev in enumerate(executor.devices):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=pool_worker_main, args=(child, dev, work, level, executor.cpu_threads),
                               name=f"rerank-worker-{i}", daemon=True)
            proc.start()
            child.close()
            workers.append(WorkerState(i, dev, proc, parent, started=time.monotonic()))
        remaining = len(queue)
        last_error = ""
        while remaining:
            if stop is not None:
                stop.check()  # a check point: between worker messages
            alive = [w for w in workers if w.alive]
            if not alive:
                raise DeviceError(f"every worker is gone (last: {last_error}); check the devices and "
                                  "rerun the same command to resume")
            objs = [w.conn for w in alive] + [w.proc.sentinel for w in alive]
            for obj in wait(objs, timeout=POLL_S):
                w = next(x for x in alive if obj is x.conn or obj == x.proc.sentinel)
                if not w.alive:
                    continue
                if obj is w.conn:
                    try:
                        msg = w.conn.recv()
                    except (EOFError, OSError):
                        msg = None
                    if msg is not None:
                        remaining -= _handle(w, msg, by_id, on_unit_done, progress, timeline)
                        continue
                last_error = _bury(w, queue, attempts)
            _answer(workers, queue)
        t_end = time.monotonic()  # before the workers' exit, which is teardown, not work
    finally:
        _shutdown(workers)
    return [{"device": w.device, "units": w.units, "pairs": w.pairs, "tokens": w.tokens,
             "busy_seconds": round(w.busy_s, 3), "load_seconds": round(w.load_s, 3),
             # From this worker's model being loaded to the end of the run: its share of the wall.
             "seconds_after_load": round(t_end - t_start - w.load_s, 3) if w.ready else None,
             "alive": w.alive, **({"exit": w.exit_reason} if w.exit_reason else {}),
             **({"startup": Timeline(w.startup).stages()} if w.startup else {})} for w in workers]


def _handle(w: WorkerState, msg, by_id, on_unit_done, progress, timeline) -> int:
    kind = msg[0]
    if kind == "want":
        w.waiting += 1
    elif kind == "ready":
        w.ready = True
        w.load_s = time.monotonic() - w.started
        log.info("worker %d on %s ready (%.1f s)", w.index, w.device, w.load_s)
    elif kind == "progress":
        w.pairs += msg[1]
        w.tokens += msg[2]
        if progress is not None:
            progress(msg[1], msg[2])
    elif kind == "startup":
        w.startup = msg[1]
        if timeline is not None and not timeline.seen("first_batch"):  # the first worker to score
            timeline.then(w.startup, "spawn_workers")
    elif kind == "done":
        unit_id, record = msg[1], msg[2]
        unit = by_id[unit_id]
        w.held = deque(u for u in w.held if u.id != unit_id)
        w.units += 1
        w.busy_s += record.get("seconds", 0.0)
        on_unit_done(unit, record)
        return 1
    elif kind == "error":
        raise _RemoteDomainError(msg[2], msg[1])
    return 0


def _bury(w: WorkerState, queue: deque, attempts: dict) -> str:
    """A worker died: its units go back to the front of the queue, in order."""
    w.alive = False
    w.proc.join(timeout=5)
    code = w.proc.exitcode
    w.exit_reason = f"worker {w.index} on {w.device} exited with {code}"
    log.warning("%s; its %d unit(s) go to the other workers", w.exit_reason, len(w.held))
    for u in reversed(w.held):
        attempts[u.id] = attempts.get(u.id, 0) + 1
        if attempts[u.id] >= MAX_ATTEMPTS:
            raise DeviceError(f"unit {u.id} ({u.path} rows {u.start}-{u.stop}) killed its worker "
                              f"{attempts[u.id]} times ({w.exit_reason}); check that input and the "
                              "device, then rerun to resume")
        queue.appendleft(u)
    w.held.clear()
    return w.exit_reason


def _answer(workers, queue: deque) -> None:
    """Hand queued units to workers that asked. A worker with nothing in hand is served first; one
    that already holds a unit (asking one ahead, to prefetch) gets another only while more units
    wait than there are empty-handed workers, so a worker that loaded first cannot take the units
    of one still loading. A request with nothing to give stays parked until the run ends ("stop")
    or a dead worker's units come back."""
    for w in sorted((x for x in workers if x.alive), key=lambda x: len(x.held)):
        while w.waiting and queue:
            empty_handed = sum(1 for x in workers if x.alive and not x.held and x is not w)
            if w.held and len(queue) <= empty_handed:
                break
            u = queue.popleft()
            w.held.append(u)
            _send(w, ("unit", u))
            w.waiting -= 1


def _send(w: WorkerState, msg) -> None:
    try:
        w.conn.send(msg)
    except (BrokenPipeError, OSError):
        pass  # its death shows up on the sentinel


def _shutdown(workers) -> None:
    for w in workers:
        if w.proc.is_alive():
            _send(w, ("stop",))
    deadline = time.monotonic() + 10
    for w in workers:
        w.proc.join(timeout=max(0.1, deadline - time.monotonic()))
        if w.proc.is_alive():
            w.proc.kill()
            w.proc.join(timeout=5)
        try:
            w.conn.close()
        except OSError:
            pass


# -- the worker side ----------------------------------------------------------------------------

class DriverLink:
    """A worker's end of the pipe. `units()` asks the driver for work one unit at a time; the
    scoring thread and the prefetch thread both send, so sends are locked. A thread reads what
    the driver sends as soon as it comes, so a "stop" (or the driver gone) sets `stop`, the
    worker's stop token, at once, even while the prefetch thread waits for room in its queue
    (the scorer then commits what it has scored of its unit before the worker leaves)."""

    def __init__(self, conn):
        self.conn = conn
        self.lock = threading.Lock()
        self.stop = StopToken(poll=_driver_gone)
        self.inbox: queue_mod.Queue = queue_mod.Queue()
        threading.Thread(target=self._read, name="rerank-driver-link", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                msg = None
            if msg is None or msg[0] != "unit":  # "stop", or the driver is gone
                self.stop.set()
                self.inbox.put(None)
                return
            self.inbox.put(msg[1])

    def send(self, msg) -> None:
        with self.lock:
            self.conn.send(msg)

    def units(self):
        while not self.stop.requested:
            self.send(("want",))
            unit = self.inbox.get()
            if unit is None or self.stop.requested:
                return
            yield unit

    def report_error(self, exc: BaseException) -> None:
        code = exc.exit_code if isinstance(exc, RerankError) else 1
        try:
            self.send(("error", code, str(exc) if isinstance(exc, RerankError) else first_line(exc)))
        except OSError:
            pass


def _driver_gone() -> bool:
    return os.getppid() == 1  # re-parented: the driver died without closing the pipe first


def pool_worker_main(conn, device: str, work: WorkSpec, log_level: int, cpu_threads: int) -> None:
    """Entry point of a pool process: a UnitWorker on `device`, fed by the driver's pipe."""
    use_pycache()  # the driver's bytecode cache, written to as well (runtime/bytecode.py)
    logging.basicConfig(level=log_level, format=f"rerank-batch[{device}]: %(message)s", force=True)
    for noisy in ("transformers", "huggingface_hub", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # SIGINT/SIGTERM go to the driver; workers ignore SIGINT (the terminal sends it to the whole
    # process group) and stop when the driver says so or disappears.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    link = DriverLink(conn)
    try:
        _limit_threads(device, cpu_threads)
        worker = UnitWorker(work, device)
        link.send(("ready", {"device": device, "pid": os.getpid()}))

        sent_startup = [False]

        def progress(pairs: int, tokens: int) -> None:
            link.send(("progress", pairs, tokens))
            if not sent_startup[0]:  # the first batch ends this worker's startup timeline
                link.send(("startup", worker.timeline.marks))
                sent_startup[0] = True

        for unit, record in worker.run(link.units(), on_batch=progress, stop=link.stop):
            link.send(("done", unit.id, record))
        worker.close()
    except KeyboardInterrupt:
        pass
    except BaseException as exc:  # noqa: BLE001 - reported to the driver, then this process ends
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


def _limit_threads(device: str, cpu_threads: int) -> None:
    """CPU workers share the host's cores: each gets its share instead of all of them."""
    if device == "cpu" and cpu_threads > 0:
        from pipeline.engines.threads import share_for_worker  # imports torch, which the engine loads next anyway

        share_for_worker(cpu_threads)
