"""Registered adapters in seconds, without training: random LoRA weights on the tiny model,
uploaded where the trainer puts them and announced as the trainer announces them (evaluation
off, so the evaluator answers `skipped` at once and the registry registers the version)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from tunebus.contracts import Artifact, TrainingCompleted, TrainingCompletedEvent, subjects
from tunebus.shared.adapter_layouts import mlx_to_peft
from tunebus.shared.adapter_layouts import PEFT_DIR, adapter_prefix

from .bus import connect
from .events import EventLog

EXAMPLE = Path(__file__).parents[1].parent / "contracts" / "examples" / "v1" / "tunebus.training.completed.v1.json"


def random_adapter(model_dir: Path, out_dir: Path, *, seed: int, rank: int = 4,
                   scale: float = 4.0, base_model: str = "tiny",
                   keys: tuple[str, ...] = ("self_attn.q_proj", "self_attn.v_proj")) -> Path:
    """An mlx-lm LoRA adapter (on `keys` of every layer) with random A and B, and its PEFT copy
    under peft/: large enough to change the tiny model's answers."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(str(model_dir))
    layers = len(model.layers)
    parameters = {"rank": rank, "scale": scale, "dropout": 0.0, "keys": list(keys)}
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


# llama.cpp's names for the Llama modules an adapter may touch (its tensor map, written out here
# so that the tests do not take the code's word for it).
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.down_proj": "ffn_down"}


def llama_cpp_tensors(peft_dir: Path, config: dict) -> dict:
    """The tensors llama.cpp's LoRA GGUF of a Llama model's PEFT adapter holds: {name: array}."""
    import numpy as np
    from safetensors.numpy import load_file

    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    out = {}
    for key, value in load_file(str(Path(peft_dir) / "adapter_model.safetensors")).items():
        layer, rest = key.removeprefix("base_model.model.model.layers.").split(".", 1)
        module, part = rest.rsplit(".lora_", 1)
        if part == "B.weight" and module.endswith(("q_proj", "k_proj")):
            # llama.cpp's q/k row order: within each head, the two RoPE halves interleaved.
            h = heads[module.rsplit(".", 1)[1]]
            d = value.shape[0] // h
            value = np.stack([value.reshape(h, 2, d // 2, -1)[:, j] for j in (0, 1)], axis=2).reshape(value.shape)
        out[f"blk.{layer}.{GGUF_NAMES[module]}.weight.lora_{part[0].lower()}"] = value
    return out


async def register(settings, trainer_settings, store, name: str, adapter_dir: Path, base_model: str,
                   events, adapter: dict | None = None) -> dict:
    """Upload `adapter_dir` as job `<name>-<random>` of adapter `name`, publish its
    training.completed as the trainer, and wait for the registry: the AdapterEntry (JSON).
    `adapter`: the request's adapter settings, where the example's do not describe it."""
    job_id = f"{name}-{uuid.uuid4().hex[:6]}"
    prefix = adapter_prefix(settings.s3.adapters_bucket, name, job_id)
    stored = store.put_dir(prefix, adapter_dir)
    data = json.loads(EXAMPLE.read_text())["data"]
    data["job_id"] = data["request"]["job_id"] = job_id
    data["request"] |= {"adapter_name": name, "base_model": base_model, "evaluation": {"enabled": False}}
    if adapter is not None:
        data["request"]["adapter"] = adapter
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


async def register_on(stack, store, name: str, adapter_dir: Path, base_model: str,
                      adapter: dict | None = None) -> dict:
    """`register` on the stack: announced as its trainer, the registration seen as an observer."""
    nc = await connect(stack.as_role("observer"))
    events = await EventLog().start(nc)
    try:
        return await register(stack.settings, stack.as_role("trainer"), store, name, adapter_dir,
                              base_model, events, adapter)
    finally:
        await nc.close()
