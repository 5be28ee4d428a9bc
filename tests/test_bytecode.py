"""The CLI's bytecode cache for installs that keep none (pipeline/runtime/bytecode.py): it is used
only where the probed package has no compiled files beside its sources, it is written even under
PYTHONDONTWRITEBYTECODE, a second process then imports without compiling any source, workers
inherit it, and a user's own settings are left alone."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A fresh process: count source compilations while importing `fakepkg` after use_pycache().
CHILD = r"""
import json, os, sys
import importlib._bootstrap_external as be
compiled = []
orig = be.SourceLoader.source_to_code
def counting(self, data, path, **kw):
    compiled.append(path)
    return orig(self, data, path, **kw)
be.SourceLoader.source_to_code = counting
from pipeline.runtime.bytecode import use_pycache
used = use_pycache(sys.argv[1])
import fakepkg, fakepkg.mod
print(json.dumps({"used": used, "prefix": sys.pycache_prefix, "env": os.environ.get("PYTHONPYCACHEPREFIX"),
                  "writes": not sys.dont_write_bytecode, "compiled": [p for p in compiled if "fakepkg" in p]}))
"""


def _pkg(tmp_path, with_bytecode=False, version=None):
    src = tmp_path / "site"
    pkg = src / "fakepkg"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("X = 1\n")
    (pkg / "mod.py").write_text("def f():\n    return 2\n")
    if with_bytecode:
        import py_compile

        for f in ("__init__.py", "mod.py"):
            py_compile.compile(str(pkg / f), doraise=True)
    if version:
        for old in src.glob("fakepkg-*.dist-info"):
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
        info = src / f"fakepkg-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fakepkg\nVersion: {version}\n")
    return src


def _child(tmp_path, src, flags=(), drop=(), **env):
    e = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, str(src)]), "XDG_CACHE_HOME": str(tmp_path / "cache"),
         "PYTHONDONTWRITEBYTECODE": "1", **env}
    for k in ("PYTHONPYCACHEPREFIX", "RERANK_PYCACHE_DIR", *drop):
        if k not in env:
            e.pop(k, None)
    p = subprocess.run([sys.executable, *flags, "-c", CHILD, "fakepkg"], capture_output=True, text=True, env=e,
                       timeout=120, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def _pycs(root):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".pyc") and "fakepkg" in d]


def test_an_install_without_bytecode_compiles_once_then_loads_from_our_cache(tmp_path):
    src = _pkg(tmp_path)
    first = _child(tmp_path, src)
    cache = str(tmp_path / "cache" / "rerank-batch" / "pycache" / "fakepkg-unknown")
    assert first["used"] == cache and first["prefix"] == cache
    assert first["env"] == cache  # the processes it starts read the same tree
    assert len(first["compiled"]) == 2  # both modules compiled from source the first time
    assert len(_pycs(cache)) == 2
    assert not (src / "fakepkg" / "__pycache__").exists()  # the source tree stays as it was
    second = _child(tmp_path, src)
    assert second["used"] == cache
    assert second["compiled"] == []  # served from the cache: nothing compiled again


def test_a_new_version_gets_a_new_tree(tmp_path):
    """Python checks cached bytecode against the source's mtime and size only; an upgrade that
    keeps both would load the old bytecode from one shared tree."""
    src = _pkg(tmp_path, version="1.0")
    one = _child(tmp_path, src)
    assert one["used"].endswith(os.path.join("pycache", "fakepkg-1.0"))
    _pkg(tmp_path, version="2.0")
    two = _child(tmp_path, src)
    assert two["used"].endswith(os.path.join("pycache", "fakepkg-2.0")) and len(two["compiled"]) == 2


def test_a_worker_inherits_the_cache_and_writes_to_it(tmp_path):
    """A spawned worker gets -B and PYTHONDONTWRITEBYTECODE from its driver; with our prefix
    inherited it still writes the modules only it imports."""
    src = _pkg(tmp_path)
    shared = str(tmp_path / "inherited")
    w = _child(tmp_path, src, flags=("-B",), PYTHONPYCACHEPREFIX=shared, RERANK_PYCACHE_DIR=shared)
    assert w["used"] == shared and w["writes"]
    assert len(_pycs(shared)) == 2


def test_an_install_with_its_own_bytecode_is_left_alone(tmp_path):
    src = _pkg(tmp_path, with_bytecode=True)
    out = _child(tmp_path, src)
    assert out["used"] == "" and out["prefix"] is None
    assert out["compiled"] == []  # its own .pyc files were used
    assert not (tmp_path / "cache").exists()


def test_the_users_own_settings_are_left_alone(tmp_path):
    src = _pkg(tmp_path)
    off = _child(tmp_path, src, RERANK_PYCACHE="0")
    assert off["used"] == "" and off["prefix"] is None and len(off["compiled"]) == 2
    own = str(tmp_path / "own")
    mine = _child(tmp_path, src, PYTHONPYCACHEPREFIX=own)  # not marked as ours
    assert mine["used"] == "" and mine["prefix"] == own and not mine["writes"]
    dash_b = _child(tmp_path, src, flags=("-B",), drop=("PYTHONDONTWRITEBYTECODE",))  # -B given by hand
    assert dash_b["used"] == "" and dash_b["prefix"] is None
    (tmp_path / "cache").write_text("a file where the cache directory would go")
    blocked = _child(tmp_path, src)
    assert blocked["used"] == "" and blocked["prefix"] is None


def test_a_relative_xdg_cache_home_is_ignored(tmp_path):
    src = _pkg(tmp_path)
    out = _child(tmp_path, src, XDG_CACHE_HOME="rel", HOME=str(tmp_path / "home"))
    assert out["used"] == str(tmp_path / "home" / ".cache" / "rerank-batch" / "pycache" / "fakepkg-unknown")
    assert not (tmp_path / "rel").exists()


def test_the_cli_sets_it_before_importing_torch(tmp_path):
    """Importing the CLI module imports no torch, and main() asks for the cache first."""
    code = ("import json, sys\n"
            "import jobs.cli as c, pipeline.runtime.bytecode as b\n"
            "at_import = 'torch' in sys.modules\n"
            "def probe(*a):\n"
            "    print(json.dumps({'at_import': at_import, 'at_call': 'torch' in sys.modules}), flush=True)\n"
            "    return ''\n"
            "b.use_pycache = probe\n"
            "sys.argv = ['rerank-batch', '--version']\n"
            "c.main()\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.splitlines()[0]) == {"at_import": False, "at_call": False}
