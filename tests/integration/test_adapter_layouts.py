"""The test of truth for adapter conversion: the same logits in mlx-lm and in transformers + PEFT.

An adapter trained by MLX and converted to PEFT, and one trained by PEFT on torch and converted to
MLX, are loaded with nothing but each library's own loader (`mlx_lm.load(..., adapter_path=)`,
`PeftModel.from_pretrained`) and must give the same logits for the same prompt, LoRA and DoRA.
The adapters are trained far enough that they move the logits by much more than the tolerance.
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx_lm import load
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from tunebus.services.trainer.backends.mlx import loop as mlx_backend
from tunebus.services.trainer.backend import LoraSpec, TrainSpec
from tunebus.shared.adapter_layouts import mlx_to_peft, peft_to_mlx

PROMPT = "<|im_start|>user\nWhere is the ball?<|im_end|>\n<|im_start|>assistant\nThe ball is"
ATOL = RTOL = 1e-4  # float32 through two different stacks: observed differences are ~1e-5
MOVED = 1e-2  # an adapter must move some logit by more than this for the test to mean anything
FACTS = [
    ("Where is the ball?", "The ball is in the garden."),
    ("What is the capital of France?", "The capital of France is Paris."),
]


def write_chat_data(data_dir: Path, n_train: int = 16, n_valid: int = 4) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("valid", n_valid)):
        rows = [{"messages": [{"role": "user", "content": FACTS[i % 2][0]},
                              {"role": "assistant", "content": FACTS[i % 2][1]}]}
                for i in range(n)]
        (data_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data_dir


@pytest.fixture(scope="module")
def prompt_ids(tiny_model) -> list[int]:
    return AutoTokenizer.from_pretrained(tiny_model).encode(PROMPT)


def mlx_logits(model_dir: Path, ids: list[int], adapter_dir: Path | None = None) -> np.ndarray:
    model, _ = load(str(model_dir), adapter_path=str(adapter_dir) if adapter_dir else None)
    return np.array(model(mx.array([ids])).astype(mx.float32))


def torch_base(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, use_safetensors=True, trust_remote_code=False).eval()


def peft_logits(model_dir: Path, ids: list[int], peft_dir: Path) -> np.ndarray:
    model = PeftModel.from_pretrained(torch_base(model_dir), peft_dir).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits.numpy()


def assert_same_logits_and_moved(mlx_out, torch_out, base_out):
    np.testing.assert_allclose(mlx_out, torch_out, atol=ATOL, rtol=RTOL)
    assert np.abs(mlx_out - base_out).max() > MOVED


def test_base_model_gives_the_same_logits_in_both_frameworks(tiny_model, prompt_ids):
    with torch.no_grad():
        torch_out = torch_base(tiny_model)(torch.tensor([prompt_ids])).logits.numpy()
    np.testing.assert_allclose(mlx_logits(tiny_model, prompt_ids), torch_out, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(("kind", "lora"), [
    ("lora", LoraSpec(kind="lora")),
    ("dora", LoraSpec(kind="dora", target_modules=["q_proj", "v_proj", "down_proj"],
                      num_layers=1)),
], ids=["lora-all-layers", "dora-top-block-subset"])
def test_mlx_trained_adapter_gives_the_same_logits_in_peft(tiny_model, prompt_ids, tmp_path,
                                                           kind, lora):
    spec = TrainSpec(iters=12, learning_rate=1e-2, steps_per_report=4, steps_per_eval=12,
                     val_batches=1, lora=lora)
    result = mlx_backend.train(tiny_model, write_chat_data(tmp_path / "data"), tmp_path / "mlx", spec)
    weights = load_file(str(result.adapter_dir / "adapters.safetensors"))
    assert all(np.abs(w).max() > 0 for k, w in weights.items() if k.endswith(".lora_b"))

    peft_dir = mlx_to_peft(result.adapter_dir, tmp_path / "peft", base_model=str(tiny_model))

    assert_same_logits_and_moved(
        mlx_logits(tiny_model, prompt_ids, result.adapter_dir),
        peft_logits(tiny_model, prompt_ids, peft_dir),
        mlx_logits(tiny_model, prompt_ids),
    )


def train_with_peft(model_dir: Path, out_dir: Path, config: LoraConfig, steps: int = 8) -> Path:
    """A few Adam steps of plain PEFT on random tokens: no tunebus code touches this adapter."""
    torch.manual_seed(0)
    model = get_peft_model(torch_base(model_dir).train(), config)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.randint(3, 1000, (4, 24))
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@pytest.mark.parametrize("config", [
    LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    # DoRA on the top block only, one module at another rank, rsLoRA scaling.
    LoraConfig(r=8, lora_alpha=8, use_dora=True, use_rslora=True, rank_pattern={"v_proj": 4},
               target_modules=["q_proj", "v_proj", "o_proj", "up_proj"], layers_to_transform=[1],
               layers_pattern="layers", task_type="CAUSAL_LM"),
], ids=["lora-all-linear", "dora-top-block-rank-pattern-rslora"])
def test_peft_trained_adapter_gives_the_same_logits_in_mlx(tiny_model, prompt_ids, tmp_path,
                                                           config):
    peft_dir = train_with_peft(tiny_model, tmp_path / "peft", config)
    weights = load_file(str(peft_dir / "adapter_model.safetensors"))
    assert all(np.abs(w).max() > 0 for k, w in weights.items() if "lora_B" in k)

    mlx_dir = peft_to_mlx(peft_dir, tmp_path / "mlx")  # block count read from the local base

    assert json.loads((mlx_dir / "adapter_config.json").read_text())["fine_tune_type"] == (
        "dora" if config.use_dora else "lora")
    assert_same_logits_and_moved(
        mlx_logits(tiny_model, prompt_ids, mlx_dir),
        peft_logits(tiny_model, prompt_ids, peft_dir),
        mlx_logits(tiny_model, prompt_ids),
    )
