"""Plan a run: everything that can fail on bad input or a bad checkpoint, before a model loads.

    inputs and output (locate: the specs expanded, the default output) -> check options and output
    -> layout and schemas of every file -> nulls from footer statistics -> units -> fingerprint
    -> checkpoint (marked, locked, verified)

Every stat, listing and read goes through storage Locations: nothing here asks whether a path
is local or in object storage.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

from pipeline.config import RunConfig
from pipeline.data.inputs import resolve_inputs, resolve_output
from pipeline.data.jsonl import is_jsonl
from pipeline.data.read import Footers, InputLayout, Unit, open_parquet, plan_units, read_layout
from pipeline.errors import InputError, ModelError
from pipeline.storage.checkpoint import made_for, marked_for
from pipeline.storage.fingerprint import model_fingerprint
from pipeline.storage.location import Location, location
from pipeline.storage.output import Output
from pipeline.storage.sink import CheckpointSink

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")


@dataclass
class Plan:
    cfg: RunConfig  # with the output resolved (and a hub id resolved to its local snapshot)
    layout: InputLayout
    units: list[Unit]
    total_pairs: int
    device: object = None  # torch.device
    dtype: str = ""
    kind: object = None
    ckpt: CheckpointSink | None = None  # the run's sink: checkpoint, lease, inputs, output
    output_existed: bool = True  # at the start, under the lock (False: one there at the end is someone else's)
    inputs: tuple[Location, ...] = ()  # the input files, expanded from cfg.inputs

    @property
    def input_files(self) -> list[str]:
        """The input files as paths or URIs, in order."""
        return [str(i) for i in self.inputs]


def _utf8(name: str, what: str) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{name!r}: the {what} name is not valid UTF-8; rename it") from None


def locate(cfg: RunConfig) -> tuple[RunConfig, tuple[Location, ...]]:
    """What the config leaves to planning: its input specs expanded to files (directories,
    globs, prefixes), and its output (the default beside the first input; the "/" of an existing
    directory, which makes it a dataset). Returns the config with that output, and the files."""
    inputs = resolve_inputs(cfg.inputs)
    output = resolve_output(cfg.inputs, cfg.output)
    if output != cfg.output:
        cfg = dataclasses.replace(cfg, output=output)
    return cfg, inputs


def check_options(cfg: RunConfig) -> None:
    """What RunConfig cannot check alone (the device's name it checks when made)."""
    if cfg.gpu_memory_limit and cfg.device == "auto":
        import torch

        if not torch.cuda.is_available():
            raise InputError("--gpu-memory-limit applies to CUDA only, and --device auto found no GPU here; "
                             "drop the option or pass --device cuda")
    if cfg.dtype == "fp8":  # refused here, before a model is fetched or a checkpoint made
        from pipeline.engines.loading import resolve_device, resolve_dtype

        resolve_dtype(cfg.dtype, resolve_device(cfg.device))


def check_device_options(cfg: RunConfig, device, dtype) -> None:
    """Before the checkpoint: a kernel asked for by name must run on this device (only auto falls
    back); --compile on where compiling is slow gets one line saying so."""
    if cfg.attention != "auto":
        from pipeline.engines.attention import choose_kernel

        choose_kernel(cfg.attention, device, dtype)
    if cfg.compile == "on" and cfg.engine == "transformers":  # only the fused path compiles
        raise InputError("--compile on compiles the fused engine, and --engine transformers runs transformers' own "
                         "modules uncompiled; drop --compile on, or pass --engine auto")
    if cfg.compile == "on" and device.type == "cpu":
        from pipeline.engines.compiled import cache_dir

        log.info("--compile on: on CPU, torch.compile takes a minute or more at the first run; later runs take the "
                 "kernels from its cache (%s)", cache_dir() or "Inductor's default")


def output_key(output: str) -> str:
    """How a checkpoint's marker names its output: the URI, or the absolute path."""
    return Output(output).key


def check_output(cfg: RunConfig, inputs, resumable: bool | None = None) -> None:
    """Refuse an output the run cannot or must not write (exit 2). `resumable`: the checkpoint
    holds work of this output (None: peek at its marker)."""
    _utf8(cfg.output, "output")
    _utf8(cfg.ckpt_dir, "checkpoint directory")
    out = Output(cfg.output)
    if resumable is None:  # peek at the checkpoint's marker: made for this output?
        resumable = marked_for(location(cfg.ckpt_dir), out.key)
    out.check(inputs, resumable, cfg.overwrite, cfg.restart)
    if location(cfg.ckpt_dir).kind() == "file":
        raise InputError(f"{cfg.ckpt_dir}: the checkpoint directory is a file; pass a directory with --checkpoint-dir")


def check_nulls(paths, layout: InputLayout, cfg: RunConfig, footers: Footers | None = None) -> None:
    """Nulls in query, document and query_id, found from footer statistics before any scoring;
    only a row group whose statistics count nulls is read (one column) to name the row."""
    if cfg.on_null != "error":
        return
    names = [layout.query_col] + ([] if layout.nested else [layout.doc_col])
    names += ["query_id"] if "query_id" in layout.columns else []
    footers = footers or Footers()
    for path in map(str, paths):
        if is_jsonl(path):  # its scan checked every line (read.inspect_layout)
            continue
        md = footers.get(path)
        leaf = {md.schema.column(j).path: j for j in range(md.num_columns)}
        start = 0
        for i in range(md.num_row_groups):
            rg = md.row_group(i)
            for name in names:
                st = rg.column(leaf[name]).statistics if name in leaf else None
                if st is not None and st.has_null_count and st.null_count > 0:
                    pf = open_parquet(path)
                    col = pf.read_row_group(i, columns=[name]).column(0)
                    pf.close(force=True)
                    k = col.to_pylist().index(None)
                    raise InputError(
                        f"{path}: row {start + k} (from 0): column {name!r} is null; fill it, or pass --on-null skip "
                        "to keep such rows unscored"
                    )
            start += rg.num_rows


def check_model_files(cfg: RunConfig) -> None:
    if os.path.isdir(cfg.model) and not any(os.path.exists(os.path.join(cfg.model, n)) for n in _TOKENIZER_FILES):
        raise ModelError(f"model {cfg.model}: no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...); copy them "
                         "from the model's original directory")


def check_max_length(cfg: RunConfig, mconfig) -> None:
    n = getattr(mconfig, "max_position_embeddings", None)
    if isinstance(n, int) and cfg.max_length > n:
        raise InputError(f"--max-length {cfg.max_length} exceeds the {n} positions of model {cfg.model}; pass "
                         f"--max-length {n} or less")


def validate(cfg: RunConfig, inputs: tuple[Location, ...] | None = None) -> tuple[InputLayout, list[Unit], int]:
    """Input checks from footers alone (no model, no checkpoint); each input's footer is read
    once. `inputs`: the files of `cfg` (None: found from cfg.inputs here)."""
    if inputs is None:
        cfg, inputs = locate(cfg)
    check_options(cfg)
    check_output(cfg, inputs)
    footers = Footers()
    layout = read_layout(inputs, cfg, footers)
    check_nulls(inputs, layout, cfg, footers)
    units, total_pairs = plan_units(inputs, layout, cfg.window_pairs, cfg, footers)
    return layout, units, total_pairs


def fingerprint(cfg: RunConfig, layout: InputLayout, device: str, dtype: str, kind) -> dict:
    """Everything but the inputs, which the checkpoint adds with their content hashes. Engine,
    attention, compile and batch budget are recorded: they change float32 scores by ~3e-7
    (summation order), so one output never mixes them."""
    t = kind.template
    return {
        "model": {**model_fingerprint(cfg.model), "family": kind.family},
        "options": {**cfg.score_fields(), "device_type": device, "dtype": dtype, "nested": layout.nested,
                    "engine": cfg.engine, "attention": cfg.attention, "compile": cfg.compile,
                    "max_batch_tokens": cfg.max_batch_tokens},
        "template": None if t is None else {"prefix": t.prefix, "body": t.body, "suffix": t.suffix,
                                            "positive": t.positive, "negative": t.negative},
    }


def make_plan(cfg: RunConfig, kind=None, run_id: str | None = None) -> Plan:
    from pipeline.engines.families import inspect_model, load_config
    from pipeline.engines.loading import dtype_label, resolve_device, resolve_dtype

    if not cfg.inputs:
        raise InputError("no input given; pass one or more Parquet files, directories or globs")
    cfg, inputs = locate(cfg)
    layout, units, total_pairs = validate(cfg, inputs)
    if kind is None:  # a hub id becomes its cached snapshot here, after the input checks
        from pipeline.engines.hub import with_local_model

        cfg = with_local_model(cfg)
        mconfig = load_config(cfg)
        kind = inspect_model(cfg, mconfig)
        check_model_files(cfg)
        check_max_length(cfg, mconfig)
    device = resolve_device(cfg.device)
    torch_dtype = resolve_dtype(cfg.dtype, device)
    dtype = dtype_label(cfg.dtype, torch_dtype)  # "fp8" apart from "bfloat16"
    if cfg.executor == "local" and not cfg.devices:  # workers check their own device when they load
        check_device_options(cfg, device, torch_dtype)
    from pipeline.engines.prefix import resolve_mode

    resolve_mode(cfg.prefix_sharing, device.type, kind.family == "seq-cls-encoder")  # `on` for a cross-encoder
    if cfg.dtype == "fp8":
        from pipeline.engines.fp8 import check_engine

        check_engine(cfg.engine, kind.family)
    fp = fingerprint(cfg, layout, device.type, dtype, kind)
    out = Output(cfg.output)
    ck = CheckpointSink.open(location(cfg.ckpt_dir), fp, inputs, restart=cfg.restart, run_id=run_id,
                             own_root=cfg.checkpoint_dir is None, output=out)
    try:  # again under the lock: a run that finished meanwhile has published the output
        ours = made_for(ck.marker, out.key)  # one made for another -o owns no file here
        check_output(cfg, inputs, resumable=ours and ck.holds_work())
    except BaseException:
        ck.close(remove=not ck.holds_work())
        raise
    return Plan(cfg, layout, units, total_pairs, device, dtype, kind, ck, out.exists(), inputs)


__all__ = ["Plan", "make_plan", "locate", "validate", "check_output", "fingerprint"]
