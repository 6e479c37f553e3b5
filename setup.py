"""The one build step pyproject.toml cannot state without an experimental setuptools table
(``[tool.setuptools] ext-modules``, still marked experimental in setuptools 84): the
optional C accelerator edge/_cparse.c. ``optional=True``: where there is no C compiler or
no Python headers the install goes on without it and the decoder parses in pure Python
(docs/decisions.md, "An optional C fast path for PUBLISH parsing")."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("edge._cparse", ["edge/_cparse.c"], optional=True)])
