"""Cache compiled bytecode where the install keeps none, so torch is not recompiled on every start.

An install made with PYTHONDONTWRITEBYTECODE set, or with `pip --no-compile` into a tree the
user cannot write, has no `__pycache__`: every process then compiles torch's, Dynamo's and
Inductor's sources again. On the H100 machine that was 7.2 s of `compile()` in one CLI run, more
than half of the 11.4 s to the first batch (tests_gpu/startup_profile.py, docs/PERFORMANCE.md).
`use_pycache()` then points Python at a bytecode cache of our own (PYTHONPYCACHEPREFIX's
mechanism, set at run time, and in the environment for worker processes) and lets it write there,
even under PYTHONDONTWRITEBYTECODE: that variable keeps .pyc files out of source trees, and
these stay in the user's cache directory, one tree per torch version. An install with its own
bytecode is left alone. RERANK_PYCACHE=0 turns this off.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from importlib.metadata import version

from . import user_cache

PROBE = "torch"  # the import that dominates startup; its package tells whether bytecode is kept
OURS = "RERANK_PYCACHE_DIR"  # set beside PYTHONPYCACHEPREFIX: the prefix a worker inherits is ours


def cache_dir(package: str = PROBE) -> str:
    """<user cache>/pycache/<package>-<version> (runtime/user_cache.path; '' where none). Python
    checks a cached file against its source's mtime and size only, so an upgrade that keeps
    both (installers that clamp mtimes) would load stale bytecode: a new version, a new tree."""
    try:
        ver = version(package)
    except Exception:  # no distribution metadata: one tree for whatever is installed
        ver = "unknown"
    return user_cache.path("pycache", f"{package}-{ver}".replace(os.sep, "_"))


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


def _use(path: str) -> str:
    sys.pycache_prefix = path
    sys.dont_write_bytecode = False
    os.environ["PYTHONPYCACHEPREFIX"] = path
    os.environ[OURS] = path
    return path


def use_pycache(package: str = PROBE) -> str:
    """Point this process (and the processes it starts) at our bytecode cache when `package` has
    none of its own; returns the directory used, '' where nothing changed. Called by the CLI
    before torch is imported, and by pool and Ray workers: a worker that inherits our prefix
    also writes to it (spawn passes -B on from the driver's PYTHONDONTWRITEBYTECODE). A user's
    own PYTHONPYCACHEPREFIX, -B given on the command line, and RERANK_PYCACHE=0 are left alone."""
    if os.environ.get("RERANK_PYCACHE", "1") == "0":
        return ""
    inherited = os.environ.get("PYTHONPYCACHEPREFIX")
    if inherited:
        return _use(inherited) if os.environ.get(OURS) == inherited else ""
    if sys.pycache_prefix or (sys.flags.dont_write_bytecode and not os.environ.get("PYTHONDONTWRITEBYTECODE")):
        return ""
    if install_has_bytecode(package):
        return ""
    path = user_cache.usable(cache_dir(package))
    return _use(path) if path else ""
