"""What planning asks of the engines, in one call and before any checkpoint: the model resolved
(a hub id to its local snapshot), its kind (family, template), the device and dtype, and the
options that must fit them (--max-length, --attention, --compile, --prefix-sharing). Nothing is
loaded: the engine itself loads later (score.load_engine), from the same config, and makes the
same choices through the functions here (each option is resolved in one place).

The kinds of reranker, read from the model's config before any weight is loaded:
- yes-no: a causal LM judged by the logits of answer tokens at the last position (Qwen3-Reranker,
  bge-reranker-v2-gemma); its prompt comes from a template.
- seq-cls-causal: a causal LM with a classification head on the last token (Qwen3 seq-cls
  conversions); the same templates and packed batches, the head's logit is the score.
- seq-cls-encoder: a bidirectional cross-encoder (BERT, XLM-R, ModernBERT): pairs encoded by its
  tokenizer (query, document); packed batches for BERT, XLM-R and ModernBERT (fused_encoder.py),
  padded ones for the rest.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch

from pipeline.config import FP8_DTYPES, RunConfig
from pipeline.engines import attention, fp8
from pipeline.engines.compiled import cache_dir
from pipeline.engines.model_files import check_model_files, load_config, with_local_model
from pipeline.engines.template import DEFAULT_TEMPLATE, TEMPLATES, Template
from pipeline.errors import InputError, ModelError

log = logging.getLogger(__name__)

# Model types whose sequence-classification head sits on a causal decoder (last-token pooling).
CAUSAL_TYPES = {"qwen3", "qwen2", "llama", "mistral", "gemma", "gemma2", "gemma3_text", "phi3"}
# Where --prefix-sharing auto may share. On CPU the shared batch runs one SDPA call per block with
# an explicit mask, against one masked call for a whole plain batch: measured slower on the 2-core
# machine, so `auto` shares on CUDA only (`on` forces it anywhere; the CPU tests do).
SHARING_AUTO_DEVICES = ("cuda",)


@dataclass(frozen=True)
class ModelKind:
    """What kind of reranker a model is (the module's docstring lists the families)."""

    family: str
    model_type: str
    architectures: tuple[str, ...]
    template: Template | None  # for the causal families
    num_labels: int = 0


@dataclass(frozen=True)
class ResolvedModel:
    """The engine side of a plan: what a run's model and device turned out to be."""

    model: str  # the model as the run loads it: a hub id becomes its local snapshot
    kind: ModelKind
    device: torch.device
    torch_dtype: torch.dtype
    # --dtype fp8 or fp8-fast (its name; "" otherwise): the projections run as fp8 GEMMs, the
    # rest in `torch_dtype`
    fp8: str = ""

    @property
    def dtype(self) -> str:
        """The dtype's name as the fingerprint and the summary give it ("float32"; "fp8" and
        "fp8-fast" apart from "bfloat16" and from each other)."""
        return dtype_label(self.fp8 or "auto", self.torch_dtype)


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
    sharing_mode(cfg.prefix_sharing, device.type, kind.family == "seq-cls-encoder")  # `on` for a cross-encoder
    if cfg.dtype in FP8_DTYPES:
        fp8.check_engine(cfg.engine, kind.family, cfg.dtype)
    return ResolvedModel(cfg.model, kind, device, torch_dtype, cfg.dtype if cfg.dtype in FP8_DTYPES else "")


# -- the kind: family and template -----------------------------------------------------------------

def inspect_model(cfg: RunConfig, mconfig=None) -> ModelKind:
    """The kind of `cfg.model` (--family auto: from its architectures) from its config (`mconfig`,
    or read here), with its template where the family takes one."""
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


def get_template(name: str) -> Template:
    """A built-in template by name, or a JSON file with prefix, body, suffix, positive and
    (optionally) negative."""
    if name in TEMPLATES:
        return TEMPLATES[name]
    if name.endswith(".json") or os.path.isfile(name):
        return load_template_file(name)
    raise InputError(
        f"unknown template {name!r}; use one of: {', '.join(sorted(TEMPLATES))}, or a JSON template file"
    )


def load_template_file(path: str) -> Template:
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except OSError as exc:
        raise InputError(f"{path}: cannot read the template ({exc.strerror}); check the path") from None
    except ValueError as exc:
        raise InputError(f"{path}: the template is not valid JSON ({exc}); fix the file") from None
    if not isinstance(spec, dict):
        raise InputError(f"{path}: the template must be a JSON object with prefix, body, suffix, positive")
    missing = [k for k in ("prefix", "body", "suffix", "positive") if not isinstance(spec.get(k), str)]
    if missing:
        raise InputError(f"{path}: the template needs string fields prefix, body, suffix, positive "
                         f"(missing {', '.join(missing)}); add them")
    if "{query}" not in spec["body"] or "{document}" not in spec["body"]:
        raise InputError(f"{path}: the template body must contain {{query}} and {{document}}; add them")
    try:
        spec["body"].format(instruction="", query="", document="")
    except (KeyError, IndexError, ValueError) as exc:
        raise InputError(f"{path}: the template body has a placeholder other than {{instruction}}, {{query}}, "
                         f"{{document}} ({exc}); double literal braces as {{{{ }}}}") from None
    negative = spec.get("negative")
    if negative is not None and not isinstance(negative, str):
        raise InputError(f"{path}: the template's negative must be a string or null")
    if negative == spec["positive"]:  # softmax over two equal logits: every score would be 0.5
        raise InputError(f"{path}: the template's positive and negative are both {negative!r}; make them differ")
    return Template(name=spec.get("name") or os.path.basename(path), prefix=spec["prefix"], body=spec["body"],
                    suffix=spec["suffix"], positive=spec["positive"], negative=negative)


# -- the device, dtype, attention kernel and prefix sharing ----------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype the model's weights and activations are held in; for "fp8" and "fp8-fast",
    bfloat16 (all but the projections, which the fused forward quantizes: fp8.py), refused where
    fp8 cannot run."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name in FP8_DTYPES:
        fp8.check_device(device, name)
        return torch.bfloat16
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def dtype_label(name: str, dtype: torch.dtype) -> str:
    """How a run's scores are labelled by dtype (checkpoint fingerprint, score cache scope,
    summary): "fp8" or "fp8-fast", else the resolved torch dtype's name ("bfloat16", "float32")."""
    return name if name in FP8_DTYPES else str(dtype).removeprefix("torch.")


def choose_kernel(requested: str, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    """Resolve --attention auto to the fastest exact kernel available on this device. A kernel
    asked for by name that cannot run here is an InputError naming the fix (what was explicitly
    requested is never swapped for something else; only auto falls back)."""
    if requested in ("flash_attn", "torch_varlen"):
        if device.type != "cuda":
            raise InputError(f"--attention {requested} needs CUDA and this run is on {device.type}; use "
                             "--attention sdpa (or auto) on CPU")
        if dtype == torch.float32:  # the FlashAttention kernels take fp16/bf16 only
            raise InputError(f"--attention {requested} has no float32 kernel; use --dtype bfloat16 or float16, "
                             "or --attention sdpa")
        if requested == "flash_attn" and attention.flash_attn_varlen() is None:
            raise InputError("--attention flash_attn: the flash-attn package does not import here; install it "
                             "(pip install flash-attn --no-build-isolation) or use --attention auto")
        if requested == "torch_varlen" and attention.torch_varlen() is None:
            raise InputError(f"--attention torch_varlen: torch {torch.__version__} has no "
                             "torch.nn.attention.varlen; use --attention auto")
        return requested
    if device.type != "cuda" or dtype == torch.float32 or requested == "sdpa":
        return "sdpa"
    if attention.flash_attn_varlen() is not None:
        return "flash_attn"
    if attention.torch_varlen() is not None:
        return "torch_varlen"
    return "sdpa"


def sharing_mode(mode: str, device_type: str, cross_encoder: bool) -> str:
    """The prefix-sharing mode an engine runs ("off", "on" or "auto"): cross-encoders attend both
    ways (a candidate's prefix depends on its document), so never (`on` asked of one is an
    InputError: what is asked for by name is never dropped quietly); `auto` only on
    SHARING_AUTO_DEVICES."""
    if cross_encoder and mode == "on":
        raise InputError("--prefix-sharing on: a cross-encoder reads query and document together, so there is no "
                         "shared prefix to compute once; use --prefix-sharing auto or off")
    if cross_encoder or (mode == "auto" and device_type not in SHARING_AUTO_DEVICES):
        return "off"
    return mode


# -- the options that must fit the model and device ------------------------------------------------

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
