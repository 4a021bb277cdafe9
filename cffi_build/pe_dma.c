/*
 * The common case of DMA_MAP and DMA_UNMAP through a PE (see pe_dma.h). Every check here is one
 * the Python PeDma makes; whatever would take a decision this file does not make (a new RAM
 * file, a window to create or grow, an error reply) is VFIOD_DMA_TOO_HARD with nothing changed.
 */
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "pe_dma.h"

#define PAGE_SHIFT 12
#define PAGE_MASK ((1ULL << PAGE_SHIFT) - 1)
#define DMA_READ 1u
#define DMA_WRITE 2u

/* The window holding all of [iova, iova+size), or NULL. */
static const struct vfiod_dma_window *window_for(const struct vfiod_pe_dma *d, uint64_t iova,
                                                 uint64_t size)
{
    for (int i = 0; i < VFIOD_DMA_WINDOWS; i++) {
        const struct vfiod_dma_window *w = &d->win[i];
        if (!w->size || w->page_shift != PAGE_SHIFT || iova < w->start)
            continue;
        if (iova - w->start < w->size && size <= w->size - (iova - w->start))
            return w;
    }
    return NULL;
}

int vfiod_pe_dma_map(struct vfiod_pe_dma *d, uint64_t iova, uint64_t size, uint64_t offset,
                     uint32_t prot, int fd)
{
    const struct vfiod_dma_window *w;
    const struct vfiod_dma_file *f = NULL;
    struct stat st;

    if (d->closed || fd < 0 || (prot & ~(DMA_READ | DMA_WRITE)) || !prot)
        return VFIOD_DMA_TOO_HARD;
    if (!size || iova + size < iova || ((iova | size | offset) & PAGE_MASK))
        return VFIOD_DMA_TOO_HARD; /* (a map ending exactly at 2^64 lies in no window anyway) */
    w = window_for(d, iova, size);
    if (!w || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
        return VFIOD_DMA_TOO_HARD;
    for (uint32_t i = 0; i < d->nfiles; i++) {
        if (d->files[i].dev == (uint64_t)st.st_dev && d->files[i].ino == (uint64_t)st.st_ino) {
            f = &d->files[i];
            break;
        }
    }
    if (!f || offset > f->size || size > f->size - offset)
        return VFIOD_DMA_TOO_HARD;
    if ((prot & DMA_WRITE) && !f->writable)
        return VFIOD_DMA_TOO_HARD;
    if (vfiod_store_fill_linear(w->store, (iova - w->start) >> PAGE_SHIFT, size >> PAGE_SHIFT,
                                (f->vaddr + offset) | prot, 1ULL << PAGE_SHIFT) < 0)
        return VFIOD_DMA_TOO_HARD; /* budget or memory: nothing written, Python reports it */
    close(fd); /* the same file again: the session keeps its first fd */
    d->maps_total++;
    return VFIOD_DMA_DONE;
}

int vfiod_pe_dma_unmap(struct vfiod_pe_dma *d, uint64_t iova, uint64_t size)
{
    typedef unsigned __int128 u128; /* an unmap may end exactly at 2^64 */
    const u128 end = (u128)iova + size;

    if (d->closed || !size || end > ((u128)1 << 64) || ((iova | size) & PAGE_MASK))
        return VFIOD_DMA_TOO_HARD;
    for (int i = 0; i < VFIOD_DMA_WINDOWS; i++) {
        const struct vfiod_dma_window *w = &d->win[i];
        const u128 wend = (u128)w->start + w->size;
        uint64_t lo;
        u128 hi;
        if (!w->size || w->page_shift != PAGE_SHIFT)
            continue;
        lo = iova > w->start ? iova : w->start;
        hi = end < wend ? end : wend;
        if ((u128)lo < hi)
            vfiod_store_fill(w->store, (lo - w->start) >> PAGE_SHIFT,
                             (uint64_t)((hi - lo) >> PAGE_SHIFT), 0);
    }
    d->unmaps_total++;
    return VFIOD_DMA_DONE;
}

/* ---- files ---------------------------------------------------------------------------------- */

#ifndef F_GET_SEALS
#define F_GET_SEALS 1034
#define F_SEAL_SHRINK 0x0002
#endif
#define TMPFS_MAGIC_ 0x01021994

int vfiod_dma_file_sealed(int fd)
{
    struct statfs sf;
    int seals = fcntl(fd, F_GET_SEALS);
    /* tmpfs only: a hugetlbfs hole can still SIGBUS when the pool runs dry */
    return seals >= 0 && (seals & F_SEAL_SHRINK) && fstatfs(fd, &sf) == 0 &&
           sf.f_type == TMPFS_MAGIC_;
}

/* ---- locking ------------------------------------------------------------------------------ */

void vfiod_pe_dma_init(struct vfiod_pe_dma *d)
{
    pthread_mutex_init(&d->lock, NULL);
}

void vfiod_pe_dma_lock(struct vfiod_pe_dma *d) { pthread_mutex_lock(&d->lock); }
void vfiod_pe_dma_unlock(struct vfiod_pe_dma *d) { pthread_mutex_unlock(&d->lock); }

/* ---- device DMA: translation ---------------------------------------------------------------- */

/* The window holding iova (any page size), or NULL: like Pe.window_for. */
static const struct vfiod_dma_window *window_at(const struct vfiod_pe_dma *d, uint64_t iova)
{
    for (int i = 0; i < VFIOD_DMA_WINDOWS; i++) {
        const struct vfiod_dma_window *w = &d->win[i];
        if (w->size && w->store && iova >= w->start && iova - w->start < w->size)
            return w;
    }
    return NULL;
}

/* The listed file holding [pa, pa + n), or -1 (Python: no region, or not a client file). */
static long file_at(const struct vfiod_pe_dma *d, uint64_t pa, uint64_t n, uint32_t hint)
{
    if (hint < d->nfiles) {
        const struct vfiod_dma_file *f = &d->files[hint];
        if (pa >= f->vaddr && pa - f->vaddr < f->size && n <= f->size - (pa - f->vaddr))
            return hint;
    }
    for (uint32_t i = 0; i < d->nfiles; i++) {
        const struct vfiod_dma_file *f = &d->files[i];
        if (pa >= f->vaddr && pa - f->vaddr < f->size && n <= f->size - (pa - f->vaddr))
            return i;
    }
    return -1;
}

long vfiod_pe_dma_pieces(const struct vfiod_pe_dma *d, uint64_t iova, uint64_t len, int write,
                         struct vfiod_dma_piece *out, long n, long max)
{
    const struct vfiod_dma_window *w;
    const uint64_t need = write ? 2 : 1; /* TCE_WRITE : TCE_READ */
    uint64_t pgsize, pgmask;
    uint32_t hint = n ? out[n - 1].file : 0;
    long count = n;

    if (!len)
        return n;
    if (d->closed || !d->eeh || !d->eeh->dma_enabled || iova + len < iova)
        return -1;
    /* one window per element, as Pe.translate_regions: crossing its end is a fault */
    w = window_at(d, iova);
    if (!w || w->page_shift >= 64)
        return -1;
    pgsize = 1ULL << w->page_shift;
    pgmask = pgsize - 1;
    while (len) {
        uint64_t idx = (iova - w->start) >> w->page_shift, tce, pa, chunk;
        long f;
        if (idx >= w->store->nb_entries)
            return -1;
        tce = vfiod_store_get(w->store, idx);
        if (!(tce & need))
            return -1;
        chunk = pgsize - (iova & pgmask);
        if (chunk > len)
            chunk = len;
        pa = (tce & ~pgmask) | (iova & pgmask);
        f = file_at(d, pa, chunk, hint);
        if (f < 0)
            return -1;
        hint = (uint32_t)f;
        if (count > 0 && out[count - 1].file == (uint32_t)f &&
            out[count - 1].off + out[count - 1].len == pa - d->files[f].vaddr) {
            out[count - 1].len += chunk;
        } else {
            if (count >= max)
                return -1;
            out[count].file = (uint32_t)f;
            out[count].off = pa - d->files[f].vaddr;
            out[count].len = chunk;
            count++;
        }
        iova += chunk;
        len -= chunk;
    }
    return count;
}

long vfiod_pe_dma_iovecs(const struct vfiod_pe_dma *d, const struct vfiod_dma_piece *p, long n,
                         struct iovec *out)
{
    for (long i = 0; i < n; i++) {
        const struct vfiod_dma_file *f = &d->files[p[i].file];
        if (!f->mem)
            return -1;
        out[i].iov_base = f->mem + p[i].off;
        out[i].iov_len = p[i].len;
    }
    return n;
}

/* ---- device DMA: small copies ------------------------------------------------------------- */

#define SMALL_PIECES 8

int vfiod_pe_dma_read(const struct vfiod_pe_dma *d, uint64_t iova, void *buf, uint64_t len)
{
    struct vfiod_dma_piece p[SMALL_PIECES];
    long n = vfiod_pe_dma_pieces(d, iova, len, 0, p, 0, SMALL_PIECES);
    uint8_t *dst = buf;

    if (n < 0)
        return VFIOD_DMA_TOO_HARD;
    for (long i = 0; i < n; i++) {
        const struct vfiod_dma_file *f = &d->files[p[i].file];
        if (f->sealed && f->mem) {
            memcpy(dst, f->mem + p[i].off, p[i].len);
            if (p[i].len == 4) /* a doorbell slot: see what the host published before it */
                __atomic_thread_fence(__ATOMIC_ACQUIRE);
        } else if (pread(f->fd, dst, p[i].len, (off_t)p[i].off) != (ssize_t)p[i].len) {
            return VFIOD_DMA_TOO_HARD; /* a file that shrank: Python faults (and freezes) */
        }
        dst += p[i].len;
    }
    return VFIOD_DMA_DONE;
}

/* Store bytes [from, to) of src at piece p. */
static int put(const struct vfiod_dma_file *f, const struct vfiod_dma_piece *p,
               const uint8_t *src, uint64_t from, uint64_t to)
{
    if (from >= to)
        return 0;
    if (f->sealed && f->mem) {
        memcpy(f->mem + p->off + from, src + from, to - from);
        return 0;
    }
    return pwrite(f->fd, src + from, to - from, (off_t)(p->off + from)) == (ssize_t)(to - from)
               ? 0
               : -1;
}

/*
 * The last 4 bytes land after everything else (a CQE's phase tag, which tells the host the
 * entry is complete, is in its last dword), ordered by a release fence.
 */
int vfiod_pe_dma_write(const struct vfiod_pe_dma *d, uint64_t iova, const void *buf,
                       uint64_t len)
{
    struct vfiod_dma_piece p[SMALL_PIECES];
    long n = vfiod_pe_dma_pieces(d, iova, len, 1, p, 0, SMALL_PIECES);
    const uint8_t *src = buf;
    uint64_t pos = 0, tail = len > 4 ? len - 4 : 0;

    if (n < 0)
        return VFIOD_DMA_TOO_HARD;
    for (long i = 0; i < n; i++) { /* a file that shrank must not be written at all */
        const struct vfiod_dma_file *f = &d->files[p[i].file];
        struct stat st;
        if (f->sealed && f->mem)
            continue;
        if (fstat(f->fd, &st) != 0 || (uint64_t)st.st_size < p[i].off + p[i].len)
            return VFIOD_DMA_TOO_HARD;
    }
    for (int pass = 0; pass < 2; pass++) {
        pos = 0;
        for (long i = 0; i < n; i++) {
            uint64_t lo = pos, hi = pos + p[i].len;
            /* pass 0: bytes before ``tail``; pass 1: the rest */
            uint64_t a = pass ? (lo > tail ? lo : tail) : lo;
            uint64_t b = pass ? hi : (hi < tail ? hi : tail);
            /* a pwrite can only fail here if the file shrank since the size check: bytes
             * written before stay written, as with Python's PeDma.write */
            if (a < b && put(&d->files[p[i].file], &p[i], src + lo, a - lo, b - lo) != 0)
                return VFIOD_DMA_TOO_HARD;
            pos = hi;
        }
        if (!pass)
            __atomic_thread_fence(__ATOMIC_RELEASE);
    }
    return VFIOD_DMA_DONE;
}
