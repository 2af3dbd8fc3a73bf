"""From a markdown document to instruction/response pairs (alpaca rows), each saying where in
the document it came from and by which rule.

It extracts only what the document itself holds; it does not summarise, paraphrase or
generate, so a document without questions in it gives few pairs:

  * question headings: a heading that ends in "?", with the text under it (up to the next
    heading of the same or a higher level) as the response;
  * Q/A lines: a line starting "Q:" or "Question:" (bold allowed), with what follows an "A:" or
    "Answer:" line as the response, up to the next question or heading;
  * sections (only when asked for): every other heading with text of its own under it, with the
    made-up instruction "What does the document say about <heading path>?"; the rule name says
    the instruction was not in the document.

The document is parsed with markdown-it (as rich renders markdown), so "#" lines inside code
blocks are not headings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from markdown_it import MarkdownIt

_QUESTION = re.compile(r"^\s*(?:\*\*|__)?(?:Q|Question)\s*[:.)]\s*(?:\*\*|__)?\s*(.*)$", re.I)
_ANSWER = re.compile(r"^\s*(?:\*\*|__)?(?:A|Answer)\s*[:.)]\s*(?:\*\*|__)?\s*(.*)$", re.I)


@dataclass(frozen=True)
class Pair:
    instruction: str
    response: str
    line: int  # 1-based, where the instruction is in the document
    rule: str  # question_heading, qa, or section (a made-up instruction)

    def row(self, source: str) -> dict[str, str]:
        return {"instruction": self.instruction, "input": "", "output": self.response,
                "source": f"{source}:{self.line} ({self.rule})"}


@dataclass(frozen=True)
class _Heading:
    level: int
    title: str
    line: int  # 0-based line of the heading
    body: int  # 0-based line where its text starts


def markdown_pairs(text: str, *, sections: bool = False) -> list[Pair]:
    lines = text.splitlines()
    tokens = MarkdownIt().parse(text)
    headings = [
        _Heading(int(tok.tag[1:]), tokens[i + 1].content.strip(), tok.map[0], tok.map[1])
        for i, tok in enumerate(tokens) if tok.type == "heading_open"
    ]
    pairs = []
    for j, heading in enumerate(headings):
        later = headings[j + 1:]
        if heading.title.endswith("?"):
            end = next((h.line for h in later if h.level <= heading.level), len(lines))
            rule, instruction = "question_heading", heading.title
        elif sections:
            end = later[0].line if later else len(lines)
            path = " > ".join(h.title for h in _enclosing(headings[:j + 1]))
            rule, instruction = "section", f"What does the document say about {path}?"
        else:
            continue
        response = "\n".join(lines[heading.body:end]).strip()
        if response:
            pairs.append(Pair(instruction, response, heading.line + 1, rule))
    code = {n for tok in tokens if tok.type in ("fence", "code_block") and tok.map
            for n in range(*tok.map)}
    pairs += _qa_pairs(lines, {h.line for h in headings}, code)
    return sorted(pairs, key=lambda p: p.line)


def _enclosing(upto: list[_Heading]) -> list[_Heading]:
    """The last heading of `upto` and those enclosing it, outermost first."""
    chain: list[_Heading] = []
    for heading in upto:
        while chain and chain[-1].level >= heading.level:
            chain.pop()
        chain.append(heading)
    return chain


def _qa_pairs(lines: list[str], heading_lines: set[int], code_lines: set[int]) -> list[Pair]:
    pairs = []
    question: list[str] | None = None
    answer: list[str] | None = None
    start = 0

    def close() -> None:
        if question and answer and "\n".join(answer).strip():
            pairs.append(Pair("\n".join(question).strip(), "\n".join(answer).strip(), start + 1,
                              "qa"))

    for n, line in enumerate(lines):
        text = n not in code_lines
        if n in heading_lines or (text and (m := _QUESTION.match(line))):
            close()
            question = answer = None
            if n not in heading_lines:
                question, start = [m.group(1)], n
        elif question is not None and answer is None and text and (m := _ANSWER.match(line)):
            answer = [m.group(1)]
        elif answer is not None:
            answer.append(line)
        elif question is not None:
            question.append(line)
    close()
    return pairs
