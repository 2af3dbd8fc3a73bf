"""The GGUF copy of an adapter (`gguf/adapter.gguf`), written once when a version is registered,
so any S3 client or presigned-link downloader gets a file llama.cpp and Ollama load.

It is made from the PEFT layout (converted from the mlx-lm one when only that is stored) and the
base model's config.json, which names the architecture and the head counts; a base model that
is not in the models bucket (a hub id, a local path) has no config the registry can read, and
its versions get no copy (logged, and a `format: gguf` download says so). Nor does a full
fine-tune: it is a whole model, not an adapter (`tunebus adapters download --format gguf-merged`
writes it as one full GGUF).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import structlog

from tunebus.contracts import Artifact, TrainingCompleted
from tunebus.shared.adapter_layouts import (
    CONFIG,
    FULL,
    GGUF_DIR,
    GGUF_FILE,
    MLX,
    PEFT,
    WEIGHTS,
    layouts,
)
from tunebus.shared.objectstore import ObjectNotFound, ObjectStore

log = structlog.get_logger()
NAME = f"{GGUF_DIR}/{GGUF_FILE}"


def gguf_copy(store: ObjectStore, training: TrainingCompleted, models_bucket: str,
              name: str) -> Artifact | None:
    """The stored copy (written now unless an earlier attempt did), or None saying why not."""
    uri = f"{training.adapter_uri.rstrip('/')}/{NAME}"
    try:
        stat = store.stat(uri)
        return Artifact(name=NAME, uri=uri, size=stat.size, sha256=stat.sha256 or "")
    except ObjectNotFound:
        pass
    by_name = {a.name: a for a in training.artifacts}
    present = layouts(list(by_name))
    if FULL in present:
        log.info("no GGUF copy: a full fine-tune is a whole model, not an adapter")
        return None
    base = training.request.base_model
    if not base.startswith(f"s3://{models_bucket}/"):
        log.info("no GGUF copy: the base model is not in the models bucket", base_model=base)
        return None
    stored = PEFT if PEFT in present else MLX if MLX in present else None
    if stored is None:
        log.warning("no GGUF copy: no adapter layout among the artifacts")
        return None
    from tunebus.shared import adapter_layouts
    from tunebus.shared.adapter_gguf import GgufError, peft_to_gguf

    with tempfile.TemporaryDirectory(prefix="tunebus-gguf-") as tmp:
        folder = Path(tmp) / stored
        for file in (CONFIG, WEIGHTS[stored]):
            store.get_file(by_name[present[stored] + file].uri, folder / file)
        try:
            config = json.loads(store.get_bytes(f"{base.rstrip('/')}/config.json"))
            peft = folder if stored == PEFT else adapter_layouts.mlx_to_peft(
                folder, Path(tmp) / "peft", base_model=base)
            path = peft_to_gguf(peft, Path(tmp) / GGUF_FILE, config, name=name)
        except (ObjectNotFound, GgufError, ValueError) as e:
            log.warning("no GGUF copy", reason=str(e))
            return None
        stored_object = store.put_file(uri, path)
    return Artifact(name=NAME, uri=uri, size=stored_object.size, sha256=stored_object.sha256)
