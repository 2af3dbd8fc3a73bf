"""`tunebus …` commands. Each is a thin shell over `tunebus.shared` (client, local stack, store)."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import signal
import tempfile
import time
import urllib.request
import uuid
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tunebus.contracts import (
    AdapterList,
    AdapterSettings,
    AdapterReply,
    DatasetSpec,
    DownloadUrls,
    GetAdapter,
    GetDownloadUrls,
    Hyperparameters,
    ListAdapters,
    TrainingRequested,
    subjects,
)
from tunebus.shared import adapter_layouts
from tunebus.shared.cli import client
from tunebus.shared.objectstore import ObjectStore
from tunebus.shared.settings import Settings

from . import chat, control, deadletters, serve, status, validate
from .watching import watch_job

app = typer.Typer(help="tunebus: event-driven LoRA fine-tuning over NATS and S3.", no_args_is_help=True)
stack_app = typer.Typer(help="The embedded local stack.", no_args_is_help=True)
adapters_app = typer.Typer(help="Registered adapters.", no_args_is_help=True)
model_app = typer.Typer(help="Base models.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
app.add_typer(adapters_app, name="adapters")
app.add_typer(model_app, name="model")
console = Console()
err = Console(stderr=True)
for module in (validate, status, control, deadletters, chat, serve):
    module.register(app)

DEFAULT_DATA_DIR = Path.home() / ".cache" / "tunebus" / "stack"
TINY_MODEL_URI = "s3://{bucket}/tiny-llama"


@stack_app.command("up")
def stack_up(
    data_dir: Annotated[Path, typer.Option(help="JetStream store, logs and worker cache.")] = DEFAULT_DATA_DIR,
    service: Annotated[list[str] | None, typer.Option(
        help="Run only this service (repeatable): dataset_validator, trainer, evaluator, "
        "adapter_registry.")] = None,
    ui_port: Annotated[int, typer.Option(help="The dashboard's port (a free one if taken; -1: no "
                                         "dashboard).")] = 8765,
) -> None:
    """Start nats-server, an S3 endpoint and the four services; a service that dies is started
    again (with backoff, counted in `tunebus health`); Ctrl-C stops them all."""
    from tunebus.shared.devstack.stack import SERVICES, LocalStack
    from tunebus.shared.devstack.supervisor import Supervisor

    if unknown := sorted(set(service or ()) - set(SERVICES)):
        err.print(f"[red]no such service: {', '.join(unknown)} (choose from {', '.join(SERVICES)})[/]")
        raise typer.Exit(2)
    with LocalStack(data_dir, settings=Settings(), services=tuple(service or SERVICES)) as stack:
        supervisor = Supervisor(stack)
        supervisor.write_state()
        with _dashboard(stack, ui_port) as dashboard:
            console.print("[bold green]tunebus stack is up[/]")
            _print_endpoints(stack, dashboard)
            console.print("\nPoint a shell at it:")
            _print_exports(stack)
            console.print("\nCtrl-C to stop.")
            _wait_for_interrupt(stack, supervisor)


@app.command()
def ui(
    host: Annotated[str, typer.Option(help="Address to listen on. The page has no login of its "
                                      "own: whoever reaches it acts as this identity.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (a free one if taken).")] = 8765,
) -> None:
    """The web dashboard: jobs live, curves and reports, adapters, services, dead letters,
    submitting; it acts as the NATS identity in TUNEBUS_NATS__* (observer to look, operator to
    promote and replay)."""
    from tunebus.shared.dashboard import Dashboard

    dashboard = Dashboard(Settings(), host=host, port=port).start()
    console.print(f"tunebus dashboard on [bold]{dashboard.url}[/] (Ctrl-C to stop)")
    try:
        while dashboard.thread.is_alive():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        dashboard.stop()


@app.command()
def bootstrap() -> None:
    """Declare the streams and key-value buckets, or bring them up to date (once per deployment,
    as the NATS admin: the services' identities may only use them)."""
    from tunebus.shared.bus import bootstrap as declare

    async def run() -> None:
        async with client.connect(Settings()) as nc:
            await declare(nc)

    client.run(run())
    console.print("streams and key-value buckets are declared")


@app.command()
def demo(
    data_dir: Annotated[Path | None, typer.Option(help="Keep the stack's files here (default: a temp dir).")] = None,
    iters: Annotated[int, typer.Option(help="Training iterations.")] = 60,
    keep_running: Annotated[bool, typer.Option(help="Keep the stack (and the links) up until Ctrl-C.")] = False,
    ui_port: Annotated[int, typer.Option(help="The dashboard's port (a free one if taken; -1: no "
                                         "dashboard).")] = 8765,
) -> None:
    """Run the whole pipeline once on the embedded stack: tiny model, sample dataset, adapter."""
    from tunebus.shared.devstack.stack import LocalStack

    with tempfile.TemporaryDirectory(prefix="tunebus-demo-") as tmp:
        root = data_dir or Path(tmp)
        with console.status("starting the local stack (nats-server, S3, four services)…"):
            stack = LocalStack(root, settings=Settings(), reuse_external=False).__enter__()
        serving = _dashboard(stack, ui_port)
        dashboard = serving.__enter__()
        try:
            _print_endpoints(stack, dashboard)
            # As its users would: an operator puts the base model in place, a submitter the rest.
            operator = stack.as_role("operator")
            settings = stack.as_role("submitter")
            store = ObjectStore(settings.s3)
            with console.status("generating the tiny model and uploading it to S3…"):
                model_uri = _upload_tiny_model(ObjectStore(operator.s3), operator, root / "tiny-model")
            console.print(f"base model: {model_uri}")
            job_id = f"demo-{uuid.uuid4().hex[:8]}"
            sample = resources.files("tunebus.shared.devstack") / "data" / "alpaca_sample.jsonl"
            with resources.as_file(sample) as path:
                dataset_uri = _upload_dataset(store, settings, path, job_id)
            request = TrainingRequested(
                job_id=job_id, adapter_name="demo", base_model=model_uri,
                dataset=DatasetSpec(uri=dataset_uri),
                hyperparameters=Hyperparameters(iters=iters, batch_size=4, learning_rate=5e-3,
                                                max_seq_length=128),
            )
            final = client.run(_submit_and_watch(settings, request))
            if final is None or final.type != "tunebus.adapter.registered.v1":
                raise typer.Exit(1)
            urls = client.run(_ask(settings, subjects.REGISTRY_DOWNLOAD_URL,
                                   GetDownloadUrls(ref=final.data.entry.ref), DownloadUrls))
            _print_registered(final.data.entry, urls)
            if keep_running:
                if dashboard is not None:
                    console.print(f"\nWatch the job, read its report and download the adapter at "
                                  f"[bold]{dashboard.url}#/jobs/{job_id}[/]")
                console.print("\nThe stack stays up (Ctrl-C to stop); point a shell at it with:")
                _print_exports(stack)
                _wait_for_interrupt(stack)
            else:
                console.print("\nThe stack stops now, and the links with it: "
                              "`tunebus demo --keep-running` keeps them alive.")
        finally:
            with console.status("stopping the local stack…"):
                serving.__exit__(None, None, None)
                stack.stop()


_HYPERPARAMETERS = Hyperparameters.model_fields  # the CLI's defaults are the request's


@app.command()
def submit(
    dataset: Annotated[str, typer.Argument(help="A local JSONL/JSON file (uploaded to S3) or an s3:// URI.")],
    adapter: Annotated[str, typer.Option("--adapter", "-a", help="Adapter name.")],
    base_model: Annotated[str, typer.Option(help="Hugging Face id, s3://… prefix or local path.")],
    job_id: Annotated[str | None, typer.Option(help="Idempotency key (default: a new id).")] = None,
    iters: Annotated[int | None, typer.Option(help="Training iterations (default: one epoch).")] = None,
    epochs: Annotated[int | None, typer.Option()] = None,
    batch_size: Annotated[int, typer.Option()] = _HYPERPARAMETERS["batch_size"].default,
    learning_rate: Annotated[float, typer.Option()] = _HYPERPARAMETERS["learning_rate"].default,
    max_seq_length: Annotated[int, typer.Option()] = _HYPERPARAMETERS["max_seq_length"].default,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = AdapterSettings.model_fields["rank"].default,
    backend: Annotated[str, typer.Option(help="auto, mlx or cuda.")] = "auto",
    init_from: Annotated[str | None, typer.Option(
        help="Continue from an adapter (name:version, name@alias) or a checkpoint's s3:// URI.")] = None,
    watch: Annotated[bool, typer.Option(help="Follow the job until it ends.")] = False,
) -> None:
    """Publish a training request; prints the job id."""
    settings = Settings()
    job_id = job_id or f"job-{uuid.uuid4().hex[:12]}"
    if not dataset.startswith("s3://"):
        path = Path(dataset)
        if not path.is_file():
            err.print(f"[red]error:[/] dataset {dataset} is not a file or an s3:// URI")
            raise typer.Exit(2)
        dataset = _upload_dataset(ObjectStore(settings.s3), settings, path, job_id)
    request = TrainingRequested.model_validate({
        "job_id": job_id, "adapter_name": adapter, "base_model": base_model,
        "dataset": {"uri": dataset}, "backend": backend, "adapter": {"rank": rank},
        "init_from": init_from,
        "hyperparameters": {"iters": iters, "epochs": epochs, "batch_size": batch_size,
                            "learning_rate": learning_rate, "max_seq_length": max_seq_length},
    })
    if watch:
        final = client.run(_submit_and_watch(settings, request))
        raise typer.Exit(0 if final is not None and final.type == "tunebus.adapter.registered.v1" else 1)
    client.run(_submit(settings, request))
    console.print(job_id)


@app.command()
def watch(job_id: str) -> None:
    """Follow a job's events with a live progress bar until it ends."""
    final = client.run(_watch(Settings(), job_id))
    raise typer.Exit(0 if final is not None and final.type == "tunebus.adapter.registered.v1" else 1)


@adapters_app.command("list")
def adapters_list(
    name: Annotated[str | None, typer.Option(help="Only this adapter.")] = None,
    base_model: Annotated[str | None, typer.Option(help="Only adapters of this base model.")] = None,
    tag: Annotated[str | None, typer.Option(help="Only versions with this tag (request metadata.tags).")] = None,
    deleted: Annotated[bool, typer.Option("--deleted", help="Include deleted versions.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the entries as JSON.")] = False,
    page_size: Annotated[int, typer.Option(min=1, max=1000, help="Versions per registry reply "
                                           "(every page is read).")] = 100,
) -> None:
    """Registered adapter versions."""
    query = ListAdapters(name=name, base_model=base_model, tag=tag, include_deleted=deleted,
                         limit=page_size)
    reply = client.run(_every_page(Settings(), query))
    if reply.error:
        console.print(f"[red]{reply.error}[/]")
        raise typer.Exit(1)
    if as_json:
        console.print_json(reply.model_dump_json())
        return
    table = Table("ref", "aliases", "base model", "job", "final loss", "eval loss before → after",
                  "promotion", "created")
    table.columns[0].no_wrap = True
    for e in reply.adapters:
        ev = e.evaluation
        change = f"{ev.before.loss:.3f} → {ev.after.loss:.3f}" if ev and ev.before and ev.after else "-"
        promotion = ("auto-promoted" if e.promotion.promoted else "candidate") if e.promotion else "-"
        table.add_row(e.ref + (" [red](deleted)[/]" if e.deleted else ""), ", ".join(e.aliases) or "-",
                      e.base_model, e.job_id, f"{e.training.final_loss:.3f}", change, promotion,
                      e.created_at.strftime("%Y-%m-%d %H:%M"))
    console.print(table)


@adapters_app.command("show")
def adapters_show(ref: Annotated[str, typer.Argument(help="name, name:version or name@alias")]) -> None:
    """One adapter version, as JSON."""
    reply = client.run(_ask(Settings(), subjects.REGISTRY_GET, GetAdapter(ref=ref), AdapterReply))
    if reply.error:
        err.print(f"[red]error:[/] {reply.error}")
        raise typer.Exit(1)
    console.print_json(reply.entry.model_dump_json())


@adapters_app.command("download")
def adapters_download(
    ref: Annotated[str, typer.Argument(help="name, name:version or name@alias (latest, production)")],
    to: Annotated[Path, typer.Option(help="Directory to write the adapter into.")] = Path("."),
    fmt: Annotated[str | None, typer.Option(
        "--format", help="mlx, peft, gguf (the adapter for llama.cpp / Ollama), full (the whole "
        "model of a full fine-tune) or gguf-merged (the merged or fully fine-tuned model as one "
        "full GGUF; default: the layout it was trained in).")] = None,
    everything: Annotated[bool, typer.Option(
        "--all", help="Every stored file, in the folders of the S3 prefix (mlx-lm layout at the "
        "root, peft/, merged/ when a merged model was asked for).")] = False,
) -> None:
    """Download an adapter over presigned URLs into TO/NAME-vVERSION, checking each sha256.

    The directory holds one adapter layout, ready for its library, with the run files
    (training_args.json, metrics.json, loss curve) and the evaluation report beside it:
    --format peft for PeftModel.from_pretrained(model, DIR), --format mlx for
    mlx_lm.load(model, adapter_path=DIR); without --format, the layout it was trained in (mlx
    from the MLX worker, peft from the torch worker). Both layouts are stored for every adapter
    PEFT can express; a version stored without the one asked for (registered before both were
    stored) is converted here. --format gguf gives adapter.gguf, a llama.cpp LoRA GGUF
    (`llama-cli -m base.gguf --lora adapter.gguf`, Ollama's ADAPTER), which the registry writes
    when it registers a version. --format gguf-merged gives model.gguf, the merged model (stored
    when the request said `merge: true`) converted here into one full GGUF (`llama-cli -m
    model.gguf`, Ollama's FROM). Otherwise a merged model is fetched only with --all. A full
    fine-tune (adapter.type full) is a whole model: by default (--format full) the directory holds
    it in the Hugging Face layout (AutoModelForCausalLM.from_pretrained(DIR), mlx_lm.load(DIR)),
    and --format gguf-merged writes it as one full GGUF.
    """
    if fmt not in (None, *adapter_layouts.WEIGHTS, adapter_layouts.FULL, "gguf", MERGED_GGUF):
        err.print(f"[red]error:[/] --format must be mlx, peft, full, gguf or {MERGED_GGUF}, "
                  f"not {fmt!r}")
        raise typer.Exit(2)
    if fmt and everything:
        err.print("[red]error:[/] --all downloads every layout; leave out --format")
        raise typer.Exit(2)
    settings = Settings()
    entry = _reply_or_exit(client.run(_ask(settings, subjects.REGISTRY_GET, GetAdapter(ref=ref),
                                           AdapterReply))).entry
    target = to / entry.ref.replace(":", "-v")
    if everything:
        _download_verified(_download_urls(settings, entry.ref, None), target)
        console.print(f"{entry.ref} → {target} (sha256 verified, every stored file)")
        return
    if fmt == MERGED_GGUF:
        _download_merged_gguf(settings, entry, target)
        path = target / adapter_layouts.MERGED_GGUF_FILE
        console.print(f"{entry.ref} → {path} (sha256 verified, the merged model converted to a "
                      "full GGUF here)")
        return
    wanted = fmt or entry.format
    if wanted in entry.formats:
        _download_verified(_download_urls(settings, entry.ref, wanted), target)
        console.print(f"{entry.ref} → {target} (sha256 verified, {wanted} layout)")
        return
    if adapter_layouts.FULL in entry.formats:
        err.print(f"[red]error:[/] {entry.ref} is a full fine-tune, a whole model with no "
                  f"{wanted} adapter: download it with --format full (the default) or "
                  f"{MERGED_GGUF}")
        raise typer.Exit(1)
    if wanted == "gguf":
        err.print(f"[red]error:[/] {entry.ref} has no GGUF copy: the registry writes one when it "
                  "registers a version whose base model's config.json is in the models bucket "
                  f"({entry.base_model} is not, or the copy failed: see its log)")
        raise typer.Exit(1)
    if not entry.formats:
        err.print(f"[red]error:[/] the adapter-registry does not say which layouts {entry.ref} is "
                  "stored in (it is older than this command); download it with --all")
        raise typer.Exit(1)
    stored = next(f for f in entry.formats if f != "gguf")  # the one layout stored: not the wanted one
    _download_converted(settings, entry, stored, wanted, target)
    console.print(f"{entry.ref} → {target} (sha256 verified, converted from {stored} to {wanted}: "
                  f"{entry.ref} is stored in {stored} only)")


MERGED_GGUF = "gguf-merged"  # not a stored layout: the merged model, converted by this command


def _download_merged_gguf(settings: Settings, entry, target: Path) -> None:
    """The version's merged model (merged/*), or a full fine-tune's model (full/*), fetched and
    written as TARGET/model.gguf.

    Converted here rather than stored by the registry: a full model is the size of the base
    model, asked for by few, and its conversion would hold the registry for minutes."""
    reply = _download_urls(settings, entry.ref, None)
    folder = entry.formats.get(adapter_layouts.FULL) or f"{adapter_layouts.MERGED_DIR}/"
    merged = [name for name in reply.urls if name.startswith(folder)]
    if not merged:
        err.print(f"[red]error:[/] {entry.ref} has no merged model: its training request did not "
                  "ask for one (merge: true)")
        raise typer.Exit(1)
    if importlib.util.find_spec("gguf") is None:
        err.print(f"[red]error:[/] --format {MERGED_GGUF} needs the gguf package (pip install gguf)")
        raise typer.Exit(1)
    from tunebus.shared.model_gguf import GgufError, model_to_gguf

    only_merged = reply.model_copy(update={
        "urls": {name.removeprefix(folder): reply.urls[name] for name in merged},
        "sha256": {name.removeprefix(folder): reply.sha256[name] for name in merged}})
    with tempfile.TemporaryDirectory(prefix="tunebus-merged-") as tmp:
        _download_verified(only_merged, Path(tmp))
        try:
            with console.status(f"writing {adapter_layouts.MERGED_GGUF_FILE} from the merged model"):
                model_to_gguf(Path(tmp), target / adapter_layouts.MERGED_GGUF_FILE, name=entry.ref)
        except (GgufError, ValueError) as e:
            err.print(f"[red]error:[/] {entry.ref}'s merged model cannot be written as GGUF: {e}")
            raise typer.Exit(1) from None


def _reply_or_exit(reply):
    if reply.error:
        err.print(f"[red]error:[/] {reply.error}")
        raise typer.Exit(1)
    return reply


def _download_urls(settings: Settings, ref: str, layout: str | None) -> DownloadUrls:
    """Presigned URLs for one layout, flat (or, with None, every file as named in the prefix)."""
    return _reply_or_exit(client.run(_ask(
        settings, subjects.REGISTRY_DOWNLOAD_URL, GetDownloadUrls(ref=ref, format=layout), DownloadUrls)))


def _download_converted(settings: Settings, entry, stored: str, wanted: str, target: Path) -> None:
    """The stored layout, converted here to the wanted one, with the run files beside it."""
    if any(importlib.util.find_spec(m) is None for m in ("numpy", "safetensors")):
        err.print(f"[red]error:[/] --format {wanted}: {entry.ref} is stored in {stored} only, and "
                  "converting it needs numpy and safetensors, which this installation lacks; "
                  f"download it with --format {stored}")
        raise typer.Exit(1) from None
    reply = _download_urls(settings, entry.ref, stored)
    adapter_files = {adapter_layouts.MLX_WEIGHTS, adapter_layouts.PEFT_WEIGHTS, adapter_layouts.MLX_CONFIG}
    with tempfile.TemporaryDirectory(prefix="tunebus-download-") as tmp:
        _download_verified(reply, Path(tmp))
        try:
            if wanted == adapter_layouts.PEFT:
                adapter_layouts.mlx_to_peft(Path(tmp), target, base_model=entry.base_model)
            else:
                layers = _base_config(settings, entry.base_model, entry.base_model_revision).get(
                    "num_hidden_layers")
                adapter_layouts.peft_to_mlx(Path(tmp), target, num_hidden_layers=layers)
        except ValueError as e:
            err.print(f"[red]error:[/] {entry.ref} cannot be converted to {wanted}: {e}")
            raise typer.Exit(1) from None
        for name in reply.urls:
            if name not in adapter_files:
                shutil.copyfile(Path(tmp) / name, target / name)


@adapters_app.command("promote")
def adapters_promote(
    ref: Annotated[str, typer.Argument(help="name:version (or name@latest) to put in production")],
    reason: Annotated[str, typer.Option(help="Why; kept in the alias log.")] = "",
) -> None:
    """Point `production` at a version."""
    from tunebus.contracts.registry import AliasReply, PromoteAdapter

    reply = client.run(_ask(Settings(), subjects.REGISTRY_PROMOTE, PromoteAdapter(ref=ref, reason=reason),
                            AliasReply))
    _print_alias_move(reply, "promoted")


@adapters_app.command("rollback")
def adapters_rollback(
    name: Annotated[str, typer.Argument(help="Adapter name.")],
    reason: Annotated[str, typer.Option(help="Why; kept in the alias log.")] = "",
) -> None:
    """Point `production` back at the version it held before."""
    from tunebus.contracts.registry import AliasReply, RollbackAdapter

    reply = client.run(_ask(Settings(), subjects.REGISTRY_ROLLBACK, RollbackAdapter(name=name, reason=reason),
                            AliasReply))
    _print_alias_move(reply, "rolled back")


@adapters_app.command("delete")
def adapters_delete(
    ref: Annotated[str, typer.Argument(help="name:version")],
    reason: Annotated[str, typer.Option(help="Why; kept with the entry.")] = "",
) -> None:
    """Soft-delete a version: it leaves listings and `latest`; its record and files stay."""
    from tunebus.contracts.registry import DeleteAdapter

    reply = client.run(_ask(Settings(), subjects.REGISTRY_DELETE, DeleteAdapter(ref=ref, reason=reason),
                            AdapterReply))
    if reply.error:
        err.print(f"[red]error:[/] {reply.error}")
        raise typer.Exit(1)
    console.print(f"{reply.entry.ref} deleted (soft: the record and the files stay)")


def _print_alias_move(reply, verb: str) -> None:
    if reply.error:
        err.print(f"[red]error:[/] {reply.error}")
        raise typer.Exit(1)
    moved = f"from {reply.name}:{reply.previous} " if reply.previous not in (None, reply.version) else ""
    console.print(f"{reply.alias} {verb} {moved}to {reply.name}:{reply.version}")


def _download_verified(reply: DownloadUrls, target: Path) -> None:
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), console=console) as progress:
        for name, url in reply.urls.items():
            path = target / name
            path.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            with urllib.request.urlopen(url) as response, path.open("wb") as f:
                task = progress.add_task(name, total=int(response.headers.get("Content-Length", 0)) or None)
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    f.write(chunk)
                    progress.advance(task, len(chunk))
            if digest.hexdigest() != reply.sha256[name]:
                err.print(f"[red]error:[/] {name}: sha256 {digest.hexdigest()} does not match "
                          f"the registered {reply.sha256[name]}")
                raise typer.Exit(1)


def _base_config(settings: Settings, base_model: str, revision: str | None) -> dict:
    """The base model's config.json, which the format conversion needs."""
    import json

    if base_model.startswith("s3://"):
        store = ObjectStore(settings.s3)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "config.json"
            store.get_file(base_model.rstrip("/") + "/config.json", path)
            return json.loads(path.read_text())
    local = Path(base_model).expanduser()
    if local.is_dir():
        return json.loads((local / "config.json").read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(base_model, "config.json", revision=revision)).read_text())


@model_app.command("tiny")
def model_tiny(
    out: Annotated[Path | None, typer.Option(help="Write the model here instead of uploading it.")] = None,
    seed: int = 0,
) -> None:
    """Generate the tiny test model (random weights, local tokenizer) and upload it to S3."""
    from tunebus.shared.devstack.tinymodel import generate_tiny_model

    if out is not None:
        generate_tiny_model(out, seed=seed)
        console.print(str(out))
        return
    settings = Settings()
    with tempfile.TemporaryDirectory() as tmp:
        console.print(_upload_tiny_model(ObjectStore(settings.s3), settings, Path(tmp) / "tiny", seed))


@model_app.command("gguf")
def model_gguf(
    model_dir: Annotated[Path, typer.Argument(help="A Hugging Face model directory (config.json, "
                                                    "*.safetensors, tokenizer).")],
    out: Annotated[Path, typer.Argument(help="The GGUF file to write.")],
) -> None:
    """Write a local Llama/Qwen2 model directory as one full llama.cpp GGUF (the base model for
    `llama-cli --lora adapter.gguf`, or Ollama's FROM)."""
    from tunebus.shared.model_gguf import GgufError, model_to_gguf

    try:
        with console.status(f"writing {out}"):
            model_to_gguf(model_dir, out)
    except (GgufError, ValueError) as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(1) from None
    console.print(f"{model_dir} → {out}")


# -- helpers


def _upload_tiny_model(store: ObjectStore, settings: Settings, workdir: Path, seed: int = 0) -> str:
    from tunebus.shared.devstack.tinymodel import generate_tiny_model

    generate_tiny_model(workdir, seed=seed)
    uri = TINY_MODEL_URI.format(bucket=settings.s3.models_bucket)
    store.put_dir(uri, workdir)
    return uri


def _upload_dataset(store: ObjectStore, settings: Settings, path: Path, job_id: str) -> str:
    uri = f"s3://{settings.s3.datasets_bucket}/uploads/{job_id}/{path.name}"
    store.put_file(uri, path)
    return uri


async def _submit(settings: Settings, request: TrainingRequested) -> None:
    async with client.connect(settings) as nc:
        await client.submit(nc, request)


async def _submit_and_watch(settings: Settings, request: TrainingRequested):
    async with client.connect(settings) as nc:
        event = await client.submit(nc, request)
        console.print(f"submitted job [bold]{request.job_id}[/]")
        return await watch_job(nc, request.job_id, console, answering=event.id)


async def _watch(settings: Settings, job_id: str):
    async with client.connect(settings) as nc:
        return await watch_job(nc, job_id, console)


async def _ask(settings, subject, query, reply):
    async with client.connect(settings) as nc:
        return await client.ask(nc, subject, query, reply)


async def _every_page(settings: Settings, query: ListAdapters) -> AdapterList:
    """Every page of registry.list, as one list (each reply stays small; the pages follow)."""
    found = AdapterList()
    async with client.connect(settings) as nc:
        while True:
            page = await client.ask(nc, subjects.REGISTRY_LIST, query, AdapterList)
            found.adapters += page.adapters
            if page.error or page.next_cursor is None:
                return found.model_copy(update={"error": page.error})
            query = query.model_copy(update={"cursor": page.next_cursor})


@contextmanager
def _dashboard(stack, port: int):
    """The dashboard as the stack's operator (it is the local developer's own stack), or None
    with port -1 or without the `ui` extra."""
    if port < 0:
        yield None
        return
    try:
        from tunebus.shared.dashboard import Dashboard

        dashboard = Dashboard(stack.as_role("operator"), port=port).start()
    except ImportError as e:
        err.print(f"[yellow]no dashboard: {e.name} is not installed (the `ui` extra)[/]")
        yield None
        return
    try:
        yield dashboard
    finally:
        dashboard.stop()


def _print_endpoints(stack, dashboard=None) -> None:
    s = stack.settings
    if dashboard is not None:
        console.print(f"  dashboard [bold]{dashboard.url}[/]  (as operator)")
    console.print(f"  NATS      {s.nats_url}")
    console.print(f"  S3        {s.s3.endpoint}  (buckets: {', '.join(ObjectStore(s.s3).all_buckets())})")
    console.print(f"  services  {', '.join(p.name for p in stack.processes if p.log_path)}"
                  f"  (logs: {stack.data_dir / 'logs'})")


def _print_exports(stack) -> None:
    """The shell settings of the submitter (a shell that submits and follows jobs) and the
    operator's credentials (promote, rollback, delete), the way the S3 ones are printed."""
    from tunebus.shared.devstack.stack import service_env

    for key, value in service_env(stack.as_role("submitter")).items():
        if key != "TUNEBUS_LOG_FORMAT":
            console.print(f"  export {key}={value}", highlight=False, soft_wrap=True)
    operator = service_env(stack.as_role("operator"))
    console.print("\n  As the operator (promote / rollback / delete, upload base models), instead:")
    for key in ("TUNEBUS_NATS__USER", "TUNEBUS_NATS__PASSWORD", "TUNEBUS_S3__ACCESS_KEY",
                "TUNEBUS_S3__SECRET_KEY"):
        if key in operator:
            console.print(f"  export {key}={operator[key]}", highlight=False, soft_wrap=True)


def _print_registered(entry, urls: DownloadUrls) -> None:
    console.print(f"\n[bold green]registered {entry.ref}[/]  ({entry.adapter_uri})")
    ev = entry.evaluation
    if ev and ev.before and ev.after:
        table = Table("metric", "base model", "base + adapter", "change")
        for metric in ("loss", "perplexity"):
            before, after = getattr(ev.before, metric), getattr(ev.after, metric)
            table.add_row(metric, f"{before:.3f}", f"{after:.3f}", f"{ev.relative_change[metric]:+.1%}")
        console.print(table)
    console.print(f"download links (valid until {urls.expires_at:%Y-%m-%d %H:%M} UTC):")
    for name, url in urls.urls.items():
        console.print(f"  {name}: {url}", soft_wrap=True, highlight=False)


def _wait_for_interrupt(stack, supervisor=None) -> None:
    """Until Ctrl-C or SIGTERM. With a supervisor, a dead service is restarted; without one
    (the demo), or when nats-server or S3 dies, the stack stops."""
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    try:
        while not stopping:
            time.sleep(0.5)
            if supervisor is not None:
                for name in supervisor.check():
                    err.print(f"[yellow]{name} exited; restarted it (restart "
                              f"{supervisor.restarts[name]}); see {stack.data_dir / 'logs'}[/]")
                if dead := supervisor.dead_servers():
                    err.print(f"[red]{', '.join(dead)} exited; stopping the stack[/]")
                    raise typer.Exit(1)
            elif dead := stack.dead_services():
                err.print(f"[red]service(s) exited: {', '.join(dead)}; see {stack.data_dir / 'logs'}[/]")
                raise typer.Exit(1)
    except KeyboardInterrupt:
        pass
    console.print("stopping…")
