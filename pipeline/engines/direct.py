"""Qwen3 rerankers loaded without transformers: config.json read as JSON, weights straight from the
safetensors files (memory-mapped) onto the device, the tokenizer from tokenizer.json
(fast_tokenizer.py). Importing transformers and building its model classes took 7-11 s of the
17-21 s before the first batch on the GPU machine; the fused Qwen3 forward needs none of it.

Only what is fully understood loads this way: a local directory, no remote code or quantization,
a plain Qwen3 decoder (the fused forward's conditions), every size given in config.json, exactly
the checkpoint keys transformers' Qwen3ForCausalLM / Qwen3ForSequenceClassification would load,
with their shapes. Anything else returns None with the reason, and transformers loads the model.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from types import SimpleNamespace

import torch
from safetensors import safe_open

from pipeline.config import FP8_DTYPES
from pipeline.engines import compiled, fast_tokenizer, fused_qwen3
from pipeline.engines.fused_qwen3 import rope_theta
from pipeline.engines.model_files import JsonConfig, read_config
from pipeline.errors import ModelError, first_line
from pipeline.runtime import startup

log = logging.getLogger(__name__)

# Sizes the fused forward needs; config.json must give each (class defaults are not guessed).
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size")
_ARCHS = {"Qwen3ForCausalLM": "yes-no", "Qwen3ForSequenceClassification": "seq-cls-causal"}
FAMILIES = set(_ARCHS.values())


def why_not(cfg, kind, c: JsonConfig | None) -> str | None:
    """Why `cfg.model` (its config.json read as `c`) does not load directly; None where it does."""
    if c is None:
        return "config.json is not a plain Qwen3 config"
    if cfg.trust_remote_code or cfg.engine == "transformers":
        return "remote code or --engine transformers"
    if c.model_type != "qwen3" or kind.family != _ARCHS.get(next(iter(kind.architectures), ""), None):
        return f"not a Qwen3 {kind.family} checkpoint"
    if len(kind.architectures) != 1:
        return "several architectures"
    if getattr(c, "quantization_config", None) is not None:
        return "quantized weights"
    missing = [k for k in _REQUIRED if getattr(c, k, None) is None]
    if missing:
        return f"config.json lacks {', '.join(missing)}"
    if kind.family == "yes-no" and getattr(c, "tie_word_embeddings", None) is None:
        return "config.json lacks tie_word_embeddings"
    if rope_theta(c) is None:
        return "RoPE is not the default kind (or rope_scaling and rope_parameters differ)"
    if getattr(c, "hidden_act", "silu") != "silu":  # Qwen3Config's default; the fused MLP is SwiGLU
        return f"hidden_act {getattr(c, 'hidden_act', None)!r} is not silu"
    if getattr(c, "transformers_weights", None) is not None:
        return "config.json names its weights file (transformers_weights)"
    if (getattr(c, "use_sliding_window", False) or getattr(c, "attention_bias", False)
            or set(getattr(c, "layer_types", None) or ["full_attention"]) != {"full_attention"}):
        return "sliding window, attention bias or mixed layer types"
    return None


def weight_files(path: str) -> tuple[list[str] | None, str]:
    """The safetensors files transformers would read: model.safetensors before the index (as
    transformers prefers it), every shard inside the directory. (None, why) otherwise."""
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single], ""
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.isfile(index):
        return None, "no model.safetensors (or its index)"
    try:
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        if not names or not all(isinstance(n, str) for n in names):
            raise ValueError("weight_map names no files")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return None, f"unreadable model.safetensors.index.json ({type(exc).__name__}: {exc})"
    root = os.path.realpath(path)
    files = [os.path.join(path, n) for n in names]
    for f in files:
        if os.path.commonpath([root, os.path.realpath(f)]) != root:
            return None, f"shard {f} lies outside the model directory"
        if not os.path.isfile(f):
            return None, f"shard {f} is missing"
    return files, ""


def thread_device(device: torch.device) -> torch.device:
    """`device` with its index: a new thread's current CUDA device is cuda:0, not the caller's,
    so an index-less "cuda" is resolved in the calling thread before the loader thread starts."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError))


def weights_error(path: str, exc: BaseException):
    """The transformers path's message (loading.py) for weights that cannot be read."""
    return ModelError(f"model {path}: cannot load safetensors weights ({first_line(exc)}); weights load only "
                      "from *.safetensors files")


def expected_shapes(c: JsonConfig, family: str, tied: bool) -> dict[str, tuple[int, ...]]:
    hid, h, hkv, d, inter = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size
    out = {"model.embed_tokens.weight": (c.vocab_size, hid), "model.norm.weight": (hid,)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (hid,), p + "post_attention_layernorm.weight": (hid,),
                    p + "self_attn.q_proj.weight": (h * d, hid), p + "self_attn.k_proj.weight": (hkv * d, hid),
                    p + "self_attn.v_proj.weight": (hkv * d, hid), p + "self_attn.o_proj.weight": (hid, h * d),
                    p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
                    p + "mlp.gate_proj.weight": (inter, hid), p + "mlp.up_proj.weight": (inter, hid),
                    p + "mlp.down_proj.weight": (hid, inter)})
    if family == "seq-cls-causal":
        out["score.weight"] = (c.num_labels, hid)
    elif not tied:
        out["lm_head.weight"] = (c.vocab_size, hid)
    return out


class DirectQwen3:
    """A Qwen3 reranker's tensors on the device (no nn.Module): what the fused forward and its
    head read (forwards.choose builds the fused forward over them)."""

    def __init__(self, config: JsonConfig, tensors: dict, family: str):
        self.config = config
        self.tensors = tensors
        self.family = family
        if family == "seq-cls-causal":
            self.score = SimpleNamespace(weight=tensors["score.weight"], bias=None)
        else:
            w = tensors["model.embed_tokens.weight"] if config.tie_word_embeddings else tensors["lm_head.weight"]
            self._out = SimpleNamespace(weight=w)

    def get_output_embeddings(self):
        return self._out


def open_weights(path: str, files: list) -> dict:
    """{checkpoint key: its safetensors file, opened memory-mapped}; a truncated or corrupt file
    is the one-line ModelError of weights_error."""
    try:
        handles = [safe_open(f, framework="pt", device="cpu") for f in files]
        return {k: h for h in handles for k in h.keys()}
    except Exception as exc:
        if is_oom(exc):
            raise
        raise weights_error(path, exc) from None


def load_qwen3(cfg, kind, device: torch.device, dtype: torch.dtype):
    """(DirectQwen3, FastTokenizer, compile) of `cfg.model`, or None (logged why) for transformers
    to load. `compile`: the fused steps run compiled (--compile wants it, and their warm-up, run
    while the weights loaded, worked)."""
    path = cfg.model
    c = read_config(path) if os.path.isdir(path) else None
    why = why_not(cfg, kind, c)
    files = None
    if not why:
        files, why = weight_files(path)
    tok = None
    if not why:
        tok, why = fast_tokenizer.load(path)
    if why:
        log.debug("model %s: loading through transformers (%s)", path, why)
        return None
    startup.mark("tokenizer")
    tied = bool(getattr(c, "tie_word_embeddings", False)) and kind.family == "yes-no"
    want = expected_shapes(c, kind.family, tied)
    where = open_weights(path, files)
    extra = set(where) - set(want) - ({"lm_head.weight"} if tied else set())
    if set(want) - set(where) or extra:
        log.debug("model %s: loading through transformers (checkpoint keys differ: missing %s, extra %s)", path,
                  sorted(set(want) - set(where))[:3], sorted(extra)[:3])
        return None
    tensors = {}
    for k, shape in want.items():
        try:
            sl = where[k].get_slice(k)
        except Exception as exc:
            raise weights_error(path, exc) from None
        if tuple(sl.get_shape()) != shape:
            log.debug("model %s: loading through transformers (%s has shape %s, not %s)", path, k,
                      sl.get_shape(), shape)
            return None
    failed: list = []
    device = thread_device(device)

    def load_all():
        try:
            for k in want:
                # Into fresh memory on the device, in the run's dtype (as transformers' dtype= casts:
                # exact upward). Always a copy: on the CPU, a tensor left in get_tensor's buffer
                # sits at the file's 8-byte alignment, not the allocator's 64.
                tensors[k] = where[k].get_tensor(k).to(device=device, dtype=dtype, copy=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except BaseException as exc:  # raised in the caller's thread below
            failed.append(exc)

    # The weights load (file reads, host-to-device copies) while this thread compiles the fused
    # steps on dummy rows: the two waits overlap instead of adding up.
    loader = threading.Thread(target=load_all, name="rerank-weights", daemon=True)
    loader.start()
    compile = compiled.wanted(cfg, device)
    if compile:
        try:
            fused_qwen3.warm_up(c, device, dtype, fp8=cfg.dtype in FP8_DTYPES)
        except Exception as exc:  # torch.compile compiles on first call: a broken compiler shows here
            compile = False
            log.warning("torch.compile failed on dummy rows (%s); running eagerly", first_line(exc))
        startup.mark("compile")
    while loader.is_alive():  # a timed join: signals still reach this thread at once
        loader.join(0.1)
    if failed:
        if is_oom(failed[0]):
            raise failed[0]
        raise weights_error(path, failed[0]) from None
    startup.mark("weights")
    return DirectQwen3(c, tensors, kind.family), tok, compile
