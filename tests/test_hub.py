"""`--model org/name`: a hub id resolves through the Hugging Face cache. Tests reach no hub: they
lay out a cache in a temporary directory (models--org--name/snapshots/<rev>/, refs/main) and test
the offline branches, and "unreachable" with an endpoint on a closed local port."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from conftest import ROOT, run_cli

from pipeline.errors import ModelError
from pipeline.engines.model_files import resolve_model

SAMPLE = os.path.join(ROOT, "sample_data", "pairs.parquet")
TINY = os.path.join(ROOT, "sample_data", "tiny-qwen3-reranker")
REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """HF_HOME in tmp_path with `org/tiny` cached (the sample model) at revision REV."""
    repo = tmp_path / "hf" / "hub" / "models--org--tiny"
    shutil.copytree(TINY, repo / "snapshots" / REV)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo / "snapshots" / REV


def test_offline_uses_the_cached_snapshot(tmp_path, hub_cache):
    assert resolve_model("org/tiny") == str(hub_cache)
    out = tmp_path / "out.parquet"
    r = run_cli(["run", SAMPLE, "--model", "org/tiny", "-o", out, "-q"])
    assert r.exit_code == 0, r.output
    assert pq.read_table(out).num_rows == pq.read_table(SAMPLE).num_rows


def test_offline_and_not_cached_is_one_line_with_the_fix(tmp_path, hub_cache):
    r = run_cli(["run", SAMPLE, "--model", "org/missing", "-o", tmp_path / "o.parquet"])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1, r.output
    assert "org/missing: not in the Hugging Face cache" in lines[0] and "HF_HUB_OFFLINE is set" in lines[0]
    assert "`hf download org/missing`" in lines[0] and "pass a model directory" in lines[0]


def test_unreachable_hub_falls_back_to_the_cache(hub_cache, monkeypatch):
    import huggingface_hub.constants as c

    # Online mode, but the hub is a closed port on this machine: connection refused at once.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert resolve_model("org/tiny") == str(hub_cache)
    with pytest.raises(ModelError) as e:
        resolve_model("org/missing")
    msg = str(e.value)
    assert "not in the Hugging Face cache" in msg and "the hub cannot be reached" in msg and "\n" not in msg
    assert "`hf download org/missing`" in msg
    assert e.value.exit_code == 1  # a runtime failure (retried by a scheduler), unlike HF_HUB_OFFLINE's 2


def test_not_a_directory_nor_a_hub_id(tmp_path):
    with pytest.raises(ModelError, match=r"no such directory; check the path \(a hub id is org/name\)"):
        resolve_model(str(tmp_path / "a" / "b" / "c"))


@pytest.mark.parametrize("model", ["sample_data/tiny-qwen3-rerankr", "./tiny/model", "../tiny/model",
                                   "~/no-such-dir-here/model"])
def test_a_mistyped_local_path_is_a_path_not_a_hub_id(tmp_path, hub_cache, model, monkeypatch):
    """Shaped like org/name, but its first component exists here (or it starts with . or ~): the
    user meant a directory, so the error says so instead of sending them to `hf download`."""
    monkeypatch.chdir(ROOT)  # where sample_data/ exists
    out = tmp_path / "o.parquet"
    r = run_cli(["run", SAMPLE, "--model", model, "-o", out])
    assert r.exit_code == 2, r.output
    assert r.output == f"Error: model {model}: no such directory; check the path (a hub id is org/name)\n"
    assert not out.exists()


def test_a_hub_id_whose_org_is_no_local_name_still_goes_to_the_hub(hub_cache):
    assert resolve_model("org/tiny") == str(hub_cache)


def test_uncached_hub_id_prints_one_line_on_a_real_stderr(tmp_path):
    """In a fresh process (dependencies log through their own handlers there): one line only."""
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_CACHE", None)
    p = subprocess.run([sys.executable, "-m", "jobs.cli", "run", SAMPLE, "--model", "org/missing",
                        "-o", str(tmp_path / "o.parquet")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stdout == "" and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_a_model_file_is_named_a_file(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(ModelError) as e:
        resolve_model(str(weights))
    assert str(e.value) == (f"model {weights}: a file, not a directory; --model takes the model's directory (the "
                            "folder with config.json, the tokenizer and the weights) or a hub id (org/name)")
    r = run_cli(["run", SAMPLE, "--model", weights, "-o", tmp_path / "out.parquet", "-q"])
    assert r.exit_code == 2
    assert r.output.strip() == f"Error: {e.value}"
