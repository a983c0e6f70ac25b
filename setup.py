# The C extension lives here because pyproject.toml cannot declare one with plain
# setuptools; everything else about the package is in pyproject.toml.
import os

from setuptools import Extension, setup

sanitize = bool(os.environ.get("SHMFEED_SANITIZE"))
extra = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-Wno-missing-field-initializers"]
if sanitize:
    extra += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"]

link = ["-fsanitize=address,undefined"] if sanitize else []


def _extension(name: str, sources: list[str]) -> Extension:
    return Extension(name, sources=sources, include_dirs=["csrc"], extra_compile_args=extra,
                     extra_link_args=link)


setup(
    ext_modules=[
        # the control block, and the workers' loop for array sources (which copies rows)
        _extension("shmfeed._core", ["csrc/ctl.c", "csrc/gather.c", "csrc/kernels.c", "csrc/_core.c"]),
        _extension("shmfeed._kernels", ["csrc/kernels.c", "csrc/_kernels.c"]),  # hot loops
    ]
)
