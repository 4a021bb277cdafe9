"""cffi builder for vfiod._fast: the C hot paths (sources in this folder, one header each).

``pip install`` builds it through setup.py's ``cffi_modules``; ``python cffi_build/build.py``
builds it in place for a quick edit-compile loop.
"""

import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SOURCES = ["tce.c", "pe_dma.c", "vfu.c", "irq.c", "nvme.c"]

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

#define VFIOD_DMA_MAX_FILES 64
#define VFIOD_DMA_WINDOWS 2
#define VFIOD_DMA_DONE 0
#define VFIOD_DMA_TOO_HARD 1

struct vfiod_eeh_flags {
    int32_t mmio_enabled;
    int32_t dma_enabled;
    int32_t config_blocked;
};

struct vfiod_dma_window {
    uint64_t start;
    uint64_t size;
    uint32_t page_shift;
    struct vfiod_tce_store *store;
};

struct vfiod_dma_file {
    uint64_t dev, ino;
    uint64_t vaddr;
    uint64_t size;
    uint32_t writable;
    int32_t fd;
    uint8_t *mem;
    uint32_t sealed;
};

struct vfiod_pe_dma {
    struct vfiod_dma_window win[2];
    struct vfiod_dma_file files[64];
    uint32_t nfiles;
    uint32_t closed;
    uint64_t maps_total;
    uint64_t unmaps_total;
    const struct vfiod_eeh_flags *eeh;
    ...;
};

struct vfiod_dma_piece {
    uint32_t file;
    uint64_t off, len;
};

struct iovec {
    void *iov_base;
    size_t iov_len;
};

int vfiod_dma_file_sealed(int fd);
void vfiod_pe_dma_init(struct vfiod_pe_dma *d);
void vfiod_pe_dma_lock(struct vfiod_pe_dma *d);
void vfiod_pe_dma_unlock(struct vfiod_pe_dma *d);
int vfiod_pe_dma_map(struct vfiod_pe_dma *d, uint64_t iova, uint64_t size, uint64_t offset,
                     uint32_t prot, int fd);
int vfiod_pe_dma_unmap(struct vfiod_pe_dma *d, uint64_t iova, uint64_t size);
long vfiod_pe_dma_pieces(const struct vfiod_pe_dma *d, uint64_t iova, uint64_t len, int write,
                         struct vfiod_dma_piece *out, long n, long max);
long vfiod_pe_dma_iovecs(const struct vfiod_pe_dma *d, const struct vfiod_dma_piece *p, long n,
                         struct iovec *out);
int vfiod_pe_dma_read(const struct vfiod_pe_dma *d, uint64_t iova, void *buf, uint64_t len);
int vfiod_pe_dma_write(const struct vfiod_pe_dma *d, uint64_t iova, const void *buf,
                       uint64_t len);

#define VFU_PUNT 1
#define VFU_NEED_DATA 2
#define VFU_EOF 3
#define VFU_WANT_WRITE 5
#define VFU_CTRUNC 6
#define VFU_RANGE_CONFIG 1
#define VFU_RANGE_RO 2
#define VFU_RANGE_RAM 3
#define VFU_RANGE_HOOK 4
#define VFU_MAX_RANGES 16
#define VFU_RECV_FDS 64

typedef int (*vfu_hook_fn)(void *ctx, uint64_t offset, const uint8_t *data, uint32_t count);

struct vfu_range {
    uint32_t region;
    uint32_t kind;
    uint64_t offset, size;
    uint8_t *data;
    const uint8_t *wmask, *w1cmask;
    const uint8_t *hooked;
    vfu_hook_fn hook;
    void *ctx;
};

struct vfu_session {
    int sock;
    uint32_t max_xfer;
    uint32_t max_msg;
    uint32_t batch;
    uint32_t stall_ms;
    struct vfiod_pe_dma *dma;
    struct vfu_range ranges[16];
    uint32_t nranges;
    uint64_t messages;
    uint64_t streak;
    uint64_t punts, sleeps;
    ...;
};

struct vfu_session *vfu_new(int sock, uint32_t max_xfer, uint32_t max_msg);
void vfu_free(struct vfu_session *s);
int vfu_feed(struct vfu_session *s, const uint8_t *data, uint64_t n, const int *fds,
             uint32_t nfds);
long vfu_run(struct vfu_session *s, int block);
long vfu_flush(struct vfu_session *s);
void vfu_wake(struct vfu_session *s);
uint64_t vfu_buffered(const struct vfu_session *s);
const uint8_t *vfu_data(const struct vfu_session *s);
uint32_t vfu_mark_count(const struct vfu_session *s);
uint64_t vfu_mark_end(const struct vfu_session *s, uint32_t i, int *fds, uint32_t *nfds);
void vfu_forget(struct vfu_session *s);

#define VFIOD_IRQ_VECTORS 256
#define VFIOD_IRQ_OFF 0
#define VFIOD_IRQ_MSI 1
#define VFIOD_IRQ_MSIX 2

struct vfiod_irq {
    uint32_t mode;
    uint32_t intx_level;
    int32_t fd[256];
    uint8_t pending[256];
    uint32_t npending;
    int32_t notify_fd;
    uint64_t signalled;
    ...;
};

void vfiod_irq_init(struct vfiod_irq *m);
int vfiod_irq_set(struct vfiod_irq *m, uint32_t v, int fd);
void vfiod_irq_set_mode(struct vfiod_irq *m, uint32_t mode, uint32_t intx_level);
int vfiod_irq_fire(struct vfiod_irq *m, uint32_t v);
uint32_t vfiod_irq_take(struct vfiod_irq *m, uint8_t *out, uint32_t max);
void vfiod_irq_close(struct vfiod_irq *m);

#define VFIOD_NVME_QUEUES 256
#define VFIOD_NVME_FETCH 64
#define VFIOD_NVME_MAX_IOV 1024
#define VFIOD_NVME_BUCKETS 11
#define VFIOD_NVME_DONE 0
#define VFIOD_NVME_STALLED 1
#define VFIOD_NVME_ROOM 2
#define VFIOD_NVME_FETCH_RUN 3
#define VFIOD_NVME_COMMAND 4
#define VFIOD_NVME_EXCEPTION 5
#define VFIOD_NVME_GONE 6
#define VFIOD_NVME_TOO_HARD 7
#define VFIOD_NVME_X_POST 1
#define VFIOD_NVME_X_REDO 2
#define VFIOD_NVME_X_FLUSH 3
#define VFIOD_NVME_WANT_EXC 1
#define VFIOD_NVME_WANT_INTX 2

struct vfiod_nvme_sq {
    uint64_t base;
    uint32_t size, head, tail, cqid;
    int32_t event_idx;
    uint32_t valid;
    uint32_t inflight;
};

struct vfiod_nvme_cq {
    uint64_t base;
    uint32_t size, head, tail, phase, vector, ien, valid;
    int32_t event_idx;
    uint32_t inflight;
    uint32_t overflow;
    uint32_t touched;
    uint32_t irq_pending;
};

struct vfiod_nvme_exc {
    uint32_t kind, sqid, cqid;
    uint16_t cid, sqhd;
    uint32_t status;
    int32_t err;
    uint8_t sqe[64];
};

struct vfiod_nvme {
    struct vfiod_nvme_sq sq[256];
    struct vfiod_nvme_cq cq[256];
    uint32_t enabled;
    uint32_t halted;
    uint32_t intms;
    uint32_t vectors;
    uint32_t msix_seen;
    uint32_t shadow;
    uint64_t shadow_db, shadow_ei;
    int32_t fd;
    uint32_t lba_shift;
    uint64_t nsze, max_transfer, page_size;
    uint32_t wce;
    const uint8_t *config;
    struct vfiod_pe_dma *dma;
    struct vfiod_irq *irq;
    int32_t notify_fd;
    uint32_t need_python;
    uint8_t cmd[64];
    uint64_t fetch_iova;
    uint32_t fetch_n;
    uint64_t reads, writes, bytes_read, bytes_written, syncs;
    uint64_t ok[3];
    uint64_t doorbells[2];
    uint64_t lat_bounds_ns[10];
    uint64_t lat[11];
    uint64_t lat_ns;
    uint32_t workers;
    uint64_t inflight;
    uint64_t jobs_async;
    uint64_t hooked;
    uint32_t nexc;
    ...;
};

struct vfiod_nvme *vfiod_nvme_new(void);
void vfiod_nvme_free(struct vfiod_nvme *nv);
void vfiod_nvme_lock(struct vfiod_nvme *nv);
void vfiod_nvme_unlock(struct vfiod_nvme *nv);
int vfiod_nvme_drain(struct vfiod_nvme *nv, uint32_t qid);
void vfiod_nvme_put_run(struct vfiod_nvme *nv, uint32_t qid, const uint8_t *raw, uint32_t n);
void vfiod_nvme_drop_run(struct vfiod_nvme *nv);
void vfiod_nvme_consume(struct vfiod_nvme *nv, uint32_t qid);
int vfiod_nvme_end_batch(struct vfiod_nvme *nv);
int vfiod_nvme_doorbell(struct vfiod_nvme *nv, uint64_t offset, uint32_t value);
int vfiod_nvme_doorbell_hook(void *ctx, uint64_t offset, const uint8_t *data, uint32_t count);
int vfiod_nvme_take(struct vfiod_nvme *nv, struct vfiod_nvme_exc *out);
void vfiod_nvme_release(struct vfiod_nvme *nv, uint32_t cqid);
void vfiod_nvme_quiesce(struct vfiod_nvme *nv, uint32_t sqid);
void vfiod_nvme_reset_queues(struct vfiod_nvme *nv);
void vfiod_nvme_start(struct vfiod_nvme *nv);
void vfiod_nvme_stop(struct vfiod_nvme *nv);
void vfiod_nvme_worker(struct vfiod_nvme *nv);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "vfiod._fast",
    "".join(f'#include "{name[:-2]}.h"\n' for name in SOURCES),
    # relative to the working directory (setup.py runs from the project root and setuptools
    # refuses absolute paths there)
    sources=[os.path.relpath(HERE / name) for name in SOURCES],
    include_dirs=[os.path.relpath(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE.parent), verbose=True)
