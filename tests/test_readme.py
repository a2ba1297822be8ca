"""The README's code runs exactly as written, and its YAML block is the config file it names."""

from __future__ import annotations

import re
import runpy
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.MULTILINE | re.DOTALL)


def ours(warning: warnings.WarningMessage) -> bool:
    """A warning raised by lightning_forget (Lightning's rank_zero_warn points at its caller's caller)."""
    text = str(warning.message)
    return "lightning_forget" in warning.filename or re.match(r"^[A-Z]\w+: ", text) is not None and any(
        name in text.split(":")[0]
        for name in ("ContinualMetrics", "ExperienceReplay", "DarkExperienceReplay", "LiNeS", "LRRewarming",
                     "InfiniteLRSchedule", "ContinualEvaluation", "ContinualClassifier", "SplitMNIST")
    )


def test_readme_has_python_and_yaml_blocks() -> None:
    assert len(code_blocks("python")) >= 1 and len(code_blocks("yaml")) == 1


@pytest.mark.parametrize("index", range(len(code_blocks("python"))))
def test_readme_python_block_runs_as_written(
    index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(code_blocks("python")[index])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert [str(w.message) for w in caught if ours(w)] == []
    if "ContinualMetrics" in code_blocks("python")[index]:
        # the accuracy table, all five rows filled, and where the files went
        assert "Accuracy matrix after task 4" in out
        assert re.search(r"│ task 4 +│ \d\.\d{4} │ \d\.\d{4} │ \d\.\d{4} │ \d\.\d{4} │ \d\.\d{4} │", out), out[-3000:]
        folder = tmp_path / "lightning_logs" / "version_0"
        assert f"ContinualMetrics: results written to {folder.resolve()}" in out
        assert {"metrics.json", "accuracy_matrix.csv", "accuracy_matrix.png"} <= {p.name for p in folder.iterdir()}


def test_readme_yaml_block_is_the_quickstart_config() -> None:
    assert code_blocks("yaml")[0] == (ROOT / "configs" / "quickstart.yaml").read_text()
