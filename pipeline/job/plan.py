"""Plan a run: everything that can fail on bad input or a bad checkpoint, before a model loads.

    check options and output -> layout and schemas of every file -> nulls from footer statistics
    -> units -> fingerprint -> checkpoint (marked, locked, verified)
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

from pipeline.storage.checkpoint import Checkpoint, made_for, marked_for, open_checkpoint
from pipeline.config import RunConfig
from pipeline.errors import InputError, ModelError
from pipeline.storage.fingerprint import model_fingerprint
from pipeline.data.read import InputLayout, Unit, check_same_layout, inspect_layout, open_parquet, plan_units

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")


@dataclass
class Plan:
    cfg: RunConfig
    layout: InputLayout
    units: list[Unit]
    total_pairs: int
    device: object = None  # torch.device
    dtype: str = ""
    kind: object = None
    ckpt: Checkpoint | None = None
    output_existed: bool = True  # at the start, under the lock (False: one there at the end is someone else's)


def _utf8(name: str, what: str) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{name!r}: the {what} name is not valid UTF-8; rename it") from None


def check_options(cfg: RunConfig) -> None:
    """What RunConfig cannot check alone (the device's name it checks when made)."""
    if cfg.gpu_memory_limit and cfg.device == "auto":
        import torch

        if not torch.cuda.is_available():
            raise InputError("--gpu-memory-limit applies to CUDA only, and --device auto found no GPU here; "
                             "drop the option or pass --device cuda")


def output_key(output: str) -> str:
    """How a checkpoint's marker names its output: the URI, or the absolute path."""
    from pipeline.storage.uri import is_uri

    return output if is_uri(output) else os.path.abspath(output)


def _check_remote_output(cfg: RunConfig, resumable: bool | None) -> None:
    """check_output for an object-storage output: the same refusals, asked of the store."""
    from pipeline.storage import remote as sr
    from pipeline.storage import uri

    if cfg.output in cfg.inputs:
        raise InputError(f"{cfg.output}: the output is one of the inputs; pass another -o")
    where = uri.kind(cfg.output)
    if where == "dir":
        raise InputError(f"{cfg.output}: the output is a prefix with objects under it; pass an object key with -o")
    if resumable is None:  # the checkpoint in the bucket or on local disk
        resumable = marked_for(cfg.ckpt_dir, output_key(cfg.output))
    if where == "file" and not cfg.overwrite and (cfg.restart or not resumable):
        raise InputError(f"{cfg.output}: the output exists; pass --overwrite to replace it")
    why = sr.RemoteStore(cfg.output.rsplit("/", 1)[0]).is_writable()
    if why:
        raise InputError(f"{cfg.output}: cannot write there ({why}); check the bucket and the credentials")


def check_output(cfg: RunConfig, resumable: bool | None = None) -> None:
    """`resumable`: the checkpoint holds work of this output (None: peek at its marker)."""
    from pipeline.storage.uri import is_uri

    _utf8(cfg.output, "output")
    _utf8(cfg.ckpt_dir, "checkpoint directory")
    if is_uri(cfg.output):
        _check_remote_output(cfg, resumable)
        return
    if resumable is None:  # peek at the checkpoint's marker: made for this output?
        resumable = marked_for(cfg.ckpt_dir, output_key(cfg.output))
    out = os.path.abspath(cfg.output)
    for p in cfg.inputs:
        if os.path.abspath(p) == out or (os.path.exists(cfg.output) and os.path.samefile(p, cfg.output)):
            raise InputError(f"{cfg.output}: the output is one of the inputs; pass another -o")
    if os.path.isdir(cfg.output):
        raise InputError(f"{cfg.output}: the output is a directory; pass a file path with -o")
    if os.path.exists(cfg.output) and not cfg.overwrite and (cfg.restart or not resumable):
        raise InputError(f"{cfg.output}: the output exists; pass --overwrite to replace it")
    d = os.path.dirname(out)
    if not os.path.isdir(d):
        raise InputError(f"{cfg.output}: the directory {d} does not exist; create it or pass another -o")
    try:  # os.access says yes to root on read-only file systems; a real file is the test
        with tempfile.TemporaryFile(dir=d):
            pass
    except OSError as exc:
        raise InputError(
            f"{cfg.output}: cannot write in {d} ({exc.strerror}); pass an -o in a writable directory"
        ) from None
    if not is_uri(cfg.ckpt_dir) and os.path.exists(cfg.ckpt_dir) and not os.path.isdir(cfg.ckpt_dir):
        raise InputError(f"{cfg.ckpt_dir}: the checkpoint directory is a file; pass a directory with --checkpoint-dir")


def check_nulls(paths, layout: InputLayout, cfg: RunConfig) -> None:
    """Nulls in query, document and query_id, found from footer statistics before any scoring;
    only a row group whose statistics count nulls is read (one column) to name the row."""
    if cfg.on_null != "error":
        return
    names = [layout.query_col] + ([] if layout.nested else [layout.doc_col])
    names += ["query_id"] if "query_id" in layout.columns else []
    for path in paths:
        pf = open_parquet(path)
        md = pf.metadata
        leaf = {md.schema.column(j).path: j for j in range(md.num_columns)}
        start = 0
        for i in range(md.num_row_groups):
            rg = md.row_group(i)
            for name in names:
                st = rg.column(leaf[name]).statistics if name in leaf else None
                if st is not None and st.has_null_count and st.null_count > 0:
                    col = pf.read_row_group(i, columns=[name]).column(0)
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


def validate(cfg: RunConfig) -> tuple[InputLayout, list[Unit], int]:
    """Input checks from footers alone (no model, no checkpoint)."""
    check_options(cfg)
    check_output(cfg)
    layout = inspect_layout(cfg.inputs[0], cfg)
    check_same_layout(list(cfg.inputs), layout, cfg)
    check_nulls(cfg.inputs, layout, cfg)
    units, total_pairs = plan_units(cfg.inputs, layout, cfg.window_pairs)
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
    from pipeline.engines.loading import resolve_device, resolve_dtype

    if not cfg.inputs:
        raise InputError("no input given; pass one or more Parquet files, directories or globs")
    layout, units, total_pairs = validate(cfg)
    if kind is None:  # a hub id becomes its cached snapshot here, after the input checks
        from pipeline.engines.hub import with_local_model

        cfg = with_local_model(cfg)
        mconfig = load_config(cfg)
        kind = inspect_model(cfg, mconfig)
        check_model_files(cfg)
        check_max_length(cfg, mconfig)
    device = resolve_device(cfg.device)
    dtype = str(resolve_dtype(cfg.dtype, device)).removeprefix("torch.")
    fp = fingerprint(cfg, layout, device.type, dtype, kind)
    ck = open_checkpoint(cfg.ckpt_dir, fp, cfg.inputs, restart=cfg.restart, run_id=run_id,
                         own_root=cfg.checkpoint_dir is None, output=output_key(cfg.output))
    try:  # again under the lock: a run that finished meanwhile has published the output
        ours = made_for(ck.marker, output_key(cfg.output))  # one made for another -o owns no file here
        check_output(cfg, resumable=ours and ck.holds_work())
    except BaseException:
        ck.close(remove=not ck.holds_work())
        raise
    return Plan(cfg, layout, units, total_pairs, device, dtype, kind, ck, output_exists(cfg.output))


def output_exists(output: str) -> bool:
    from pipeline.storage import uri

    return uri.stat(output) is not None if uri.is_uri(output) else os.path.lexists(output)


__all__ = ["Plan", "make_plan", "validate", "check_output", "fingerprint"]
