"""The evaluator's inference engine in-process: stop strings, the LRU of adapters, and both
backends' generators hot-swapping adapters on one base model as if each were loaded alone."""

from __future__ import annotations

import pytest

from tests.helpers.registration import random_adapter
from tunebus.contracts import AdapterEntry, Generate
from tunebus.services.evaluator.inference import LRU, Inference, Loaded, StopText
from tunebus.shared.adapter_layouts import PEFT_DIR
from tunebus.shared.objectstore import ObjectStore
from tunebus.shared.settings import Settings

CHAT = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def two_adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [random_adapter(tiny_model, root / f"a{i}", seed=i) for i in (1, 2)]


def test_stop_text_holds_back_what_may_become_a_stop_string_and_cuts_before_it():
    text = StopText(["END"])
    assert [text.feed(p) for p in ("hello E", "N", "D and more")] == ["hello ", "", ""]
    assert text.text == "hello " and text.stopped


def test_stop_text_lets_a_false_start_through_once_it_diverges():
    text = StopText(["END"])
    assert text.feed("an E") == "an " and text.feed("ND") == "" and text.stopped
    other = StopText(["END"])
    assert other.feed("an E") == "an " and other.feed("x") == "Ex" and not other.stopped
    assert other.feed("E") == "" and other.flush() == "E"


def test_the_least_recently_used_adapter_is_evicted_first():
    cache = LRU(2)
    item = Loaded(entry=None, load_s=0)
    assert cache.add("a:1", item) == [] and cache.add("b:1", item) == []
    cache.get("a:1")
    assert cache.add("c:1", item) == ["b:1"]
    assert list(cache.items) == ["a:1", "c:1"]


def entry(name: str, version: int, base_model: str) -> AdapterEntry:
    return AdapterEntry.model_construct(name=name, version=version, ref=f"{name}:{version}",
                                        base_model=base_model, deleted=False, artifacts=[])


@pytest.mark.anyio
@pytest.mark.parametrize("backend", ["mlx", "cuda"])
async def test_an_lru_of_one_swaps_adapters_and_answers_as_each_loaded_alone(
        backend, tiny_model, two_adapters, tmp_path):
    settings = Settings(models_root=tiny_model.parent, work_dir=tmp_path)
    settings.evaluator.backend = backend
    settings.evaluator.inference.adapter_cache = 1
    entries = {e.ref: e for e in (entry("one", 1, str(tiny_model)), entry("two", 1, str(tiny_model)))}
    # The layout each backend reads: mlx-lm's at the root, PEFT's under peft/.
    local = {ref: d if backend == "mlx" else d / PEFT_DIR for ref, d in zip(entries, two_adapters)}

    async def resolve(ref):
        return entries[ref]

    engine = Inference(ObjectStore(settings.s3), settings, resolve, "test")

    async def fetch(e, folder):
        return local[e.ref]

    engine._fetch = fetch
    ask = lambda ref: engine.generate(Generate(messages=CHAT, adapter=ref, max_tokens=12))  # noqa: E731
    first = await ask("one:1")
    assert first.error is None and first.timings.load_s > 0
    second = await ask("two:1")
    assert [a.ref for a in engine.loaded().adapters] == ["two:1"]  # one:1 was evicted
    again = await ask("one:1")
    assert again.text == first.text != second.text and again.timings.load_s > 0
    warm = await ask("one:1")
    assert warm.text == first.text and warm.timings.load_s == 0.0
    base = await engine.generate(Generate(messages=CHAT, base_model=str(tiny_model), max_tokens=12))
    assert base.text != first.text and base.adapter is None and base.backend == backend


@pytest.mark.parametrize("module", ["mlx_generate", "torch_generate"])
def test_a_generator_with_two_adapters_answers_as_each_alone(module, tiny_model, two_adapters):
    import importlib

    generators = importlib.import_module(f"tunebus.services.evaluator.{module}")
    layout = (lambda d: d) if generators.ADAPTER_FORMAT == "mlx" else (lambda d: d / PEFT_DIR)

    def answer(generator, key):
        pieces = []
        prompt = generator.encode(None, CHAT)
        tokens, _ = generator.generate(key, prompt, max_tokens=12, temperature=0.0, top_p=1.0,
                                       top_k=0, seed=None, on_piece=lambda p: pieces.append(p) or True)
        return "".join(pieces), tokens

    alone = []
    for adapter in two_adapters:
        generator = generators.Generator(tiny_model)
        generator.add_adapter("x", layout(adapter))
        alone.append(answer(generator, "x"))
    base_alone = answer(generators.Generator(tiny_model), None)

    shared = generators.Generator(tiny_model)
    shared.add_adapter("one", layout(two_adapters[0]))
    shared.add_adapter("two", layout(two_adapters[1]))
    assert [answer(shared, "two"), answer(shared, "one"), answer(shared, None)] == [
        alone[1], alone[0], base_alone]
    assert alone[0] != alone[1] != base_alone
    shared.drop_adapter("one")
    shared.drop_adapter("two")
    assert answer(shared, None) == base_alone
