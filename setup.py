"""Only the optional C helper: everything else is in pyproject.toml. If no compiler is found the build
goes on without it and `tokenizer` uses its numpy path (same results, slower list building)."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("tokenizer._lists", ["tokenizer/_lists.c"], optional=True,
                             extra_compile_args=["-O3"])])
