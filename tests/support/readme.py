"""The README, read as tests read it: a section under a heading, and the fenced code blocks in it."""

from __future__ import annotations

import re

from support.constants import ROOT

README = ROOT / "README.md"


def section(title: str) -> str:
    """The README's text under the heading `title`, up to the next heading of its level or higher."""
    lines = README.read_text(encoding="utf-8").splitlines(keepends=True)
    level = len(title.split(" ", 1)[0])
    found, fenced = [], False
    for line in lines[lines.index(f"{title}\n") + 1 :]:
        fenced ^= line.startswith("```")  # a "# comment" inside a code block is no heading
        if not fenced and re.match(rf"#{{1,{level}}} ", line):
            break
        found.append(line)
    return "".join(found)


def blocks(text: str, language: str) -> list[str]:
    """The fenced code blocks of `language` in `text`."""
    return re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL)
