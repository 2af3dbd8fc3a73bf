"""The evaluation report: JSON with every probe side by side, and a self-contained HTML page."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser
from pathlib import Path

from tunebus.contracts import TrainingCompleted
from tunebus.services.evaluator.backend import Answer, Measurement
from tunebus.services.evaluator.compare import compare
from tunebus.services.evaluator.examples import ProbeCase
from tunebus.services.evaluator.report import render_html, report_document

EXAMPLE = Path(__file__).parents[2] / "contracts" / "examples" / "v1" / "tunebus.training.completed.v1.json"
CURVE = [{"step": 10, "train_loss": 3.0, "val_loss": None}, {"step": 20, "train_loss": 1.5, "val_loss": 1.8}]


def document():
    training = TrainingCompleted.model_validate(json.loads(EXAMPLE.read_text())["data"])
    cases = [ProbeCase([{"role": "user", "content": "Who wrote the <42> document?"}], "request",
                       expected="Ada Quill", reference="Ada Quill")]
    before = Measurement(3.0, math.exp(3.0), 0.1, 50, 4, [Answer("<script>alert(1)</script>", 0.02, 7)])
    after = Measurement(1.0, math.exp(1.0), 0.8, 50, 4, [Answer("Ada Quill wrote it.", 0.03, 5)])
    result = compare(training.job_id, "support-bot", before, after, cases, backend="mlx", max_tokens=32)
    return report_document(result.summary, result.probes, training, CURVE)


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.links += [v for k, v in attrs if k in ("src", "href") and v]


def test_the_json_report_shows_each_probe_answered_by_both_models():
    doc = document()
    [probe] = doc["probes"]
    assert probe["base"]["contains"] == 0.0 and probe["adapter"]["contains"] == 1.0
    assert probe["adapter"]["answer"] == "Ada Quill wrote it." and not probe["regressed"]
    assert doc["summary"]["after"]["token_accuracy"] == 0.8
    assert doc["loss_curve"] == CURVE and doc["adapter"]["lora"]["rank"] == 8


def test_the_html_page_is_self_contained_with_charts_and_escaped_answers():
    page = render_html(document())
    parser = Tags()
    parser.feed(page)
    assert "script" not in parser.tags and parser.links == []  # no JS, nothing fetched
    assert parser.tags.count("svg") >= 2  # before/after bars and the loss curve
    assert "polyline" in parser.tags  # the loss curve is drawn
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Who wrote the &lt;42&gt; document?" in page and "Ada Quill wrote it." in page
    assert "No regression." in page


def test_the_page_says_which_metrics_regressed():
    doc = document()
    doc["summary"]["regressed"] = True
    doc["summary"]["regressions"] = ["token_accuracy"]
    assert "Regression: token_accuracy" in render_html(doc)
