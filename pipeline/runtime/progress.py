"""Progress reporting: a tqdm bar on a terminal, periodic log lines otherwise.

Progress is an argument of the run, not a side effect: library code never prints.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from tqdm import tqdm

log = logging.getLogger("pipeline.runtime.progress")


class Progress:
    """`total_pairs` None: not known in advance (documents scored as windows), so no ETA."""

    def __init__(self, total_pairs: int | None, done_pairs: int = 0, *, bar: bool | None = None,
                 log_every_s: float = 30.0, file=None, min_interval_s: float = 0.1):
        self.total = total_pairs
        self.done = done_pairs
        self.tokens = 0
        self.pairs = 0
        self.t0 = time.monotonic()
        self.last_log = self.t0
        self.log_every_s = log_every_s
        file = file or sys.stderr
        if bar is None:
            bar = is_terminal(file)
        self.bar = None
        if bar:
            # miniters=1: redraw at every batch (at most every min_interval_s). tqdm's default,
            # dynamic miniters, learns a step from the fast first batches and then holds the
            # bar still until its 10 s monitor fires.
            self.bar = tqdm(total=total_pairs, initial=done_pairs, unit="pair", dynamic_ncols=True,
                            smoothing=0.1, file=file, miniters=1, mininterval=min_interval_s)
        elif total_pairs is None:
            log.info("pairs to score: as many as the documents' windows%s; progress every %.0f s",
                     f" ({done_pairs} done before)" if done_pairs else "", log_every_s)
        else:
            log.info("%d pairs to score%s; progress every %.0f s", total_pairs - done_pairs,
                     f" ({done_pairs} done before)" if done_pairs else "", log_every_s)

    def update(self, pairs: int, tokens: int) -> None:
        self.done += pairs
        self.pairs += pairs
        self.tokens += tokens
        now = time.monotonic()
        el = max(now - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.tokens / el / 1000:.1f}k tok/s", refresh=False)
            self.bar.update(pairs)  # draws, with the postfix just set
        else:
            log.debug("batch of %d pairs, %d tokens; %d/%s pairs", pairs, tokens, self.done, self.total)
        if self.bar is None and now - self.last_log >= self.log_every_s and self.total is None:
            self.last_log = now
            log.info("%d pairs, %.1f pairs/s, %.0f tokens/s", self.done, self.pairs / el, self.tokens / el)
        elif self.bar is None and now - self.last_log >= self.log_every_s:
            self.last_log = now
            rate = self.pairs / el
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info("%d/%d pairs (%.1f%%), %.1f pairs/s, %.0f tokens/s, ETA %s", self.done, self.total,
                     100.0 * self.done / max(self.total, 1), rate, self.tokens / el, _fmt_eta(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def is_terminal(file) -> bool:
    """A bar needs a terminal with a width: under `script`, some CI runners and schedulers stderr
    is a terminal of size 0x0, where tqdm draws nothing at all; log lines go there instead."""
    try:
        return file.isatty() and os.get_terminal_size(file.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):
        return False


def _fmt_eta(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    s = int(seconds)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"
