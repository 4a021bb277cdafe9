/*
 * vfiod PE DMA views in C: the common case of a vfio-user client's DMA_MAP and DMA_UNMAP,
 * done on the PE's TCE stores in place (vfiod/spapr/pe_dma.py is the reference twin).
 *
 * The structure is owned by a Python PeDma (one per session), which fills it in whenever its
 * windows or RAM files change and never while a C caller is running. C handles a map or unmap
 * completely, or touches nothing and answers VFIOD_DMA_TOO_HARD, like KVM's real-mode TCE
 * handlers answer H_TOO_HARD: then the Python PeDma does it (new RAM file, window to create or
 * grow, any error, anything unusual).
 */
#ifndef VFIOD_PE_DMA_H
#define VFIOD_PE_DMA_H

#include <stdint.h>

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
    uint64_t vaddr;                 /* host address of file offset 0 */
    uint64_t size;                  /* bytes that may be mapped */
    uint32_t writable;
};

struct vfiod_pe_dma {
    struct vfiod_dma_window win[VFIOD_DMA_WINDOWS];
    struct vfiod_dma_file files[VFIOD_DMA_MAX_FILES];
    uint32_t nfiles;
    uint32_t closed;
    uint64_t maps_total;
    uint64_t unmaps_total;
    const struct vfiod_eeh_flags *eeh;
};

int vfiod_pe_dma_map(struct vfiod_pe_dma *d, uint64_t iova, uint64_t size, uint64_t offset,
                     uint32_t prot, int fd);
int vfiod_pe_dma_unmap(struct vfiod_pe_dma *d, uint64_t iova, uint64_t size);

#endif
