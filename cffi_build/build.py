"""cffi builder for vfiod._fast: the C hot paths (sources in this folder, one header each).

``pip install`` builds it through setup.py's ``cffi_modules``; ``python cffi_build/build.py``
builds it in place for a quick edit-compile loop.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SOURCES = ["tce.c"]

CDEF = """
struct vfiod_tce_store {
    void **root;
    uint64_t nb_entries;
    uint64_t valid;
    uint64_t leaves;
    uint64_t nodes;
    uint64_t max_leaves;
};

int vfiod_tce_abi_version(void);

struct vfiod_tce_store *vfiod_store_new(uint64_t nb_entries, uint64_t max_leaves);
void vfiod_store_free(struct vfiod_tce_store *s);
void vfiod_store_clear(struct vfiod_tce_store *s);
int vfiod_store_resize(struct vfiod_tce_store *s, uint64_t nb_entries);
uint64_t vfiod_store_get(const struct vfiod_tce_store *s, uint64_t idx);
long vfiod_store_fill(struct vfiod_tce_store *s, uint64_t idx, uint64_t n, uint64_t value);
long vfiod_store_fill_linear(struct vfiod_tce_store *s, uint64_t idx, uint64_t n,
                             uint64_t first, uint64_t step);
long vfiod_store_write(struct vfiod_tce_store *s, uint64_t idx, const uint64_t *src, uint64_t n,
                       uint64_t or_bits);
long vfiod_store_write_be(struct vfiod_tce_store *s, uint64_t idx, const char *src, uint64_t n);
long vfiod_store_next_leaf(const struct vfiod_tce_store *s, uint64_t from_lid, uint64_t *out);

long vfiod_tce_validate_be(const char *src, size_t n, unsigned shift, const uint64_t *rs,
                           const uint64_t *re, size_t nr, int check_mem);
long vfiod_tce_validate(const uint64_t *src, size_t n, unsigned shift, const uint64_t *rs,
                        const uint64_t *re, size_t nr, int check_mem);
long vfiod_tce_translate(const struct vfiod_tce_store *s, uint64_t bus_offset,
                         unsigned page_shift, const uint64_t *sg_iova, const uint64_t *sg_len,
                         size_t nsg, int write, const uint64_t *rs, const uint64_t *re,
                         size_t nr, uint32_t *out_reg, uint64_t *out_off, uint64_t *out_len,
                         size_t out_max, uint64_t *fault);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "vfiod._fast",
    '#include "tce.h"\n',
    sources=[str(HERE / name) for name in SOURCES],
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE.parent), verbose=True)
