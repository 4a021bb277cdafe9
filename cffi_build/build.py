"""cffi builder for vfiod._fast: the C hot paths (sources in this folder, one header each).

``pip install`` builds it through setup.py's ``cffi_modules``; ``python cffi_build/build.py``
builds it in place for a quick edit-compile loop.
"""

import os
import re
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SOURCES = ["tce.c", "pe_dma.c", "vfu.c", "irq.c", "nvme.c"]

HEADERS = [f"{name[:-2]}.h" for name in SOURCES]

# What cffi needs that comes from system headers (checked against them when the module compiles).
SYSTEM_CDEF = """
struct iovec {
    void *iov_base;
    size_t iov_len;
};
"""

_COMMENT = re.compile(r"/\*.*?\*/", re.S)
_DEFINE = re.compile(r"#define\s+(\w+)(?:\s+(.*))?$")
_PRIVATE_MEMBER = re.compile(r"^\s*pthread_\w+_t\s+\w+;\s*$")


def header_cdef(text: str) -> str:
    """The cdef of one header, so the C declarations have one home (the header). Comments,
    include guards and #includes go; a #define keeps its value when it is a plain integer (cffi
    takes the value from C otherwise, checked at compile time); a member of a pthread type
    becomes ``...;`` (cffi then checks the offsets of every other member against the compiler's
    layout)."""
    out = []
    in_struct = private = False
    for line in _COMMENT.sub("", text).splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("#ifndef", "#endif", "#include")):
            continue
        m = _DEFINE.match(stripped)
        if m:
            name, value = m.group(1), (m.group(2) or "").strip()
            if value:  # an include guard has none
                out.append(f"#define {name} {value if value.isdigit() else '...'}")
            continue
        if stripped.startswith("struct ") and stripped.endswith("{"):
            in_struct, private = True, False
        elif in_struct and _PRIVATE_MEMBER.match(line):
            private = True
            continue
        elif in_struct and stripped == "};":
            if private:
                out.append("    ...;")
            in_struct = False
        out.append(line.rstrip())
    return "\n".join(out) + "\n"


def cdef() -> str:
    return SYSTEM_CDEF + "".join(header_cdef((HERE / h).read_text()) for h in HEADERS)

ffibuilder = FFI()
ffibuilder.cdef(cdef())
ffibuilder.set_source(
    "vfiod._fast",
    "".join(f'#include "{h}"\n' for h in HEADERS),
    # relative to the working directory (setup.py runs from the project root and setuptools
    # refuses absolute paths there)
    sources=[os.path.relpath(HERE / name) for name in SOURCES],
    include_dirs=[os.path.relpath(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE.parent), verbose=True)
