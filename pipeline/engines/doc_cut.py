"""Long documents cut at a word boundary before the tokenizer reads them.

A cross-encoder keeps at most max_length tokens of a pair, but the tokenizer reads the whole
document before truncation drops the rest: a 40,000-character page costs its full tokenization
for the 500 tokens kept. (The Qwen3 recipe's body, which ends with the document, is cut the same
way: tokenize.PairEncoder.) Here a document much longer than max_length tokens could need is cut
first, just before a space that follows a letter or digit, about CHARS_PER_TOKEN characters per
token of max_length in. For the tokenizers this accepts, the ids of the text before such a cut
are the first ids of the whole text's:

  - normalizers that act on each character alone (Unicode forms, lower-casing, accents, BERT's
    clean-up, SentencePiece's precompiled map) or collapse runs of spaces;
  - pre-tokenizers that split at spaces first (BERT's, whitespace, SentencePiece's Metaspace
    with split, GPT-2-style byte-level with its regex, the Qwen and Llama 3 split patterns), so
    that no pre-token spans the cut and every model (WordPiece, Unigram, BPE) encodes the words
    before it as before; a step that maps the space away (Metaspace without split, byte-level
    without its regex) only after that split;
  - no added token that holds a space, as written or once normalized (which could match across
    the cut).

The pair call then truncates the cut document as it would the whole one, when the cut leaves at
least the tokens truncation keeps: that is exactly when the pair still fills max_length with at
least one token of the document (only the document is cut: 'only_second'). A cut pair that comes
out shorter is encoded again with the whole document (text with very long words), and the
encoder then keeps more characters from its next cuts; so is one filled by its query alone (a
document whose start gives no token: the whole one may have tokens that make truncation cut the
query too). `cuttable` decides per tokenizer, once.
"""

from __future__ import annotations

import json

# Characters kept per token of max_length, to start with: English runs at about 4-7 characters
# a token (more with larger vocabularies), code and numbers at fewer. An encoder whose cuts come
# out too short (text of long words: URLs, base64, a vocabulary of whole words) raises its own
# figure (tokenize.CrossEncoderEncoder), up to MAX_CHARS_PER_TOKEN.
CHARS_PER_TOKEN = 8
MAX_CHARS_PER_TOKEN = 64

_CHAR_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "BertNormalizer", "Precompiled", "StripAccents",
                     "Strip", "Prepend", "Nmt"}
# Pre-tokenizers that only split further or map characters: fine after a split at spaces.
_FURTHER = {"Punctuation", "Digits", "UnicodeScripts"}
# Split patterns known to keep every pre-token within a word and its leading space.
_WORD_PATTERNS = {
    # Qwen2 / Qwen3
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
    "\\s+(?!\\S)|\\s+",
    # Llama 3
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    # GPT-2
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+",
}


def cuttable(backend, truncation_side: str = "right") -> bool:
    """Whether documents may be cut before `backend` (a tokenizers.Tokenizer) encodes them."""
    if truncation_side != "right":
        return False
    try:
        norm = backend.normalizer
        pre = backend.pre_tokenizer
        normalizer = json.loads(norm.__getstate__()) if norm is not None else None
        pre_tokenizer = json.loads(pre.__getstate__()) if pre is not None else None
        # Added tokens are matched before the pre-tokenizer splits, the normalized ones on the
        # normalized text, as their normalized form (Nmt and SentencePiece's map turn U+200B into a
        # space, NFKC turns U+00B4 into a space and an accent): both forms must be free of spaces.
        added = []
        for t in backend.get_added_tokens_decoder().values():
            added.append(t.content)
            if t.normalized and norm is not None:
                added.append(norm.normalize_str(t.content))
    except Exception:  # a tokenizers version that hides these: do not guess
        return False
    if any(c.isspace() for t in added for c in t):
        return False
    return _normalizer_ok(normalizer) and _splits_at_spaces(pre_tokenizer)


def _normalizer_ok(n) -> bool:
    if n is None:
        return True
    kind = n.get("type")
    if kind == "Sequence":
        return all(_normalizer_ok(x) for x in n.get("normalizers") or [])
    if kind == "Replace":  # collapsing runs of spaces (XLM-R) only
        return n.get("pattern") in ({"Regex": " {2,}"}, {"String": "  "})
    return kind in _CHAR_NORMALIZERS


def _splits_at_spaces(p) -> bool:
    """True where the steps split at spaces before anything could join characters across one."""
    if p is None:
        return False  # the whole text is one pre-token: a BPE merge may cross the cut
    steps = p.get("pretokenizers") if p.get("type") == "Sequence" else [p]
    split = False
    for s in steps or []:
        kind = s.get("type")
        if kind in ("BertPreTokenizer", "Whitespace", "WhitespaceSplit"):
            split = True
        elif kind in ("Metaspace", "ByteLevel"):
            # Both map the space to another character ('▁', 'Ġ'): one that does not split there
            # itself, before anything has, leaves no space for a later step to split at.
            split = split or bool(s.get("split" if kind == "Metaspace" else "use_regex", True))
            if not split:
                return False
        elif kind == "Split":
            pattern = (s.get("pattern") or {}).get("Regex")
            if pattern not in _WORD_PATTERNS or s.get("behavior") != "Isolated" or s.get("invert"):
                return False
            split = True
        elif kind not in _FURTHER or not split:
            return False
    return split


# Letters of grapheme class Prepend: one and the space after it are a single grapheme, which
# SentencePiece's map (Precompiled) may replace as a whole, space included, by the letter's value.
_PREPEND = frozenset("\u0d4e\U000111c2\U000111c3\U0001193f\U00011941\U00011a3a\U00011a84\U00011a85\U00011a86"
                     "\U00011a87\U00011a88\U00011a89\U00011d46\U00011f02\U000113d1")


def cut_point(text: str, start: int) -> int | None:
    """The first position at or after `start` that holds a space following a letter or digit
    (None: none within max(start, 256) characters: a text without such spaces is kept whole)."""
    end = start + max(start, 256)
    p = text.find(" ", start, end)
    while p != -1:
        c = text[p - 1]
        if c.isalnum() and c not in _PREPEND:
            return p
        p = text.find(" ", p + 1, end)
    return None


def cut_long(documents, max_length: int, chars_per_token: float = CHARS_PER_TOKEN) -> tuple[list, list[int]]:
    """`documents` with those much longer than max_length tokens could need cut, about
    `chars_per_token` characters a token in (a new list, or the same one where none is cut), and
    the positions of the cut ones."""
    keep = int(max_length * chars_per_token)
    longer = keep + keep // 4  # below this a cut saves too little to be worth a check
    cut: list[int] = []
    out = documents
    for i, d in enumerate(documents):
        if d is not None and len(d) > longer:
            p = cut_point(d, keep)
            if p is not None:
                if out is documents:
                    out = list(documents)
                out[i] = d[:p]
                cut.append(i)
    return out, cut


def kept_more(chars_per_token: float, again: int, cut: int) -> float:
    """The characters a token an encoder keeps from its next cuts, after `again` of its `cut`
    documents came out too short: more where that was more than one in 20."""
    if again * 20 > cut:
        return min(MAX_CHARS_PER_TOKEN, chars_per_token * 1.5)
    return chars_per_token


def probe_page(words: int) -> str:
    """A page for the encoders' checks of the cut: words of every kind, runs of spaces, new lines."""
    return " ".join(f"Wörd{i}, ünïcode  x{i % 7}\n\n(42.{i})" for i in range(words))
