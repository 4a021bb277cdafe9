/*
 * The common case of DMA_MAP and DMA_UNMAP through a PE (see pe_dma.h). Every check here is one
 * the Python PeDma makes; whatever would take a decision this file does not make (a new RAM
 * file, a window to create or grow, an error reply) is VFIOD_DMA_TOO_HARD with nothing changed.
 */
#include <sys/stat.h>
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
