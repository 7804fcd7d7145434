"""cffi build script (out-of-line API mode) for cdimover's native core.

The cdef is the block between the cffi markers of the one public header, read verbatim.
Set CDIMOVER_SANITIZE=1 to build with AddressSanitizer and UBSan (CI does, for a second run
of the tests).
"""

import os
import pathlib
import re

from cffi import FFI

HERE = pathlib.Path(__file__).parent
HEADER = (HERE / "cdimover.h").read_text()
API = re.search(r"/\* cffi:begin \*/(.*)/\* cffi:end \*/", HEADER, re.S)
if API is None:
    raise RuntimeError("cdimover.h lacks the cffi markers")

extra_compile = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-pthread"]
extra_link = ["-pthread"]
if os.environ.get("CDIMOVER_SANITIZE"):
    extra_compile += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                      "-fno-sanitize-recover=undefined", "-O1", "-g"]
    extra_link += ["-fsanitize=address,undefined"]

ffibuilder = FFI()
ffibuilder.cdef(API[1])
ffibuilder.cdef('extern "Python" int _cdm_progress_cb(void *, uint64_t, uint64_t);')
ffibuilder.set_source(
    "cdimover._cdimover",
    '#include "cdimover.h"',
    sources=sorted(str(p) for p in HERE.glob("*.c")),
    include_dirs=[str(HERE)],
    define_macros=[("_GNU_SOURCE", None), ("_FILE_OFFSET_BITS", "64")],
    extra_compile_args=extra_compile,
    extra_link_args=extra_link,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
