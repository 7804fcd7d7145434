"""cffi build script (out-of-line API mode) for cdimover's native core.

The cdef is the block between the cffi markers of the one public header, read verbatim.
Set CDIMOVER_SANITIZE=1 to build with AddressSanitizer and UBSan (CI does, for a second run
of the tests).
"""

import os
import pathlib
import re
import shutil
import subprocess
import tempfile

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


def _links(header: str, lib: str, call: str) -> bool:
    """True when a program using HEADER and CALL compiles and links against -lLIB."""
    cc = os.environ.get("CC", "cc").split()
    if shutil.which(cc[0]) is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp, "probe.c")
        src.write_text(f"#include <{header}>\nint main(void) {{ (void)({call}); return 0; }}\n")
        try:
            r = subprocess.run([*cc, str(src), "-o", str(pathlib.Path(tmp, "probe")), f"-l{lib}"],
                               capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return False
        return r.returncode == 0


# Compressed QCOW2 clusters: raw deflate through libdeflate (several times faster than zlib's
# streaming inflate) and zstd.  Both are required: a build never leaves out a format or a fast
# path silently.  CDIMOVER_WITHOUT_ZSTD=1 / CDIMOVER_WITHOUT_LIBDEFLATE=1 build without them on
# purpose (zstd-compressed images are then refused; deflate goes through zlib).
# Streams: gzip through zlib, xz through liblzma, digests through OpenSSL's libcrypto; all
# three are required.
DEBIAN_HINT = "apt-get install libzstd-dev libdeflate-dev zlib1g-dev liblzma-dev libssl-dev"
libraries = ["z", "lzma", "crypto"]
macros = [("_GNU_SOURCE", None), ("_FILE_OFFSET_BITS", "64")]
if not _links("zlib.h", "z", "zlibVersion()"):
    raise RuntimeError(f"cdimover needs zlib's headers to build ({DEBIAN_HINT})")
if not _links("lzma.h", "lzma", "lzma_version_number()"):
    raise RuntimeError("cdimover needs liblzma's headers to build (xz-compressed streams; "
                       f"apt-get install liblzma-dev; all: {DEBIAN_HINT})")
if not _links("openssl/evp.h", "crypto", "EVP_sha256()"):
    raise RuntimeError("cdimover needs OpenSSL's libcrypto headers to build (stream digests; "
                       f"apt-get install libssl-dev; all: {DEBIAN_HINT})")
if _links("zstd.h", "zstd", "ZSTD_versionNumber()"):
    libraries.append("zstd")
    macros.append(("CDM_HAVE_ZSTD", None))
elif not os.environ.get("CDIMOVER_WITHOUT_ZSTD"):
    raise RuntimeError("cdimover needs libzstd's headers to build (zstd-compressed QCOW2); "
                       f"install them ({DEBIAN_HINT}) or set CDIMOVER_WITHOUT_ZSTD=1")
if _links("libdeflate.h", "deflate", "libdeflate_alloc_decompressor() != 0"):
    libraries.append("deflate")
    macros.append(("CDM_HAVE_LIBDEFLATE", None))
elif not os.environ.get("CDIMOVER_WITHOUT_LIBDEFLATE"):
    raise RuntimeError("cdimover needs libdeflate's headers to build; install them "
                       f"({DEBIAN_HINT}) or set CDIMOVER_WITHOUT_LIBDEFLATE=1")

# HTTP(S) sources: libcurl (with OpenSSL); hashes of streams: OpenSSL's libcrypto.  Required.
if not _links("curl/curl.h", "curl", "curl_version()"):
    raise RuntimeError("cdimover needs libcurl's headers to build (HTTP and HTTPS sources); "
                       "install them (apt-get install libcurl4-openssl-dev)")
# libcurl itself is not linked: curlapi.c loads it with the first HTTP(S) source, so jobs
# without one never map it and the twenty-odd libraries it needs (start-up, memory).
if not _links("openssl/evp.h", "crypto", "EVP_sha256()"):
    raise RuntimeError("cdimover needs OpenSSL's headers to build (checksums); install them "
                       "(apt-get install libssl-dev)")
libraries.append("crypto")

ffibuilder = FFI()
ffibuilder.cdef(API[1])
ffibuilder.cdef('extern "Python" int _cdm_progress_cb(void *, uint64_t, uint64_t);')
ffibuilder.cdef('extern "Python" int _cdm_reauth_cb(void *, char *, size_t);')
# The kernel's ioctl numbers and flags the Python layer uses (loop devices, block devices),
# taken from the system's headers by the compiler: their encoding differs between
# architectures (ppc64le, mips...), so none is written down by hand.
ffibuilder.cdef("""
#define LOOP_SET_FD ...
#define LOOP_CLR_FD ...
#define LOOP_SET_STATUS64 ...
#define LOOP_GET_STATUS64 ...
#define LOOP_SET_DIRECT_IO ...
#define LOOP_SET_BLOCK_SIZE ...
#define LOOP_CONFIGURE ...
#define LOOP_CTL_GET_FREE ...
#define LO_NAME_SIZE ...
#define LO_FLAGS_READ_ONLY ...
#define LO_FLAGS_AUTOCLEAR ...
#define LO_FLAGS_PARTSCAN ...
#define LO_FLAGS_DIRECT_IO ...
#define BLKSSZGET ...
#define BLKGETSIZE64 ...
""")
ffibuilder.set_source(
    "cdimover._cdimover",
    '#include <linux/fs.h>\n#include <linux/loop.h>\n#include "cdimover.h"',
    sources=sorted(str(p) for p in HERE.glob("*.c")),
    include_dirs=[str(HERE)],
    define_macros=macros,
    libraries=libraries,
    extra_compile_args=extra_compile,
    extra_link_args=extra_link,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
