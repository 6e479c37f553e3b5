"""``edgeferry sim``: help with examples, one-line errors with non-zero exits."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgeferry.cli import app
from firmware_sim import ResourceLimitError, raise_open_file_limit
from tests.harness import free_port

runner = CliRunner()


@pytest.mark.parametrize("args", [["sim"], ["sim", "run"], ["sim", "verify"]])
def test_every_sim_command_has_help_with_an_example(args: list[str]) -> None:
    r = runner.invoke(app, [*args, "--help"])
    assert r.exit_code == 0, r.output
    if len(args) > 1:
        assert "Example: edgeferry sim " + args[1] in " ".join(r.output.split())


def _err(args: list[str]) -> tuple[int, str]:
    r = runner.invoke(app, args)
    return r.exit_code, r.output.strip()


def test_sim_errors_are_one_line_and_non_zero(tmp_path: Path) -> None:
    closed = f"mqtt://127.0.0.1:{free_port()}"
    cases = [
        (["sim", "run", "--broker", "localhost:99"], 2, "not of the form mqtt://"),
        (["sim", "run", "--broker", closed, "--fault", "meteor"], 2, "unknown kind 'meteor'"),
        (["sim", "run", "--broker", closed, "--interval", "-1"], 2, "interval"),
        (["sim", "run", "--broker", closed, "--profile", str(tmp_path / "nope.yaml")], 2, "cannot read profile"),
        (["sim", "run", "--broker", closed, "--chaos", "soon"], 2, "must look like"),
        (["sim", "run", "--broker", closed, "--devices", "2", "--duration", "1"], 1, "cannot reach the broker"),
        (["sim", "run", "--broker", closed, "--manifest", str(tmp_path / "no/such/dir/m.json")], 1,
         "not a writable directory"),
        (["sim", "verify", "--manifest", str(tmp_path / "m.json"), "--sink", "jsonl:x"], 2, "cannot read manifest"),
    ]
    for args, code, needle in cases:
        rc, out = _err(args)
        assert rc == code and needle in out and len(out.splitlines()) == 1, (args, rc, out)
        assert out.startswith("error:"), out
    (tmp_path / "m.json").write_text(json.dumps({"hello": 1}))
    rc, out = _err(["sim", "verify", "--manifest", str(tmp_path / "m.json"), "--sink", "jsonl:x"])
    assert rc == 2 and "not an edgeferry simulator manifest" in out
    good = {"format": "edgeferry-sim-manifest", "version": 1, "run": "r", "devices": {}}
    (tmp_path / "m.json").write_text(json.dumps(good))
    rc, out = _err(["sim", "verify", "--manifest", str(tmp_path / "m.json"), "--sink", "csv:x"])
    assert rc == 2 and "jsonl:PATH or sqlite:PATH" in out
    rc, out = _err(["sim", "verify", "--manifest", str(tmp_path / "m.json"), "--sink",
                    f"jsonl:{tmp_path / 'none.jsonl'}"])
    assert rc == 2 and "does not exist" in out
    (tmp_path / "empty.jsonl").write_text("")
    rc, out = _err(["sim", "verify", "--manifest", str(tmp_path / "m.json"), "--sink",
                    f"jsonl:{tmp_path / 'empty.jsonl'}"])
    assert rc == 0 and "OK" in out


def test_open_file_limit_too_low_is_a_clear_error() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY:
        with pytest.raises(ResourceLimitError, match=r"needs about \d+ open files.*hard limit"):
            raise_open_file_limit(hard + 1)
    assert raise_open_file_limit(16) >= 16

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 512))

    r = subprocess.run([sys.executable, "-m", "edgeferry", "sim", "run", "--broker",
                        f"mqtt://127.0.0.1:{free_port()}", "--devices", "1000"],
                       capture_output=True, text=True, preexec_fn=low_limit, timeout=60)
    assert r.returncode == 1, r.stderr
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "at most 512" in line, line
