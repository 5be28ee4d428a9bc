"""The forwards: one batch of pairs in, their head logits out, on one device; and `choose`, the
one place that decides which forward runs a loaded model.

    fused                Qwen3 decoders (yes-no, seq-cls)   packed   fused_qwen3.FusedQwen3
    transformers         other causal decoders, or          packed   the transformers decoder's
                         --engine transformers                       modules, our attention
    fused-encoder        BERT, XLM-R, ModernBERT            packed   fused_encoder.FusedEncoder (weights as
                                                                     tensors, direct-loaded or not)
    transformers-padded  other cross-encoders               padded   the transformers model

Every forward has `name`, `kernel`, `padded`, `compiled` and `logits(batch)`: the head's float32
logits, (pairs, 1 or 2) in batch order, of a packing.PackedBatch or (decoders, with shared
prefixes) a prefix.SharedBatch. Causal families project only the last position of each pair,
onto the LM-head rows of the judged tokens or onto the classification head: the full-vocabulary
logits of the reference recipe are never formed. The engine (score.py) turns logits into scores.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np
import torch

from pipeline.engines import fused_qwen3
from pipeline.engines.direct import DirectQwen3
from pipeline.engines.fused_encoder import FusedEncoder
from pipeline.engines.fused_qwen3 import FusedQwen3
from pipeline.engines.loading import Loaded
from pipeline.engines.prefix import SharedBatch
from pipeline.errors import ModelError, first_line
from pipeline.runtime import startup

log = logging.getLogger(__name__)


class Forward(Protocol):
    name: str  # "fused", "transformers", "fused-encoder", "transformers-padded"
    kernel: str  # the attention kernel (resolve.choose_kernel), or "padded-sdpa"
    padded: bool  # batches are rows padded to their longest (packing.plan_batches counts rows x longest)
    compiled: bool  # fused steps run compiled (torch.compile), not eagerly

    def logits(self, batch) -> torch.Tensor:
        """float32 head logits (pairs, 1 or 2) of a PackedBatch or SharedBatch, on the device."""


def to_device(a: np.ndarray, dtype, device: torch.device) -> torch.Tensor:
    """A host array as a tensor of `dtype` on `device` (through pinned memory, not waiting, on CUDA)."""
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=dtype))
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


class TransformersDecoder:
    """A transformers decoder stack run over packed rows: its own modules, our packed attention
    (attention.py, registered with transformers), which gets the kernel with each call."""

    compiled = False

    def __init__(self, decoder, layer_types: list[str], kernel: str):
        self.decoder = decoder
        self.layer_types = layer_types
        self.kernel = kernel

    def last_hidden(self, input_ids, position_ids, cu, max_len: int, last_idx, shared=None) -> torch.Tensor:
        """As FusedQwen3.last_hidden: final-normed hidden states at rows `last_idx`, (n, hidden)."""
        kv = {} if shared is None else {"rerank_kv_idx": shared[0]}
        cu_k, max_k = (cu, max_len) if shared is None else shared[1:]
        out = self.decoder(
            input_ids=input_ids[None],
            position_ids=position_ids[None],
            # A dict of masks tells transformers not to build any: packing needs none.
            attention_mask={t: None for t in self.layer_types},
            use_cache=False,
            cu_seq_lens_q=cu, cu_seq_lens_k=cu_k, max_length_q=max_len, max_length_k=max_k,
            rerank_kernel=self.kernel, **kv,
        )
        return out.last_hidden_state[0, last_idx]


class PackedDecoder:
    """A causal reranker over packed batches: the stack's (FusedQwen3 or TransformersDecoder)
    final hidden state at each pair's last token, through the head in float32."""

    padded = False

    def __init__(self, name: str, stack, head_w: torch.Tensor, head_b: torch.Tensor | None, device: torch.device):
        self.name = name
        self.stack = stack
        self.kernel = stack.kernel
        self.head_w, self.head_b = head_w, head_b
        self.device = device

    @property
    def compiled(self) -> bool:
        return self.stack.compiled

    @torch.inference_mode()
    def logits(self, batch) -> torch.Tensor:
        dev = self.device
        if isinstance(batch, SharedBatch):
            # The candidates' rows attend to their group's prefix rows too (prefix.py).
            cu_k = to_device(batch.cu_k, np.int32, dev)
            shared = (to_device(batch.kv_idx, np.int64, dev), cu_k, int(np.max(np.diff(batch.cu_k))))
            cu, max_len = to_device(batch.cu_q, np.int32, dev), int(np.max(np.diff(batch.cu_q)))
            last_idx = to_device(batch.last, np.int64, dev)
        else:
            cu, max_len, shared = to_device(batch.cu, np.int32, dev), int(np.max(np.diff(batch.cu))), None
            last_idx = cu[1:].long() - 1
        last = self.stack.last_hidden(to_device(batch.ids, np.int64, dev), to_device(batch.pos, np.int64, dev), cu,
                                      max_len, last_idx, shared)
        logits = last.to(torch.float32) @ self.head_w.T
        return logits + self.head_b if self.head_b is not None else logits


class PackedEncoder:
    """A BERT, XLM-R or ModernBERT cross-encoder over packed batches (fused_encoder.py): the
    classifier reads each pair's first row."""

    name = "fused-encoder"
    padded = False

    def __init__(self, encoder: FusedEncoder, device: torch.device):
        self.encoder = encoder
        self.kernel = encoder.kernel
        self.device = device

    @property
    def compiled(self) -> bool:
        return self.encoder.compiled

    @torch.inference_mode()
    def logits(self, batch) -> torch.Tensor:
        dev = self.device
        cu = to_device(batch.cu, np.int32, dev)
        types = to_device(batch.types, np.int64, dev) if batch.types is not None else None
        out = self.encoder.logits(to_device(batch.ids, np.int64, dev), types, to_device(batch.pos, np.int64, dev), cu,
                                  int(np.max(np.diff(batch.cu))), cu[:-1].long())
        return out.to(torch.float32)


class PaddedEncoder:
    """Any other cross-encoder, through its transformers model: cross-encoders attend both ways,
    so no packing; right-padded rows of the batch's longest length (batches are length-sorted,
    so little is wasted)."""

    name = "transformers-padded"
    kernel = "padded-sdpa"
    padded = True
    compiled = False

    def __init__(self, model, pad_token_id: int, device: torch.device):
        self.model = model
        self.pad_token_id = pad_token_id
        self.device = device

    @torch.inference_mode()
    def logits(self, batch) -> torch.Tensor:
        flat, cu, types, dev = batch.ids, batch.cu, batch.types, self.device
        lens = np.diff(cu)
        n, width = len(lens), int(lens.max())
        ids = np.full((n, width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        rows = np.repeat(np.arange(n), lens)
        cols = np.arange(len(flat)) - np.repeat(cu[:-1], lens)
        ids[rows, cols] = flat
        mask[rows, cols] = 1
        kw = {"input_ids": to_device(ids, np.int64, dev), "attention_mask": to_device(mask, np.int64, dev)}
        if types is not None:
            tt = np.zeros((n, width), dtype=np.int64)
            tt[rows, cols] = types
            kw["token_type_ids"] = to_device(tt, np.int64, dev)
        return self.model(**kw).logits.to(torch.float32)


def choose(m: Loaded, cfg) -> Forward:
    """The forward for a loaded model (loading.Loaded), by its family, --engine (cfg.engine) and
    what the model is; a forward that runs compiled is warmed up here (unless the direct load
    already did), and runs eagerly where that fails."""
    if m.kind.family == "seq-cls-encoder":
        if m.kernel == "padded-sdpa":  # loading.prepare found no packed forward for it
            if cfg.engine == "fused":
                raise ModelError(f"--engine fused does not support {m.model.config.model_type} cross-encoders; "
                                 "use --engine auto")
            return PaddedEncoder(m.model, m.tokenizer.pad_token_id, m.device)
        enc = FusedEncoder(m.model, m.kernel, compile=m.compile)
        if m.compile and not warm_up(enc.warm_up):
            enc.use_eager()
        return PackedEncoder(enc, m.device)
    head_w, head_b = decoder_head(m.model, m.kind.family, m.encoder)
    if isinstance(m.model, DirectQwen3):  # its compiled steps were warmed up while its weights loaded
        stack = FusedQwen3.from_tensors(m.model.config, m.model.tensors, m.kernel, m.compile, m.fp8,
                                        fast_accum=cfg.dtype == "fp8-fast")
    elif cfg.engine != "transformers" and fused_qwen3.supports(m.model):
        base = decoder_of(m.model)
        if base.layers[0].self_attn.q_proj.weight.numel() == 0:
            # FusedQwen3.from_hf keeps fused copies of q/k/v and gate/up and frees the originals.
            raise ModelError("this model's weights already serve an engine's fused forward; build further engines "
                             "over it with engine_from_model(..., forward=engine.forward)")
        stack = FusedQwen3.from_hf(m.model, base, m.kernel, compile=m.compile, fp8=m.fp8,
                                   fast_accum=cfg.dtype == "fp8-fast")
        if m.compile:
            startup.mark("model_setup")
            if not warm_up(lambda: fused_qwen3.warm_up(m.model.config, m.device, m.dtype, parameters=True,
                                                             fp8=m.fp8)):
                stack.use_eager()
    elif cfg.engine == "fused":
        raise ModelError(f"--engine fused supports plain Qwen3 decoders only; this model is "
                         f"{m.model.config.model_type}: use --engine auto")
    elif m.fp8:  # only the fused Qwen3 forward has fp8 layers
        raise ModelError(f"--dtype {cfg.dtype} supports plain Qwen3 rerankers only; this model is "
                         f"{m.model.config.model_type}: use --dtype bfloat16")
    else:
        layer_types = sorted(set(getattr(m.model.config, "layer_types", None) or ["full_attention"]))
        stack = TransformersDecoder(decoder_of(m.model), layer_types, m.kernel)
    return PackedDecoder("fused" if isinstance(stack, FusedQwen3) else "transformers", stack, head_w, head_b,
                         m.device)


def decoder_head(model, family: str, encoder) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias or None) of a causal reranker's head, float32: the LM-head rows of the judged
    tokens ([no, yes], or [yes]) for yes-no models, else the classification head. The judged
    logits are the whole output, so they are kept exact."""
    if family == "yes-no":
        w = model.get_output_embeddings().weight
        rows = [encoder.positive_id] if encoder.negative_id is None else [encoder.negative_id, encoder.positive_id]
        return w[rows].detach().to(torch.float32), None
    score = model.score
    bias = score.bias.detach().to(torch.float32) if getattr(score, "bias", None) is not None else None
    return score.weight.detach().to(torch.float32), bias


def decoder_of(model):
    """The decoder stack under a causal LM or sequence-classification wrapper."""
    get = getattr(model, "get_decoder", None)
    dec = get() if callable(get) else None
    return dec if dec is not None and dec is not model else getattr(model, model.base_model_prefix)


def warm_up(fn) -> bool:
    """Compile before the memory probe, so the startup timeline shows compilation apart.
    False (warned): compiling failed, the caller runs eagerly. torch.compile compiles on the
    first call, so without this a broken compiler would fail the first real batch."""
    try:
        fn()
        ok = True
    except Exception as exc:
        log.warning("torch.compile failed on dummy rows (%s); running eagerly", first_line(exc))
        ok = False
    startup.mark("compile")
    return ok
