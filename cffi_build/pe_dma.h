/*
 * vfiod PE DMA views in C: the common case of a vfio-user client's DMA_MAP and DMA_UNMAP,
 * done on the PE's TCE stores in place (vfiod/spapr/pe_dma.py is the reference twin).
 *
 * The structure is owned by a Python PeDma (one per session), which fills it in whenever its
 * windows or RAM files change and never while a C caller is running. C handles a map or unmap
 * completely, or touches nothing and answers VFIOD_DMA_TOO_HARD, like KVM's real-mode TCE
 * handlers answer H_TOO_HARD: then the Python PeDma does it (new RAM file, window to create or
 * grow, any error, anything unusual).
 *
 * Device DMA (the NVMe data mover, cffi_build/nvme.c) translates through the same view from
 * other threads: vfiod_pe_dma_pieces and the copies below run with ``lock`` held, and the
 * Python PeDma takes it around everything that changes windows or files or frees table nodes
 * (map, unmap-all, close). The session fast path's maps and unmaps only write entries and
 * publish new leaves, which readers may see concurrently (tce.h), so they need no lock.
 * Translation gives the same answers as the Python PeDma's, or TOO_HARD where Python decides
 * (a fault, frozen DMA, memory of no file of this session, anything unusual), having touched
 * nothing.
 */
#ifndef VFIOD_PE_DMA_H
#define VFIOD_PE_DMA_H

#include <pthread.h>
#include <stdint.h>
#include <sys/uio.h>

#include "tce.h"

#define VFIOD_DMA_MAX_FILES 64
#define VFIOD_DMA_WINDOWS 2
#define VFIOD_DMA_DONE 0
#define VFIOD_DMA_TOO_HARD 1

/* The PE's EEH state as the fast paths need it; written by Python's EehState on every change. */
struct vfiod_eeh_flags {
    int32_t mmio_enabled;
    int32_t dma_enabled;
    int32_t config_blocked;
};

struct vfiod_dma_window {
    uint64_t start;
    uint64_t size;                  /* 0: no window in this slot */
    uint32_t page_shift;
    struct vfiod_tce_store *store;
};

struct vfiod_dma_file {
    uint64_t dev, ino;              /* (st_dev, st_ino): how QEMU's fds are recognised */
    uint64_t vaddr;                 /* platform host address of file offset 0 (what TCEs hold) */
    uint64_t size;                  /* bytes that may be mapped */
    uint32_t writable;
    int32_t fd;                     /* the file's fd, open while the file is listed */
    uint8_t *mem;                   /* this process's mapping of the file (NULL: none) */
    uint32_t sealed;                /* a tmpfs memfd sealed against shrinking: loads and stores
                                     * in ``mem`` can never fault, so small copies use memcpy;
                                     * any other file is only touched by the kernel (pread,
                                     * pwrite, preadv, pwritev: EFAULT, never SIGBUS) */
};

struct vfiod_pe_dma {
    struct vfiod_dma_window win[VFIOD_DMA_WINDOWS];
    struct vfiod_dma_file files[VFIOD_DMA_MAX_FILES];
    uint32_t nfiles;
    uint32_t closed;
    uint64_t maps_total;
    uint64_t unmaps_total;
    const struct vfiod_eeh_flags *eeh;
    pthread_mutex_t lock;           /* device DMA vs Python's changes (see above) */
};

/* One translated piece: bytes [off, off + len) of files[file]. */
struct vfiod_dma_piece {
    uint32_t file;
    uint64_t off, len;
};

/* Whether fd is a tmpfs memfd sealed against shrinking (``sealed`` above). */
int vfiod_dma_file_sealed(int fd);
void vfiod_pe_dma_init(struct vfiod_pe_dma *d);
void vfiod_pe_dma_lock(struct vfiod_pe_dma *d);
void vfiod_pe_dma_unlock(struct vfiod_pe_dma *d);

int vfiod_pe_dma_map(struct vfiod_pe_dma *d, uint64_t iova, uint64_t size, uint64_t offset,
                     uint32_t prot, int fd);
int vfiod_pe_dma_unmap(struct vfiod_pe_dma *d, uint64_t iova, uint64_t size);

/* With d->lock held. Append the pieces of [iova, iova + len) to out[0..n) (merged where they
 * continue the last one), for a device read (write=0: needs TCE read) or write; returns the new
 * count, or -1 (TOO_HARD, out unchanged beyond n) when Python must decide. */
long vfiod_pe_dma_pieces(const struct vfiod_pe_dma *d, uint64_t iova, uint64_t len, int write,
                         struct vfiod_dma_piece *out, long n, long max);
/* With d->lock held. Host iovecs for pieces (every file mapped), or -1. */
long vfiod_pe_dma_iovecs(const struct vfiod_pe_dma *d, const struct vfiod_dma_piece *p, long n,
                         struct iovec *out);
/* With d->lock held. A small device read or write of guest memory: translated first, then
 * copied (memcpy in sealed files, else pread/pwrite, the file's size checked first); 0, or
 * VFIOD_DMA_TOO_HARD with nothing read or written. */
int vfiod_pe_dma_read(const struct vfiod_pe_dma *d, uint64_t iova, void *buf, uint64_t len);
int vfiod_pe_dma_write(const struct vfiod_pe_dma *d, uint64_t iova, const void *buf,
                       uint64_t len);

#endif
