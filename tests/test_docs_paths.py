"""The docs cite only files that exist: every repository path in README.md and docs/*.md
(``gateway/store.py``, ``deploy/mosquitto/edge.conf``, ``bench/_util.py``, ...) names a
file or directory of the checkout. A placeholder (``bench/bench_<name>.py``) or a glob
(``deploy/mosquitto/*.conf``) must match at least one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
TOPS = ("edge", "gateway", "firmware_sim", "edgeferry", "bench", "deploy", "tests", "docs", ".ci")
# written by a run, not part of the checkout
GENERATED = ("bench/results/",)

_PATH = re.compile(r"(?<![\w./:-])((?:" + "|".join(re.escape(t) for t in TOPS) + r")/[\w./*<>{}-]*)")


def _cited(text: str) -> set[str]:
    out = set()
    for m in _PATH.finditer(text):
        path = m.group(1).rstrip(".,:;")
        if not path.startswith(GENERATED):
            out.add(path)
    return out


def _exists(path: str) -> bool:
    pattern = re.sub(r"<[^>]*>|\{[^}]*\}", "*", path).rstrip("/")
    if "*" in pattern:
        return any(REPO.glob(pattern))
    return (REPO / pattern).exists()


def test_the_scan_finds_paths():
    assert _cited("see `gateway/store.py`, deploy/mosquitto/*.conf. And bench/bench_<name>.py: "
                  "https://example.com/edge/x.py edge.mqtt bench/results/uplink.json") == {
        "gateway/store.py", "deploy/mosquitto/*.conf", "bench/bench_<name>.py"}
    assert _exists("gateway/store.py") and _exists("deploy/mosquitto/*.conf")
    assert _exists("bench/bench_<name>.py") and _exists("deploy/mosquitto/")
    assert not _exists("gateway/nothing_here.py") and not _exists("bench/nothing_<x>.py")
    assert sum(len(_cited(doc.read_text())) for doc in DOCS) > 20


@pytest.mark.parametrize("doc", DOCS, ids=[d.relative_to(REPO).as_posix() for d in DOCS])
def test_docs_cite_only_files_that_exist(doc):
    missing = sorted(p for p in _cited(doc.read_text()) if not _exists(p))
    assert not missing, f"{doc.relative_to(REPO)} cites paths that do not exist: {missing}"
