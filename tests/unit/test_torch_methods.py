"""DPO, ORPO, CPO and the GRPO family on the torch backend (TRL's trainers), on the tiny model and
the CPU, through `torch_backend.train`: each moves its objective the right way, spells out what
it ran, and leaves an adapter plain PEFT loads."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from tunebus.services.trainer import backends, plan
from tunebus.services.trainer.backend import GRPOSpec, PreferenceSpec, TrainingHooks, TrainSpec
from tunebus.services.trainer.rewards import REWARDS
from tunebus.services.trainer.backends.torch.loop import train
from tunebus.services.trainer.backends.torch.methods import GRPO_DEFAULT_SYSTEM, build_method, trl_reward

from tests.helpers.backends import write_chat_data
from tests.helpers.data import write_rows


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from a second thread, and on a busy two-core machine torch's
    threads wait on each other: a GRPO run took 40 s instead of 3."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def preference_data(tmp_path_factory) -> Path:
    rows = [{"prompt": f"What is {a} plus {b}?", "chosen": f"{a + b}.",
             "rejected": f"I think it is {a * b + 1}, maybe."}
            for a in range(1, 7) for b in range(1, 5)]
    rows[0]["system"] = "Answer with a number."
    return write_rows(tmp_path_factory.mktemp("preference"), rows)


@pytest.fixture(scope="module")
def close_pairs(tmp_path_factory) -> Path:
    """Chosen and rejected one token apart: preference training soon lowers both."""
    rows = [{"prompt": f"What is {a} plus {b}?", "chosen": f"It is {a + b}.",
             "rejected": f"It is {a + b + 1}."} for a in range(1, 7) for b in range(1, 5)]
    return write_rows(tmp_path_factory.mktemp("close"), rows)


def preference_spec(method: str, iters: int, **overrides) -> TrainSpec:
    settings = {"iters": iters, "method": method, "batch_size": 2, "learning_rate": 1e-2,
                "steps_per_report": 5, "steps_per_eval": 10, "val_batches": 2}
    return TrainSpec(**(settings | overrides))


def assert_loads_with_plain_peft(tiny_model: Path, adapter_dir: Path) -> None:
    """The PEFT copy loads with nothing but peft and changes what the base model computes."""
    ids = torch.tensor([AutoTokenizer.from_pretrained(tiny_model).encode("What is 2 plus 3?")])
    base = AutoModelForCausalLM.from_pretrained(tiny_model, use_safetensors=True)
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, adapter_dir / "peft").eval()(ids).logits
    assert (after - before).abs().max() > 1e-3
    assert (adapter_dir / "adapter_config.json").is_file()  # the MLX copy, written last


def test_dpo_lowers_its_loss_against_the_frozen_base(tiny_model, preference_data, tmp_path):
    reports = []
    result = train(tiny_model, preference_data, tmp_path / "dpo", preference_spec("dpo", 20),
                   TrainingHooks(on_progress=reports.append))
    assert result.final_loss < result.first_loss / 10
    val_losses = [r.val_loss for r in reports if r.val_loss is not None]
    assert len(val_losses) == 2 and val_losses[-1] < val_losses[0]
    assert result.trained_tokens > 0 and reports[-1].tokens_per_second > 0
    args = result.resolved_args
    method = args["method_args"]
    assert (method["beta"], method["dpo_loss_type"], method["delta"]) == (0.1, "sigmoid", 50.0)
    assert method["reference_model"] == "the base model, frozen (PEFT adapter disabled)"
    assert not method["precompute_ref_log_probs"] and args["batching"] == "padded"
    assert args["mask_prompt"] and json.loads(json.dumps(args)) == args
    assert_loads_with_plain_peft(tiny_model, result.adapter_dir)


@pytest.mark.parametrize("method", ["orpo", "cpo"])
def test_orpo_and_cpo_lower_their_loss(method, tiny_model, preference_data, tmp_path):
    result = train(tiny_model, preference_data, tmp_path / method,
                   preference_spec(method, 10, steps_per_eval=100, val_batches=1))
    assert result.final_loss < result.first_loss
    assert result.trained_tokens > 0
    method_args = result.resolved_args["method_args"]
    assert method_args["beta"] == 0.1 and method_args["reference_model"] is None
    assert_loads_with_plain_peft(tiny_model, result.adapter_dir)


def step_losses(tiny_model, data, out: Path, method: str, loss_type: str) -> list[float]:
    reports = []
    spec = preference_spec(method, 6, steps_per_report=1, steps_per_eval=100, val_batches=1,
                           preference=PreferenceSpec(loss_type=loss_type, delta=50.0))
    result = train(tiny_model, data, out, spec, TrainingHooks(on_progress=reports.append))
    args = result.resolved_args["method_args"]
    assert (args[f"{method}_loss_type"], args["trl_loss_type"], args["delta"]) == (
        loss_type, "sigmoid", 50.0)
    return [r.train_loss for r in reports]


def test_dpop_adds_its_penalty_once_dpo_makes_the_chosen_answer_less_likely(
        tiny_model, close_pairs, tmp_path):
    sigmoid = step_losses(tiny_model, close_pairs, tmp_path / "sigmoid", "dpo", "sigmoid")
    dpop = step_losses(tiny_model, close_pairs, tmp_path / "dpop", "dpo", "dpop")
    # Step 1: the adapter is still zero, so the policy is the reference, and no penalty.
    assert dpop[0] == pytest.approx(sigmoid[0]) == pytest.approx(math.log(2))
    # delta (50) times log-probability lost on the chosen answer, later.
    assert max(dpop) > max(sigmoid) + 5


def test_cpo_dpop_penalises_a_rejected_answer_more_likely_than_the_chosen(
        tiny_model, close_pairs, tmp_path):
    sigmoid = step_losses(tiny_model, close_pairs, tmp_path / "sigmoid", "cpo", "sigmoid")
    dpop = step_losses(tiny_model, close_pairs, tmp_path / "dpop", "cpo", "dpop")
    assert sigmoid[0] < 1 < 10 < dpop[0]


def test_a_grpo_family_method_raises_the_reward_with_whole_groups_per_prompt(tiny_model,
                                                                            tmp_path):
    # One sampled token per completion, rewarded when it contains an "a": the group-relative
    # advantage soon favours such tokens (as in the MLX backend's test).
    rows = [{"prompt": f"Say a word with the letter a ({i}).", "answer": "a", "system": "Reply."}
            for i in range(24)]
    data = write_rows(tmp_path / "grpo-data", rows)
    grpo = GRPOSpec(loss_type="dapo", group_size=8, max_completion_length=1,
                    reward_functions=("contains",))
    spec = TrainSpec(iters=30, method="grpo", batch_size=2, learning_rate=2e-2, seed=0,
                     steps_per_report=10, steps_per_eval=100, val_batches=1, grpo=grpo,
                     # a constant rate, unclipped: the reward's rise, not the schedule, is tested
                     lr_scheduler="constant", max_grad_norm=0.0)
    reports = []
    result = train(tiny_model, data, tmp_path / "grpo", spec,
                   TrainingHooks(on_progress=reports.append))
    assert result.final_reward > result.first_reward + 0.15
    assert [r.reward for r in reports] == [c["reward"] for c in result.curve]
    assert reports[-1].reward == result.final_reward
    # batch_size counts prompts: every step generated 2 prompts x 8 completions of 1 token.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt_tokens = [len(tokenizer.apply_chat_template(
        [{"role": "system", "content": "Reply."}, {"role": "user", "content": r["prompt"]}],
        add_generation_prompt=True, return_dict=True)["input_ids"]) for r in rows]
    per_step = result.trained_tokens / 30
    assert 16 * (min(prompt_tokens) + 1) <= per_step <= 16 * (max(prompt_tokens) + 1)
    args = result.resolved_args["method_args"]
    assert (args["grpo_loss_type"], args["importance_sampling_level"]) == ("dapo", "token")
    assert args["epsilon_high"] == plan.DAPO_EPSILON_HIGH  # the spec left it to the family
    assert (args["prompts_per_step"], args["completions_per_step"]) == (2, 16)
    assert args["reward_functions"] == ["contains"] and args["beta"] == 0.04
    assert args["reference_model"] == "the base model, frozen (PEFT adapter disabled)"
    assert_loads_with_plain_peft(tiny_model, result.adapter_dir)


@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_a_resumed_run_ends_as_the_uninterrupted_one(method, tiny_model, preference_data,
                                                     tmp_path):
    """Checkpoints (SafeCheckpoints, no pickle) carry the reference-model methods and GRPO's
    sampling too: the same completions are drawn after a resume."""
    if method == "grpo":
        data = write_rows(tmp_path / "grpo-data", [
            {"prompt": f"Say a word with the letter a ({i}).", "answer": "a"} for i in range(12)])
        spec = TrainSpec(iters=6, method="grpo", batch_size=2, learning_rate=2e-2,
                         steps_per_report=2, steps_per_eval=100, val_batches=1, checkpoint_every=3,
                         grpo=GRPOSpec(group_size=4, max_completion_length=2,
                                       reward_functions=("contains",)))
    else:
        data = preference_data
        spec = preference_spec("dpo", 6, steps_per_report=2, steps_per_eval=100, val_batches=1,
                               checkpoint_every=3)
    saved = tmp_path / "checkpoint"

    def keep(directory: Path, step: int) -> None:
        if step == 3:
            shutil.copytree(directory, saved)

    full = train(tiny_model, data, tmp_path / "full", spec, TrainingHooks(on_checkpoint=keep))
    resumed = train(tiny_model, data, tmp_path / "resumed", spec, resume_from=saved)
    assert resumed.resumed_from_step == 3
    assert resumed.curve == full.curve
    assert [point["step"] for point in full.curve] == [2, 3, 4, 6]  # a checkpoint ends a window
    assert (method == "grpo") == all(point.get("reward") is not None for point in full.curve)


@pytest.mark.parametrize(("method", "settings"), [
    ("dpo", {"loss_type": ["ipo"], "beta": 0.3, "precompute_ref_log_probs": False,
             "padding_free": False, "max_length": 64}),
    ("cpo", {"loss_type": "ipo", "beta": 0.3, "cpo_alpha": 0.0, "max_length": 64}),
    ("orpo", {"beta": 0.3, "max_length": 64}),
])
def test_preference_rows_become_trls_conversational_rows(method, settings, tiny_model,
                                                         preference_data):
    spec = TrainSpec(iters=1, method=method, max_seq_length=64,
                     preference=PreferenceSpec(beta=0.3, loss_type="ipo"))
    built = build_method(spec, AutoTokenizer.from_pretrained(tiny_model), preference_data, "packed")
    assert built.config.items() >= settings.items() and "packing" not in built.config
    assert built.valid_set[0] == {
        "prompt": [{"role": "system", "content": "Answer with a number."},
                   {"role": "user", "content": "What is 1 plus 1?"}],
        "chosen": [{"role": "assistant", "content": "2."}],
        "rejected": [{"role": "assistant", "content": "I think it is 2, maybe."}]}
    assert built.train_set[0]["prompt"] == [{"role": "user", "content": "What is 2 plus 1?"}]


@pytest.mark.parametrize(("family", "loss_type", "level"), [
    ("grpo", "grpo", "token"), ("dr_grpo", "dr_grpo", "token"), ("bnpo", "bnpo", "token"),
    ("gspo", "grpo", "sequence"), ("dapo", "dapo", "token")])
def test_each_grpo_family_member_maps_to_trls_switches(family, loss_type, level, tiny_model,
                                                       tmp_path):
    data = write_rows(tmp_path / "data", [{"prompt": "2+2?", "answer": "4"}] * 6, n_valid=2)
    grpo = GRPOSpec(loss_type=family, group_size=4, epsilon=0.1, temperature=0.7, top_p=0.9,
                    top_k=20, min_p=0.05, max_completion_length=12,
                    reward_functions=("exact_match", "format"), reward_weights=(1.0, 0.5))
    spec = TrainSpec(iters=1, method="grpo", batch_size=3, grpo=grpo)
    method = build_method(spec, AutoTokenizer.from_pretrained(tiny_model), data, "padding_free")
    shared = {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 3,
              "per_device_eval_batch_size": 3, "use_cpu": True}  # as torch_backend passes them
    config = method.config_class(**shared | method.config)
    assert (config.loss_type, config.importance_sampling_level) == (loss_type, level)
    assert config.epsilon_high == (plan.DAPO_EPSILON_HIGH if family == "dapo" else 0.1)
    assert (config.num_generations, config.max_completion_length, config.beta) == (4, 12, 0.04)
    assert (config.temperature, config.top_p, config.top_k, config.min_p) == (0.7, 0.9, 20, 0.05)
    assert config.reward_weights == [1.0, 0.5] and not config.use_vllm
    assert config.per_device_train_batch_size == config.per_device_eval_batch_size == 12
    assert [f.__name__ for f in method.trainer_kwargs["reward_funcs"]] == ["exact_match", "format"]
    assert method.train_set[0]["prompt"] == [{"role": "system", "content": GRPO_DEFAULT_SYSTEM},
                                             {"role": "user", "content": "2+2?"}]


def test_rewards_see_the_user_prompt_and_the_completion_text():
    seen = {}

    def spy(prompts, completions, answer, types=None):
        seen.update(prompts=prompts, completions=completions, answer=answer)
        return REWARDS["exact_match"](prompts, completions, answer)

    REWARDS["spy"] = spy
    try:
        rewards = trl_reward("spy")(
            prompts=[[{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "2+2?"}]] * 2,
            completions=[[{"role": "assistant", "content": "<answer>4</answer>"}],
                         [{"role": "assistant", "content": "5"}]],
            answer=["4", "4"], completion_ids=[[1], [2]], trainer_state=None)
    finally:
        del REWARDS["spy"]
    assert rewards == [1.0, 0.0]
    assert seen == {"prompts": ["2+2?", "2+2?"], "completions": ["<answer>4</answer>", "5"],
                    "answer": ["4", "4"]}


def test_the_cuda_worker_announces_every_method_grpo_loss_and_reward_function():
    caps = backends.capabilities("cuda")
    assert caps.methods == plan.ALL_METHODS
    assert caps.grpo_loss_types == plan.ALL_GRPO_LOSSES
    assert caps.reward_functions == sorted(REWARDS)


def test_sft_data_given_to_dpo_is_named_by_file_line_and_field(tiny_model, tmp_path):
    data = write_chat_data(tmp_path / "chat", n_train=3, n_valid=1)
    with pytest.raises(ValueError, match=r"train\.jsonl:1: field 'prompt' is missing \(dpo lines "
                                         r"are .*this line has 'messages'\)"):
        train(tiny_model, data, tmp_path / "out", preference_spec("dpo", 1))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("method", "line", "message"), [
    ("orpo", {"prompt": "Hi", "chosen": "Hello.", "rejected": ["Go away."]},
     r"train\.jsonl:3: field 'rejected' must be a non-empty string"),
    ("cpo", {"prompt": "Hi", "chosen": "Hello.", "rejected": "No.", "system": 7},
     r"train\.jsonl:3: field 'system' must be a string"),
    ("grpo", {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
     r"train\.jsonl:3: field 'answer' is missing \(grpo lines are"),
])
def test_a_bad_line_is_named_by_file_line_and_field(method, line, message, tiny_model, tmp_path):
    good = ({"prompt": "2+2?", "answer": "4"} if method == "grpo"
            else {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."})
    data = write_rows(tmp_path / "data", [good, good, good, line], n_valid=1)
    with pytest.raises(ValueError, match=message):
        train(tiny_model, data, tmp_path / "out", preference_spec(method, 1))
