"""The direct load (direct.py, fast_tokenizer.py) takes a checkpoint only where transformers would
read the same thing; each case here is one a review found accepted (or crashing) while
transformers reads it otherwise. Also: a broken compiler falls back to eager, and the Inductor
cache directory is chosen only where it can be written."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, cut_in_half
from pipeline.config import RunConfig
from pipeline.engines import compiled, direct, fast_tokenizer
from pipeline.engines.resolve import inspect_model
from pipeline.engines.model_files import read_config
from pipeline.errors import ModelError

TINY = os.path.join(ROOT, "sample_data", "tiny-qwen3-reranker")
PAIRS = os.path.join(ROOT, "sample_data", "pairs.parquet")


def _copy(tmp_path, name="m") -> str:
    d = tmp_path / name
    shutil.copytree(TINY, d)
    return str(d)


def _edit(d, fname, fn):
    p = os.path.join(d, fname)
    with open(p, encoding="utf-8") as f:
        obj = json.load(f)
    obj = fn(obj) or obj
    with open(p, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def _load(d):
    cfg = RunConfig(inputs=(PAIRS,), model=d, device="cpu")
    return direct.load_qwen3(cfg, inspect_model(cfg), torch.device("cpu"), torch.float32)


def _why(d):
    cfg = RunConfig(inputs=(PAIRS,), model=d, device="cpu")
    return direct.why_not(cfg, inspect_model(cfg), read_config(d))


def test_the_unedited_sample_loads_directly(tmp_path):
    assert _load(_copy(tmp_path)) is not None


# 1. transformers 5 reads `rope_scaling or rope_parameters`; 7. the fused MLP is SwiGLU.
@pytest.mark.parametrize("edit", [
    lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                     "original_max_position_embeddings": 32768}),
    lambda c: c.update(rope_scaling={"rope_type": "default", "rope_theta": 1e4}),
    lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "factor": 2.0}),
    lambda c: c.update(hidden_act="gelu"),
    lambda c: c.update(transformers_weights="other.safetensors"),
], ids=["rope_scaling-yarn", "rope_scaling-other-theta", "unknown-rope-field", "gelu", "transformers_weights"])
def test_configs_transformers_reads_otherwise_are_refused(tmp_path, edit):
    d = _copy(tmp_path)
    _edit(d, "config.json", edit)
    assert _why(d) is not None
    assert _load(d) is None


def test_fused_supports_refuses_what_the_direct_load_refuses():
    from types import SimpleNamespace

    from pipeline.engines import fused_qwen3

    def hf(**kw):
        base = dict(model_type="qwen3", hidden_act="silu", rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        return SimpleNamespace(config=SimpleNamespace(**{**base, **kw}))

    assert fused_qwen3.supports(hf())
    assert not fused_qwen3.supports(hf(hidden_act="gelu"))
    assert not fused_qwen3.supports(hf(rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    assert not fused_qwen3.supports(hf(rope_scaling={"rope_type": "default", "rope_theta": 1e4}))


# 2. The added vocabulary transformers ends with must be tokenizer.json's.
def _decoder(tj, ids):
    keys = ("content", "lstrip", "rstrip", "single_word", "normalized", "special")
    return {str(a["id"]): {k: a[k] for k in keys} for a in tj["added_tokens"] if a["id"] in ids}


def _tok_dir(tmp_path, edit) -> str:
    d = tmp_path / "tok"
    d.mkdir()
    shutil.copy(os.path.join(TINY, "tokenizer.json"), d)
    with open(os.path.join(TINY, "tokenizer.json"), encoding="utf-8") as f:
        tj = json.load(f)
    with open(os.path.join(TINY, "tokenizer_config.json"), encoding="utf-8") as f:
        c = json.load(f)
    edit(c, tj)
    with open(d / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(c, f)
    with open(d / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(tj, f)
    return str(d)


@pytest.mark.parametrize("edit", [
    lambda c, tj: c.update(added_tokens_decoder=_decoder(tj, {a["id"] for a in tj["added_tokens"][:3]})),
    lambda c, tj: c.update(extra_special_tokens=["<|new|>"]),
    lambda c, tj: c.update(additional_special_tokens=["<|new|>"]),
    lambda c, tj: c.update(pad_token="<|not-there|>"),
    # 9. Malformed entries: refused with a reason, not raised.
    lambda c, tj: c.update(added_tokens_decoder={"x": {"content": "<|endoftext|>"}}),
    lambda c, tj: c.update(added_tokens_decoder={str(a["id"]): "text" for a in tj["added_tokens"]}),
    lambda c, tj: tj["added_tokens"][0].pop("id"),
    lambda c, tj: tj["added_tokens"].append("<|str|>"),
], ids=["decoder-subset", "extra-special-new", "additional-special-new", "pad-unknown", "decoder-key-not-int",
        "decoder-entry-not-dict", "added-without-id", "added-not-dict"])
def test_tokenizers_transformers_reads_otherwise_are_refused(tmp_path, edit):
    tok, why = fast_tokenizer.load(_tok_dir(tmp_path, edit))
    assert tok is None and why


@pytest.mark.parametrize("edit", [
    lambda c, tj: c.update(added_tokens_decoder=_decoder(tj, {a["id"] for a in tj["added_tokens"]}),
                           additional_special_tokens=["<|im_start|>", "<|im_end|>"]),
    lambda c, tj: [c.pop(k) for k in ("pad_token", "unk_token", "eos_token")],
    lambda c, tj: c.update(pad_token=None),
], ids=["full-decoder-known-specials", "specials-absent", "pad-null"])
def test_accepted_tokenizers_match_autotokenizer(tmp_path, edit):
    from transformers import AutoTokenizer

    d = _tok_dir(tmp_path, edit)
    ours, why = fast_tokenizer.load(d)
    assert ours is not None, why
    ref = AutoTokenizer.from_pretrained(d)
    text = "a <think> b <|new|> c <|im_end|> d<|endoftext|>"
    assert ours([text], add_special_tokens=False)["input_ids"] == ref([text], add_special_tokens=False)["input_ids"]
    assert len(ours) == len(ref)
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert (getattr(ours, name), getattr(ours, name + "_id")) == (getattr(ref, name), getattr(ref, name + "_id")), name


# 3. / 4. Which weight files, and what a broken one says.
def _index(d, weight_map):
    with open(os.path.join(d, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def test_model_safetensors_wins_over_an_index(tmp_path):
    d = _copy(tmp_path)
    _index(d, {"model.embed_tokens.weight": "missing-00001.safetensors"})
    files, why = direct.weight_files(d)
    assert files == [os.path.join(d, "model.safetensors")], why
    assert _load(d) is not None


@pytest.mark.parametrize("shard", ["../outside.safetensors", "missing.safetensors", None, "malformed"])
def test_sharded_weights_not_fully_inside_are_refused(tmp_path, shard):
    d = _copy(tmp_path)
    if shard == "../outside.safetensors":
        shutil.copy(os.path.join(d, "model.safetensors"), tmp_path / "outside.safetensors")
    os.rename(os.path.join(d, "model.safetensors"), os.path.join(d, "shard.safetensors"))
    if shard == "malformed":
        with open(os.path.join(d, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            f.write("{not json")
    else:
        _index(d, {"model.embed_tokens.weight": "shard.safetensors", "model.norm.weight": shard})
    files, why = direct.weight_files(d)
    assert files is None and why
    assert _load(d) is None


def test_a_truncated_safetensors_file_is_a_one_line_model_error(tmp_path):
    d = _copy(tmp_path)
    p = os.path.join(d, "model.safetensors")
    cut_in_half(p)
    with pytest.raises(ModelError, match="cannot load safetensors weights") as err:
        _load(d)
    assert "\n" not in str(err.value) and d in str(err.value)


def test_a_tensor_that_fails_while_loading_is_a_model_error(tmp_path):
    """The header is fine, the data is cut: the loader thread's error comes back as ModelError."""
    d = _copy(tmp_path)
    p = os.path.join(d, "model.safetensors")
    with open(p, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    last = max((v["data_offsets"][1], k) for k, v in header.items() if k != "__metadata__")
    header[last[1]]["data_offsets"][1] += 1 << 20  # past the end of the file
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data[8 + n:])
    with pytest.raises(ModelError, match="cannot load safetensors weights"):
        _load(d)


# 5. A broken compiler: the warm-up sees it, the run goes on eagerly (both load paths).
def test_a_broken_compiler_runs_eagerly(tmp_path):
    code = (
        "import os, sys, numpy as np, pyarrow.parquet as pq\n"
        "from pipeline.config import RunConfig\nfrom pipeline.run import run\n"
        "def scores(direct, compile):\n"
        "    os.environ['RERANK_DIRECT_LOAD'] = direct\n"
        f"    out = {str(tmp_path)!r} + f'/o-{{direct}}-{{compile}}.parquet'\n"
        f"    run(RunConfig(inputs=({PAIRS!r},), output=out, model={TINY!r}, device='cpu', compile=compile,\n"
        "        overwrite=True, restart=True), progress=False)\n"
        "    return pq.read_table(out).column('score').to_numpy()\n"
        "eager = scores('1', 'off')\n"
        "for d in ('1', '0'):\n"
        "    assert np.array_equal(scores(d, 'on'), eager), d\n"
        "print('OK')\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT, "CC": "/bin/false", "CXX": "/bin/false",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}  # no cached kernels to fall back on
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("OK")
    assert "running eagerly" in out.stderr


def test_fused_encoder_falls_back_when_its_warm_up_fails(tmp_path, monkeypatch):
    from pipeline.bench.synthetic import build_cross_encoder
    from pipeline.engines.score import load_engine

    model = str(build_cross_encoder(tmp_path / "bert", "bert", ["a b c", "d e f"], num_labels=1))

    def broken(fn):
        def call(*a):
            raise RuntimeError("compiler broken")
        return call

    monkeypatch.setattr(compiled, "compile_rows", broken)
    e = load_engine(RunConfig(inputs=(PAIRS,), model=model, device="cpu", compile="on"))
    assert e.info.forward == "fused-encoder" and not e.info.compiled


# 6. The Inductor cache directory.
def test_cache_dir_unresolvable_home_is_inductors_default(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(os.path, "expanduser", lambda p: p)  # no HOME, no passwd entry
    monkeypatch.chdir(tmp_path)
    assert compiled.use_cache_dir() == ""
    assert os.listdir(tmp_path) == []


def test_cache_dir_not_writable_is_inductors_default(tmp_path, monkeypatch):
    """A cache directory this user cannot write (os.access decides, so the test holds as root,
    which ignores permission bits)."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(os, "access", lambda p, mode: False)
    assert compiled.use_cache_dir() == ""
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ or os.environ["TORCHINDUCTOR_CACHE_DIR"] != str(
        tmp_path / "xdg" / "rerank-batch" / "inductor")


def test_cache_dir_ignores_a_relative_xdg_cache_home(tmp_path, monkeypatch):
    """The XDG spec: a relative XDG_CACHE_HOME is invalid and ignored (else the cache would land
    in whatever directory the run starts from)."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "rel")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compiled.cache_dir() == str(tmp_path / "home" / ".cache" / "rerank-batch" / "inductor")


# 8. The loader thread gets the calling thread's CUDA device, not cuda:0.
def test_the_loader_threads_device_is_the_callers(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert direct.thread_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert direct.thread_device(torch.device("cuda", 0)) == torch.device("cuda", 0)
    assert direct.thread_device(torch.device("cpu")) == torch.device("cpu")
