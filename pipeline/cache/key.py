"""What a cached score is keyed by.

A score depends on the pair's text and on everything that turns text into a score. The second
part is the scope: a BLAKE2b-128 of

  - the model's content: a SHA-256 of every file at the top of its directory (weights, config,
    tokenizer, remote code), documentation and images aside; a changed byte in any weight file
    makes another scope, so an old entry can never answer for it;
  - the family as resolved (yes-no, seq-cls-causal, seq-cls-encoder) and its number of labels;
  - the prompt template's text (prefix, body, suffix, judged tokens), whatever file or name it
    came from;
  - the activation, the max length and the dtype the scores were computed in;
  - KEY_VERSION, raised whenever a change of this code changes scores.

Not in it, because they leave each score equal within the parity bound (float32: 1e-5 of the
reference, measured ~1e-6 apart; bf16: see the README's bound of about 0.02 from float32): the
engine (fused or transformers), the attention kernel, torch.compile, prefix sharing, the batch
token budget, the window and the device. A file's hash is remembered across runs by its inode,
size, mtime and ctime (no ordinary write leaves ctime unchanged), so a big model is read once.

A pair's key, inside its scope, is two u64 (segment.py keeps them sorted):
  hi = 32 bits of BLAKE2b(scope; instruction, query) << 32 | 32 bits of BLAKE2b(scope; instruction,
       query, document)
  lo = 64 more bits of the latter.
So the documents of one query sort together, and two different pairs share a key only if 96 bits
of a keyed hash of their texts agree (and 32 more when their queries differ): about one chance
in 10^28 for a pair of pairs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from dataclasses import dataclass

import numpy as np

from pipeline.errors import InputError
from pipeline.runtime import user_cache
from pipeline.storage.atomic import atomic_write_text

log = logging.getLogger(__name__)

KEY_VERSION = 1
_SKIP_PREFIX = (".", "README", "LICENSE", "NOTICE")
_SKIP_SUFFIX = (".md", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".lock", ".metadata")
MEMO_NAME = "file-hashes.json"
MEMO_MAX = 2000  # files remembered


@dataclass(frozen=True)
class Scope:
    """The part of every key that is not the pair: its id, and what it was made of."""

    id: bytes  # 16 bytes
    fields: dict  # what the id hashes (written to the cache as scope.json)
    label: dict  # for people: the model's path and name when the scope was made

    @property
    def hex(self) -> str:
        return self.id.hex()


def _skipped(name: str) -> bool:
    return name.startswith(_SKIP_PREFIX) or name.lower().endswith(_SKIP_SUFFIX)


def _stat_key(st: os.stat_result) -> list:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _load_memo(path: str) -> dict:
    try:
        with open(path) as f:
            memo = json.load(f)
        return memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_memo(path: str, memo: dict) -> None:
    if len(memo) > MEMO_MAX:  # the most recently hashed stay
        memo = dict(sorted(memo.items(), key=lambda kv: kv[1].get("at", 0))[-MEMO_MAX:])
    try:
        atomic_write_text(json.dumps(memo), path)
    except OSError as exc:  # a read-only home: hash again next time
        log.debug("could not remember file hashes in %s: %s", path, exc)


def file_sha256(path: str, memo: dict | None = None) -> str:
    """SHA-256 of a file's bytes; taken from `memo` when its stat key matches."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = _stat_key(st)
    if memo is not None:
        got = memo.get(real)
        if isinstance(got, dict) and got.get("stat") == key and isinstance(got.get("sha256"), str):
            return got["sha256"]
    h = hashlib.sha256()
    with open(real, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    digest = h.hexdigest()
    if memo is not None:
        memo[real] = {"stat": key, "sha256": digest, "at": time.time()}
    return digest


def model_identity(model: str) -> dict:
    """{file name: sha256} of every file at the top of the model directory that can decide scores."""
    if not os.path.isdir(model):
        raise InputError(f"--cache: the model {model} is not a local directory, so its weights cannot be "
                         "hashed; pass the model's directory (or a hub id present in the local cache)")
    directory = user_cache.usable(user_cache.path())
    memo_path = os.path.join(directory, MEMO_NAME) if directory else ""
    memo = _load_memo(memo_path) if memo_path else {}
    before = json.dumps(memo, sort_keys=True)
    files = {}
    for name in sorted(os.listdir(model)):
        p = os.path.join(model, name)
        if _skipped(name) or not os.path.isfile(p):
            continue
        files[name] = file_sha256(p, memo)
    if memo_path and json.dumps(memo, sort_keys=True) != before:
        _save_memo(memo_path, memo)
    if not any(n.endswith((".safetensors", ".bin", ".pt", ".pth", ".gguf")) for n in files):
        raise InputError(f"--cache: the model directory {model} holds no weight file to hash; pass the "
                         "model's directory")
    return files


def model_label(model: str) -> dict:
    """How a person names the model: its path, and a hub id@revision for a hub cache snapshot."""
    path = os.path.abspath(model)
    parts = path.split(os.sep)
    name = os.path.basename(path.rstrip(os.sep))
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        name = parts[-3][len("models--"):].replace("--", "/") + "@" + parts[-1][:12]
    return {"path": path, "name": name}


def make_scope(cfg, kind, dtype: str) -> Scope:
    """The scope of a run's scores on one device (`dtype` as resolved there, e.g. "float32")."""
    return _scope(cfg, kind, dtype, {"model_files": model_identity(cfg.model)})


def run_scope(cfg, kind, dtype: str) -> Scope:
    """The scope of the run-private dedup store (a run without --cache): as make_scope, but the
    model is named by the checkpoint's own quick fingerprint of it (a sample of each weight file)
    instead of a hash of every byte. That store lives and dies with one checkpoint, which already
    refuses to resume with another model on this very fingerprint, so hashing 16 GB of weights
    before the first batch of every run would buy nothing."""
    from pipeline.storage.fingerprint import model_fingerprint

    return _scope(cfg, kind, dtype, {"model_sample": model_fingerprint(cfg.model)})


def _scope(cfg, kind, dtype: str, model: dict) -> Scope:
    t = kind.template
    fields = {
        "key_version": KEY_VERSION,
        **model,
        "family": kind.family,
        "num_labels": kind.num_labels,
        "template": None if t is None else {"prefix": t.prefix, "body": t.body, "suffix": t.suffix,
                                            "positive": t.positive, "negative": t.negative},
        "activation": cfg.activation,
        "max_length": cfg.max_length,
        "dtype": str(dtype).removeprefix("torch."),
    }
    sid = hashlib.blake2b(json.dumps(fields, sort_keys=True).encode(), digest_size=16).digest()
    return Scope(sid, fields, model_label(cfg.model))


def _text(s: str) -> bytes:
    b = s.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(b)) + b


def pair_keys(scope: bytes, instructions, queries, documents) -> tuple[np.ndarray, np.ndarray]:
    """(hi, lo) u64 keys of the pairs (see the module's docstring)."""
    n = len(queries)
    qbytes, pbytes = bytearray(), bytearray()
    states: dict[tuple[str, str], tuple[bytes, object]] = {}
    for i, q, d in zip(instructions, queries, documents):
        got = states.get((i, q))
        if got is None:
            head = _text(i) + _text(q)
            qh = hashlib.blake2b(head, digest_size=4, key=scope, person=b"rb-query").digest()
            got = states[(i, q)] = (qh, hashlib.blake2b(head, digest_size=12, key=scope, person=b"rb-pair"))
        h = got[1].copy()
        h.update(_text(d))
        qbytes += got[0]
        pbytes += h.digest()
    q32 = np.frombuffer(bytes(qbytes), dtype="<u4", count=n).astype(np.uint64)
    p = np.frombuffer(bytes(pbytes), dtype=np.uint8).reshape(n, 12)
    p32 = p[:, :4].copy().view("<u4").ravel().astype(np.uint64)
    lo = p[:, 4:].copy().view("<u8").ravel().astype(np.uint64)
    return (q32 << np.uint64(32)) | p32, lo
