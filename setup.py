"""Build step of herd's native quantized kernels (all other metadata is in pyproject.toml).

`pip install .` compiles herd/quant/csrc into build/.../herd/quant/_native/; `pip install -e .` compiles it in place
into herd/quant/_native/. The compiler flags and the cache key come from herd/quant/native.py, loaded by path (it
imports no torch). A failed compile does not fail the install: herd then compiles on first use, or falls back to
PyTorch (see native.py).
"""

import importlib.util
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _native_module():
    spec = importlib.util.spec_from_file_location("_herd_native_build", ROOT / "herd" / "quant" / "native.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BuildPyWithKernels(build_py):
    """build_py, then gcc -O3 -march=native -fopenmp of the quantized kernels."""

    def run(self):
        super().run()
        editable = getattr(self, "editable_mode", False)
        dest = (ROOT if editable else Path(self.build_lib)) / "herd" / "quant" / "_native"
        try:
            path = _native_module().build(dest)
            (dest / ".build.lock").unlink(missing_ok=True)  # single builder here; keep the package clean
            print(f"herd: built {path}")
        except Exception as e:  # noqa: BLE001 -- never fail the install over the optional kernels
            print(f"herd: WARNING: native kernels not built at install time ({e}); they will be built on "
                  "first use or replaced by the PyTorch fallback", file=sys.stderr)


setup(cmdclass={"build_py": BuildPyWithKernels})
