"""The MLX trainer's cost: one SFT job through tunebus against the raw `mlx_lm_lora.train` CLI.

    python benchmarks/trainer_mlx.py                     # "small" model, 100 steps
    python benchmarks/trainer_mlx.py --size tiny --iters 60

(a) tunebus: the embedded stack (nats-server, S3, the four services as processes). A warm-up job
    first (2 steps), so the worker has imported MLX and cached the model as a running worker
    has; then the measured request, published with plain nats-py: request → validated dataset →
    trainer → adapter in S3.
(b) raw: `python -m mlx_lm_lora.train` on the very splits the validator wrote (downloaded from
    S3), with the same model, seed, batch size, steps, learning rate, optimizer (Adam with bias
    correction, as tunebus's; the CLI's own default Adam has none, so its YAML config passes
    tunebus's Adam settings as optimizer_config), LoRA rank/scale, prompt masking, report and
    validation intervals, and no fuse. On Linux the CLI needs the trainer's
    `metal_working_set_shim` (benchmarks/metal_shim.py: its loop reads a Metal-only key); the
    child process applies it.

Same seed semantics: the CLI seeds mx.random only after it built the LoRA layers (in
train_model), so their initial weights would come from an unseeded generator and its loss curve
from another starting point than tunebus's, which seeds before. The raw child seeds mx.random
(and numpy) with --seed before it hands over to the CLI, so both start from the same adapter;
the CLI's own later seeding resets mx.random to the same seed, which nothing after it draws
from (no dropout). The final losses must then agree within float tolerance (FINAL_LOSS_RTOL),
and the output says whether they do.

Reported: tokens/s of both (trained tokens over training time, validation excluded, the first
report window left out as warm-up/compilation), the per-pair ratios with their spread, and the
pipeline overhead: request published → first training step, minus the model's resolution and
load (`timings` in TrainingCompleted.metrics), with its parts. Pairs run until the ratios'
spread ((max - min) / median) is below --spread (3 %, what is being tested), at least
--repeat pairs and at most --max-pairs; if it stays above, the output says the difference
cannot be resolved on this machine. Target: tokens/s within 3 % of raw, overhead ≤ 250 ms.

The model is Llama-shaped with random weights and the tiny tokenizer (no hub needed); "small"
is wide enough that a step is dominated by compute rather than Python.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from importlib import resources
from pathlib import Path

SIZES = {
    "tiny": {},  # hidden 64, 2 blocks: Python and dispatch dominate a step
    "small": {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64},
    "medium": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4,
               "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64},
}
CLI_REPORT = re.compile(r"Iter (\d+): loss ([\d.]+), lr \S+, it/s [\d.]+, tok/s ([\d.]+), trained_tok (\d+)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="Pairs of runs at least, interleaved.")
    parser.add_argument("--max-pairs", type=int, default=6, help="Pairs at most.")
    parser.add_argument("--spread", type=float, default=0.03,
                        help="Stop once the per-pair ratios spread less than this.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tunebus-bench-") as tmp:
        root = Path(tmp)
        model_dir = make_model(root / "model", args.size)
        service, raw = run_both(root, model_dir, args)
    report(args, service, raw)


def make_model(out: Path, size: str) -> Path:
    """The tiny model's tokenizer and files, with weights of the chosen size."""
    from safetensors.numpy import save_file
    from tunebus.shared.devstack.tinymodel import generate_tiny_model, random_weights

    generate_tiny_model(out)
    config = json.loads((out / "config.json").read_text()) | SIZES[size]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(random_weights(config, seed=0), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def run_both(root: Path, model_dir: Path, args) -> tuple[list[dict], list[dict]]:
    """`args.repeat` tunebus jobs and raw CLI runs, taking turns (so that a machine's changing
    load falls on both alike), after one warm-up job."""
    from tunebus.shared.devstack.stack import LocalStack
    from tunebus.shared.objectstore import ObjectStore
    from tunebus.shared.settings import Settings

    service, raw = [], []
    with LocalStack(root / "stack", settings=Settings(), reuse_external=False) as stack:
        settings = stack.settings
        store = ObjectStore(settings.s3)
        model_uri = f"s3://{settings.s3.models_bucket}/bench-model"
        store.put_dir(model_uri, model_dir)
        sample = resources.files("tunebus.shared.devstack") / "data" / "alpaca_sample.jsonl"
        with resources.as_file(sample) as path:
            dataset_uri = f"s3://{settings.s3.datasets_bucket}/uploads/bench/{path.name}"
            store.put_file(dataset_uri, path)
        print("warm-up job (2 steps) ...", flush=True)
        asyncio.run(run_job(settings, model_uri, dataset_uri, args, iters=2))
        for n in range(1, args.max_pairs + 1):
            if n > args.repeat and spread(ratios(service, raw)) < args.spread:
                break
            print(f"pair {n}: tunebus job ({args.iters} steps) ...", flush=True)
            run = asyncio.run(run_job(settings, model_uri, dataset_uri, args, iters=args.iters))
            splits = root / f"splits-{n}"
            store.get_file(run["completed"]["dataset"]["train_uri"], splits / "train.jsonl")
            store.get_file(run["completed"]["dataset"]["valid_uri"], splits / "valid.jsonl")
            service.append(run)
            print(f"pair {n}: raw mlx_lm_lora.train ({args.iters} steps) ...", flush=True)
            raw.append(run_raw_cli(root, model_dir, splits, args))
    return service, raw


async def run_job(settings, model_uri: str, dataset_uri: str, args, *, iters: int) -> dict:
    import nats

    from tunebus.shared.bus import nats_options

    job_id = f"bench-{uuid.uuid4().hex[:6]}"
    nc = await nats.connect(**nats_options(settings))  # the stack's admin: hears every event
    try:
        log = await Log().start(nc)
        published = await log.run(nc, request(job_id, model_uri, dataset_uri, args, iters=iters))
    finally:
        await nc.close()
    completed = log.first(job_id, "training.completed")["data"]
    # Each event's tokens/s covers the tokens since the event before it.
    windows = [(p["data"]["trained_tokens"], p["data"]["tokens_per_second"])
               for p in log.all(job_id, "training.progress") if p["data"]["step"] >= steps_per_report(args)]
    return {
        "completed": completed,
        "tokens_per_second": tokens_per_second(windows) if len(windows) > 1 else None,
        "final_loss": completed["metrics"]["final_loss"],
        "published": published,
        "validated_at": log.arrival(job_id, "dataset.validated"),
        "timings": completed["metrics"]["timings"],
    }


def request(job_id: str, model_uri: str, dataset_uri: str, args, *, iters: int) -> dict:
    return {
        "specversion": "1.0", "id": str(uuid.uuid4()), "source": "benchmarks/trainer_mlx",
        "type": "tunebus.training.requested.v1", "subject": job_id,
        "time": "2026-11-21T12:00:00Z", "datacontenttype": "application/json",
        "data": {
            "job_id": job_id, "adapter_name": "bench", "base_model": model_uri,
            "dataset": {"uri": dataset_uri},
            "adapter": {"type": "lora", "rank": 8, "alpha": 16},
            "hyperparameters": {"iters": iters, "batch_size": args.batch_size,
                                "learning_rate": args.learning_rate,
                                "max_seq_length": args.max_seq_length, "seed": args.seed,
                                # what the raw CLI runs: Adam, a constant rate, no clipping
                                "optimizer": "adam", "lr_scheduler": "constant",
                                "max_grad_norm": 0},
            "evaluation": {"enabled": False},
        },
    }


class Log:
    """Every tunebus event, with the wall-clock time it arrived."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, dict]] = []

    async def start(self, nc) -> Log:
        async def record(msg) -> None:
            self.events.append((time.time(), msg.subject, json.loads(msg.data)))

        await nc.subscribe("tunebus.v1.>", cb=record)
        return self

    async def run(self, nc, body: dict) -> float:
        """Publish a request; wait until its job ends; return when it was published."""
        job_id = body["subject"]
        published = time.time()
        await nc.jetstream().publish("tunebus.v1.training.requested", json.dumps(body).encode(),
                                     headers={"Nats-Msg-Id": body["id"]})
        while not self.all(job_id, "training.completed"):
            for end in ("training.failed", "dataset.rejected"):
                if failed := self.all(job_id, end):
                    raise SystemExit(f"{job_id}: {end}: {failed[0]['data']}")
            await asyncio.sleep(0.05)
        return published

    def all(self, job_id: str, kind: str) -> list[dict]:
        return [body for _, subject, body in self.events
                if subject.endswith(kind) and body.get("subject") == job_id]

    def first(self, job_id: str, kind: str) -> dict:
        return self.all(job_id, kind)[0]

    def arrival(self, job_id: str, kind: str) -> float:
        return next(t for t, subject, body in self.events
                    if subject.endswith(kind) and body.get("subject") == job_id)


def run_raw_cli(root: Path, model_dir: Path, splits: Path, args) -> dict:
    from tunebus.services.trainer.backend import OPTIMIZERS

    config = root / "raw.yaml"
    # JSON is YAML. scale = alpha / rank, as tunebus resolves alpha 16 at rank 8; no fuse. Adam
    # as tunebus means it (bias-corrected; mlx.optimizers.Adam, the CLI's, defaults to without).
    config.write_text(json.dumps({"lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 2.0},
                                  "fuse": False, "optimizer": "adam",
                                  "optimizer_config": {"adam": OPTIMIZERS["adam"]}}))
    argv = [
        "--model", str(model_dir), "--train", "--data", str(splits), "--train-mode", "sft",
        "--train-type", "lora", "--iters", str(args.iters), "--batch-size", str(args.batch_size),
        "--learning-rate", str(args.learning_rate), "--max-seq-length", str(args.max_seq_length),
        "--seed", str(args.seed), "--mask-prompt", "--steps-per-report", str(steps_per_report(args)),
        "--steps-per-eval", str(max(1, args.iters // 2)), "--val-batches", "-1",
        "--save-every", str(args.iters + 1), "--adapter-path", str(root / "raw-adapter"),
        "--config", str(config),
    ]
    print(f"raw mlx_lm_lora.train ({args.iters} steps) ...", flush=True)
    done = subprocess.run([sys.executable, __file__, "--raw-cli-child", *argv],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"mlx_lm_lora.train failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    reports = [(int(i), float(loss), float(tps), int(tokens)) for i, loss, tps, tokens
               in CLI_REPORT.findall(done.stdout)]
    return {"tokens_per_second": tokens_per_second([(t, tps) for _, _, tps, t in reports]),
            "final_loss": reports[-1][1]}


FINAL_LOSS_RTOL = 1e-3  # float32 sums in another order, nothing more


def ratios(service: list[dict], raw: list[dict]) -> list[float]:
    return [s["tokens_per_second"] / r["tokens_per_second"] for s, r in zip(service, raw)]


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values) if values else float("inf")


def steps_per_report(args) -> int:
    return max(1, min(10, args.iters // 10))  # as the trainer's plan sets it


def tokens_per_second(windows: list[tuple[int, float]]) -> float:
    """Cumulative trained tokens and tokens/s per report window → tokens over seconds, the first
    window (compilation, warm-up) left out."""
    tokens = [b[0] - a[0] for a, b in zip(windows, windows[1:])]
    seconds = [t / w[1] for t, w in zip(tokens, windows[1:])]
    return sum(tokens) / sum(seconds)


def report(args, service: list[dict], raw: list[dict]) -> None:
    median = statistics.median
    overheads, parts = [], []
    for run in service:
        t, start = run["timings"], run["published"]
        overheads.append(t["first_step_at"] - start - t["model_resolve"] - t["model_load"])
        parts.append({"validation": run["validated_at"] - start, "dataset download": t["data_download"],
                      "setup (datasets, optimizer, checkpoint lookup)": t["setup"],
                      "model resolve (cached; excluded)": t["model_resolve"],
                      "model load + LoRA layers (excluded)": t["model_load"]})
    ours = [run["tokens_per_second"] for run in service]
    theirs = [run["tokens_per_second"] for run in raw]
    pairs = ratios(service, raw)
    ratio = median(pairs)
    print(f"\nmodel {args.size}, {args.iters} steps, batch {args.batch_size}, "
          f"max_seq_length {args.max_seq_length}, {len(pairs)} interleaved pairs (medians)")
    print(f"tokens/s   tunebus {median(ours):9.1f}   raw CLI {median(theirs):9.1f}   "
          f"tunebus/raw {ratio:.3f} ({ratio - 1:+.1%}), per pair "
          f"{', '.join(f'{x:.3f}' for x in pairs)}, spread {spread(pairs):.1%}")
    if spread(pairs) >= args.spread:
        print(f"           the spread stays above {args.spread:.0%} after {len(pairs)} pairs: a "
              f"{args.spread:.0%} difference cannot be resolved on this machine")
    print(f"  per run  tunebus {', '.join(f'{x:.1f}' for x in ours)}")
    print(f"           raw CLI {', '.join(f'{x:.1f}' for x in theirs)}")
    losses = [(s["final_loss"], r["final_loss"]) for s, r in zip(service, raw)]
    agree = all(abs(a - b) <= FINAL_LOSS_RTOL * abs(b) for a, b in losses)
    print(f"final loss tunebus {median(a for a, _ in losses):9.4f}   raw CLI "
          f"{median(b for _, b in losses):9.4f}   same seed semantics: "
          f"{'agree' if agree else 'DIFFER'} within {FINAL_LOSS_RTOL:g} (per pair: "
          f"{', '.join(f'{a:.4f}/{b:.4f}' for a, b in losses)})")
    print(f"overhead   request published → first training step, minus model resolve and load: "
          f"{median(overheads) * 1000:.0f} ms (runs: {', '.join(f'{x * 1000:.0f}' for x in overheads)})")
    for name in parts[0]:
        print(f"  {name:48s} {median(p[name] for p in parts) * 1000:7.0f} ms")
    print(json.dumps({"size": args.size, "iters": args.iters, "tokens_per_second_tunebus": ours,
                      "tokens_per_second_raw": theirs, "ratio_median": ratio,
                      "ratio_per_pair": pairs, "ratio_spread": spread(pairs),
                      "final_losses": losses, "final_losses_agree": agree,
                      "overhead_ms": [x * 1000 for x in overheads]}))


def raw_cli_child(argv: list[str]) -> None:
    """`python -m mlx_lm_lora.train ARGV`, with the Metal-key shim on Linux."""
    from metal_shim import metal_working_set_shim  # beside this file
    from mlx_lm_lora.train import main as cli_main

    import mlx.core as mx
    import numpy as np

    # Seeded before the CLI builds the LoRA layers, as tunebus seeds (see the docstring).
    seed = int(argv[argv.index("--seed") + 1])
    np.random.seed(seed)
    mx.random.seed(seed)
    sys.argv = ["mlx_lm_lora.train", *argv]
    with metal_working_set_shim():
        cli_main()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--raw-cli-child"]:
        raw_cli_child(sys.argv[2:])
    else:
        main()
