"""Prompt templates of yes/no rerankers: prefix, body, suffix and the judged tokens."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError


@dataclass(frozen=True)
class Template:
    name: str
    prefix: str
    # Formatted with instruction, query and document; tokenized as ONE string (see CONTEXT.md).
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

TEMPLATES = {t.name: t for t in (QWEN3_RERANKER,)}


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise InputError(
            f"unknown template {name!r}; use one of: {', '.join(sorted(TEMPLATES))}"
        ) from None
