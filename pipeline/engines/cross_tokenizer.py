"""A cross-encoder's tokenizer (BERT, XLM-R, ModernBERT) built straight from tokenizer.json with
the `tokenizers` library, without importing transformers (whose tokenizer load took 3.2-3.6 s of
each start).

transformers (v5) builds these tokenizers in one of two ways, and `load` does the same:
- PreTrainedTokenizerFast / TokenizersBackend (ModernBERT and most exported tokenizers): the
  file as it is, its post-processor included.
- BertTokenizer and XLMRobertaTokenizer: the file's vocabulary under a fixed pipeline of the
  class (BertTokenizer: BertNormalizer with tokenizer_config.json's do_lower_case,
  strip_accents and tokenize_chinese_chars, BERT's pre-tokenizer, WordPiece with "##";
  XLMRobertaTokenizer: the file's precompiled sentencepiece normalizer, whitespace split and
  metaspace, Unigram with unk id 3), and the class's pair template
  ([CLS] a [SEP] b [SEP] with token types 0/1; <s> a </s></s> b </s>).
Special tokens come from tokenizer_config.json, then special_tokens_map.json, then the class's
defaults. Anything else (another class, remote code, options that change ids, added tokens the
two files disagree on) returns None with the reason, and the caller uses transformers.
"""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from pipeline.engines.fast_tokenizer import added_tokens, token_text

# tokenizer_config.json keys that change ids when set (add_prefix_space is XLM-R's own option).
_MUST_BE_FALSE = ("split_special_tokens", "legacy_tokenizer", "add_prefix_space")

_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_BERT_DEFAULTS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                  "mask_token": "[MASK]"}
_XLMR_DEFAULTS = {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>",
                  "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>"}
# TokenizersBackend's own template, without add_bos_token / add_eos_token, for a file without one.
_FILE_TEMPLATE = {"single": "$A:0", "pair": "$A:0 $B:1"}
# class name -> (how transformers builds it, its special-token defaults, its model_input_names)
CLASSES = {
    "BertTokenizer": ("bert", _BERT_DEFAULTS, ("input_ids", "token_type_ids", "attention_mask")),
    "BertTokenizerFast": ("bert", _BERT_DEFAULTS, ("input_ids", "token_type_ids", "attention_mask")),
    "XLMRobertaTokenizer": ("xlmr", _XLMR_DEFAULTS, ("input_ids", "attention_mask")),
    "XLMRobertaTokenizerFast": ("xlmr", _XLMR_DEFAULTS, ("input_ids", "attention_mask")),
    "PreTrainedTokenizerFast": ("file", {}, ("input_ids", "token_type_ids", "attention_mask")),
    "TokenizersBackend": ("file", {}, ("input_ids", "token_type_ids", "attention_mask")),
}


class CrossEncoderTokenizer:
    """The subset of a transformers tokenizer that CrossEncoderEncoder calls: `__call__` on lists
    of queries and documents with a truncation strategy and max_length (the ids transformers'
    call gives, the same Rust batch call), the special ids, the sides, model_input_names.
    `backend_tokenizer` is the `tokenizers.Tokenizer` itself."""

    is_fast = True

    def __init__(self, backend, path: str, specials: dict, tcfg: dict, input_names):
        self.backend_tokenizer = self._tokenizer = backend
        self.name_or_path = path
        self.truncation_side = tcfg.get("truncation_side") or "right"
        self.padding_side = tcfg.get("padding_side") or "right"
        self.model_max_length = tcfg.get("model_max_length")
        self.model_input_names = list(input_names)
        for name in _NAMES:
            tok = specials.get(name)
            setattr(self, name, tok)
            setattr(self, name + "_id", None if tok is None else backend.token_to_id(tok))
        # As transformers': the vocabulary without added tokens (the memory probe draws ids below it).
        self.vocab_size = backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def __call__(self, text, text_pair=None, truncation=None, max_length=None, add_special_tokens: bool = True,
                 return_attention_mask=None, verbose: bool = True):
        """tokenizer(queries, documents, truncation=..., max_length=...) for lists of texts, as
        transformers' fast tokenizers run it: truncation set on the backend, one encode_batch.
        A pair whose truncation cannot be met raises (the Rust error), as there."""
        if isinstance(text, str) or (text_pair is not None and isinstance(text_pair, str)):
            raise TypeError("CrossEncoderTokenizer takes lists of texts")
        b = self.backend_tokenizer
        if truncation in (None, False, "do_not_truncate"):
            b.no_truncation()
        else:
            strategy = "longest_first" if truncation is True else truncation
            b.enable_truncation(max_length if max_length is not None else self.model_max_length, stride=0,
                                strategy=strategy, direction=self.truncation_side)
        if b.padding is not None:
            b.no_padding()
        b.encode_special_tokens = False
        inputs = list(text) if text_pair is None else list(zip(text, text_pair))
        encs = b.encode_batch(inputs, add_special_tokens=add_special_tokens)
        out = {"input_ids": [e.ids for e in encs]}
        if "token_type_ids" in self.model_input_names:
            out["token_type_ids"] = [e.type_ids for e in encs]
        return out


def _specials(tcfg: dict, smap: dict, defaults: dict) -> dict:
    """Each named special token: tokenizer_config.json's, else special_tokens_map.json's, else
    the class default (an explicit null stays none)."""
    out = {}
    for name in _NAMES:
        if name in tcfg:
            out[name] = token_text(tcfg[name])
        elif name in smap:
            out[name] = token_text(smap[name])
        else:
            out[name] = defaults.get(name)
    return out


def _added_tokens_agree(tj: dict, tcfg: dict, specials: dict) -> str | None:
    """Why transformers would end with other added tokens than tokenizer.json's (None: it would
    not). Raises on malformed entries (the caller reports them)."""
    added, why = added_tokens(tj, tcfg)
    if why:
        return why
    contents = {a["content"]: a for a in added.values()}
    for name, tok in specials.items():
        if tok is None:
            continue
        a = contents.get(tok)
        # transformers adds a named special token as special and unnormalized where the file has
        # it otherwise: not reproduced here.
        if a is None or not a.get("special") or a.get("normalized"):
            return f"{name} {tok!r} is not an unnormalized special token of tokenizer.json"
    for key in ("extra_special_tokens", "additional_special_tokens"):
        extra = tcfg.get(key)
        if extra:
            return f"tokenizer_config.json sets {key}"
    return None


def _component(obj) -> dict | None:
    """The JSON of a normalizer, pre-tokenizer or post-processor object as tokenizer.json holds it."""
    t = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    for attr in ("normalizer", "pre_tokenizer", "post_processor"):
        try:
            setattr(t, attr, obj)
        except TypeError:
            continue
        return json.loads(t.to_str())[attr]
    raise TypeError(f"not a tokenizer component: {obj!r}")


def _rebuild(how: str, tj: dict, tcfg: dict, specials: dict) -> str | None:
    """Edit tokenizer.json `tj` in place into the backend transformers' class builds; the reason
    where it cannot (None: done)."""
    model = tj.get("model") or {}
    ids = {a["content"]: a["id"] for a in tj.get("added_tokens") or []}
    if how == "bert":
        if model.get("type") != "WordPiece":
            return "BertTokenizer over a tokenizer.json whose model is not WordPiece"
        cls, sep = specials.get("cls_token"), specials.get("sep_token")
        if cls is None or sep is None or cls not in ids or sep not in ids:
            return "its [CLS] or [SEP] token is not an added token"
        model.update(unk_token=specials.get("unk_token"), continuing_subword_prefix="##",
                     max_input_chars_per_word=100)
        tj["normalizer"] = _component(normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=tcfg.get("tokenize_chinese_chars", True),
            strip_accents=tcfg.get("strip_accents"), lowercase=tcfg.get("do_lower_case", True)))
        tj["pre_tokenizer"] = _component(pre_tokenizers.BertPreTokenizer())
        tj["post_processor"] = _component(processors.TemplateProcessing(
            single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
            special_tokens=[(cls, ids[cls]), (sep, ids[sep])]))
    elif how == "xlmr":
        if model.get("type") != "Unigram":
            return "XLMRobertaTokenizer over a tokenizer.json whose model is not Unigram"
        bos, eos = specials.get("bos_token"), specials.get("eos_token")
        if bos is None or eos is None or bos not in ids or eos not in ids:
            return "its <s> or </s> token is not an added token"
        model.update(unk_id=3, byte_fallback=False)
        norm = tj.get("normalizer") or {}
        steps = norm.get("normalizers") if norm.get("type") == "Sequence" else [norm]
        charsmap = next((n["precompiled_charsmap"] for n in steps if isinstance(n, dict)
                         and n.get("type") == "Precompiled" and "precompiled_charsmap" in n), None)
        tj["normalizer"] = None if charsmap is None else {"type": "Precompiled", "precompiled_charsmap": charsmap}
        scheme = "always" if tcfg.get("add_prefix_space", True) else "never"
        tj["pre_tokenizer"] = _component(pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)]))
        tj["post_processor"] = _component(processors.TemplateProcessing(
            single=[bos, "$A", eos], pair=[bos, "$A", eos, eos, "$B", eos],
            special_tokens=[(bos, ids[bos]), (eos, ids[eos])]))
    elif tj.get("post_processor") is None:
        tj["post_processor"] = _component(processors.TemplateProcessing(**_FILE_TEMPLATE))
    tj["truncation"] = tj["padding"] = None
    return None


def load(path: str) -> tuple[CrossEncoderTokenizer | None, str]:
    """(tokenizer, "") for a cross-encoder tokenizer directory we read exactly as transformers
    does; (None, why) otherwise."""
    tfile, cfile = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(tfile) or not os.path.isfile(cfile):
        return None, "no tokenizer.json and tokenizer_config.json"
    mfile = os.path.join(path, "special_tokens_map.json")
    try:
        with open(cfile, encoding="utf-8") as f:
            tcfg = json.load(f)
        with open(tfile, encoding="utf-8") as f:
            tj = json.load(f)
        smap = {}
        if os.path.isfile(mfile):
            with open(mfile, encoding="utf-8") as f:
                smap = json.load(f)
    except (OSError, ValueError) as exc:
        return None, f"unreadable tokenizer files ({exc})"
    if not isinstance(tcfg, dict) or not isinstance(tj, dict) or not isinstance(smap, dict):
        return None, "tokenizer files that are not JSON objects"
    cls = tcfg.get("tokenizer_class")
    if cls not in CLASSES:
        return None, f"tokenizer class {cls!r} is not one we read without transformers"
    if tcfg.get("auto_map") or tcfg.get("backend", "tokenizers") != "tokenizers":
        return None, "remote code or another tokenizer backend"
    # Present at all, add_bos_token / add_eos_token make transformers rewrite the post-processor.
    how, defaults, names = CLASSES[cls]
    odd = [k for k in _MUST_BE_FALSE if tcfg.get(k) and not (k == "add_prefix_space" and how == "xlmr")]
    odd += [k for k in ("add_bos_token", "add_eos_token") if k in tcfg]
    if odd:
        return None, "tokenizer options we do not reproduce (" + ", ".join(odd) + ")"
    if "model_input_names" in tcfg:
        names = tcfg["model_input_names"]
        if not isinstance(names, list):
            return None, "model_input_names of tokenizer_config.json is not a list"
    specials = _specials(tcfg, smap, defaults)
    try:
        why = _added_tokens_agree(tj, tcfg, specials) or _rebuild(how, tj, tcfg, specials)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:  # malformed entries
        why = f"malformed tokenizer files ({type(exc).__name__}: {exc})"
    if why:
        return None, why
    try:
        if how == "file":
            # The file as it is, read by the library itself: writing the parsed JSON back out
            # for it to parse again took a third of the load. What _rebuild changed, set here.
            backend = Tokenizer.from_file(tfile)
            backend.no_truncation()
            backend.no_padding()
            if backend.post_processor is None:
                backend.post_processor = processors.TemplateProcessing(**_FILE_TEMPLATE)
        else:
            backend = Tokenizer.from_str(json.dumps(tj))
    except Exception as exc:  # a file the library cannot read: transformers will say why
        return None, f"tokenizers cannot read tokenizer.json ({exc})"
    return CrossEncoderTokenizer(backend, path, specials, tcfg, names), ""
