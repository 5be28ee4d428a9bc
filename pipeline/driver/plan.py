"""Plan a run: everything that can fail on bad input or a bad checkpoint, before a model loads.

    check options and output -> layout and schemas of every file -> nulls from footer statistics
    -> units -> fingerprint -> checkpoint (marked, locked, verified)
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass

from pipeline.storage.checkpoint import Checkpoint, made_for, marked_for, open_checkpoint
from pipeline.config import RunConfig
from pipeline.errors import InputError, ModelError
from pipeline.storage.fingerprint import model_fingerprint
from pipeline.data.jsonl import is_jsonl
from pipeline.data.read import InputLayout, Unit, open_parquet, plan_units, read_layout

log = logging.getLogger(__name__)

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
    from pipeline.storage.uri import is_uri

    return output.rstrip("/") if is_uri(output) else os.path.abspath(output)


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


def _check_dataset_output(cfg: RunConfig, resumable: bool) -> None:
    """check_output for a dataset directory (a path ending in /, or an existing directory)."""
    from pipeline.storage import dataset, uri
    from pipeline.storage.local import LocalStore
    from pipeline.storage.remote import RemoteStore

    root = cfg.output.rstrip("/")
    for p in cfg.inputs:
        if (p + "/").startswith(root + "/") if uri.is_uri(root) else \
                os.path.abspath(p).startswith(os.path.abspath(root) + os.sep):
            raise InputError(f"{cfg.output}: the input {p} lies inside the output directory; pass another -o")
    dataset.check_output_dir(cfg.output, resumable, cfg.overwrite, cfg.restart)
    parent = root.rsplit("/", 1)[0] if uri.is_uri(root) else os.path.dirname(os.path.abspath(root))
    if not uri.is_uri(root) and not os.path.isdir(parent):
        raise InputError(f"{cfg.output}: the directory {parent} does not exist; create it or pass another -o")
    why = (RemoteStore(root) if uri.is_uri(root) else LocalStore(parent)).is_writable()
    if why:
        raise InputError(f"{cfg.output}: cannot write there ({why}); pass an -o where you can write")


def check_output(cfg: RunConfig, resumable: bool | None = None) -> None:
    """`resumable`: the checkpoint holds work of this output (None: peek at its marker)."""
    from pipeline.storage.uri import is_uri

    _utf8(cfg.output, "output")
    _utf8(cfg.ckpt_dir, "checkpoint directory")
    if cfg.dataset:
        if resumable is None:
            resumable = marked_for(cfg.ckpt_dir, output_key(cfg.output))
        _check_dataset_output(cfg, resumable)
        return
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
        if is_jsonl(path):  # its scan checked every line (read.inspect_layout)
            continue
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
    layout = read_layout(cfg.inputs, cfg)
    check_nulls(cfg.inputs, layout, cfg)
    units, total_pairs = plan_units(cfg.inputs, layout, cfg.window_pairs, cfg)
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
    torch_dtype = resolve_dtype(cfg.dtype, device)
    dtype = str(torch_dtype).removeprefix("torch.")
    if cfg.executor == "local" and not cfg.devices:  # workers check their own device when they load
        check_device_options(cfg, device, torch_dtype)
    from pipeline.engines.prefix import resolve_mode

    resolve_mode(cfg.prefix_sharing, device.type, kind.family == "seq-cls-encoder")  # `on` for a cross-encoder
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
    from pipeline.storage import dataset, uri

    if output.endswith("/"):
        return dataset.exists(output)
    return uri.stat(output) is not None if uri.is_uri(output) else os.path.lexists(output)


__all__ = ["Plan", "make_plan", "validate", "check_output", "fingerprint"]
