/*
 * The session fast path: a vfio-user session's hot synchronous messages handled in C.
 *
 * A session's stream has one owner at a time. While the trio session (vfiod/server/session.py)
 * hands it to this engine, the engine reads the socket, handles the common case of DMA_MAP,
 * DMA_UNMAP (through the PE's C DMA view, pe_dma.h), REGION_READ and REGION_WRITE (of ranges the
 * function marked simple: config space without write hooks, read-only or plain registers; and
 * REGION_WRITE of ranges whose writes a C hook of the function handles, such as NVMe
 * doorbells) and writes the replies, in order. The first message it does not handle completely it leaves,
 * untouched, at the head of its buffer and returns VFU_PUNT: the session takes the whole buffer
 * back (bytes and fds, with their attribution) and handles it exactly as it always does, like
 * KVM's real-mode handlers answer H_TOO_HARD. The Python session is the reference; the tests
 * send the same streams both ways and compare replies and state.
 *
 * The engine runs either non-blocking inside the session's task, or blocking in a thread the
 * session's nursery owns (the GIL released), until a punt, EOF, an error, or vfu_wake() from a
 * session that is going away. It never calls Python.
 */
#ifndef VFIOD_VFU_H
#define VFIOD_VFU_H

#include <stdint.h>

#include "pe_dma.h"

/* vfu_run results (negative: -errno of a socket error) */
#define VFU_PUNT 1        /* the message at the head of the buffer is the session's */
#define VFU_NEED_DATA 2   /* non-blocking: nothing more to read now */
#define VFU_EOF 3         /* the peer closed the stream (the buffer may hold a partial message) */
#define VFU_WANT_WRITE 5  /* non-blocking: replies are waiting for room in the socket */
#define VFU_CTRUNC 6      /* the peer sent more fds than one recvmsg takes (all closed) */

#define VFU_RANGE_CONFIG 1 /* config space: masked writes, bytes with hooks punt */
#define VFU_RANGE_RO 2     /* read-only bytes the function keeps current; writes punt */
#define VFU_RANGE_RAM 3    /* plain memory: reads and writes */
#define VFU_RANGE_HOOK 4   /* writes go to the function's C hook (0: done; else punt); reads punt */

/* A function's C handler for writes to a hook range: offset from the range's start. It does
 * the write completely and returns 0, or returns nonzero having done nothing the function's
 * region_write would not redo, and the message is punted untouched. (The NVMe doorbell page:
 * cffi_build/nvme.h vfiod_nvme_doorbell_hook.) */
typedef int (*vfu_hook_fn)(void *ctx, uint64_t offset, const uint8_t *data, uint32_t count);

#define VFU_MAX_RANGES 16
#define VFU_RECV_FDS 64

struct vfu_range {
    uint32_t region;
    uint32_t kind;
    uint64_t offset, size;          /* where in the region, how many bytes */
    uint8_t *data;                  /* the function's bytes for [offset, offset + size) */
    const uint8_t *wmask, *w1cmask; /* config: writable and write-1-to-clear bits per byte */
    const uint8_t *hooked;          /* config: nonzero where a write must reach a hook */
    vfu_hook_fn hook;               /* hook: the handler and its context */
    void *ctx;
};

struct vfu_mark {
    uint64_t last;                  /* stream offset of the last byte of the chunk */
    uint32_t nfds;
    int fds[VFU_RECV_FDS];
};

struct vfu_session {
    int sock;
    uint32_t max_xfer;              /* max_data_xfer_size */
    uint32_t max_msg;               /* largest acceptable message */
    uint32_t batch;                 /* replies sent at least every this many messages */
    uint32_t stall_ms;              /* a blocking send gives a peer that does not read back to
                                     * the session this often (it checks the peer still exists) */
    uint8_t *rbuf;
    uint64_t rcap, rhead, rtail;    /* bytes rbuf[rhead, rtail) */
    uint64_t rpos;                  /* stream offset of rbuf[rhead] */
    struct vfu_mark *marks;
    uint32_t mcap, mhead, mcount;
    uint8_t *sbuf;
    uint64_t scap, slen;
    uint32_t pending;               /* replies in sbuf */
    uint32_t streaming;             /* the last read looked pipelined (see process()) */
    struct vfiod_pe_dma *dma;       /* NULL: every DMA message punts */
    struct vfu_range ranges[VFU_MAX_RANGES];
    uint32_t nranges;
    uint64_t messages;              /* handled here */
    uint64_t streak;                /* handled here since the last punt */
    uint64_t punts, sleeps;
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

#endif
