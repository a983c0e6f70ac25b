# The C extension lives here because pyproject.toml cannot declare one with plain
# setuptools; everything else about the package is in pyproject.toml.
import os

from setuptools import Extension, setup

extra = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-Wno-missing-field-initializers"]
if os.environ.get("SHMFEED_SANITIZE"):
    extra += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"]

setup(
    ext_modules=[
        Extension(
            "shmfeed._core",
            sources=["csrc/ctl.c", "csrc/_core.c"],
            include_dirs=["csrc"],
            extra_compile_args=extra,
            extra_link_args=["-fsanitize=address,undefined"] if os.environ.get("SHMFEED_SANITIZE") else [],
        )
    ]
)
