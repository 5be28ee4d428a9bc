"""Which kind of reranker a model is, read from its config before any weight is loaded.

- yes-no: a causal LM judged by the logits of answer tokens at the last position (Qwen3-Reranker,
  bge-reranker-v2-gemma); its prompt comes from a template.
- seq-cls-causal: a causal LM with a classification head on the last token (Qwen3 seq-cls
  conversions); the same templates and packed batches, the head's logit is the score.
- seq-cls-encoder: a bidirectional cross-encoder (BERT, XLM-R, ModernBERT): pairs encoded by its
  tokenizer (query, document); packed batches for BERT, XLM-R and ModernBERT (fused_encoder.py),
  padded ones for the rest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pipeline.config import RunConfig
from pipeline.engines.hub import looks_like_path
from pipeline.engines.model_config import read_config
from pipeline.engines.template import DEFAULT_TEMPLATE, Template, get_template
from pipeline.errors import ModelError, first_line

# Model types whose sequence-classification head sits on a causal decoder (last-token pooling).
CAUSAL_TYPES = {"qwen3", "qwen2", "llama", "mistral", "gemma", "gemma2", "gemma3_text", "phi3"}


@dataclass(frozen=True)
class ModelKind:
    family: str
    model_type: str
    architectures: tuple[str, ...]
    template: Template | None  # for the causal families
    num_labels: int = 0


def load_config(cfg: RunConfig):
    """The model's config: config.json as plain JSON for the model types whose fields we read
    (no transformers import: seconds at startup), else transformers' AutoConfig."""
    path = cfg.model
    if not os.path.isdir(path):
        if looks_like_path(path):
            raise ModelError(f"model {path}: no such directory; check the path (a hub id is org/name)")
    if os.path.isdir(path) and not cfg.trust_remote_code:
        got = read_config(path)
        if got is not None:
            return got
    # Here, not at the top: most models are read above, without importing transformers (seconds).
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:  # transformers raises OSError/ValueError with long texts
        raise ModelError(
            f"model {path}: cannot read its config ({first_line(exc)}); pass a local directory "
            "that holds config.json, tokenizer files and safetensors weights"
        ) from None


def inspect_model(cfg: RunConfig, mconfig=None) -> ModelKind:
    mconfig = mconfig or load_config(cfg)
    archs = tuple(getattr(mconfig, "architectures", None) or ())
    mtype = getattr(mconfig, "model_type", "")
    family = cfg.family
    if family == "auto":
        if any(a.endswith("ForCausalLM") for a in archs):
            family = "yes-no"
        elif any(a.endswith("ForSequenceClassification") for a in archs):
            family = "seq-cls"
        else:
            raise ModelError(
                f"model {cfg.model}: architecture {', '.join(archs) or mtype} is neither a causal LM nor a "
                "sequence classifier, so it cannot be a reranker; pass a reranker model"
            )
    if family == "seq-cls":
        family = "seq-cls-causal" if mtype in CAUSAL_TYPES else "seq-cls-encoder"
        num_labels = int(getattr(mconfig, "num_labels", 1))
        if num_labels not in (1, 2):
            raise ModelError(f"model {cfg.model}: its head has {num_labels} labels; a reranker head has 1 "
                             "(a relevance logit) or 2 (not relevant, relevant)")
    else:
        num_labels = 0
    template = None
    if family != "seq-cls-encoder":
        name = cfg.template or DEFAULT_TEMPLATE.get(mtype)
        if name is None:
            raise ModelError(f"model {cfg.model}: no built-in template for model type {mtype!r}; pass --template "
                             "NAME or a JSON template file")
        template = get_template(name)
    return ModelKind(family, mtype, archs, template, num_labels)
