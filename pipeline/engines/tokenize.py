"""Turn (instruction, query, document) triples into token ids exactly as the reference recipe.

The recipe is prefix_ids + tokenizer(body, truncation='longest_first', max_length=max_length -
len(prefix_ids) - len(suffix_ids), add_special_tokens=False) + suffix_ids. For one sequence,
'longest_first' truncation keeps the first max_length tokens (or the last ones when the
tokenizer truncates on the left), so we tokenize whole and cut ourselves: the ids are the same
and we learn which pairs were truncated.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import string
from dataclasses import dataclass

import numpy as np

from pipeline.errors import InputError, ModelError
from pipeline.engines import doc_cut
from pipeline.engines.prefix import group_keys
from pipeline.engines.template import Template

log = logging.getLogger(__name__)


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
        self.backend = fast_backend(tokenizer)
        if self.backend is not None:
            # encode_batch_fast (tokenizers >= 0.21) skips the character offsets we never read.
            self._encode_batch = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
            # A cheap guard for what fast_backend cannot see: the two ways agree on a probe.
            probe = [template.format_body("Ünïcode  ", "q: it's 42?", " \tdoc\n\nend "), ""]
            want = tokenizer(probe, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
            got, lens = self.tokenize_bodies(probe)
            if got.tolist() != [t for ids in want for t in ids] or lens.tolist() != [len(x) for x in want]:
                log.info("tokenizer: its Rust batch call and its __call__ disagree on a probe; using __call__")
                self.backend = None
        # Documents far longer than the body can hold are cut at a word boundary first, where that
        # keeps the ids (doc_cut.py): only where the document ends the body and appears nowhere
        # else in it, so that a cut body's first body_max ids are the whole body's once it still
        # has that many.
        self._cut = (self.backend is not None and _document_ends(template.body)
                     and doc_cut.cuttable(self.backend, "left" if self.truncate_left else "right"))
        self._chars_per_token = doc_cut.CHARS_PER_TOKEN
        if self._cut:  # the same guard for the cut: a page's cut body's ids begin its whole body's
            page = doc_cut.probe_page(64)
            (cut,), _ = doc_cut.cut_long([page], 64, doc_cut.CHARS_PER_TOKEN)
            ids, lens = self.tokenize_bodies([template.format_body("i", "q", d) for d in (cut, page)])
            self._cut = len(cut) < len(page) and ids[:lens[0]].tolist() == ids[lens[0]:lens[0] * 2].tolist()
            if not self._cut:
                log.info("tokenizer: a document cut at a word boundary changed its ids on a probe; not cutting")

    def encode(self, instructions, queries, documents) -> Encoded:
        whole, cut = documents, []
        if self._cut:
            documents, cut = doc_cut.cut_long(documents, self.body_max, self._chars_per_token)
        fmt = self.template.format_body
        bodies = [fmt(i, q, d) for i, q, d in zip(instructions, queries, documents)]
        body_ids, body_lens = self.tokenize_bodies(bodies)
        # A cut body keeps its ids (and counts as truncated) where it still has more than body_max.
        again = [k for k in cut if body_lens[k] <= self.body_max]
        if again:
            # A cut that left too few tokens (very long words): tokenize the whole body.
            self._chars_per_token = doc_cut.kept_more(self._chars_per_token, len(again), len(cut))
            ids2, lens2 = self.tokenize_bodies([fmt(instructions[k], queries[k], whole[k]) for k in again])
            pieces = np.split(body_ids, np.cumsum(body_lens)[:-1])
            for k, piece in zip(again, np.split(ids2, np.cumsum(lens2)[:-1])):
                pieces[k] = piece
            body_lens[again] = lens2
            body_ids = np.concatenate(pieces) if pieces else body_ids
        flat, offsets, truncated = assemble(body_ids, body_lens, self.prefix_ids, self.suffix_ids,
                                            self.body_max, self.truncate_left)
        return Encoded(flat, offsets, truncated, keys=group_keys(instructions, queries))

    def tokenize_bodies(self, bodies: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Ids of each body (tokenized whole, no special tokens), flat int32, and their lengths.

        Fast tokenizers: the Rust backend's batch call straight away (it releases the GIL and
        runs on all cores), without transformers' per-encoding Python conversion, the same call
        tokenizer(bodies, add_special_tokens=False) makes with truncation and padding off.
        Others: that __call__."""
        if not bodies:
            return np.empty(0, np.int32), np.zeros(0, np.int64)
        backend = self.backend
        if backend is None:
            lists = self.tokenizer(bodies, add_special_tokens=False, return_attention_mask=False,
                                   verbose=False)["input_ids"]
        else:
            # As transformers' __call__ prepares the backend: no truncation or padding (a
            # tokenizer.json may configure them), special tokens split as the tokenizer says.
            if backend.truncation is not None:
                backend.no_truncation()
            if backend.padding is not None:
                backend.no_padding()
            split = bool(getattr(self.tokenizer, "split_special_tokens", False))
            if getattr(backend, "encode_special_tokens", split) != split:
                backend.encode_special_tokens = split
            lists = [e.ids for e in self._encode_batch(bodies, add_special_tokens=False)]
        lens = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        flat = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int32, count=int(lens.sum()))
        return flat, lens


def _document_ends(body: str) -> bool:
    """Whether {document} is the body's last field, as is (no conversion or format spec), with
    nothing after it, and the body reads the document nowhere else ({document:.300}, {document[0]})."""
    fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(body) if name is not None]
    reads = [f for f in fields if re.match(r"document(?![A-Za-z0-9_])", f[0])]
    return body.endswith("{document}") and reads == [("document", "", None)] and fields[-1] == reads[0]


def fast_backend(tokenizer):
    """The `tokenizers.Tokenizer` behind a fast tokenizer whose __call__ is transformers' own
    (so calling the backend gives the same ids); None for slow tokenizers, for classes that
    override the call (code_llama, layoutlm, ...), and where RERANK_TOKENIZER_BACKEND=python
    asks for the __call__."""
    if os.environ.get("RERANK_TOKENIZER_BACKEND", "rust") == "python":
        return None
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch") or not getattr(tokenizer, "is_fast", False):
        return None
    for name in ("__call__", "_encode_plus", "_batch_encode_plus"):
        fn = getattr(type(tokenizer), name, None)
        # transformers' own call, or ours (fast_tokenizer.py, cross_tokenizer.py: the loads
        # without transformers), which is that call on the same backend
        if fn is not None and not getattr(fn, "__module__", "").startswith(
                ("transformers.tokenization_utils", "pipeline.engines.fast_tokenizer",
                 "pipeline.engines.cross_tokenizer")):
            return None
    return backend


def assemble(body_ids: np.ndarray, body_lens: np.ndarray, prefix_ids, suffix_ids, body_max: int,
             truncate_left: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """prefix + body (cut to body_max tokens, from the left where the tokenizer truncates
    there) + suffix per pair, flat: (ids int32, offsets int64 len n+1, truncated bool)."""
    n = len(body_lens)
    pre = np.asarray(prefix_ids, dtype=np.int32)
    suf = np.asarray(suffix_ids, dtype=np.int32)
    truncated = body_lens > body_max
    kept = np.minimum(body_lens, body_max)
    src_start = np.zeros(n, dtype=np.int64)
    np.cumsum(body_lens[:-1], out=src_start[1:])
    if truncate_left:
        src_start += body_lens - kept
    P, S = len(pre), len(suf)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(kept + (P + S), out=offsets[1:])
    flat = np.empty(int(offsets[-1]), dtype=np.int32)
    starts = offsets[:-1]
    if P:
        flat[(starts[:, None] + np.arange(P)).reshape(-1)] = np.tile(pre, n)
    if S:
        flat[((starts + P + kept)[:, None] + np.arange(S)).reshape(-1)] = np.tile(suf, n)
    if n and kept.sum():
        flat[ranges(starts + P, kept)] = body_ids[ranges(src_start, kept)]
    return flat, offsets, truncated


def ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n)."""
    cu = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=cu[1:])
    return np.repeat(starts - cu[:-1], lens) + np.arange(int(cu[-1]), dtype=np.int64)


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
    """Pairs as a cross-encoder's tokenizer encodes them: tokenizer(queries, documents,
    truncation='only_second', max_length), special tokens and token types included; a pair whose
    query alone does not fit is cut from both sides ('longest_first').

    Fast tokenizers: the Rust backend's batch call over the pairs (GIL released, all cores), the
    call transformers makes, without its per-encoding Python conversion; a probe at construction
    checks that both give the same ids (else the tokenizer's __call__, logged)."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        if tokenizer.pad_token_id is None:
            raise ModelError("the tokenizer has no padding token, which padded cross-encoder batches need; "
                             "set pad_token in the model's tokenizer_config.json")
        self.positive_id = self.negative_id = None
        # Token types only where the tokenizer returns them by default (its model_input_names),
        # exactly as tokenizer(query, document) hands them to the model.
        self.with_types = "token_type_ids" in (getattr(tokenizer, "model_input_names", None) or ())
        self.truncation_side = getattr(tokenizer, "truncation_side", "right") or "right"
        self.backend = fast_backend(tokenizer)
        self._cut = False
        self._chars_per_token = doc_cut.CHARS_PER_TOKEN
        if self.backend is not None:
            self._encode_batch = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
            # Long documents are cut at a word boundary first where that keeps the ids (doc_cut.py).
            # (Not where the special tokens leave no room: the backend then does not truncate.)
            self._cut = (doc_cut.cuttable(self.backend, self.truncation_side)
                         and max_length > self.backend.num_special_tokens_to_add(True))
            long = " ".join(["word"] * (max_length + 4))
            page = doc_cut.probe_page(max_length // 2 + 8)  # longer than a cut keeps
            probe = (["Ünïcode  q: it's 42?", "", long, "q", "q", "[SEP] </s> x", "q", long],
                     [" \tdoc\n\nend ", "", "doc", long, "", "d", page, page])
            cut, self._cut = self._cut, False
            if not self._agrees(probe):
                log.info("tokenizer: its Rust batch call over pairs and its __call__ disagree on a probe; "
                         "using __call__")
                self.backend = None
            elif cut:
                self._cut = True
                if not self._agrees(probe):
                    log.info("tokenizer: a document cut at a word boundary changed its ids on a probe; not cutting")
                    self._cut = False

    def _agrees(self, probe) -> bool:
        """Whether the Rust batch path gives the __call__'s ids on the probe pairs."""
        try:
            return same_ids(self._encode_fast(*probe), self.encode_by_call(*probe))
        except Exception:  # one of the two failed where the other did not
            return False

    def encode(self, instructions, queries, documents) -> Encoded:
        n = len(queries)
        if n == 0:
            return Encoded(np.empty(0, np.int32), np.zeros(1, np.int64), np.zeros(0, bool))
        if self.backend is not None:
            return self._encode_fast(queries, documents)
        return self.encode_by_call(queries, documents)

    def _batch(self, pairs, strategy: str):
        b = self.backend
        want = {"max_length": self.max_length, "stride": 0, "strategy": strategy, "direction": self.truncation_side}
        t = b.truncation
        if t is None or any(t.get(k) != v for k, v in want.items()):
            b.enable_truncation(**want)
        if b.padding is not None:
            b.no_padding()
        split = bool(getattr(self.tokenizer, "split_special_tokens", False))
        if getattr(b, "encode_special_tokens", split) != split:
            b.encode_special_tokens = split
        return self._encode_batch(pairs, add_special_tokens=True)

    def _encode_fast(self, queries, documents) -> Encoded:
        whole = documents
        cut: list[int] = []
        if self._cut:
            documents, cut = doc_cut.cut_long(documents, self.max_length, self._chars_per_token)
        encs, both_sides = self._pair_encodings(queries, documents, whole)
        if cut:
            # A cut pair keeps its ids where it fills max_length with at least one token of its
            # document: its query then leaves room for the document, and truncation keeps the same
            # first tokens of the cut document as of the whole one. A cut that no longer fills the
            # pair had fewer tokens than truncation keeps (very long words); one that fills it with
            # the query alone (a document whose start gives no token, next to a query that takes all
            # the room) may hide tokens of the whole document that make truncation cut the query too.
            # Both are encoded again whole.
            done = set(both_sides)  # (cut from both sides with their documents whole already)
            again = [k for k in cut if k not in done
                     and (len(encs[k]) != self.max_length or 1 not in encs[k].sequence_ids)]
            if again:
                self._chars_per_token = doc_cut.kept_more(self._chars_per_token, len(again), len(cut))
                redo, _ = self._pair_encodings([queries[k] for k in again], [whole[k] for k in again],
                                               [whole[k] for k in again])
                for k, e in zip(again, redo):
                    encs[k] = e
        n = len(encs)
        lengths = np.fromiter(map(len, encs), dtype=np.int64, count=n)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        total = int(offsets[-1])
        flat = np.fromiter(itertools.chain.from_iterable(e.ids for e in encs), dtype=np.int32, count=total)
        tflat = None
        if self.with_types:
            tflat = np.fromiter(itertools.chain.from_iterable(e.type_ids for e in encs), dtype=np.int8, count=total)
        return Encoded(flat, offsets, lengths >= self.max_length, tflat)

    def _pair_encodings(self, queries, documents, whole) -> tuple[list, list[int]]:
        """The backend's encodings of the pairs, truncated 'only_second', and the positions of the
        pairs cut from both sides instead ('longest_first', with their documents from `whole`)."""
        pairs = list(zip(queries, documents))
        try:
            return self._batch(pairs, "only_second"), []
        except Exception:
            # Some query alone leaves no room for its document, so the batch call fails as a whole.
            # Exactly those pairs are the ones whose query takes max_length minus the special
            # tokens or more (fewer: cutting the document suffices; a pair that fits is not cut
            # by either strategy): they are cut from both sides ('longest_first'), with their
            # documents whole (a cut keeps the ids only where truncation takes the document alone).
            room = self.max_length - self.backend.num_special_tokens_to_add(True)
            if room <= 0:
                raise
            self.backend.no_truncation()
            qlens = [len(e.ids) for e in self._encode_batch(list(queries), add_special_tokens=False)]
            long = [k for k, m in enumerate(qlens) if m >= room]
            short = [k for k, m in enumerate(qlens) if m < room]
            encs = [None] * len(pairs)
            for idx, strategy in ((short, "only_second"), (long, "longest_first")):
                if idx:
                    todo = [pairs[k] if strategy == "only_second" else (queries[k], whole[k]) for k in idx]
                    for k, e in zip(idx, self._batch(todo, strategy)):
                        encs[k] = e
            return encs, long

    def encode_by_call(self, queries, documents) -> Encoded:
        """Encoded pairs by the tokenizer's own __call__ over the lists (pair by pair where the batch
        call fails): the reference the batch path is checked against."""
        n = len(queries)
        kw = dict(max_length=self.max_length, return_attention_mask=False, verbose=False)
        try:
            enc = self.tokenizer(list(queries), list(documents), truncation="only_second", **kw)
        except Exception:
            # Some query alone is longer than max_length, so cutting the document cannot suffice:
            # those pairs (only those) are cut from both sides ('longest_first'). One-element
            # lists, not strings: a single (query, "") call would encode the query alone.
            enc = {"input_ids": [], "token_type_ids": []}
            for q, d in zip(queries, documents):
                try:
                    one = self.tokenizer([q], [d], truncation="only_second", **kw)
                except Exception:
                    one = self.tokenizer([q], [d], truncation="longest_first", **kw)
                enc["input_ids"].append(one["input_ids"][0])
                t = one.get("token_type_ids")
                enc["token_type_ids"].append(None if t is None else t[0])
            if any(t is None for t in enc["token_type_ids"]):
                del enc["token_type_ids"]
        ids = enc["input_ids"]
        types = enc.get("token_type_ids") if self.with_types else None
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=n)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(offsets[-1]))
        tflat = None if types is None else np.fromiter((t for x in types for t in x), dtype=np.int8,
                                                       count=int(offsets[-1]))
        # A pair that fills max_length was (almost surely) cut.
        return Encoded(flat, offsets, lengths >= self.max_length, tflat)


def same_ids(a: Encoded, b: Encoded) -> bool:
    """Whether two encodings hold the same pairs: offsets, ids and token types."""
    return (np.array_equal(a.offsets, b.offsets) and np.array_equal(a.ids, b.ids)
            and (a.type_ids is None) == (b.type_ids is None)
            and (a.type_ids is None or np.array_equal(a.type_ids, b.type_ids)))
