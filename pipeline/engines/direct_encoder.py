"""BERT, XLM-R and RoBERTa cross-encoders loaded without transformers: config.json read as JSON,
weights straight from the safetensors files onto the device, the tokenizer from its files
(cross_tokenizer.py). Importing transformers and its BERT modules and building the model took
seconds of every run's startup; the packed forward (fused_encoder.py) needs none of it.

Only what is fully understood loads this way: a local directory, no remote code or quantization,
one *ForSequenceClassification architecture of its model type, absolute positions, not a decoder,
an activation mapped exactly as transformers maps it, every size given in config.json, and
exactly the checkpoint keys (with the base model's prefix, as save_pretrained writes them) and
shapes transformers would load. Anything else returns None with the reason, and transformers
loads the model (and raises for a checkpoint without its classifier, as before).
"""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.nn.functional as F

from pipeline.engines.direct import is_oom, open_weights, thread_device, weight_files, weights_error
from pipeline.engines.fused_encoder import BertWeights, LayerWeights
from pipeline.engines.model_files import JsonConfig, read_config
from pipeline.runtime import startup

log = logging.getLogger(__name__)

# model_type: (its one architecture, the base model's key prefix)
_ARCHS = {"bert": ("BertForSequenceClassification", "bert"),
          "xlm-roberta": ("XLMRobertaForSequenceClassification", "roberta"),
          "roberta": ("RobertaForSequenceClassification", "roberta")}
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "hidden_act", "pad_token_id")


def _gelu_new(x):
    # transformers' NewGELUActivation, as written there (not F.gelu's tanh form: rounding differs).
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")  # transformers' GELUTanh


# transformers' ACT2FN entries, function for function (GELUActivation is F.gelu, exact erf).
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": _gelu_new, "gelu_pytorch_tanh": _gelu_tanh}


def why_not(cfg, kind, c: JsonConfig | None) -> str | None:
    """Why `cfg.model` (its config.json read as `c`) does not load directly; None where it does."""
    if c is None:
        return "config.json is not a plain BERT / XLM-R config"
    if cfg.trust_remote_code or cfg.engine == "transformers":
        return "remote code or --engine transformers"
    arch = _ARCHS.get(c.model_type, (None,))[0]
    if kind.family != "seq-cls-encoder" or tuple(kind.architectures) != (arch,):
        return f"not a single {arch or c.model_type} sequence-classification checkpoint"
    if getattr(c, "quantization_config", None) is not None:
        return "quantized weights"
    missing = [k for k in _REQUIRED if getattr(c, k, None) is None]
    if missing:
        return f"config.json lacks {', '.join(missing)}"
    if c.hidden_act not in ACTIVATIONS:
        return f"hidden_act {c.hidden_act!r} is not one of {', '.join(ACTIVATIONS)}"
    if getattr(c, "position_embedding_type", "absolute") not in (None, "absolute"):
        return "position embeddings are not absolute"
    if getattr(c, "is_decoder", False) or getattr(c, "add_cross_attention", False):
        return "a decoder"
    if c.hidden_size % c.num_attention_heads:
        return "hidden_size is not a multiple of num_attention_heads"
    if c.num_labels not in (1, 2):
        return f"{c.num_labels} labels"
    if getattr(c, "transformers_weights", None) is not None:
        return "config.json names its weights file (transformers_weights)"
    return None


def expected_shapes(c: JsonConfig) -> dict[str, tuple[int, ...]]:
    """The tensors transformers' *ForSequenceClassification loads, by checkpoint key."""
    p = _ARCHS[c.model_type][1] + "."
    hid, inter = c.hidden_size, c.intermediate_size
    out = {p + "embeddings.word_embeddings.weight": (c.vocab_size, hid),
           p + "embeddings.position_embeddings.weight": (c.max_position_embeddings, hid),
           p + "embeddings.token_type_embeddings.weight": (c.type_vocab_size, hid),
           p + "embeddings.LayerNorm.weight": (hid,), p + "embeddings.LayerNorm.bias": (hid,)}
    for i in range(c.num_hidden_layers):
        q = f"{p}encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            out.update({q + name + ".weight": (hid, hid), q + name + ".bias": (hid,)})
        out.update({q + "attention.output.LayerNorm.weight": (hid,), q + "attention.output.LayerNorm.bias": (hid,),
                    q + "intermediate.dense.weight": (inter, hid), q + "intermediate.dense.bias": (inter,),
                    q + "output.dense.weight": (hid, inter), q + "output.dense.bias": (hid,),
                    q + "output.LayerNorm.weight": (hid,), q + "output.LayerNorm.bias": (hid,)})
    if c.model_type == "bert":  # pooler (dense, tanh), then a linear classifier
        out.update({p + "pooler.dense.weight": (hid, hid), p + "pooler.dense.bias": (hid,),
                    "classifier.weight": (c.num_labels, hid), "classifier.bias": (c.num_labels,)})
    else:  # RobertaClassificationHead: dense, tanh, out_proj; no pooler
        out.update({"classifier.dense.weight": (hid, hid), "classifier.dense.bias": (hid,),
                    "classifier.out_proj.weight": (c.num_labels, hid), "classifier.out_proj.bias": (c.num_labels,)})
    return out


def _ignored(c: JsonConfig) -> set[str]:
    # Older checkpoints saved the embeddings' position_ids / token_type_ids buffers; transformers
    # registers them non-persistent and never reads them, nor does the packed forward.
    p = _ARCHS[c.model_type][1] + ".embeddings."
    return {p + "position_ids", p + "token_type_ids"}


class DirectEncoder:
    """A cross-encoder's tensors on the device (no nn.Module): `config` (its config.json) and
    `weights` (fused_encoder.BertWeights), what forwards.choose builds the packed forward over."""

    def __init__(self, config: JsonConfig, weights: BertWeights):
        self.config = config
        self.weights = weights


def build_weights(c: JsonConfig, t: dict) -> BertWeights:
    """BertWeights over a checkpoint's tensors by their transformers names."""
    p = _ARCHS[c.model_type][1] + "."
    eps = float(c.layer_norm_eps)
    act = ACTIVATIONS[c.hidden_act]
    layers = []
    for i in range(c.num_hidden_layers):
        q = f"{p}encoder.layer.{i}."
        s = q + "attention.self."
        layers.append(LayerWeights(
            qkv_w=torch.cat([t[s + n + ".weight"] for n in ("query", "key", "value")], 0),
            qkv_b=torch.cat([t[s + n + ".bias"] for n in ("query", "key", "value")], 0),
            attn_out_w=t[q + "attention.output.dense.weight"], attn_out_b=t[q + "attention.output.dense.bias"],
            attn_ln_w=t[q + "attention.output.LayerNorm.weight"], attn_ln_b=t[q + "attention.output.LayerNorm.bias"],
            attn_ln_eps=eps, inter_w=t[q + "intermediate.dense.weight"], inter_b=t[q + "intermediate.dense.bias"],
            act=act, out_w=t[q + "output.dense.weight"], out_b=t[q + "output.dense.bias"],
            out_ln_w=t[q + "output.LayerNorm.weight"], out_ln_b=t[q + "output.LayerNorm.bias"], out_ln_eps=eps))
    e = p + "embeddings."
    if c.model_type == "bert":
        head = (t[p + "pooler.dense.weight"], t[p + "pooler.dense.bias"], t["classifier.weight"], t["classifier.bias"])
    else:
        head = (t["classifier.dense.weight"], t["classifier.dense.bias"], t["classifier.out_proj.weight"],
                t["classifier.out_proj.bias"])
    return BertWeights(
        kind=c.model_type,
        # XLM-R and RoBERTa count positions from padding_idx + 1 (padding_idx: pad_token_id); BERT from 0.
        pos_offset=0 if c.model_type == "bert" else int(c.pad_token_id) + 1,
        word=t[e + "word_embeddings.weight"], position=t[e + "position_embeddings.weight"],
        token_type=t[e + "token_type_embeddings.weight"], emb_ln_w=t[e + "LayerNorm.weight"],
        emb_ln_b=t[e + "LayerNorm.bias"], emb_ln_eps=eps, layers=layers, head=head)


def load_encoder(cfg, kind, tokenizer, device: torch.device, dtype: torch.dtype) -> DirectEncoder | None:
    """The DirectEncoder of `cfg.model` on `device` in `dtype`, or None (logged why) for
    transformers to load. `tokenizer`: the one cross_tokenizer.py read (None: it declined, and
    transformers loads the whole model)."""
    path = cfg.model
    c = read_config(path) if os.path.isdir(path) else None
    why = why_not(cfg, kind, c)
    files = None
    if not why and tokenizer is None:
        why = "the tokenizer loads through transformers"
    if not why:
        files, why = weight_files(path)
    if why:
        log.debug("model %s: loading through transformers (%s)", path, why)
        return None
    want = expected_shapes(c)
    where = open_weights(path, files)
    extra = set(where) - set(want) - _ignored(c)
    if set(want) - set(where) or extra:
        # Missing ones (a checkpoint without its classifier): transformers raises the error that
        # names them; extra or renamed ones (legacy names, other prefixes): transformers knows them.
        log.debug("model %s: loading through transformers (checkpoint keys differ: missing %s, extra %s)", path,
                  sorted(set(want) - set(where))[:3], sorted(extra)[:3])
        return None
    for k, shape in want.items():
        try:
            got = tuple(where[k].get_slice(k).get_shape())
        except Exception as exc:
            raise weights_error(path, exc) from None
        if got != shape:
            log.debug("model %s: loading through transformers (%s has shape %s, not %s)", path, k, got, shape)
            return None
    device = thread_device(device)
    tensors = {}
    try:
        for k in want:
            # Fresh memory on the device in the run's dtype (as transformers' dtype= casts); a copy
            # always: on the CPU, get_tensor's buffer sits at the file's 8-byte alignment.
            tensors[k] = where[k].get_tensor(k).to(device=device, dtype=dtype, copy=True)
    except Exception as exc:
        if is_oom(exc):
            raise
        raise weights_error(path, exc) from None
    weights = build_weights(c, tensors)
    del tensors  # q/k/v live on fused; the separate copies go
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    startup.mark("weights")
    return DirectEncoder(c, weights)
