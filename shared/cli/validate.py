"""`tunebus validate PATH`: check a dataset the way the dataset-validator does.

A local file or directory is checked offline, in this process, with the validator's own code
(no stack needed). An s3:// URI is checked by the running dataset-validator over the bus.
Exit status: 0 valid, 1 not valid, 2 usage error.

`tunebus convert-markdown DOC.md` extracts instruction/response pairs from a document.

A local check imports only what validation needs (not the contracts, the bus or the object
store), so that it starts in a fraction of a second: `tunebus validate` is run from the entry
point (`tunebus.shared.cli.main`) without the rest of the command line.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.markup import escape

console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

# The contracts' Method, DatasetFormat and OnInvalid, spelled out so that a local check need not
# load the contracts (tests/unit/test_validate_cli.py holds them equal).
Method = Literal["sft", "dpo", "orpo", "cpo", "grpo"]
DatasetFormat = Literal[
    "auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text", "preference", "grpo"
]
OnInvalid = Literal["reject", "drop"]

LIMITS_HELP = "\n".join([
    "Limits: the dataset-validator's settings, read from the environment here too (default):",
    "TUNEBUS_VALIDATOR__MAX_BYTES (1073741824: 1 GiB decompressed, all files together)",
    "TUNEBUS_VALIDATOR__MAX_ROWS (10000000)",
    "TUNEBUS_VALIDATOR__MAX_LINE_BYTES (1048576: 1 MiB, one JSONL line or array element)",
    "TUNEBUS_VALIDATOR__MAX_DEPTH (32: JSON nesting of one row)",
    "TUNEBUS_VALIDATOR__MIN_ROWS (1: fewest rows left, after --on-invalid drop too)",
    "TUNEBUS_VALIDATOR__DEDUPE (true), __MIN_CHARS (0), __MAX_CHARS (none)",
])


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root `tunebus` app."""
    app.command("validate", epilog=LIMITS_HELP)(validate)
    app.command("convert-markdown")(convert_markdown)


def validate_app() -> typer.Typer:
    """`tunebus validate` alone, as the entry point runs it."""
    app = typer.Typer(add_completion=False)
    app.command("validate", epilog=LIMITS_HELP)(validate)
    return app


def validate(
    path: Annotated[str, typer.Argument(
        help="A JSONL, JSON (gzip too) or Parquet file, a directory holding train/valid/test "
             "files, or an s3:// URI (checked by the running dataset-validator).")],
    method: Annotated[Method | None, typer.Option(
        help="Check that this training method can use the data (default: any method).")] = None,
    format: Annotated[DatasetFormat, typer.Option(
        "--format", help="The format (default: detected).")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    out: Annotated[Path | None, typer.Option(
        help="Write the canonical train/valid(/test) JSONL files into this directory.")] = None,
    base_model: Annotated[str | None, typer.Option(
        help="Count tokens with this model's tokenizer (a local directory, s3:// prefix or "
             "hub id); otherwise they are estimated.")] = None,
    max_seq_length: Annotated[int | None, typer.Option(
        help="Warn about rows longer than this many tokens.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the train/valid split.")] = 0,
    valid_fraction: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Share of the rows drawn for validation.")] = 0.1,
    max_errors: Annotated[int, typer.Option(min=1, help="Errors and warnings listed.")] = 20,
    on_invalid: Annotated[OnInvalid, typer.Option(
        help="reject: any bad row makes the dataset invalid; drop: bad rows are left out "
             "(and counted), as a request's dataset.on_invalid.")] = "reject",
    timeout: Annotated[float, typer.Option(
        help="Seconds to wait for the validator (s3://).")] = 120.0,
) -> None:
    """Check a dataset: every row, its format, and whether a training method can use it."""
    if path.startswith("s3://"):
        if out is not None:
            err.print("[red]error:[/] --out needs a local dataset")
            raise typer.Exit(2)
        from tunebus.contracts.dataset import ValidateDataset

        report = _ask_validator(ValidateDataset(
            uri=path, format=format, method=method, base_model=base_model,
            max_seq_length=max_seq_length, max_errors=max_errors, on_invalid=on_invalid),
            timeout).model_dump(mode="json")
    else:
        report = _check_locally(Path(path), format, method, out, base_model, max_seq_length,
                                seed, valid_fraction, max_errors, on_invalid,
                                show_progress=not as_json)
    if as_json:
        typer.echo(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        _print(report)
    raise typer.Exit(0 if report["valid"] else 1)


def convert_markdown(
    document: Annotated[Path, typer.Argument(help="A markdown file.")],
    out: Annotated[Path | None, typer.Option(
        help="Write the pairs here as JSONL (default: standard output).")] = None,
    sections: Annotated[bool, typer.Option(
        help="Also turn every section into a pair, with a made-up instruction.")] = False,
) -> None:
    """Extract instruction/response pairs (alpaca JSONL) from a markdown document: question
    headings and Q:/A: lines as they are, and with --sections every section under a made-up
    instruction. Nothing is paraphrased or generated; each row says where it came from."""
    from tunebus.services.dataset_validator.markdown import markdown_pairs

    if not document.is_file():
        err.print(f"[red]error:[/] {escape(str(document))} is not a file")
        raise typer.Exit(2)
    pairs = markdown_pairs(document.read_text(encoding="utf-8-sig"), sections=sections)
    lines = "".join(json.dumps(p.row(document.name), ensure_ascii=False) + "\n" for p in pairs)
    if out is not None:
        out.write_text(lines, encoding="utf-8")
    else:
        typer.echo(lines, nl=False)
    by_rule = Counter(p.rule for p in pairs)
    err.print(f"{len(pairs)} pairs from {escape(document.name)}: "
              f"{by_rule['question_heading']} from question headings, {by_rule['qa']} Q/A"
              + (f", {by_rule['section']} sections (made-up instructions)" if sections else ""))
    if not pairs:
        err.print("no pairs: the document has no question headings or Q:/A: lines"
                  + ("" if sections else " (--sections would use its sections)"))
        raise typer.Exit(1)


def _check_locally(path: Path, format: str, method: str | None, out: Path | None,
                   base_model: str | None, max_seq_length: int | None, seed: int,
                   valid_fraction: float, max_errors: int, on_invalid: str,
                   show_progress: bool) -> dict[str, Any]:
    """The report, as the contracts' DatasetReport fields."""
    from tunebus.services.dataset_validator.layout import DatasetUnavailable, split_files
    from tunebus.services.dataset_validator.validation import Source

    if path.is_dir():
        try:
            files = [(path / name, split) for name, split in
                     split_files(str(path), [p.name for p in path.iterdir() if p.is_file()])]
        except DatasetUnavailable as e:
            err.print(f"[red]error:[/] {escape(e.reason)}")
            raise typer.Exit(2) from None
    elif path.is_file():
        files = [(path, "auto")]
    else:
        err.print(f"[red]error:[/] {escape(str(path))} is not a file or a directory")
        raise typer.Exit(2)
    tokens = _tokenizer(base_model, quiet=not show_progress) if base_model else None
    with ExitStack() as stack:
        sinks = {}
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            splits = ["train", "valid"] + (["test"] if any(s == "test" for _, s in files) else [])
            sinks = {f"{s}_sink": stack.enter_context((out / f"{s}.jsonl").open("wb"))
                     for s in splits}
        status = stack.enter_context(err.status("validating…")) if show_progress else None
        started = time.monotonic()

        def progress(rows: int, nbytes: int) -> None:
            if status is not None and time.monotonic() - started > 1:
                status.update(f"validating… {rows:,} rows, {nbytes / 1e6:,.0f} MB")

        sources = (Source(str(p), stack.enter_context(p.open("rb")), split) for p, split in files)
        report = validation_policy().validate(
            sources, format=format, method=method, seed=seed, valid_fraction=valid_fraction,
            tokens=tokens, max_seq_length=max_seq_length, max_errors=max_errors,
            on_invalid=on_invalid, progress=progress, **sinks)
    if out is not None and not report.valid:
        for name in ("train", "valid", "test"):  # half-written output is not output
            (out / f"{name}.jsonl").unlink(missing_ok=True)
    return report.contract_fields(max_errors)


def validation_policy():
    """The dataset-validator's policy under this environment's TUNEBUS_VALIDATOR__* settings.
    Without any, it is `Policy()`, the settings' defaults, and the settings (pydantic) are not
    loaded (tests/unit/test_validate_cli.py holds the defaults equal)."""
    from tunebus.services.dataset_validator.validation import Policy

    if not any(name.upper().startswith("TUNEBUS_VALIDATOR__") for name in os.environ):
        return Policy()
    from tunebus.services.dataset_validator.config import ValidatorSettings

    return ValidatorSettings().policy()


def _tokenizer(base_model: str, quiet: bool):
    from tunebus.services.dataset_validator.pipeline import token_counter
    from tunebus.shared.objectstore import ObjectStore
    from tunebus.shared.settings import Settings

    settings = Settings()
    # Offline, on the user's own machine: a base model may be any local directory.
    tokens, about = token_counter(ObjectStore(settings.s3), base_model, None, settings.work_dir,
                                  models_root=Path("/"))
    if not quiet:
        err.print(escape(about))
    return tokens


def _ask_validator(query, timeout: float):
    from tunebus.contracts import subjects
    from tunebus.contracts.dataset import DatasetReport
    from tunebus.shared.cli import client
    from tunebus.shared.settings import Settings

    async def ask() -> DatasetReport:
        async with client.connect(Settings()) as nc:
            return await client.ask(nc, subjects.VALIDATOR_VALIDATE, query, DatasetReport,
                                    timeout=timeout)

    try:
        return client.run(ask())
    except Exception as e:  # no NATS, no validator: a usage problem, not a verdict
        err.print(f"[red]error:[/] no answer from the dataset-validator: {escape(repr(e))}")
        raise typer.Exit(2) from None


def _print(report: dict[str, Any]) -> None:
    """A DatasetReport's fields, for people."""
    if report["valid"]:
        rows = (f"{report['rows']:,} rows (train {report['train_rows']:,}, "
                f"valid {report['valid_rows']:,}")
        rows += f", test {report['test_rows']:,})" if report["test_rows"] else ")"
        console.print(f"[bold green]valid[/]: {report['format']} format, {rows}; "
                      f"suits {', '.join(report['methods'])}")
    else:
        console.print(f"[bold red]not valid[/]: {escape(report['reason'] or '')}", soft_wrap=True)
    if report["dropped"]:
        reasons = ", ".join(f"{k} {n:,}" for k, n in report["dropped_reasons"].items())
        console.print(f"dropped {report['dropped']:,} rows ({reasons})")
    if report.get("invalid_rows"):
        reasons = ", ".join(f"{k} {n:,}" for k, n in report["invalid_reasons"].items())
        console.print(f"dropped {report['invalid_rows']:,} invalid rows ({reasons})")
    if report["token_stats"] and report["valid"]:
        stats = ", ".join(f"{k} {v:g}" for k, v in report["token_stats"].items())
        console.print(f"tokens per row ({escape(report['token_counter'] or '')}): {stats}")
    if report["error_count"]:
        kinds = ", ".join(f"{k} {n:,}" for k, n in report["error_counts"].items())
        console.print(f"[red]{report['error_count']:,} error(s)[/] ({kinds}):")
        for e in report["errors"]:
            place = f"line {e['line']}" if e["line"] is not None else \
                f"index {e['index']}" if e["index"] is not None else "dataset"
            file = f"{e['file']} " if e["file"] else ""
            field = f"{e['field']}: " if e["field"] else ""
            console.print(f"  {escape(file + place)}: {escape(field + e['message'])}",
                          soft_wrap=True, highlight=False)
    if report["warning_count"]:
        console.print(f"[yellow]{report['warning_count']:,} warning(s)[/]:")
        for w in report["warnings"]:
            console.print(f"  {escape(w)}", soft_wrap=True, highlight=False)
