"""MLX <-> PEFT adapter conversion on synthetic tensors: names, layouts, configs, refusals.

The logits in both frameworks are compared in tests/integration/test_adapter_layouts.py; these
tests need only numpy and safetensors.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tunebus.shared.adapter_layouts import AdapterFormatError, mlx_to_peft, peft_to_mlx

from tests.helpers.adapters import HIDDEN, KV, SHAPES, write_mlx_adapter


def delta(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """The (out, in) weight update an mlx-lm LoRA layer adds: scale * B^T A^T."""
    return scale * b.T.astype(np.float64) @ a.T.astype(np.float64)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_mlx_to_peft_transposes_renames_and_round_trips_bit_exactly(tmp_path, kind):
    src = write_mlx_adapter(tmp_path / "mlx", kind=kind)
    peft_dir = mlx_to_peft(src, tmp_path / "peft", base_model="s3://tunebus-models/m")
    back = peft_to_mlx(peft_dir, tmp_path / "back", num_hidden_layers=4)

    mlx, peft = load_file(str(src / "adapters.safetensors")), load_file(
        str(peft_dir / "adapter_model.safetensors"))
    q = "model.layers.2.self_attn.q_proj"
    np.testing.assert_array_equal(peft[f"base_model.model.{q}.lora_A.weight"], mlx[f"{q}.lora_a"].T)
    np.testing.assert_array_equal(peft[f"base_model.model.{q}.lora_B.weight"], mlx[f"{q}.lora_b"].T)
    if kind == "dora":
        np.testing.assert_array_equal(peft[f"base_model.model.{q}.lora_magnitude_vector"],
                                      mlx[f"{q}.m"])
    roundtrip = load_file(str(back / "adapters.safetensors"))
    assert roundtrip.keys() == mlx.keys()
    assert all(np.array_equal(roundtrip[k], mlx[k]) for k in mlx)
    config = json.loads((back / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == kind
    assert config["num_layers"] == 2
    assert config["lora_parameters"] | {"dropout": 0.05} == {
        "rank": 4, "scale": 2.0, "dropout": 0.05, "keys": sorted(SHAPES)}


def test_peft_config_selects_the_same_modules_as_mlx_lm(tmp_path):
    src = write_mlx_adapter(tmp_path / "mlx", layers=(2, 3), rank=4, scale=2.0)
    config = json.loads((mlx_to_peft(src, tmp_path / "peft", base_model="org/model")
                         / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 8  # alpha / r = mlx-lm's scale
    assert config["target_modules"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert config["layers_to_transform"] == [2, 3] and config["layers_pattern"] == "layers"
    assert config["base_model_name_or_path"] == "org/model"
    assert config["use_dora"] is False and config["lora_dropout"] == 0.05


def test_a_ragged_selection_is_listed_module_by_module(tmp_path):
    src = write_mlx_adapter(tmp_path / "mlx", layers=(2, 3))
    weights = load_file(str(src / "adapters.safetensors"))
    ragged = {k: v for k, v in weights.items() if not k.startswith("model.layers.3.self_attn.v")}
    save_file(ragged, str(src / "adapters.safetensors"))
    config = json.loads((mlx_to_peft(src, tmp_path / "peft", base_model="m")
                         / "adapter_config.json").read_text())
    assert config["layers_to_transform"] is None
    assert config["target_modules"] == [
        "model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj",
        "model.layers.3.self_attn.q_proj"]


def write_peft_adapter(directory: Path, config: dict, tensors: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none"} | config))
    return directory


def peft_pair(path: str, rank: int, fan_in: int, fan_out: int, rng) -> dict:
    prefix = f"base_model.model.{path}"
    return {
        f"{prefix}.lora_A.weight": rng.normal(size=(rank, fan_in)).astype(np.float32),
        f"{prefix}.lora_B.weight": rng.normal(size=(fan_out, rank)).astype(np.float32),
    }


def test_per_module_ranks_and_rslora_scales_keep_every_weight_update(tmp_path):
    rng = np.random.default_rng(1)
    q, v = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
    tensors = peft_pair(q, 4, HIDDEN, HIDDEN, rng) | peft_pair(v, 2, HIDDEN, KV, rng)
    config = {"r": 4, "lora_alpha": 8, "use_rslora": True, "rank_pattern": {"v_proj": 2},
              "target_modules": ["q_proj", "v_proj"]}
    src = write_peft_adapter(tmp_path / "peft", config, tensors)
    out = load_file(str(peft_to_mlx(src, tmp_path / "mlx") / "adapters.safetensors"))
    mlx_config = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())

    scale = mlx_config["lora_parameters"]["scale"]
    assert mlx_config["lora_parameters"]["rank"] == 4 and mlx_config["num_layers"] == -1
    for path, r in ((q, 4), (v, 2)):
        peft_delta = (8 / np.sqrt(r)) * (
            tensors[f"base_model.model.{path}.lora_B.weight"].astype(np.float64)
            @ tensors[f"base_model.model.{path}.lora_A.weight"].astype(np.float64))
        assert out[f"{path}.lora_a"].shape[1] == 4  # padded to one rank
        np.testing.assert_allclose(delta(out[f"{path}.lora_a"], out[f"{path}.lora_b"], scale),
                                   peft_delta, rtol=1e-5, atol=1e-6)  # B rescaled in float32


def test_layers_above_zero_need_the_block_count(tmp_path):
    rng = np.random.default_rng(2)
    tensors = peft_pair("model.layers.3.self_attn.q_proj", 4, HIDDEN, HIDDEN, rng)
    src = write_peft_adapter(tmp_path / "peft", {"r": 4, "lora_alpha": 8,
                                                 "base_model_name_or_path": "org/model"}, tensors)
    with pytest.raises(AdapterFormatError, match="num_hidden_layers"):
        peft_to_mlx(src, tmp_path / "mlx")
    peft_to_mlx(src, tmp_path / "mlx", num_hidden_layers=6)
    assert json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())["num_layers"] == 3

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"num_hidden_layers": 5}))
    config = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(
        json.dumps(config | {"base_model_name_or_path": str(model_dir)}))
    peft_to_mlx(src, tmp_path / "mlx2")
    assert json.loads((tmp_path / "mlx2" / "adapter_config.json").read_text())["num_layers"] == 2


@pytest.mark.parametrize(("field", "value", "message"), [
    ("modules_to_save", ["lm_head"], "modules_to_save"),
    ("bias", "lora_only", "bias"),
    ("alpha_pattern", {"q_proj": 32}, "alpha_pattern"),
    ("peft_type", "IA3", "only LORA"),
])
def test_peft_features_mlx_lm_cannot_express_are_refused_by_name(tmp_path, field, value, message):
    rng = np.random.default_rng(3)
    tensors = peft_pair("model.layers.0.self_attn.q_proj", 4, HIDDEN, HIDDEN, rng)
    src = write_peft_adapter(tmp_path / "peft", {"r": 4, "lora_alpha": 8, field: value}, tensors)
    with pytest.raises(AdapterFormatError, match=message) as info:
        peft_to_mlx(src, tmp_path / "mlx")
    assert str(src / "adapter_config.json") in str(info.value)
    assert not (tmp_path / "mlx" / "adapter_config.json").exists()


def test_embedding_lora_is_refused(tmp_path):
    rng = np.random.default_rng(4)
    tensors = {"base_model.model.model.embed_tokens.lora_embedding_A":
               rng.normal(size=(4, 32)).astype(np.float32)}
    src = write_peft_adapter(tmp_path / "peft", {"r": 4, "lora_alpha": 8}, tensors)
    with pytest.raises(AdapterFormatError, match="lora_embedding_A"):
        peft_to_mlx(src, tmp_path / "mlx")


def test_missing_half_of_a_pair_is_named(tmp_path):
    src = write_mlx_adapter(tmp_path / "mlx")
    weights = load_file(str(src / "adapters.safetensors"))
    del weights["model.layers.3.self_attn.v_proj.lora_b"]
    save_file(weights, str(src / "adapters.safetensors"))
    with pytest.raises(AdapterFormatError, match=r"model\.layers\.3\.self_attn\.v_proj\.lora_b"):
        mlx_to_peft(src, tmp_path / "peft", base_model="m")


def test_full_fine_tunes_are_not_adapters(tmp_path):
    src = write_mlx_adapter(tmp_path / "mlx")
    config = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps(config | {"fine_tune_type": "full"}))
    with pytest.raises(AdapterFormatError, match="fine_tune_type 'full'"):
        mlx_to_peft(src, tmp_path / "peft", base_model="m")


def test_converter_imports_neither_torch_nor_mlx():
    import subprocess
    import sys

    code = ("import sys; sys.modules.update(dict.fromkeys(['torch', 'mlx', 'mlx.core', 'peft']));"
            "import tunebus.shared.adapter_layouts")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_naming_the_layouts_needs_no_ml_stack():
    """The registry reads layouts with this module and installs neither numpy nor safetensors."""
    import subprocess
    import sys

    code = ("import sys; sys.modules.update(dict.fromkeys(['numpy', 'safetensors', "
            "'safetensors.numpy', 'torch', 'mlx', 'mlx.core', 'peft']));"
            "from tunebus.shared.adapter_layouts import layouts;"
            "assert layouts(['adapters.safetensors', 'adapter_config.json']) == {'mlx': ''}")
    subprocess.run([sys.executable, "-c", code], check=True)
