"""The benchmark harness's smoke run: it works end to end and every load ran without errors.

No timing thresholds: this machine is shared and noisy; figures belong in the
benchmark's report, not in assertions.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = {"synctoken", "synctoken-guarded", "empty-rpc", "express-guide", "express-keyobject"}


def test_quick_run(tmp_path: Path) -> None:
    """`python -m bench --quick` measures every system at every concurrency, error-free, and writes its report."""
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--workers", "2", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "results.json").read_text())
    measured = {(r["system"], r["concurrency"]) for r in data["results"]}
    assert measured == {(s, c) for s in SYSTEMS | {"synctoken-2w"} for c in (1, 16)}
    for r in data["results"]:
        assert r["errors"] == 0, r
        assert r["requests"] > 0, r
        assert r["server_cpu_s"] > 0, r
    paths = ["synctoken_issue_path", "synctoken_issue_path_twilio_minter", "bare_access_token"]
    paths += ["direct_mint", "twilio_minter_mint", "hmac_sha256"]
    ratios = ["issue_path_over_bare", "issue_path_twilio_minter_over_bare"]
    ratios += ["issue_path_over_issue_path_twilio_minter", "direct_mint_over_twilio_minter_mint"]
    assert set(data["micro"]) == {f"{p}{q}_us" for p in paths for q in ("", "_q1", "_q3")} | {
        f"{r}{q}" for r in ratios for q in ("", "_q1", "_q3")
    }
    assert "| synctoken | 16 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
