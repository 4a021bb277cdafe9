/*
 * vfiod TCE tables in C: a sparse radix store of host-order u64 TCEs, the KVM-style checks of
 * guest TCE lists, and scatter-gather translation through a window.
 *
 * One store per DMA window. It is owned by the Python Window object (vfiod/spapr/window.py,
 * through vfiod/spapr/fastpath.py), which frees it; C code (the session fast path, the NVMe data
 * mover) reads and writes it in place while Python does not change the window. Leaves and
 * directory nodes are published with release stores and read with acquire loads, so a reader
 * in another thread never sees an uninitialised node; entries are plain aligned 64-bit words.
 * Nodes are freed only by vfiod_store_clear/free, which the owner calls when no other thread
 * can be translating through the window.
 */
#ifndef VFIOD_TCE_H
#define VFIOD_TCE_H

#include <stddef.h>
#include <stdint.h>

#define VFIOD_TCE_LEAF_SHIFT 9                       /* 512 entries = 4 KiB per leaf */
#define VFIOD_TCE_LEAF_ENTRIES (1u << VFIOD_TCE_LEAF_SHIFT)
#define VFIOD_TCE_DIR_LEVELS 4                       /* leaf ids below 2^36 */

struct vfiod_tce_store {
    void **root;           /* directory of VFIOD_TCE_DIR_LEVELS levels of 512 pointers */
    uint64_t nb_entries;   /* entries addressable (the window's size in IOMMU pages) */
    uint64_t valid;        /* entries granting TCE_READ or TCE_WRITE */
    uint64_t leaves;       /* allocated leaves */
    uint64_t nodes;        /* allocated directory nodes */
    uint64_t max_leaves;   /* allocation budget, 0 = unlimited */
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

#endif
