"""Build the optional C helper pyoverlay._native from native/."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pyoverlay._native",
            sources=["native/lookup.c"],
            depends=["native/ovl_fs.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
        )
    ]
)
