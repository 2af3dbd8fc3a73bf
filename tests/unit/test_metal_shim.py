"""The Metal-key shim of benchmarks/trainer_mlx.py's raw side: mlx-lm-lora's own trainer starts
off Metal only with it, and every trainer module gets mlx.core back afterwards."""

from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import pytest
from mlx_lm import load
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm_lora.trainer import sft_trainer
from mlx_lm_lora.trainer.datasets import CacheDataset, ChatDataset

from benchmarks.metal_shim import WORKING_SET_KEY, metal_working_set_shim
from tests.helpers.backends import chat_example


def _one_step_of_train_sft(model_dir: Path, adapter_file: Path) -> None:
    """Call the library trainer directly, exactly as it would run without our wrapper."""
    model, tokenizer = load(str(model_dir))
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "dropout": 0.0, "scale": 1.0})
    data = CacheDataset(ChatDataset([chat_example(i) for i in range(4)], tokenizer))
    sft_trainer.train_sft(
        model=model,
        optimizer=optim.Adam(learning_rate=1e-3),
        train_dataset=data,
        args=sft_trainer.SFTTrainingArgs(iters=1, batch_size=4, adapter_file=str(adapter_file)),
    )


def test_train_sft_runs_off_metal_only_with_the_working_set_shim(tiny_model, tmp_path):
    if WORKING_SET_KEY in mx.device_info():  # Metal: the library works as is, the shim stays out
        with metal_working_set_shim():
            assert sft_trainer.mx is mx
        return
    with pytest.raises(KeyError, match=WORKING_SET_KEY):
        _one_step_of_train_sft(tiny_model, tmp_path / "without.safetensors")
    with metal_working_set_shim():
        _one_step_of_train_sft(tiny_model, tmp_path / "with.safetensors")
    assert (tmp_path / "with.safetensors").exists()


def test_shim_restores_the_trainer_module_even_after_an_error():
    with pytest.raises(RuntimeError):
        with metal_working_set_shim():
            with metal_working_set_shim():  # a second training in another thread, say
                pass
            assert WORKING_SET_KEY in sft_trainer.mx.device_info()
            raise RuntimeError("training failed")
    assert sft_trainer.mx is mx
    assert mx.device_info() == sft_trainer.mx.device_info()
