"""config.json read as plain JSON, for the model types whose fields the pipeline reads as they
stand: no transformers import (seconds at startup) to learn a model's family, sizes or RoPE."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

# Model types whose config fields our inspection reads (families.py, plan.py) as plain JSON keys.
JSON_TYPES = {"qwen3", "qwen2", "llama", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "bert",
              "xlm-roberta", "roberta", "modernbert"}


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
