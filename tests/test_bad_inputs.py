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


#: Cases whose fix belongs to another change: they must still be open here; delete an entry when its
#: fix lands (the test then asks for it). None are open now.
KNOWN_OPEN: set[tuple[str, str]] = set()


def test_every_quick_bad_input_gets_a_clear_error(capsys) -> None:
    bad_inputs = _load()
    total = bad_inputs.main(["--quick", "--verbose"])
    out = capsys.readouterr().out
    rows = [line.split(None, 2) for line in out.splitlines() if line.split(" ", 1)[0] in ("clear", "unclear", "crash", "silent")]
    assert sum(total.values()) >= 150, total  # the tally covers every public class, at least 5 inputs each
    offenders = [" ".join(r) for r in rows if r[0] != "clear" and not any(r[2].startswith(w) and r[1] == c for c, w in KNOWN_OPEN)]
    assert not offenders, "\n".join(offenders)
    still_open = [(c, w) for c, w in KNOWN_OPEN if any(r[1] == c and r[2].startswith(w) and r[0] != "clear" for r in rows)]
    assert sorted(still_open) == sorted(KNOWN_OPEN), "a KNOWN_OPEN case is clear now: remove it from the set"
