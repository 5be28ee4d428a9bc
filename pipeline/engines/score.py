"""The Scorer: a loaded reranker that scores batches of token ids on one device.

Its four jobs live in their own modules: loading (engines/loading.py), the memory budget
(engines/budget.py), packing (engines/packing.py, engines/prefix.py) and OOM recovery
(engines/oom.py); this class picks the forward (fused Qwen3, fused encoder, transformers' modules,
padded), runs it, and coordinates a stream of chunks into batches. Executors call only `load`,
`score` / `score_stream`, `encoder` and `is_padded`.

Causal families run packed (varlen) batches, and only the last position of each sequence is
projected: onto the LM-head rows of the judged tokens, or onto the classification head. The
full-vocabulary logits of the reference recipe are never formed. BERT, XLM-R and ModernBERT
cross-encoders run packed too, bidirectionally (fused_encoder.py); other encoders run padded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import RunConfig
from pipeline.engines import budget, compiled, fused_encoder, fused_qwen3, loading, oom, prefix
from pipeline.engines.families import ModelKind
from pipeline.engines.loading import decoder_of
from pipeline.engines.packing import plan_batches
from pipeline.errors import ModelError
from pipeline.runtime import startup

log = logging.getLogger(__name__)


@dataclass
class ScoreStats:
    batches: int = 0
    oom_retries: int = 0
    tokens: int = 0  # tokens of the pairs scored (before prefix sharing)
    tokens_computed: int = 0  # tokens that went through the model (after prefix sharing)
    attention_area: int = 0  # sum over attention blocks of 2*Lq*Lk - Lq^2 (for FLOP counts)


class Scorer:
    """A model, its tokenizer-side encoder and the batched forward; see `load`."""

    def __init__(self, model, tokenizer, encoder, device, dtype, cfg: RunConfig, kernel: str, kind: ModelKind,
                 *, logits: bool = False):
        self.model = model
        # True: `score` gives each pair's head logits (one row of 1 or 2) instead of its score.
        self.logits = logits
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.device = device
        self.dtype = dtype
        self.cfg = cfg
        self.kernel = kernel
        self.kind = kind
        self.padded = kind.family == "seq-cls-encoder"
        self.fused = self.fused_encoder = None
        self.sharing = prefix.resolve_mode(cfg.prefix_sharing, device.type, self.padded)
        if self.padded and kernel != "padded-sdpa":
            use_compile = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
            self.fused_encoder = fused_encoder.FusedEncoder(model, kernel, compile=use_compile)
            if use_compile and not self._warm_up(self.fused_encoder.warm_up):
                self.fused_encoder.use_eager()
            self.padded = False
            self.engine = "fused-encoder"
        elif self.padded:
            if cfg.engine == "fused":
                raise ModelError(f"--engine fused does not support {model.config.model_type} cross-encoders; "
                                 "use --engine auto")
            self.engine = "transformers-padded"
        else:
            direct = getattr(model, "direct", False)  # tensors loaded without transformers (direct.py)
            self.decoder = None if direct else decoder_of(model)
            if kind.family == "yes-no":
                w = model.get_output_embeddings().weight
                rows = [encoder.positive_id] if encoder.negative_id is None else [encoder.negative_id, encoder.positive_id]
                # float32 head: the judged logits are the whole output, so keep them exact.
                self.head_w, self.head_b = w[rows].detach().to(torch.float32), None
            else:
                score = model.score
                self.head_w = score.weight.detach().to(torch.float32)
                self.head_b = score.bias.detach().to(torch.float32) if getattr(score, "bias", None) is not None else None
            self.layer_types = sorted(set(getattr(model.config, "layer_types", None) or ["full_attention"]))
            # Eager where the warm-up on dummy rows failed (direct.py): the compiler is broken here.
            use_compile = compiled.wanted(cfg, device) and not getattr(model, "compile_failed", False)
            if direct:
                self.fused = fused_qwen3.FusedQwen3.from_tensors(model.config, model.tensors, kernel, use_compile)
            elif cfg.engine != "transformers" and fused_qwen3.supports(model):
                self.fused = fused_qwen3.FusedQwen3.from_hf(model, self.decoder, kernel, compile=use_compile)
            elif cfg.engine == "fused":
                raise ModelError(f"--engine fused supports plain Qwen3 decoders only; this model is "
                                 f"{model.config.model_type}: use --engine auto")
            self.engine = "fused" if self.fused is not None else "transformers"
            if self.fused is not None and use_compile and not direct:  # direct.py warmed up while loading
                startup.mark("model_setup")
                if not self._warm_up(lambda: fused_qwen3.warm_up(model.config, device, dtype, parameters=True)):
                    self.fused.use_eager()
        log.info("model %s (%s) on %s in %s, attention %s, engine %s", cfg.model, kind.family, device,
                 str(dtype).removeprefix("torch."), kernel, self.engine)
        self.stats = ScoreStats()
        startup.mark("model_setup")
        self.budget = budget.size_budget(self)
        startup.mark("memory_probe")

    def _warm_up(self, fn) -> bool:
        """Compile before the memory probe, so the startup timeline shows compilation apart.
        False (warned): compiling failed, the caller runs eagerly. torch.compile compiles on the
        first call, so without this a broken compiler would fail the first real batch."""
        from pipeline.errors import first_line

        try:
            fn()
            ok = True
        except Exception as exc:
            log.warning("torch.compile failed on dummy rows (%s); running eagerly", first_line(exc))
            ok = False
        startup.mark("compile")
        return ok

    @classmethod
    def load(cls, cfg: RunConfig, kind: ModelKind | None = None, *, logits: bool = False) -> "Scorer":
        """`logits=True`: `score` returns the head's logits, shape (pairs, 1 or 2), not scores."""
        model, tokenizer, device, kind = loading.load(cfg, kind)
        return cls.from_model(model, tokenizer, cfg, device, kind, logits=logits)

    @classmethod
    def from_model(cls, model, tokenizer, cfg: RunConfig, device=None, kind: ModelKind | None = None,
                   *, logits: bool = False) -> "Scorer":
        """A scorer over an already built model (the benchmark builds random ones in memory)."""
        device, dtype, kind, encoder, kernel = loading.prepare(model, tokenizer, cfg, device, kind)
        return cls(model, tokenizer, encoder, device, dtype, cfg, kernel, kind, logits=logits)

    @property
    def is_padded(self) -> bool:
        """True where batches are padded rows (encoders without a packed forward), not packed."""
        return self.padded

    # -- scoring -------------------------------------------------------------------------------
    def _put(self, a, dtype):
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=dtype))
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    @torch.inference_mode()
    def _forward(self, flat: np.ndarray, cu: np.ndarray, pos: np.ndarray, types=None, shared=None) -> torch.Tensor:
        """Scores of one batch: flat ids, cu_seqlens, positions (token types); `shared`: the
        prefix.SharedBatch these come from, for a batch with shared prefixes."""
        if shared is not None:
            return self._forward_shared(shared)
        if self.padded:
            return self._forward_padded(flat, cu, types, self._put)
        cu_t = self._put(cu, np.int32)
        if self.fused_encoder is not None:  # packed cross-encoder: the classifier reads each first row
            tt = self._put(types, np.int64) if types is not None else None
            logits = self.fused_encoder.logits(self._put(flat, np.int64), tt, self._put(pos, np.int64), cu_t,
                                               int(np.max(np.diff(cu))), cu_t[:-1].long())
            return self._activate(logits.to(torch.float32))
        return self._forward_packed(flat, pos, cu_t, int(np.max(np.diff(cu))), cu_t[1:].long() - 1)

    @torch.inference_mode()
    def _forward_shared(self, b: "prefix.SharedBatch") -> torch.Tensor:
        """A batch whose candidates share their group's prefix rows (see prefix.py)."""
        put = self._put
        cu_k = put(b.cu_k, np.int32)
        shared = (put(b.kv_idx, np.int64), cu_k, int(np.max(np.diff(b.cu_k))))
        return self._forward_packed(b.ids, b.pos, put(b.cu_q, np.int32), int(np.max(np.diff(b.cu_q))),
                                    put(b.last, np.int64), shared)

    def _forward_packed(self, flat, pos, cu_t, max_len: int, last_idx, shared=None) -> torch.Tensor:
        input_ids = self._put(flat, np.int64)[None]
        position_ids = self._put(pos, np.int64)[None]
        if self.fused is not None:
            last = self.fused.last_hidden(input_ids[0], position_ids[0], cu_t, max_len, last_idx, shared)
            return self._activate(self._head(last))
        kv = {} if shared is None else {"rerank_kv_idx": shared[0]}
        cu_k, max_k = (cu_t, max_len) if shared is None else shared[1:]
        out = self.decoder(
            input_ids=input_ids,
            position_ids=position_ids,
            # A dict of masks tells transformers not to build any: packing needs none.
            attention_mask={t: None for t in self.layer_types},
            use_cache=False,
            cu_seq_lens_q=cu_t, cu_seq_lens_k=cu_k, max_length_q=max_len, max_length_k=max_k, **kv,
        )
        return self._activate(self._head(out.last_hidden_state[0, last_idx]))

    def _forward_padded(self, flat, cu, types, put) -> torch.Tensor:
        # Cross-encoders attend both ways, so no packing: right-padded rows of the batch's
        # longest length (batches are length-sorted, so little is wasted).
        lens = np.diff(cu)
        n, width = len(lens), int(lens.max())
        ids = np.full((n, width), self.tokenizer.pad_token_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        rows = np.repeat(np.arange(n), lens)
        cols = np.arange(len(flat)) - np.repeat(cu[:-1], lens)
        ids[rows, cols] = flat
        mask[rows, cols] = 1
        kw = {"input_ids": put(ids, np.int64), "attention_mask": put(mask, np.int64)}
        if types is not None:
            tt = np.zeros((n, width), dtype=np.int64)
            tt[rows, cols] = types
            kw["token_type_ids"] = put(tt, np.int64)
        logits = self.model(**kw).logits.to(torch.float32)
        return self._activate(logits)

    def _head(self, last: torch.Tensor) -> torch.Tensor:
        logits = last.to(torch.float32) @ self.head_w.T
        return logits + self.head_b if self.head_b is not None else logits

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.logits else activate(logits, self.cfg.activation)

    def score(self, enc, *, on_batch=None, stop=None) -> np.ndarray:
        """Scores (float32) of every pair in `enc`, in `enc`'s order."""
        return self.score_stream([enc], on_batch=on_batch, stop=stop)

    def score_stream(self, chunks, *, on_batch=None, stop=None, commit=None) -> np.ndarray:
        """Scores of pairs that arrive in chunks (tokenized while the GPU works), in order.

        Full batches go to the GPU as soon as a chunk lands; the short remainder waits for the
        next chunk, so only the last batch of the stream can be partly empty.

        `commit`: an object with `due()` and `__call__(idx, scores)`. Between batches, when
        `due()` says so, and when the stream stops (KeyboardInterrupt), the scores of the pairs
        batched so far are brought to the host and handed to it (positions in the stream, their
        scores), for the caller to make durable. Batching does not change.
        """
        ids = np.empty(0, dtype=np.int32)
        types = None  # token types, for cross-encoders
        keys = None  # group keys, for prefix sharing
        share = self.sharing != "off"
        offsets = np.zeros(1, dtype=np.int64)
        pool = np.empty(0, dtype=np.int64)  # pairs not yet sent
        pending: list[tuple[np.ndarray, torch.Tensor]] = []
        saved: list[tuple[np.ndarray, np.ndarray]] = []  # handed to `commit`, on the host

        def run(batches, plen):
            for b in batches:
                oom.submit(self, pool[b], ids, offsets, types, pending, on_batch, stop,
                           None if plen is None else (plen[b], keys[pool[b]]))
                if commit is not None and pending and commit.due():
                    self._hand_over(pending, saved, commit)

        try:
            for enc in chunks:
                if len(enc) == 0:
                    continue
                n0 = len(offsets) - 1
                ids = np.concatenate([ids, enc.ids]) if len(ids) else enc.ids
                if enc.type_ids is not None:
                    types = np.concatenate([types, enc.type_ids]) if types is not None else enc.type_ids
                if enc.keys is None or not share:
                    share, keys = False, None  # a chunk without group keys: this stream shares nothing
                else:
                    keys = np.concatenate([keys, enc.keys]) if keys is not None else enc.keys
                offsets = np.concatenate([offsets, enc.offsets[1:] + offsets[-1]])
                pool = np.concatenate([pool, np.arange(n0, n0 + len(enc), dtype=np.int64)])
                batches, plen = self._plan(pool, ids, offsets, keys)
                run(batches[:-1], plen)
                pool = pool[batches[-1]]
            if len(pool):
                batches, plen = self._plan(pool, ids, offsets, keys)
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
            saved.append((np.concatenate([i for i, _ in pending]),
                          torch.cat([s for _, s in pending]).float().cpu().numpy()))
        if not saved:
            return np.empty(len(offsets) - 1, dtype=np.float32)
        out = np.empty((len(offsets) - 1,) + saved[0][1].shape[1:], dtype=np.float32)  # (pairs,) or (pairs, labels)
        for idx, s in saved:
            out[idx] = s
        return out

    @staticmethod
    def _hand_over(pending: list, saved: list, commit) -> None:
        idx = np.concatenate([i for i, _ in pending])
        scores = torch.cat([s for _, s in pending]).float().cpu().numpy()
        pending.clear()
        saved.append((idx, scores))
        commit(idx, scores)

    def _plan(self, pool, ids, offsets, keys):
        """Batches of `pool` (positions into it) and, where prefixes are shared, each pair's
        shared-prefix length (else None)."""
        lengths = offsets[pool + 1] - offsets[pool]
        if keys is not None and self.sharing != "off" and len(pool) > 1:
            pk = keys[pool]
            plen = prefix.prefix_lengths(ids, offsets, pool, keys)
            saved = prefix.saving(lengths, plen, pk)
            if saved > 0 and (self.sharing == "on" or saved >= prefix.AUTO_MIN_SAVING * lengths.sum()):
                return prefix.plan_shared(lengths, plen, pk, self.budget), plen
        return plan_batches(lengths, self.budget, self.padded), None


def activate(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """Scores from head logits (pairs, 1 or 2): [no, yes] or two labels: softmax's second; one
    logit: sigmoid; activation "none": the raw logit (for two, the log-odds second minus first)."""
    raw = logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]
    if activation == "none":
        return raw
    if logits.shape[1] == 1:
        return torch.sigmoid(raw)
    return torch.softmax(logits, dim=-1)[:, 1]
