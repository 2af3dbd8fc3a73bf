"""One SFT LoRA job two ways: tunebus's torch trainer against a plain Hugging Face baseline.

    python benchmarks/trainer_cuda.py            # Qwen2-shaped ~0.5B model, for an H100/H200
    python benchmarks/trainer_cuda.py --small    # a tiny model, so the script stays correct on CPU

The model has the shape of Qwen2.5-0.5B (24 blocks, hidden 896, GQA 14/2 heads, vocab 151,936)
with random weights, so no hub is needed; the chat data has a realistic spread of lengths
(log-normal, median ~300 tokens, clipped to max_seq_length). Both runs see the same examples,
the same batch size, steps, learning rate and LoRA settings (r=16 on every linear layer):

(a) tunebus: `torch_backend.train` with its defaults: bf16 where the GPU has it, flash attention
    (flash-attn installed) or SDPA, padding-free batches, Liger kernels when installed.
(b) baseline: `AutoModelForCausalLM.from_pretrained` + `get_peft_model` + `Trainer` with default
    TrainingArguments, batches padded to their longest example (no packing).

Reported per run: tokens/s (non-padding tokens over the seconds spent in `trainer.train()`),
peak GPU memory, MFU and the final eval loss (mean token NLL on the completions of held-out
examples, computed the same way for both adapters). MFU counts model FLOPs per trained token as
2N (forward) + 2N (input gradients through the frozen weights) + 6 N_lora + the attention
matmuls (12 * layers * hidden * mean context length), over the GPU's dense bf16 peak (989
TFLOPS for H100 SXM / H200); on CPU it is not reported.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Qwen2Config,
    Trainer,
    TrainingArguments,
)
from tunebus.services.trainer.backend import LoraSpec, TrainSpec
from tunebus.services.trainer.backends.torch.loop import TorchOptions, train
from tunebus.shared.devstack.tinymodel import corpus, generate_tiny_model

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}
SIZES = {
    # Qwen2.5-0.5B's shape.
    "full": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                 "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                 "tie_word_embeddings": True, "max_position_embeddings": 4096},
    "small": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024,
                  "tie_word_embeddings": False, "max_position_embeddings": 512},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny model and data (CPU)")
    parser.add_argument("--iters", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-seq-length", type=int)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--only", choices=["tunebus", "baseline"])
    a = parser.parse_args()
    size = "small" if a.small else "full"
    iters = a.iters or (30 if a.small else 60)
    batch_size = a.batch_size or (4 if a.small else 8)
    max_len = a.max_seq_length or (256 if a.small else 2048)

    with tempfile.TemporaryDirectory(prefix="tunebus-bench-") as tmp:
        tmp = Path(tmp)
        model_dir = make_model(tmp / "model", size)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        data_dir = make_data(tmp / "data", tokenizer, n_train=iters * batch_size, n_valid=32,
                             median=60 if a.small else 300, max_len=max_len)
        # The baseline's optimizer and schedule: AdamW, linear decay, clipping at 1.
        spec = TrainSpec(iters=iters, batch_size=batch_size, learning_rate=2e-4,
                         lr_scheduler="linear",
                         max_seq_length=max_len, steps_per_report=10, steps_per_eval=iters + 1,
                         lora=LoraSpec(rank=16, alpha=32))
        valid = [json.loads(line) for line in (tmp / "valid.jsonl").read_text().splitlines()]
        lengths = [len(tokenize(json.loads(line)["messages"], tokenizer, max_len)["input_ids"])
                   for line in (data_dir / "train.jsonl").read_text().splitlines()]
        results = {"device": device_name(), "model": size, "parameters": count_params(model_dir),
                   "iters": iters, "batch_size": batch_size, "max_seq_length": max_len,
                   "example_tokens": {"mean": float(np.mean(lengths)),
                                      "p50": float(np.median(lengths)), "max": max(lengths)},
                   # Mean number of earlier tokens a token attends to (causal attention).
                   "mean_context": sum(n * (n - 1) / 2 for n in lengths) / sum(lengths)}
        runs = {"tunebus": run_tunebus, "baseline": run_baseline}
        for name, run in runs.items():
            if a.only and a.only != name:
                continue
            reset_memory()
            outcome = run(model_dir, data_dir, tmp / name, spec)
            outcome["peak_memory_gb"] = peak_memory_gb()
            outcome["eval_loss"] = eval_loss(model_dir, outcome.pop("adapter"), valid, tokenizer)
            outcome["mfu"] = mfu(outcome["tokens_per_second"], results, model_dir)
            results[name] = outcome
            print(json.dumps({name: outcome}), flush=True)
    if "tunebus" in results and "baseline" in results:
        t, b = results["tunebus"], results["baseline"]
        results["speedup"] = t["tokens_per_second"] / b["tokens_per_second"]
        results["eval_loss_ratio"] = t["eval_loss"] / b["eval_loss"]
        if t["peak_memory_gb"] and b["peak_memory_gb"]:
            results["memory_ratio"] = t["peak_memory_gb"] / b["peak_memory_gb"]
    print(json.dumps(results, indent=2))
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")


def run_tunebus(model_dir: Path, data_dir: Path, out_dir: Path, spec: TrainSpec) -> dict:
    result = train(model_dir, data_dir, out_dir, spec, options=TorchOptions())
    seconds = result.timings["training"]
    return {"tokens": result.trained_tokens, "seconds": seconds,
            "tokens_per_second": result.trained_tokens / seconds,
            "settings": {k: result.resolved_args[k] for k in ("dtype", "mixed_precision", "batching")}
            | {k: result.resolved_args["backend_args"][k] for k in ("attn_implementation",
                                                                     "liger_kernel")},
            "adapter": out_dir / "peft"}


def run_baseline(model_dir: Path, data_dir: Path, out_dir: Path, spec: TrainSpec) -> dict:
    """What the Hugging Face docs show: defaults everywhere, padded batches."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(model, LoraConfig(r=spec.lora.rank, lora_alpha=spec.lora.alpha,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    rows = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
    dataset = [tokenize(r["messages"], tokenizer, spec.max_seq_length) for r in rows]
    args = TrainingArguments(
        output_dir=str(out_dir / "hf"), per_device_train_batch_size=spec.batch_size,
        max_steps=spec.iters, learning_rate=spec.learning_rate, logging_steps=10,
        save_strategy="no", report_to="none", include_num_input_tokens_seen="non_padding",
        seed=spec.seed,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True))
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    model.save_pretrained(out_dir / "peft")
    tokens = int(trainer.state.num_input_tokens_seen)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
            "settings": {"dtype": str(model.base_model.model.dtype).removeprefix("torch."),
                         "mixed_precision": "no", "attn_implementation":
                         model.base_model.model.config._attn_implementation,
                         "batching": "padded"},
            "adapter": out_dir / "peft"}


def tokenize(messages: list[dict], tokenizer, max_len: int) -> dict:
    """Prompt-masked token ids and labels, as both runs train on."""
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages)
    prompt, full = _ids(prompt), _ids(full)
    labels = [-100] * len(prompt) + full[len(prompt):]
    return {"input_ids": full[:max_len], "attention_mask": [1] * len(full[:max_len]),
            "labels": labels[:max_len]}


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys")
                else encoded)


@torch.no_grad()
def eval_loss(model_dir: Path, adapter: Path, valid: list[dict], tokenizer) -> float:
    """Mean NLL per completion token on the held-out examples, in fp32, one example at a time."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    model = PeftModel.from_pretrained(base, adapter).eval()
    total, count = 0.0, 0
    for row in valid:
        example = tokenize(row["messages"], tokenizer, 10**9)
        ids = torch.tensor([example["input_ids"]], device=device)
        labels = torch.tensor([example["labels"]], device=device)
        n = int((labels[:, 1:] != -100).sum())
        total += float(model(input_ids=ids, labels=labels).loss) * n
        count += n
    del model, base
    return total / count


def mfu(tokens_per_second: float, results: dict, model_dir: Path) -> float | None:
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name()), None)
    if peak is None:
        return None
    config = json.loads((model_dir / "config.json").read_text())
    params = results["parameters"]
    per_token = (4 * params["base"] + 6 * params["lora"] + 12 * config["num_hidden_layers"]
                 * config["hidden_size"] * results["mean_context"])
    return tokens_per_second * per_token / (peak * 1e12)


def make_model(out_dir: Path, size: str) -> Path:
    """The tiny model's tokenizer and chat template, with a Qwen2-shaped random model."""
    generate_tiny_model(out_dir)
    config = Qwen2Config(**SIZES[size], rms_norm_eps=1e-6, rope_theta=1e6,
                         bos_token_id=0, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "model.safetensors.index.json").unlink(missing_ok=True)
    return out_dir


def count_params(model_dir: Path) -> dict:
    config = json.loads((model_dir / "config.json").read_text())
    h, i, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    linear = n * (2 * h * h + 2 * h * kv + 3 * h * i)
    base = linear + config["vocab_size"] * h * (1 if config["tie_word_embeddings"] else 2)
    lora = n * 16 * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)  # r * (in + out) per module
    return {"base": base, "lora": lora}


def make_data(out_dir: Path, tokenizer, *, n_train: int, n_valid: int, median: int,
              max_len: int) -> Path:
    """Chat examples whose token lengths are log-normal (sigma 0.8) around `median`."""
    rng = np.random.default_rng(0)
    sentences = corpus()
    words_per_token = 0.75

    def text(tokens: int) -> str:
        out = []
        while len(" ".join(out)) / 4 < tokens / words_per_token:
            out.append(sentences[rng.integers(len(sentences))])
        return " ".join(out)

    def example() -> dict:
        length = int(np.clip(rng.lognormal(math.log(median), 0.8), 24, max_len))
        prompt = max(8, int(length * rng.uniform(0.2, 0.5)))
        return {"messages": [{"role": "user", "content": text(prompt)},
                             {"role": "assistant", "content": text(length - prompt)}]}

    out_dir.mkdir(parents=True)
    (out_dir / "train.jsonl").write_text(
        "".join(json.dumps(example()) + "\n" for _ in range(n_train)))
    # Held out beside data_dir, not in it: evaluation is done after training, the same for both.
    (out_dir.parent / "valid.jsonl").write_text(
        "".join(json.dumps(example()) + "\n" for _ in range(n_valid)))
    return out_dir


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def reset_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None


if __name__ == "__main__":
    main()
