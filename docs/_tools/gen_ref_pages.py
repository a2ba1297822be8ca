"""Generate the API reference: one page per public module of lightning_forget (mkdocs-gen-files).

Run by mkdocs (``plugins: gen-files`` in mkdocs.yml), so a new module gets its page without
editing anything. A module is public when no part of its dotted name starts with ``_``. Package
pages show what the package exports (its ``__all__``); module pages show what is defined there.
"""

from __future__ import annotations

from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "lightning_forget"

modules: list[tuple[str, Path]] = []
for path in sorted(PACKAGE.rglob("*.py")):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if any(part.startswith("_") for part in parts) or "__pycache__" in path.parts:
        continue
    name = ".".join(parts)
    if path.name == "__init__.py":
        page = Path("reference", *parts[1:], "index.md")
    else:
        page = Path("reference", *parts[1:]).with_suffix(".md")
    modules.append((name, page))

index = ["# API reference", "", "Generated from the docstrings (mkdocstrings). One page per public module:", ""]
for name, doc_path in modules:
    depth = name.count(".")
    page = doc_path.relative_to("reference").as_posix()
    index.append(f"{'    ' * depth}- [`{name}`]({page})")
    with mkdocs_gen_files.open(doc_path, "w") as handle:
        handle.write(f"# `{name}`\n\n::: {name}\n")
    mkdocs_gen_files.set_edit_path(doc_path, Path("..") / Path(*name.split(".")).with_suffix(".py"))

# the package's own page lives at reference/index.md; the list goes above it
top = Path("reference", "index.md")
with mkdocs_gen_files.open(top, "r") as handle:
    body = handle.read()
with mkdocs_gen_files.open(top, "w") as handle:
    handle.write("\n".join(index) + "\n\n" + body.replace("# `lightning_forget`", "## `lightning_forget`", 1))

with mkdocs_gen_files.open("changelog.md", "w") as handle:
    handle.write((ROOT / "CHANGELOG.md").read_text(encoding="utf-8"))
