"""The tag of the image the image tests use: a hash of everything that goes into it (the
package, the C core, the build files, deploy/build-image.sh).  No dependencies, so that CI can
build the image before the tests' requirements are installed:

    deploy/build-image.sh "$(python3 tests/imagetag.py)"
"""

from __future__ import annotations

import hashlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST_REPO = "localhost/cdimover-test"


def source_hash() -> str:
    """A hash of every input of the image: the package, the C core, the build files, the
    build script."""
    h = hashlib.sha256()
    paths = [REPO / "pyproject.toml", REPO / "setup.py", REPO / "MANIFEST.in",
             REPO / "deploy" / "build-image.sh"]
    paths += sorted(p for p in (REPO / "cdimover").rglob("*.py"))
    paths += sorted(p for p in (REPO / "csrc").rglob("*")
                    if p.is_file() and p.suffix in (".c", ".h", ".py") and "tests" not in p.parts)
    for p in paths:
        h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]



if __name__ == "__main__":
    print(f"{TEST_REPO}:{source_hash()}")
