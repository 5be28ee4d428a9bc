"""The CLI's bytecode cache for installs that keep none (pipeline/job/bytecode.py): it is used
only where the probed package has no compiled files beside its sources, it is written even under
PYTHONDONTWRITEBYTECODE, and a second process then imports without compiling any source."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A fresh process: count source compilations while importing `fakepkg` after use_pycache().
CHILD = r"""
import json, sys
import importlib._bootstrap_external as be
compiled = []
orig = be.SourceLoader.source_to_code
def counting(self, data, path, **kw):
    compiled.append(path)
    return orig(self, data, path, **kw)
be.SourceLoader.source_to_code = counting
from pipeline.job.bytecode import use_pycache
used = use_pycache(sys.argv[1])
import fakepkg, fakepkg.mod
print(json.dumps({"used": used, "prefix": sys.pycache_prefix,
                  "compiled": [p for p in compiled if "fakepkg" in p]}))
"""


def _pkg(tmp_path, with_bytecode=False):
    src = tmp_path / "site"
    pkg = src / "fakepkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("X = 1\n")
    (pkg / "mod.py").write_text("def f():\n    return 2\n")
    if with_bytecode:
        import py_compile

        for f in ("__init__.py", "mod.py"):
            py_compile.compile(str(pkg / f), doraise=True)
    return src


def _child(tmp_path, src, **env):
    e = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, str(src)]), "XDG_CACHE_HOME": str(tmp_path / "cache"),
         "PYTHONDONTWRITEBYTECODE": "1", **env}
    e.pop("PYTHONPYCACHEPREFIX", None)
    p = subprocess.run([sys.executable, "-c", CHILD, "fakepkg"], capture_output=True, text=True, env=e, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_an_install_without_bytecode_compiles_once_then_loads_from_our_cache(tmp_path):
    src = _pkg(tmp_path)
    first = _child(tmp_path, src)
    cache = str(tmp_path / "cache" / "rerank-batch" / "pycache")
    assert first["used"] == cache and first["prefix"] == cache
    assert len(first["compiled"]) == 2  # both modules compiled from source the first time
    written = [os.path.join(d, f) for d, _, fs in os.walk(cache) for f in fs if f.endswith(".pyc")]
    assert any("fakepkg" in w for w in written), written
    assert not (src / "fakepkg" / "__pycache__").exists()  # the source tree stays as it was
    second = _child(tmp_path, src)
    assert second["used"] == cache
    assert second["compiled"] == []  # served from the cache: nothing compiled again


def test_an_install_with_its_own_bytecode_is_left_alone(tmp_path):
    src = _pkg(tmp_path, with_bytecode=True)
    out = _child(tmp_path, src)
    assert out["used"] == "" and out["prefix"] is None
    assert out["compiled"] == []  # its own .pyc files were used
    assert not (tmp_path / "cache").exists()


def test_turned_off_or_unwritable(tmp_path):
    src = _pkg(tmp_path)
    off = _child(tmp_path, src, RERANK_PYCACHE="0")
    assert off["used"] == "" and off["prefix"] is None and len(off["compiled"]) == 2
    (tmp_path / "cache").write_text("a file where the cache directory would go")
    blocked = _child(tmp_path, src)
    assert blocked["used"] == "" and blocked["prefix"] is None


def test_the_cli_sets_it_before_importing_torch():
    src = open(os.path.join(ROOT, "jobs", "cli.py")).read()
    assert src.index("use_pycache()") < src.index("import click")
    from pipeline.job import bytecode

    assert bytecode.PROBE == "torch"
