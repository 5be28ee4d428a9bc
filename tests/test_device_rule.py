"""One rule for device-bound options: what is asked for by name and cannot be had here is an error
(exit 2, one line with the fix); only `auto` falls back. The GPU is hidden with monkeypatch, so the
same tests hold on a machine that has one."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from conftest import ROOT, run_cli

from pipeline.config import RunConfig
from pipeline.engines import attention, resolve
from pipeline.errors import InputError

SAMPLE = os.path.join(ROOT, "sample_data", "pairs.parquet")
TINY = os.path.join(ROOT, "sample_data", "tiny-qwen3-reranker")


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("args, message", [
    (["--attention", "flash_attn"], "--attention flash_attn needs CUDA and this run is on cpu; use --attention sdpa "
                                    "(or auto) on CPU"),
    (["--attention", "torch_varlen"], "--attention torch_varlen needs CUDA and this run is on cpu; use --attention "
                                      "sdpa (or auto) on CPU"),
    (["--device", "cuda"], "--device cuda: CUDA is not available on this machine; use --device cpu"),
    (["--engine", "transformers", "--compile", "on"], "--compile on compiles the fused engine, and --engine "
     "transformers runs transformers' own modules uncompiled; drop --compile on, or pass --engine auto"),
])
def test_an_explicit_choice_that_cannot_be_had_is_exit_2(no_gpu, tmp_path, args, message):
    out = tmp_path / "o.parquet"
    r = run_cli(["run", SAMPLE, "--model", TINY, "-o", out, *args])
    assert r.exit_code == 2
    assert r.output == f"Error: {message}\n"
    assert not out.exists() and not os.path.exists(f"{out}.ckpt")


def test_auto_falls_back_on_cpu(no_gpu):
    cpu = torch.device("cpu")
    assert resolve.choose_kernel("auto", cpu, torch.float32) == "sdpa"
    assert resolve.choose_kernel("sdpa", cpu, torch.float32) == "sdpa"
    # On CUDA in float32, auto takes the exact SDPA (the varlen kernels have no float32).
    assert resolve.choose_kernel("auto", torch.device("cuda"), torch.float32) == "sdpa"


def test_a_named_kernel_without_float32_or_not_installed_is_refused(monkeypatch):
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    with pytest.raises(InputError, match=r"^--attention flash_attn has no float32 kernel; use --dtype bfloat16 or "
                                         r"float16, or --attention sdpa$"):
        resolve.choose_kernel("flash_attn", cuda, torch.float32)
    monkeypatch.setattr(attention, "flash_attn_varlen", lambda: None)
    with pytest.raises(InputError, match=r"^--attention flash_attn: the flash-attn package does not import here; "
                                         r"install it \(pip install flash-attn --no-build-isolation\) or use "
                                         r"--attention auto$"):
        resolve.choose_kernel("flash_attn", cuda, torch.bfloat16)
    monkeypatch.setattr(attention, "torch_varlen", lambda: None)
    with pytest.raises(InputError, match="torch.nn.attention.varlen; use --attention auto$"):
        resolve.choose_kernel("torch_varlen", cuda, torch.bfloat16)
    assert resolve.choose_kernel("auto", cuda, torch.bfloat16) == "sdpa"  # auto: nothing else here


def test_compile_on_on_cpu_says_it_takes_a_minute(caplog):
    from pipeline.engines.resolve import check_device_options
    from pipeline.engines.compiled import cache_dir

    cfg = RunConfig(inputs=SAMPLE, model=TINY, compile="on")
    with caplog.at_level(logging.INFO, logger="pipeline.engines.resolve"):
        check_device_options(cfg, torch.device("cpu"), torch.float32)
        check_device_options(RunConfig(inputs=SAMPLE, model=TINY), torch.device("cpu"), torch.float32)
    assert [r.getMessage() for r in caplog.records] == [
        "--compile on: on CPU, torch.compile takes a minute or more at the first run; later runs take the kernels "
        f"from its cache ({cache_dir() or 'Inductor' + chr(39) + 's default'})"]


def test_prefix_sharing_on_for_a_cross_encoder_is_refused(tmp_path):
    from conftest import _corpus
    from pipeline.bench.synthetic import build_cross_encoder

    model = str(build_cross_encoder(tmp_path / "bert", "bert", _corpus()[:200], num_labels=1))
    out = tmp_path / "o.parquet"
    r = run_cli(["run", SAMPLE, "--model", model, "-o", out, "--max-length", 128, "--prefix-sharing", "on"])
    assert r.exit_code == 2
    assert r.output == ("Error: --prefix-sharing on: a cross-encoder reads query and document together, so there is "
                        "no shared prefix to compute once; use --prefix-sharing auto or off\n")
    assert not out.exists() and not os.path.exists(f"{out}.ckpt")
    r = run_cli(["run", SAMPLE, "--model", model, "-o", out, "--max-length", 128, "--prefix-sharing", "auto", "-q"])
    assert r.exit_code == 0, r.output
