"""Generation for the inference API: one base model kept loaded, adapters in an LRU cache.

A request names an adapter by any ref; it is resolved with the registry on every request (so an
alias that moved, or a version deleted since it was cached, is seen at once) and cached by
`name:version`. The base model is the adapter's own; a worker holds one base model at a time
and drops its adapters when a request needs another base.

The backend's generator (`mlx_generate` or `torch_generate`, the one that reads the adapter
layout of the evaluation backend chosen here) loads and generates on the evaluator's backend
thread: generations run one at a time, in arrival order, interleaved with evaluations.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import structlog
from tunebus.contracts import AdapterEntry, Generate, Generation
from tunebus.contracts.inference import (
    AdapterLoadReply,
    LoadedAdapter,
    LoadedAdapters,
    Timings,
    Usage,
)
from tunebus.shared.adapter_layouts import CONFIG, FULL, MLX, PEFT, WEIGHTS, layouts
from tunebus.shared.models import ModelNotFound, resolve_model
from tunebus.shared.objectstore import ObjectStore
from tunebus.shared.settings import Settings

from .backend import BackendUnavailable, load_backend
from .pipeline import on_backend_thread

log = structlog.get_logger()

# The generator of each adapter layout (an evaluation backend's ADAPTER_FORMAT).
GENERATORS = {MLX: "mlx_generate", PEFT: "torch_generate"}


class InferenceError(Exception):
    """A request that cannot be answered, and why (sent back as the reply's `error`); `kind` is
    the reply's `error_kind`."""

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


Resolve = Callable[[str], Awaitable[AdapterEntry]]  # a ref -> its registry entry, or InferenceError


@dataclass
class Loaded:
    entry: AdapterEntry
    load_s: float
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    last_used: datetime = field(default_factory=lambda: datetime.now(UTC))
    uses: int = 0


class LRU:
    """Keys in least-recently-used order; `add` says which keys fell out."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: OrderedDict[str, Loaded] = OrderedDict()

    def get(self, key: str) -> Loaded | None:
        if key in self.items:
            self.items.move_to_end(key)
        return self.items.get(key)

    def add(self, key: str, value: Loaded) -> list[str]:
        self.items[key] = value
        self.items.move_to_end(key)
        evicted = []
        while len(self.items) > self.capacity:
            evicted.append(self.items.popitem(last=False)[0])
        return evicted

    def pop(self, key: str) -> Loaded | None:
        return self.items.pop(key, None)


class StopText:
    """The text of a generation as it grows, cut before the first stop string; it hands out
    only what can no longer turn into a stop string."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        self.text += piece
        found = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.text, self.stopped = self.text[:min(found)], True
            return self.flush()
        held = max((n for s in self.stops for n in range(1, len(s))
                    if self.text.endswith(s[:n])), default=0)
        out = self.text[self.sent:len(self.text) - held]
        self.sent += len(out)
        return out

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


class Inference:
    def __init__(self, store: ObjectStore, settings: Settings, resolve: Resolve, worker: str) -> None:
        self.store, self.settings, self.resolve, self.worker = store, settings, resolve, worker
        self.options = settings.evaluator.inference
        self.cache = LRU(self.options.adapter_cache)
        self.base_model: str | None = None
        self.generator = None
        self.backend = None
        self.model_dir: Path | None = None
        self._loading = asyncio.Lock()  # one load at a time; a generation is queued under it

    # -- the API

    async def generate(self, request: Generate, send: Callable[[str], Awaitable[None]] | None = None
                       ) -> Generation:
        """The answer to `request`; with `send`, each piece of text is sent as it comes."""
        started = time.perf_counter()
        try:
            entry = await self.resolve(request.adapter) if request.adapter else None
            resolve_s = time.perf_counter() - started
            base_model = self._base_model_of(request, entry)
            async with self._loading:
                load_s = await self._ensure_base(base_model)
                key = None
                if entry is not None:
                    key, loaded, extra = await self._ensure_adapter(entry)
                    load_s += extra
                    loaded.uses += 1
                    loaded.last_used = datetime.now(UTC)
                prompt = await on_backend_thread(
                    self.generator.encode, request.prompt,
                    [m.model_dump() for m in request.messages] if request.messages else None)
                run = _Run(request, asyncio.get_running_loop())
                future = on_backend_thread(
                    self.generator.generate, key, prompt, max_tokens=request.max_tokens,
                    temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                    seed=request.seed, on_piece=run.on_piece)
            try:
                tokens, finish = await asyncio.wait_for(run.drain(future, send), self.options.timeout_s)
            except TimeoutError:
                run.cancel.set()
                raise InferenceError(f"generation took longer than {self.options.timeout_s:.0f}s "
                                     "(evaluator.inference.timeout_s)", "timeout") from None
        except (InferenceError, ModelNotFound, BackendUnavailable) as e:
            return Generation(error=str(e), error_kind=getattr(e, "kind", "unavailable"),
                              worker=self.worker, adapter=request.adapter,
                              timings=Timings(total_s=time.perf_counter() - started))
        total = time.perf_counter() - started
        first = run.first_token_at - started if run.first_token_at else None
        return Generation(
            text=run.text.text, finish_reason="stop" if run.text.stopped else finish,
            adapter=entry.ref if entry else None, base_model=base_model,
            backend=self.backend.NAME, worker=self.worker,
            usage=Usage(prompt_tokens=len(prompt), completion_tokens=tokens,
                        total_tokens=len(prompt) + tokens),
            timings=Timings(resolve_s=resolve_s, load_s=load_s, first_token_s=first, total_s=total,
                            tokens_per_s=(tokens - 1) / (total - first)
                            if first is not None and tokens > 1 and total > first else None))

    async def load(self, ref: str) -> AdapterLoadReply:
        started = time.perf_counter()
        try:
            entry = await self.resolve(ref)
            async with self._loading:
                await self._ensure_base(self._base_model_of(None, entry))
                before = set(self.cache.items)
                key, _, _ = await self._ensure_adapter(entry)
        except (InferenceError, ModelNotFound, BackendUnavailable) as e:
            return AdapterLoadReply(ref=ref, error=str(e), worker=self.worker)
        return AdapterLoadReply(ref=key, loaded=True, evicted=sorted(before - set(self.cache.items)),
                                seconds=time.perf_counter() - started, worker=self.worker)

    async def unload(self, ref: str) -> AdapterLoadReply:
        # A version deleted since it was loaded no longer resolves: unload by name:version too.
        key = ref if ref in self.cache.items else None
        if key is None:
            try:
                key = (await self.resolve(ref)).ref
            except InferenceError as e:
                return AdapterLoadReply(ref=ref, error=str(e), worker=self.worker)
        async with self._loading:
            if self.cache.pop(key) is None:
                return AdapterLoadReply(ref=key, worker=self.worker,
                                        error=f"{key} is not loaded on this worker")
            await on_backend_thread(self.generator.drop_adapter, key)
        return AdapterLoadReply(ref=key, loaded=False, worker=self.worker)

    def loaded(self, name: str | None = None) -> LoadedAdapters:
        return LoadedAdapters(
            worker=self.worker, base_model=self.base_model, capacity=self.cache.capacity,
            adapters=[LoadedAdapter(ref=key, base_model=item.entry.base_model,
                                    loaded_at=item.loaded_at, last_used=item.last_used,
                                    uses=item.uses, load_s=item.load_s)
                      for key, item in self.cache.items.items()
                      if name is None or item.entry.name == name])

    async def preload(self, base_model: str) -> None:
        async with self._loading:
            await self._ensure_base(base_model)

    # -- loading

    def _base_model_of(self, request: Generate | None, entry: AdapterEntry | None) -> str:
        asked = request.base_model if request else None
        if entry is None:
            if not asked:
                raise InferenceError("no adapter and no base_model: name one of them")
            return asked
        if asked and asked != entry.base_model:
            raise InferenceError(f"{entry.ref} was trained on {entry.base_model}, not {asked}")
        return entry.base_model

    async def _ensure_base(self, base_model: str) -> float:
        """Seconds spent loading the base model (0 when it was loaded already)."""
        if base_model == self.base_model:
            return 0.0
        started = time.perf_counter()
        if self.backend is None:
            self.backend = await on_backend_thread(load_backend, self.settings.evaluator.backend)
        model_dir = await asyncio.to_thread(
            resolve_model, base_model, self.store, self.settings.work_dir / "models",
            models_root=self.settings.models_root)
        module = importlib.import_module(f"{__package__}.{GENERATORS[self.backend.ADAPTER_FORMAT]}")
        # Everything of the old base goes first, so two base models are never in memory.
        self.generator, self.base_model, self.model_dir = None, None, model_dir
        self.cache = LRU(self.options.adapter_cache)
        self.generator = await on_backend_thread(module.Generator, model_dir)
        self.base_model = base_model
        log.info("base model loaded for inference", base_model=base_model,
                 seconds=round(time.perf_counter() - started, 3))
        return time.perf_counter() - started

    async def _ensure_adapter(self, entry: AdapterEntry) -> tuple[str, Loaded, float]:
        """(cache key, cache item, seconds spent loading it now)."""
        if (cached := self.cache.get(entry.ref)) is not None:
            return entry.ref, cached, 0.0
        started = time.perf_counter()
        folder = self.settings.work_dir / "inference" / entry.name / str(entry.version)
        adapter_dir = await self._fetch(entry, folder)
        try:
            await on_backend_thread(self.generator.add_adapter, entry.ref, adapter_dir)
        except ValueError as e:  # mlx-lm names the tensors that do not fit the base model
            raise InferenceError(f"{entry.ref} does not load on {entry.base_model}: {e}") from e
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # the backend holds the weights now
        loaded = Loaded(entry, time.perf_counter() - started)
        for key in self.cache.add(entry.ref, loaded):
            await on_backend_thread(self.generator.drop_adapter, key)
            log.info("adapter evicted", ref=key)
        log.info("adapter loaded for inference", ref=entry.ref, seconds=round(loaded.load_s, 3))
        return entry.ref, loaded, loaded.load_s

    async def _fetch(self, entry: AdapterEntry, folder: Path) -> Path:
        """The adapter in the layout the backend reads: as stored, or converted from the other."""
        wanted = self.backend.ADAPTER_FORMAT
        by_name = {a.name: a for a in entry.artifacts}
        found = layouts(list(by_name))
        present = {k: v for k, v in found.items() if k in WEIGHTS}
        stored = wanted if wanted in present else next(iter(present), None)
        if stored is None and FULL in found:
            raise InferenceError(
                f"{entry.ref} is a full fine-tune (a whole model, not an adapter on "
                f"{entry.base_model}), which inference does not serve: download it with "
                f"`tunebus adapters download {entry.ref}` and load it as a model")
        if stored is None:
            raise InferenceError(f"{entry.ref} has no adapter files among its artifacts")
        source = folder / stored
        for name in (CONFIG, WEIGHTS[stored]):
            artifact = by_name[present[stored] + name]
            await asyncio.to_thread(self.store.get_file, artifact.uri, source / name)
        if stored == wanted:
            return source
        from tunebus.shared import adapter_layouts

        target = folder / wanted
        if wanted == MLX:
            layers = json.loads((self.model_dir / "config.json").read_text()).get("num_hidden_layers")
            await on_backend_thread(adapter_layouts.peft_to_mlx, source, target, num_hidden_layers=layers)
        else:
            await on_backend_thread(adapter_layouts.mlx_to_peft, source, target,
                                    base_model=entry.base_model)
        return target


class _Run:
    """One generation's text as the backend thread produces it, handed to the event loop."""

    def __init__(self, request: Generate, loop: asyncio.AbstractEventLoop) -> None:
        self.text = StopText(request.stop)
        self.loop = loop
        self.pieces: asyncio.Queue[str | None] = asyncio.Queue()
        self.cancel = threading.Event()
        self.first_token_at: float | None = None

    def on_piece(self, piece: str) -> bool:
        """On the backend thread: False ends the generation."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if out := self.text.feed(piece):
            self.loop.call_soon_threadsafe(self.pieces.put_nowait, out)
        return not (self.text.stopped or self.cancel.is_set())

    async def drain(self, future, send) -> tuple[int, str]:
        task = asyncio.ensure_future(future)
        task.add_done_callback(lambda _: self.pieces.put_nowait(None))
        while (piece := await self.pieces.get()) is not None:
            if send is not None:
                await send(piece)
        result = await task
        if rest := self.text.flush():  # a held-back tail that never became a stop string
            if send is not None:
                await send(rest)
        return result
