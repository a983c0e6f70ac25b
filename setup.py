# The C extension lives here because pyproject.toml cannot declare one with plain
# setuptools; everything else about the package is in pyproject.toml.
import os
import sys

from setuptools import Extension, setup

if not sys.platform.startswith("linux"):
    # memfd, futex and /proc are Linux's: the C core cannot be built anywhere else.
    sys.exit(f"shmfeed runs on Linux only (this is {sys.platform}): its shared-memory ring "
             "uses memfd_create and futex waits. Use a Linux machine or container.")

sanitize = bool(os.environ.get("SHMFEED_SANITIZE"))
extra = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"]
# Warnings fail the build only where the project asks (its CI, a developer): a user's
# `pip install` with a newer compiler that warns about something new must still work.
if os.environ.get("SHMFEED_WERROR") or sanitize:
    extra.append("-Werror")
if sanitize:
    extra += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"]

link = ["-fsanitize=address,undefined"] if sanitize else []


def _extension(name: str, sources: list[str]) -> Extension:
    return Extension(name, sources=sources, include_dirs=["csrc"], extra_compile_args=extra,
                     extra_link_args=link)


setup(
    ext_modules=[
        # the control block, and the workers' loop for array sources (which copies rows)
        _extension("shmfeed._core", ["csrc/ctl.c", "csrc/gather.c", "csrc/kernels.c", "csrc/order.c",
                                       "csrc/_core.c"]),
        # hot loops, the order: their binding only; the code is _core's (csrc/kernels_api.h)
        _extension("shmfeed._kernels", ["csrc/_kernels.c"]),
    ]
)
