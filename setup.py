"""Builds bench's per-message loop in C (aecho.bench._engine) where it can: Linux, with a
C compiler.  The build is optional: without it, `aecho bench` runs the same loop in Python,
and says so in its --json ("engine")."""

import sys

from setuptools import Extension, setup

engine = Extension(
    "aecho.bench._engine",
    sources=["src/aecho/bench/_engine.c"],
    extra_compile_args=["-O2", "-std=gnu11"],
    optional=True,
)
setup(ext_modules=[engine] if sys.platform.startswith("linux") else [])
