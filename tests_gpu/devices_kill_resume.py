"""Issue 11, item 2 on a machine with several GPUs: the whole run from Parquet to ranked Parquet
on all visible GPUs, one worker SIGKILLed mid-run, then the driver SIGKILLed and the same command
resumed; both outputs must equal the one-device run. Prints one JSON record.

    python3 tests_gpu/devices_kill_resume.py --arch 0.6b --workload w-short --pairs 100000
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        return []
    out = []
    for k in kids:
        try:
            cmd = open(f"/proc/{k}/cmdline", "rb").read()
        except OSError:
            continue
        if b"multiprocessing" in cmd and b"resource_tracker" not in cmd:
            out.append(k)
    return out


def parts(ck):
    d = os.path.join(ck, "parts")
    return len(os.listdir(d)) if os.path.isdir(d) else 0


def cli(args, wait=True):
    p = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", *map(str, args)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        _, err = p.communicate()
        return p.returncode, err
    return p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="0.6b")
    ap.add_argument("--workload", default="w-short")
    ap.add_argument("--pairs", type=int, default=100000)
    ap.add_argument("--window", type=int, default=8192)
    a = ap.parse_args()
    import torch

    from pipeline.bench.throughput import WORKLOADS, workload_table
    from pipeline.bench.devices import save_random_reranker

    n = torch.cuda.device_count()
    devices = ",".join(f"cuda:{i}" for i in range(n))
    rec = {"arch": a.arch, "workload": a.workload, "pairs": a.pairs, "devices": devices}
    with tempfile.TemporaryDirectory() as d:
        model = save_random_reranker(a.arch, d)
        inp = os.path.join(d, "in.parquet")
        pq.write_table(workload_table(WORKLOADS[a.workload], a.pairs), inp)
        base = [inp, "--model", model, "--window", a.window, "-q"]
        t0 = time.time()
        rc, err = cli(base + ["-o", f"{d}/one.parquet", "--device", "cuda:0"])
        rec["one_device_seconds"] = round(time.time() - t0, 1)
        assert rc == 0, err[-2000:]
        ref = pq.read_table(f"{d}/one.parquet")

        # A worker killed mid-run.
        out = f"{d}/kill-worker.parquet"
        t0 = time.time()
        p = cli(base + ["-o", out, "--devices", devices], wait=False)
        while parts(out + ".ckpt") < 2 and p.poll() is None:
            time.sleep(0.05)
        victims = children(p.pid)
        if victims:
            os.kill(victims[-1], signal.SIGKILL)
        _, err = p.communicate()
        rec["kill_worker"] = {"exit": p.returncode, "seconds": round(time.time() - t0, 1),
                              "killed": bool(victims), "death_seen": "exited with -9" in err}
        got = pq.read_table(out)
        rec["kill_worker"]["same_rows"] = got.drop(["score", "rank"]).equals(ref.drop(["score", "rank"]))
        rec["kill_worker"]["max_abs_score_diff"] = float(np.abs(got["score"].to_numpy() - ref["score"].to_numpy()).max())

        # The driver killed mid-run, then the same command resumed.
        out = f"{d}/kill-driver.parquet"
        p = cli(base + ["-o", out, "--devices", devices], wait=False)
        while parts(out + ".ckpt") < max(2, a.pairs // a.window // 3) and p.poll() is None:
            time.sleep(0.05)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        done_before = parts(out + ".ckpt")
        t0 = time.time()
        rc, err = cli(base + ["-o", out, "--devices", devices])
        got = pq.read_table(out)
        rec["kill_driver"] = {"parts_before_resume": done_before, "resume_exit": rc,
                              "resume_seconds": round(time.time() - t0, 1),
                              "same_rows": got.drop(["score", "rank"]).equals(ref.drop(["score", "rank"])),
                              "max_abs_score_diff": float(np.abs(got["score"].to_numpy() - ref["score"].to_numpy()).max())}
    print(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
