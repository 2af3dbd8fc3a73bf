"""`tunebus convert-markdown`: pairs a document really holds, each saying where it came from."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from tunebus.services.dataset_validator.markdown import markdown_pairs
from tunebus.shared.cli import app

HANDBOOK = Path(__file__).parent.parent / "fixtures" / "datasets" / "handbook.md"


def test_question_headings_and_qa_lines_become_pairs():
    pairs = markdown_pairs(HANDBOOK.read_text())
    assert [(p.instruction, p.line, p.rule) for p in pairs] == [
        ("What is an adapter?", 5, "question_heading"),
        ("Does it need a GPU?", 24, "qa"),
        ("Which formats are accepted?", 27, "qa"),
    ]
    # A question heading's answer runs to the next heading of its level, subsections included.
    assert pairs[0].response == ("A small set of weights trained on top of a base model.\n\n"
                                 "### Sizes\n\nUsually a few megabytes.")
    assert pairs[2].response == ("Alpaca, ShareGPT, OpenAI chat and more.\n"
                                 "They are detected by their fields.")


def test_lines_in_code_blocks_are_neither_headings_nor_questions():
    pairs = markdown_pairs("# Code\n\n```\n# What is this?\nQ: no\nA: no\n```\n")
    assert pairs == []


def test_sections_are_only_used_when_asked_and_say_their_instruction_is_made_up():
    pairs = markdown_pairs(HANDBOOK.read_text(), sections=True)
    sections = [p for p in pairs if p.rule == "section"]
    assert [p.instruction for p in sections] == [
        "What does the document say about Tunebus handbook?",
        "What does the document say about Tunebus handbook > What is an adapter? > Sizes?",
        "What does the document say about Tunebus handbook > Installing?",
        "What does the document say about Tunebus handbook > FAQ?",
    ]
    assert sections[0].response == "Tunebus fine-tunes adapters."  # its own text only


def test_the_command_writes_alpaca_rows_the_validator_accepts(tmp_path):
    out = tmp_path / "pairs.jsonl"
    runner = CliRunner()
    result = runner.invoke(app, ["convert-markdown", str(HANDBOOK), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[1] == {"instruction": "Does it need a GPU?", "input": "",
                       "output": "No, MLX runs on the CPU too.", "source": "handbook.md:24 (qa)"}
    assert runner.invoke(app, ["validate", str(out), "--method", "sft"]).exit_code == 0


def test_a_document_without_pairs_exits_1(tmp_path):
    doc = tmp_path / "notes.md"
    doc.write_text("# Notes\n\nJust prose.\n")
    result = CliRunner().invoke(app, ["convert-markdown", str(doc)])
    assert result.exit_code == 1 and "--sections" in result.output
