"""The browser provider's Node unit tests (clients/browser/test), run by Node's test runner from the suite."""

from __future__ import annotations

import re
import shutil
import subprocess

from support.constants import ROOT

PACKAGE = ROOT / "clients/browser"
# Node's test runner on a few dozen tests with fake clocks: seconds, bounded all the same.
TIMEOUT = 120


def test_node_unit_tests_pass() -> None:
    """`node --test clients/browser/test/` passes every test, and runs some (the scheduling rules among them)."""
    node = shutil.which("node")
    assert node is not None, "node is not on PATH (the suite needs it: see README's Development section)"
    result = subprocess.run(
        [node, "--test", "--test-reporter=tap", "test/"],
        cwd=PACKAGE,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    counts = dict(re.findall(r"^# (pass|fail|skipped|todo|cancelled) (\d+)$", result.stdout, re.MULTILINE))
    assert int(counts["pass"]) >= 30
    assert (counts["fail"], counts["skipped"], counts["todo"], counts["cancelled"]) == ("0", "0", "0", "0")
    assert "nextStep" in result.stdout
