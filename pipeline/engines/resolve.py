"""What planning asks of the engines, in one call and before any checkpoint: the model resolved
(a hub id to its local snapshot), its kind (family, template), the device and dtype, and the
options that must fit them (--max-length, --attention, --compile, --prefix-sharing). Nothing is
loaded: the engine itself loads later (score.load_engine), from the same config."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from pipeline.config import RunConfig
from pipeline.engines.attention import choose_kernel
from pipeline.engines.compiled import cache_dir
from pipeline.engines.families import ModelKind, inspect_model, load_config
from pipeline.engines.hub import with_local_model
from pipeline.engines.fp8 import check_engine as check_fp8_engine
from pipeline.engines.loading import dtype_label, resolve_device, resolve_dtype
from pipeline.engines.prefix import resolve_mode
from pipeline.errors import InputError, ModelError

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


@dataclass(frozen=True)
class ResolvedModel:
    """The engine side of a plan: what a run's model and device turned out to be."""

    model: str  # the model as the run loads it: a hub id becomes its local snapshot
    kind: ModelKind
    device: torch.device
    torch_dtype: torch.dtype
    fp8: bool = False  # --dtype fp8: the projections run as fp8 GEMMs, the rest in `torch_dtype`

    @property
    def dtype(self) -> str:
        """The dtype's name as the fingerprint and the summary give it ("float32"; "fp8" apart
        from "bfloat16")."""
        return dtype_label("fp8" if self.fp8 else "auto", self.torch_dtype)


def check_model_files(model: str) -> None:
    if os.path.isdir(model) and not any(os.path.exists(os.path.join(model, n)) for n in TOKENIZER_FILES):
        raise ModelError(f"model {model}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); copy them "
                         "from the model's original directory")


def check_max_length(cfg: RunConfig, mconfig) -> None:
    n = getattr(mconfig, "max_position_embeddings", None)
    if isinstance(n, int) and cfg.max_length > n:
        raise InputError(f"--max-length {cfg.max_length} exceeds the {n} positions of model {cfg.model}; pass "
                         f"--max-length {n} or less")


def check_device_options(cfg: RunConfig, device, dtype) -> None:
    """A kernel asked for by name must run on this device (only auto falls back); --compile on
    where compiling is slow gets one line saying so."""
    if cfg.attention != "auto":
        choose_kernel(cfg.attention, device, dtype)
    if cfg.compile == "on" and cfg.engine == "transformers":  # only the fused path compiles
        raise InputError("--compile on compiles the fused engine, and --engine transformers runs transformers' own "
                         "modules uncompiled; drop --compile on, or pass --engine auto")
    if cfg.compile == "on" and device.type == "cpu":
        log.info("--compile on: on CPU, torch.compile takes a minute or more at the first run; later runs take the "
                 "kernels from its cache (%s)", cache_dir() or "Inductor's default")


def resolve(cfg: RunConfig, kind: ModelKind | None = None) -> ResolvedModel:
    """The model, its kind, device and dtype of `cfg`, each option checked against them. With
    `kind` (an engine already loaded for `cfg`) the model is taken as it is."""
    if kind is None:  # a hub id becomes its cached snapshot here, after the input checks
        cfg = with_local_model(cfg)
        mconfig = load_config(cfg)
        kind = inspect_model(cfg, mconfig)
        check_model_files(cfg.model)
        check_max_length(cfg, mconfig)
    device = resolve_device(cfg.device)
    torch_dtype = resolve_dtype(cfg.dtype, device)
    if cfg.executor == "local" and not cfg.devices:  # workers check their own device when they load
        check_device_options(cfg, device, torch_dtype)
    resolve_mode(cfg.prefix_sharing, device.type, kind.family == "seq-cls-encoder")  # `on` for a cross-encoder
    if cfg.dtype == "fp8":
        check_fp8_engine(cfg.engine, kind.family)
    return ResolvedModel(cfg.model, kind, device, torch_dtype, cfg.dtype == "fp8")
