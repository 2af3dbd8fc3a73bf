"""One SFT LoRA job two ways, like with like: tunebus's torch trainer against a plain Hugging
Face Trainer + PEFT baseline, same weights, dtype, attention, data, optimizer and schedule.

    python benchmarks/trainer_cuda.py --json out.json         # GPU: Qwen2.5-0.5B-shaped, bf16
    python benchmarks/trainer_cuda.py --size cpu --repeat 3   # CPU: a model where compute counts
    python benchmarks/trainer_cuda.py --size small            # tiny, so the script stays correct
    python benchmarks/trainer_cuda.py --size cpu --threads 1  # a CPU that others share too

What is held equal (the output's "like_with_like" says so, with what each run reported):
- weights: one random Qwen2-shaped model saved once (no hub), loaded by both;
- dtype: bf16 weights with bf16 autocast on a GPU that has bf16, fp32 otherwise, for both;
- attention: one kernel for both (flash_attention_2 when flash-attn and a bf16 GPU are here, else
  SDPA); each run reports what its model was configured with. On SDPA tunebus calls the kernel
  once per example of its padding-free row ("sdpa_varlen"), the baseline once per padded batch;
- data: the same chat examples (log-normal lengths, a realistic spread), the same sampler seed,
  the same batch size and steps; every run records the real (non-padding) tokens of each of its
  batches, and the two sequences must be equal, so both saw the same examples in the same order;
- optimizer and schedule: AdamW (torch), betas (0.9, 0.999), eps 1e-8, no weight decay, constant
  learning rate, no warm-up, no gradient clipping, no gradient checkpointing, LoRA r=16 alpha=32
  dropout 0 on every linear layer of every block;
- loss: prompt-masked (completion tokens only) in both.

What differs is only how tunebus batches and runs (its defaults): padding-free batches (examples
end to end, no padded positions) versus batches padded to their longest example, plus whatever
else tunebus turns on by default (Liger kernels when installed on CUDA, torch.compile when asked).

Reported per run: tokens/s (real tokens over the seconds in `Trainer.train`, both runs timed
by the same wrapper; also over its process CPU seconds, steadier on a shared machine), positions
computed (tokens the model's linear layers ran on, counted at the decoder's input: equal to the
real tokens when no padding is computed), the baseline's padding fraction, peak memory (GPU:
max allocated; CPU: the process's peak RSS), eval loss (mean completion-token NLL on held-out
examples, fp32, the same function for both) and MFU on a GPU. Runs take turns (tunebus,
baseline, baseline, tunebus, ...), each in a fresh process, and the summary gives the median
ratio with its spread (min..max of the per-pair ratios).

MFU counts model FLOPs per real token as 2N (forward) + 2N (input gradients through the frozen
weights) + 6 N_lora + the attention matmuls (12 * layers * hidden * mean context length), over
the GPU's dense bf16 peak (989 TFLOPS for H100 SXM / H200); not reported on CPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}
SIZES = {
    # Qwen2.5-0.5B's shape.
    "full": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
             "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
             "tie_word_embeddings": True, "max_position_embeddings": 4096},
    # Wide enough that a CPU step is compute, not Python.
    "cpu": {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024,
            "tie_word_embeddings": False, "max_position_embeddings": 1024},
    "small": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024,
              "tie_word_embeddings": False, "max_position_embeddings": 512},
}
# size: (iters, batch_size, max_seq_length, median example tokens)
DEFAULTS = {"full": (60, 8, 2048, 300), "cpu": (12, 8, 512, 120), "small": (30, 4, 256, 60)}
LORA = {"rank": 16, "alpha": 32}
LEARNING_RATE = 2e-4
SEED = 0
# tunebus's per-example SDPA (backends/torch/varlen.py) runs the same kernel as the baseline.
KERNEL = {"sdpa_varlen": "sdpa"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES),
                        help="default: full on a GPU, cpu otherwise")
    parser.add_argument("--small", action="store_true", help="the same as --size small")
    parser.add_argument("--iters", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-seq-length", type=int)
    parser.add_argument("--repeat", type=int, default=3, help="pairs of runs, interleaved")
    parser.add_argument("--batching", default="padding_free",
                        choices=["padding_free", "packed", "padded"], help="tunebus's batching")
    parser.add_argument("--compile", action="store_true", help="tunebus with torch.compile")
    parser.add_argument("--attn", help="tunebus's attn_implementation (default: its own choice)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads of each run (default: torch's); 1 on a shared "
                             "CPU makes CPU seconds independent of the other load")
    parser.add_argument("--json", type=Path, help="also write the results here")
    a = parser.parse_args()
    size = "small" if a.small else a.size or ("full" if torch.cuda.is_available() else "cpu")
    iters, batch_size, max_len, median = DEFAULTS[size]
    iters, batch_size, max_len = a.iters or iters, a.batch_size or batch_size, a.max_seq_length or max_len

    with tempfile.TemporaryDirectory(prefix="tunebus-bench-") as tmp:
        root = Path(tmp)
        model_dir = make_model(root / "model", size)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        make_data(root / "data", tokenizer, n_train=iters * batch_size, n_valid=32,
                  median=median, max_len=max_len)
        setup = {"size": size, "iters": iters, "batch_size": batch_size, "max_seq_length": max_len,
                 "batching": a.batching, "compile": a.compile, "attn": a.attn, "threads": a.threads,
                 "device": device_name()}
        (root / "setup.json").write_text(json.dumps(setup))
        lengths = [len(tokenize(json.loads(line)["messages"], tokenizer, max_len)["input_ids"])
                   for line in (root / "data" / "train.jsonl").read_text().splitlines()]
        results = {**setup, "parameters": count_params(model_dir),
                   "example_tokens": {"mean": float(np.mean(lengths)),
                                      "p50": float(np.median(lengths)), "max": max(lengths)},
                   # Mean number of earlier tokens a token attends to (causal attention).
                   "mean_context": sum(n * (n - 1) / 2 for n in lengths) / sum(lengths),
                   "runs": []}
        for pair in range(a.repeat):
            order = ["tunebus", "baseline"] if pair % 2 == 0 else ["baseline", "tunebus"]
            for name in order:
                outcome = run_child(name, root)
                outcome["mfu"] = mfu(outcome["tokens_per_second"], results, model_dir)
                outcome["pair"] = pair
                results["runs"].append(outcome)
                print(json.dumps({k: v for k, v in outcome.items() if k != "batch_tokens"}),
                      flush=True)
    results["summary"] = summarize(results["runs"])
    for run in results["runs"]:
        run.pop("batch_tokens")
    print(json.dumps(results, indent=2))
    print_table(results)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")


def summarize(runs: list[dict]) -> dict:
    """Per-pair ratios (median and spread) and whether the two sides really were alike."""
    by_pair: dict[int, dict] = {}
    for run in runs:
        by_pair.setdefault(run["pair"], {})[run["name"]] = run
    pairs = [p for p in by_pair.values() if len(p) == 2]
    speedups = [p["tunebus"]["tokens_per_second"] / p["baseline"]["tokens_per_second"] for p in pairs]
    cpu_speedups = [p["tunebus"]["tokens_per_cpu_second"] / p["baseline"]["tokens_per_cpu_second"]
                    for p in pairs]
    t_runs = [r for r in runs if r["name"] == "tunebus"]
    b_runs = [r for r in runs if r["name"] == "baseline"]
    t, b = t_runs[0], b_runs[0]
    same_batches = all(r["batch_tokens"] == b["batch_tokens"] for r in t_runs + b_runs) \
        if t["settings"]["batching"] != "packed" else None
    like = {
        "dtype": [t["settings"]["dtype"], b["settings"]["dtype"]],
        "mixed_precision": [t["settings"]["mixed_precision"], b["settings"]["mixed_precision"]],
        "attn_implementation": [t["settings"]["attn_implementation"],
                                b["settings"]["attn_implementation"]],
        "attention_kernel": [KERNEL.get(t["settings"]["attn_implementation"],
                                        t["settings"]["attn_implementation"]),
                             b["settings"]["attn_implementation"]],
        "real_tokens": [t["tokens"], b["tokens"]],
        "same_batches_in_same_order": same_batches,
        "optimizer": [t["settings"]["optimizer"], b["settings"]["optimizer"]],
        "lr_schedule": [t["settings"]["lr_schedule"], b["settings"]["lr_schedule"]],
        **{key: [t["settings"][key], b["settings"][key]]
           for key in ("warmup_steps", "weight_decay", "max_grad_norm")},
    }
    like["equal"] = (len(set(like["dtype"])) == 1 and len(set(like["mixed_precision"])) == 1
                     and len(set(like["attention_kernel"])) == 1
                     and len(set(like["real_tokens"])) == 1 and same_batches is not False
                     and all(len(set(like[key])) == 1 for key in
                             ("optimizer", "lr_schedule", "warmup_steps", "weight_decay",
                              "max_grad_norm")))
    med = statistics.median
    eval_t, eval_b = med(r["eval_loss"] for r in t_runs), med(r["eval_loss"] for r in b_runs)
    summary = {
        "like_with_like": like,
        "speedup_median": med(speedups), "speedup_min": min(speedups), "speedup_max": max(speedups),
        "speedup_per_pair": speedups,
        "cpu_time_speedup_median": med(cpu_speedups), "cpu_time_speedup_per_pair": cpu_speedups,
        "tokens_per_second": {"tunebus": med(r["tokens_per_second"] for r in t_runs),
                              "baseline": med(r["tokens_per_second"] for r in b_runs)},
        "eval_loss": {"tunebus": eval_t, "baseline": eval_b},
        "eval_loss_ratio": eval_t / eval_b,
        "positions_computed": {"tunebus": t["positions_computed"], "baseline": b["positions_computed"]},
        "baseline_padding_fraction": 1 - b["tokens"] / b["positions_computed"],
        "tunebus_padding_fraction": 1 - t["tokens"] / t["positions_computed"],
        "peak_memory_gb": {"tunebus": med(r["peak_memory_gb"] for r in t_runs),
                           "baseline": med(r["peak_memory_gb"] for r in b_runs)},
    }
    summary["memory_ratio"] = summary["peak_memory_gb"]["tunebus"] / summary["peak_memory_gb"]["baseline"]
    if t["mfu"] is not None:
        summary["mfu"] = {"tunebus": med(r["mfu"] for r in t_runs),
                          "baseline": med(r["mfu"] for r in b_runs)}
    return summary


def print_table(results: dict) -> None:
    s = results["summary"]
    like = s["like_with_like"]
    print(f"\n{results['device']}, model {results['size']}, {results['iters']} steps x batch "
          f"{results['batch_size']}, max_seq_length {results['max_seq_length']}, "
          f"{len(s['speedup_per_pair'])} interleaved pairs, torch threads "
          f"{results['threads'] or torch.get_num_threads()}")
    print(f"like with like: {'yes' if like['equal'] else 'NO'} (dtype {like['dtype']}, "
          f"attention {like['attn_implementation']} (kernel {like['attention_kernel']}), real tokens {like['real_tokens']}, "
          f"same batches in same order {like['same_batches_in_same_order']}, "
          f"optimizer {like['optimizer']}, schedule {like['lr_schedule']}, warm-up steps "
          f"{like['warmup_steps']}, weight decay {like['weight_decay']}, max grad norm "
          f"{like['max_grad_norm']})")
    print(f"{'':24s}{'tunebus':>14s}{'baseline':>14s}")
    rows = [("tokens/s (median)", s["tokens_per_second"], "{:14.1f}"),
            ("eval loss (median)", s["eval_loss"], "{:14.4f}"),
            ("positions computed", s["positions_computed"], "{:14d}"),
            ("peak memory GB", s["peak_memory_gb"], "{:14.3f}")]
    if "mfu" in s:
        rows.append(("MFU", s["mfu"], "{:14.3f}"))
    for label, pair, fmt in rows:
        print(f"{label:24s}{fmt.format(pair['tunebus'])}{fmt.format(pair['baseline'])}")
    print(f"speed-up tunebus/baseline {s['speedup_median']:.3f} (pairs: "
          f"{', '.join(f'{x:.3f}' for x in s['speedup_per_pair'])}; spread "
          f"{s['speedup_min']:.3f}..{s['speedup_max']:.3f}); by CPU seconds "
          f"{s['cpu_time_speedup_median']:.3f} (pairs: "
          f"{', '.join(f'{x:.3f}' for x in s['cpu_time_speedup_per_pair'])}); eval loss ratio "
          f"{s['eval_loss_ratio']:.4f}; baseline padding {s['baseline_padding_fraction']:.1%}, "
          f"tunebus padding {s['tunebus_padding_fraction']:.1%}; memory ratio {s['memory_ratio']:.2f}")


def run_child(name: str, root: Path) -> dict:
    """One run in a process of its own: its own peak memory, no warm caches from the other."""
    done = subprocess.run([sys.executable, __file__, "--child", name, str(root)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(name: str, root: Path) -> None:
    setup = json.loads((root / "setup.json").read_text())
    if setup.get("threads"):
        torch.set_num_threads(setup["threads"])
    spec = train_spec(setup)
    run = resolved_run()
    counter = count_decoder_inputs()
    clock = time_trainer_train()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    runner = run_tunebus if name == "tunebus" else run_baseline
    outcome = runner(root / "model", root / "data", root / name, spec, run, setup)
    # Both runs timed alike: the seconds inside transformers' Trainer.train (SFTTrainer's too).
    outcome["seconds"], outcome["cpu_seconds"] = clock.wall, clock.cpu
    outcome["tokens_per_second"] = outcome["tokens"] / clock.wall
    outcome["tokens_per_cpu_second"] = outcome["tokens"] / clock.cpu
    outcome["peak_memory_gb"] = (torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available()
                                 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)
    outcome["positions_computed"] = counter.positions
    outcome["batch_tokens"] = counter.real
    outcome["tokens_counted"] = sum(counter.real)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    valid = [json.loads(line) for line in (root / "valid.jsonl").read_text().splitlines()]
    outcome["eval_loss"] = eval_loss(root / "model", outcome.pop("adapter"), valid, tokenizer)
    print(json.dumps({"name": name, **outcome}))


def train_spec(setup: dict):
    from tunebus.services.trainer.backend import LoraSpec, TrainSpec

    return TrainSpec(iters=setup["iters"], batch_size=setup["batch_size"],
                     learning_rate=LEARNING_RATE, max_seq_length=setup["max_seq_length"],
                     steps_per_report=10, steps_per_eval=setup["iters"] + 1, seed=SEED,
                     optimizer="adamw", lr_scheduler="constant", weight_decay=0.0, max_grad_norm=0.0,
                     lora=LoraSpec(rank=LORA["rank"], alpha=LORA["alpha"], dropout=0.0))


def resolved_run() -> dict:
    """The precision and attention both runs use: tunebus's own choice for this hardware."""
    from tunebus.services.trainer.backends.torch.loop import TorchOptions, _resolve_run, detect_hardware

    return _resolve_run(TorchOptions(), detect_hardware())


class count_decoder_inputs:
    """Counts, for every training forward of the decoder, the positions it computes (the input's
    size: padding included) and the real tokens among them (attention mask, else all)."""

    def __init__(self) -> None:
        from transformers.models.qwen2 import modeling_qwen2

        self.positions, self.real = 0, []
        forward = modeling_qwen2.Qwen2Model.forward

        @functools.wraps(forward)
        def counted(model, input_ids=None, attention_mask=None, *args, **kwargs):
            if model.training and input_ids is not None:
                self.positions += input_ids.numel()
                self.real.append(int(attention_mask.sum()) if attention_mask is not None
                                 else input_ids.numel())
            return forward(model, input_ids, attention_mask, *args, **kwargs)

        modeling_qwen2.Qwen2Model.forward = counted


class time_trainer_train:
    """Wall and process CPU seconds spent in Trainer.train. On a machine others share, CPU
    seconds (what this process computed) move less with their load than wall seconds do."""

    def __init__(self) -> None:
        from transformers import Trainer

        self.wall = self.cpu = 0.0
        train = Trainer.train

        @functools.wraps(train)
        def timed(trainer, *args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return train(trainer, *args, **kwargs)
            finally:
                self.wall += time.perf_counter() - wall
                self.cpu += time.process_time() - cpu

        Trainer.train = timed


def run_tunebus(model_dir: Path, data_dir: Path, out_dir: Path, spec, run: dict, setup: dict) -> dict:
    from tunebus.services.trainer.backends.torch.loop import _HF_OPTIM, TorchOptions, train

    # Its own attention choice: on SDPA it calls the kernel once per example (`varlen`).
    options = TorchOptions(batching=setup["batching"], compile=setup["compile"],
                           attn_implementation=setup["attn"])
    result = train(model_dir, data_dir, out_dir, spec, options=options)
    seconds = result.timings["training"]
    args = result.resolved_args
    backend = args["backend_args"]
    settings = {k: args[k] for k in ("dtype", "mixed_precision", "batching", "grad_checkpoint")} | {
        "attn_implementation": backend["attn_implementation"], "liger_kernel": backend["liger_kernel"],
        "compile": backend["torch_options"]["compile"],
        # In the Trainer's words, as the baseline's are said.
        "optimizer": _HF_OPTIM[args["optimizer"]], "lr_schedule": args["lr_schedule"]["name"],
        "warmup_steps": args["lr_schedule"]["warmup_steps"], "weight_decay": args["weight_decay"],
        "max_grad_norm": args["max_grad_norm"] or 0.0}  # None: no clipping, the Trainer's 0
    return {"tokens": result.trained_tokens, "seconds": seconds,
            "tokens_per_second": result.trained_tokens / seconds, "settings": settings,
            "final_train_loss": result.final_loss, "adapter": str(out_dir / "peft")}


def run_baseline(model_dir: Path, data_dir: Path, out_dir: Path, spec, run: dict, setup: dict) -> dict:
    """What the Hugging Face docs show, set to tunebus's dtype, attention, optimizer and schedule:
    padded batches through DataCollatorForSeq2Seq."""
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq,
                              Trainer, TrainingArguments, set_seed)

    # Seeded where tunebus seeds (before the model and its LoRA layers), so both adapters start
    # from the same random LoRA init.
    set_seed(spec.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=run["dtype"],
                                                 attn_implementation=run["attn_implementation"])
    model = get_peft_model(model, LoraConfig(r=spec.lora.rank, lora_alpha=spec.lora.alpha,
                                             lora_dropout=spec.lora.dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    rows = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
    dataset = [tokenize(r["messages"], tokenizer, spec.max_seq_length) for r in rows]
    args = TrainingArguments(
        output_dir=str(out_dir / "hf"), per_device_train_batch_size=spec.batch_size,
        max_steps=spec.iters, learning_rate=spec.learning_rate, logging_steps=10,
        lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch", weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=0.0,
        bf16=run["bf16"], tf32=True if run["bf16"] else None, gradient_checkpointing=False,
        save_strategy="no", report_to="none", include_num_input_tokens_seen="non_padding",
        seed=spec.seed, data_seed=spec.seed, dataloader_num_workers=0, disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True))
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    model.save_pretrained(out_dir / "peft")
    tokens = int(trainer.state.num_input_tokens_seen)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
            "settings": {"dtype": str(model.base_model.model.dtype).removeprefix("torch."),
                         "mixed_precision": "bf16" if args.bf16 else "no",
                         "attn_implementation": model.base_model.model.config._attn_implementation,
                         "batching": "padded", "optimizer": str(args.optim.value),
                         "lr_schedule": str(args.lr_scheduler_type.value),
                         "warmup_steps": args.warmup_steps, "weight_decay": args.weight_decay,
                         "max_grad_norm": args.max_grad_norm,
                         "grad_checkpoint": args.gradient_checkpointing},
            "final_train_loss": losses[-1] if losses else None, "adapter": str(out_dir / "peft")}


def tokenize(messages: list[dict], tokenizer, max_len: int) -> dict:
    """Prompt-masked token ids and labels: the completion after the generation prompt, as TRL's
    prompt/completion split masks it for the tunebus run."""
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
def eval_loss(model_dir: Path, adapter: str, valid: list[dict], tokenizer) -> float:
    """Mean NLL per completion token on the held-out examples, in fp32, one example at a time."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

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
    return total / count


def mfu(tokens_per_second: float, results: dict, model_dir: Path) -> float | None:
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in results["device"]), None)
    if peak is None:
        return None
    config = json.loads((model_dir / "config.json").read_text())
    params = results["parameters"]
    per_token = (4 * params["base"] + 6 * params["lora"] + 12 * config["num_hidden_layers"]
                 * config["hidden_size"] * results["mean_context"])
    return tokens_per_second * per_token / (peak * 1e12)


def make_model(out_dir: Path, size: str) -> Path:
    """The tiny model's tokenizer and chat template, with a Qwen2-shaped random model (bf16 on
    disk; each run loads it in the dtype both use)."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    from tunebus.shared.devstack.tinymodel import generate_tiny_model

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
    r = LORA["rank"]
    lora = n * r * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)  # r * (in + out) per module
    return {"base": base, "lora": lora}


def make_data(out_dir: Path, tokenizer, *, n_train: int, n_valid: int, median: int,
              max_len: int) -> Path:
    """Chat examples whose token lengths are log-normal (sigma 0.8) around `median`."""
    from tunebus.shared.devstack.tinymodel import corpus

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


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], Path(sys.argv[3]))
    else:
        main()
