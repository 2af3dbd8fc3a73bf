"""What only the torch backend (transformers + PEFT + TRL) does, on the tiny model, on the CPU:
its hardware choices, PEFT's layout, TRL's batching (tests/unit/test_backend_contract.py holds
what every backend does)."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx_lm import load
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from tunebus.services.trainer.backend import TrainingHooks
from tunebus.services.trainer.backends.torch.loop import (
    Hardware,
    TorchOptions,
    _quantization_config,
    _resolve_run,
    capabilities,
    quantization_refusal,
    train,
)
from tunebus.services.trainer.backends.torch.methods import _sft_collator

from tests.helpers.backends import quick_spec, write_chat_data

CPU = Hardware(cuda=False, device_name="cpu", bf16=False, bitsandbytes=True, flash_attn=False,
               liger_kernel=False)
H100 = Hardware(cuda=True, device_name="NVIDIA H100", bf16=True, bitsandbytes=True,
                flash_attn=True, liger_kernel=True)


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    return write_chat_data(tmp_path_factory.mktemp("data"))


@pytest.fixture
def lora_run(lora_runs):
    return lora_runs("cuda")


def test_the_loss_curve_has_a_point_per_report_window_only(lora_run):
    result, _, _ = lora_run
    assert [c["step"] for c in result.curve] == [5, 10, 15, 20, 25, 30]


def test_resolved_args_spell_out_the_run_on_this_cpu(lora_run):
    args = lora_run[0].resolved_args
    assert json.loads(json.dumps(args)) == args
    assert args["device"] == "cpu" and args["dtype"] == "float32"
    assert args["mixed_precision"] == "no" and args["backend_args"]["attn_implementation"] == "sdpa_varlen"
    assert args["batching"] == "padding_free" and args["quantization"] == "none"
    assert args["lora_parameters"]["keys"] == [
        "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj",
        "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
    assert args["library_versions"]["torch"].startswith("2.")


def test_the_peft_layout_is_written_beside_the_mlx_copy(lora_run):
    out = lora_run[0].adapter_dir
    assert {p.name for p in (out / "peft").iterdir()} == {
        "adapter_model.safetensors", "adapter_config.json"}


def test_peft_output_loads_with_plain_peft_and_matches_the_mlx_copy(lora_run, tiny_model):
    out = lora_run[0].adapter_dir
    ids = AutoTokenizer.from_pretrained(tiny_model).encode("Where is the ball?")
    base = AutoModelForCausalLM.from_pretrained(tiny_model, use_safetensors=True)
    with torch.no_grad():
        base_logits = base(torch.tensor([ids])).logits.numpy()
        tuned = PeftModel.from_pretrained(base, out / "peft").eval()
        peft_logits = tuned(torch.tensor([ids])).logits.numpy()
    mlx_model, _ = load(str(tiny_model), adapter_path=str(out))
    mlx_logits = np.array(mlx_model(mx.array([ids])))
    assert np.abs(peft_logits - base_logits).max() > 1e-2
    np.testing.assert_allclose(mlx_logits, peft_logits, atol=1e-4, rtol=1e-4)


def test_padding_free_batches_keep_examples_apart(tiny_model):
    """Two examples laid end to end in one row give each the logits it gets alone.

    Called as TRL's SFTTrainer.compute_loss calls the model (use_cache=False): transformers keeps
    packed sequences apart only when there is neither an attention mask nor a KV cache.
    """
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    first, second = (tokenizer.encode(t) for t in ("Where is the ball?", "The sky is blue today."))
    batch = _sft_collator("padding_free", tokenizer)([
        {"input_ids": first, "labels": first}, {"input_ids": second, "labels": second}])
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, len(first + second))
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits[0]
        alone = [model(torch.tensor([ids])).logits[0] for ids in (first, second)]
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=1e-5)


def test_quantization_is_refused_on_a_cpu_worker_with_the_reason(tiny_model, chat_data, tmp_path):
    assert capabilities(CPU)["quantization"] == {"none"}
    assert "CUDA GPU" in quantization_refusal("4bit", CPU)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        train(tiny_model, chat_data, tmp_path / "q", quick_spec(quantization="4bit"), hardware=CPU)
    assert not (tmp_path / "q").exists()


def test_quantization_needs_bitsandbytes_on_a_gpu_worker():
    without_bnb = Hardware(**{**H100.__dict__, "bitsandbytes": False})
    assert "bitsandbytes" in quantization_refusal("8bit", without_bnb)
    assert quantization_refusal("4bit", H100) is None
    assert capabilities(H100)["quantization"] == {"none", "4bit", "8bit"}


def test_speed_features_are_chosen_where_the_gpu_has_them():
    gpu = _resolve_run(TorchOptions(), H100)
    assert gpu["dtype"] == torch.bfloat16 and gpu["bf16"]
    assert gpu["attn_implementation"] == "flash_attention_2" and gpu["liger"]
    no_flash = _resolve_run(TorchOptions(liger=False),
                            Hardware(**{**H100.__dict__, "flash_attn": False}))
    assert no_flash["attn_implementation"] == "sdpa" and not no_flash["liger"]
    cpu = _resolve_run(TorchOptions(), Hardware(**{**CPU.__dict__, "liger_kernel": True}))
    assert cpu["dtype"] == torch.float32 and not cpu["bf16"] and not cpu["liger"]


def test_an_unknown_method_is_refused_naming_the_methods_there_are(tiny_model, chat_data,
                                                                    tmp_path):
    with pytest.raises(ValueError, match=r"method 'kto' is not supported by the torch backend "
                                         r"\(cpo, dpo, grpo, orpo, sft\)"):
        train(tiny_model, chat_data, tmp_path / "kto", quick_spec(method="kto"))
    assert not (tmp_path / "kto").exists()


def test_a_bad_line_is_named_by_file_and_line(tiny_model, tmp_path):
    data = write_chat_data(tmp_path / "data", n_train=3)
    with (data / "train.jsonl").open("a") as f:
        f.write('{"messages": [{"role": "user", "content": "no answer"}]}\n')
    with pytest.raises(ValueError, match=r"train\.jsonl:4: messages\[-1\]\.role"):
        train(tiny_model, data, tmp_path / "out", quick_spec(iters=1))


def test_padding_free_training_computes_what_padded_batches_compute(tiny_model, chat_data,
                                                                    tmp_path):
    """Padded batches with an attention mask keep examples apart by construction; the default
    padding-free batches must give the same losses through the real trainer."""
    spec = quick_spec(iters=3, steps_per_report=1, steps_per_eval=3)
    losses = {}
    for batching in ("padded", "padding_free"):
        reports = []
        train(tiny_model, chat_data, tmp_path / batching, spec,
              TrainingHooks(on_progress=reports.append), options=TorchOptions(batching=batching))
        losses[batching] = [(r.train_loss, r.val_loss) for r in reports]
    np.testing.assert_allclose(np.array(losses["padding_free"], dtype=float),
                               np.array(losses["padded"], dtype=float), rtol=1e-5)


def test_qlora_asks_bitsandbytes_for_nf4_with_double_quantization():
    four = _quantization_config("4bit", torch.bfloat16)
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4"
    assert four.bnb_4bit_use_double_quant and four.bnb_4bit_compute_dtype == torch.bfloat16
    assert _quantization_config("8bit", torch.bfloat16).load_in_8bit
    assert _quantization_config("none", torch.bfloat16) is None


def test_reports_also_come_every_interval_without_changing_the_loss_curve(tiny_model, chat_data,
                                                                         tmp_path):
    reports = []
    spec = quick_spec(iters=6, steps_per_report=3, steps_per_eval=100, report_interval_s=1e-9)
    result = train(tiny_model, chat_data, tmp_path / "timed", spec,
                   TrainingHooks(on_progress=reports.append))
    assert [r.step for r in reports] == [1, 2, 3, 4, 5, 6]
    assert [r.step for r in reports if r.train_loss is not None] == [3, 6]
    assert [p["step"] for p in result.curve] == [3, 6]
