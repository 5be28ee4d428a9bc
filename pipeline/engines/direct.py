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

log = logging.getLogger(__name__)

# Sizes the fused forward needs; config.json must give each (class defaults are not guessed).
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size")
# Model types whose config fields our inspection reads (families.py, plan.py) as plain JSON keys.
JSON_TYPES = {"qwen3", "qwen2", "llama", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "bert",
              "xlm-roberta", "roberta", "modernbert"}
_ARCHS = {"Qwen3ForCausalLM": "yes-no", "Qwen3ForSequenceClassification": "seq-cls-causal"}
FAMILIES = set(_ARCHS.values())


class JsonConfig(SimpleNamespace):
    """config.json as attributes; `num_labels` as transformers derives it (id2label's length)."""

    @property
    def num_labels(self) -> int:
        d = self.__dict__
        if isinstance(d.get("id2label"), dict):
            return len(d["id2label"])
        return int(d.get("num_labels_", 2))


def read_config(path: str) -> JsonConfig | None:
    """config.json of a local model directory as a JsonConfig, when its model type is one whose
    fields we read as they stand; None (use AutoConfig) otherwise."""
    f = os.path.join(path, "config.json")
    if not os.path.isfile(f):
        return None
    try:
        with open(f, encoding="utf-8") as fh:
            d = json.load(fh)
    except (OSError, ValueError):
        return None  # AutoConfig reports it
    if not isinstance(d, dict) or d.get("model_type") not in JSON_TYPES or d.get("auto_map"):
        return None
    if "num_labels" in d:
        d["num_labels_"] = d.pop("num_labels")
    return JsonConfig(**d)


def rope_theta(c: JsonConfig):
    rp = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None)
    if isinstance(rp, dict):
        if rp.get("rope_type", rp.get("type", "default")) != "default":
            return None
        return rp.get("rope_theta", getattr(c, "rope_theta", None))
    return getattr(c, "rope_theta", None) if rp is None else None


def _why_not(cfg, kind, c: JsonConfig | None) -> str | None:
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
        return "RoPE is not the default kind"
    if (getattr(c, "use_sliding_window", False) or getattr(c, "attention_bias", False)
            or set(getattr(c, "layer_types", None) or ["full_attention"]) != {"full_attention"}):
        return "sliding window, attention bias or mixed layer types"
    return None


def _weight_files(path: str) -> list[str] | None:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, n) for n in files]
    single = os.path.join(path, "model.safetensors")
    return [single] if os.path.isfile(single) else None


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
    """A Qwen3 reranker's tensors on the device (no nn.Module): what the fused forward and the
    Scorer's head read. `direct` tells the Scorer it needs no transformers model set-up."""

    direct = True

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


def load_qwen3(cfg, kind, device: torch.device, dtype: torch.dtype):
    """(DirectQwen3, FastTokenizer) of `cfg.model`, or None (logged why) for transformers to load."""
    from pipeline.engines import compiled, fast_tokenizer, fused_qwen3
    from pipeline.job import startup

    path = cfg.model
    c = read_config(path) if os.path.isdir(path) else None
    why = _why_not(cfg, kind, c)
    files = None if why else _weight_files(path)
    if not why and not files:
        why = "no model.safetensors (or its index)"
    tok = None
    if not why:
        tok, why = fast_tokenizer.load(path)
    if why:
        log.debug("model %s: loading through transformers (%s)", path, why)
        return None
    startup.mark("tokenizer")
    from safetensors import safe_open

    tied = bool(getattr(c, "tie_word_embeddings", False)) and kind.family == "yes-no"
    want = expected_shapes(c, kind.family, tied)
    handles = [safe_open(f, framework="pt", device="cpu") for f in files]
    where = {k: h for h in handles for k in h.keys()}
    extra = set(where) - set(want) - ({"lm_head.weight"} if tied else set())
    if set(want) - set(where) or extra:
        log.debug("model %s: loading through transformers (checkpoint keys differ: missing %s, extra %s)", path,
                  sorted(set(want) - set(where))[:3], sorted(extra)[:3])
        return None
    tensors = {}
    for k, shape in want.items():
        sl = where[k].get_slice(k)
        if tuple(sl.get_shape()) != shape:
            log.debug("model %s: loading through transformers (%s has shape %s, not %s)", path, k,
                      sl.get_shape(), shape)
            return None
    failed: list = []

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
    if compiled.wanted(cfg, device):
        try:
            fused_qwen3.warm_up(c, device, dtype)
        except Exception as exc:  # the model's first call meets it again, and falls back to eager
            log.debug("compile warm-up failed: %s", exc)
        startup.mark("compile")
    while loader.is_alive():  # a timed join: signals still reach this thread at once
        loader.join(0.1)
    if failed:
        raise failed[0]
    startup.mark("weights")
    return DirectQwen3(c, tensors, kind.family), tok
