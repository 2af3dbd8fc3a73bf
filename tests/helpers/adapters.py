"""Registered adapters in seconds, without training: random LoRA weights on the tiny model,
uploaded where the trainer puts them and announced as the trainer announces them (evaluation
off, so the evaluator answers `skipped` at once and the registry registers the version)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from tunebus.contracts import Artifact, TrainingCompleted, TrainingCompletedEvent, subjects
from tunebus.shared.adapter_formats import mlx_to_peft
from tunebus.shared.adapter_layouts import PEFT_DIR, adapter_prefix

from .bus import connect

EXAMPLE = Path(__file__).parents[1].parent / "contracts" / "examples" / "v1" / "tunebus.training.completed.v1.json"


def random_adapter(model_dir: Path, out_dir: Path, *, seed: int, rank: int = 4,
                   scale: float = 4.0, base_model: str = "tiny") -> Path:
    """An mlx-lm LoRA adapter (q/v projections of every layer) with random A and B, and its
    PEFT copy under peft/: large enough to change the tiny model's answers."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(str(model_dir))
    layers = len(model.layers)
    parameters = {"rank": rank, "scale": scale, "dropout": 0.0, "keys": ["self_attn.q_proj", "self_attn.v_proj"]}
    model.freeze()
    linear_to_lora_layers(model, layers, parameters)
    mx.random.seed(seed)
    weights = {name: mx.random.normal(w.shape) * 0.5 for name, w in tree_flatten(model.trainable_parameters())}
    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / "adapters.safetensors"), weights)
    (out_dir / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": layers, "lora_parameters": parameters}))
    mlx_to_peft(out_dir, out_dir / PEFT_DIR, base_model=base_model)
    return out_dir


async def register(settings, trainer_settings, store, name: str, adapter_dir: Path, base_model: str,
                   events) -> dict:
    """Upload `adapter_dir` as job `<name>-<random>` of adapter `name`, publish its
    training.completed as the trainer, and wait for the registry: the AdapterEntry (JSON)."""
    job_id = f"{name}-{uuid.uuid4().hex[:6]}"
    prefix = adapter_prefix(settings.s3.adapters_bucket, name, job_id)
    stored = store.put_dir(prefix, adapter_dir)
    data = json.loads(EXAMPLE.read_text())["data"]
    data["job_id"] = data["request"]["job_id"] = job_id
    data["request"] |= {"adapter_name": name, "base_model": base_model, "evaluation": {"enabled": False}}
    data |= {"adapter_uri": prefix, "artifacts": [
        Artifact(name=o.uri.removeprefix(prefix + "/"), uri=o.uri, sha256=o.sha256, size=o.size).model_dump()
        for o in stored]}
    event = TrainingCompletedEvent.wrap(TrainingCompleted.model_validate(data), source="tests/adapters")
    nc = await connect(trainer_settings)
    try:
        await nc.jetstream().publish(subjects.TRAINING_COMPLETED, event.model_dump_json().encode(),
                                     headers={"Nats-Msg-Id": event.id})
    finally:
        await nc.close()
    return (await events.wait_for(job_id, ".adapter.registered", timeout=60))["data"]["entry"]
