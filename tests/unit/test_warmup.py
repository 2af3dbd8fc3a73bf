"""Warm workers: the throwaway model loads through every backend's own loading code, so a
worker that ran its warm-up has paid the first load's imports before it answers discovery."""

from __future__ import annotations

import importlib.util

import pytest

from tunebus.shared.warmup import MESSAGES, write_warm_up_model

needs_mlx = pytest.mark.skipif(importlib.util.find_spec("mlx_lm") is None, reason="mlx-lm")
needs_torch = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                 reason="transformers")


@needs_torch
def test_the_warm_up_model_is_a_checkpoint_transformers_loads(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = write_warm_up_model(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer.encode(tokenizer.apply_chat_template(MESSAGES, tokenize=False))
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
    assert model(input_ids=torch.tensor([ids])).logits.shape[-1] == len(tokenizer)


@needs_mlx
def test_the_warm_up_model_is_a_checkpoint_mlx_lm_loads(tmp_path):
    import mlx.core as mx
    from mlx_lm import load

    model, tokenizer = load(str(write_warm_up_model(tmp_path)))
    ids = tokenizer.encode(tokenizer.apply_chat_template(MESSAGES, tokenize=False))
    assert model(mx.array([ids])).shape[0] == 1


@pytest.mark.parametrize("name", ["mlx", "cuda"])
def test_each_trainer_backend_warms_up(name):
    from tunebus.services.trainer import backends

    if any(importlib.util.find_spec(m) is None for m in backends.BACKENDS[name].requires):
        pytest.skip(f"{name} backend not installed")
    backends.warm_up(name)


@pytest.mark.parametrize("name", ["mlx", "cuda"])
def test_each_evaluator_backend_warms_up(name):
    from tunebus.services.evaluator.backend import load_backend, missing

    if missing(name):
        pytest.skip(f"{name} evaluation backend not installed")
    load_backend(name).warm_up()
