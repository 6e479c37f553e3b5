"""Topic patterns with placeholders, and handler signatures turned into call plans.

``dt/{device}/temperature`` subscribes to ``dt/+/temperature`` and calls the handler with
``device="…"``. A placeholder is a whole topic level; ``+`` and a final ``#`` may be used
too (they bind nothing). The handler's other parameter is the payload, validated with
pydantic against its annotation; a parameter annotated :class:`edge.events.Event` gets
the envelope, one named ``topic`` gets the topic.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from edge.errors import HandlerSignatureError, PayloadTypeError
from edge.events import Event

__all__ = ["Route", "compile_pattern", "make_route"]

_PLACEHOLDER = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_CONVERT: dict[Any, Callable[[str], Any]] = {
    str: str,
    int: int,
    float: float,
    inspect.Parameter.empty: str,
}


def compile_pattern(pattern: str) -> tuple[str, list[tuple[str, str | None]]]:
    """``dt/{device}/temperature`` -> (``dt/+/temperature``, level specs).

    A level spec is ``("lit", text)``, ``("var", name)``, ``("+", None)`` or ``("#", None)``.
    """
    if not pattern or "\x00" in pattern:
        raise HandlerSignatureError(f"topic pattern {pattern!r} is empty or has a NUL")
    levels = pattern.split("/")
    specs: list[tuple[str, str | None]] = []
    names: set[str] = set()
    for i, level in enumerate(levels):
        m = _PLACEHOLDER.match(level)
        if m:
            name = m.group(1)
            if name in names:
                raise HandlerSignatureError(f"{pattern!r}: placeholder {{{name}}} appears twice")
            names.add(name)
            specs.append(("var", name))
        elif level == "+":
            specs.append(("+", None))
        elif level == "#":
            if i != len(levels) - 1:
                raise HandlerSignatureError(f"{pattern!r}: '#' must be the last level")
            specs.append(("#", None))
        elif any(c in level for c in "+#{}"):
            raise HandlerSignatureError(
                f"{pattern!r}: level {level!r} must be literal, '+', '#' or a whole {{name}}"
            )
        else:
            specs.append(("lit", level))
    flt = "/".join("+" if k in ("var", "+") else "#" if k == "#" else str(v) for k, v in specs)
    return flt, specs


def match_specs(specs: list[tuple[str, str | None]], topic: str) -> dict[str, str] | None:
    """Placeholder values if ``topic`` matches, else None (an empty placeholder value
    does not match: ``dt//temperature`` names no device)."""
    levels = topic.split("/")
    out: dict[str, str] = {}
    n = len(levels)
    for i, (kind, val) in enumerate(specs):
        if kind == "#":
            return out
        if i >= n:
            return None
        level = levels[i]
        if kind == "lit":
            if level != val:
                return None
        elif kind == "var":
            if not level:
                return None
            out[val] = level  # type: ignore[index]
        elif kind == "+" and i == 0 and level.startswith("$"):
            return None
    return out if n == len(specs) else None


@dataclass
class Route:
    """One registered handler and how to call it."""

    pattern: str
    filter: str
    specs: list[tuple[str, str | None]]
    handler: Callable[..., Awaitable[Any]]
    name: str
    key: Callable[[str, dict[str, str]], str]
    payload_param: str | None
    payload_type: Any  # the annotation (Any when none)
    wants_bytes: bool
    event_param: str | None
    topic_param: str | None
    converters: dict[str, Callable[[str], Any]]
    publishes: list[tuple[str, Any]] = field(default_factory=list)
    description: str = ""
    _adapter: Any = None

    def match(self, topic: str) -> dict[str, str] | None:
        return match_specs(self.specs, topic)

    def validate(self, data: Any) -> Any:
        """Validate ``data`` against the payload annotation (pydantic ValidationError)."""
        if self._adapter is None:
            self._adapter = _validator(self.payload_type)
        return self._adapter(data)

    def schema(self) -> dict[str, Any] | None:
        """JSON schema of the payload (None for bytes)."""
        if self.wants_bytes:
            return None
        from pydantic import TypeAdapter

        if self.payload_type is Any:
            return {}
        return TypeAdapter(self.payload_type).json_schema()


def _identity(x: Any) -> Any:
    return x


# Annotations checked without pydantic: a service whose handlers take plain JSON values
# never imports it (about 12 MiB of resident memory). JSON decoding already produced
# these types, so the check is the whole of what pydantic would do for them.
_PLAIN: dict[type, str] = {dict: "an object", list: "an array", str: "a string"}


def _validator(t: Any) -> Callable[[Any], Any]:
    if t is Any or t is object:
        return _identity
    plain = t
    if typing.get_args(t) in ((str, Any), (Any,)):  # dict[str, Any], list[Any]: JSON keys are str
        plain = typing.get_origin(t)
    want = _PLAIN.get(plain) if isinstance(plain, type) else None
    if want is not None:

        def check(x: Any) -> Any:
            if type(x) is not plain:
                raise PayloadTypeError(f"payload: expected {want}, got {_json_kind(x)}")
            return x

        return check
    from pydantic import BaseModel, TypeAdapter

    if isinstance(t, type) and issubclass(t, BaseModel):
        return t.model_validate
    return TypeAdapter(t).validate_python


def _json_kind(x: Any) -> str:
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "a boolean"
    if isinstance(x, int | float):
        return "a number"
    return _PLAIN.get(type(x), type(x).__name__)


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception as e:  # NameError for models defined inside a function, etc.
        raise HandlerSignatureError(
            f"handler {fn.__qualname__}: cannot resolve its annotations ({e}); define the "
            "models at module level"
        ) from None


def make_route(
    pattern: str,
    handler: Callable[..., Awaitable[Any]],
    *,
    key: str | Callable[[str, dict[str, str]], str] | None = None,
    publishes: list[tuple[str, Any]] | None = None,
) -> Route:
    if not inspect.iscoroutinefunction(handler):
        raise HandlerSignatureError(
            f"handler {getattr(handler, '__qualname__', handler)!r} must be 'async def'"
        )
    flt, specs = compile_pattern(pattern)
    names = [str(v) for k, v in specs if k == "var"]
    sig = inspect.signature(handler)
    hints = _hints(handler)
    converters: dict[str, Callable[[str], Any]] = {}
    payload_param = event_param = topic_param = None
    payload_type: Any = Any
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise HandlerSignatureError(
                f"handler {handler.__qualname__}: *args/**kwargs are not supported"
            )
        ann = hints.get(p.name, inspect.Parameter.empty)
        if p.name in names:
            conv = _CONVERT.get(ann)
            if conv is None:
                raise HandlerSignatureError(
                    f"handler {handler.__qualname__}: placeholder {p.name!r} "
                    "must be str, int or float"
                )
            converters[p.name] = conv
        elif ann is Event:
            event_param = p.name
        elif p.name == "topic" and ann in (str, inspect.Parameter.empty):
            topic_param = p.name
        elif payload_param is None:
            payload_param = p.name
            payload_type = Any if ann is inspect.Parameter.empty else ann
        elif p.default is p.empty:
            raise HandlerSignatureError(
                f"handler {handler.__qualname__}: parameter {p.name!r} is neither a placeholder of "
                f"{pattern!r} nor the payload ({payload_param!r} already is)"
            )
    missing = [n for n in names if n not in converters]
    if missing:
        raise HandlerSignatureError(
            f"handler {handler.__qualname__}: placeholder(s) {', '.join(missing)} of {pattern!r} "
            "have no parameter"
        )
    if key is None:
        key_name = "device" if "device" in names else (names[0] if names else None)
        key_fn = (lambda t, p: p[key_name]) if key_name else (lambda t, p: t)  # noqa: E731
    elif isinstance(key, str):
        if key not in names:
            raise HandlerSignatureError(f"key {key!r} is not a placeholder of {pattern!r}")
        key_fn = lambda t, p: p[key]  # noqa: E731
    else:
        key_fn = key
    return Route(
        pattern=pattern,
        filter=flt,
        specs=specs,
        handler=handler,
        name=handler.__qualname__,
        key=key_fn,
        payload_param=payload_param,
        payload_type=payload_type,
        wants_bytes=payload_type is bytes,
        event_param=event_param,
        topic_param=topic_param,
        converters=converters,
        publishes=list(publishes or []),
        description=inspect.getdoc(handler) or "",
    )
