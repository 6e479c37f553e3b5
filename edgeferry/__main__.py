"""``edgeferry`` entry point.

The long-running data-path commands (``gateway run``, ``ingest run``) are dispatched
before typer and rich are imported: they parse their own flags (edge.config) and keep
the gateway's resident memory small. Everything else goes through the typer app.
"""

from __future__ import annotations

import sys

_FAST = {
    ("gateway", "run"): ("gateway.main", "run_gateway"),
    ("ingest", "run"): ("gateway.main", "run_ingest"),
    ("service", "run"): ("edgeferry.cli_service", "run_service"),
}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    target = _FAST.get(tuple(args[:2]))  # type: ignore[arg-type]
    if target is not None:
        import importlib

        fn = getattr(importlib.import_module(target[0]), target[1])
        return int(fn(args[2:]))
    from edgeferry.cli import app

    try:
        app(args=args, prog_name="edgeferry", standalone_mode=True)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
