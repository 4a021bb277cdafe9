/*
 * vfiod._tce: the hot loops of the sPAPR TCE model.
 *
 * Tables are stored as host-order u64 leaf arrays owned by Python (cffi memory). Guests hand
 * us big-endian lists (H_PUT_TCE_INDIRECT), so the batch writer byte-swaps while copying.
 * Every function here has a pure-Python twin in vfiod/spapr/fastpath.py; keep them in step.
 */
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#define VFIOD_TCE_ABI 3

int vfiod_tce_abi_version(void) { return VFIOD_TCE_ABI; }

static inline uint64_t load_be64(const char *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof(v));
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

void vfiod_tce_copy_be(uint64_t *dst, const char *src, size_t n);

/* Region containing addr (rs sorted, re exclusive ends), or -1. */
static long region_find(const uint64_t *rs, const uint64_t *re, size_t nr, uint64_t addr)
{
    size_t lo = 0, hi = nr;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (rs[mid] <= addr)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return -1;
    lo--;
    return addr < re[lo] ? (long)lo : -1;
}

/* A TCE is acceptable if it grants nothing (poison allowed), or if its address is aligned to
 * the IOMMU page and, when asked, the whole page lies inside one memory region. */
static int tce_ok(uint64_t v, unsigned shift, const uint64_t *rs, const uint64_t *re,
                  size_t nr, int check_mem)
{
    uint64_t mask = (shift >= 64) ? ~0ULL : ((1ULL << shift) - 1);
    uint64_t addr = v & ~3ULL;
    long r;

    if ((v & 3) == 0)
        return 1;
    if (addr & mask)
        return 0;
    if (!check_mem)
        return 1;
    r = region_find(rs, re, nr, addr);
    if (r < 0)
        return 0;
    if (addr + mask < addr)
        return 0;
    return addr + mask < re[r];
}

/* Index of the first bad entry of a big-endian list, or -1 if all are acceptable.
 * Consecutive entries usually hit the same region, so that one is tried before searching. */
long vfiod_tce_validate_be(const char *src, size_t n, unsigned shift, const uint64_t *rs,
                           const uint64_t *re, size_t nr, int check_mem)
{
    uint64_t lo = 1, hi = 0; /* last region known to hold a whole page: [lo, hi) */
    const uint64_t mask = (1ULL << shift) - 1;

    for (size_t i = 0; i < n; i++) {
        uint64_t v = load_be64(src + 8 * i), addr = v & ~3ULL;
        if ((v & 3) && !(addr & mask) && addr >= lo && addr + mask < hi && addr + mask >= addr)
            continue;
        if (!tce_ok(v, shift, rs, re, nr, check_mem))
            return (long)i;
        if ((v & 3) && check_mem) {
            long r = region_find(rs, re, nr, addr);
            lo = rs[r];
            hi = re[r];
        }
    }
    return -1;
}

/* H_PUT_TCE_INDIRECT core: validate all n big-endian entries, then (only if all are good)
 * write the first n0 to dst0 and the rest to dst1 (a batch spans at most two leaves).
 * Returns -1 on success, else the index of the first bad entry (nothing written). */
long vfiod_tce_put_batch_be(uint64_t *dst0, size_t n0, uint64_t *dst1, const char *src,
                            size_t n, unsigned shift, const uint64_t *rs, const uint64_t *re,
                            size_t nr, int check_mem)
{
    long bad = vfiod_tce_validate_be(src, n, shift, rs, re, nr, check_mem);
    if (bad >= 0)
        return bad;
    if (n0 > n)
        n0 = n;
    vfiod_tce_copy_be(dst0, src, n0);
    if (n > n0)
        vfiod_tce_copy_be(dst1, src + 8 * n0, n - n0);
    return -1;
}

/* Same for a host-order list. */
long vfiod_tce_validate(const uint64_t *src, size_t n, unsigned shift, const uint64_t *rs,
                        const uint64_t *re, size_t nr, int check_mem)
{
    for (size_t i = 0; i < n; i++)
        if (!tce_ok(src[i], shift, rs, re, nr, check_mem))
            return (long)i;
    return -1;
}

void vfiod_tce_copy_be(uint64_t *dst, const char *src, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = load_be64(src + 8 * i);
}

void vfiod_tce_copy(uint64_t *dst, const uint64_t *src, size_t n, uint64_t or_bits)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = src[i] | or_bits;
}

void vfiod_tce_fill(uint64_t *dst, size_t n, uint64_t value)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = value;
}

void vfiod_tce_fill_linear(uint64_t *dst, size_t n, uint64_t first, uint64_t step)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = first + (uint64_t)i * step;
}

/*
 * Translate a scatter-gather list through one window into (region, offset, length) pieces.
 * leaves/leaf_ids: the allocated leaves of the table, leaf_ids sorted; a missing leaf reads 0.
 * Contiguous pieces in the same region are merged. Returns the number of pieces, -1 on a
 * fault (fault[0] = faulting iova, fault[1] = sg index), -2 if out_max is too small.
 */
long vfiod_tce_translate(uint64_t *const *leaves, const uint64_t *leaf_ids, size_t nleaves,
                         unsigned leaf_shift, uint64_t bus_offset, unsigned page_shift,
                         uint64_t nb, const uint64_t *sg_iova, const uint64_t *sg_len,
                         size_t nsg, int write, const uint64_t *rs, const uint64_t *re,
                         size_t nr, uint32_t *out_reg, uint64_t *out_off, uint64_t *out_len,
                         size_t out_max, uint64_t *fault)
{
    const uint64_t pgsize = 1ULL << page_shift, pgmask = pgsize - 1;
    const uint64_t leaf_mask = (1ULL << leaf_shift) - 1;
    const uint64_t need = write ? 2 : 1;
    size_t count = 0;
    uint64_t cached_id = ~0ULL;
    const uint64_t *cached = NULL;

    for (size_t s = 0; s < nsg; s++) {
        uint64_t iova = sg_iova[s], len = sg_len[s];
        while (len) {
            uint64_t idx, lid, tce, pa, chunk;
            long r;

            if (iova < bus_offset)
                goto fail;
            idx = (iova - bus_offset) >> page_shift;
            if (idx >= nb)
                goto fail;
            lid = idx >> leaf_shift;
            if (lid != cached_id) {
                size_t lo = 0, hi = nleaves;
                while (lo < hi) {
                    size_t mid = lo + (hi - lo) / 2;
                    if (leaf_ids[mid] < lid)
                        lo = mid + 1;
                    else
                        hi = mid;
                }
                cached_id = lid;
                cached = (lo < nleaves && leaf_ids[lo] == lid) ? leaves[lo] : NULL;
            }
            tce = cached ? cached[idx & leaf_mask] : 0;
            if (!(tce & need))
                goto fail;
            chunk = pgsize - (iova & pgmask);
            if (chunk > len)
                chunk = len;
            pa = (tce & ~pgmask) | (iova & pgmask);
            r = region_find(rs, re, nr, pa);
            if (r < 0 || pa + chunk > re[r] || pa + chunk < pa)
                goto fail;
            if (count && out_reg[count - 1] == (uint32_t)r &&
                out_off[count - 1] + out_len[count - 1] == pa - rs[r]) {
                out_len[count - 1] += chunk;
            } else {
                if (count == out_max)
                    return -2;
                out_reg[count] = (uint32_t)r;
                out_off[count] = pa - rs[r];
                out_len[count] = chunk;
                count++;
            }
            iova += chunk;
            len -= chunk;
            continue;
fail:
            fault[0] = iova;
            fault[1] = s;
            return -1;
        }
    }
    return (long)count;
}
