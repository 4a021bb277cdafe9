/*
 * vfiod TCE tables: the sparse store, guest-list checks and translation (see tce.h).
 *
 * Every function here has a pure-Python twin in vfiod/spapr/fastpath.py; keep them in step.
 * Store writes are all-or-nothing on the entries: leaves a write needs are found (or
 * allocated, within the budget) before the first entry changes, and every write returns how
 * many of the entries it overwrote were valid (so callers keep counts without a second walk).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "tce.h"

#define VFIOD_TCE_ABI 5
#define NODE_MASK (VFIOD_TCE_LEAF_ENTRIES - 1)
#define MAX_LEAF_ID ((uint64_t)1 << (VFIOD_TCE_LEAF_SHIFT * VFIOD_TCE_DIR_LEVELS))
#define TCE_PERM 3ULL

int vfiod_tce_abi_version(void) { return VFIOD_TCE_ABI; }

static inline void *load_ptr(void *const *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void store_ptr(void **p, void *v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline int valid(uint64_t v) { return (v & TCE_PERM) != 0; }

static inline uint64_t load_be64(const char *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof(v));
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

/* ---- the radix store ------------------------------------------------------------------ */

struct vfiod_tce_store *vfiod_store_new(uint64_t nb_entries, uint64_t max_leaves)
{
    struct vfiod_tce_store *s = calloc(1, sizeof(*s));
    if (s) {
        s->nb_entries = nb_entries;
        s->max_leaves = max_leaves;
    }
    return s;
}

static void free_node(void **node, int level)
{
    if (!node)
        return;
    for (unsigned i = 0; i < VFIOD_TCE_LEAF_ENTRIES; i++) {
        void *child = node[i];
        if (!child)
            continue;
        if (level > 1)
            free_node((void **)child, level - 1);
        else
            free(child); /* a leaf */
    }
    free(node);
}

void vfiod_store_clear(struct vfiod_tce_store *s)
{
    void **root = s->root;
    store_ptr((void **)&s->root, NULL);
    free_node(root, VFIOD_TCE_DIR_LEVELS);
    s->valid = 0;
    s->leaves = 0;
    s->nodes = 0;
}

void vfiod_store_free(struct vfiod_tce_store *s)
{
    if (!s)
        return;
    vfiod_store_clear(s);
    free(s);
}

int vfiod_store_resize(struct vfiod_tce_store *s, uint64_t nb_entries)
{
    if (nb_entries < s->nb_entries || ((nb_entries - 1) >> VFIOD_TCE_LEAF_SHIFT) >= MAX_LEAF_ID)
        return -ERANGE;
    s->nb_entries = nb_entries;
    return 0;
}

/* The leaf holding leaf id ``lid``, or NULL. */
static uint64_t *leaf_get(const struct vfiod_tce_store *s, uint64_t lid)
{
    void **node;

    if (lid >= MAX_LEAF_ID)
        return NULL;
    node = load_ptr((void *const *)&s->root);
    for (int level = VFIOD_TCE_DIR_LEVELS - 1; level > 0 && node; level--)
        node = load_ptr(&node[(lid >> (VFIOD_TCE_LEAF_SHIFT * level)) & NODE_MASK]);
    return node ? (uint64_t *)load_ptr(&node[lid & NODE_MASK]) : NULL;
}

/* The leaf of ``lid``, allocated (with its directory nodes) if missing; NULL if out of memory. */
static uint64_t *leaf_alloc(struct vfiod_tce_store *s, uint64_t lid)
{
    void **slot = (void **)&s->root;
    for (int level = VFIOD_TCE_DIR_LEVELS; level > 0; level--) {
        void *next = load_ptr(slot);
        if (!next) {
            next = calloc(VFIOD_TCE_LEAF_ENTRIES, sizeof(void *));
            if (!next)
                return NULL;
            s->nodes++;
            store_ptr(slot, next);
        }
        slot = &((void **)next)[(lid >> (VFIOD_TCE_LEAF_SHIFT * (level - 1))) & NODE_MASK];
    }
    if (!load_ptr(slot)) {
        uint64_t *leaf = calloc(VFIOD_TCE_LEAF_ENTRIES, sizeof(uint64_t));
        if (!leaf)
            return NULL;
        s->leaves++;
        store_ptr(slot, leaf);
    }
    return (uint64_t *)load_ptr(slot);
}

/* Check the range and make sure every leaf it touches exists (all or nothing on entries). */
static int prepare(struct vfiod_tce_store *s, uint64_t idx, uint64_t n)
{
    uint64_t first, last, missing = 0;

    if (n == 0)
        return 0;
    if (idx >= s->nb_entries || n > s->nb_entries - idx)
        return -ERANGE;
    first = idx >> VFIOD_TCE_LEAF_SHIFT;
    last = (idx + n - 1) >> VFIOD_TCE_LEAF_SHIFT;
    if (s->max_leaves) {
        for (uint64_t lid = first; lid <= last; lid++)
            if (!leaf_get(s, lid) && ++missing + s->leaves > s->max_leaves)
                return -ENOSPC;
    }
    for (uint64_t lid = first; lid <= last; lid++)
        if (!leaf_alloc(s, lid))
            return -ENOMEM;
    return 0;
}

uint64_t vfiod_store_get(const struct vfiod_tce_store *s, uint64_t idx)
{
    const uint64_t *leaf = leaf_get(s, idx >> VFIOD_TCE_LEAF_SHIFT);
    return leaf ? leaf[idx & NODE_MASK] : 0;
}

/* Each writer walks the range leaf by leaf: ``put`` stores one entry and keeps the counts. */
#define PUT(leaf, off, v)                                                       \
    do {                                                                        \
        uint64_t old_ = (leaf)[off], new_ = (v);                                \
        was += valid(old_);                                                     \
        s->valid += (uint64_t)valid(new_) - (uint64_t)valid(old_);              \
        (leaf)[off] = new_;                                                     \
    } while (0)

long vfiod_store_fill(struct vfiod_tce_store *s, uint64_t idx, uint64_t n, uint64_t value)
{
    long was = 0;

    if (n && (idx >= s->nb_entries || n > s->nb_entries - idx))
        return -ERANGE;
    if (value) {
        int rc = prepare(s, idx, n);
        if (rc)
            return rc;
    }
    while (n) {
        uint64_t off = idx & NODE_MASK, cnt = VFIOD_TCE_LEAF_ENTRIES - off;
        uint64_t *leaf = leaf_get(s, idx >> VFIOD_TCE_LEAF_SHIFT);
        if (cnt > n)
            cnt = n;
        if (leaf) /* clearing never allocates: a missing leaf already reads as zero */
            for (uint64_t i = 0; i < cnt; i++)
                PUT(leaf, off + i, value);
        idx += cnt;
        n -= cnt;
    }
    return was;
}

long vfiod_store_fill_linear(struct vfiod_tce_store *s, uint64_t idx, uint64_t n,
                             uint64_t first, uint64_t step)
{
    long was = 0;
    int rc = prepare(s, idx, n);
    uint64_t v = first;

    if (rc)
        return rc;
    while (n) {
        uint64_t off = idx & NODE_MASK, cnt = VFIOD_TCE_LEAF_ENTRIES - off;
        uint64_t *leaf = leaf_get(s, idx >> VFIOD_TCE_LEAF_SHIFT);
        if (cnt > n)
            cnt = n;
        for (uint64_t i = 0; i < cnt; i++, v += step)
            PUT(leaf, off + i, v);
        idx += cnt;
        n -= cnt;
    }
    return was;
}

/* Walk [idx, idx+n) leaf by leaf after prepare(): ``body`` sees leaf, off, cnt and done. */
#define FOR_EACH_RUN(body)                                                      \
    do {                                                                        \
        uint64_t done_ = 0;                                                     \
        while (done_ < n) {                                                     \
            uint64_t at_ = idx + done_, off = at_ & NODE_MASK;                  \
            uint64_t cnt = VFIOD_TCE_LEAF_ENTRIES - off;                        \
            uint64_t *leaf = leaf_get(s, at_ >> VFIOD_TCE_LEAF_SHIFT);          \
            uint64_t done = done_;                                              \
            if (cnt > n - done_)                                                \
                cnt = n - done_;                                                \
            body;                                                               \
            done_ += cnt;                                                       \
        }                                                                       \
    } while (0)

long vfiod_store_write(struct vfiod_tce_store *s, uint64_t idx, const uint64_t *src, uint64_t n,
                       uint64_t or_bits)
{
    long was = 0;
    int rc = prepare(s, idx, n);

    if (rc)
        return rc;
    FOR_EACH_RUN(for (uint64_t i = 0; i < cnt; i++) PUT(leaf, off + i, src[done + i] | or_bits));
    return was;
}

long vfiod_store_write_be(struct vfiod_tce_store *s, uint64_t idx, const char *src, uint64_t n)
{
    long was = 0;
    int rc = prepare(s, idx, n);

    if (rc)
        return rc;
    FOR_EACH_RUN(for (uint64_t i = 0; i < cnt; i++)
                     PUT(leaf, off + i, load_be64(src + 8 * (done + i))));
    return was;
}

/* The first allocated leaf with id >= from_lid: its id, and its entries in *out (512 words). */
long vfiod_store_next_leaf(const struct vfiod_tce_store *s, uint64_t from_lid, uint64_t *out)
{
    uint64_t lid = from_lid;

    while (lid < MAX_LEAF_ID) {
        void **node = load_ptr((void *const *)&s->root);
        int level = VFIOD_TCE_DIR_LEVELS - 1;
        if (!node)
            return -1;
        /* descend as far as the path exists; skip the whole missing subtree otherwise */
        for (; level > 0; level--) {
            void **child = load_ptr(&node[(lid >> (VFIOD_TCE_LEAF_SHIFT * level)) & NODE_MASK]);
            if (!child)
                break;
            node = child;
        }
        if (level == 0) {
            const uint64_t *leaf = load_ptr(&node[lid & NODE_MASK]);
            if (leaf) {
                memcpy(out, leaf, VFIOD_TCE_LEAF_ENTRIES * sizeof(uint64_t));
                return (long)lid;
            }
            lid++;
        } else {
            uint64_t span = (uint64_t)1 << (VFIOD_TCE_LEAF_SHIFT * level);
            lid = (lid | (span - 1)) + 1;
        }
    }
    return -1;
}

/* ---- guest TCE checks (H_PUT_TCE, H_PUT_TCE_INDIRECT) --------------------------------- */

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
    uint64_t addr = v & ~TCE_PERM;
    long r;

    if ((v & TCE_PERM) == 0)
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
        uint64_t v = load_be64(src + 8 * i), addr = v & ~TCE_PERM;
        if ((v & TCE_PERM) && !(addr & mask) && addr >= lo && addr + mask < hi &&
            addr + mask >= addr)
            continue;
        if (!tce_ok(v, shift, rs, re, nr, check_mem))
            return (long)i;
        if ((v & TCE_PERM) && check_mem) {
            long r = region_find(rs, re, nr, addr);
            lo = rs[r];
            hi = re[r];
        }
    }
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

/* ---- translation ------------------------------------------------------------------------ */

/*
 * Translate a scatter-gather list through one window (its store, bus offset and page shift)
 * into (region, offset, length) pieces; contiguous pieces in the same region are merged.
 * Returns the number of pieces, -1 on a fault (fault[0] = faulting iova, fault[1] = sg index),
 * -2 if out_max is too small.
 */
long vfiod_tce_translate(const struct vfiod_tce_store *s, uint64_t bus_offset,
                         unsigned page_shift, const uint64_t *sg_iova, const uint64_t *sg_len,
                         size_t nsg, int write, const uint64_t *rs, const uint64_t *re,
                         size_t nr, uint32_t *out_reg, uint64_t *out_off, uint64_t *out_len,
                         size_t out_max, uint64_t *fault)
{
    const uint64_t pgsize = 1ULL << page_shift, pgmask = pgsize - 1;
    const uint64_t need = write ? 2 : 1;
    const uint64_t nb = s->nb_entries;
    size_t count = 0;
    uint64_t cached_id = ~0ULL;
    const uint64_t *cached = NULL;

    for (size_t k = 0; k < nsg; k++) {
        uint64_t iova = sg_iova[k], len = sg_len[k];
        while (len) {
            uint64_t idx, lid, tce, pa, chunk;
            long r;

            if (iova < bus_offset)
                goto fail;
            idx = (iova - bus_offset) >> page_shift;
            if (idx >= nb)
                goto fail;
            lid = idx >> VFIOD_TCE_LEAF_SHIFT;
            if (lid != cached_id) {
                cached_id = lid;
                cached = leaf_get(s, lid);
            }
            tce = cached ? cached[idx & NODE_MASK] : 0;
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
            fault[1] = k;
            return -1;
        }
    }
    return (long)count;
}
