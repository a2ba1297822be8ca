"""The bad-input tally (``benchmarks/bad_inputs.py``) as a test: every case must be a clear error.

The script gives each public class one wrong argument at a time and sorts what happens into
clear error / unclear error / raw crash / silently accepted. The quick mode (constructor and
function calls, no fits) runs here, so a new argument without a check, or a message that stops
naming its argument, fails the suite; the full tally with fits is the benchmark.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bad_inputs.py"


def _load():
    spec = importlib.util.spec_from_file_location("bad_inputs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_quick_bad_input_gets_a_clear_error(capsys) -> None:
    bad_inputs = _load()
    total = bad_inputs.main(["--quick", "--verbose"])
    out = capsys.readouterr().out
    offenders = [line for line in out.splitlines() if line.split(" ", 1)[0] in ("unclear", "crash", "silent")]
    assert sum(total.values()) >= 70, total  # the tally covers at least 15 classes x 5 inputs
    assert not offenders, "\n".join(offenders)
