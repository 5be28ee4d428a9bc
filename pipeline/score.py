"""Load a reranker and score batches of token ids on one device.

Causal families run packed (varlen) batches, and only the last position of each sequence is
projected: onto the LM-head rows of the judged tokens, or onto the classification head. The
full-vocabulary logits of the reference recipe are never formed. BERT, XLM-R and ModernBERT
cross-encoders run packed too, bidirectionally (fused_encoder.py); other encoders run padded.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import numpy as np
import torch

from . import attention, fused_encoder, fused_qwen3, prefix, startup
from .config import RunConfig
from .errors import ModelError, ScoringError, first_line
from .families import ModelKind, inspect_model
from .tokenize import CrossEncoderEncoder, PairEncoder

log = logging.getLogger(__name__)

CPU_BATCH_TOKENS = 8192
# Past this many tokens a packed batch gains no speed, only memory risk.
MAX_BATCH_TOKENS = 65536
PROBE_TOKENS = 4096


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def plan_batches(lengths: np.ndarray, budget: int, padded: bool = False) -> list[np.ndarray]:
    """Sort by length (longest first) and pack greedily into batches of at most `budget` tokens
    (for padded batches: rows x the longest row, which is the first one).

    A sequence longer than the budget gets a batch of its own. Longest first makes the biggest
    batches come early, so a memory surprise shows at the start of a window, not at its end.
    """
    order = np.argsort(-lengths, kind="stable")
    batches, current, used = [], [], 0
    for i in order:
        n = int(lengths[i])
        cost = (len(current) + 1) * int(lengths[current[0]]) if padded and current else used + n
        if current and cost > budget:
            batches.append(np.asarray(current, dtype=np.int64))
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        batches.append(np.asarray(current, dtype=np.int64))
    return batches


def gather_packed(ids: np.ndarray, offsets: np.ndarray, idx: np.ndarray, types: np.ndarray | None = None):
    """Concatenate the sequences `idx` of a flat id array; return ids, cu_seqlens, positions and
    token types (None when there are none)."""
    starts = offsets[idx]
    lens = offsets[idx + 1] - starts
    cu = np.zeros(len(idx) + 1, dtype=np.int64)
    np.cumsum(lens, out=cu[1:])
    within = np.arange(cu[-1], dtype=np.int64) - np.repeat(cu[:-1], lens)
    src = np.repeat(starts, lens) + within
    return ids[src], cu, within, (types[src] if types is not None else None)


@dataclass
class ScoreStats:
    batches: int = 0
    oom_retries: int = 0
    tokens: int = 0  # tokens of the pairs scored (before prefix sharing)
    tokens_computed: int = 0  # tokens that went through the model (after prefix sharing)
    attention_area: int = 0  # sum over attention blocks of 2*Lq*Lk - Lq^2 (for FLOP counts)


def decoder_of(model):
    """The decoder stack under a causal LM or sequence-classification wrapper."""
    get = getattr(model, "get_decoder", None)
    dec = get() if callable(get) else None
    return dec if dec is not None and dec is not model else getattr(model, model.base_model_prefix)


class Scorer:
    """A model, its tokenizer-side encoder and the batched forward; see `load`."""

    def __init__(self, model, tokenizer, encoder, device, dtype, cfg: RunConfig, kernel: str, kind: ModelKind):
        self.model = model
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.device = device
        self.dtype = dtype
        self.cfg = cfg
        self.kernel = kernel
        self.kind = kind
        self.padded = kind.family == "seq-cls-encoder"
        self.fused = self.fused_encoder = None
        # Cross-encoders attend both ways: a candidate's prefix depends on its document.
        self.sharing = "off" if self.padded else cfg.prefix_sharing
        if self.padded and kernel != "padded-sdpa":
            use_compile = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
            self.fused_encoder = fused_encoder.FusedEncoder(model, kernel, compile=use_compile)
            self.padded = False
            self.engine = "fused-encoder"
        elif self.padded:
            if cfg.engine == "fused":
                raise ModelError(f"--engine fused does not support {model.config.model_type} cross-encoders; "
                                 "use --engine auto")
            self.engine = "transformers-padded"
        else:
            self.decoder = decoder_of(model)
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
            if cfg.engine != "transformers" and fused_qwen3.supports(model):
                use_compile = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
                self.fused = fused_qwen3.FusedQwen3(model, self.decoder, kernel, compile=use_compile)
            elif cfg.engine == "fused":
                raise ModelError(f"--engine fused supports plain Qwen3 decoders only; this model is "
                                 f"{model.config.model_type}: use --engine auto")
            self.engine = "fused" if self.fused is not None else "transformers"
        log.info("model %s (%s) on %s in %s, attention %s, engine %s", cfg.model, kind.family, device,
                 str(dtype).removeprefix("torch."), kernel, self.engine)
        self.stats = ScoreStats()
        startup.mark("model_setup")
        self.budget = self._size_budget()
        startup.mark("memory_probe")

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def load(cls, cfg: RunConfig, kind: ModelKind | None = None) -> "Scorer":
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our progress is the pairs, not the weight shards

        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        kind = kind or inspect_model(cfg)
        path = cfg.model
        kw = dict(trust_remote_code=cfg.trust_remote_code)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, **kw)
        except Exception as exc:
            raise ModelError(f"model {path}: cannot load its tokenizer ({first_line(exc)}); "
                             "the directory needs tokenizer files") from None
        startup.mark("tokenizer")
        auto = AutoModelForSequenceClassification if kind.family.startswith("seq-cls") else AutoModelForCausalLM
        extra = {} if kind.family == "seq-cls-encoder" else {"attn_implementation": attention.register()}
        if device.type == "cuda" and importlib.util.find_spec("accelerate") is not None:
            # Straight from the safetensors files onto the GPU: no full copy in host memory first.
            extra["device_map"] = str(device)
        try:
            model, info = auto.from_pretrained(path, dtype=dtype, use_safetensors=True, output_loading_info=True,
                                               **extra, **kw)
        except Exception as exc:
            raise ModelError(
                f"model {path}: cannot load safetensors weights ({first_line(exc)}); weights load only "
                "from *.safetensors files"
            ) from None
        startup.mark("weights")
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            # transformers would fill them with random values: scores would mean nothing.
            raise ModelError(
                f"model {path}: the checkpoint lacks {len(missing)} weights the {kind.family} head needs "
                f"(e.g. {missing[0]}); check --family, or pass a reranker checkpoint"
            )
        return cls.from_model(model, tokenizer, cfg, device, kind)

    @classmethod
    def from_model(cls, model, tokenizer, cfg: RunConfig, device=None, kind: ModelKind | None = None) -> "Scorer":
        """A scorer over an already built model (the benchmark builds random ones in memory)."""
        device = device or resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        kind = kind or inspect_model(cfg, model.config)
        if device.type == "cpu":
            from .threads import configure_cpu

            configure_cpu()
        if kind.family == "seq-cls-encoder":
            encoder = CrossEncoderEncoder(tokenizer, cfg.max_length)
            packed = cfg.engine != "transformers" and fused_encoder.supports(model)
            kernel = attention.choose_kernel(cfg.attention, device, dtype) if packed else "padded-sdpa"
        else:
            encoder = PairEncoder(tokenizer, kind.template, cfg.max_length)
            model.set_attn_implementation(attention.register())
            kernel = attention.choose_kernel(cfg.attention, device, dtype)
            model.config._rerank_kernel = kernel
        model.to(device=device, dtype=dtype).eval()
        model.requires_grad_(False)
        return cls(model, tokenizer, encoder, device, dtype, cfg, kernel, kind)

    # -- memory --------------------------------------------------------------------------------
    def _size_budget(self) -> int:
        cfg = self.cfg
        if self.device.type != "cuda":
            return cfg.max_batch_tokens or CPU_BATCH_TOKENS
        dev = self.device
        torch.cuda.synchronize(dev)
        free, total = torch.cuda.mem_get_info(dev)
        base = torch.cuda.memory_allocated(dev)
        if cfg.gpu_memory_limit:
            if cfg.gpu_memory_limit <= base:
                raise ScoringError(
                    f"--gpu-memory-limit {cfg.gpu_memory_limit / 2**30:.2f} GiB is less than the model "
                    f"needs ({base / 2**30:.2f} GiB); raise the limit"
                )
            # The caching allocator refuses to reserve past this fraction: the cap is enforced,
            # and going past it is an OOM that the batch splitter handles.
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.gpu_memory_limit / total), index)
            ceiling = min(cfg.gpu_memory_limit, base + free)
        else:
            ceiling = base + free
        # Measure what a token costs in activations with a probe batch of real shape.
        seq = 512
        if self.kind.family == "seq-cls-encoder":  # learned positions end at max_position_embeddings
            seq = min(512, getattr(self.model.config, "max_position_embeddings", 512) - 2)
        n = PROBE_TOKENS // seq
        ids = np.random.default_rng(0).integers(0, self.tokenizer.vocab_size, n * seq).astype(np.int32)
        offsets = np.arange(0, n * seq + 1, seq, dtype=np.int64)
        torch.cuda.reset_peak_memory_stats(dev)
        self._forward(*gather_packed(ids, offsets, np.arange(n)))
        torch.cuda.synchronize(dev)
        per_token = max(1.0, (torch.cuda.max_memory_allocated(dev) - base) / (n * seq))
        # Keep 10% and 256 MiB back for fragmentation and the allocator's rounding.
        room = (ceiling - base) * 0.9 - 256 * 2**20
        budget = int(room / per_token)
        if cfg.max_batch_tokens:
            budget = min(budget, cfg.max_batch_tokens)
        budget = max(512, min(budget, MAX_BATCH_TOKENS))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        log.info("batch budget %d tokens (%.1f KiB/token, %.2f GiB usable)", budget, per_token / 1024,
                 room / 2**30)
        return budget

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
        """[no, yes] or two labels: softmax's second; one logit: sigmoid; --activation none:
        the raw logit (for two, the log-odds second minus first)."""
        raw = logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]
        if self.cfg.activation == "none":
            return raw
        if logits.shape[1] == 1:
            return torch.sigmoid(raw)
        return torch.softmax(logits, dim=-1)[:, 1]

    def score(self, enc, on_batch=None, should_stop=None) -> np.ndarray:
        """Scores (float32) of every pair in `enc`, in `enc`'s order."""
        return self.score_stream([enc], on_batch=on_batch, should_stop=should_stop)

    def score_stream(self, chunks, on_batch=None, should_stop=None) -> np.ndarray:
        """Scores of pairs that arrive in chunks (tokenized while the GPU works), in order.

        Full batches go to the GPU as soon as a chunk lands; the short remainder waits for the
        next chunk, so only the last batch of the stream can be partly empty.
        """
        ids = np.empty(0, dtype=np.int32)
        types = None  # token types, for cross-encoders
        keys = None  # group keys, for prefix sharing
        share = self.sharing != "off"
        offsets = np.zeros(1, dtype=np.int64)
        pool = np.empty(0, dtype=np.int64)  # pairs not yet sent
        pending: list[tuple[np.ndarray, torch.Tensor]] = []
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
            for b in batches[:-1]:
                self._submit(pool[b], ids, offsets, types, pending, on_batch, should_stop,
                             None if plen is None else (plen[b], keys[pool[b]]))
            pool = pool[batches[-1]]
        if len(pool):
            batches, plen = self._plan(pool, ids, offsets, keys)
            for b in batches:
                self._submit(pool[b], ids, offsets, types, pending, on_batch, should_stop,
                             None if plen is None else (plen[b], keys[pool[b]]))
        out = np.empty(len(offsets) - 1, dtype=np.float32)
        if pending:
            # One device-to-host copy per window: no host sync between batches.
            all_idx = np.concatenate([i for i, _ in pending])
            out[all_idx] = torch.cat([s for _, s in pending]).float().cpu().numpy()
        return out

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

    def _submit(self, idx, ids, offsets, types, pending, on_batch, should_stop, share=None) -> None:
        """Run one packed batch; on OOM, split it and run the halves (no pair is ever dropped).
        `share`: (prefix length, group key) per pair of idx, for a batch with shared prefixes."""
        stack = [(idx, share)]
        while stack:
            if should_stop is not None and should_stop():
                raise KeyboardInterrupt
            idx, share = stack.pop()
            if share is None:
                packed = gather_packed(ids, offsets, idx, types)
                tokens = computed = int(packed[1][-1])
                area = int((np.diff(packed[1]) ** 2).sum())
            else:
                sb = prefix.gather_shared(ids, offsets, idx, *share)
                tokens, computed, area = sb.unshared_tokens, len(sb.ids), sb.area
            try:
                s = self._forward(*packed) if share is None else self._forward(sb.ids, sb.cu_q, sb.pos, None, sb)
            except torch.OutOfMemoryError:
                s = None  # leave the except block first, so the failed batch's tensors are freed
            if s is None:
                self._after_oom(idx, computed, stack, share)
                continue
            pending.append((idx, s))
            self.stats.batches += 1
            self.stats.tokens += tokens
            self.stats.tokens_computed += computed
            self.stats.attention_area += area
            if on_batch is not None:
                on_batch(len(idx), tokens)
            if self.cfg.empty_cache_every and self.device.type == "cuda" \
                    and self.stats.batches % self.cfg.empty_cache_every == 0:
                torch.cuda.empty_cache()

    def _after_oom(self, idx: np.ndarray, tokens: int, stack: list, share=None) -> None:
        self.stats.oom_retries += 1
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(idx) == 1:
            raise ScoringError(
                f"one pair of {tokens} tokens does not fit in GPU memory; lower --max-length or "
                "raise --gpu-memory-limit"
            )
        # Later windows pack smaller batches, so the OOM is not met again and again.
        self.budget = max(512, min(self.budget, int(tokens * 0.75)))
        log.warning("out of memory on a batch of %d tokens; split it in two, budget now %d", tokens, self.budget)
        half = len(idx) // 2
        # A group cut in two keeps its prefix length: the common prefix of a part is no shorter.
        hi, lo = (None, None) if share is None else ((share[0][half:], share[1][half:]),
                                                     (share[0][:half], share[1][:half]))
        stack.append((idx[half:], hi))
        stack.append((idx[:half], lo))
