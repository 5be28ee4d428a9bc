"""Shared fixtures: tiny random-weight Qwen3 rerankers (tied and untied embeddings) built with
the real save_pretrained/from_pretrained code, the real data in ../shared/data, and a plain
reimplementation of the official scoring recipe to compare against."""

from __future__ import annotations

import os
import sys

# No test reaches a hub: set before huggingface_hub or transformers is imported (they read it once).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The RAR-b data: ../shared/data beside the checkout, or wherever RERANK_SHARED_DATA points (a GPU machine
# without the checkout's neighbours).
SHARED_DATA = os.environ.get("RERANK_SHARED_DATA", os.path.join(os.path.dirname(ROOT), "shared", "data"))
sys.path.insert(0, ROOT)

torch.set_num_threads(2)


def after_pairs(n: int, action):
    """An `on_progress` for run(): calls action() once, when n pairs have been scored. An event of
    the run (its progress), not a count of how often some code looked at a flag."""
    scored = [0]

    def on_progress(pairs: int, tokens: int) -> None:
        before = scored[0]
        scored[0] += pairs
        if before < n <= scored[0]:
            action()

    return on_progress


def stop_after_pairs(n: int, signum: int = 2) -> dict:
    """run() keywords that stop the run once n pairs are scored: the token is set then, and the
    run stops at its next check point (runtime/stop.py), as after a signal `signum`."""
    from pipeline.runtime.stop import StopToken

    stop = StopToken()
    return {"should_stop": stop, "on_progress": after_pairs(n, lambda: stop.set(signum))}


def shared(name: str) -> str:
    path = os.path.join(SHARED_DATA, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: the shared data must sit beside the checkout (../shared/data), "
                                "or RERANK_SHARED_DATA must name its folder")
    return path


def real_pairs(per_set: int = 120) -> pa.Table:
    """Real long-form pairs from the three RAR-b sets: per_set rows of each, all columns."""
    tables = []
    for name in ("ARC-Challenge", "physicaliqa", "spartqa"):
        tables.append(pq.read_table(shared(f"{name}.long.parquet")).slice(0, per_set))
    return pa.concat_tables(tables)


def _corpus() -> list[str]:
    t = real_pairs(400)
    return t.column("query").to_pylist() + t.column("document").to_pylist()


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """{'tied': dir, 'untied': dir}: tiny Qwen3 rerankers whose scores spread over (0, 1)."""
    from pipeline.bench.synthetic import build_reranker

    texts = _corpus()
    out = {}
    for name, tie in (("tied", True), ("untied", False)):
        d = tmp_path_factory.mktemp(f"model-{name}")
        build_reranker(d, arch="tiny", tie_word_embeddings=tie, texts=texts, init_std=0.1,
                       seed=1 if tie else 2)
        out[name] = str(d)
    return out


@pytest.fixture(scope="session")
def tied_model(models):
    return models["tied"]


PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and "
          "the Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n"
          "<|im_start|>user\n")
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def reference_scores(model_dir: str, instructions, queries, documents, max_length: int = 8192,
                     batch_size: int = 16) -> np.ndarray:
    """The official transformers example, written out independently of the pipeline: left-padded
    batches, the full forward with full-vocabulary logits, float32, log_softmax over [no, yes]."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prefix_tokens = tok.encode(PREFIX, add_special_tokens=False)
    suffix_tokens = tok.encode(SUFFIX, add_special_tokens=False)
    yes = tok.convert_tokens_to_ids("yes")
    no = tok.convert_tokens_to_ids("no")
    pairs = [f"<Instruct>: {i}\n<Query>: {q}\n<Document>: {d}" for i, q, d in zip(instructions, queries, documents)]
    out = []
    for k in range(0, len(pairs), batch_size):
        inputs = tok(pairs[k:k + batch_size], padding=False, truncation="longest_first",
                     return_attention_mask=False,
                     max_length=max_length - len(prefix_tokens) - len(suffix_tokens))
        for i, ele in enumerate(inputs["input_ids"]):
            inputs["input_ids"][i] = prefix_tokens + ele + suffix_tokens
        inputs = tok.pad(inputs, padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[:, -1, :]
        scores = torch.stack([logits[:, no], logits[:, yes]], dim=1)
        out.append(torch.nn.functional.log_softmax(scores, dim=1)[:, 1].exp())
    return torch.cat(out).numpy()


def cut_in_half(path) -> None:
    """Keep the first half of a file's bytes (a copy or download that stopped half way)."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def transformers_modules_after(code: str) -> list[str]:
    """Run `code` in a fresh Python (direct loading on: RERANK_DIRECT_LOAD unset) and return the
    transformers modules it imported, which the code's last line must print (sorted list)."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("RERANK_DIRECT_LOAD", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    import ast

    return ast.literal_eval(out.stdout.strip().splitlines()[-1])


def run_cli(args, **kw):
    """Invoke `rerank-batch` in-process through click's CliRunner."""
    from click.testing import CliRunner

    from jobs.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, **kw)


@pytest.fixture(autouse=True)
def _our_log_levels():
    """A CLI run in this process (a test's or a module fixture's) sets our loggers' levels (-q:
    errors only); each test starts with them unset, as in a fresh process, so that its caplog
    sees the warnings it waits for whatever ran before it."""
    import logging

    names = ("rerank-batch", "pipeline", "jobs", "rerank-batch.result")
    for n in names:
        logging.getLogger(n).setLevel(logging.NOTSET)
    yield
    for n in names:
        logging.getLogger(n).setLevel(logging.NOTSET)


# The start of a child CLI script (`python -c`) that SIGKILLs itself before or after the Nth
# os.replace whose target matches a regex, when KILL_AT_REPLACE="regex:N:before|after" is set:
# before a rename (a temp file fully written, not yet in place) or just after it.
KILL_AT_REPLACE_CHILD = r"""
import os, re, signal, sys
spec = os.environ.get("KILL_AT_REPLACE")
if spec:
    pattern, nth, when = spec.rsplit(":", 2)
    real = os.replace
    seen = [0]
    def replace(src, dst, *a, **k):
        hit = re.search(pattern, str(dst)) is not None
        if hit:
            seen[0] += 1
        if hit and seen[0] == int(nth) and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        out = real(src, dst, *a, **k)
        if hit and seen[0] == int(nth) and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    os.replace = replace
"""
