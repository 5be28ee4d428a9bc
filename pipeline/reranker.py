"""Reranking inside Python, a drop-in for sentence-transformers' CrossEncoder.

    from pipeline import Reranker
    reranker = Reranker("Qwen/Qwen3-Reranker-0.6B", device="cuda")
    scores = reranker.predict([("what is a cat?", "A cat is a small feline."), ...])
    hits = reranker.rank("what is a cat?", documents, top_k=3, return_documents=True)

The model loads once. Scoring runs the engine of `rerank-batch run` (pipeline.engines.score.load_engine:
length sorting, token budgets, packed batches, OOM split) over windows of `window_pairs` pairs, so
the scores equal those of `rerank-batch run` on the same pairs and options. `predict` and `rank`
take CrossEncoder's arguments with their meaning; `batch_size` is accepted and has no effect,
since the token budget (`max_batch_tokens`) sizes the batches.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

from pipeline.config import RunConfig
from pipeline.data.chunks import Chunking
from pipeline.engines.model_files import resolve_model
from pipeline.engines.resolve import inspect_model
from pipeline.engines.score import activate, engine_from_model, load_engine
from pipeline.errors import InputError
from pipeline.runtime.progress import Progress

log = logging.getLogger(__name__)

# RunConfig fields that only concern files (the run's score cache among them); a Reranker takes them
# (same options), but they do nothing.
_FILE_FIELDS = {"inputs", "output", "query_col", "doc_col", "docs_col", "instruction_col", "top_k", "on_null",
                "checkpoint_dir", "keep_checkpoint", "restart", "overwrite", "output_file_rows", "commit_every",
                "chunk_scores", "cache"}
# RunConfig fields of the executors: a Reranker scores in this process on one device, so it takes
# them at their defaults only (an options dict shared with `run` still works), and refuses the rest.
_EXECUTOR_FIELDS = {"executor", "devices", "ray_address", "workers", "gpus_per_worker", "cpus_per_worker"}


class Reranker:
    """A loaded reranker. `options` are RunConfig's that apply to scoring (device, dtype,
    max_length, template, instruction, family, activation, gpu_memory_limit, max_batch_tokens,
    attention, engine, ...). `activation_fn`: as CrossEncoder's, the default of predict's and
    rank's `activation_fn` (None: the score of `rerank-batch run`)."""

    def __init__(self, model: str = "Qwen/Qwen3-Reranker-0.6B", *, activation_fn: Callable | None = None,
                 **options):
        fields = {f.name: f for f in dataclasses.fields(RunConfig)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            takes = sorted(set(fields) - _FILE_FIELDS - _EXECUTOR_FIELDS - {"model"} | {"activation_fn"})
            raise TypeError(f"Reranker() got unknown options {', '.join(unknown)}; it takes: {', '.join(takes)}")
        for name in sorted(_EXECUTOR_FIELDS & set(options)):
            if options[name] != fields[name].default:
                raise TypeError(f"Reranker({name}={options[name]!r}): a Reranker scores in this process on one "
                                f"device; {name} is an option of `rerank-batch run` (pipeline.run.run); pass "
                                "device='cuda:N' here")
        if "device" in options and options["device"] is None:
            options["device"] = "auto"  # CrossEncoder's device=None: the best one there is
        options = {k: v for k, v in options.items() if k not in ("inputs", "output", "chunk_scores")}
        _check_chunking(options.get("chunk_tokens"), options.get("chunk_overlap"), options.get("aggregate"))
        self.config = RunConfig(inputs=(), output="", model=resolve_model(model), **options)
        self.kind = inspect_model(self.config)
        self.activation_fn = activation_fn
        # Logits, not scores: predict applies the activation (the run's, or the caller's activation_fn).
        self.scorer = load_engine(self.config, self.kind, logits=True)
        if activation_fn is None:
            self._warn_if_cross_encoder_differs()
        log.debug("%r: batch budget %d tokens", self, self.scorer.token_budget)

    @property
    def device(self):
        return torch.device(self.scorer.info.device)

    @property
    def num_labels(self) -> int:
        """Logits per pair that `activation_fn` sees, as CrossEncoder.num_labels: 1 for yes-no
        models (logit yes minus logit no) and one-logit heads, 2 for two-label heads."""
        return self.kind.num_labels or 1

    @classmethod
    def from_model(cls, model, tokenizer, /, *, activation_fn: Callable | None = None, **options) -> "Reranker":
        """A Reranker over a model already built in memory, with its tokenizer (the benchmark's
        random-weight models); `options` as Reranker's (`model=` names it in messages)."""
        self = cls.__new__(cls)
        options = {k: v for k, v in options.items() if k not in ("inputs", "output", "chunk_scores")}
        _check_chunking(options.get("chunk_tokens"), options.get("chunk_overlap"), options.get("aggregate"))
        self.config = RunConfig(inputs=(), output="", **options)
        self.activation_fn = activation_fn
        self.scorer = engine_from_model(model, tokenizer, self.config, logits=True)
        self.kind = self.scorer.info.kind
        return self

    def predict(self, pairs, batch_size: int = 32, show_progress_bar: bool | None = None,
                activation_fn: Callable | None = None, apply_softmax: bool = False,
                convert_to_numpy: bool = True, convert_to_tensor: bool = False, *,
                chunk_tokens: int | None = None, chunk_overlap: int | None = None, aggregate: str | None = None):
        """Scores of (query, document) pairs or (query, document, instruction) triples, in input
        order; an instruction of None takes the `instruction` option. As CrossEncoder.predict:

        - a list or tuple of strings is one pair, and gives one score instead of an array;
        - by default a float32 array with one score per pair, the score of `rerank-batch run`;
        - `activation_fn`: a callable applied to the raw logits, a float32 tensor of shape
          (pairs, num_labels) on the model's device; one-label results are squeezed to (pairs,);
        - `apply_softmax`: softmax over the labels of a two-label model, shape (pairs, 2); no
          effect on one-label models;
        - `convert_to_tensor`: a torch tensor on the model's device; `convert_to_numpy=False`:
          a list of tensors;
        - `batch_size` is checked but sizes nothing: the token budget (`max_batch_tokens`) does;
        - `show_progress_bar=None`: a bar when this module logs at INFO or below;
        - `chunk_tokens=N` (with `chunk_overlap`, `aggregate`: as `rerank-batch run`'s options,
          defaulting to this Reranker's): each document is scored as windows of N of its own
          tokens, and its score is their max, first or mean (one score per window needed).
        """
        return self._predict(pairs, batch_size, show_progress_bar, activation_fn, apply_softmax, convert_to_numpy,
                             convert_to_tensor, self._chunking(chunk_tokens, chunk_overlap, aggregate))[0]

    def _chunking(self, tokens, overlap, aggregate):
        """The windows a call asks for: its own options, else this Reranker's (None: whole documents)."""
        c = self.config
        if tokens is None and c.chunk_tokens is not None:
            tokens = c.chunk_tokens
            overlap = c.chunk_overlap if overlap is None else overlap
        _check_chunking(tokens, overlap, aggregate)
        return Chunking.make(tokens, overlap, aggregate or (c.aggregate if tokens is not None else None))

    def _predict(self, pairs, batch_size, show_progress_bar, activation_fn, apply_softmax, convert_to_numpy,
                 convert_to_tensor, chunking):
        """(predict's result, (windows per pair, best window) or None)."""
        _check_batch_size("predict", batch_size)
        single, pairs = _one_or_many(pairs)
        instructions, queries, documents = self._split(pairs, single)
        if not queries:
            empty = torch.empty(0, dtype=torch.float32, device=self.device)
            return (empty if convert_to_tensor else empty.cpu().numpy() if convert_to_numpy else []), None
        if show_progress_bar is None:
            show_progress_bar = log.getEffectiveLevel() <= logging.INFO
        logits, counts = self._logits(instructions, queries, documents, show_progress_bar, chunking)
        head = torch.from_numpy(logits).to(self.device)
        fn = activation_fn if activation_fn is not None else self.activation_fn
        if fn is None and not (apply_softmax and self.num_labels > 1):
            scores = activate(head, self.config.activation)  # exactly what `run` computes
        else:
            scores = self._ce_logits(head)
            if fn is not None:
                scores = fn(scores)
                if not isinstance(scores, torch.Tensor):
                    raise TypeError(f"activation_fn returned {type(scores).__name__}, not a torch.Tensor; pass a "
                                    "torch callable such as torch.sigmoid or torch.nn.Identity()")
                if scores.ndim == 0 or scores.shape[0] != head.shape[0]:  # one score per pair, in order
                    raise TypeError(f"activation_fn returned shape {tuple(scores.shape)} for {head.shape[0]} pairs; "
                                    "pass an elementwise callable such as torch.sigmoid or torch.nn.Identity()")
            if self.num_labels == 1 and scores.ndim > 1:
                scores = scores.squeeze(-1)
            if apply_softmax and scores.ndim > 1:
                scores = torch.softmax(scores, dim=1)
        windows = None
        if chunking is not None:
            if scores.ndim != 1:
                raise InputError(f"predict(chunk_tokens={chunking.tokens}): a document's score aggregates one score "
                                 f"per window, and this activation_fn or apply_softmax gives {scores.shape[1]}; pass "
                                 "one that returns a score per pair, or score whole documents")
            from pipeline.data.chunks import aggregate

            row, best = aggregate(scores.float().cpu().numpy(), counts, chunking.aggregate)
            scores = torch.from_numpy(row).to(self.device)
            windows = (counts, best)
        if convert_to_tensor:
            out = scores
        elif convert_to_numpy:
            out = scores.float().cpu().numpy()
        else:
            out = list(scores)
        return (out[0] if single else out), windows

    def _logits(self, instructions, queries, documents, show_progress_bar: bool, chunking=None):
        """The engine's head logits, (pairs, 1 or 2) float32, in input order; with `chunking`, one
        row per window of each document (windows of `window_pairs` documents expanded at a time,
        as `run` expands a unit) and the number of windows per document (else None)."""
        prog = None
        if show_progress_bar:
            from pipeline.runtime.progress import Progress

            prog = Progress(len(queries) if chunking is None else None, bar=True)
        step = self.config.window_pairs  # the sort window of `run`: same batches, same scores
        parts, counts = [], []
        try:
            for start in range(0, len(queries), step):
                stop = min(len(queries), start + step)
                instr, qs, docs = instructions[start:stop], queries[start:stop], documents[start:stop]
                if chunking is not None:
                    from pipeline.data.chunks import expand_texts
                    from pipeline.engines.doc_tokens import for_tokenizer

                    docs, k = expand_texts(docs, chunking, for_tokenizer(self.scorer.encoder.tokenizer))
                    reps = k.tolist()
                    instr = [x for x, n in zip(instr, reps) for _ in range(n)]
                    qs = [x for x, n in zip(qs, reps) for _ in range(n)]
                    counts.append(k)
                enc = self.scorer.encoder.encode(instr, qs, docs)
                parts.append(self.scorer.score(enc, on_batch=prog.update if prog else None))
        finally:
            if prog is not None:
                prog.close()
        return np.concatenate(parts), (np.concatenate(counts) if chunking is not None else None)

    def _warn_if_cross_encoder_differs(self) -> None:
        """Code moved over from CrossEncoder expects its default scores; where they are not ours
        (a config naming Identity, as the ms-marco MiniLM models do, or two labels), say how to get them."""
        theirs = _cross_encoder_default(self.config.model, self.num_labels, self.config.trust_remote_code)
        if self.num_labels == 1:
            ours = "torch.nn.Sigmoid()" if self.config.activation == "auto" else "torch.nn.Identity()"
            if theirs == ours:
                return
            what = "the raw logit" if ours == "torch.nn.Identity()" else "the sigmoid of the logit"
        else:
            what = ("the softmax's second label" if self.config.activation == "auto"
                    else "the log-odds second label minus first") + ", one score per pair"
        log.warning("model %s: sentence-transformers' CrossEncoder applies %s to its logits by default, Reranker "
                    "gives the score of `rerank-batch run` (%s); pass activation_fn=%s for CrossEncoder's scores",
                    self.config.model, theirs, what, theirs)

    def _ce_logits(self, head):
        """The logits CrossEncoder's activation_fn gets: a yes-no model's one column is logit yes
        minus logit no (its LogitScore; logit yes alone when the template has no negative); a
        classification head's logits as they are."""
        if self.kind.family == "yes-no" and head.shape[1] == 2:
            return head[:, 1:] - head[:, :1]
        return head

    def rank(self, query: str, documents: Sequence[str], top_k: int | None = None, return_documents: bool = False,
             batch_size: int = 32, show_progress_bar: bool | None = None, activation_fn: Callable | None = None,
             apply_softmax: bool = False, convert_to_numpy: bool = True, convert_to_tensor: bool = False, *,
             instruction: str | None = None, chunk_tokens: int | None = None, chunk_overlap: int | None = None,
             aggregate: str | None = None) -> list[dict]:
        """`[{"corpus_id": i, "score": s}, ...]` best first (ties keep input order), the best
        `top_k` only when given, with `"text"` when `return_documents`; scores are Python floats.
        `activation_fn` and `batch_size` as in predict; `apply_softmax`, `convert_to_numpy` and
        `convert_to_tensor` are accepted and change nothing (as in CrossEncoder.rank). With
        windows (`chunk_tokens`, as in predict) each hit also has `"chunks"` (the document's
        windows) and `"best_chunk"` (0-based, the first of the best)."""
        if isinstance(documents, str):
            raise InputError("rank(query, documents): documents is one string; pass a list of documents")
        documents = list(documents)
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise InputError(f"rank(top_k={top_k!r}): pass a whole number of at least 1, or None for all")
        _check_batch_size("rank", batch_size)
        scores, windows = self._predict([(query, d, instruction) for d in documents], 32, show_progress_bar,
                                        activation_fn, False, True, False,
                                        self._chunking(chunk_tokens, chunk_overlap, aggregate))
        if scores.ndim != 1:
            fn = activation_fn if activation_fn is not None else self.activation_fn
            raise InputError(f"rank(activation_fn={fn!r}): it gives {scores.shape[1]} scores per "
                             "document and rank orders by one; pass one that returns a score per pair "
                             "(e.g. lambda x: x[:, 1]), or use predict")
        order = np.argsort(-scores, kind="stable")
        if top_k is not None:
            order = order[:top_k]
        hits = []
        for i in order:
            hit = {"corpus_id": int(i), "score": float(scores[i])}
            if windows is not None:
                hit["chunks"], hit["best_chunk"] = int(windows[0][i]), int(windows[1][i])
            if return_documents:
                hit["text"] = documents[i]
            hits.append(hit)
        return hits

    def _split(self, pairs, single: bool = False) -> tuple[list[str], list[str], list[str]]:
        default = self.config.instruction
        instructions, queries, documents = [], [], []
        for k, p in enumerate(pairs):
            where = "pair" if single else f"pairs[{k}]"
            if isinstance(p, np.ndarray):
                p = p.tolist()
            if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or len(p) not in (2, 3):
                got = f"a {type(p).__name__} of {len(p)}" if isinstance(p, (list, tuple)) else type(p).__name__
                raise InputError(f"{where}: expected (query, document) or (query, document, instruction), "
                                 f"got {got}")
            q, d = p[0], p[1]
            i = p[2] if len(p) == 3 else None
            for name, v in (("query", q), ("document", d)):
                if not isinstance(v, str):
                    raise InputError(f"{where}: the {name} is {type(v).__name__}, not a string; "
                                     "give text (an empty string is a valid pair)")
                _check_encodable(v, where, name)
            if i is not None and not isinstance(i, str):
                raise InputError(f"{where}: the instruction is {type(i).__name__}, not a string or None")
            if i is not None:
                _check_encodable(i, where, "instruction")
            instructions.append(default if i is None else i)
            queries.append(q)
            documents.append(d)
        return instructions, queries, documents

    def __repr__(self) -> str:
        return (f"Reranker({self.config.model!r}, family={self.kind.family!r}, device={str(self.device)!r}, "
                f"engine={self.scorer.info.forward!r})")


def _one_or_many(pairs) -> tuple[bool, object]:
    """(single, pairs as a batch). As CrossEncoder.predict: a list or tuple whose first item is not
    itself a list or tuple (or array) is one pair, and so is a 1-D numpy array of strings."""
    if isinstance(pairs, (str, bytes)):
        raise InputError("predict(pairs): got one string; pass a (query, document) pair or a list of them")
    if isinstance(pairs, np.ndarray) and pairs.dtype.kind in "UO":
        if pairs.size == 0:
            return False, []
        return (True, [pairs.tolist()]) if pairs.ndim < 2 else (False, pairs.tolist())
    if isinstance(pairs, (list, tuple)) and pairs and not isinstance(pairs[0], (list, tuple, np.ndarray)):
        return True, [pairs]
    return False, pairs


def _cross_encoder_default(model_dir: str, num_labels: int, trust_remote_code: bool) -> str:
    """The activation sentence-transformers' CrossEncoder applies by default to this model, as a
    call ("torch.nn.Sigmoid()"): the one its files name, first found of
    config_sentence_transformers.json's `activation_fn` (version 6), config.json's
    `sentence_transformers.activation_fn` (4 and 5) or `sbert_ce_default_activation_function`
    (before 4), a path outside torch only with trust_remote_code; else Sigmoid for one label,
    Identity for more."""

    def read(name: str) -> dict:
        try:
            with open(os.path.join(model_dir, name), encoding="utf-8") as f:
                got = json.load(f)
        except (OSError, ValueError):
            return {}
        return got if isinstance(got, dict) else {}

    config = read("config.json")
    st = config.get("sentence_transformers")
    named = (read("config_sentence_transformers.json").get("activation_fn"),
             st.get("activation_fn") if isinstance(st, dict) else None,
             config.get("sbert_ce_default_activation_function"))
    name = next((n for n in named if isinstance(n, str) and (n.startswith("torch.") or trust_remote_code)),
                "torch.nn.Sigmoid" if num_labels == 1 else "torch.nn.Identity")
    if name.startswith("torch.nn."):  # torch.nn.modules.linear.Identity is torch.nn.Identity
        name = "torch.nn." + name.rsplit(".", 1)[-1]
    return name + "()"


def _check_encodable(text: str, where: str, name: str) -> None:
    """A lone surrogate (from text decoded with errors="surrogateescape", or cut mid-pair) has no
    UTF-8 form: the tokenizer would fail on it with a TypeError naming no pair."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{where}: the {name} is not valid Unicode text (a lone surrogate at character "
                         f"{exc.start}); decode the text as UTF-8, or drop such characters") from None


def _check_chunking(tokens, overlap, aggregate) -> None:
    """The chunking checks of `rerank-batch run`, named as keywords."""
    from pipeline.data.chunks import KEYWORDS, check_options

    check_options(tokens, overlap, aggregate, names=KEYWORDS)


def _check_batch_size(method: str, batch_size) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InputError(f"{method}(batch_size={batch_size!r}): pass a whole number of at least 1 (it sizes "
                         "nothing here: the token budget, max_batch_tokens=, does)")
