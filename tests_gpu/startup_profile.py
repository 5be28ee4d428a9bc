"""Where the 0.6B CLI's seconds go before and after scoring, on a GPU machine: about 4
minutes. Builds the model and a mixed-workload file as startup.py does, then in
fresh processes: a cold run (fills the Inductor cache), a warm run, a warm run under cProfile
(the main thread: top functions by cumulative time to OUT/startup_profile.txt), a warm run with
TORCHINDUCTOR_COMPILE_THREADS=1 (no compile-worker pool), and the warm-up's steps one by one.

    python3 tests_gpu/startup_profile.py --out $OUT
    python3 tests_gpu/startup_profile.py --smoke --out /tmp/x   # CPU, tiny: checks the script
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from startup import cli_run  # noqa: E402

MICRO = r"""
import time, json, sys
t = [("start", time.time())]
import torch
t.append(("import_torch", time.time()))
dev = torch.device(sys.argv[1])
if dev.type == "cuda":
    torch.zeros(1, device=dev); torch.cuda.synchronize()
t.append(("cuda_init", time.time()))
import torch._dynamo
t.append(("import_dynamo", time.time()))
import torch._inductor.compile_fx
t.append(("import_inductor", time.time()))
from pipeline.engines import compiled, fused_qwen3
from pipeline.engines.model_files import read_config
c = read_config(sys.argv[2])
compiled.use_cache_dir()
h, hkv, d, hid = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
w = lambda n: torch.ones(n, device=dev, dtype=torch.bfloat16)
z = lambda n: torch.zeros(16, n, device=dev, dtype=torch.bfloat16)
with torch.inference_mode():
    compiled.compile_rows(fused_qwen3.qk_norm_rope)(z((h + 2 * hkv) * d), w(d), w(d), z(d), z(d), c.rms_norm_eps, h, hkv, d)
    torch.cuda.synchronize() if dev.type == "cuda" else None
    t.append(("qk_norm_rope", time.time()))
    compiled.compile_rows(fused_qwen3.add_norm)(z(hid), z(hid), w(hid), c.rms_norm_eps)
    t.append(("add_norm", time.time()))
    compiled.compile_rows(fused_qwen3.swiglu)(z(2 * c.intermediate_size))
    t.append(("swiglu", time.time()))
    compiled.compile_rows(fused_qwen3.rms_norm)(z(hid), w(hid), c.rms_norm_eps)
    torch.cuda.synchronize() if dev.type == "cuda" else None
    t.append(("rms_norm", time.time()))
print(json.dumps({b[0]: round(b[1] - a[1], 3) for a, b in zip(t, t[1:])}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    import pyarrow.parquet as pq
    import torch

    from pipeline.bench.peer import build_saved_model
    from pipeline.bench.throughput import WORKLOADS, workload_table

    arch, pairs, device = ("tiny", 300, "cpu") if args.smoke else ("0.6b", 6000, "cuda")
    os.makedirs(args.out, exist_ok=True)
    rec: dict = {"arch": arch, "pairs": pairs}
    out_json = os.path.join(args.out, "startup_profile.json")
    with tempfile.TemporaryDirectory(prefix="sprof-") as work:
        mdir = build_saved_model(arch, os.path.join(work, "model"), torch.device(device), torch.bfloat16)
        inp = os.path.join(work, "in.parquet")
        pq.write_table(workload_table(WORKLOADS["w-mixed"], pairs), inp)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
               "TORCHINDUCTOR_CACHE_DIR": os.path.join(work, "inductor")}
        extra = ["--compile", "on"] if args.smoke else []

        def cli(tag, env_=env, prefix=()):
            r = cli_run(mdir, inp, work, tag, device, 8192, env_, prefix=prefix, extra=extra)
            r.pop("output", None)
            rec[tag] = r
            print(tag, json.dumps(r), flush=True)
            with open(out_json, "w") as f:
                json.dump(rec, f, indent=1)

        cli("cold")
        cli("warm")
        prof = os.path.join(work, "cli.prof")
        # The CLI leaves through os._exit after the exit handlers: the profile is written by one.
        wrap = ("import atexit, cProfile, runpy; pr = cProfile.Profile(); "
                f"atexit.register(lambda: pr.dump_stats({prof!r})); pr.enable(); "
                "runpy.run_module('jobs.cli', run_name='__main__', alter_sys=True)")
        cli("warm_cprofile", prefix=("-c", wrap))
        if os.path.exists(prof):
            s = io.StringIO()
            st = pstats.Stats(prof, stream=s)
            st.sort_stats("cumulative").print_stats(70)
            st.sort_stats("tottime").print_stats(30)
            with open(os.path.join(args.out, "startup_profile.txt"), "w") as f:
                f.write(s.getvalue())
        cli("warm_compile_threads_1", {**env, "TORCHINDUCTOR_COMPILE_THREADS": "1"})
        for tag in ("micro_warm0", "micro_warm1"):
            p = subprocess.run([sys.executable, "-c", MICRO, device, mdir], capture_output=True, text=True, env=env,
                               cwd=ROOT)
            rec[tag] = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else p.stderr[-800:]
            print(tag, rec[tag], flush=True)
        cli("warm_again")
        with open(out_json, "w") as f:
            json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
