"""Benchmark against the peer users would pick: sentence-transformers' CrossEncoder.predict, and
the whole CLI in a fresh process.

One random-weight model of a real shape is saved to disk, then loaded the way a user would load
it: by our load_engine (as `rerank-batch run` does) and by CrossEncoder(path). Both score the same
texts (the workload's); the measurements are interleaved (ours, then theirs, repeated), so a busy
machine slows both alike, and each row gives the median and the spread (min, max) of its repeats.

Rows: `engine` (ours, model only: pre-tokenized pairs), `engine_tok` (ours, tokenizing then
scoring in one thread, as predict does), `st_bs<N>` (predict at batch size N) and `cli` (the
whole command in a fresh process, wall clock, with the summary's startup breakdown; with
`cli_stages`, also where each run's scoring span goes: host_child.py's stage timers around the
real forward).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import torch
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BertConfig, ModernBertConfig,
                          Qwen3Config, Qwen3ForCausalLM, XLMRobertaConfig)

from pipeline.bench.synthetic import ARCHS, train_cross_tokenizer, train_tokenizer
from pipeline.bench.throughput import (WORDS, WORKLOADS, BusySampler, measure_matmul_peak, model_flops,
                                       non_embedding_params, profile_engine, sync, workload_table)
from pipeline.config import RunConfig
from pipeline.engines.resolve import resolve_device, resolve_dtype
from pipeline.engines.score import load_engine
from pipeline.engines.template import QWEN3_RERANKER
from pipeline.engines.tokenize import CrossEncoderEncoder, same_ids

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Published shapes: cross-encoder/ms-marco-MiniLM-L6-v2, BAAI/bge-reranker-v2-m3 (XLM-R large),
# ModernBERT-base (e.g. Alibaba-NLP/gte-reranker-modernbert-base).
ENCODER_ARCHS: dict[str, tuple[str, dict]] = {
    "minilm-l6": ("bert", dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                               intermediate_size=1536, vocab_size=30522, max_position_embeddings=512,
                               type_vocab_size=2)),
    "xlmr-large": ("xlm-roberta", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                       intermediate_size=4096, vocab_size=250002, max_position_embeddings=514,
                                       type_vocab_size=1)),
    "modernbert-base": ("modernbert", dict(hidden_size=768, num_hidden_layers=22, num_attention_heads=12,
                                           intermediate_size=1152, vocab_size=50368, max_position_embeddings=8192,
                                           global_attn_every_n_layers=3, local_attention=128)),
}
ENCODER_MAX_LENGTH = 512
# The tokenizer each shape's real model has: WordPiece (BertTokenizer), sentencepiece Unigram
# (XLMRobertaTokenizer), byte-level BPE (PreTrainedTokenizerFast).
TOKENIZER_STYLE = {"bert": "bert", "xlm-roberta": "xlmr", "modernbert": "modernbert"}


def st_available() -> bool:
    try:
        import sentence_transformers  # noqa: F401  (optional: the bench's peer, not a dependency)
    except Exception:
        return False
    return True


def encoder_flops(lengths: np.ndarray, arch: str) -> float:
    """2 x non-embedding params per token, plus bidirectional attention (QK^T and PV over the
    whole L x L square, 4 * L^2 * hidden per layer; ModernBERT's local layers over their window)."""
    style, s = ENCODER_ARCHS[arch]
    h, i, n = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    per_layer = 4 * h * h + (3 if style == "modernbert" else 2) * h * i
    L = lengths.astype(np.float64)
    dense = 2.0 * n * per_layer * L.sum()
    if style == "modernbert":
        every = s["global_attn_every_n_layers"]
        n_global = len(range(0, n, every))
        local = np.minimum(L, s["local_attention"] + 1)
        attn = 4.0 * h * (n_global * (L ** 2).sum() + (n - n_global) * (L * local).sum())
    else:
        attn = 4.0 * h * n * (L ** 2).sum()
    return dense + attn


def build_saved_model(arch: str, out_dir: str, device, dtype) -> str:
    """A random-weight model of `arch` saved with its tokenizer (trained on the bench's words, one
    word one token) into out_dir; built on `device` in `dtype` (fast for the large shapes)."""
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if arch in ENCODER_ARCHS:
            style, shape = ENCODER_ARCHS[arch]
            # The real model's kind of tokenizer, saved with its class, its vocabulary grown to the real
            # size (its load time is one of the measurements).
            tok = train_cross_tokenizer(out_dir, TOKENIZER_STYLE[style], [" ".join(WORDS)] * 5,
                                        pad_vocab_to=shape["vocab_size"] - 8)
            config = encoder_config(style, shape, tok)
            with torch.device(device):
                model = AutoModelForSequenceClassification.from_config(config)
        else:
            tok = train_tokenizer(out_dir, texts=[" ".join(WORDS)] * 5)
            shape = dict(ARCHS[arch])
            vocab = shape.pop("vocab_size", None) or len(tok)
            tie = shape.pop("tie_word_embeddings", True)
            config = Qwen3Config(vocab_size=vocab, tie_word_embeddings=tie, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                                 max_position_embeddings=40960, attention_bias=False, architectures=["Qwen3ForCausalLM"],
                                 pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                                 initializer_range=0.1 if arch == "tiny" else 0.02, **shape)
            with torch.device(device):
                model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    model.save_pretrained(out_dir, safe_serialization=True)
    del model
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return out_dir


def encoder_config(style: str, shape: dict, tok):
    common = dict(num_labels=1, initializer_range=0.02, pad_token_id=tok.pad_token_id, **shape)
    if style == "bert":
        return BertConfig(architectures=["BertForSequenceClassification"], **common)
    if style == "xlm-roberta":
        return XLMRobertaConfig(bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                                architectures=["XLMRobertaForSequenceClassification"], **common)
    return ModernBertConfig(cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id,
                            eos_token_id=tok.sep_token_id, architectures=["ModernBertForSequenceClassification"],
                            **common)


def st_pairs(arch: str, instructions, queries, documents) -> list[tuple[str, str]]:
    """The pairs as CrossEncoder.predict takes them. For a Qwen3 yes/no model, predict joins the
    two texts as they are, so the pair carries our template: the joined text is our prompt."""
    if arch in ENCODER_ARCHS:
        return list(zip(queries, documents))
    t = QWEN3_RERANKER
    out = []
    for i, q, d in zip(instructions, queries, documents):
        body = t.format_body(i, q, d)
        cut = len(body) - len(d)
        assert body[cut:] == d
        out.append((t.prefix + body[:cut], d + t.suffix))
    return out


def _timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def cli_rows(model_dir: str, inp: str, device: str, repeats: int, max_length: int, workdir: str,
             stages: bool = False, compile: str = "auto") -> dict:
    """The whole command in a fresh process, `repeats` times: wall clock and the summary. `stages`:
    each run under host_child.py's stage timers with the real forward (`--real-forward`), its
    record in the run's `stage_record` entry, and the medians over the runs in `stages` and
    `stages_span` (the CLI is otherwise the same; the timers cost little next to what they time)."""
    runs = []
    for r in range(repeats):
        out, summ = os.path.join(workdir, f"cli-{r}.parquet"), os.path.join(workdir, f"cli-{r}.json")
        rec_path = os.path.join(workdir, f"cli-{r}-stages.json")
        prog = (["-m", "pipeline.bench.host_child", "--real-forward", rec_path] if stages else ["-m", "jobs.cli"])
        cmd = [sys.executable, *prog, "run", inp, "--model", model_dir, "-o", out, "--overwrite",
               "--restart", "-q", "--device", device, "--max-length", str(max_length), "--summary", summ,
               "--compile", compile]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"cli run failed ({p.returncode}): {p.stderr.strip().splitlines()[-1:]}")
        with open(summ) as f:
            s = json.load(f)
        scoring = s["pairs_scored"] / max(s["scoring_pairs_per_s"], 1e-9)
        runs.append({"pairs": s["pairs_scored"], "wall_s": round(wall, 3), "scoring_s": round(scoring, 3), "pairs_per_s": s["scoring_pairs_per_s"],
                     "run_pairs_per_s": s.get("run_pairs_per_s"),
                     "wall_pairs_per_s": round(s["pairs_scored"] / wall, 1),
                     "wall_over_scoring": round(wall / scoring, 2),
                     **{k: v for k, v in s.get("extra", {}).items() if k.startswith("startup_")}})
        if stages:
            with open(rec_path) as f:
                runs[-1]["stage_record"] = json.load(f)
    return {"runs": runs, **(_stage_medians([r["stage_record"] for r in runs]) if stages else {}),
            **_spread([r["wall_s"] for r in runs], "wall_s"),
            **_spread([r["pairs_per_s"] for r in runs], "pairs_per_s"),
            **_spread([r["wall_pairs_per_s"] for r in runs], "wall_pairs_per_s"),
            **_spread([r["startup_tokenizer_s"] for r in runs if "startup_tokenizer_s" in r], "startup_tokenizer_s"),
            **_spread([r["startup_total_s"] for r in runs if "startup_total_s" in r], "startup_total_s"),
            **_spread([r["wall_over_scoring"] for r in runs], "wall_over_scoring")}


# The scoring span's figures of a host_child record, besides its stages.
SPAN_FIELDS = ("scoring_s", "first_batch_after_s", "first_batch_done_after_s", "forward_device_s",
               "scoring_process_cpu_s", "scoring_main_thread_cpu_s")


def _stage_medians(recs: list[dict]) -> dict:
    """Over the runs' host_child records: each stage's median wall and thread CPU seconds (its
    most calls), in the order the stages first ran; and the span's figures, medians."""
    names = list(dict.fromkeys(k for r in recs for k in r["stages"]))
    med = lambda xs: round(float(np.median(xs)), 4) if xs else None  # noqa: E731
    return {"stages": {k: {"wall_s": med([r["stages"].get(k, {}).get("wall_s", 0.0) for r in recs]),
                           "cpu_s": med([r["stages"].get(k, {}).get("cpu_s", 0.0) for r in recs]),
                           "calls": max(r["stages"].get(k, {}).get("calls", 0) for r in recs)} for k in names},
            "stages_span": {f: med([r[f] for r in recs if r.get(f) is not None]) for f in SPAN_FIELDS}}


def tokenizer_load_rows(model_dir: str, encoder: bool, repeats: int) -> dict:
    """Seconds to load the model's tokenizer in a fresh process, imports included, `repeats` times:
    `ours` (cross_tokenizer.py or fast_tokenizer.py, what `rerank-batch run` loads) and
    `transformers` (AutoTokenizer.from_pretrained, the import of transformers included), with
    the reason where ours falls back to transformers."""
    mod = "cross_tokenizer" if encoder else "fast_tokenizer"
    codes = {
        "ours": f"from pipeline.engines import {mod}; tok, why = {mod}.load(sys.argv[1])",
        "transformers": ("from transformers import AutoTokenizer; "
                         "tok = AutoTokenizer.from_pretrained(sys.argv[1]); why = ''"),
    }
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
               HF_HUB_OFFLINE="1")
    out: dict = {}
    for name, body in codes.items():
        code = ("import sys, time, json; t0 = time.perf_counter(); " + body +
                "; print(json.dumps({'s': time.perf_counter() - t0, 'why': why, 'ok': tok is not None}))")
        runs = []
        for _ in range(repeats):
            p = subprocess.run([sys.executable, "-c", code, model_dir], capture_output=True, text=True, env=env,
                               cwd=ROOT)
            if p.returncode != 0:
                raise RuntimeError(f"tokenizer load ({name}) failed: {p.stderr.strip().splitlines()[-1:]}")
            runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
        out[name] = {**_spread([r["s"] for r in runs], "load_s"), "loaded": runs[-1]["ok"]}
        if runs[-1]["why"]:
            out[name]["fallback_reason"] = runs[-1]["why"]
    return out


def ids_equal_transformers(model_dir: str, enc, queries, documents, max_length: int) -> bool:
    """Whether the run's ids (and token types) equal those of transformers' AutoTokenizer called
    on the same pairs, on this machine's transformers."""
    ref = CrossEncoderEncoder(AutoTokenizer.from_pretrained(model_dir), max_length).encode_by_call(queries, documents)
    return bool(same_ids(enc, ref))


def _spread(values, name: str) -> dict:
    if not values:
        return {}
    return {name: round(float(np.median(values)), 3), f"{name}_min": round(float(min(values)), 3),
            f"{name}_max": round(float(max(values)), 3)}


THREAD_ENV = ("OMP_NUM_THREADS", "RERANK_CPU_THREADS", "RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM")


def run_peer_bench(arch: str, workload: str, *, device: str = "auto", pairs: int | None = None, repeats: int = 3,
                   st: bool = True, cli: bool = True, batch_sizes: tuple[int, ...] | None = None,
                   dtype: str = "auto", cli_stages: bool = False, cli_pairs: int | None = None,
                   profile: bool = False, compile: str = "auto") -> dict:
    """`compile`: --compile of the engine rows and the CLI runs. `cli_pairs`: the CLI row scores a
    larger draw of the same workload (users' runs are long, and a fresh process's first batches,
    cold kernels included, weigh less in them); the rows in one process score `pairs`. `profile`
    (CUDA): the top kernels of one model-only pass, in `profile`."""
    dev = resolve_device(device)
    tdtype = resolve_dtype(dtype, dev)
    batch_sizes = batch_sizes or ((32, 128) if dev.type == "cuda" else (32,))
    st = st and st_available()
    w = WORKLOADS[workload]
    encoder_arch = arch in ENCODER_ARCHS
    max_length = ENCODER_MAX_LENGTH if encoder_arch else 8192
    rec = {"arch": arch, "workload": workload, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "torch": torch.__version__, "dtype": str(tdtype).removeprefix("torch."), "repeats": repeats,
           "date": time.strftime("%Y-%m-%d"), "cpu_threads": torch.get_num_threads(), "compile": compile}
    with tempfile.TemporaryDirectory() as workdir:
        mdir = build_saved_model(arch, os.path.join(workdir, "model"), dev, tdtype)
        with open(os.path.join(mdir, "tokenizer_config.json")) as f:
            rec["tokenizer_class"] = json.load(f).get("tokenizer_class")
        rec["tokenizer_load"] = tokenizer_load_rows(mdir, encoder_arch, repeats)
        table = workload_table(w, pairs)
        inp = os.path.join(workdir, "input.parquet")
        pq.write_table(table, inp)
        q, d = table.column("query").to_pylist(), table.column("document").to_pylist()
        instr = ["Given a web search query, retrieve relevant passages that answer the query"] * len(q)
        cfg = RunConfig(inputs=(), output="", model=mdir, device=str(dev), dtype=dtype, max_length=max_length,
                        compile=compile)
        st_threads = torch.get_num_threads()  # what a user's process gives torch: the peer runs with it
        scorer = load_engine(cfg)
        ours = torch.get_num_threads()  # what the engine chose (threads.configure)
        rec.update(engine_impl=scorer.info.forward, attention=scorer.info.kernel, engine_compiled=scorer.info.compiled,
                   batch_token_budget=scorer.token_budget, torch_threads={"engine": ours, "st": st_threads},
                   # The thread settings the CLI rows' fresh processes inherit.
                   env={k: os.environ[k] for k in THREAD_ENV if k in os.environ})
        enc = scorer.encoder.encode(instr, q, d)
        rec["pairs"], rec["tokens"] = len(enc), int(enc.offsets[-1])
        if encoder_arch:
            rec["tokenizer_path"] = "rust-batch" if scorer.encoder.backend is not None else "call"
            rec["tokenizer_ids_equal_transformers"] = ids_equal_transformers(mdir, enc, q, d, max_length)
        peak = measure_matmul_peak(dev) if dev.type == "cuda" else None
        rec["matmul_peak_tflops"] = round(peak / 1e12, 1) if peak else None
        ce = None
        if st:
            import sentence_transformers  # optional: the bench's peer, not a dependency (st_available)
            from sentence_transformers import CrossEncoder

            torch.set_num_threads(st_threads)
            t0 = time.perf_counter()
            ce = CrossEncoder(mdir, device=str(dev), max_length=max_length, model_kwargs={"dtype": tdtype})
            rec["st_load_s"] = round(time.perf_counter() - t0, 3)  # in this process: transformers already imported
            sp = st_pairs(arch, instr, q, d)
            ce.predict(sp[:64], batch_size=32, show_progress_bar=False)  # warm-up
            torch.set_num_threads(ours)
            rec["sentence_transformers"] = sentence_transformers.__version__
        scorer.score(type(enc)(enc.ids, enc.offsets[: min(len(enc), 512) + 1], enc.truncated,
                               None if enc.type_ids is None else enc.type_ids[: enc.offsets[min(len(enc), 512)]]))
        times: dict[str, list[float]] = {"engine": [], "engine_tok": []}
        outs = {}
        with BusySampler(dev) as busy:
            for _ in range(repeats):
                torch.set_num_threads(ours)
                dt, outs["engine"] = _timed(lambda: scorer.score(enc), dev)
                times["engine"].append(dt)
                dt, _ = _timed(lambda: scorer.score(scorer.encoder.encode(instr, q, d)), dev)
                times["engine_tok"].append(dt)
                torch.set_num_threads(st_threads)
                for bs in (batch_sizes if ce is not None else ()):
                    dt, outs[f"st_bs{bs}"] = _timed(
                        lambda: ce.predict(sp, batch_size=bs, show_progress_bar=False, convert_to_numpy=True), dev)
                    times.setdefault(f"st_bs{bs}", []).append(dt)
            torch.set_num_threads(ours)
        rec["gpu_busy"] = busy.busy
        if profile and dev.type == "cuda":
            rec["profile"] = profile_engine(scorer, enc)
        flops = encoder_flops(enc.lengths, arch) if encoder_arch else model_flops(enc.lengths, ARCHS[arch])
        rec["non_embedding_params"] = (None if encoder_arch else non_embedding_params(ARCHS[arch]))
        for name, ts in times.items():
            med = float(np.median(ts))
            row = {"seconds": round(med, 4), "seconds_all": [round(t, 4) for t in ts],
                   "pairs_per_s": round(len(enc) / med, 1), "pairs_per_s_min": round(len(enc) / max(ts), 1),
                   "pairs_per_s_max": round(len(enc) / min(ts), 1), "tokens_per_s": round(rec["tokens"] / med, 1)}
            if peak:
                row["mfu"] = round(flops / med / peak, 4)
            rec[name] = row
        st_rows = [k for k in rec if k.startswith("st_bs")]
        if st_rows:
            best = max(st_rows, key=lambda k: rec[k]["pairs_per_s"])
            rec["st_best"] = best
            rec["ratio_model_only_vs_st"] = round(rec["engine"]["pairs_per_s"] / rec[best]["pairs_per_s"], 2)
            rec["ratio_with_tokenize_vs_st"] = round(rec["engine_tok"]["pairs_per_s"] / rec[best]["pairs_per_s"], 2)
            rec["max_abs_diff_vs_st"] = float(np.abs(np.asarray(outs[best], dtype=np.float32) - outs["engine"]).max())
        del scorer, ce
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if cli:
            if cli_pairs and cli_pairs != len(q):
                inp = os.path.join(workdir, "input-cli.parquet")
                pq.write_table(workload_table(w, cli_pairs), inp)
            rec["cli_pairs"] = cli_pairs or len(q)
            rec["cli"] = cli_rows(mdir, inp, str(dev), repeats, max_length, workdir, stages=cli_stages,
                                   compile=compile)
            if st_rows:
                # The command's scoring rate (tokenizing included, from the first unit read to the last part
                # written) and its wall-clock rate (start, load and write included) over predict's best.
                best = rec[rec["st_best"]]["pairs_per_s"]
                rec["ratio_cli_scoring_vs_st"] = round(rec["cli"]["pairs_per_s"] / best, 2)
                rec["ratio_cli_wall_vs_st"] = round(rec["cli"]["wall_pairs_per_s"] / best, 2)
    return rec


def format_peer_table(rec: dict) -> str:
    lines = [f"{rec['arch']} {rec['workload']} on {rec['device']} ({rec['dtype']}, {rec.get('engine_impl')}, "
             f"{rec.get('attention')}, {rec['pairs']} pairs, {rec['repeats']} repeats, median [min-max])",
             f"{'row':<12} {'pairs/s':>10} {'[min-max]':>18} {'MFU':>7}"]
    for name in ["engine", "engine_tok"] + sorted(k for k in rec if k.startswith("st_bs")):
        r = rec[name]
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        lines.append(f"{name:<12} {r['pairs_per_s']:>10.1f} {r['pairs_per_s_min']:>8.1f}-{r['pairs_per_s_max']:<9.1f}"
                     f" {mfu:>7}")
    if "ratio_model_only_vs_st" in rec:
        lines.append(f"vs sentence-transformers ({rec['st_best']}): {rec['ratio_model_only_vs_st']}x model only, "
                     f"{rec['ratio_with_tokenize_vs_st']}x with tokenizing; max |score diff| {rec['max_abs_diff_vs_st']:.2e}")
    if "tokenizer_ids_equal_transformers" in rec:
        lines.append(f"tokenizing: {rec['tokenizer_path']}, ids equal to transformers': "
                     f"{rec['tokenizer_ids_equal_transformers']}")
    tl = rec.get("tokenizer_load")
    if tl:
        parts = [f"{k} {v['load_s']:.3f} s [{v['load_s_min']:.3f}-{v['load_s_max']:.3f}]"
                 + (f" (fell back: {v['fallback_reason']})" if v.get("fallback_reason") else "") for k, v in tl.items()]
        lines.append(f"tokenizer load, fresh process ({rec.get('tokenizer_class')}): " + ", ".join(parts))
    c = rec.get("cli")
    if c:
        vs = ""
        if "ratio_cli_scoring_vs_st" in rec:
            vs = (f"; vs sentence-transformers ({rec['st_best']}, load {rec.get('st_load_s', float('nan')):.2f} s): "
                  f"{rec['ratio_cli_scoring_vs_st']}x scoring, {rec['ratio_cli_wall_vs_st']}x wall")
        lines.append(f"cli scoring ({rec.get('cli_pairs', rec['pairs'])} pairs): {c['pairs_per_s']:.1f} pairs/s "
                     f"[{c['pairs_per_s_min']:.1f}-{c['pairs_per_s_max']:.1f}], "
                     f"wall {c['wall_pairs_per_s']:.1f} pairs/s, tokenizer stage "
                     f"{c.get('startup_tokenizer_s', float('nan')):.2f} s" + vs)
        first = c["runs"][-1]
        stages = ", ".join(f"{k.removeprefix('startup_').removesuffix('_s')} {v:.2f}" for k, v in first.items()
                           if k.startswith("startup_") and k != "startup_total_s")
        lines.append(f"cli: wall {c['wall_s']:.2f} s [{c['wall_s_min']:.2f}-{c['wall_s_max']:.2f}], first batch at "
                     f"{c.get('startup_total_s', float('nan')):.2f} s, wall/scoring {c['wall_over_scoring']}")
        lines.append(f"cli startup (last run): {stages}")
        if c.get("stages"):
            sp = c["stages_span"]
            fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
            lines.append(f"cli stages ({len(c['runs'])} runs, median wall s / thread cpu s): "
                         + ", ".join(f"{k} {v['wall_s']:.3f}/{v['cpu_s']:.3f}" for k, v in c["stages"].items()))
            lines.append(f"cli scoring span (median): {fmt(sp['scoring_s'])} s, first batch at "
                         f"{fmt(sp['first_batch_after_s'])} s (done {fmt(sp['first_batch_done_after_s'])} s), "
                         f"forward on the device {fmt(sp['forward_device_s'])} s, process cpu "
                         f"{fmt(sp['scoring_process_cpu_s'])} s, main thread cpu "
                         f"{fmt(sp['scoring_main_thread_cpu_s'])} s")
    return "\n".join(lines)
