/*
 * The NVMe data path in C: queue state, doorbell batches of I/O queues, the common NVM commands
 * (Read, Write, Flush) moved between the namespace and guest RAM, and a worker pool that runs
 * them asynchronously.
 *
 * One ``struct vfiod_nvme`` per controller (vfiod/devices/nvme/controller.py), holding the state
 * of every queue. The Python QueueEngine (vfiod/devices/nvme/queues.py) is its only owner: it
 * reads and writes the queue records through its views, with ``lock`` held, and calls the
 * functions below marked (locked) with the lock held. Three kinds of C callers take the lock
 * themselves: the doorbell hook (the session fast path runs it for an MMIO doorbell write,
 * cffi_build/vfu.c), the workers (vfiod_nvme_worker), and nothing else.
 *
 * The Python command sets stay the reference. C does a command completely or not at all: the
 * first entry it cannot do (an admin queue, another opcode, a bad field, a PRP or data buffer
 * that does not translate through the PE, bus mastering off, anything unusual) it leaves at the
 * head of its SQ and returns VFIOD_NVME_COMMAND; the engine runs it in Python and calls C again,
 * so every status, error log entry, DMA fault and EEH freeze comes from Python. Each drain step
 * mirrors QueueEngine._drain exactly (the same runs of fetched entries, the same room checks),
 * so a controller with the C mover and one without give the same completions, memory and
 * counters (tests/devices/nvme/test_nvme_c_mover.py).
 *
 * With workers (vfiod_nvme_worker running in threads a trio nursery owns), a drained command
 * holds one entry of credit on its CQ (a full CQ still stalls the SQ) and goes to the pool; the
 * worker moves the data with preadv/pwritev, then posts the completion (translated through the
 * PE at that moment) and raises the CQ's vector through the interrupt mirror (irq.h), in any
 * order the completions finish. What a worker cannot finish (the completion's slot does not
 * translate, an I/O error, a failed fdatasync) becomes an exception for Python, which completes
 * the command (redoing a read or write: both are idempotent) and is woken through notify_fd.
 */
#ifndef VFIOD_NVME_H
#define VFIOD_NVME_H

#include <pthread.h>
#include <stdint.h>
#include <sys/uio.h>

#include "irq.h"
#include "pe_dma.h"

#define VFIOD_NVME_QUEUES 256 /* queue ids 0..255 (io_queues <= 255) */
#define VFIOD_NVME_FETCH 64   /* SQ entries fetched per DMA read (queues.py FETCH_BATCH) */
#define VFIOD_NVME_MAX_IOV 1024
#define VFIOD_NVME_BUCKETS 11 /* metrics.Histogram: 10 bounds and +Inf */

/* drain results (vfiod_nvme_drain) */
#define VFIOD_NVME_DONE 0      /* the SQ is empty up to its tail */
#define VFIOD_NVME_STALLED 1   /* the CQ is full: the SQ waits for its head doorbell */
#define VFIOD_NVME_ROOM 2      /* the CQ looks full and shadow doorbells are on: Python looks */
#define VFIOD_NVME_FETCH_RUN 3 /* the next run of entries did not translate: Python fetches it
                                * (fetch_iova, fetch_n) and hands it over, or faults */
#define VFIOD_NVME_COMMAND 4   /* the entry in ``cmd`` is Python's (not consumed yet) */
#define VFIOD_NVME_EXCEPTION 5 /* a command needs Python to complete it (vfiod_nvme_take) */
#define VFIOD_NVME_GONE 6      /* the controller halted or the SQ went away */
#define VFIOD_NVME_TOO_HARD 7  /* doorbell / end of batch: Python does it (see the .c) */

/* exception kinds: commands C consumed but Python completes */
#define VFIOD_NVME_X_POST 1  /* done; its completion did not translate: post it */
#define VFIOD_NVME_X_REDO 2  /* Read/Write whose I/O failed: run it again in Python */
#define VFIOD_NVME_X_FLUSH 3 /* Flush, or a FUA write, whose fdatasync failed: media error */

/* need_python bits: what woke Python through notify_fd */
#define VFIOD_NVME_WANT_EXC 1  /* exceptions to complete */
#define VFIOD_NVME_WANT_INTX 2 /* a worker posted while messages were off: the INTx level */

struct vfiod_nvme_sq {
    uint64_t base;
    uint32_t size, head, tail, cqid;
    int32_t event_idx;  /* last EventIdx published, -1: none */
    uint32_t valid;
    uint32_t inflight;  /* commands of this SQ consumed and not finished (with the workers) */
};

struct vfiod_nvme_cq {
    uint64_t base;
    uint32_t size, head, tail, phase, vector, ien, valid;
    int32_t event_idx;
    uint32_t inflight;    /* credit: completions owed to this CQ by commands in flight */
    uint32_t overflow;    /* completions in Python's overflow queue (AERs) */
    uint32_t touched;     /* its EventIdx may need publishing at the end of the batch */
    uint32_t irq_pending; /* raise its vector at the end of the batch */
};

struct vfiod_nvme_exc {
    uint32_t kind, sqid, cqid;
    uint16_t cid, sqhd;
    uint32_t status;
    int32_t err;          /* errno of the failed call */
    uint8_t sqe[64];
};

struct vfiod_nvme {
    /* queues: the QueueEngine's */
    struct vfiod_nvme_sq sq[VFIOD_NVME_QUEUES];
    struct vfiod_nvme_cq cq[VFIOD_NVME_QUEUES];
    uint32_t enabled;     /* a queue engine exists (CC.EN): doorbells are its */
    uint32_t halted;      /* controller fatal status */
    uint32_t intms;       /* INTMS: masks MSI vectors */
    uint32_t vectors;
    uint32_t msix_seen;   /* the message mode the last batch published EventIdx for */
    uint32_t shadow;      /* Doorbell Buffer Config done: */
    uint64_t shadow_db, shadow_ei; /* ... shadow doorbell and EventIdx buffers */
    /* the namespace and the function: the controller's */
    int32_t fd;
    uint32_t lba_shift;
    uint64_t nsze, max_transfer, page_size;
    uint32_t wce;         /* volatile write cache on (off: every write is durable first) */
    const uint8_t *config; /* config space (PCI_COMMAND bus master) */
    struct vfiod_pe_dma *dma; /* NULL: the C mover is off, everything goes to Python */
    struct vfiod_irq *irq;
    int32_t notify_fd;    /* eventfd: something waits for Python (need_python, irq pending) */
    uint32_t need_python;
    /* the hand-over of one entry or run to Python */
    uint8_t cmd[64];
    uint64_t fetch_iova;
    uint32_t fetch_n;
    /* counters, folded into the Python ones (and zeroed) by the controller */
    uint64_t reads, writes, bytes_read, bytes_written, syncs; /* SMART, store.syncs */
    uint64_t ok[3];       /* completed successfully: Read, Write, Flush */
    uint64_t doorbells[2];
    uint64_t lat_bounds_ns[VFIOD_NVME_BUCKETS - 1];
    uint64_t lat[VFIOD_NVME_BUCKETS];
    uint64_t lat_ns;
    /* the pool */
    uint32_t workers;     /* running */
    uint64_t inflight;    /* commands with the workers */
    uint64_t jobs_async;  /* commands the workers ran */
    uint64_t hooked;      /* doorbell writes the session fast path's hook did */
    uint32_t nexc;        /* exceptions waiting */
    /* the run of fetched entries, the job queue, the exceptions, the locks: in nvme.c */
    struct vfiod_nvme_private *priv;
    pthread_mutex_t lock;
};

struct vfiod_nvme *vfiod_nvme_new(void);
void vfiod_nvme_free(struct vfiod_nvme *nv);
void vfiod_nvme_lock(struct vfiod_nvme *nv);
void vfiod_nvme_unlock(struct vfiod_nvme *nv);

/* (locked) One step of QueueEngine._drain for I/O queue qid. */
int vfiod_nvme_drain(struct vfiod_nvme *nv, uint32_t qid);
/* (locked) The run Python fetched after VFIOD_NVME_FETCH_RUN (n entries at fetch_iova). */
void vfiod_nvme_put_run(struct vfiod_nvme *nv, uint32_t qid, const uint8_t *raw, uint32_t n);
/* (locked) Forget the fetched run (Python's drain stopped: a full CQ). */
void vfiod_nvme_drop_run(struct vfiod_nvme *nv);
/* (locked) The entry handed over with VFIOD_NVME_COMMAND is consumed (SQ head moves). */
void vfiod_nvme_consume(struct vfiod_nvme *nv, uint32_t qid);
/* (locked) QueueEngine._end_batch for message interrupts: DONE, or TOO_HARD (nothing done). */
int vfiod_nvme_end_batch(struct vfiod_nvme *nv);
/* (locked) A doorbell write (BAR0 offset from the doorbell page, dword value) of an I/O queue,
 * done completely with its batch and interrupts: DONE, or TOO_HARD (Python handles the write;
 * whatever C did is a consistent prefix of what Python does, so Python just does it). */
int vfiod_nvme_doorbell(struct vfiod_nvme *nv, uint64_t offset, uint32_t value);
/* The session fast path's hook for the doorbell page (vfu.h): 0 done, 1 punt. */
int vfiod_nvme_doorbell_hook(void *ctx, uint64_t offset, const uint8_t *data, uint32_t count);
/* (locked) Take the oldest exception into out: 1, or 0 if there is none. */
int vfiod_nvme_take(struct vfiod_nvme *nv, struct vfiod_nvme_exc *out);
/* (locked) A completion owed to CQ cqid was posted (or dropped) by Python: its credit goes. */
void vfiod_nvme_release(struct vfiod_nvme *nv, uint32_t cqid);
/* (locked) Wait until no command of SQ sqid (every SQ: sqid >= VFIOD_NVME_QUEUES) is with the
 * workers; the lock is released while waiting. */
void vfiod_nvme_quiesce(struct vfiod_nvme *nv, uint32_t sqid);
/* (locked) Every queue, run and exception gone (after vfiod_nvme_quiesce). */
void vfiod_nvme_reset_queues(struct vfiod_nvme *nv);

/* The pool: clear the stop flag; each worker thread runs vfiod_nvme_worker until
 * vfiod_nvme_stop, then finishes every queued command and returns. */
void vfiod_nvme_start(struct vfiod_nvme *nv);
void vfiod_nvme_stop(struct vfiod_nvme *nv);
void vfiod_nvme_worker(struct vfiod_nvme *nv);

#endif
