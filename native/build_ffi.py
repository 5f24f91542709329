"""cffi (API mode) build of the native kernels into `native._numoe_native`.

setup.py names `ffibuilder` in cffi_modules, so the extension is compiled when the package is
built or installed (`pip install -e .` included), never at import. The cdef is
include/numoe.h itself, minus comments, so the header stays the single source of the API.

No global -mavx2/-march=native: each SIMD file enables its ISA with `#pragma GCC target`, and
dispatch.c picks the ISA at load from the CPU's flags, so one .so runs on any x86-64.
"""

import os
import re
from pathlib import Path

from cffi import FFI

NATIVE_DIR = Path(__file__).resolve().parent
INCLUDE_DIR = NATIVE_DIR / "include"
SOURCE_DIR = NATIVE_DIR / "src"
HEADER = INCLUDE_DIR / "numoe.h"


def cdef_from_header(header_text: str) -> str:
    """The header with /* */ and // comments removed (cffi's parser accepts the rest)."""
    without_block = re.sub(r"/\*.*?\*/", "", header_text, flags=re.DOTALL)
    return re.sub(r"//[^\n]*", "", without_block)


def _relative(path: Path) -> str:
    # setuptools wants source paths relative to the project root (the build's working dir).
    return os.path.relpath(path, Path.cwd())


ffibuilder = FFI()
ffibuilder.cdef(cdef_from_header(HEADER.read_text()))
ffibuilder.set_source(
    "native._numoe_native",
    "#include <stdint.h>\n#include \"numoe.h\"\n",
    sources=[_relative(p) for p in sorted(SOURCE_DIR.glob("*.c"))],
    include_dirs=[_relative(INCLUDE_DIR), _relative(SOURCE_DIR)],
    depends=[_relative(HEADER), *(_relative(p) for p in sorted(SOURCE_DIR.glob("*.h")))],
    extra_compile_args=["-O3", "-std=c11", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"],
    extra_link_args=["-fopenmp"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
