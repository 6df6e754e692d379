"""Only the optional C extension lives here; everything else is in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds and the service uses
the pure-Python decoder for every frame (``teltonika_ingest/codec/accel.py``).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "teltonika_ingest.codec._fastavl",
            ["teltonika_ingest/codec/_fastavl.c"],
            optional=True,
            extra_compile_args=["-O2"],
        )
    ]
)
