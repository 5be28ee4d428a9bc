"""The one frozen configuration of a run. The CLI fills it; the library reads only it.

Each field's default, and the values it takes (choices, a range, a place), are declared once here,
on the field (`one_of`, `whole`, `number`, `place`): RunConfig checks them when made, whoever makes
it, and the CLI builds its options from them (jobs/common.config_option).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field

from pipeline.errors import InputError

DEVICE = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$")  # what --device and device= take
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def one_of(*choices: str):
    """A field that takes one of `choices`; the first is the default."""
    return field(default=choices[0], metadata={"choices": choices})


def whole(default: int | None, *, at_least: int):
    """A whole number of at least `at_least` (None too, where that is the default)."""
    return field(default=default, metadata={"whole": True, "at_least": at_least})


def place():
    """A local path or an object-storage URI, or None (none). An empty string is None too: how a
    command line (`--cache ''`) or the environment turns such an option off."""
    return field(default=None, metadata={"place": True})


def number(default: float | None, *, at_least: float | None = None, above: float | None = None, unit: str = ""):
    """A number (int or float) of at least `at_least`, or above `above` (None too, where that is
    the default); `unit` names it in the message."""
    return field(default=default, metadata={"at_least": at_least, "above": above, "unit": unit})


# The --dtype values that run the fused Qwen3 forward's projections as fp8 GEMMs (engines/fp8.py).
FP8_DTYPES = ("fp8", "fp8-fast")

@dataclass(frozen=True)
class RunConfig:
    # Input: one or more Parquet files, directories (their *.parquet) or globs, or one such path as
    # a string, kept as given; planning expands them to files (pipeline.driver.plan.locate).
    inputs: tuple[str, ...]
    # Final ranked Parquet file (None: <stem>.reranked.parquet beside the first input, or
    # DIR.reranked.parquet beside a directory), or a dataset directory: a path that ends in "/"
    # or is an existing directory. Planning fills the default and the "/" (the plan's cfg has them).
    output: str | None = None
    # Rows per file of a dataset output at most (a query group larger than that: a file of its own).
    output_file_rows: int = whole(1_000_000, at_least=1)
    # Model directory or hub id (org/name; pipeline.engines.model_files resolves it through the Hugging Face cache).
    model: str = "Qwen/Qwen3-Reranker-0.6B"
    # Column names of the long form.
    query_col: str = "query"
    doc_col: str = "document"
    # List-of-strings column of the nested form, used when doc_col is absent.
    docs_col: str = "documents"
    # Per-row instruction column; null or absent falls back to `instruction`.
    instruction_col: str = "instruction"
    instruction: str = DEFAULT_INSTRUCTION
    # Prompt template (built-in name or JSON file) of causal-LM rerankers; None: by model type.
    template: str | None = None
    # Reranker family: "auto" (from config.architectures), "yes-no" (causal LM judged by tokens)
    # or "seq-cls" (a classification head).
    family: str = one_of("auto", "yes-no", "seq-cls")
    # Score transform: "auto" (softmax over [no, yes] / two labels, sigmoid of one logit) or "none".
    activation: str = one_of("auto", "none")
    # Total tokens per pair, prefix and suffix included (the recipe's max_length); a prompt
    # template alone takes a few.
    max_length: int = whole(8192, at_least=8)
    # Keep the best K rows of each query group (None keeps all).
    top_k: int | None = whole(None, at_least=1)
    # Torch dtype name or "auto" (bf16 on CUDA, float32 on CPU); "fp8": the fused Qwen3 forward's
    # projections as float8 GEMMs, the rest bf16 (CUDA compute capability 8.9+; engines/fp8.py);
    # "fp8-fast": the same with the GEMMs' fast accumulation (FP8_DTYPES).
    dtype: str = one_of("auto", "bfloat16", "float16", "float32", *FP8_DTYPES)
    # "auto", "cpu", "cuda" or "cuda:N".
    device: str = "auto"
    # Cap on GPU memory this process may use, in bytes (None: what is free at start).
    gpu_memory_limit: int | None = whole(None, at_least=1)
    # Token budget per packed batch (None: sized from measured memory on CUDA, 8192 on CPU).
    max_batch_tokens: int | None = whole(None, at_least=1)
    # Call torch.cuda.empty_cache() every N batches (0: only after an OOM).
    empty_cache_every: int = whole(0, at_least=0)
    # Pairs per unit of work: the length-sort window, the checkpoint granularity, the memory bound.
    window_pairs: int = whole(16384, at_least=1)
    # Seconds of scoring after which the pairs scored of a unit still in flight are committed to
    # the checkpoint (a stop or a crash loses at most this much, whatever window_pairs is). Does
    # not change scores or batches, so it is not part of the fingerprint.
    commit_every: float = number(30.0, above=0, unit="seconds")
    # What to do with a null query or document: "error" or "skip" (kept with null score/rank).
    on_null: str = one_of("error", "skip")
    trust_remote_code: bool = False
    # Where per-unit parts and their records live (None: OUTPUT.ckpt beside the output).
    checkpoint_dir: str | None = None
    keep_checkpoint: bool = False
    restart: bool = False
    overwrite: bool = False
    # Attention kernel: "auto", "flash_attn", "torch_varlen" or "sdpa" (exact per-sequence loop).
    attention: str = one_of("auto", "flash_attn", "torch_varlen", "sdpa")
    # Forward implementation: "auto" (fused Qwen3 path where it applies), "fused" or "transformers".
    engine: str = one_of("auto", "fused", "transformers")
    # torch.compile the fused path's elementwise steps: "auto" (on CUDA), "on" or "off".
    compile: str = one_of("auto", "on", "off")
    # Compute each query's shared prompt prefix once per batch for all its candidates (causal
    # families): "auto" (on CUDA, where it saves >= 20% of the tokens), "on" or "off". Scores are the
    # same to float tolerance, so it is not part of the fingerprint.
    prefix_sharing: str = one_of("auto", "on", "off")
    # Score cache: a local directory or an object-storage prefix shared by runs (None or "": none).
    # Where scores are kept, not what they are, so it is not part of the fingerprint: a run with or
    # without it resumes the same checkpoint (pipeline/cache).
    cache: str | None = place()
    # Where units run: "local" (this process, or one process per device with `devices`) or "ray".
    executor: str = one_of("local", "ray")
    # Several devices of this host, one worker process each: "all", a count, or "cuda:0,cuda:2" /
    # "cpu,cpu" (None: this process alone, on `device`).
    devices: str | None = None
    # Ray: the cluster address (None: start a local Ray), actors, and resources per actor.
    ray_address: str | None = None
    workers: int | None = whole(None, at_least=1)
    gpus_per_worker: float | None = number(None, at_least=0)  # None: 1 where the cluster has GPUs, else 0
    cpus_per_worker: float = number(1.0, at_least=0.1)
    # Long documents scored as overlapping windows of their own tokens (pipeline/data/chunks.py):
    # tokens per window (None: each document is one pair, cut at max_length), tokens consecutive
    # windows share (None: chunk_tokens // 4), and how a row's score comes from its windows'
    # ("max", "first" or "mean"; None: "max"). All three decide scores (fingerprint).
    chunk_tokens: int | None = None
    chunk_overlap: int | None = None
    aggregate: str | None = None
    # Parquet file of every window's score (query_id, doc_id, chunk, start_token, score); an output,
    # not in the fingerprint.
    chunk_scores: str | None = None

    def __post_init__(self):
        # The library's callers (Reranker, run()) meet these checks too, not only the CLI's types.
        for f in dataclasses.fields(self):
            check_field(f, getattr(self, f.name))
        check_chunking(self.chunk_tokens, self.chunk_overlap, self.aggregate, self.chunk_scores)
        for f in dataclasses.fields(self):
            if f.metadata.get("place") and getattr(self, f.name) is not None:
                object.__setattr__(self, f.name, os.fspath(getattr(self, f.name)) or None)
        # No I/O here: the inputs stay specs and the output as given until a run is planned.
        specs = (self.inputs,) if isinstance(self.inputs, (str, os.PathLike)) else tuple(self.inputs)
        object.__setattr__(self, "inputs", tuple(map(os.fspath, specs)))
        if self.output is not None:
            object.__setattr__(self, "output", os.fspath(self.output))

    @property
    def dataset(self) -> bool:
        """The output is a directory of Parquet files (part-00000.parquet, ...), not one file."""
        return str(self.output).endswith("/")

    @property
    def ckpt_dir(self) -> str:
        return self.checkpoint_dir or (self.output.rstrip("/") + ".ckpt")

    def check_machine(self) -> None:
        """What the fields' own checks cannot see: whether this machine has what the options ask
        for. Planning calls it once the inputs are found."""
        if self.gpu_memory_limit and self.device == "auto":
            import torch  # only this option asks, and planning picks the device next anyway

            if not torch.cuda.is_available():
                raise InputError("--gpu-memory-limit applies to CUDA only, and --device auto found no GPU here; "
                                 "drop the option or pass --device cuda")
        if self.dtype in FP8_DTYPES:  # refused before a model is fetched or a checkpoint made
            from pipeline.engines.resolve import resolve_device, resolve_dtype

            resolve_dtype(self.dtype, resolve_device(self.device))

    def output_fields(self) -> dict:
        """The options that decide the output beyond the scores (not in the fingerprint): a rerun
        that asks for others writes the output again from the checkpoint's parts."""
        fields = {"top_k": self.top_k}
        if self.dataset:
            fields["output_file_rows"] = self.output_file_rows
        return fields

    def score_fields(self) -> dict:
        """The options that decide the scores; they enter the checkpoint fingerprint."""
        return {
            "query_col": self.query_col, "doc_col": self.doc_col, "docs_col": self.docs_col,
            "instruction_col": self.instruction_col, "instruction": self.instruction,
            "template": self.template, "max_length": self.max_length, "family": self.family,
            "activation": self.activation,
            "on_null": self.on_null, "window_pairs": self.window_pairs,
            # None unless chunking, as in checkpoints made before these options existed
            **chunk_fields(self),
        }


def check_field(f: dataclasses.Field, v) -> None:
    """InputError, one line naming the field, the value and what it takes, when `v` is not a value
    of field `f`."""
    meta, name = f.metadata, f.name
    if v is None and f.default is None:
        return
    if "choices" in meta:
        if v not in meta["choices"]:
            raise InputError(f"{name}={v!r}: must be one of {', '.join(meta['choices'])}")
    elif name == "device":
        if not isinstance(v, str) or not DEVICE.match(v):
            raise InputError(f"device={v!r}: not a device; use auto, cpu, cuda or cuda:N")
    elif meta.get("whole"):
        if not isinstance(v, int) or isinstance(v, bool) or v < meta["at_least"]:
            raise InputError(f"{name}={v!r}: must be a whole number of at least {meta['at_least']}")
    elif "at_least" in meta:
        low, above, unit = meta["at_least"], meta["above"], meta["unit"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                v > above if above is not None else v >= low):
            what = f"a number of {unit}" if unit else "a number"
            raise InputError(f"{name}={v!r}: must be {what} {f'above {above:g}' if above is not None else f'of at least {low:g}'}")
    elif meta.get("place"):
        if not isinstance(v, (str, os.PathLike)):
            raise InputError(f"{name}={v!r}: must be a path or a URI (a string)")
    elif isinstance(f.default, bool):
        if not isinstance(v, bool):
            raise InputError(f"{name}={v!r}: must be True or False")


# Long documents as windows (pipeline/data/chunks.py): the options' bounds, checked here so that
# every maker of a RunConfig meets them.
AGGREGATES = ("max", "first", "mean")
MIN_CHUNK_TOKENS = 8
# Far above any model's context; a bound keeps the window arithmetic in 64-bit integers.
MAX_CHUNK_TOKENS = 1 << 24
# How the chunking options are named in messages: on the command line, or as Python keywords.
CHUNK_CLI = {"tokens": "--chunk-tokens", "overlap": "--chunk-overlap", "aggregate": "--aggregate",
             "scores": "--chunk-scores", "sep": " "}
CHUNK_KEYWORDS = {"tokens": "chunk_tokens", "overlap": "chunk_overlap", "aggregate": "aggregate",
                  "scores": "chunk_scores", "sep": "="}


def check_chunking(tokens, overlap, aggregate, scores_path=None, names: dict = CHUNK_CLI) -> None:
    """One-line InputErrors for chunking options that cannot go together or cannot be met."""
    def opt(key, value=None):
        return names[key] if value is None else f"{names[key]}{names['sep']}{value!r}"

    def is_whole(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if tokens is None:
        for key, value in (("overlap", overlap), ("aggregate", aggregate), ("scores", scores_path)):
            if value is not None:
                raise InputError(f"{opt(key)} needs {opt('tokens')}: pass {opt('tokens')} N to score long documents "
                                 f"as windows of N tokens, or drop {opt(key)}")
        return
    if not is_whole(tokens) or tokens < MIN_CHUNK_TOKENS:
        raise InputError(f"{opt('tokens', tokens)}: a window must hold at least {MIN_CHUNK_TOKENS} tokens; pass "
                         f"{opt('tokens')} {MIN_CHUNK_TOKENS} or more")
    if tokens > MAX_CHUNK_TOKENS:
        raise InputError(f"{opt('tokens', tokens)}: a window holds at most {MAX_CHUNK_TOKENS:,} tokens; pass "
                         f"{opt('tokens')} {MAX_CHUNK_TOKENS} or less (a document shorter than N is one window)")
    if overlap is not None and (not is_whole(overlap) or not 0 <= overlap < tokens):
        raise InputError(f"{opt('overlap', overlap)}: consecutive windows must share from 0 to {tokens - 1} tokens "
                         f"(fewer than {opt('tokens')} {tokens}); pass {opt('overlap')} 0 to {tokens - 1}")
    if aggregate is not None and aggregate not in AGGREGATES:
        raise InputError(f"{opt('aggregate', aggregate)}: not a way to aggregate windows; pass max (the best "
                         "window's score), first or mean")
    if scores_path is not None and (not isinstance(scores_path, str) or not scores_path):
        raise InputError(f"{opt('scores', scores_path)}: pass a Parquet file path")


def resolved_chunking(tokens, overlap, aggregate) -> tuple[int, int, str] | None:
    """(N, M, aggregate) with the defaults filled in (M = N // 4, max), or None: documents whole."""
    if tokens is None:
        return None
    return tokens, tokens // 4 if overlap is None else overlap, aggregate or "max"


def chunk_fields(cfg: RunConfig) -> dict:
    """The chunking options as they decide scores: [tokens, overlap, aggregate] resolved, or None
    when documents are scored whole (as in checkpoints made before the options existed). One
    value, so that a mismatch names all three (storage/fingerprint.py)."""
    c = resolved_chunking(cfg.chunk_tokens, cfg.chunk_overlap, cfg.aggregate)
    return {"chunking": None if c is None else list(c)}

