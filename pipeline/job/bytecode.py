"""Cache compiled bytecode where the install keeps none, so torch is not recompiled on every start.

An install made with PYTHONDONTWRITEBYTECODE set, or with `pip --no-compile` into a tree the
user cannot write, has no `__pycache__`: every process then compiles torch's, Dynamo's and
Inductor's sources again. On the H100 machine that was 7.2 s of `compile()` in one CLI run, more
than half of the 11.4 s to the first batch (tests_gpu/startup_profile.py, docs/PERFORMANCE.md).
`use_pycache()` then points Python at a bytecode cache of our own (PYTHONPYCACHEPREFIX's
mechanism, set at run time, and in the environment for worker processes) and lets it write there,
even under PYTHONDONTWRITEBYTECODE: that variable keeps .pyc files out of source trees, and
these stay in the user's cache directory. An install with its own bytecode is left alone.
RERANK_PYCACHE=0 turns this off.
"""

from __future__ import annotations

import importlib.util
import os
import sys

PROBE = "torch"  # the import that dominates startup; its package tells whether bytecode is kept


def cache_dir() -> str:
    """$XDG_CACHE_HOME/rerank-batch/pycache (~/.cache/...), '' where no home directory resolves."""
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        home = os.path.expanduser("~")
        if home.startswith("~") or not os.path.isabs(home):
            return ""
        base = os.path.join(home, ".cache")
    return os.path.join(base, "rerank-batch", "pycache")


def install_has_bytecode(package: str = PROBE) -> bool:
    """Whether `package`'s __init__ has its compiled file beside it (True where it is not found:
    nothing to gain then)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return True
    origin = getattr(spec, "origin", None) if spec is not None else None
    if not origin or not origin.endswith(".py"):
        return True
    prefix = sys.pycache_prefix
    try:
        sys.pycache_prefix = None  # the path beside the source, not under any prefix
        return os.path.exists(importlib.util.cache_from_source(origin))
    finally:
        sys.pycache_prefix = prefix


def use_pycache(package: str = PROBE) -> str:
    """Point this process (and the processes it starts) at our bytecode cache when `package` has
    none of its own; returns the directory used, '' where nothing changed."""
    if os.environ.get("RERANK_PYCACHE", "1") == "0" or sys.pycache_prefix or install_has_bytecode(package):
        return ""
    path = cache_dir()
    if not path:
        return ""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return ""
    if not os.access(path, os.W_OK | os.X_OK):
        return ""
    sys.pycache_prefix = path
    sys.dont_write_bytecode = False
    os.environ["PYTHONPYCACHEPREFIX"] = path
    return path
