#!/usr/bin/env bash
# Paired A/B of two checkouts of the project on one GPU: the same benchmark commands run
# alternately in OLD (a directory holding another version's pipeline/ and jobs/) and in this
# checkout, ROUNDS times each, so drift of the machine falls on both sides alike. Records and a
# summary (new/old ratio per figure, each round's values) go under $OUT.
#   bash tests_gpu/ab_code.sh OLD_DIR [ROUNDS]     (BENCH_REPEATS, DEVICES_PAIRS size the two commands)
set -uo pipefail
export PYTHONUNBUFFERED=1
OLD=$(cd "$1" && pwd); ROUNDS=${2:-2}; NEW=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import polars" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/ab_device.txt"
one() {  # side round
    local side=$1 r=$2 dir; [[ $side == old ]] && dir=$OLD || dir=$NEW
    (cd "$dir" && export PYTHONPATH=/tmp/site:$dir &&
     timeout 200 python3 -m jobs.cli bench -q --arch 0.6b --workload w-mixed --seed-pairs 0 --repeats ${BENCH_REPEATS:-3} \
        --json "$OUT/ab_bench_${side}_$r.json" >/dev/null 2>"$OUT/ab_err_${side}_$r.txt";
     timeout 200 python3 -m jobs.cli bench -q --arch 0.6b --workload w-mixed --devices 1 --pairs ${DEVICES_PAIRS:-20000} \
        --json "$OUT/ab_devices_${side}_$r.json" >/dev/null 2>>"$OUT/ab_err_${side}_$r.txt") ||
        echo "$side round $r failed: $(tail -2 "$OUT/ab_err_${side}_$r.txt")"
}
for r in $(seq 1 "$ROUNDS"); do
    if (( r % 2 )); then one old "$r"; one new "$r"; else one new "$r"; one old "$r"; fi
done
python3 - "$OUT" "$ROUNDS" <<'PY'
import json, os, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def load(name):
    p = os.path.join(out, name)
    return json.load(open(p)) if os.path.exists(p) else None
figs = {"model_only_pairs_per_s": lambda b, d: b["engine"]["pairs_per_s"],
        "e2e_pairs_per_s": lambda b, d: b["e2e"]["pairs_per_s"],
        "plain_run_pairs_per_s": lambda b, d: statistics.median(x["pairs_per_s"] for x in d["runs"] if x["devices"] == "plain"),
        "devices_cuda0_pairs_per_s": lambda b, d: statistics.median(x["pairs_per_s"] for x in d["runs"] if x["devices"] == "cuda:0")}
res = {"rounds": rounds, "figures": {}}
for name, get in figs.items():
    vals = {"old": [], "new": []}
    for side in vals:
        for r in range(1, rounds + 1):
            b, d = load(f"ab_bench_{side}_{r}.json"), load(f"ab_devices_{side}_{r}.json")
            try:
                vals[side].append(get(b, d))
            except (TypeError, KeyError, statistics.StatisticsError):
                pass
    ratios = [n / o for n, o in zip(vals["new"], vals["old"]) if o]
    res["figures"][name] = {**vals, "new_over_old_per_round": [round(x, 4) for x in ratios],
                            "new_over_old_median": round(statistics.median(ratios), 4) if ratios else None}
json.dump(res, open(os.path.join(out, "ab_summary.json"), "w"), indent=1)
print(json.dumps(res, indent=1))
PY
