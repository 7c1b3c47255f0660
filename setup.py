"""Build the native extension ``bye_fast._C`` (pybind11, C++17).

Metadata lives in pyproject.toml; this file only declares the extension.
"""

import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

extra_compile_args = ["-O3"] if sys.platform != "win32" else ["/O2"]

ext_modules = [
    Pybind11Extension(
        "bye_fast._C",
        sources=sorted(["csrc/bindings.cpp", "csrc/bimodal_stats.cpp", "csrc/columns.cpp"]),
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=extra_compile_args,
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
