"""The GGUF copy of an adapter, read back with gguf-py: every tensor named, shaped and valued as
llama.cpp's converter would write the PEFT adapter's."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGUFReader

from tests.helpers.registration import GGUF_NAMES, llama_cpp_tensors, random_adapter
from tunebus.shared.adapter_gguf import GgufError, peft_to_gguf
from tunebus.shared.adapter_layouts import PEFT_DIR

@pytest.fixture(scope="module")
def peft_adapter(tiny_model, tmp_path_factory):
    out = random_adapter(tiny_model, tmp_path_factory.mktemp("gguf") / "a", seed=3, keys=tuple(GGUF_NAMES))
    return out / PEFT_DIR


def test_every_tensor_is_the_peft_adapters_under_its_llama_cpp_name(peft_adapter, tiny_model, tmp_path):
    config = json.loads((tiny_model / "config.json").read_text())
    path = peft_to_gguf(peft_adapter, tmp_path / "adapter.gguf", config, name="chatty:1")

    reader = GGUFReader(path)
    found = {t.name: np.asarray(t.data) for t in reader.tensors}
    want = llama_cpp_tensors(peft_adapter, config)
    assert sorted(found) == sorted(want) and len(found) == 2 * 2 * len(GGUF_NAMES)
    for name, value in want.items():
        assert found[name].shape == value.shape, name
        assert found[name].dtype == np.float32 and np.array_equal(found[name], value), name

    def field(key):
        f = reader.fields[key]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]]

    lora = json.loads((peft_adapter / "adapter_config.json").read_text())
    assert field("general.architecture") == "llama" and field("general.type") == "adapter"
    assert field("adapter.type") == "lora"
    assert field("adapter.lora.alpha") == pytest.approx(lora["lora_alpha"])


def test_a_dora_adapter_or_an_unknown_architecture_is_refused_saying_why(peft_adapter, tiny_model, tmp_path):
    config = json.loads((tiny_model / "config.json").read_text())
    with pytest.raises(GgufError, match="base model type 'mamba' has no GGUF mapping"):
        peft_to_gguf(peft_adapter, tmp_path / "x.gguf", config | {"model_type": "mamba"})
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_model.safetensors").write_bytes((peft_adapter / "adapter_model.safetensors").read_bytes())
    lora = json.loads((peft_adapter / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(lora | {"use_dora": True}))
    with pytest.raises(GgufError, match="use_dora is set"):
        peft_to_gguf(dora, tmp_path / "y.gguf", config)
