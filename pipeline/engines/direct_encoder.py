"""BERT, XLM-R, RoBERTa and ModernBERT cross-encoders loaded without transformers: config.json read
as JSON, weights straight from the safetensors files onto the device, the tokenizer from its files
(cross_tokenizer.py). Importing transformers and its model modules and building the model took
seconds of every run's startup; the packed forward (fused_encoder.py) needs none of it.

Only what is fully understood loads this way: a local directory, no remote code or quantization,
one *ForSequenceClassification architecture of its model type, activations mapped exactly as
transformers maps them, every size given in config.json, and exactly the checkpoint keys (with
the base model's prefix, as save_pretrained writes them) and shapes transformers would load.
BERT-style models: absolute positions, not a decoder. ModernBERT: the settings ModernBertConfig
reads, each given or left at that class's default, and no others that would change its math (a
RoPE other than the default kind, a sliding_window key, a head_dim of its own). Anything else
returns None with the reason, and transformers loads the model (and raises for a checkpoint
without its classifier, as before).
"""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.nn.functional as F

from pipeline.engines.direct import is_oom, open_weights, thread_device, weight_files, weights_error
from pipeline.engines.fused_encoder import (MODERN_LAYER_TYPES, BertWeights, LayerWeights, ModernBertWeights,
                                            ModernLayerWeights)
from pipeline.engines.model_files import JsonConfig, read_config
from pipeline.runtime import startup

log = logging.getLogger(__name__)

# model_type: (its one architecture, the base model's key prefix)
_ARCHS = {"bert": ("BertForSequenceClassification", "bert"),
          "xlm-roberta": ("XLMRobertaForSequenceClassification", "roberta"),
          "roberta": ("RobertaForSequenceClassification", "roberta"),
          "modernbert": ("ModernBertForSequenceClassification", "model")}
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "hidden_act", "pad_token_id")
# ModernBERT's sizes; max_position_embeddings sizes nothing (RoPE) but the memory probe reads it.
_MODERN_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "max_position_embeddings")
# ModernBertConfig's defaults (transformers 5) for the keys a ModernBERT config.json may leave out.
_MODERN_DEFAULTS = {"hidden_activation": "gelu", "classifier_activation": "gelu", "norm_eps": 1e-5,
                    "norm_bias": False, "attention_bias": False, "mlp_bias": False, "classifier_bias": False,
                    "classifier_pooling": "cls", "local_attention": 128, "global_attn_every_n_layers": 3,
                    "pad_token_id": 50283}
# Layer type: the legacy config.json key of its rotary base, and ModernBertConfig's default base.
_MODERN_THETAS = {"full_attention": ("global_rope_theta", 160_000.0),
                  "sliding_attention": ("local_rope_theta", 10_000.0)}


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
        return "config.json is not a plain BERT / XLM-R / ModernBERT config"
    if cfg.trust_remote_code or cfg.engine == "transformers":
        return "remote code or --engine transformers"
    arch = _ARCHS.get(c.model_type, (None,))[0]
    if kind.family != "seq-cls-encoder" or tuple(kind.architectures) != (arch,):
        return f"not a single {arch or c.model_type} sequence-classification checkpoint"
    if getattr(c, "quantization_config", None) is not None:
        return "quantized weights"
    why = _why_not_modernbert(c) if c.model_type == "modernbert" else _why_not_bert(c)
    if why:
        return why
    if c.num_labels not in (1, 2):
        return f"{c.num_labels} labels"
    if getattr(c, "transformers_weights", None) is not None:
        return "config.json names its weights file (transformers_weights)"
    return None


def _why_not_bert(c: JsonConfig) -> str | None:
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
    return None


def _setting(c: JsonConfig, key: str):
    """A ModernBERT setting: config.json's value, else ModernBertConfig's default (a key given as
    null stays None, which the checks refuse)."""
    return getattr(c, key, _MODERN_DEFAULTS[key])


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _why_not_modernbert(c: JsonConfig) -> str | None:
    missing = [k for k in _MODERN_REQUIRED if getattr(c, k, None) is None]
    if missing:
        return f"config.json lacks {', '.join(missing)}"
    bad = [k for k in _MODERN_REQUIRED if not _positive_int(getattr(c, k))]
    if bad:
        return f"{', '.join(bad)} not positive integers"
    if c.hidden_size % c.num_attention_heads:
        return "hidden_size is not a multiple of num_attention_heads"
    for key in ("hidden_activation", "classifier_activation"):
        if _setting(c, key) not in ACTIVATIONS:
            return f"{key} {_setting(c, key)!r} is not one of {', '.join(ACTIVATIONS)}"
    for key in ("norm_bias", "attention_bias", "mlp_bias", "classifier_bias"):
        if not isinstance(_setting(c, key), bool):
            return f"{key} {_setting(c, key)!r} is not true or false"
    eps = _setting(c, "norm_eps")
    if not (isinstance(eps, float) and eps > 0):  # ModernBertConfig refuses an int too
        return f"norm_eps {eps!r} is not a positive float"
    if _setting(c, "classifier_pooling") not in ("cls", "mean"):
        return f"classifier_pooling {_setting(c, 'classifier_pooling')!r} is not cls or mean"
    pad = _setting(c, "pad_token_id")
    if pad is not None and not (isinstance(pad, int) and -c.vocab_size <= pad < c.vocab_size):
        return f"pad_token_id {pad!r} lies outside the vocabulary"  # transformers' embedding refuses it
    # The local window: local_attention (keys within local_attention // 2 on either side). A
    # sliding_window key would set local_attention through ModernBertConfig's property instead.
    if getattr(c, "sliding_window", None) is not None or not _positive_int(_setting(c, "local_attention")):
        return "sliding window settings other than a positive local_attention"
    if modernbert_layer_types(c) is None:
        return "layer_types / global_attn_every_n_layers not understood"
    if getattr(c, "head_dim", None) not in (None, c.hidden_size // c.num_attention_heads):
        return "head_dim is not hidden_size / num_attention_heads"  # the rotary tables would use it
    if modernbert_rope_thetas(c) is None:
        return "RoPE is not the default kind with plain bases (rope_parameters, global/local_rope_theta)"
    return None


def modernbert_layer_types(c: JsonConfig) -> list[str] | None:
    """Each layer's attention, as ModernBertConfig derives it: layer_types as given, else every
    global_attn_every_n_layers-th layer from the first full, the others sliding. None: neither is
    understood (transformers then remaps or refuses them)."""
    types = getattr(c, "layer_types", None)
    if types is not None:
        ok = (isinstance(types, list) and len(types) == c.num_hidden_layers
              and all(isinstance(t, str) and t in MODERN_LAYER_TYPES for t in types))
        return list(types) if ok else None
    every = _setting(c, "global_attn_every_n_layers")
    if not _positive_int(every):
        return None
    return ["sliding_attention" if i % every else "full_attention" for i in range(c.num_hidden_layers)]


def modernbert_rope_thetas(c: JsonConfig) -> dict | None:
    """{layer type: rotary base}, as ModernBertConfig derives them: rope_parameters[type]
    ["rope_theta"], else global_rope_theta / local_rope_theta, else 160000 / 10000. None where
    the RoPE is not the default kind or a key would change it (rope_scaling, rope_theta and
    partial_rotary_factor are merged or left unread by transformers: not ours to guess)."""
    if any(getattr(c, k, None) is not None for k in ("rope_scaling", "rope_theta", "partial_rotary_factor")):
        return None
    params = getattr(c, "rope_parameters", None)
    params = {} if params is None else params
    if not isinstance(params, dict) or set(params) - set(_MODERN_THETAS):
        return None
    out = {}
    for lt, (legacy, default) in _MODERN_THETAS.items():
        p = params.get(lt, {})  # a null entry: ModernBertConfig refuses it
        if not isinstance(p, dict) or set(p) - {"rope_type", "rope_theta"} or p.get("rope_type", "default") != "default":
            return None
        theta = p["rope_theta"] if "rope_theta" in p else getattr(c, legacy, default)
        if not _positive_number(theta):
            return None
        out[lt] = theta
    return out


def expected_shapes(c: JsonConfig) -> dict[str, tuple[int, ...]]:
    """The tensors transformers' *ForSequenceClassification loads, by checkpoint key."""
    if c.model_type == "modernbert":
        return _modernbert_shapes(c)
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


def _modernbert_shapes(c: JsonConfig) -> dict[str, tuple[int, ...]]:
    """ModernBertForSequenceClassification's tensors: biases only where the config asks for them
    (norm_bias, attention_bias, mlp_bias, classifier_bias; the classifier always has one), and
    no LayerNorm before layer 0's attention."""
    hid, inter, labels = c.hidden_size, c.intermediate_size, c.num_labels

    def linear(name, rows, cols, bias):
        return {name + ".weight": (rows, cols), **({name + ".bias": (rows,)} if bias else {})}

    def norm(name):
        return {name + ".weight": (hid,), **({name + ".bias": (hid,)} if _setting(c, "norm_bias") else {})}

    attn_b, mlp_b = _setting(c, "attention_bias"), _setting(c, "mlp_bias")
    out = {"model.embeddings.tok_embeddings.weight": (c.vocab_size, hid), **norm("model.embeddings.norm")}
    for i in range(c.num_hidden_layers):
        q = f"model.layers.{i}."
        if i:
            out.update(norm(q + "attn_norm"))
        out.update({**linear(q + "attn.Wqkv", 3 * hid, hid, attn_b), **linear(q + "attn.Wo", hid, hid, attn_b),
                    **norm(q + "mlp_norm"), **linear(q + "mlp.Wi", 2 * inter, hid, mlp_b),
                    **linear(q + "mlp.Wo", hid, inter, mlp_b)})
    out.update({**norm("model.final_norm"), **linear("head.dense", hid, hid, _setting(c, "classifier_bias")),
                **norm("head.norm"), **linear("classifier", labels, hid, True)})
    return out


def _ignored(c: JsonConfig) -> set[str]:
    # Older checkpoints saved the embeddings' position_ids / token_type_ids buffers; transformers
    # registers them non-persistent and never reads them, nor does the packed forward. (ModernBERT's
    # rotary buffers were never persistent.)
    if c.model_type == "modernbert":
        return set()
    p = _ARCHS[c.model_type][1] + ".embeddings."
    return {p + "position_ids", p + "token_type_ids"}


class DirectEncoder:
    """A cross-encoder's tensors on the device (no nn.Module): `config` (its config.json) and
    `weights` (fused_encoder.BertWeights or ModernBertWeights), what forwards.choose builds the
    packed forward over."""

    def __init__(self, config: JsonConfig, weights: BertWeights | ModernBertWeights):
        self.config = config
        self.weights = weights


def build_weights(c: JsonConfig, t: dict) -> BertWeights | ModernBertWeights:
    """BertWeights (ModernBertWeights) over a checkpoint's tensors by their transformers names."""
    if c.model_type == "modernbert":
        return build_modernbert_weights(c, t)
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


def inv_freq(theta, dim: int) -> torch.Tensor:
    """RoPE's inverse frequencies in float32, as ModernBertRotaryEmbedding computes its default
    kind (on the CPU; transformers' from_pretrained keeps them float32 in any dtype)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def build_modernbert_weights(c: JsonConfig, t: dict) -> ModernBertWeights:
    """ModernBertWeights over a checkpoint's tensors by their transformers names (config checked
    by why_not: its settings as ModernBertConfig reads them)."""
    def bias(name):
        return t.get(name + ".bias")  # None where the config has no bias (expected_shapes lists none)

    types = modernbert_layer_types(c)
    layers = []
    for i, lt in enumerate(types):
        q = f"model.layers.{i}."
        layers.append(ModernLayerWeights(
            attn_norm_w=t[q + "attn_norm.weight"] if i else None, attn_norm_b=bias(q + "attn_norm") if i else None,
            qkv_w=t[q + "attn.Wqkv.weight"], qkv_b=bias(q + "attn.Wqkv"), attn_out_w=t[q + "attn.Wo.weight"],
            attn_out_b=bias(q + "attn.Wo"), mlp_norm_w=t[q + "mlp_norm.weight"], mlp_norm_b=bias(q + "mlp_norm"),
            wi_w=t[q + "mlp.Wi.weight"], wi_b=bias(q + "mlp.Wi"), wo_w=t[q + "mlp.Wo.weight"],
            wo_b=bias(q + "mlp.Wo"), layer_type=lt))
    word = t["model.embeddings.tok_embeddings.weight"]
    thetas = modernbert_rope_thetas(c)
    dim = c.hidden_size // c.num_attention_heads
    rope = {lt: (inv_freq(thetas[lt], dim).to(word.device), 1.0) for lt in set(types)}  # default kind: scaling 1
    return ModernBertWeights(
        word=word, emb_norm_w=t["model.embeddings.norm.weight"], emb_norm_b=bias("model.embeddings.norm"),
        eps=float(_setting(c, "norm_eps")), act=ACTIVATIONS[_setting(c, "hidden_activation")], layers=layers,
        final_norm_w=t["model.final_norm.weight"], final_norm_b=bias("model.final_norm"), rope=rope,
        window=_setting(c, "local_attention") // 2, pooling=_setting(c, "classifier_pooling"),
        head_w=t["head.dense.weight"], head_b=bias("head.dense"),
        head_act=ACTIVATIONS[_setting(c, "classifier_activation")], head_norm_w=t["head.norm.weight"],
        head_norm_b=bias("head.norm"), cls_w=t["classifier.weight"], cls_b=t["classifier.bias"])


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
    del tensors  # BERT's q/k/v live on fused; the separate copies go
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    startup.mark("weights")
    return DirectEncoder(c, weights)
