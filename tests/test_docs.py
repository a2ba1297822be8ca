"""The documentation site builds with ``mkdocs build --strict`` and its API reference is complete.

The build is what ``make docs`` runs: a docstring that mkdocstrings cannot render (a malformed
Google-style section, an ``Args:`` entry naming no parameter) is a warning, and ``--strict``
turns it into a failure here. Every name a public package exports must have its entry in the
generated reference. Nothing is fetched from the network.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The packages whose `__all__` the reference must cover (the package page lists the exports).
PACKAGES = [
    "lightning_forget",
    "lightning_forget.callbacks",
    "lightning_forget.datamodules",
    "lightning_forget.metrics",
    "lightning_forget.modules",
    "lightning_forget.merging",
    "lightning_forget.nn",
]


def _docs_tools_missing() -> str | None:
    for module in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python", "mkdocs_gen_files"):
        try:
            importlib.import_module(module)
        except ImportError:
            return module
    return None


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = _docs_tools_missing()
    if missing is not None:
        pytest.skip(f"the docs tools are not installed ({missing} is not importable); `pip install -e '.[docs]'`")
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, DISABLE_MKDOCS_2_WARNING="true", NO_MKDOCS_2_WARNING="true")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    return out


def _page(site: Path, package: str) -> Path:
    parts = package.split(".")[1:]
    return site.joinpath("reference", *parts, "index.html")


def _anchors(html: str) -> set[str]:
    return set(re.findall(r'id="([^"]+)"', html))


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_is_in_the_api_reference(site: Path, package: str) -> None:
    module = importlib.import_module(package)
    exported = [name for name in module.__all__ if not name.startswith("_")]
    assert exported, f"{package} exports nothing"
    page = _page(site, package)
    assert page.is_file(), f"no API reference page for {package} at {page}"
    anchors = _anchors(page.read_text(encoding="utf-8"))
    missing = [name for name in exported if f"{package}.{name}" not in anchors]
    assert not missing, f"{package}.__all__ names missing from {page.relative_to(site)}: {missing}"


def test_every_public_module_has_a_page(site: Path) -> None:
    package = ROOT / "lightning_forget"
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).with_suffix("").parts
        if any(part.startswith("_") and part != "__init__" for part in parts):
            continue
        if parts[-1] == "__init__":
            page = site.joinpath("reference", *parts[:-1], "index.html")
        else:
            page = site.joinpath("reference", *parts[:-1], parts[-1], "index.html")
        assert page.is_file(), f"{path.relative_to(ROOT)} has no API reference page ({page.relative_to(site)})"


def test_docstrings_render_without_sphinx_markup(site: Path) -> None:
    # Sphinx roles are rewritten to code by docs/_tools/griffe_sphinx_roles.py; none may show
    # verbatim on a page.
    leftovers = []
    for page in site.joinpath("reference").rglob("*.html"):
        html = page.read_text(encoding="utf-8")
        for role in (":class:", ":func:", ":meth:", ":mod:", ":attr:", ":data:", ".. math::"):
            if role in html:
                leftovers.append(f"{page.relative_to(site)}: {role}")
    assert not leftovers, leftovers


@pytest.mark.parametrize("page", ["index", "getting-started", "methods", "fidelity", "outputs", "results", "changelog", "sharding"])
def test_nav_pages_are_built(site: Path, page: str) -> None:
    path = site / "index.html" if page == "index" else site / page / "index.html"
    assert path.is_file(), f"{page} was not built"


_LOGGED = [
    re.compile(r'\.log\(\s*f?"([^"]+)"'),                                   # self.log("key", ...)
    re.compile(r'metrics(?:\[\s*|\s*=\s*\{\s*|\.update\(\{\s*)f?"([^"]+)"'),  # dicts for log_metrics
    re.compile(r'SCHEDULER_NAME\s*=\s*"([^"]+)"'),                          # LearningRateMonitor keys
]
_DICTS = re.compile(r"(?:log_dict\(|metrics\s*=)\s*\{(.*?)\}", re.S)  # every key of a dict literal
_DICT_KEY = re.compile(r'f?"([^"]+)"\s*:')


def _logged_keys() -> set[str]:
    """Every metric key the library logs, as its source spells it (f-string fields kept)."""
    keys: set[str] = set()
    for path in (ROOT / "lightning_forget").rglob("*.py"):
        source = path.read_text(encoding="utf-8")
        for pattern in _LOGGED:
            keys.update(match.group(1) for match in pattern.finditer(source))
        for body in _DICTS.finditer(source):
            keys.update(_DICT_KEY.findall(body.group(1)))
    from lightning_forget.callbacks.continual_metrics import LOGGED_KEYS

    keys.update(LOGGED_KEYS)
    return keys


def test_outputs_page_lists_every_logged_key() -> None:
    # The "Logged keys" section must name every key the code logs; an f-string field such as
    # `{t}` or `{stage}` matches whatever the page writes in its place (`{t}`, `val`).
    text = (ROOT / "docs" / "outputs.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"`([^`\s]+)`", text))
    keys = _logged_keys()
    assert {"cl/acc_avg", "eval/acc/task_{t}", "replay/buffer_size", "derpp/mse", "lines/alpha"} <= keys
    missing = []
    for key in sorted(keys):
        pattern = re.compile("^" + "".join(".+?" if part.startswith("{") else re.escape(part) for part in re.split(r"(\{[^}]*\})", key)) + "$")
        if not any(pattern.match(name) for name in documented):
            missing.append(key)
    assert not missing, f"docs/outputs.md does not list the logged keys {missing}"


def test_no_references_to_files_outside_the_repository() -> None:
    # Docstrings and comments teach the method and cite the paper; notes on which sources were
    # read live in docs/fidelity.md, and files that are not in the repository are not cited.
    outside = re.compile("|".join(re.escape(word) for word in ["METHODS" + ".md", "METHODS" + " §", "DESIGN" + ".md", "Mattdl" + "/"]))
    hits = []
    for folder in ("lightning_forget", "tests", "benchmarks", "examples", "configs"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix not in {".py", ".yaml", ".yml", ".md"} or not path.is_file():
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if outside.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, "\n".join(hits)
