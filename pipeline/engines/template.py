"""Prompt templates of yes/no rerankers: prefix, body, suffix and the judged tokens. The built-in
ones and the default per model type; --template (a name or a JSON file) is resolved in resolve.py."""

from __future__ import annotations

from dataclasses import dataclass


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

