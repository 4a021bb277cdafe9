"""cffi builder for vfiod._tce (placeholder until the TCE fast path lands)."""

from pathlib import Path

from cffi import FFI

ffibuilder = FFI()
ffibuilder.cdef("int vfiod_tce_abi_version(void);")
ffibuilder.set_source(
    "vfiod._tce",
    (Path(__file__).parent / "tce.c").read_text(),
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
