"""Only the optional C extension lives here; everything else is in pyproject.toml.

``imgtrain.data.decode._jpegroi`` (data.decode.decoder=libjpeg_roi, docs/decode.md) links the system's libjpeg-turbo
(Debian: libjpeg62-turbo-dev, which scripts/install.sh installs). It is optional: without a compiler or
the headers the install still succeeds and that decoder falls back to simplejpeg_fast with a warning.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "imgtrain.data.decode._jpegroi",
            ["src/imgtrain/data/decode/_jpegroi.c"],
            libraries=["jpeg"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
