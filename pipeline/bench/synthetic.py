"""Random-weight Qwen3 rerankers of real architectures, built from config with no download.

Tests, the sample data and the benchmark need a model that loads through the same
``from_pretrained`` code as the real one. Real weights cannot be fetched here, so this module
trains a small byte-level BPE tokenizer with Qwen2's exact pre-tokenizer and chat special
tokens, and saves a ``Qwen3ForCausalLM`` with random weights next to it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (AddedToken, AutoModelForSequenceClassification, BertConfig, BertTokenizer, GemmaConfig,
                          GemmaForCausalLM, ModernBertConfig, PreTrainedTokenizerFast, Qwen2Tokenizer, Qwen3Config,
                          Qwen3ForCausalLM, Qwen3ForSequenceClassification, XLMRobertaConfig, XLMRobertaTokenizer)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

# Architectures from the published config.json files of the models on the Hugging Face hub; "tiny" is ours.
ARCHS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 vocab_size=151936, tie_word_embeddings=True),
    "4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               vocab_size=151936, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               vocab_size=151936, tie_word_embeddings=False),
}

# Tokens of the real Qwen3 tokenizer that the reranker template relies on.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED_TOKENS = ["<think>", "</think>"]

_BUILTIN_CORPUS = [
    "yes", "no", "Yes", "No",
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided.",
    'Note that the answer can only be "yes" or "no".',
    "Given a web search query, retrieve relevant passages that answer the query",
    "<Instruct>: <Query>: <Document>: system user assistant",
    "The quick brown fox jumps over the lazy dog. Numbers 0123456789 and punctuation: ,.;:!?()[]{}",
    "Le cœur a ses raisons que la raison ne connaît point. Über den Wolken muss die Freiheit grenzenlos sein.",
    "東京は日本の首都です。北京是中国的首都。Москва — столица России. 🚀✨",
]


def train_tokenizer(out_dir: str | Path, texts: list[str] | None = None, vocab_size: int = 2048):
    """Train a byte-level BPE with Qwen2's pre-tokenizer and save it as a Qwen2 tokenizer.

    "yes" and "no" come out as single tokens, as in the real Qwen3 tokenizer.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The yes/no lines are repeated so that BPE merges them into single tokens.
    corpus = _BUILTIN_CORPUS * 20 + list(texts or [])
    bpe.train_from_iterator(corpus, trainer=trainer)
    state = json.loads(bpe.to_str())
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["model"]["merges"]]
    tok = Qwen2Tokenizer(vocab=state["model"]["vocab"], merges=merges)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS[1:]])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    for word in ("yes", "no"):
        if len(tok(word, add_special_tokens=False)["input_ids"]) != 1:
            raise RuntimeError(f"tokenizer training did not make {word!r} a single token")
    tok.save_pretrained(str(out_dir))
    return tok


def spread_norms(model, mean: float = 1.0, std: float = 0.3) -> None:
    """Random norm weights: with all norms at their init value and a small init std, every
    score of a tiny model sits near 0.5, and parity tests could not tell right from wrong."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(mean, std)


def trained_like_norms(model, seed: int = 0):
    """RMSNorm weights spread as in trained decoders: log-normal per channel, and in the hidden
    norms a few outlier channels 8-20x larger (which make the per-token fp8 scales of the
    projections' inputs coarse for every other channel)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() != 1 or "norm" not in name:
                continue
            sigma = 0.3 if ("q_norm" in name or "k_norm" in name) else 0.5
            w = torch.exp(torch.randn(p.shape[0], generator=g) * sigma)
            if "q_norm" not in name and "k_norm" not in name:
                idx = torch.randperm(p.shape[0], generator=g)[: max(1, p.shape[0] // 256)]
                w[idx] *= 8 + 12 * torch.rand(len(idx), generator=g)
            p.copy_(w.to(p.dtype))


def build_reranker(out_dir: str | Path, arch: str = "tiny", *, tie_word_embeddings: bool | None = None,
                   seed: int = 0, init_std: float = 0.02, texts: list[str] | None = None,
                   num_hidden_layers: int | None = None):
    """Save a random-weight Qwen3 reranker (config, safetensors, tokenizer) into ``out_dir``.

    ``init_std`` larger than the usual 0.02 makes a tiny model's scores spread over (0, 1), so
    that parity tests can tell a right computation from a wrong one.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(out_dir, texts)
    shape = dict(ARCHS[arch])
    vocab = shape.pop("vocab_size", None) or len(tok)
    tie = shape.pop("tie_word_embeddings", True) if tie_word_embeddings is None else tie_word_embeddings
    shape.pop("tie_word_embeddings", None)
    if num_hidden_layers is not None:
        shape["num_hidden_layers"] = num_hidden_layers
    config = Qwen3Config(
        vocab_size=vocab, tie_word_embeddings=tie, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        max_position_embeddings=40960, attention_bias=False, initializer_range=init_std,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        torch_dtype="bfloat16" if arch != "tiny" else "float32",
        **shape,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    if arch == "tiny":
        spread_norms(model)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


# -- other reranker families (tests and trials; random weights) -----------------------------------

def train_cross_tokenizer(out_dir: str | Path, style: str, texts: list[str], *, vocab_size: int = 3000,
                          pad_vocab_to: int | None = None):
    """A cross-encoder tokenizer of a real model's kind, trained on `texts` and saved with the class
    that model's tokenizer_config.json names: 'bert' (WordPiece, lower-case, BertTokenizer, as
    ms-marco MiniLM), 'xlmr' (sentencepiece-style Unigram, XLMRobertaTokenizer, as
    bge-reranker-v2-m3) or 'modernbert' (byte-level BPE, PreTrainedTokenizerFast, as ModernBERT).
    pad_vocab_to grows the vocabulary with filler pieces to a real model's size (load times)."""
    corpus = list(texts) + _BUILTIN_CORPUS * 5
    filler = [f"{chr(0x4e00 + k % 20000)}{k}" for k in range(max(0, (pad_vocab_to or 0) - vocab_size))]
    if style == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                                  show_progress=False))
        vocab = tok.get_vocab()
        for f in filler:
            vocab.setdefault(f, len(vocab))
        fast = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=512)
    elif style == "xlmr":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.train_from_iterator(corpus, trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], unk_token="<unk>",
            show_progress=False))
        pieces = [tuple(p) for p in json.loads(tok.to_str())["model"]["vocab"]]
        pieces += [(f"▁{f}", -20.0) for f in filler] + [("<mask>", 0.0)]
        fast = XLMRobertaTokenizer(vocab=pieces, model_max_length=8192)
    elif style == "modernbert":
        specials = ["|||IP_ADDRESS|||", "<|padding|>", "[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.train_from_iterator(corpus, trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False))
        if filler:
            tok.add_tokens(filler)
        c, s = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
            special_tokens=[("[CLS]", c), ("[SEP]", s)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                       sep_token="[SEP]", mask_token="[MASK]", model_max_length=8192,
                                       model_input_names=["input_ids", "attention_mask"])
    else:
        raise ValueError(style)
    fast.save_pretrained(str(out_dir))
    return fast


def build_cross_encoder(out_dir: str | Path, arch: str, texts: list[str], *, num_labels: int = 1, seed: int = 0,
                        init_std: float = 0.2, **settings):
    """A tiny random cross-encoder: arch 'bert', 'xlm-roberta' or 'modernbert', with the tokenizer
    kind and class of the real models (train_cross_tokenizer). `settings`: config-class settings
    that replace the tiny ones (e.g. ModernBERT's classifier_pooling or num_hidden_layers)."""
    out_dir = Path(out_dir)
    tok = train_cross_tokenizer(out_dir, {"xlm-roberta": "xlmr"}.get(arch, arch), texts)
    common = dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, num_labels=num_labels, initializer_range=init_std,
                  pad_token_id=tok.pad_token_id)
    common.update(settings)
    if arch == "bert":
        config = BertConfig(**{"max_position_embeddings": 512, "type_vocab_size": 2,
                               "architectures": ["BertForSequenceClassification"], **common})
    elif arch == "xlm-roberta":
        config = XLMRobertaConfig(**{"max_position_embeddings": 514, "type_vocab_size": 1,
                                     "bos_token_id": tok.cls_token_id, "eos_token_id": tok.sep_token_id,
                                     "architectures": ["XLMRobertaForSequenceClassification"], **common})
    elif arch == "modernbert":
        config = ModernBertConfig(**{"max_position_embeddings": 512, "cls_token_id": tok.cls_token_id,
                                     "sep_token_id": tok.sep_token_id, "bos_token_id": tok.cls_token_id,
                                     "eos_token_id": tok.sep_token_id, "global_attn_every_n_layers": 2,
                                     "local_attention": 64, "architectures": ["ModernBertForSequenceClassification"],
                                     **common})
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def build_qwen3_seq_cls(out_dir: str | Path, texts: list[str], seed: int = 0):
    """A tiny Qwen3ForSequenceClassification with one label (as the Qwen3-Reranker seq-cls
    conversions) and the Qwen tokenizer."""
    out_dir = Path(out_dir)
    tok = train_tokenizer(out_dir, texts)
    config = Qwen3Config(vocab_size=len(tok), num_labels=1, architectures=["Qwen3ForSequenceClassification"],
                         pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), initializer_range=0.1,
                         rms_norm_eps=1e-6, rope_theta=1_000_000.0, **ARCHS["tiny"])
    torch.manual_seed(seed)
    model = Qwen3ForSequenceClassification(config)
    spread_norms(model)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def build_gemma_reranker(out_dir: str | Path, texts: list[str], seed: int = 0):
    """A tiny Gemma-style causal LM with "<bos>" and a single-token "Yes", for the
    bge-reranker-v2-gemma template."""
    out_dir = Path(out_dir)
    tok = train_tokenizer(out_dir, list(texts) + ["Yes", "No"] * 50)
    tok.add_tokens([AddedToken("<bos>", special=True, normalized=False)])
    tok.save_pretrained(str(out_dir))
    if len(tok("Yes", add_special_tokens=False)["input_ids"]) != 1:
        raise RuntimeError("tokenizer training did not make 'Yes' a single token")
    config = GemmaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=16, initializer_range=0.1,
                         bos_token_id=tok.convert_tokens_to_ids("<bos>"),
                         pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                         eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), architectures=["GemmaForCausalLM"])
    torch.manual_seed(seed)
    model = GemmaForCausalLM(config)
    spread_norms(model, mean=0.0)  # Gemma's norm scales by (1 + w)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir
