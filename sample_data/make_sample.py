"""Build sample_data/pairs.parquet and the tiny random-weight reranker beside it.

    python sample_data/make_sample.py

The model has the real Qwen3 architecture and tokenizer layout but random weights: its scores
mean nothing. It exists so that `rerank-batch run` can be tried offline on a CPU in seconds.
"""

from __future__ import annotations

import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

QUERIES = {
    "q1": ("what causes the seasons on earth", [
        "The seasons are caused by the tilt of Earth's rotational axis, about 23.4 degrees, relative to its orbital plane.",
        "Earth is closest to the Sun in early January, which surprises people who think distance causes summer.",
        "Seasonal affective disorder is a type of depression related to changes in seasons.",
        "Because the axis stays pointed the same way in space, each hemisphere is tilted toward the Sun for half of "
        "the orbit and away from it for the other half. Sunlight then strikes the surface at a steeper angle and the "
        "days are longer, so more energy arrives per square metre: that is summer. Six months later the same "
        "hemisphere receives slanting light for fewer hours a day, and it is winter.",
        "Recipe: autumn pumpkin soup with roasted seeds.",
    ]),
    "q2": ("how do I reset a forgotten git commit", [
        "Use `git reset --soft HEAD~1` to undo the last commit but keep its changes staged.",
        "git reflog lists where HEAD has been, so a commit lost after a hard reset can usually be recovered with "
        "`git checkout -b rescue <sha>`.",
        "Git was created by Linus Torvalds in 2005 for the development of the Linux kernel.",
        "To forget a password in your browser, open the settings and clear saved passwords.",
    ]),
    "q3": ("Quelle est la capitale de l'Australie ?", [
        "Canberra est la capitale de l'Australie ; Sydney en est la plus grande ville.",
        "Sydney, célèbre pour son opéra, est souvent prise à tort pour la capitale.",
        "L'Autriche a pour capitale Vienne (Wien).",
        "Canberra was purpose-built as a compromise between Sydney and Melbourne and became the seat of government "
        "in 1927.",
    ]),
    "q4": ("東京タワーの高さは？", [
        "東京タワーの高さは333メートルです。1958年に完成しました。",
        "東京スカイツリーは634メートルで、日本一高い電波塔です。",
        "Tokyo Tower is 333 m tall and painted in international orange and white for aviation safety.",
        "エッフェル塔はパリにあります。",
    ]),
    "q5": ("side effects of ibuprofen", [
        "Common side effects of ibuprofen include heartburn, nausea and stomach pain; it can also raise blood "
        "pressure and, rarely, cause stomach bleeding, especially at high doses or with long use.",
        "Ibuprofen is a nonsteroidal anti-inflammatory drug (NSAID) used for pain, fever and inflammation.",
        "Paracetamol (acetaminophen) is not an NSAID and is gentler on the stomach.",
        "Store below 25 °C. Keep out of the reach of children.",
        "Ibuprofène : effets indésirables fréquents — nausées, douleurs abdominales, dyspepsie.",
        "🙂",
    ]),
    "q6": ("python read parquet in chunks", [
        "pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=65536) yields record batches without loading "
        "the whole file.",
        "polars.scan_parquet builds a lazy query; collect it with the streaming engine for larger-than-memory data.",
        "Parquet is a columnar storage format from the Apache Hadoop ecosystem.",
        "Use pandas.read_csv(chunksize=...) to read a CSV file in pieces.",
        "",
    ]),
}


def write_pairs(path: str) -> pa.Table:
    rows = []
    for qid, (query, docs) in QUERIES.items():
        for i, doc in enumerate(docs):
            rows.append({"query_id": qid, "doc_id": f"{qid}-d{i}", "query": query, "document": doc,
                         "first_stage_rank": i + 1})
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, path)
    return table


# Graded judgments for the BEIR-style mini set (2 = answers it, 1 = related; the rest 0).
RELEVANCE = {"q1-d0": 2, "q1-d3": 2, "q1-d1": 1, "q2-d0": 2, "q2-d1": 2, "q3-d0": 2, "q3-d3": 1,
             "q4-d0": 2, "q4-d2": 2, "q5-d0": 2, "q5-d4": 1, "q5-d1": 1, "q6-d0": 2, "q6-d1": 1}


def write_beir_mini(folder: str) -> None:
    """A tiny BEIR folder (corpus, queries, qrels) and a first-stage TREC run over it."""
    import json
    import random

    os.makedirs(os.path.join(folder, "qrels"), exist_ok=True)
    with open(os.path.join(folder, "queries.jsonl"), "w", encoding="utf-8") as f:
        for qid, (query, _) in QUERIES.items():
            f.write(json.dumps({"_id": qid, "text": query}, ensure_ascii=False) + "\n")
    with open(os.path.join(folder, "corpus.jsonl"), "w", encoding="utf-8") as f:
        for qid, (_, docs) in QUERIES.items():
            for i, doc in enumerate(docs):
                f.write(json.dumps({"_id": f"{qid}-d{i}", "title": "", "text": doc}, ensure_ascii=False) + "\n")
    with open(os.path.join(folder, "qrels", "test.tsv"), "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for did, rel in RELEVANCE.items():
            f.write(f"{did.split('-')[0]}\t{did}\t{rel}\n")
    # A first stage that ranks candidates in a fixed pseudo-random order (a weak retriever).
    rng = random.Random(0)
    with open(os.path.join(folder, "first-stage.trec"), "w", encoding="utf-8") as f:
        for qid, (_, docs) in QUERIES.items():
            order = list(range(len(docs)))
            rng.shuffle(order)
            for rank, i in enumerate(order, 1):
                f.write(f"{qid} Q0 {qid}-d{i} {rank} {20.0 - rank:.2f} bm25\n")


def main() -> None:
    from pipeline.bench.synthetic import build_reranker

    table = write_pairs(os.path.join(HERE, "pairs.parquet"))
    write_beir_mini(os.path.join(HERE, "beir-mini"))
    texts = table.column("query").to_pylist() + table.column("document").to_pylist()
    build_reranker(os.path.join(HERE, "tiny-qwen3-reranker"), arch="tiny", texts=texts, init_std=0.1)


if __name__ == "__main__":
    main()
