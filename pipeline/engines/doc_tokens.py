"""A document's own tokens, and the text of a window of them, with the model's tokenizer.

Long documents are scored as windows (pipeline/data/chunks.py): a document is tokenized alone
with no special tokens, as `tokenizer(document, add_special_tokens=False)`, and a window's text
is `tokenizer.decode(window_ids)` (special tokens kept, the tokenizer's own clean-up). Both go
through the Rust backend in one batch call where the tokenizer is a fast one.

transformers' tokenizers decode through their own `batch_decode`. The tokenizers this project
reads without transformers (engines/fast_tokenizer.py, engines/cross_tokenizer.py) decode as the
transformers class they stand for would: the class's decoder (transformers sets it whatever
tokenizer.json says: ByteLevel for Qwen2, WordPiece "##" for BERT, Metaspace for XLM-R) and, where
tokenizer_config.json asks for it, transformers' clean-up of spaces (never for BPE models).
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import weakref

import numpy as np

from pipeline.engines.tokenize import fast_backend

_CACHE: "weakref.WeakKeyDictionary[object, DocumentTokens]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def for_tokenizer(tokenizer) -> "DocumentTokens":
    """One DocumentTokens per tokenizer object, for as long as the tokenizer lives (built once: it
    may read tokenizer_config.json)."""
    with _LOCK:
        try:
            hit = _CACHE.get(tokenizer)
        except TypeError:  # not weakly referable or not hashable: build one each time
            return DocumentTokens(tokenizer)
        if hit is None:
            hit = _CACHE[tokenizer] = DocumentTokens(tokenizer)
        return hit


class DocumentTokens:
    def __init__(self, tokenizer):
        # A weak reference: for_tokenizer's cache must not keep the tokenizer (its key) alive.
        try:
            self._tokenizer = weakref.ref(tokenizer)
        except TypeError:
            self._tokenizer = lambda: tokenizer
        self.backend = fast_backend(tokenizer)
        self._encode_batch = None
        if self.backend is not None:
            self._encode_batch = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        # Ours (no transformers behind it): decode with the class's decoder, clean up as it would.
        self.ours = type(tokenizer).__module__.startswith("pipeline.engines.")
        self.clean_up = False
        if self.ours:
            self.clean_up = _prepare_our_decoder(tokenizer)

    @property
    def tokenizer(self):
        return self._tokenizer()

    def tokenize(self, documents: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Each document's ids (alone, no special tokens), flat int32, and their lengths (int64)."""
        if not documents:
            return np.empty(0, np.int32), np.zeros(0, np.int64)
        b = self.backend
        if b is None:
            lists = self.tokenizer(list(documents), add_special_tokens=False, return_attention_mask=False,
                                   verbose=False)["input_ids"]
        else:
            # As transformers' __call__ prepares the backend (an encoder of pairs may have left
            # truncation on it): no truncation or padding, special tokens split as configured.
            if b.truncation is not None:
                b.no_truncation()
            if b.padding is not None:
                b.no_padding()
            split = bool(getattr(self.tokenizer, "split_special_tokens", False))
            if getattr(b, "encode_special_tokens", split) != split:
                b.encode_special_tokens = split
            lists = [e.ids for e in self._encode_batch(list(documents), add_special_tokens=False)]
        lens = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        flat = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int32, count=int(lens.sum()))
        return flat, lens

    def decode(self, flat: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> list[str]:
        """The text of each window flat[start:stop], as the tokenizer's decode gives it."""
        windows = [flat[a:b].tolist() for a, b in zip(starts.tolist(), stops.tolist())]
        if not windows:
            return []
        if not self.ours:
            return list(self.tokenizer.batch_decode(windows, skip_special_tokens=False))
        texts = self.backend.decode_batch(windows, skip_special_tokens=False)
        return [clean_up_tokenization(t) for t in texts] if self.clean_up else list(texts)


def clean_up_tokenization(text: str) -> str:
    """transformers' PreTrainedTokenizerBase.clean_up_tokenization."""
    return (text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",").replace(" ' ", "'")
            .replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s").replace(" 've", "'ve")
            .replace(" 're", "'re"))


def _prepare_our_decoder(tokenizer) -> bool:
    """Give the backend of a tokenizer read without transformers the decoder transformers' class
    sets; return whether transformers would clean up the decoded spaces."""
    from tokenizers import decoders

    from pipeline.engines import cross_tokenizer

    backend = tokenizer.backend_tokenizer
    tcfg = {}
    path = getattr(tokenizer, "name_or_path", None)
    if path:
        try:
            with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
                tcfg = json.load(f)
        except (OSError, ValueError):
            tcfg = {}
    cls = tcfg.get("tokenizer_class")
    how = cross_tokenizer.CLASSES.get(cls, ("file",))[0]
    if type(tokenizer).__name__ == "FastTokenizer":  # Qwen2Tokenizer
        backend.decoder = decoders.ByteLevel()
    elif how == "bert":
        backend.decoder = decoders.WordPiece(prefix="##")
    elif how == "xlmr":
        scheme = "always" if tcfg.get("add_prefix_space", True) else "never"
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)
    # transformers skips the clean-up for BPE models, which it would corrupt.
    bpe = type(backend.model).__name__ == "BPE"
    return bool(tcfg.get("clean_up_tokenization_spaces", False)) and not bpe
