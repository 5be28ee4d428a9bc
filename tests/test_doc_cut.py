"""Long documents cut at a word boundary before a cross-encoder tokenizes them (doc_cut.py): the
pairs' ids and token types stay transformers' own, token for token, for the three tokenizer kinds
on long pages of real text and of text built to break a careless cut (runs of spaces, new lines,
punctuation before spaces, CJK, words longer than a cut keeps); a tokenizer the cut could change
is refused."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer

from conftest import real_pairs
from pipeline.engines import cross_tokenizer, doc_cut
from pipeline.engines.tokenize import CrossEncoderEncoder
from test_crossencoder_tokenize import STYLES, _reference, _split, tokenizers_dirs  # noqa: F401 (fixture)


def _pages():
    t = real_pairs(200)
    docs = t.column("document").to_pylist()
    rng = np.random.default_rng(0)
    pages = []
    for n in (150, 400, 1000):  # real documents joined into pages of a few to tens of thousands of characters
        pick = rng.choice(len(docs), n)
        pages.append(" ".join(docs[i] for i in pick))
    pages += [
        " ".join(["word,  spaced\t\ttext\n\nnew paragraph."] * 600),
        "".join(f"x{i}. " for i in range(4000)),  # a space after punctuation at every step
        " ".join(["日本語のテキストと English が混ざった文章です。"] * 400),
        " ".join(["https://example.com/" + "a" * 300] * 60),  # words longer than a cut keeps
        "Ünïcode ﬁ café  naïve\u00a0x " * 800,
        "[SEP] </s> <s> [CLS] text " * 800,
    ]
    return pages


def _counting(monkeypatch):
    calls = {"cut": 0}
    real_cut = doc_cut.cut_long

    def cut_long(documents, max_length, *rest):
        out, cut = real_cut(documents, max_length, *rest)
        calls["cut"] += len(cut)
        return out, cut

    monkeypatch.setattr(doc_cut, "cut_long", cut_long)
    return calls


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("max_length", [512, 64, 9])
def test_cut_pages_give_transformers_ids(tokenizers_dirs, style, max_length, monkeypatch):  # noqa: F811
    ours, why = cross_tokenizer.load(tokenizers_dirs[style])
    assert ours is not None, why
    ref = AutoTokenizer.from_pretrained(tokenizers_dirs[style])
    pages = _pages()
    queries = ["what happens after the impact", "", "日本語", "a much longer query " * 3] * (len(pages) // 4 + 1)
    queries = queries[:len(pages)]
    want_ids, want_types = _reference(ref, queries, pages, max_length)
    expected = len(doc_cut.cut_long(pages, max_length)[1])
    assert expected >= len(pages) - 2  # not the page with no letter or digit before a space, nor (short
    # windows) the page of long words
    encoders = [CrossEncoderEncoder(tok, max_length) for tok in (ours, ref)]
    calls = _counting(monkeypatch)
    for enc in encoders:
        assert enc.backend is not None and enc._cut, style
        e = enc.encode([None] * len(pages), queries, pages)
        got = [_split(e, k) for k in range(len(pages))]
        assert [g[0] for g in got] == want_ids
        if style == "bert":
            assert [g[1] for g in got] == want_types
        assert e.truncated.tolist() == [len(x) >= max_length for x in want_ids]
    assert calls["cut"] == 2 * expected  # the pages were cut (for both tokenizers), not tokenized whole


def test_a_cut_too_short_is_encoded_whole(tokenizers_dirs):  # noqa: F811
    """Words longer than a cut keeps (a page of long URLs) leave fewer tokens than the pair needs:
    the pair is encoded again from the whole document, with the same ids as without a cut, and
    the encoder keeps more characters from then on."""
    tok, _ = cross_tokenizer.load(tokenizers_dirs["bert"])
    page = " ".join(["https://example.com/" + "a" * 300] * 60)
    enc = CrossEncoderEncoder(tok, 512)
    cut, _ = doc_cut.cut_long([page], 512)
    assert len(cut[0]) < len(page)
    short = enc.backend.encode(cut[0], add_special_tokens=False)
    assert len(short.ids) < 512  # the cut alone would not fill the pair
    got = enc.encode([None], ["q"], [page])
    assert enc._chars_per_token > doc_cut.CHARS_PER_TOKEN  # its next cuts keep more
    enc._cut = False
    want = enc.encode([None], ["q"], [page])
    assert got.ids.tolist() == want.ids.tolist() and len(got.ids) == 512


def _backend(normalizer=None, pre_tokenizer=None, added=()):
    t = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    if normalizer is not None:
        t.normalizer = normalizer
    if pre_tokenizer is not None:
        t.pre_tokenizer = pre_tokenizer
    if added:
        t.add_tokens(list(added))
    return t


def test_cuttable_accepts_splits_at_spaces_and_refuses_the_rest():
    ok = [
        _backend(normalizers.BertNormalizer(), pre_tokenizers.BertPreTokenizer()),
        _backend(normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]),
                 pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()])),
        _backend(None, pre_tokenizers.ByteLevel(add_prefix_space=False)),
        _backend(normalizers.NFC(), pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(sorted(doc_cut._WORD_PATTERNS)[0]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])),
    ]
    assert all(doc_cut.cuttable(b) for b in ok)
    refused = [
        _backend(None, None),  # the whole text is one pre-token
        _backend(None, pre_tokenizers.ByteLevel(use_regex=False)),  # maps bytes, splits nothing
        _backend(None, pre_tokenizers.Metaspace(split=False)),
        _backend(None, pre_tokenizers.Split(Regex("\\w+ \\w+"), behavior="isolated")),  # an unknown pattern
        _backend(normalizers.Replace("a b", "c"), pre_tokenizers.WhitespaceSplit()),  # joins across a space
        _backend(None, pre_tokenizers.WhitespaceSplit(), added=["new york"]),  # an added token with a space
        _backend(None, pre_tokenizers.Sequence([pre_tokenizers.Punctuation(), pre_tokenizers.WhitespaceSplit()])),
    ]
    assert not any(doc_cut.cuttable(b) for b in refused)
    assert not doc_cut.cuttable(ok[0], truncation_side="left")
    # what a refusal rests on is the tokenizer's own description of itself
    assert json.loads(ok[1].pre_tokenizer.__getstate__())["type"] == "Sequence"


def test_cut_points_follow_a_letter_or_digit():
    text = "ab. cd  ef, gh ij"
    assert doc_cut.cut_point(text, 3) == 6  # not after "."
    assert doc_cut.cut_point(text, 7) == 14  # not inside a run of spaces, nor after ","
    assert doc_cut.cut_point("a" * 50 + " b", 10) == 50
    assert doc_cut.cut_point("a" * 600 + " b", 10) is None  # none near enough
    docs = ["short", "x " * 4000, None]
    out, cut = doc_cut.cut_long(docs, 100)
    assert cut == [1] and out[0] == "short" and out[2] is None and docs[1] == "x " * 4000
    assert out[1].endswith("x") and len(out[1]) == 100 * doc_cut.CHARS_PER_TOKEN + 1
    same, none = doc_cut.cut_long(["short"], 100)
    assert none == [] and same == ["short"]


@pytest.mark.parametrize("max_length", [1024, 200])
def test_qwen3_bodies_with_cut_documents_give_the_recipe_ids(max_length, monkeypatch):
    """The Qwen3 recipe tokenizes the whole body and keeps its first tokens: a document cut at a
    word boundary gives the same ids and the same truncated flags."""
    from test_tokenize_fast import SAMPLE, _recipe
    from pipeline.engines.template import BGE_RERANKER_V2_GEMMA, QWEN3_RERANKER
    from pipeline.engines.tokenize import PairEncoder

    tok = AutoTokenizer.from_pretrained(SAMPLE)
    pages = _pages()
    n = len(pages)
    cols = (["Given a web search query, retrieve relevant passages"] * n, ["what happens after the impact"] * n, pages)
    enc = PairEncoder(tok, QWEN3_RERANKER, max_length)
    assert enc._cut
    calls = _counting(monkeypatch)
    e = enc.encode(*cols)
    want = _recipe(tok, QWEN3_RERANKER, max_length, *cols)
    assert [e.ids[e.offsets[k]:e.offsets[k + 1]].tolist() for k in range(n)] == want
    whole = [len(tok(QWEN3_RERANKER.format_body(*c), add_special_tokens=False)["input_ids"]) for c in zip(*cols)]
    assert e.truncated.tolist() == [w > enc.body_max for w in whole]
    assert calls["cut"] >= n - 2
    # a template with text after the document, and left truncation, are not cut
    assert not PairEncoder(tok, BGE_RERANKER_V2_GEMMA, max_length)._cut
    tok.truncation_side = "left"
    assert not PairEncoder(tok, QWEN3_RERANKER, max_length)._cut


def test_a_cut_that_changes_ids_on_the_probe_is_turned_off(tokenizers_dirs, monkeypatch, caplog):  # noqa: F811
    """Both encoders check the cut on a probe page when they are built: a cut that changes the ids
    kept turns cutting off, not the fast path."""
    from test_tokenize_fast import SAMPLE
    from pipeline.engines.template import QWEN3_RERANKER
    from pipeline.engines.tokenize import PairEncoder

    real_cut = doc_cut.cut_long

    def wrong_cut(documents, max_length, *rest):  # keeps the wrong end of each long document
        out, cut = real_cut(documents, max_length, *rest)
        return [documents[k][len(d):] if k in cut else d for k, d in enumerate(out)], cut

    monkeypatch.setattr(doc_cut, "cut_long", wrong_cut)
    tok, _ = cross_tokenizer.load(tokenizers_dirs["bert"])
    with caplog.at_level("INFO", logger="pipeline.engines.tokenize"):
        enc = CrossEncoderEncoder(tok, 64)
        qwen = PairEncoder(AutoTokenizer.from_pretrained(SAMPLE), QWEN3_RERANKER, 64)
    assert enc.backend is not None and not enc._cut
    assert qwen.backend is not None and not qwen._cut
    assert sum("changed its ids on a probe" in r.message for r in caplog.records) == 2


# -- cuts that used to change the ids, and the adversarial text around cut points -------------------

def _pair_tokenizer(model, normalizer=None, pre_tokenizer=None, added=()):
    """A cross-encoder tokenizer (BERT-style pair template, pad token) over `model`, as transformers
    loads it: the kinds of tokenizer.json the checks below are about."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(model)
    t.normalizer = normalizer
    t.pre_tokenizer = pre_tokenizer
    t.add_special_tokens(["[UNK]", "[CLS]", "[SEP]", "[PAD]"])
    cls, sep = t.token_to_id("[CLS]"), t.token_to_id("[SEP]")
    t.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                     special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    if added:
        t.add_tokens([AddedToken(a, normalized=True) for a in added])
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]")


def _same_as_transformers(tok, queries, documents, max_length):
    enc = CrossEncoderEncoder(tok, max_length)
    e = enc.encode([None] * len(queries), queries, documents)
    want, _ = _reference(tok, queries, documents, max_length)
    assert [_split(e, k)[0] for k in range(len(queries))] == want
    assert e.truncated.tolist() == [len(x) >= max_length for x in want]
    return enc


_WORDS = {w: i for i, w in enumerate(["[UNK]", "[CLS]", "[SEP]", "[PAD]", "a", "b", "c", "q", "w", "u", "new", "york"])}


@pytest.mark.parametrize("normalizer, added, text", [
    (normalizers.Nmt(), "new\u200byork", "new york"),  # Nmt (SentencePiece's) turns U+200B into a space
    (normalizers.NFKC(), "new\u00b4", "new \u0301"),  # NFKC: U+00B4 is a space and a combining acute
])
def test_an_added_token_that_holds_a_space_once_normalized_refuses_the_cut(normalizer, added, text):
    """Added tokens are matched on the normalized text: one whose normalized form holds a space may
    match across a cut, so the tokenizer is not cut (the cut used to keep "new" where transformers
    has the added token)."""
    tok = _pair_tokenizer(models.WordLevel(_WORDS, unk_token="[UNK]"), normalizer, pre_tokenizers.WhitespaceSplit(),
                          added=[added])
    assert not any(c.isspace() for c in added)
    assert not doc_cut.cuttable(tok.backend_tokenizer)
    # "u"*56 " b c new" reaches the first cut point (64 characters for max_length 8) with exactly the
    # 4 tokens the pair keeps of the document: the last of them is the added token, or "new" if cut
    page = "u" * 56 + " b c " + text + " " + "w " * 200
    assert doc_cut.cut_long([page], 8)[0][0].endswith(" c new")
    _same_as_transformers(tok, ["q"], [page], 8)


def _chain_bpe(word: str, space: str):
    """A BPE whose merges build `word` + `space` (a space mapped by the pre-tokenizer) into one token."""
    vocab = {c: i for i, c in enumerate(["[UNK]", "q", space] + sorted(set(word)))}
    merges, cur = [], word[0]
    for c in word[1:] + space:
        merges.append((cur, c))
        cur += c
        vocab.setdefault(cur, len(vocab))
    return models.BPE(vocab, merges, unk_token="[UNK]")


@pytest.mark.parametrize("space, pre_tokenizer", [
    ("\u2581", pre_tokenizers.Sequence([pre_tokenizers.Metaspace(split=False, prepend_scheme="never"),
                                        pre_tokenizers.WhitespaceSplit()])),
    ("\u0120", pre_tokenizers.Sequence([pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                                        pre_tokenizers.Split(Regex(sorted(doc_cut._WORD_PATTERNS)[0]),
                                                             behavior="isolated")])),
])
def test_a_pre_tokenizer_that_maps_spaces_before_splitting_refuses_the_cut(space, pre_tokenizer):
    """A step that maps spaces to another character (Metaspace without split, ByteLevel without its
    regex) before the split leaves no space to split at: a BPE merge may join the word before a cut
    with the space after it, so the tokenizer is not cut."""
    tok = _pair_tokenizer(_chain_bpe("abcdefghi", space), None, pre_tokenizer)
    assert not doc_cut.cuttable(tok.backend_tokenizer)
    page = "abcdefghi " * 300  # 13 words reach the cut for max_length 16, one token each, the last cut
    # off its space: exactly the 13 tokens the pair keeps of the document
    assert doc_cut.cut_long([page], 16)[0][0].count(" ") == 12
    _same_as_transformers(tok, [""], [page], 16)
    # in the right order (split first) the same steps keep the cut
    steps = json.loads(pre_tokenizer.__getstate__())["pretokenizers"]
    right = _backend(None, pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizer]))
    assert doc_cut.cuttable(right) and steps


def test_a_cut_document_without_tokens_is_encoded_whole_when_its_query_takes_all_the_room():
    """A cut document whose text gives no token (a BPE without an unknown token drops what it cannot
    read) next to a query of exactly max_length minus the special tokens fills the pair without
    truncation; the whole document has tokens after the cut, which make transformers cut the
    query too ('longest_first'): the pair is encoded again whole, and so are the others."""
    vocab = {c: i for i, c in enumerate(["[UNK]", "q", "w"])}
    tok = _pair_tokenizer(models.BPE(vocab, [], unk_token=None), None, pre_tokenizers.WhitespaceSplit())
    assert tok.backend_tokenizer.encode("日本 w", add_special_tokens=False).tokens == ["w"]
    page = "日本 " * 40 + "w " * 100
    queries = ["q q q q q", "q q", "q q q q q"]  # room is 8 - 3 = 5
    documents = [page, page, "日本"]
    assert _same_as_transformers(tok, queries, documents, 8)._cut
    # with a longer query in the batch (the batch call fails, and the pairs are taken apart)
    _same_as_transformers(tok, queries + ["q " * 8], documents + [page], 8)


def test_a_template_that_reads_the_document_before_its_end_is_not_cut():
    """The cut keeps a body's first ids only where the document appears once, as the body's end: a
    template that also shows the document earlier (here its first 300 characters, which the probe
    page's cut keeps whole) is not cut."""
    from test_tokenize_fast import SAMPLE, _recipe
    from pipeline.engines.template import Template
    from pipeline.engines.tokenize import PairEncoder

    tok = AutoTokenizer.from_pretrained(SAMPLE)
    spec = Template("twice", "<|im_start|>user\n", "{query}\n{document:.300}\n{document}", "<|im_end|>", "yes", "no")
    max_length = 20 + sum(len(tok.encode(t, add_special_tokens=False)) for t in (spec.prefix, spec.suffix))
    # special-token text: many characters a token, so the pair keeps the first copy's tail
    page = ("<|endoftext|>" * 14 + "a ") * 6
    enc = PairEncoder(tok, spec, max_length)
    e = enc.encode(["i"], ["q"], [page])
    assert e.ids.tolist() == _recipe(tok, spec, max_length, ["i"], ["q"], [page])[0]
    assert not enc._cut
    for body in ("{document}\n{query}\n{document}", "{query} {document!r}", "{query} {document:>9}",
                 "{query} {document[0]}{document}"):
        assert not PairEncoder(tok, Template("t", "", body, "", "yes", "no"), max_length)._cut, body
    assert PairEncoder(tok, Template("t", "", "{{document}} {query}: {document}", "", "yes", "no"), max_length)._cut


def _charsmap(key: str, value: str) -> bytes:
    """A SentencePiece precompiled charsmap (a darts-clone double array, then the values) that maps
    `key` to `value`, as a custom normalization rule would."""
    units, node, step = {0: 256 << 10}, 256, 512
    for i, c in enumerate(key.encode()):
        node ^= c
        units[node] = (step << 10) | c | ((i == len(key.encode()) - 1) << 8)  # label, leaf flag, offset
        node ^= step
        step <<= 1
    units[node] = 1 << 31  # the leaf: value 0, the offset of `value` below
    size = 1 << (max(units) | 255).bit_length()  # every lookup (a node xor any byte) stays inside
    trie = struct.pack(f"<{size}I", *(units.get(i, 0) for i in range(size)))
    return struct.pack("<I", len(trie)) + trie + value.encode() + b"\0"


def test_no_cut_after_a_letter_that_joins_the_space_in_one_grapheme():
    """SentencePiece's map (Precompiled) looks up whole graphemes and replaces one by the value of
    its longest mapped start: a Prepend letter (U+0D4E MALAYALAM LETTER DOT REPH) and the space
    after it are one grapheme, so a map entry for the letter swallows the space and joins the words
    around it. No cut falls after such a letter."""
    norm = normalizers.Precompiled(_charsmap("\u0d4e", "x"))
    assert norm.normalize_str("ab\u0d4e cd") == "abxcd"
    words = dict(_WORDS, abx=len(_WORDS), abxcd=len(_WORDS) + 1)
    tok = _pair_tokenizer(models.WordLevel(words, unk_token="[UNK]"), norm, pre_tokenizers.WhitespaceSplit())
    assert doc_cut.cuttable(tok.backend_tokenizer)
    page = "u" * 56 + " b c ab\u0d4e cd " + "w " * 200  # the space after U+0D4E at 64, the first cut point
    assert doc_cut.cut_point(page, 64) == 67  # the next one, after "cd"
    _same_as_transformers(tok, ["q"], [page], 8)
    for c in "\u0d4e\U000111c2\U00011a3a\U00011d46":
        assert doc_cut.cut_point(f"ab{c} cd ef", 1) == 6


# What may stand around a cut point: after the space (combining marks, other spaces, zero-width
# and control characters, emoji sequences, contractions, special-token text) and before it.
_AFTER = ["\u0301", "\u0308x", " ", "  \t", "\u00a0", "\u3000", "\u2000", "\t", "\r", "\r\n", "\n\n", "\x00", "\x07",
          "\x85", "\u2028", "\u200b", "\u200c", "\u200d", "\ufeff", "\u2581", "\u180e", "\u00ad", "\ufffd",
          "👨\u200d👩\u200d👧", "👍\U0001F3FB", "🇫🇷", "'s", "'ll", "’s", "'", "42", "½", "²", "日本語", "한국어",
          "ا", "ﬁ", "İ", "ß", "e\u0301", "[SEP]", "</s>", "<s>", "<mask>", "[MASK]", "<|im_end|>", "<|endoftext|>",
          "<think>", ".", ",", "-", "_", "(", "http://x.y/" + "q" * 40, "x" * 120]
_BEFORE = ["a", "Z", "7", "日", "ß", "İ", "Ⅻ", "²", "ǅ", "한", "ا", "\u0e01\u0e33", "ﬁ", "e\u0301a", "'s", "x" * 120]


def _around_cut_points():
    texts = []
    for i, after in enumerate(_AFTER):
        b1, b2 = _BEFORE[i % len(_BEFORE)], _BEFORE[(3 * i + 1) % len(_BEFORE)]
        texts.append(f"it {b1} {after}{b2} {after}{after}{b1}  {after} end{b2} {after}")
        texts.append(f"{after}{b2} {after} {b1}{after} {b2}")
    return texts


def _tokenizers(tokenizers_dirs):  # noqa: F811
    from test_tokenize_fast import SAMPLE

    out = {}
    for style in STYLES:
        out[f"{style}-ours"] = cross_tokenizer.load(tokenizers_dirs[style])[0]
        out[f"{style}-transformers"] = AutoTokenizer.from_pretrained(tokenizers_dirs[style])
    out["qwen3"] = AutoTokenizer.from_pretrained(SAMPLE)
    return out


def test_text_before_any_cut_point_gives_the_first_ids_of_the_whole(tokenizers_dirs):  # noqa: F811
    """What the cut rests on, checked at every cut point of text built to break it, for every
    tokenizer the cut accepts here: the ids of the text before the cut are the whole text's first
    ids (the pair's truncation then keeps the same ones)."""
    from pipeline.engines.template import QWEN3_RERANKER

    texts = _around_cut_points()
    points = 0
    for name, tok in _tokenizers(tokenizers_dirs).items():
        backend = tok.backend_tokenizer
        assert doc_cut.cuttable(backend), name
        backend.no_truncation()
        for text in texts:
            cuts = [p for p in range(1, len(text)) if doc_cut.cut_point(text, p) == p]
            body = (lambda d: QWEN3_RERANKER.format_body("i", "q", d)) if name == "qwen3" else (lambda d: d)
            whole = backend.encode(body(text), add_special_tokens=False).ids
            for p in cuts:
                ids = backend.encode(body(text[:p]), add_special_tokens=False).ids
                assert whole[:len(ids)] == ids, (name, text[:p], text[p:])
            points += len(cuts)
    assert points > 7 * 2 * len(_AFTER)


def _random_text(rng, words: int) -> str:
    atoms = _AFTER + _BEFORE + ["word", "the", "planet", "rotates", "q"] * 8
    return "".join(rng.choice(atoms) + (" " if rng.random() < 0.5 else "") for _ in range(words))


@pytest.mark.parametrize("style", STYLES)
def test_mixed_batches_at_small_max_lengths_give_transformers_ids(tokenizers_dirs, style, monkeypatch):  # noqa: F811
    """Batches that mix cut and whole documents, pairs encoded again (words longer than a cut keeps),
    empty queries and queries longer than max_length (the batch call fails and the pairs are taken
    apart), at max_length one or two above the special tokens and beyond: transformers' ids, token
    types and truncated flags."""
    import random

    rng = random.Random(0)
    calls = _counting(monkeypatch)
    grown = 0
    for tok in (cross_tokenizer.load(tokenizers_dirs[style])[0], AutoTokenizer.from_pretrained(tokenizers_dirs[style])):
        specials = tok.backend_tokenizer.num_special_tokens_to_add(True)
        for max_length in (specials + 1, specials + 2, 12, 40):
            enc = CrossEncoderEncoder(tok, max_length)
            assert enc._cut
            for long_query in (False, True):
                n = 16
                queries = [rng.choice(["", "q", _random_text(rng, 3)]) for _ in range(n)]
                if long_query:
                    queries[rng.randrange(n)] = _random_text(rng, max_length + 5)
                documents = [rng.choice(["", _random_text(rng, 4), _random_text(rng, 6 * max_length),
                                         _random_text(rng, 12 * max_length)]) for _ in range(n)]
                want, types = _reference(tok, queries, documents, max_length)
                e = enc.encode([None] * n, queries, documents)
                got = [_split(e, k) for k in range(n)]
                assert [g[0] for g in got] == want, (max_length, long_query)
                if style == "bert":
                    assert [g[1] for g in got] == types
                assert e.truncated.tolist() == [len(x) >= max_length for x in want]
                assert e.offsets[-1] == len(e.ids)
            grown += enc._chars_per_token > doc_cut.CHARS_PER_TOKEN  # some cuts were encoded again whole
    assert calls["cut"] > 50
    # BERT reads a word of more than 100 characters as one [UNK]: there some cuts come out short
    assert grown or style != "bert"


def test_qwen3_mixed_batches_give_the_recipe_ids(monkeypatch):
    """The Qwen3 path on the same kind of batches: the recipe's ids and truncated flags."""
    import random
    from test_tokenize_fast import SAMPLE, _recipe
    from pipeline.engines.template import QWEN3_RERANKER
    from pipeline.engines.tokenize import PairEncoder

    rng = random.Random(0)
    tok = AutoTokenizer.from_pretrained(SAMPLE)
    calls = _counting(monkeypatch)
    for max_length in (110, 120, 160):
        enc = PairEncoder(tok, QWEN3_RERANKER, max_length)
        assert enc._cut
        n = 16
        sizes = (5, max_length, 3 * max_length)
        cols = (["i"] * n, [rng.choice(["", _random_text(rng, 3), _random_text(rng, 30)]) for _ in range(n)],
                [rng.choice([""] + [_random_text(rng, k) for k in sizes]) for _ in range(n)])
        e = enc.encode(*cols)
        assert [e.ids[e.offsets[k]:e.offsets[k + 1]].tolist() for k in range(n)] == _recipe(tok, QWEN3_RERANKER,
                                                                                          max_length, *cols)
        whole = [len(tok(QWEN3_RERANKER.format_body(*c), add_special_tokens=False)["input_ids"]) for c in zip(*cols)]
        assert e.truncated.tolist() == [w > enc.body_max for w in whole]
    assert calls["cut"] > 5


def test_an_encoder_keeps_more_only_when_more_than_one_cut_in_20_came_out_short():
    assert doc_cut.kept_more(8, 1, 20) == 8
    assert doc_cut.kept_more(8, 2, 20) == 12
    assert doc_cut.kept_more(doc_cut.MAX_CHARS_PER_TOKEN, 5, 5) == doc_cut.MAX_CHARS_PER_TOKEN
