"""Prompt templates of yes/no rerankers: prefix, body, suffix and the judged tokens."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from pipeline.errors import InputError


@dataclass(frozen=True)
class Template:
    name: str
    prefix: str
    # Formatted with instruction, query and document; tokenized as ONE string, as the
    # model card's recipe does (so the ids match the reference scores).
    body: str
    suffix: str
    positive: str
    negative: str | None

    def format_body(self, instruction: str, query: str, document: str) -> str:
        return self.body.format(instruction=instruction, query=query, document=document)


QWEN3_RERANKER = Template(
    name="qwen3-reranker",
    prefix=(
        "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
        'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
        "<|im_start|>user\n"
    ),
    body="<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}",
    suffix="<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    positive="yes",
    negative="no",
)

# BAAI/bge-reranker-v2-gemma (FlagEmbedding's LLM reranker): the raw logit of "Yes" is the score.
# FlagEmbedding tokenizes "A: query" and "B: passage" apart; here the body is one string, as for
# every template, so ids may differ from FlagEmbedding's at the seams.
BGE_RERANKER_V2_GEMMA = Template(
    name="bge-reranker-v2-gemma",
    prefix="<bos>",
    body="A: {query}\nB: {document}\n",
    suffix=("Given a query A and a passage B, determine whether the passage contains an answer to the query "
            "by providing a prediction of either 'Yes' or 'No'."),
    positive="Yes",
    negative=None,
)

TEMPLATES = {t.name: t for t in (QWEN3_RERANKER, BGE_RERANKER_V2_GEMMA)}
# The template a causal-LM reranker gets when --template is not given, by config model_type.
DEFAULT_TEMPLATE = {"qwen3": "qwen3-reranker", "qwen2": "qwen3-reranker", "gemma": "bge-reranker-v2-gemma",
                    "gemma2": "bge-reranker-v2-gemma"}


def get_template(name: str) -> Template:
    """A built-in template by name, or a JSON file with prefix, body, suffix, positive and
    (optionally) negative."""
    if name in TEMPLATES:
        return TEMPLATES[name]
    if name.endswith(".json") or os.path.isfile(name):
        return load_template_file(name)
    raise InputError(
        f"unknown template {name!r}; use one of: {', '.join(sorted(TEMPLATES))}, or a JSON template file"
    )


def load_template_file(path: str) -> Template:
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except OSError as exc:
        raise InputError(f"{path}: cannot read the template ({exc.strerror}); check the path") from None
    except ValueError as exc:
        raise InputError(f"{path}: the template is not valid JSON ({exc}); fix the file") from None
    if not isinstance(spec, dict):
        raise InputError(f"{path}: the template must be a JSON object with prefix, body, suffix, positive")
    missing = [k for k in ("prefix", "body", "suffix", "positive") if not isinstance(spec.get(k), str)]
    if missing:
        raise InputError(f"{path}: the template needs string fields prefix, body, suffix, positive "
                         f"(missing {', '.join(missing)}); add them")
    if "{query}" not in spec["body"] or "{document}" not in spec["body"]:
        raise InputError(f"{path}: the template body must contain {{query}} and {{document}}; add them")
    try:
        spec["body"].format(instruction="", query="", document="")
    except (KeyError, IndexError, ValueError) as exc:
        raise InputError(f"{path}: the template body has a placeholder other than {{instruction}}, {{query}}, "
                         f"{{document}} ({exc}); double literal braces as {{{{ }}}}") from None
    negative = spec.get("negative")
    if negative is not None and not isinstance(negative, str):
        raise InputError(f"{path}: the template's negative must be a string or null")
    if negative == spec["positive"]:  # softmax over two equal logits: every score would be 0.5
        raise InputError(f"{path}: the template's positive and negative are both {negative!r}; make them differ")
    return Template(name=spec.get("name") or os.path.basename(path), prefix=spec["prefix"], body=spec["body"],
                    suffix=spec["suffix"], positive=spec["positive"], negative=negative)
