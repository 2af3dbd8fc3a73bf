"""Reading back what an experiment tracker logged, each with its own library's reader where it
has one: {step: {metric: value}} for W&B's offline run file, an MLflow store, TensorBoard's
event files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

History = dict[int, dict[str, float]]


def wandb_records(run_file: Path) -> list:
    """The protobuf Records of a W&B run file (`run-<id>.wandb`). wandb >= 0.28 reads these in
    its Go core only, so the file's framing (LevelDB's log format behind a 7-byte W&B header:
    32 KiB blocks of records with a crc32, length and type) is undone here; each record is
    parsed with wandb's own protobuf class."""
    from wandb.proto import wandb_internal_pb2

    raw = run_file.read_bytes()
    assert raw[:4] == b":W&B", f"{run_file} is not a W&B run file"
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(raw):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[position:position + 7])
        pending += raw[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL, LAST: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_offline_run(directory: Path) -> tuple[dict, History]:
    """({project, name, tags, config}, history) of the one offline run under `directory`."""
    (run_file,) = directory.glob("wandb/offline-run-*/run-*.wandb")
    run, history = {}, {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = {"project": record.run.project, "name": record.run.display_name,
                   "tags": list(record.run.tags), "id": record.run.run_id,
                   "config": {i.key: json.loads(i.value_json) for i in record.run.config.update}}
        elif kind == "config":  # run.config.update after init
            run["config"] |= {i.key: json.loads(i.value_json) for i in record.config.update}
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in record.history.item}
            history[record.history.step.num] = {k: v for k, v in items.items()
                                                if not k.startswith("_")}
    return run, history


def mlflow_history(tracking_uri: str, experiment: str) -> tuple[object, History]:
    """(the run, history) of the one run of `experiment`, read with MlflowClient."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    history: History = {}
    for key in run.data.metrics:
        for metric in client.get_metric_history(run.info.run_id, key):
            history.setdefault(metric.step, {})[key] = metric.value
    return run, history


def tensorboard_history(directory: Path) -> History:
    """The scalars of the event files in `directory`, read with TensorBoard's EventAccumulator
    (tensorboard.summary.Writer writes scalars as tensors, with the scalar plugin's metadata)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    events = EventAccumulator(str(directory), size_guidance={"tensors": 0})
    events.Reload()
    history: History = {}
    for tag in events.Tags()["tensors"]:
        for event in events.Tensors(tag):
            history.setdefault(event.step, {})[tag] = make_ndarray(event.tensor_proto).item()
    return history
