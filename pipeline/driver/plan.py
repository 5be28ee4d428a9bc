"""Plan a run: everything that can fail on bad input or a bad checkpoint, before a model loads.
Each layer is asked once, in this order, with what it needs:

    storage/places.locate        the input specs expanded to files, the output (the default
                                 beside the first input)
    RunConfig.check_machine      what the options ask of this machine
    storage/places.check_output  the output and the checkpoint folder (a peek at its marker)
    data/read.inspect_inputs     layout and schemas of every file, nulls from footer statistics,
                                 units
    engines/resolve              the model (a hub id to its snapshot), its kind, device, dtype,
                                 the options that must fit them
    storage/fingerprint          what the checkpoint is made from (the inputs it adds itself)
    storage/places.open_checkpoint  the checkpoint under its lease, the output checked again

Every stat, listing and read goes through storage Locations: nothing here asks whether a path
is local or in object storage.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pipeline.config import RunConfig
from pipeline.data.read import InputLayout, Unit, inspect_inputs
from pipeline.errors import InputError
from pipeline.storage import places
from pipeline.storage.fingerprint import fingerprint
from pipeline.storage.location import Location
from pipeline.storage.sink import CheckpointSink


@dataclass
class Plan:
    cfg: RunConfig  # with the output resolved (and a hub id resolved to its local snapshot)
    layout: InputLayout
    units: list[Unit]
    total_pairs: int
    device: object = None  # torch.device
    dtype: str = ""
    kind: object = None
    ckpt: CheckpointSink | None = None  # the run's sink: checkpoint, lease, inputs, output
    output_existed: bool = True  # at the start, under the lock (False: one there at the end is someone else's)
    inputs: tuple[Location, ...] = ()  # the input files, expanded from cfg.inputs
    # Pairs the run scores in all, as the progress and an interruption count them: known from the
    # footers, except with --chunk-tokens, where each document is as many pairs as it has windows
    # (known once its unit is tokenized): None.
    pairs_to_score: int | None = None
    # What decides an output beyond the scores (not in the fingerprint): a rerun that asks for
    # another one writes the output again from the parts.
    shape: dict = field(default_factory=dict)

    @property
    def input_files(self) -> list[str]:
        """The input files as paths or URIs, in order."""
        return [str(i) for i in self.inputs]

    @property
    def unit_ids(self) -> list[str]:
        return [u.id for u in self.units]


def locate(cfg: RunConfig) -> tuple[RunConfig, tuple[Location, ...]]:
    """What the config leaves to planning: its input specs expanded to files (directories,
    globs, prefixes), and its output (the default beside the first input; the "/" of an existing
    directory, which makes it a dataset). Returns the config with that output, and the files."""
    inputs, output = places.locate(cfg.inputs, cfg.output)
    if output != cfg.output:
        cfg = dataclasses.replace(cfg, output=output)
    return cfg, inputs


def check_output(cfg: RunConfig, inputs, resumable: bool | None = None) -> None:
    """Refuse an output the run cannot or must not write (exit 2). `resumable`: the checkpoint
    holds work of this output (None: peek at its marker)."""
    places.check_output(cfg.output, cfg.ckpt_dir, inputs, overwrite=cfg.overwrite, restart=cfg.restart,
                        resumable=resumable)


def check_inputs(cfg: RunConfig, inputs: tuple[Location, ...] | None = None):
    """Input checks from footers alone (no model, no checkpoint); each input's footer is read
    once. `inputs`: the files of `cfg` (None: found from cfg.inputs here). Returns the config
    with its output, the input files, their layout, the units and the total pairs."""
    if inputs is None:
        cfg, inputs = locate(cfg)
    cfg.check_machine()
    places.check_output(cfg.output, cfg.ckpt_dir, inputs, overwrite=cfg.overwrite, restart=cfg.restart)
    layout, units, total_pairs = inspect_inputs(inputs, cfg)
    return cfg, inputs, layout, units, total_pairs


def validate(cfg: RunConfig, inputs: tuple[Location, ...] | None = None) -> tuple[InputLayout, list[Unit], int]:
    """check_inputs, returning the layout, the units and the total pairs."""
    return check_inputs(cfg, inputs)[2:]


def make_plan(cfg: RunConfig, kind=None, run_id: str | None = None) -> Plan:
    # The engines import torch: here, not at the top, so that `--help` and the CLI's checks stay fast.
    from pipeline.engines.resolve import resolve
    from pipeline.engines.threads import env_threads

    if not cfg.inputs:
        raise InputError("no input given; pass one or more Parquet files, directories or globs")
    cfg, inputs, layout, units, total_pairs = check_inputs(cfg)
    env_threads()  # a bad RERANK_CPU_THREADS is refused here, before a model loads or a worker starts
    model = resolve(cfg, kind)
    if model.model != cfg.model:
        cfg = dataclasses.replace(cfg, model=model.model)
    fp = fingerprint(cfg, layout, model.device.type, model.dtype, model.kind)
    ck, existed = places.open_checkpoint(cfg.ckpt_dir, fp, inputs, output=cfg.output, overwrite=cfg.overwrite,
                                         restart=cfg.restart, run_id=run_id, own_root=cfg.checkpoint_dir is None)
    return Plan(cfg, layout, units, total_pairs, model.device, model.dtype, model.kind, ck, existed, inputs,
                pairs_to_score=None if cfg.chunk_tokens else total_pairs, shape=cfg.output_fields())


__all__ = ["Plan", "make_plan", "locate", "validate", "check_output", "fingerprint"]
