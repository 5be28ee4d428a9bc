"""What a checkpoint was made from: inputs (content-verified), model files and the options that
decide scores. A checkpoint resumes only under the same fingerprint.

Inputs are checked cheaply at every start: size + mtime_ns + a hash of the raw Parquet footer.
When size and footer match but the mtime differs (a copy, a touch, or an edit in place that kept
the size), the file's bytes are hashed and compared with the hash taken when the checkpoint was
made: equal content resumes, anything else is refused. So the whole input is read once more
only when the checkpoint is created and when a file's mtime moved.
"""

from __future__ import annotations

import hashlib
import os
import shlex

from pipeline.errors import CheckpointError, InputError

HASH_CHUNK = 8 << 20


TAIL = 64 << 10  # bytes of a file without a footer (JSONL) that stand for its footer


def _footer_bytes(f, size: int) -> bytes:
    # Raw bytes, never decoded: statistics may hold invalid UTF-8 (a UnicodeDecodeError before).
    if size < 12:
        return b""
    f.seek(size - 8)
    tail = f.read(8)
    if tail[4:] != b"PAR1":  # not Parquet (JSONL, gzip): its last bytes
        f.seek(max(0, size - TAIL))
        return f.read(TAIL)
    n = int.from_bytes(tail[:4], "little")
    f.seek(max(0, size - 8 - n))
    return f.read(min(n, size - 8)) + tail


def content_hash(loc) -> str:
    h = hashlib.blake2b(digest_size=32)
    with loc.open() as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _blake(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=32).hexdigest()


def quick_stat(loc) -> dict:
    """Size, mtime and a hash of the footer of an input (a Location)."""
    st = loc.stat()
    if st is None or st.kind != "file":
        raise FileNotFoundError(str(loc))
    with loc.open() as f:
        footer = _footer_bytes(f, st.size)
    return {"path": loc.key, "size": st.size, "mtime_ns": st.mtime_ns, "footer_blake2b": _blake(footer)}


def file_fingerprint(loc) -> dict:
    """The fast-path fields plus the content hash (read once, when a checkpoint is made). A small
    file is read once for both."""
    st = loc.stat()
    if st is None or st.kind != "file":
        raise FileNotFoundError(str(loc))
    if st.size > HASH_CHUNK:
        return {**quick_stat(loc), "content_blake2b": content_hash(loc)}
    data = loc.read_bytes()
    import io

    return {"path": loc.key, "size": len(data), "mtime_ns": st.mtime_ns,
            "footer_blake2b": _blake(_footer_bytes(io.BytesIO(data), len(data))), "content_blake2b": _blake(data)}


def same_input(old: dict, loc) -> bool:
    """True when `loc` holds the bytes `old` was taken from (cheap unless its mtime moved)."""
    now = quick_stat(loc)
    if now["size"] != old.get("size") or now["footer_blake2b"] != old.get("footer_blake2b"):
        return False
    if now["mtime_ns"] == old.get("mtime_ns"):
        return True
    return content_hash(loc) == old.get("content_blake2b")


def check_inputs(old: list[dict], inputs) -> None:
    """Refuse a checkpoint made from other input files or other bytes; name the file."""
    if [o.get("path") for o in old] != [loc.key for loc in inputs]:
        raise CheckpointError(
            "the checkpoint belongs to a run with different inputs; rerun with the same inputs, model and "
            "options to resume, or pass --restart to start over"
        )
    for o, loc in zip(old, inputs):
        if not same_input(o, loc):
            raise CheckpointError(
                f"{loc}: the file changed since the checkpoint was made (its content differs); its old scores "
                "cannot be reused: pass --restart to score it again"
            )


def recheck_inputs(old: list[dict], inputs) -> None:
    """Before the output is published: every input must still be the version that was scored."""
    for o, loc in zip(old, inputs):
        try:
            ok = same_input(o, loc)
        except OSError:
            ok = False
        if not ok:
            raise InputError(
                f"{loc}: the file changed during the run; nothing was published: rerun with --restart to score "
                "the new version"
            )


def diff_fingerprints(old: dict, new: dict, prefix: str = "") -> tuple[str, object, object] | None:
    """The first field (dotted path) where two fingerprints differ, with its old and new value; or None."""
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = diff_fingerprints(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}", a, b
    return None


# Fingerprint fields as the option a user typed (RunConfig field -> CLI option).
OPTION_OF = {
    "options.query_col": "--query-col", "options.doc_col": "--doc-col", "options.docs_col": "--docs-col",
    "options.instruction_col": "--instruction-col", "options.instruction": "--instruction",
    "options.template": "--template", "options.max_length": "--max-length", "options.family": "--family",
    "options.activation": "--activation", "options.on_null": "--on-null", "options.window_pairs": "--window",
    "options.device_type": "--device", "options.dtype": "--dtype", "options.engine": "--engine",
    "options.attention": "--attention", "options.compile": "--compile",
    "options.max_batch_tokens": "--max-batch-tokens", "model.family": "--family", "model.path": "--model",
    "model.id": "--model",
}


def _shown(option: str, value) -> str:
    if value is None:
        return f"no {option}"
    text = shlex.quote(str(value))
    return f"{option} {text if len(text) <= 200 else text[:199] + '…'}"


def describe_mismatch(field: str, then, now) -> str:
    """Why a checkpoint does not fit this run, in the words of the options: both values and the fix
    (for a caller to end with its own alternative, e.g. `, or pass --restart ...`)."""
    option = OPTION_OF.get(field)
    if option:
        fix = f"rerun with {option} {shlex.quote(str(then))}" if then is not None else f"rerun without {option}"
        return (f"the checkpoint was made with {_shown(option, then)}, this run has {_shown(option, now)}; {fix} "
                "to resume")
    if field == "options.chunking":  # [tokens, overlap, aggregate] or None (config.chunk_fields)
        def shown(v):
            return "no --chunk-tokens" if v is None else \
                f"--chunk-tokens {v[0]} --chunk-overlap {v[1]} --aggregate {v[2]}"
        fix = "rerun without --chunk-tokens" if then is None else f"rerun with {shown(then)}"
        return f"the checkpoint was made with {shown(then)}, this run has {shown(now)}; {fix} to resume"
    if field == "options.nested":
        form = {True: "nested input (a list of documents per row)", False: "long-form input (a document per row)"}
        return (f"the checkpoint was made from {form.get(then, then)}, this run reads {form.get(now, now)}; rerun "
                "with the same inputs and columns to resume")
    if field.startswith("model.files."):
        return (f"the model's {field[len('model.files.'):]} is not the one the checkpoint was made with (--model); "
                "rerun with that model to resume")
    if field.startswith("template."):
        return (f"the prompt template's {field[len('template.'):]} is not the one the checkpoint was made with "
                "(--template); rerun with the same --template to resume")
    return (f"the checkpoint belongs to a run with a different {field} ({then!r}; this run: {now!r}); rerun with the "
            "same inputs, model and options to resume")


def _sample_hash(path: str, chunk: int = 1 << 20) -> str:
    """sha256 of the safetensors header and three 1 MiB samples: changes with any re-save,
    without reading 16 GB of 8B weights at every start."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        h.update(head)
        if len(head) == 8:
            n = int.from_bytes(head, "little")
            h.update(f.read(min(n, 100 << 20)))
        for off in (0, max(0, size // 2 - chunk // 2), max(0, size - chunk)):
            f.seek(off)
            h.update(f.read(chunk))
    h.update(str(size).encode())
    return h.hexdigest()


def model_fingerprint(model: str) -> dict:
    if not os.path.isdir(model):
        return {"id": model}
    files = {}
    for name in sorted(os.listdir(model)):
        p = os.path.join(model, name)
        if not os.path.isfile(p):
            continue
        if name.endswith(".safetensors"):
            files[name] = _sample_hash(p)
        elif name.endswith((".json", ".txt", ".model")) and os.path.getsize(p) < (64 << 20):
            with open(p, "rb") as f:
                files[name] = hashlib.sha256(f.read()).hexdigest()
    return {"path": os.path.abspath(model), "files": files}


def fingerprint(cfg, layout, device: str, dtype: str, kind) -> dict:
    """A run's fingerprint but the inputs, which the checkpoint adds with their content hashes:
    the model's files and family, the options that decide the scores (RunConfig.score_fields),
    where they run, the input's form and the template. Engine, attention, compile and batch budget
    are recorded: they change float32 scores by ~3e-7 (summation order), so one output never mixes
    them. `layout`: the input's (data.read.InputLayout); `kind`: the model's (engines.resolve.ModelKind)."""
    t = kind.template
    return {
        "model": {**model_fingerprint(cfg.model), "family": kind.family},
        "options": {**cfg.score_fields(), "device_type": device, "dtype": dtype, "nested": layout.nested,
                    "engine": cfg.engine, "attention": cfg.attention, "compile": cfg.compile,
                    "max_batch_tokens": cfg.max_batch_tokens},
        "template": None if t is None else {"prefix": t.prefix, "body": t.body, "suffix": t.suffix,
                                            "positive": t.positive, "negative": t.negative},
    }
