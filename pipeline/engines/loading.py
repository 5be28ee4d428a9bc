"""Loading a reranker on the device and in the dtype that resolve.py chooses: the tokenizer and
safetensors weights (refusing a checkpoint whose head would be random), then, for it or an
already built model (the benchmark and the Python API build some in memory), the tokenizer-side
encoder and the attention kernel: a `Loaded`, from which forwards.choose picks the forward."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass

import torch

from pipeline.config import FP8_DTYPES, RunConfig
from pipeline.engines import attention, compiled, cross_tokenizer, direct, direct_encoder, fp8, fused_encoder, threads
from pipeline.engines.resolve import ModelKind, choose_kernel, inspect_model, resolve_device, resolve_dtype
from pipeline.engines.tokenize import CrossEncoderEncoder, PairEncoder
from pipeline.errors import ModelError, first_line
from pipeline.runtime import startup

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaded:
    """A model ready to score: on its device in its dtype, with its tokenizer-side encoder."""

    model: object  # a transformers model, direct.DirectQwen3 or direct_encoder.DirectEncoder
    tokenizer: object
    encoder: object  # tokenize.PairEncoder or CrossEncoderEncoder
    device: torch.device
    dtype: torch.dtype
    kind: ModelKind
    kernel: str  # resolve.choose_kernel's, or "padded-sdpa" for cross-encoders run padded
    compile: bool  # the fused steps run compiled (--compile; False where a warm-up already failed)
    fp8: bool = False  # --dtype fp8 or fp8-fast: the fused forward's projections run as fp8 GEMMs; `dtype` is the rest's


def load(cfg: RunConfig, kind: ModelKind | None = None) -> Loaded:
    """`cfg.model` loaded, the weights in `cfg.dtype` on `cfg.device`. A plain Qwen3 reranker
    (direct.py) or BERT / XLM-R / ModernBERT cross-encoder (direct_encoder.py) loads without
    transformers unless --engine transformers or RERANK_DIRECT_LOAD=0."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    kind = kind or inspect_model(cfg)
    direct_ok = os.environ.get("RERANK_DIRECT_LOAD", "1") != "0"
    if kind.family in direct.FAMILIES and direct_ok:
        got = direct.load_qwen3(cfg, kind, device, dtype)
        if got is not None:
            model, tokenizer, compile_ok = got
            return prepare(model, tokenizer, cfg, device, kind, compile=compile_ok)
    # Before transformers is imported, so that the tokenizer stage of the startup timeline is the
    # tokenizer's own load (the import then counts with the weights, which need it).
    tokenizer = cross_encoder_tokenizer(cfg) if kind.family == "seq-cls-encoder" else None
    if tokenizer is not None:
        startup.mark("tokenizer")
    if kind.family == "seq-cls-encoder" and direct_ok:
        model = direct_encoder.load_encoder(cfg, kind, tokenizer, device, dtype)
        if model is not None:
            return prepare(model, tokenizer, cfg, device, kind)
    # Here, not at the top: a direct load (above) runs without importing transformers (seconds).
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our progress is the pairs, not the weight shards
    path = cfg.model
    kw = dict(trust_remote_code=cfg.trust_remote_code)
    if tokenizer is None:
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
    return prepare(model, tokenizer, cfg, device, kind)


def cross_encoder_tokenizer(cfg: RunConfig):
    """A cross-encoder's tokenizer read by cross_tokenizer.py (no transformers tokenizer load:
    seconds), or None (logged why) for AutoTokenizer."""
    if cfg.trust_remote_code or os.environ.get("RERANK_TOKENIZER_BACKEND", "rust") == "python":
        return None
    if not os.path.isdir(cfg.model):
        return None  # a hub id: transformers resolves the files
    tok, why = cross_tokenizer.load(cfg.model)
    if tok is None:
        log.info("model %s: tokenizer loaded through transformers (%s)", cfg.model, why)
    return tok


def prepare(model, tokenizer, cfg: RunConfig, device=None, kind: ModelKind | None = None, *,
            compile: bool | None = None) -> Loaded:
    """Put a built model on its device for scoring. `compile`: None for --compile's choice
    (compiled.wanted); the direct load passes what its warm-up found."""
    device = device or resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    kind = kind or inspect_model(cfg, model.config)
    if cfg.dtype in FP8_DTYPES:
        fp8.check_engine(cfg.engine, kind.family, cfg.dtype)
    if compile is None:
        width = getattr(model.config, "hidden_size", None) if kind.family == "seq-cls-encoder" else None
        compile = compiled.wanted(cfg, device, width)
    threads.configure(device)
    if kind.family == "seq-cls-encoder":
        encoder = CrossEncoderEncoder(tokenizer, cfg.max_length)
        packed = cfg.engine != "transformers" and fused_encoder.supports(model)
        kernel = choose_kernel(cfg.attention, device, dtype) if packed else "padded-sdpa"
    else:
        encoder = PairEncoder(tokenizer, kind.template, cfg.max_length)
        kernel = choose_kernel(cfg.attention, device, dtype)
    # A direct load is already on the device, in the dtype, with no transformers modules to set up.
    if not isinstance(model, (direct.DirectQwen3, direct_encoder.DirectEncoder)):
        if kind.family != "seq-cls-encoder":
            model.set_attn_implementation(attention.register())
        model.to(device=device, dtype=dtype).eval()
        model.requires_grad_(False)
    return Loaded(model, tokenizer, encoder, device, dtype, kind, kernel, compile, cfg.dtype in FP8_DTYPES)
