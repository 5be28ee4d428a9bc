"""The model's files, found and read before any weight loads.

- Its folder: a model given as a hub id (org/name) becomes a local directory of the Hugging Face
  cache. Online, the snapshot is downloaded into the cache (or found there up to date); offline
  (HF_HUB_OFFLINE=1) or with the hub unreachable, the cached snapshot is used; when neither works
  the user gets one line with the fix. Everything after this step loads from a directory, so
  transformers never reaches for the network itself.
- Its config: config.json read as plain JSON for the model types whose fields the pipeline reads
  as they stand (no transformers import: seconds at startup), else transformers' AutoConfig.
- Its tokenizer files: present, or one line saying where to copy them from.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from types import SimpleNamespace

from pipeline.config import RunConfig
from pipeline.errors import ModelError, first_line

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# What scoring needs: config, tokenizer files, safetensors weights (never .bin, ONNX or GGUF copies).
PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.py", "tokenizer*"]
_TRUE = {"1", "on", "yes", "true"}

# Model types whose config fields we read (resolve.py, direct.py) as plain JSON keys.
JSON_TYPES = {"qwen3", "qwen2", "llama", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "bert",
              "xlm-roberta", "roberta", "modernbert"}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


# -- the folder: a hub id to its cached snapshot ---------------------------------------------------

def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, not when huggingface_hub was imported."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_cache_dir() -> str:
    """The hub cache as huggingface_hub computes it: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def looks_like_path(model: str) -> bool:
    """A local path rather than a hub id: it exists, is not shaped org/name, starts with `.`, `/` or
    `~`, or its first component is a local directory or file (`sample_data/tiny-qwen3-rerankr`, a
    typo under an existing folder, must say "no such directory", not reach for the hub)."""
    if os.path.exists(model) or not HUB_ID.match(model) or model.startswith((".", "/", "~")):
        return True
    return os.path.exists(model.split("/", 1)[0])


def resolve_model(model: str) -> str:
    """A local directory for `model`: itself when it is one, else the cached snapshot of a hub id."""
    model = os.fspath(model)
    if os.path.isdir(model):
        return model
    if os.path.isfile(model):  # a weights or config file given for its folder
        raise ModelError(f"model {model}: a file, not a directory; --model takes the model's directory (the folder "
                         "with config.json, the tokenizer and the weights) or a hub id (org/name)")
    if looks_like_path(model):
        raise ModelError(f"model {model}: no such directory; check the path (a hub id is org/name)")
    # Here, not at the top: only a hub id needs the hub client (its import costs start-up time).
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    off = hub_offline()
    cache = hub_cache_dir()
    fix = f"download it with `hf download {model}` where the hub is reachable, or pass a model directory"
    try:
        path = snapshot_download(model, cache_dir=cache, local_files_only=off, allow_patterns=PATTERNS,
                                 endpoint=os.environ.get("HF_ENDPOINT") or None)
    except GatedRepoError:
        raise ModelError(f"model {model}: the model is gated on the hub; accept its terms there and log in "
                         f"with `hf auth login`, or pass a model directory") from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise ModelError(f"model {model}: no such model on the hub (or it is private); check the id, log in with "
                         "`hf auth login`, or pass a model directory") from None
    except Exception as exc:  # not cached, and offline or unreachable (the hub client's many error types)
        why = "HF_HUB_OFFLINE is set" if off else f"the hub cannot be reached ({first_line(exc, 120)})"
        err = ModelError(f"model {model}: not in the Hugging Face cache {cache} and {why}; {fix}")
        if not off:  # a hub that does not answer is a runtime failure, as a bucket's: a scheduler retries it
            err.exit_code = 1
        raise err from None
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(f"model {model}: its cached snapshot {path} has no config.json; {fix}")
    log.debug("model %s: snapshot %s", model, path)
    return path


def with_local_model(cfg: RunConfig) -> RunConfig:
    """`cfg` with its model as a local directory (the same config when it already is one)."""
    path = resolve_model(cfg.model)
    return cfg if path == cfg.model else dataclasses.replace(cfg, model=path)


# -- the config ------------------------------------------------------------------------------------

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


# -- the tokenizer files ---------------------------------------------------------------------------

def check_model_files(model: str) -> None:
    if os.path.isdir(model) and not any(os.path.exists(os.path.join(model, n)) for n in TOKENIZER_FILES):
        raise ModelError(f"model {model}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); copy them "
                         "from the model's original directory")
