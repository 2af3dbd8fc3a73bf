"""SDPA per example (backends/torch/varlen.py): the scores of each example alone, none between
examples, and chosen for SFT's padding-free rows only."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tunebus.services.trainer.backends.torch import varlen  # noqa: E402
from tunebus.services.trainer.backends.torch.loop import (  # noqa: E402
    Hardware,
    TorchOptions,
    _resolve_run,
)

CPU = Hardware(cuda=False, device_name="cpu", bf16=False, bitsandbytes=False, flash_attn=False,
               liger_kernel=False)
LENGTHS = [5, 17, 9]


@pytest.fixture(scope="module")
def model():
    config = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def packed_row():
    ids = torch.randint(0, 256, (1, sum(LENGTHS)), generator=torch.Generator().manual_seed(1))
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    return ids, positions


def test_a_padding_free_row_scores_each_example_as_if_it_were_alone(model):
    ids, positions = packed_row()
    starts = [0, 5, 22]
    alone = torch.cat([model(input_ids=ids[:, s:s + n]).logits
                       for s, n in zip(starts, LENGTHS)], dim=1)
    model.set_attn_implementation(varlen.register())
    try:
        row = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    finally:
        model.set_attn_implementation("sdpa")
    masked = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    assert torch.allclose(row, alone, atol=1e-5)
    assert torch.allclose(row, masked, atol=1e-5)  # what SDPA's T x T block mask computes


def test_a_padding_free_row_has_the_gradients_of_sdpas_block_mask(model):
    ids, positions = packed_row()

    def grads(attn):
        model.zero_grad()
        model.set_attn_implementation(attn)
        try:
            loss = model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False).loss
            loss.backward()
        finally:
            model.set_attn_implementation("sdpa")
        return {n: p.grad.clone() for n, p in model.named_parameters() if "self_attn" in n}

    row, masked = grads(varlen.register()), grads("sdpa")
    assert all(torch.allclose(row[n], masked[n], atol=1e-5) for n in masked)


def test_it_computes_no_score_between_examples(model, monkeypatch):
    ids, positions = packed_row()
    scores = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counted(query, key, *args, **kwargs):
        scores.append(query.shape[-2] * key.shape[-2])
        return sdpa(query, key, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    model.set_attn_implementation(varlen.register())
    try:
        model(input_ids=ids, position_ids=positions, use_cache=False)
    finally:
        model.set_attn_implementation("sdpa")
    layers = model.config.num_hidden_layers
    assert sum(scores) == layers * sum(n * n for n in LENGTHS) < layers * sum(LENGTHS) ** 2


def test_example_bounds_are_where_positions_restart():
    assert varlen.example_bounds(torch.tensor([[0, 1, 2, 0, 1, 0]])) == [0, 3, 5, 6]
    assert varlen.example_bounds(torch.tensor([[0, 1, 2]])) == [0, 3]


def test_sdpa_varlen_is_chosen_for_padding_free_rows_only():
    assert _resolve_run(TorchOptions(), CPU, padding_free=True)["attn_implementation"] == varlen.NAME
    assert _resolve_run(TorchOptions(), CPU)["attn_implementation"] == "sdpa"
    asked = TorchOptions(attn_implementation="sdpa")
    assert _resolve_run(asked, CPU, padding_free=True)["attn_implementation"] == "sdpa"
    flash = Hardware(**{**CPU.__dict__, "cuda": True, "bf16": True, "flash_attn": True})
    assert _resolve_run(TorchOptions(), flash, padding_free=True)["attn_implementation"] \
        == "flash_attention_2"
