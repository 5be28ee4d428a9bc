"""The engine: a loaded reranker that scores pairs of token ids on one device (engine.Engine).

`load_engine` loads a model (loading.py) and `engine_from_model` takes one built in memory; both
pick its forward once (forwards.choose) and size its token budget (budget.py). `TorchEngine`
then packs pairs into batches (packing.py, prefix.py), runs them through the forward, splitting a
batch that runs out of memory (oom.py), and turns head logits into scores (`activate`).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from pipeline.config import RunConfig
from pipeline.engines import budget, forwards, loading, prefix
from pipeline.engines.engine import Engine, EngineInfo, EngineStats
from pipeline.engines.oom import BatchRunner
from pipeline.engines.packing import gather_packed, plan_batches
from pipeline.engines.resolve import ModelKind, dtype_label, sharing_mode
from pipeline.runtime import startup

log = logging.getLogger(__name__)


def load_engine(cfg: RunConfig, kind: ModelKind | None = None, *, logits: bool = False) -> Engine:
    """The engine of `cfg.model` (a local directory) as `cfg` asks: device, dtype, forward
    (--engine, --attention, --compile), prefix sharing, batch budget. `logits=True`: `score` gives
    the head's logits, shape (pairs, 1 or 2), instead of scores."""
    return _build(loading.load(cfg, kind), cfg, logits)


def engine_from_model(model, tokenizer, cfg: RunConfig, device: torch.device | None = None,
                      kind: ModelKind | None = None, *, logits: bool = False, forward=None) -> Engine:
    """An engine over a model already built in memory (a transformers model and its tokenizer;
    the benchmark builds random ones). `forward`: run this forward (forwards.Forward) instead of
    the one forwards.choose would pick: another engine's (`TorchEngine.forward`), to score one
    model under several configs (a fused forward takes over the model's weights, so a second
    engine over the same model needs it), or a stand-in that costs nothing."""
    return _build(loading.prepare(model, tokenizer, cfg, device, kind), cfg, logits, forward)


def _build(m: loading.Loaded, cfg: RunConfig, logits: bool, forward=None) -> "TorchEngine":
    sharing = sharing_mode(cfg.prefix_sharing, m.device.type, m.kind.family == "seq-cls-encoder")
    forward = forward if forward is not None else forwards.choose(m, cfg)
    dtype = dtype_label(cfg.dtype, m.dtype)
    log.info("model %s (%s) on %s in %s, attention %s, engine %s", cfg.model, m.kind.family, m.device, dtype,
             forward.kernel, forward.name)
    startup.mark("model_setup")
    tokens = budget.size_budget(forward, m, cfg)
    startup.mark("memory_probe")
    info = EngineInfo(kind=m.kind, forward=forward.name, kernel=forward.kernel, device=str(m.device), dtype=dtype,
                      sharing=sharing, compiled=forward.compiled)
    return TorchEngine(forward, m.encoder, cfg, info, token_budget=tokens, logits=logits)


class TorchEngine:
    """engine.Engine over a forward (forwards.Forward) on one device.

    `forward`, `encoder`, `cfg` (activation, empty_cache_every) and `info` (device, sharing) as
    load_engine builds them; `token_budget`: tokens per batch to start from. A test or benchmark
    may build one over a forward of its own (a stand-in, or one that fails on purpose).
    """

    def __init__(self, forward, encoder, cfg: RunConfig, info: EngineInfo, *, token_budget: int,
                 logits: bool = False):
        self.forward = forward
        self.encoder = encoder
        self.info = info
        self._activation = None if logits else cfg.activation  # None: `score` gives the head's logits
        self._device = torch.device(info.device)
        self._runner = BatchRunner(forward, token_budget, self._device, cfg.empty_cache_every)

    @property
    def token_budget(self) -> int:
        return self._runner.budget

    def stats(self) -> EngineStats:
        return self._runner.stats()

    def synchronize(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def reset_peak_memory(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)

    def peak_memory_bytes(self) -> int:
        return int(torch.cuda.max_memory_reserved(self._device)) if self._device.type == "cuda" else 0

    def score(self, enc, *, on_batch=None, stop=None) -> np.ndarray:
        """Scores (float32) of every pair in `enc`, in `enc`'s order."""
        return self.score_stream([enc], on_batch=on_batch, stop=stop)

    def score_stream(self, chunks, *, on_batch=None, stop=None, commit=None) -> np.ndarray:
        """Scores of pairs that arrive in chunks (tokenized while the GPU works), in order.

        Full batches go to the GPU as soon as a chunk lands; the short remainder waits for the
        next chunk, so only the last batch of the stream can be partly empty. `stop`
        (runtime.stop.StopToken or None) is checked before each batch: a stop raises
        KeyboardInterrupt there.

        `commit`: an object with `due()` and `__call__(idx, scores)`. Between batches, when
        `due()` says so, and when the stream stops (KeyboardInterrupt), the scores of the pairs
        batched so far are brought to the host and handed to it (positions in the stream, their
        scores), for the caller to make durable. Batching does not change.
        """
        # The pairs not yet sent (the pool: the short remainder of the chunks so far), laid out
        # flat in pool order, and their positions in the stream (`where`). Pairs sent are dropped,
        # so each chunk costs its own size, not the stream's so far.
        ids = np.empty(0, dtype=np.int32)
        types = None  # token types, for cross-encoders
        keys = None  # group keys, for prefix sharing
        share = self.info.sharing != "off"
        offsets = np.zeros(1, dtype=np.int64)
        where = np.empty(0, dtype=np.int64)
        total = 0  # pairs in the stream so far
        pending: list[tuple[np.ndarray, torch.Tensor]] = []
        saved: list[tuple[np.ndarray, np.ndarray]] = []  # handed to `commit`, on the host

        def run(batches, plen):
            pool = np.arange(len(where))
            for b in batches:
                for idx, tokens, logits in self._runner.run(ids, offsets, types, pool[b],
                                                            None if plen is None else (plen[b], keys[pool[b]]), stop):
                    pending.append((where[idx], self._activate(logits)))
                    if on_batch is not None:
                        on_batch(len(idx), tokens)
                if commit is not None and pending and commit.due():
                    self._hand_over(pending, saved, commit)

        try:
            for enc in chunks:
                if len(enc) == 0:
                    continue
                ids = np.concatenate([ids, enc.ids]) if len(ids) else enc.ids
                if enc.type_ids is not None:
                    types = np.concatenate([types, enc.type_ids]) if types is not None else enc.type_ids
                if enc.keys is None or not share:
                    share, keys = False, None  # a chunk without group keys: this stream shares nothing
                else:
                    keys = np.concatenate([keys, enc.keys]) if keys is not None else enc.keys
                offsets = np.concatenate([offsets, enc.offsets[1:] + offsets[-1]])
                where = np.concatenate([where, np.arange(total, total + len(enc), dtype=np.int64)])
                total += len(enc)
                batches, plen = self._plan(np.arange(len(where)), ids, offsets, keys)
                run(batches[:-1], plen)
                rest = batches[-1]  # kept for the next chunk, in this order
                kept = gather_packed(ids, offsets, rest, types)
                ids, offsets, types = kept.ids, kept.cu, kept.types
                keys = keys[rest] if keys is not None else None
                where = where[rest]
            if len(where):
                batches, plen = self._plan(np.arange(len(where)), ids, offsets, keys)
                run(batches, plen)
        except KeyboardInterrupt:
            if commit is not None and pending:  # a stop keeps what was scored
                self._hand_over(pending, saved, commit)
            raise
        except Exception:
            # A failure (a pair that never fits, a full disk) keeps what was scored too, where the
            # scores can still be read: after a device error they cannot, and the error is the news.
            if commit is not None and pending:
                try:
                    self._hand_over(pending, saved, commit)
                except Exception as exc:
                    log.debug("could not commit the pairs scored before the failure: %s", exc)
            raise
        if pending:
            # One device-to-host copy per window (or per commit): no host sync between batches.
            saved.append(to_host(pending))
        if not saved:
            return np.empty(total, dtype=np.float32)
        out = np.empty((total,) + saved[0][1].shape[1:], dtype=np.float32)  # (pairs,) or (pairs, labels)
        for idx, s in saved:
            out[idx] = s
        return out

    @torch.inference_mode()
    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self._activation is None else activate(logits, self._activation)

    @staticmethod
    def _hand_over(pending: list, saved: list, commit) -> None:
        idx, scores = to_host(pending)
        pending.clear()
        saved.append((idx, scores))
        commit(idx, scores)

    def _plan(self, pool, ids, offsets, keys):
        """Batches of `pool` (positions into it) and, where prefixes are shared, each pair's
        shared-prefix length (else None)."""
        lengths = offsets[pool + 1] - offsets[pool]
        budget_now = self._runner.budget
        if keys is not None and self.info.sharing != "off" and len(pool) > 1:
            pk = keys[pool]
            plen = prefix.prefix_lengths(ids, offsets, pool, keys)
            saved = prefix.saving(lengths, plen, pk)
            if saved > 0 and (self.info.sharing == "on" or saved >= prefix.AUTO_MIN_SAVING * lengths.sum()):
                return prefix.plan_shared(lengths, plen, pk, budget_now), plen
        return plan_batches(lengths, budget_now, self.forward.padded), None


def to_host(pending: list[tuple[np.ndarray, torch.Tensor]]) -> tuple[np.ndarray, np.ndarray]:
    """The positions and scores of the batches run since the last copy, on the host: the one
    device-to-host copy, where the host waits for the device to finish them."""
    return np.concatenate([i for i, _ in pending]), torch.cat([s for _, s in pending]).float().cpu().numpy()


def activate(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """Scores from head logits (pairs, 1 or 2): [no, yes] or two labels: softmax's second; one
    logit: sigmoid; activation "none": the raw logit (for two, the log-odds second minus first)."""
    raw = logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]
    if activation == "none":
        return raw
    if logits.shape[1] == 1:
        return torch.sigmoid(raw)
    return torch.softmax(logits, dim=-1)[:, 1]
