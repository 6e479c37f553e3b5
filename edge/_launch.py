"""``edgeferry service run MODULE:ATTR``: find the service a module names and run it.

Kept apart from edge/_runner.py, which runs a service it is given, so that imports point
one way: this module -> edge.service -> edge._runner.
"""

from __future__ import annotations

import os
import sys

from edge._runner import OPTIONS, run_service
from edge.errors import EdgeError, ServiceError
from edge.service import Service

__all__ = ["load_target", "main"]


def load_target(spec: str) -> Service:
    """Import ``MODULE:ATTR`` (MODULE importable from the current directory) and return the
    :class:`edge.Service` it names; a callable ATTR is called with no arguments."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ServiceError(f"{spec!r} is not MODULE:ATTR (e.g. myservice:svc)")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise ServiceError(
                f"cannot import {module_name!r}: no such module (looked in {os.getcwd()})"
            ) from None
        raise ServiceError(f"importing {module_name!r} failed: {e}") from e
    except EdgeError:
        raise
    except Exception as e:  # a bug in the service module: one line, with where it is
        where = ""
        tb = e.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename.endswith(module_name.replace(".", "/") + ".py"):
                where = f" (line {tb.tb_lineno})"
            tb = tb.tb_next
        raise ServiceError(
            f"importing {module_name!r} failed{where}: {type(e).__name__}: {e}"
        ) from e
    obj: object = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ServiceError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, Service) and callable(obj):
        obj = obj()
    if not isinstance(obj, Service):
        raise ServiceError(f"{spec} is a {type(obj).__name__}, not an edge.Service")
    return obj


def main(argv: list[str]) -> int:
    """``edgeferry service run MODULE:ATTR [flags]`` (fast path, no typer)."""
    if not argv or argv[0] in ("-h", "--help"):
        from edge.config import build_parser

        p = build_parser(
            "edgeferry service run MODULE:ATTR", "Run a service.", OPTIONS, epilog=_EPILOG
        )
        p.print_help()
        return 0 if argv else 2
    spec, rest = argv[0], argv[1:]
    try:
        svc = load_target(spec)
    except EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return run_service(svc, rest, prog=f"edgeferry service run {spec}")


_EPILOG = """example:
  edgeferry service run myservice:svc --broker mqtt://127.0.0.1:1883
  edgeferry service run edge.services.rules:service --config /etc/edgeferry/rules.yaml
"""
