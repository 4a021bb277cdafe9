"""cffi builder for vfiod._tce: the sPAPR TCE hot loops (C source in tce.c)."""

from pathlib import Path

from cffi import FFI

CDEF = """
int vfiod_tce_abi_version(void);
long vfiod_tce_validate_be(const char *src, size_t n, unsigned shift, const uint64_t *rs,
                           const uint64_t *re, size_t nr, int check_mem);
long vfiod_tce_validate(const uint64_t *src, size_t n, unsigned shift, const uint64_t *rs,
                        const uint64_t *re, size_t nr, int check_mem);
void vfiod_tce_copy_be(uint64_t *dst, const char *src, size_t n);
long vfiod_tce_put_batch_be(uint64_t *dst0, size_t n0, uint64_t *dst1, const char *src,
                            size_t n, unsigned shift, const uint64_t *rs, const uint64_t *re,
                            size_t nr, int check_mem);
void vfiod_tce_copy(uint64_t *dst, const uint64_t *src, size_t n, uint64_t or_bits);
void vfiod_tce_fill(uint64_t *dst, size_t n, uint64_t value);
void vfiod_tce_fill_linear(uint64_t *dst, size_t n, uint64_t first, uint64_t step);
long vfiod_tce_translate(uint64_t *const *leaves, const uint64_t *leaf_ids, size_t nleaves,
                         unsigned leaf_shift, uint64_t bus_offset, unsigned page_shift,
                         uint64_t nb, const uint64_t *sg_iova, const uint64_t *sg_len,
                         size_t nsg, int write, const uint64_t *rs, const uint64_t *re,
                         size_t nr, uint32_t *out_reg, uint64_t *out_off, uint64_t *out_len,
                         size_t out_max, uint64_t *fault);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "vfiod._tce",
    (Path(__file__).parent / "tce.c").read_text(),
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
