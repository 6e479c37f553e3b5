"""One exception root: every public exception class of edge, gateway, firmware_sim and
edgeferry derives from edge.errors.EdgeferryError, and the trees drawn in the errors.py
docstrings name every class of their module."""

import importlib
import inspect
import pkgutil

import pytest

import edge.errors
import firmware_sim.errors
import gateway.errors
from edge.errors import EdgeferryError

PACKAGES = ("edge", "gateway", "firmware_sim", "edgeferry")


def _modules():
    for pkg in PACKAGES:
        mod = importlib.import_module(pkg)
        yield mod
        for info in pkgutil.walk_packages(mod.__path__, f"{pkg}."):
            if info.name.endswith("__main__"):
                continue
            yield importlib.import_module(info.name)


def _exceptions():
    seen = set()
    for mod in _modules():
        for name, obj in vars(mod).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == mod.__name__
                and not name.startswith("_")
                and obj not in seen
            ):
                seen.add(obj)
                yield obj


# edge/_nossl.py stands in for the standard library's ssl module in a process without TLS:
# its exception classes are ssl's (asyncio and uvloop catch them as OSError subclasses),
# not edgeferry's; each must be a name the real ssl module has, with the same base
STANDINS = {"edge._nossl": "ssl"}


def _standin_ok(e: type) -> bool:
    real = STANDINS.get(e.__module__)
    if real is None:
        return False
    twin = getattr(importlib.import_module(real), e.__name__, None)
    return inspect.isclass(twin) and all(issubclass(e, b) for b in twin.__mro__ if b.__module__ == "builtins")


def test_every_exception_derives_from_the_root():
    found = list(_exceptions())
    strays = [f"{e.__module__}.{e.__qualname__}" for e in found
              if not issubclass(e, EdgeferryError) and not _standin_ok(e)]
    print(f"\n{len(found)} exception classes, all under EdgeferryError: {not strays}")
    assert len(found) > 15
    assert not strays


@pytest.mark.parametrize("module", [edge.errors, gateway.errors, firmware_sim.errors])
def test_tree_in_docstring_names_every_class(module):
    doc = module.__doc__ or ""
    for name, obj in vars(module).items():
        if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module.__name__:
            assert name in doc, f"{module.__name__}.{name} is not in the tree of its docstring"


def test_subclasses_inherit_the_nearest_builtin():
    assert issubclass(gateway.errors.StoreError, OSError)
    assert issubclass(firmware_sim.errors.ProfileError, ValueError)
    assert issubclass(edge.errors.ConnectionLost, ConnectionError)
    assert issubclass(edge.errors.PayloadTypeError, ValueError)
