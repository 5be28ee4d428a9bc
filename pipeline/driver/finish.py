"""Finish a run: rank all parts, publish the output, then remove the checkpoint.

The sequence is safe to kill at any point; the rerun of the same command ends with exit 0 and
the right output:
  1. re-check every input (fast path): an input changed during the run is never published;
  2. write the ranked output to a temp name unique to this run, fsync;
  3. rename it into place and mark the checkpoint "published" (with the output's size, mtime
     and rows), one critical section that signals do not split;
  4. delete the parts and records, the fingerprint, the marker last.
A rerun that finds a published checkpoint checks that the output is still the one recorded,
finishes step 4 and exits 0; an output that was changed or removed since is written again.
"""

from __future__ import annotations

import os
import uuid

import pyarrow.parquet as pq

from pipeline.storage import uri
from pipeline.errors import InputError, RerankError, first_line
from pipeline.storage.fingerprint import recheck_inputs
from pipeline.runtime.signals import critical
from pipeline.storage.local import fsync_dir
from pipeline.storage.uri import is_uri
from pipeline.data.write import write_ranked


def verify_parts(plan, rescore) -> None:
    """Before the final write: check every part against its record again (one read of each; a
    part may have changed on disk since it was written or verified at the start), and call
    rescore() to score the bad ones again. A part bad again right after that is a runtime failure."""
    ck = plan.ckpt
    bad = ck.recheck([u.id for u in plan.units])
    if not bad:
        return
    rescore()
    again = ck.recheck(bad)
    if again:
        raise RerankError(f"{ck.dir}: the part of unit {again[0]} changed on disk right after it was written; "
                          "check that disk (or pass another --checkpoint-dir), then rerun the same command")


def totals(plan) -> dict:
    """The summary's counts, from the verified records of the units (Checkpoint.finished/recheck)."""
    t = {"pairs_scored": 0, "tokens": 0, "truncated": 0, "skipped_null": 0, "empty_lists": 0}
    for u in plan.units:
        info = plan.ckpt.done[u.id]
        t["pairs_scored"] += info["pairs"]
        for k in ("tokens", "truncated", "skipped_null"):
            t[k] += info[k]
        t["empty_lists"] += info.get("empty_lists", 0)
    return t


def published_output(plan) -> dict | None:
    """The record of an output this checkpoint already published, if the file is still it."""
    ck, out = plan.ckpt, plan.cfg.output
    rec = ck.marker.get("output") if ck.state == "published" else None
    if not rec:
        return None
    try:
        if plan.cfg.dataset:
            from pipeline.storage import dataset

            from pipeline.driver.plan import output_key

            ok = rec["path"] == output_key(out) and dataset.still_published(out, rec) and \
                rec.get("output_file_rows") == plan.cfg.output_file_rows
        elif is_uri(out):
            size, mtime_ns = uri.stat(out) or (None, None)
            rows = pq.read_metadata(uri.open_input(out)).num_rows if size is not None else None
            ok = rec["path"] == out and (size, mtime_ns, rows) == (rec["size"], rec["mtime_ns"], rec["rows"])
        else:
            st = os.stat(out)
            ok = (rec["path"] == os.path.abspath(out) and st.st_size == rec["size"]
                  and st.st_mtime_ns == rec["mtime_ns"] and pq.read_metadata(out).num_rows == rec["rows"])
        # --top-k shapes the output but not the scores (it is not in the fingerprint): a rerun
        # that asks for another writes the output again from the parts.
        ok = ok and rec.get("top_k") == plan.cfg.top_k
    except (OSError, KeyError, ValueError, TypeError):
        ok = False
    if ok:
        return rec
    ck.write_marker(state="running", output=None)  # write it again from the parts
    return None


def _mark_published(ck, path: str, size: int, mtime_ns: int, rows: int, sums: dict, top_k: int | None,
                    **more) -> None:
    """What a rerun checks to know the output is still the one this checkpoint wrote (for a
    dataset: size and mtime of its _SUCCESS)."""
    ck.write_marker(state="published", output={"path": path, "size": size, "mtime_ns": mtime_ns,
                                               "rows": rows, "totals": sums, "top_k": top_k, **more})


def publish(plan, should_stop=None) -> int:
    """Steps 1-3; returns the rows written."""
    cfg, ck = plan.cfg, plan.ckpt
    recheck_inputs(ck.fingerprint["inputs"], cfg.inputs)
    from pipeline.driver.plan import output_exists

    if not cfg.overwrite and not plan.output_existed and output_exists(cfg.output):
        # Made by someone else while this run scored: replacing it needs the same --overwrite
        # that an output there at the start needed.
        raise InputError(f"{cfg.output}: the output appeared while this run was scoring; pass --overwrite to "
                         "replace it and rerun the same command (the scores are kept in the checkpoint)")
    if cfg.dataset:
        return _publish_dataset(plan, should_stop)
    if is_uri(cfg.output):
        return _publish_remote(plan, should_stop)
    out = os.path.abspath(cfg.output)
    out_dir = os.path.dirname(out)
    # The name's length stays under the file system's 255 bytes whatever the output's.
    base = os.path.basename(out).encode()[:180].decode(errors="ignore")
    stem = f".{base}.{ck.marker.get('run_id', '')}-"
    # A temp output of an earlier, killed attempt on this checkpoint (the marker's run id is kept
    # across resumes, and --restart keeps the ids before it): ours to remove. Other runs' temp
    # names differ and are left alone.
    stems = tuple(f".{base}.{i}-" for i in [ck.marker.get("run_id", ""), *ck.marker.get("earlier_run_ids", [])])
    for name in os.listdir(out_dir):
        if name.startswith(stems) and name.endswith(".partial"):
            try:
                os.unlink(os.path.join(out_dir, name))
            except OSError:
                pass
    tmp = os.path.join(out_dir, f"{stem}{uuid.uuid4().hex[:8]}.partial")
    sums = totals(plan)

    def rename_and_record(src, dst):
        rows = pq.read_metadata(src).num_rows
        with critical(should_stop):
            os.replace(src, dst)
            fsync_dir(out_dir)
            st = os.stat(dst)
            _mark_published(ck, out, st.st_size, st.st_mtime_ns, rows, sums, cfg.top_k)

    try:
        return write_ranked(ck.parts([u.id for u in plan.units]), plan.layout, cfg, tmp=tmp,
                            publish=rename_and_record)
    except OSError as exc:
        raise RerankError(
            f"{cfg.output}: cannot write the output ({exc.strerror or exc}); free space in {out_dir} and rerun "
            "the same command: the scores are kept in the checkpoint"
        ) from None


def _publish_remote(plan, should_stop=None) -> int:
    """An object-storage output: written to local temp space (TMPDIR) first, then published
    (storage/uri.publish) so that the key shows the old object or the whole new one; the marker
    records the object's size and mtime like a local output's."""
    import tempfile

    cfg, ck = plan.cfg, plan.ckpt
    sums = totals(plan)

    def upload_and_record(src, dst):
        rows = pq.read_metadata(src).num_rows
        with critical(should_stop):
            uri.publish(src, cfg.output)
            _mark_published(ck, cfg.output, *uri.stat(cfg.output), rows, sums, cfg.top_k)
        os.unlink(src)

    with tempfile.TemporaryDirectory(prefix="rerank-batch-") as stage:
        tmp = os.path.join(stage, cfg.output.rsplit("/", 1)[-1])
        try:
            return write_ranked(ck.parts([u.id for u in plan.units]), plan.layout, cfg, tmp=tmp,
                                publish=upload_and_record)
        except OSError as exc:
            raise RerankError(
                f"{cfg.output}: cannot write the output ({first_line(exc)}); check the bucket and the local temp "
                "space (TMPDIR), then rerun the same command: the scores are kept in the checkpoint"
            ) from None


def _publish_dataset(plan, should_stop=None) -> int:
    """A dataset output (storage/dataset.py): the files are written into a local temp directory
    (beside a local output; in TMPDIR for object storage), then published whole."""
    import tempfile

    from pipeline.data.write import write_dataset
    from pipeline.driver.plan import _check_dataset_output, output_key
    from pipeline.storage import dataset

    cfg, ck = plan.cfg, plan.ckpt
    run_id = ck.marker.get("run_id", "")
    ours = [run_id, *ck.marker.get("earlier_run_ids", [])]
    sums = totals(plan)
    parts = ck.parts([u.id for u in plan.units])
    remote = is_uri(cfg.output)
    # Again now: files that someone put in the directory while this run scored make it not ours.
    _check_dataset_output(cfg, resumable=True)
    if not remote:
        dataset.remove_stale_local(cfg.output, ours)
    tmp = None
    try:
        tmp = tempfile.mkdtemp(prefix="rerank-batch-") if remote else dataset.new_local_temp(cfg.output, run_id)
        files = write_dataset(parts, plan.layout, cfg, tmp)
        rows = sum(f["rows"] for f in files)
        with critical(should_stop):
            if remote:
                dataset.publish_remote(tmp, files, cfg.output, run_id)
            else:
                dataset.write_success_local(tmp, files, run_id)
                dataset.publish_local(tmp, cfg.output, run_id)
                tmp = None
            _mark_published(ck, output_key(cfg.output), *dataset.success_stat(cfg.output), rows, sums, cfg.top_k,
                            output_file_rows=cfg.output_file_rows, files=len(files))
        if not remote:
            dataset.drop_aside(cfg.output, run_id)
        return rows
    except OSError as exc:
        raise RerankError(
            f"{cfg.output}: cannot write the output ({first_line(exc)}); free space (or check the bucket) and rerun "
            "the same command: the scores are kept in the checkpoint"
        ) from None
    finally:
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


def cleanup(plan, keep: bool) -> None:
    """Step 4 (or, with keep, just release the lease)."""
    plan.ckpt.close(remove=not keep)
