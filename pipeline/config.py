"""The one frozen configuration of a run. The CLI fills it; the library reads only it."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from pipeline.errors import InputError

DEVICE = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$")  # what --device and device= take
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


@dataclass(frozen=True)
class RunConfig:
    # Input: one or more Parquet files, directories (their *.parquet) or globs, or one such path as
    # a string; resolved to files when the config is made.
    inputs: tuple[str, ...]
    # Final ranked Parquet file (None: <stem>.reranked.parquet beside the first input, or
    # DIR.reranked.parquet beside a directory), or a dataset directory: a path that ends in "/"
    # or is an existing directory (kept here with its "/").
    output: str | None = None
    # Rows per file of a dataset output at most (a query group larger than that: a file of its own).
    output_file_rows: int = 1_000_000
    # Model directory or hub id (org/name; pipeline.engines.hub resolves it through the Hugging Face cache).
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
    family: str = "auto"
    # Score transform: "auto" (softmax over [no, yes] / two labels, sigmoid of one logit) or "none".
    activation: str = "auto"
    # Total tokens per pair, prefix and suffix included (the recipe's max_length).
    max_length: int = 8192
    # Keep the best K rows of each query group (None keeps all).
    top_k: int | None = None
    # Torch dtype name or "auto" (bf16 on CUDA, float32 on CPU).
    dtype: str = "auto"
    # "auto", "cpu", "cuda" or "cuda:N".
    device: str = "auto"
    # Cap on GPU memory this process may use, in bytes (None: what is free at start).
    gpu_memory_limit: int | None = None
    # Token budget per packed batch (None: sized from measured memory on CUDA, 8192 on CPU).
    max_batch_tokens: int | None = None
    # Call torch.cuda.empty_cache() every N batches (0: only after an OOM).
    empty_cache_every: int = 0
    # Pairs per unit of work: the length-sort window, the checkpoint granularity, the memory bound.
    window_pairs: int = 16384
    # Seconds of scoring after which the pairs scored of a unit still in flight are committed to
    # the checkpoint (a stop or a crash loses at most this much, whatever window_pairs is). Does
    # not change scores or batches, so it is not part of the fingerprint.
    commit_every: float = 30.0
    # What to do with a null query or document: "error" or "skip" (kept with null score/rank).
    on_null: str = "error"
    trust_remote_code: bool = False
    # Where per-unit parts and the manifest live (None: OUTPUT.ckpt beside the output).
    checkpoint_dir: str | None = None
    keep_checkpoint: bool = False
    restart: bool = False
    overwrite: bool = False
    # Attention kernel: "auto", "flash_attn", "torch_varlen" or "sdpa" (exact per-sequence loop).
    attention: str = "auto"
    # Forward implementation: "auto" (fused Qwen3 path where it applies), "fused" or "transformers".
    engine: str = "auto"
    # torch.compile the fused path's elementwise steps: "auto" (on CUDA), "on" or "off".
    compile: str = "auto"
    # Compute each query's shared prompt prefix once per batch for all its candidates (causal
    # families): "auto" (on CUDA, where it saves >= 20% of the tokens), "on" or "off". Scores are the
    # same to float tolerance, so it is not part of the fingerprint.
    prefix_sharing: str = "auto"
    # Score cache: a local directory or an object-storage prefix shared by runs (None: none). Where
    # scores are kept, not what they are, so it is not part of the fingerprint: a run with or
    # without it resumes the same checkpoint (pipeline/cache).
    cache: str | None = None
    # Where units run: "local" (this process, or one process per device with `devices`) or "ray".
    executor: str = "local"
    # Several devices of this host, one worker process each: "all", a count, or "cuda:0,cuda:2" /
    # "cpu,cpu" (None: this process alone, on `device`).
    devices: str | None = None
    # Ray: the cluster address (None: start a local Ray), actors, and resources per actor.
    ray_address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None  # None: 1 where the cluster has GPUs, else 0
    cpus_per_worker: float = 1.0

    def __post_init__(self):
        from pipeline.data.inputs import default_output, resolve_inputs

        # The library's callers (Reranker, run()) meet these checks too, not only the CLI's types.
        for name in ("top_k", "max_batch_tokens", "window_pairs", "max_length", "output_file_rows"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise InputError(f"{name}={v!r}: must be a whole number of at least 1")
        ce = self.commit_every
        if isinstance(ce, bool) or not isinstance(ce, (int, float)) or not ce > 0:
            raise InputError(f"commit_every={ce!r}: must be a number of seconds above 0")
        if not DEVICE.match(str(self.device or "")):
            raise InputError(f"device={self.device!r}: not a device; use auto, cpu, cuda or cuda:N")
        specs = (self.inputs,) if isinstance(self.inputs, (str, os.PathLike)) else tuple(self.inputs)
        files = resolve_inputs(specs)
        object.__setattr__(self, "inputs", files)
        if self.output is None:
            object.__setattr__(self, "output", default_output(specs[0]) if specs else "")
        elif not str(self.output).endswith("/") and _is_directory(str(self.output)):
            object.__setattr__(self, "output", str(self.output) + "/")

    @property
    def dataset(self) -> bool:
        """The output is a directory of Parquet files (part-00000.parquet, ...), not one file."""
        return str(self.output).endswith("/")

    @property
    def ckpt_dir(self) -> str:
        return self.checkpoint_dir or (self.output.rstrip("/") + ".ckpt")

    def score_fields(self) -> dict:
        """The options that decide the scores; they enter the checkpoint fingerprint."""
        return {
            "query_col": self.query_col, "doc_col": self.doc_col, "docs_col": self.docs_col,
            "instruction_col": self.instruction_col, "instruction": self.instruction,
            "template": self.template, "max_length": self.max_length, "family": self.family,
            "activation": self.activation,
            "on_null": self.on_null, "window_pairs": self.window_pairs,
        }


def _is_directory(path: str) -> bool:
    """An existing local directory, or an object-storage prefix with objects under it."""
    from pipeline.storage.uri import is_uri, kind

    return kind(path) == "dir" if is_uri(path) else os.path.isdir(path)
