"""GPU tests reuse the CPU suite's fixtures (models, data, the reference recipe)."""

import importlib.util
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("cpu_conftest", os.path.join(HERE, "..", "tests", "conftest.py"))
cpu_conftest = importlib.util.module_from_spec(_spec)
sys.modules["cpu_conftest"] = cpu_conftest
_spec.loader.exec_module(cpu_conftest)

models = cpu_conftest.models
tied_model = cpu_conftest.tied_model


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        raise pytest.UsageError("tests_gpu needs a CUDA device; run it on the GPU machine")
