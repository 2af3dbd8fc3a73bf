"""Generation through the bus vs in-process, adapter swaps, and concurrent clients (issue 17; a
benchmark, not a test).

    .venv/bin/python benchmarks/inference.py [--repeat 10] [--max-tokens 48] [--json out.json]

It starts the embedded stack with the adapter-registry and the evaluator only, uploads the tiny
model, registers three random LoRA adapters on it (as tests/helpers/registration.py does), and
measures, each the median of --repeat runs, greedy, one chat prompt:

- in-process: the evaluator's own generator (services/evaluator/mlx_generate.py) called
  directly: time to the first token, tokens/s after it;
- through the bus: the same request as a submitter over NATS with `stream: true`, timed at the
  client (first chunk, last reply): the bus's overhead is the difference;
- adapter swap: a cold load (`inference.load` after `inference.unload`: fetch from S3, build,
  load weights), and warm: time to first token when each request names another cached adapter
  vs the same one again;
- requests/s: 1 client and 4 concurrent clients (own connections), each sending requests one
  after another (max 16 tokens).

Measured on the shared 2-core dev box (tiny model, MLX on the CPU, --repeat 15; medians, ms):

    time to first token      in-process 8.8    bus 28.4 (21.3 in the evaluator, 9.1 of it resolving)
    tokens/s (48 tokens)     in-process 473    bus 262
    adapter load, cold       82
    first token, warm        same adapter 30.2   another cached one 30.5
    requests/s (16 tokens)   1 client 5.6        4 clients 3.2 (one backend thread per worker)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers

from tests.helpers.events import EventLog  # noqa: E402
from tests.helpers.registration import random_adapter, register  # noqa: E402
from tests.helpers.bus import connect  # noqa: E402
from tunebus.contracts import Generate, LoadAdapter, UnloadAdapter, subjects  # noqa: E402
from tunebus.contracts.inference import AdapterLoadReply  # noqa: E402
from tunebus.shared.cli import client  # noqa: E402
from tunebus.shared.devstack.stack import LocalStack  # noqa: E402
from tunebus.shared.devstack.tinymodel import generate_tiny_model  # noqa: E402
from tunebus.shared.objectstore import ObjectStore  # noqa: E402
from tunebus.shared.settings import Settings  # noqa: E402

CHAT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def in_process(model_dir: Path, adapter_dir: Path, repeat: int, max_tokens: int) -> dict:
    from tunebus.services.evaluator.mlx_generate import Generator

    generator = Generator(model_dir)
    generator.add_adapter("a", adapter_dir)
    prompt = generator.encode(None, CHAT)
    ttft, rate, tokens = [], [], []
    for _ in range(repeat + 1):
        first = []
        started = time.perf_counter()
        n, _ = generator.generate("a", prompt, max_tokens=max_tokens, temperature=0.0, top_p=1.0,
                                  top_k=0, seed=None,
                                  on_piece=lambda p: first.append(time.perf_counter()) or True)
        ended = time.perf_counter()
        ttft.append(first[0] - started)
        rate.append((n - 1) / (ended - first[0]) if n > 1 else float("nan"))
        tokens.append(n)
    # the first run compiles and warms caches: left out
    return {"ttft_ms": median(ttft[1:]) * 1e3, "tokens_per_s": median(rate[1:]), "tokens": median(tokens[1:])}


async def over_bus(nc, ref: str, repeat: int, max_tokens: int) -> dict:
    ttft, rate, tokens, server_ttft, resolve = [], [], [], [], []
    for _ in range(repeat + 1):
        first = []
        started = time.perf_counter()

        async def on_text(_):
            first.append(time.perf_counter())

        reply = await client.generate(nc, Generate(messages=CHAT, adapter=ref, max_tokens=max_tokens,
                                                   stream=True), on_text)
        ended = time.perf_counter()
        assert reply.error is None, reply.error
        n = reply.usage.completion_tokens
        ttft.append(first[0] - started)
        rate.append((n - 1) / (ended - first[0]) if n > 1 else float("nan"))
        tokens.append(n)
        server_ttft.append(reply.timings.first_token_s)
        resolve.append(reply.timings.resolve_s)
    return {"ttft_ms": median(ttft[1:]) * 1e3, "tokens_per_s": median(rate[1:]), "tokens": median(tokens[1:]),
            # measured in the evaluator from taking the request (resolve, encode, first token)
            "server_ttft_ms": median(server_ttft[1:]) * 1e3,
            "server_resolve_ms": median(resolve[1:]) * 1e3}


async def swaps(nc, refs: list[str], repeat: int) -> dict:
    cold = []
    for _ in range(repeat):
        await client.ask(nc, subjects.INFERENCE_UNLOAD, UnloadAdapter(ref=refs[2]), AdapterLoadReply)
        started = time.perf_counter()
        reply = await client.ask(nc, subjects.INFERENCE_LOAD, LoadAdapter(ref=refs[2]), AdapterLoadReply,
                                 timeout=60)
        assert reply.error is None, reply.error
        cold.append(time.perf_counter() - started)

    async def first_token(ref):
        first = []
        started = time.perf_counter()

        async def on_text(_):
            first.append(time.perf_counter())

        await client.generate(nc, Generate(messages=CHAT, adapter=ref, max_tokens=2, stream=True), on_text)
        return first[0] - started

    same = [await first_token(refs[0]) for _ in range(repeat)]
    other = [await first_token(refs[i % 2]) for i in range(repeat)]
    return {"cold_load_ms": median(cold) * 1e3, "warm_same_adapter_ttft_ms": median(same) * 1e3,
            "warm_other_adapter_ttft_ms": median(other) * 1e3}


async def throughput(stack, ref: str, clients: int, requests: int) -> float:
    connections = [await connect(stack.as_role("submitter")) for _ in range(clients)]

    async def one(nc):
        for _ in range(requests):
            reply = await client.generate(nc, Generate(messages=CHAT, adapter=ref, max_tokens=16), timeout=120)
            assert reply.error is None, reply.error

    try:
        started = time.perf_counter()
        await asyncio.gather(*(one(nc) for nc in connections))
        return clients * requests / (time.perf_counter() - started)
    finally:
        for nc in connections:
            await nc.close()


async def run(stack, model_dir: Path, adapters: list[Path], args) -> dict:
    store = ObjectStore(stack.settings.s3)
    model_uri = f"s3://{stack.settings.s3.models_bucket}/tiny-llama"
    store.put_dir(model_uri, model_dir)
    observer = await connect(stack.as_role("observer"))
    events = await EventLog().start(observer)
    refs = [(await register(stack.settings, stack.as_role("trainer"), store, f"bench{i}", adapter,
                            model_uri, events))["ref"] for i, adapter in enumerate(adapters)]
    await observer.close()
    results = {"in_process": in_process(model_dir, adapters[0], args.repeat, args.max_tokens)}
    async with client.connect(stack.as_role("submitter")) as nc:
        results["bus"] = await over_bus(nc, refs[0], args.repeat, args.max_tokens)
        results["swap"] = await swaps(nc, refs, args.repeat)
        await client.ask(nc, subjects.INFERENCE_LOAD, LoadAdapter(ref=refs[1]), AdapterLoadReply, timeout=60)
    results["requests_per_s"] = {
        "1_client": await throughput(stack, refs[0], 1, args.requests * 4),
        "4_clients": await throughput(stack, refs[0], 4, args.requests),
    }
    results["bus_overhead_ttft_ms"] = results["bus"]["ttft_ms"] - results["in_process"]["ttft_ms"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--requests", type=int, default=8, help="per client, with 4 clients")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tunebus-bench-") as tmp:
        root = Path(tmp)
        model_dir = generate_tiny_model(root / "model")
        adapters = [random_adapter(model_dir, root / f"a{i}", seed=i) for i in range(3)]
        with LocalStack(root / "stack", settings=Settings(), reuse_external=False,
                        services=("adapter_registry", "evaluator")) as stack:
            results = asyncio.run(run(stack, model_dir, adapters, args))
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
