"""Turn (instruction, query, document) triples into token ids exactly as the reference recipe.

The recipe is prefix_ids + tokenizer(body, truncation='longest_first', max_length=max_length -
len(prefix_ids) - len(suffix_ids), add_special_tokens=False) + suffix_ids. For one sequence,
'longest_first' truncation keeps the first max_length tokens (or the last ones when the
tokenizer truncates on the left), so we tokenize whole and cut ourselves: the ids are the same
and we learn which pairs were truncated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import InputError, ModelError
from pipeline.engines.prefix import group_keys
from pipeline.engines.template import Template


@dataclass
class Encoded:
    """Token ids of a window of pairs, flat, with per-pair offsets (int64, len n+1)."""

    ids: np.ndarray
    offsets: np.ndarray
    truncated: np.ndarray  # bool per pair
    type_ids: np.ndarray | None = None  # token type ids, laid out as `ids` (cross-encoders)
    # Group key per pair, equal for equal (instruction, query): candidates that may share a
    # prompt prefix (prefix.py). None where sharing cannot apply (cross-encoders).
    keys: np.ndarray | None = None

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1


class PairEncoder:
    def __init__(self, tokenizer, template: Template, max_length: int):
        self.tokenizer = tokenizer
        self.template = template
        self.prefix_ids = tokenizer.encode(template.prefix, add_special_tokens=False)
        self.suffix_ids = tokenizer.encode(template.suffix, add_special_tokens=False)
        self.body_max = max_length - len(self.prefix_ids) - len(self.suffix_ids)
        if self.body_max <= 0:
            raise InputError(
                f"--max-length {max_length} leaves no room for the pair: the template alone takes "
                f"{len(self.prefix_ids) + len(self.suffix_ids)} tokens; use a larger --max-length"
            )
        self.truncate_left = getattr(tokenizer, "truncation_side", "right") == "left"
        self.positive_id = _single_token(tokenizer, template.positive)
        self.negative_id = _single_token(tokenizer, template.negative) if template.negative else None

    def encode(self, instructions, queries, documents) -> Encoded:
        bodies = [
            self.template.format_body(i, q, d) for i, q, d in zip(instructions, queries, documents)
        ]
        if bodies:
            body_ids = self.tokenizer(
                bodies, add_special_tokens=False, return_attention_mask=False, verbose=False
            )["input_ids"]
        else:
            body_ids = []
        pre = np.asarray(self.prefix_ids, dtype=np.int32)
        suf = np.asarray(self.suffix_ids, dtype=np.int32)
        n = len(body_ids)
        truncated = np.zeros(n, dtype=bool)
        pieces = []
        lengths = np.empty(n, dtype=np.int64)
        for k, ids in enumerate(body_ids):
            if len(ids) > self.body_max:
                truncated[k] = True
                ids = ids[-self.body_max:] if self.truncate_left else ids[: self.body_max]
            pieces.append(pre)
            pieces.append(np.asarray(ids, dtype=np.int32))
            pieces.append(suf)
            lengths[k] = len(pre) + len(ids) + len(suf)
        flat = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int32)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return Encoded(flat, offsets, truncated, keys=group_keys(instructions, queries))


def _single_token(tokenizer, token: str) -> int:
    ids = tokenizer.encode(token, add_special_tokens=False)
    tid = tokenizer.convert_tokens_to_ids(token)
    if len(ids) != 1 or tid is None or tid == tokenizer.unk_token_id or tid != ids[0]:
        raise ModelError(
            f"the tokenizer has no single token for {token!r}, so this model is not a yes/no "
            "reranker of this template; pass a reranker model or another --template"
        )
    return tid


class CrossEncoderEncoder:
    """Pairs as a cross-encoder's tokenizer encodes them: tokenizer(query, document,
    truncation='only_second', max_length), special tokens and token types included."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        if tokenizer.pad_token_id is None:
            raise ModelError("the tokenizer has no padding token, which padded cross-encoder batches need; "
                             "set pad_token in the model's tokenizer_config.json")
        self.positive_id = self.negative_id = None

    def encode(self, instructions, queries, documents) -> Encoded:
        n = len(queries)
        if n == 0:
            return Encoded(np.empty(0, np.int32), np.zeros(1, np.int64), np.zeros(0, bool))
        # Token types only where the tokenizer returns them by default (its model_input_names),
        # exactly as tokenizer(query, document) hands them to the model.
        kw = dict(max_length=self.max_length, return_attention_mask=False, verbose=False)
        try:
            enc = self.tokenizer(list(queries), list(documents), truncation="only_second", **kw)
        except Exception:
            # Some query alone is longer than max_length, so cutting the document cannot suffice:
            # those pairs (only those) are cut from both sides ('longest_first').
            enc = {"input_ids": [], "token_type_ids": []}
            for q, d in zip(queries, documents):
                try:
                    one = self.tokenizer(q, d, truncation="only_second", **kw)
                except Exception:
                    one = self.tokenizer(q, d, truncation="longest_first", **kw)
                enc["input_ids"].append(one["input_ids"])
                enc["token_type_ids"].append(one.get("token_type_ids"))
            if any(t is None for t in enc["token_type_ids"]):
                del enc["token_type_ids"]
        ids = enc["input_ids"]
        types = enc.get("token_type_ids")
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=n)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(offsets[-1]))
        tflat = None if types is None else np.fromiter((t for x in types for t in x), dtype=np.int8,
                                                       count=int(offsets[-1]))
        # A pair that fills max_length was (almost surely) cut.
        return Encoded(flat, offsets, lengths >= self.max_length, tflat)
