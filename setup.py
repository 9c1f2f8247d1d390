"""Build hook for the optional C speed-up of the validator.

Everything else is declared in pyproject.toml. ``optional=True``: where no compiler is
available the build goes on without the extension, and ledgerlog.validator falls back to
its pure-Python implementation (which decides identically; see tests/test_cstate.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ledgerlog.validator._cstate",
            ["ledgerlog/validator/_cstate.c"],
            optional=True,
            extra_compile_args=["-O2"],
        )
    ]
)
