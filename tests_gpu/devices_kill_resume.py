"""Resume across a killed worker and a killed driver, on a machine with several GPUs: the whole run from Parquet to ranked Parquet
on one GPU (the reference), then on all visible GPUs with one worker SIGKILLed a quarter of the way
in and the driver SIGKILLed half way, then the same command resumed; the output must equal the
one-device run. Prints one JSON record (and each stage's record on stderr as it ends). Without a
GPU it runs on two CPU workers, as a smoke test of the script:

    python3 tests_gpu/devices_kill_resume.py --arch 0.6b --workload w-short --pairs 1000000
    python3 tests_gpu/devices_kill_resume.py --arch tiny --pairs 3000 --window 100
    python3 tests_gpu/devices_kill_resume.py --arch tiny --pairs 8000 --window 250 --cpu-workers 8
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


def _pool_workers_alive():
    for q in os.listdir("/proc"):
        if q.isdigit() and int(q) != os.getpid():
            try:
                cmd = open(f"/proc/{q}/cmdline", "rb").read()
            except OSError:
                continue
            if b"multiprocessing" in cmd and b"resource_tracker" not in cmd:
                return True
    return False


def parts(ck):
    d = os.path.join(ck, "parts")
    return len(os.listdir(d)) if os.path.isdir(d) else 0


def cli(args, wait=True):
    if not wait:  # a file, not a pipe nobody reads while the run goes on
        log = open(os.path.join(tempfile.gettempdir(), f"kill-run-{time.time_ns()}.log"), "w")
        return subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", *map(str, args)], cwd=ROOT,
                                stdout=log, stderr=log, text=True)
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
    ap.add_argument("--cpu-workers", type=int, default=2,
                    help="without a GPU: this many CPU worker processes (a many-worker run simulated on the host)")
    a = ap.parse_args()
    import torch

    from pipeline.bench.throughput import WORKLOADS, workload_table
    from pipeline.bench.devices import save_random_reranker

    n = torch.cuda.device_count()
    # Without a GPU (a smoke run of this script, or many workers simulated on the host): CPU workers.
    devices = ",".join(f"cuda:{i}" for i in range(n)) if n else ",".join(["cpu"] * a.cpu_workers)
    one = "cuda:0" if n else "cpu"
    rec = {"arch": a.arch, "workload": a.workload, "pairs": a.pairs, "devices": devices}
    with tempfile.TemporaryDirectory() as d:
        model = save_random_reranker(a.arch, d)
        inp = os.path.join(d, "in.parquet")
        pq.write_table(workload_table(WORKLOADS[a.workload], a.pairs), inp)
        base = [inp, "--model", model, "--window", a.window, "-q"]
        t0 = time.time()
        rc, err = cli(base + ["-o", f"{d}/one.parquet", "--device", one])
        rec["one_device_seconds"] = round(time.time() - t0, 1)
        assert rc == 0, err[-2000:]
        print(json.dumps(rec), file=sys.stderr, flush=True)
        ref = pq.read_table(f"{d}/one.parquet")

        # One run on every device: a worker SIGKILLed a quarter of the way in, the driver SIGKILLed
        # half way, then the same command resumed. Its output must equal the one-device run.
        units = -(-a.pairs // a.window)
        out = f"{d}/killed.parquet"
        t0 = time.time()
        p = cli(base + ["-o", out, "--devices", devices], wait=False)
        while parts(out + ".ckpt") < max(2, units // 4) and p.poll() is None:
            time.sleep(0.05)
        victims = children(p.pid)
        if victims:
            os.kill(victims[-1], signal.SIGKILL)
        rec["kill_worker"] = {"at_parts": parts(out + ".ckpt"), "killed": bool(victims),
                              "seconds": round(time.time() - t0, 1)}
        print(json.dumps(rec), file=sys.stderr, flush=True)
        while parts(out + ".ckpt") < max(3, units // 2) and p.poll() is None:
            time.sleep(0.05)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        rec["kill_driver"] = {"at_parts": parts(out + ".ckpt"), "driver_exit": p.returncode,
                              "seconds": round(time.time() - t0, 1)}
        print(json.dumps(rec), file=sys.stderr, flush=True)
        # The killed driver's workers see their pipe close and leave; wait for them so the
        # resumed run's workers get the whole GPUs.
        deadline = time.time() + 60
        while _pool_workers_alive() and time.time() < deadline:
            time.sleep(0.2)
        t1 = time.time()
        rc, err = cli(base + ["-o", out, "--devices", devices])
        got = pq.read_table(out)
        rec["resume"] = {"exit": rc, "seconds": round(time.time() - t1, 1),
                         "total_seconds": round(time.time() - t0, 1), "units": units,
                         "err_tail": err[-400:] if rc else "",
                         "rows": got.num_rows, "same_rows": got.drop(["score", "rank"]).equals(ref.drop(["score", "rank"])),
                         "max_abs_score_diff": float(np.abs(got["score"].to_numpy() - ref["score"].to_numpy()).max()),
                         "same_ranks": got["rank"].equals(ref["rank"])}
    print(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
