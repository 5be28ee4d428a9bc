"""A Qwen tokenizer built straight from tokenizer.json with the `tokenizers` library, without
importing transformers (which costs seconds at startup: 1 s on a 2-core CPU, 7-11 s measured on
the GPU machine).

transformers' Qwen2Tokenizer (v5) rebuilds its backend from the file's vocab and merges with a
fixed pipeline (NFC, the Qwen split regex, byte-level without prefix space, plain BPE), keeps the
file's post-processor, padding and truncation, and adds the special tokens of
tokenizer_config.json. `load` accepts a directory only when that rebuild and the file say the
same thing, so both give the same ids; anything it does not understand (another tokenizer class,
remote code, split special tokens, added tokens that disagree, a different pipeline) returns
None with the reason, and the caller uses transformers' AutoTokenizer.
"""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer

# The pipeline of transformers' Qwen2Tokenizer (models/qwen2/tokenization_qwen2.py).
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
              r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_CLASSES = {"Qwen2Tokenizer", "Qwen2TokenizerFast"}
# tokenizer_config.json keys that change ids when set to anything but their default here.
_MUST_BE_FALSE = ("add_bos_token", "add_eos_token", "split_special_tokens", "add_prefix_space", "legacy_tokenizer")
_SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token")
# Qwen2Tokenizer.__init__'s defaults for the special tokens tokenizer_config.json leaves out.
_QWEN_DEFAULTS = {"bos_token": None, "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                  "pad_token": "<|endoftext|>"}


def token_text(v):
    return v.get("content") if isinstance(v, dict) else v


def _pipeline_is_qwen(tj: dict) -> str | None:
    """Why the file's pipeline differs from Qwen2Tokenizer's rebuild (None: it does not)."""
    if tj.get("normalizer") != {"type": "NFC"}:
        return "its normalizer is not NFC"
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return "its pre-tokenizer is not Qwen's split + byte-level"
    split, byte = steps
    if (split.get("type") != "Split" or split.get("pattern") != {"Regex": QWEN_SPLIT}
            or split.get("behavior") != "Isolated" or split.get("invert")):
        return "its split regex is not Qwen's"
    if byte.get("type") != "ByteLevel" or byte.get("add_prefix_space") or byte.get("use_regex"):
        return "its byte-level step differs from Qwen's"
    m = tj.get("model") or {}
    if (m.get("type") != "BPE" or m.get("dropout") is not None or m.get("fuse_unk") or m.get("byte_fallback")
            or m.get("ignore_merges") or (m.get("continuing_subword_prefix") or "")
            or (m.get("end_of_word_suffix") or "") or m.get("unk_token") is not None):
        return "its BPE model has options Qwen's has not"
    return None


class FastTokenizer:
    """The subset of a transformers tokenizer that our encoders call (tokenize.py): `__call__` on
    a list of texts without truncation, `encode`, `convert_tokens_to_ids`, the special ids and
    the sides. `backend_tokenizer` is the `tokenizers.Tokenizer` itself."""

    is_fast = True

    def __init__(self, backend, path: str, tcfg: dict):
        self.backend_tokenizer = self._tokenizer = backend
        self.name_or_path = path
        self.truncation_side = tcfg.get("truncation_side") or "right"
        self.padding_side = tcfg.get("padding_side") or "right"
        self.vocab_size = backend.get_vocab_size(with_added_tokens=False)
        for name, tok in _specials(tcfg).items():
            setattr(self, name, tok)
            setattr(self, name + "_id", None if tok is None else backend.token_to_id(tok))

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def __call__(self, text, add_special_tokens: bool = True, truncation=None, max_length=None, **_ignored):
        if truncation or max_length is not None:
            raise NotImplementedError("FastTokenizer does not truncate; tokenize whole and cut the ids")
        if isinstance(text, str):
            return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}
        encs = self.backend_tokenizer.encode_batch(list(text), add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encs]}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def convert_tokens_to_ids(self, token: str):
        tid = self.backend_tokenizer.token_to_id(token)
        return self.unk_token_id if tid is None else tid


def _specials(tcfg: dict) -> dict:
    """bos/eos/unk/pad as Qwen2Tokenizer sets them: a key absent from tokenizer_config.json takes
    the class default (unk, eos, pad: "<|endoftext|>"; bos: none); an explicit null stays none."""
    return {name: token_text(tcfg[name]) if name in tcfg else _QWEN_DEFAULTS[name] for name in _SPECIALS}


def added_tokens(tj: dict, tcfg: dict) -> tuple[dict, str | None]:
    """tokenizer.json's added tokens by id, and why transformers would build other ones from
    tokenizer_config.json's added_tokens_decoder (None: it would not). Raises on malformed entries
    (the caller reports them)."""
    added = {}
    for a in tj.get("added_tokens") or []:
        if not isinstance(a, dict) or not isinstance(a["id"], int) or not isinstance(a["content"], str):
            raise TypeError("an added token of tokenizer.json is not {id: int, content: str, ...}")
        added[a["id"]] = a
    decoder = tcfg.get("added_tokens_decoder")
    if decoder is not None:
        if not isinstance(decoder, dict):
            raise TypeError("added_tokens_decoder of tokenizer_config.json is not a mapping")
        ids = {int(sid) for sid in decoder}
        # transformers builds the added vocabulary from this list, not tokenizer.json's.
        if ids != set(added):
            return added, ("added_tokens_decoder of tokenizer_config.json lists other ids than tokenizer.json's "
                           "added_tokens")
        keys = ("content", "lstrip", "rstrip", "single_word", "normalized", "special")
        for sid, tok in decoder.items():
            if not isinstance(tok, dict):
                raise TypeError(f"added_tokens_decoder entry {sid} is not a mapping")
            a = added[int(sid)]
            if any(a.get(k) != tok.get(k) for k in keys if k in tok):
                return added, f"added token {sid} of tokenizer_config.json differs from tokenizer.json's"
    return added, None


def _added_tokens_agree(tj: dict, tcfg: dict) -> str | None:
    """Why transformers would end with another vocabulary than tokenizer.json's (None: it would
    not). Raises on malformed entries (the caller reports them)."""
    added, why = added_tokens(tj, tcfg)
    if why:
        return why
    contents = {a["content"] for a in added.values() if a.get("special")}
    for name, tok in _specials(tcfg).items():
        if tok is not None and tok not in contents:
            # transformers would add it as a new special token: not reproduced here.
            return f"{name} {tok!r} is not a special token of tokenizer.json"
    for key in ("extra_special_tokens", "additional_special_tokens"):
        extra = tcfg.get(key)
        if extra is None:
            continue
        toks = list(extra.values()) if isinstance(extra, dict) else extra
        if not isinstance(toks, list):
            raise TypeError(f"{key} of tokenizer_config.json is not a list")
        for t in toks:
            if token_text(t) not in contents:
                return f"{key} names {token_text(t)!r}, not a special token of tokenizer.json"
    return None


def load(path: str) -> tuple[FastTokenizer | None, str]:
    """(tokenizer, "") for a Qwen tokenizer directory we read exactly as transformers does;
    (None, why) otherwise."""
    tfile, cfile = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(tfile) or not os.path.isfile(cfile):
        return None, "no tokenizer.json and tokenizer_config.json"
    try:
        with open(cfile, encoding="utf-8") as f:
            tcfg = json.load(f)
        with open(tfile, encoding="utf-8") as f:
            tj = json.load(f)
    except (OSError, ValueError) as exc:
        return None, f"unreadable tokenizer files ({exc})"
    if tcfg.get("tokenizer_class") not in QWEN_CLASSES:
        return None, f"tokenizer class {tcfg.get('tokenizer_class')!r} is not Qwen's"
    if tcfg.get("auto_map") or tcfg.get("backend", "tokenizers") != "tokenizers":
        return None, "remote code or another tokenizer backend"
    if any(tcfg.get(k) for k in _MUST_BE_FALSE):
        return None, "tokenizer options we do not reproduce (" + ", ".join(k for k in _MUST_BE_FALSE if tcfg.get(k)) + ")"
    if tj.get("truncation") is not None or tj.get("padding") is not None:
        return None, "tokenizer.json sets truncation or padding"
    why = _pipeline_is_qwen(tj)
    if why:
        return None, why
    try:
        why = _added_tokens_agree(tj, tcfg)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:  # malformed entries
        why = f"malformed added tokens ({type(exc).__name__}: {exc})"
    if why:
        return None, why
    try:
        backend = Tokenizer.from_str(json.dumps(tj))
    except Exception as exc:  # a file the library cannot read: transformers will say why
        return None, f"tokenizers cannot read tokenizer.json ({exc})"
    return FastTokenizer(backend, path, tcfg), ""
