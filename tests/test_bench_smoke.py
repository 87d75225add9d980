"""The benchmark suite's smoke run: every benchmark at tiny sizes, so that the benchmark code cannot rot.

Nothing is asserted on time (these machines are noisy and the sizes are tiny); what is checked is that every member
ran to the end, wrote its JSON, and that the report carries each member's table. The server benchmarks need
``wrk``: without it they are skipped, unless ``CLIPSEARCH_REQUIRE_WRK=1`` (set by the CI) makes that a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.suite import MEMBERS

REPO = Path(__file__).resolve().parent.parent
SERVER_MEMBERS = ("server", "server_int8", "server_int8_compiled", "server_1m")
SMOKE_JOBS = 2  # smoke commands at a time: nothing is timed, and much of each is start-up and waiting
pytestmark = pytest.mark.slow  # every member in turn takes minutes: left out of make check


def test_every_benchmark_runs_at_smoke_size(tmp_path: Path) -> None:
    skip = []
    if shutil.which("wrk") is None:
        if os.environ.get("CLIPSEARCH_REQUIRE_WRK") == "1":
            pytest.fail("wrk is not installed (scripts/system-deps.sh installs it)")
        skip = list(SERVER_MEMBERS)
    command = [sys.executable, "-m", "bench.suite", "--smoke", "--jobs", str(SMOKE_JOBS), "--workdir", str(tmp_path)]
    if skip:
        command += ["--skip", ",".join(skip)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    [result_file] = tmp_path.glob("suite-*-smoke.json")
    results = json.loads(result_file.read_text(encoding="utf-8"))
    expected = [name for name in MEMBERS if name not in skip]
    assert list(results["members"]) == expected
    for name, record in results["members"].items():
        assert record["exit_status"] == 0 and record["results"], name
        same = record.get("same_smoke_run_as")  # a smoke command is run once, whichever members share it
        assert same is None or (MEMBERS[same].module, MEMBERS[same].smoke_args) == (
            MEMBERS[name].module,
            MEMBERS[name].smoke_args,
        ), name
    ran = [record["command"] for record in results["members"].values() if "same_smoke_run_as" not in record]
    assert len(ran) == len({tuple(c[:-4]) for c in ran})  # no smoke command twice (the last 4: workdir, out)
    report = result_file.with_suffix(".md").read_text(encoding="utf-8")
    for name in expected:
        assert f"## {name}" in report and "FAILED" not in report
    assert "| concurrency |" in report or skip  # the server's table
    assert "end to end img/s" in report
    assert "Whole first build over" in report  # indexer_full's line
    assert "| update | publish s |" in report  # update's table
    assert "| engine | images/s | steady images/s |" in report  # ray's table
    assert "| filter | matching |" in report  # filters' table
    assert "| threshold | seconds | groups |" in report  # duplicates' table
    assert "| tiny-siglip2 | 2 | ours_int8 |" in report  # encoders_siglip's image table (SigLIP 2's tokenizer too)
    assert "- tiny: parity with HF: text " in report  # encoders_xlmr: its text tower only, against XLMRobertaModel
