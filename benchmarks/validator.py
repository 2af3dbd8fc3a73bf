"""Throughput, memory and start-up of the dataset validator (a benchmark, not a test).

    python benchmarks/validator.py                      # 1M-row alpaca and sharegpt JSONL
    python benchmarks/validator.py --rows 1000000 3000000 --formats alpaca
    python benchmarks/validator.py --together /tmp/together-venv/bin/python   # + Together's checker

For each format and size it generates a JSONL file (kept in --work-dir, reused by later runs),
then validates and normalises it in a fresh child process (the validator is single-threaded:
one core), writing the canonical train/valid files to disk as the service does. It reports rows
per second, by wall clock and by the child's CPU time (user + system, which a busy machine
disturbs less), and the child's peak resident memory.

In the same run, as ratios (issue 12), whole process each, so start-up counts:
  * against the floor: a bare loop of `msgspec.json.decode` over the same file's lines (goal:
    tunebus within 3x);
  * `tunebus validate` on a 10-row file against a bare `python -c pass` (goal: at most 0.3 s);
  * with --together PYTHON (an interpreter with `together` installed, e.g. a throwaway venv:
    `python -m venv /tmp/t && /tmp/t/bin/pip install together`; never a dependency), Together's
    client-side checker (`check_file`: `together.lib.utils`, or `together.utils` in SDK 1.x)
    against `tunebus validate` on one
    OpenAI-chat file (2-6 turns, 50-500 characters a message).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which "
    "she do how their if will up other about out many then them these so some her would make "
    "like him into time has look two more write go see number no way could people my than "
    "first water been call who oil its now find long down day did get come made may part"
).split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n))


def alpaca_row(rng: random.Random, i: int) -> dict:
    return {"instruction": f"{sentence(rng, 10)} #{i}?", "input": sentence(rng, rng.randint(0, 8)),
            "output": sentence(rng, 30)}


def sharegpt_row(rng: random.Random, i: int) -> dict:
    turns = []
    for t in range(rng.choice((1, 1, 2))):
        turns.append({"from": "human", "value": f"{sentence(rng, 10)} #{i}.{t}?"})
        turns.append({"from": "gpt", "value": sentence(rng, 25)})
    return {"conversations": turns}


def chat_row(rng: random.Random, i: int) -> dict:
    """OpenAI chat: 2-6 turns of 50-500 characters, the first user turn made unique."""
    def text(turn: int) -> str:
        return sentence(rng, rng.randint(10, 90))[: rng.randint(50, 500)].ljust(50, ".")

    n = rng.randint(1, 3)
    messages = []
    for t in range(n):
        messages.append({"role": "user", "content": f"#{i}.{t} {text(t)}"})
        messages.append({"role": "assistant", "content": text(t)})
    return {"messages": messages}


GENERATORS = {"alpaca": alpaca_row, "sharegpt": sharegpt_row, "chat": chat_row}


def dataset(work_dir: Path, fmt: str, rows: int) -> Path:
    """The benchmark file, generated once (unique rows: nothing is dropped as a duplicate)."""
    import msgspec

    path = work_dir / f"{fmt}-{rows}.jsonl"
    if path.exists():
        return path
    rng, make, encode = random.Random(0), GENERATORS[fmt], msgspec.json.encode
    partial = path.with_suffix(".partial")
    print(f"generating {path} …", file=sys.stderr)
    with partial.open("wb") as f:
        for start in range(0, rows, 100_000):
            f.write(b"".join(encode(make(rng, i)) + b"\n"
                             for i in range(start, min(rows, start + 100_000))))
    partial.rename(path)
    return path


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM belongs to the process image, so
    unlike ru_maxrss it does not carry over the parent's peak through fork and exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    kilobytes = 1024 if sys.platform == "darwin" else 1  # macOS reports bytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kilobytes / 1024


def child(path: Path) -> None:
    """Validate one file and print the figures as JSON (run in its own process), through the
    policy every entry point uses."""
    from tunebus.services.dataset_validator.validation import Limits, Policy

    baseline_mb = peak_rss_mb()
    with tempfile.TemporaryDirectory() as tmp, path.open("rb") as data, \
            open(Path(tmp, "train.jsonl"), "wb") as train, \
            open(Path(tmp, "valid.jsonl"), "wb") as valid:
        wall, cpu = time.perf_counter(), time.process_time()
        # Limits out of the way (the default max_bytes, 1 GiB, stops a 10M-row file early).
        policy = Policy(limits=Limits(max_bytes=1 << 40, max_rows=1 << 40))
        report = policy.validate([(str(path), data)], train_sink=train, valid_sink=valid)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(json.dumps({
        "valid": report.valid, "rows": report.rows,
        "written": report.train_rows + report.valid_rows,
        "seconds": wall, "cpu_seconds": cpu,
        "peak_rss_mb": peak_rss_mb(),
        "baseline_rss_mb": baseline_mb,
    }))


def decode_only(path: Path) -> None:
    """The floor: decode every line with msgspec and do nothing else."""
    import msgspec

    decode, rows = msgspec.json.decode, 0
    with path.open("rb") as f:
        for line in f:
            decode(line)
            rows += 1
    print(json.dumps({"rows": rows}))


TOGETHER_CHECK = (
    "import json, sys\n"
    "try:\n    from together.lib.utils import check_file\n"  # SDK 2.x and 3.x
    "except ImportError:\n    from together.utils import check_file\n"  # SDK 1.x
    "report = check_file(sys.argv[1])\n"
    "print(json.dumps({'valid': bool(report.get('is_check_passed')), "
    "'message': str(report.get('message', ''))[:200]}))\n"
)


def whole_process(command: list[str], repeat: int) -> tuple[float, str, float]:
    """The best wall time of `command` (start-up included), its last output, and the best CPU
    time (user + system) the process took, which a busy machine disturbs less than wall time."""
    best, out, best_cpu = float("inf"), "", float("inf")
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        best = min(best, time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        best_cpu = min(best_cpu, cpu)
    return best, out, best_cpu


def tunebus_command() -> list[str]:
    script = Path(sys.executable).with_name("tunebus")
    return [str(script)] if script.exists() else [sys.executable, "-m", "tunebus.shared.cli"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--formats", nargs="+", choices=sorted(GENERATORS),
                        default=["alpaca", "sharegpt"])
    parser.add_argument("--work-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "tunebus-bench")
    parser.add_argument("--repeat", type=int, default=1, help="Runs per file; the best is shown.")
    parser.add_argument("--together", help="A Python with `together` installed: compare its "
                        "checker on an OpenAI-chat file.")
    parser.add_argument("--chat-rows", type=int, default=200_000)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--decode", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    if args.decode:
        decode_only(args.decode)
        return
    args.work_dir.mkdir(parents=True, exist_ok=True)
    print(f"{'format':9} {'rows':>10} {'MB':>7} {'wall s':>7} {'rows/s':>9} {'rows/s CPU':>10} "
          f"{'peak RSS MB':>11} {'process s':>9} {'decode s':>8} {'ratio':>5} {'CPU ratio':>9}")
    for fmt in args.formats:
        for rows in args.rows:
            path = dataset(args.work_dir, fmt, rows)
            runs = []
            process = process_cpu = float("inf")
            for _ in range(args.repeat):
                took, out, cpu = whole_process([sys.executable, __file__, "--child", str(path)], 1)
                process, process_cpu = min(process, took), min(process_cpu, cpu)
                runs.append(json.loads(out))
            decode, _, decode_cpu = whole_process(
                [sys.executable, __file__, "--decode", str(path)], args.repeat)
            best = min(runs, key=lambda r: r["seconds"])
            assert best["valid"] and best["written"] == rows, best
            print(f"{fmt:9} {rows:>10,} {path.stat().st_size / 1e6:>7,.0f} {best['seconds']:>7.2f} "
                  f"{rows / best['seconds']:>9,.0f} {rows / best['cpu_seconds']:>10,.0f} "
                  f"{max(r['peak_rss_mb'] for r in runs):>11,.0f} {process:>9.2f} "
                  f"{decode:>8.2f} {process / decode:>5.1f} {process_cpu / decode_cpu:>9.1f}",
                  flush=True)
    print(f"(ratio: tunebus / bare msgspec decode, whole process each, by wall and by CPU time; "
          f"goal <= 3; interpreter and imports alone: {runs[-1]['baseline_rss_mb']:.0f} MB RSS)")

    small = args.work_dir / "ten.jsonl"
    small.write_text("".join(json.dumps(alpaca_row(random.Random(i), i)) + "\n"
                             for i in range(10)))
    bare, _, bare_cpu = whole_process([sys.executable, "-c", "pass"], 5)
    start, _, start_cpu = whole_process([*tunebus_command(), "validate", str(small)], 5)
    print(f"tunebus validate on 10 rows: {start:.2f} s whole process, {start_cpu:.2f} s CPU "
          f"(python -c pass: {bare:.2f} s, {bare_cpu:.2f} s CPU; goal <= 0.3 s)")

    if args.together:
        chat = dataset(args.work_dir, "chat", args.chat_rows)
        theirs, out, theirs_cpu = whole_process(
            [args.together, "-c", TOGETHER_CHECK, str(chat)], args.repeat)
        verdict = json.loads(out.splitlines()[-1])
        ours, _, ours_cpu = whole_process([*tunebus_command(), "validate", str(chat)],
                                          args.repeat)
        print(f"chat {args.chat_rows:,} rows: tunebus validate {ours:.2f} s ({ours_cpu:.2f} s "
              f"CPU), Together's check_file {theirs:.2f} s ({theirs_cpu:.2f} s CPU; valid: "
              f"{verdict['valid']}): ratio {ours / theirs:.2f} by wall, "
              f"{ours_cpu / theirs_cpu:.2f} by CPU (goal < 1)")
    print(f"(machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
