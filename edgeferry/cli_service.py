"""``edgeferry service run`` and ``edgeferry catalog``.

No ``from __future__ import annotations`` here: typer reads the command parameters'
annotations at run time, and typer itself is imported inside :func:`register`.

``service run`` is dispatched before typer is imported (edgeferry/__main__.py ``_FAST``
-> :func:`run_service`), so a running service does not carry typer and rich in memory.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import typer

__all__ = ["register", "run_service"]


def run_service(argv: list[str]) -> int:
    """Fast path for ``edgeferry service run MODULE:ATTR [flags]``."""
    from edge._launch import main

    return main(argv)


def register(app: "typer.Typer") -> None:  # noqa: UP037 (typer is imported lazily)
    import typer
    from rich.console import Console

    err = Console(stderr=True, soft_wrap=True)
    service_app = typer.Typer(
        help="Run services built with the edge SDK.\n\nExample: edgeferry service run "
        "edge.services.rules:service --config deploy/services/rules.yaml",
        no_args_is_help=True,
    )
    app.add_typer(service_app, name="service")

    def fail(message: str, code: int = 1) -> None:
        err.print(f"[red]error:[/red] {message}", highlight=False)
        raise typer.Exit(code)

    @service_app.command(
        "run",
        context_settings={
            "allow_extra_args": True,
            "ignore_unknown_options": True,
            "help_option_names": [],
        },
        add_help_option=False,
    )
    def service_run(ctx: typer.Context) -> None:
        """Run one service until SIGTERM (all flags: edgeferry service run --help).

        MODULE:ATTR names an edge.Service (MODULE importable from the current directory).
        Settings come from flags, EDGEFERRY_* variables and --config FILE.

        Example: edgeferry service run myservice:svc --broker mqtt://127.0.0.1:1883

        Example: edgeferry service run edge.services.rules:service
        --config deploy/services/rules.yaml
        """
        raise typer.Exit(run_service(list(ctx.args)))

    @app.command("catalog")
    def catalog(
        specs: list[str] = typer.Argument(  # noqa: B008 - typer declares parameters this way
            None,
            help="services as MODULE:ATTR (default: 'services' in --config)",
            show_default=False,
        ),
        config: str = typer.Option(
            None,
            "--config",
            envvar="EDGEFERRY_CONFIG",
            help="YAML file whose 'services' list names the services",
        ),
        builtins: bool = typer.Option(
            False, "--builtins", help="include the built-in aggregator and rules"
        ),
        asyncapi_file: str = typer.Option(
            None,
            "--asyncapi",
            metavar="FILE",
            help="write an AsyncAPI 3 document (.json, or .yaml/.yml)",
        ),
        diagram_file: str = typer.Option(
            None,
            "--diagram",
            metavar="FILE",
            help="write the service/topic graph: Mermaid (.mmd), or .svg/.png with graphviz",
        ),
        as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
    ) -> None:
        """Which topics each service consumes and publishes, with their schemas.

        Example: edgeferry catalog --config deploy/services/services.yaml --asyncapi asyncapi.yaml
        --diagram services.mmd

        Example: edgeferry catalog myservice:svc --builtins --json
        """
        import json
        from pathlib import Path

        from edge.errors import EdgeError
        from edgeferry.catalog import (
            BUILTINS,
            asyncapi,
            build_catalog,
            services_from_config,
            write_diagram,
        )

        try:
            names = list(specs or []) or services_from_config(config)
            if builtins:
                names += [b for b in BUILTINS if b not in names]
            if not names:
                fail(
                    "no services: name them (MODULE:ATTR), use --builtins, or list them under "
                    "'services:' in --config"
                )
            cat = build_catalog(names)
            if asyncapi_file:
                doc = asyncapi(cat)
                p = Path(asyncapi_file)
                if p.suffix.lower() in (".yaml", ".yml"):
                    import yaml

                    p.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
                else:
                    p.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
                err.print(f"wrote AsyncAPI 3 document to {p}")
            if diagram_file:
                for written in write_diagram(cat, Path(diagram_file)):
                    err.print(f"wrote {written}")
        except EdgeError as e:
            fail(str(e))
            return
        if as_json:
            print(json.dumps(cat.as_dict(), indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        out = Console()
        for s in cat.services:
            out.print(f"[bold]{s.name}[/bold]  ({s.spec})  {s.description}", highlight=False)
            t = Table("direction", "topic", "payload", "fields / note")
            for handler, ch in s.consumes:
                t.add_row(
                    "consumes", ch.pattern, ch.model or "any JSON", _fields(ch.schema) or handler
                )
            for ch in s.publishes:
                t.add_row(
                    "publishes", ch.pattern, ch.model or "-", _fields(ch.schema) or ch.description
                )
            out.print(t)


def _fields(schema: dict | None) -> str:
    if not schema:
        return ""
    props = schema.get("properties")
    if isinstance(props, dict):
        req = set(schema.get("required", []))
        return ", ".join(f"{k}{'' if k in req else '?'}: {_ty(v)}" for k, v in props.items())
    return _ty(schema)


def _ty(s: dict) -> str:
    if "type" in s:
        return str(s["type"])
    if "anyOf" in s:
        return " | ".join(_ty(x) for x in s["anyOf"])
    if "$ref" in s:
        return str(s["$ref"]).rsplit("/", 1)[-1]
    if "const" in s:
        return repr(s["const"])
    if "enum" in s:
        return "|".join(map(str, s["enum"]))
    return "any"
