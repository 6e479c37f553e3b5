"""Benchmarks, run by ``make bench`` (``python -m bench``), never by ``make test``.

Each ``bench/bench_<name>.py`` module has ``run(quick: bool) -> dict``; ``python -m bench``
runs every one it finds, prints a summary and writes ``bench/results/<name>.json``.
"""
