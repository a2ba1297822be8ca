"""Griffe extension for the API reference: Sphinx roles in docstrings become Markdown code.

The docstrings are Google style and are read both by ``help()`` and by mkdocstrings. Some name
other objects with Sphinx roles (``:class:`~lightning_forget.callbacks.LiNeS```,
``:func:`lightning_forget.reporting.results_dir```), which Markdown would print verbatim. This
extension rewrites them to inline code, as Sphinx shows them: ``~`` keeps the last dotted part,
otherwise the full path. ``.. math::`` blocks become fenced code blocks, so the formula keeps its
layout instead of being reflowed into the paragraph, and a paragraph ending in reST's literal
marker ``::`` ends in one colon (the indented block after it is already Markdown code).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|obj|exc|const|ref|term):`(~?)([^`]+)`")
_MATH = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*\n")
_LITERAL = re.compile(r"(?<=\S)::[ \t]*$", re.MULTILINE)
# A line that is one word and the marker (``Example::``) would read as a Google section header
# with one colon, so it becomes an emphasised label instead.
_LABEL = re.compile(r"^(?P<indent>[ \t]*)(?P<word>\w+)::[ \t]*$", re.MULTILINE)


def _role(match: re.Match[str]) -> str:
    tilde, target = match.group(1), match.group(2).strip()
    if "<" in target and target.endswith(">"):  # :class:`text <target>`
        target = target.split("<", 1)[0].strip()
    elif tilde:
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def _math_blocks(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        match = _MATH.match(line + "\n")
        if not match:
            out.append(line)
            i += 1
            continue
        indent = match.group("indent")
        i += 1
        block: list[str] = []
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            block.append(lines[i])
            i += 1
        while block and not block[-1].strip():
            block.pop()
        body = [b for b in block if b.strip()]
        depth = min((len(b) - len(b.lstrip()) for b in body), default=0)
        out.append(f"{indent}```text")
        out.extend(f"{indent}{b[depth:]}" if b.strip() else "" for b in block)
        out.append(f"{indent}```")
        out.append("")
    return "\n".join(out)


def convert(text: str) -> str:
    """The docstring ``text`` with Sphinx roles and math blocks turned into Markdown."""
    text = _math_blocks(_ROLE.sub(_role, text))
    text = _LABEL.sub(lambda m: f"{m.group('indent')}*{m.group('word')}:*", text)
    return _LITERAL.sub(":", text)


class SphinxRolesToMarkdown(griffe.Extension):
    """Rewrite each docstring once, when griffe creates its object."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
