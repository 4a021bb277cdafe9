/*
 * The NVMe data path in C (see nvme.h). Every function here has its twin in
 * vfiod/devices/nvme/queues.py, nvm.py or prp.py; the comments name it. Keep them in step.
 */
#include <endian.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "nvme.h"

#define SQE 64
#define CQE 16
#define SLOT 8                  /* queues.py DOORBELL_SLOT */
#define EVENTIDX_QUIET 0xFFFFu
#define PCI_COMMAND 0x04
#define PCI_COMMAND_MASTER 0x4
#define IO_FLUSH 0x00
#define IO_WRITE 0x01
#define IO_READ 0x02
#define NSID 1u
#define NSID_ALL 0xFFFFFFFFu
#define FUA (1u << 30)
#define PRP_MAX 1024            /* IOVA pieces per command C takes (more: Python) */
#define LIST_MAX (65536 / 8)    /* PRP entries per list page (64 KiB pages) */

enum { J_READ, J_WRITE, J_FLUSH }; /* the order of vfiod_nvme.ok[] */

struct job {
    struct job *next;
    uint32_t sqid, cqid;
    uint16_t cid;
    uint8_t opcode, kind, fua;
    uint64_t offset, len, t0;
    uint32_t niov, cap;
    struct iovec *iov;
    uint32_t fail;              /* 0, or VFIOD_NVME_X_* */
    uint32_t synced;            /* an fdatasync succeeded */
    int32_t err;
    uint8_t sqe[SQE];
};

struct vfiod_nvme_private {
    /* the run of fetched SQ entries the current drain works through (queues.py: ``raw``) */
    uint8_t run[VFIOD_NVME_FETCH * SQE];
    uint32_t run_qid, run_next, run_left; /* entry run[run_pos] is SQ run_qid's run_next */
    uint32_t run_pos;
    /* scratch for one command */
    uint64_t prp_iova[PRP_MAX], prp_len[PRP_MAX];
    uint64_t list[LIST_MAX];
    struct vfiod_dma_piece pieces[VFIOD_NVME_MAX_IOV];
    /* jobs: queued for the workers, and free ones */
    struct job *q_head, *q_tail, *free;
    uint32_t stop;
    pthread_cond_t work, idle;
    /* exceptions, oldest first */
    struct vfiod_nvme_exc *exc;
    uint32_t exc_head, exc_cap;
};

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* NVMe structures in guest memory (SQEs, CQEs, PRP lists, shadow slots) and register writes are
 * little-endian whatever the host is (s390x runs these paths too). */
static inline uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return le32toh(v); }
static inline uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return le64toh(v); }
static inline void st16(uint8_t *p, uint16_t v) { v = htole16(v); memcpy(p, &v, 2); }
static inline void st32(uint8_t *p, uint32_t v) { v = htole32(v); memcpy(p, &v, 4); }

struct vfiod_nvme *vfiod_nvme_new(void)
{
    struct vfiod_nvme *nv = calloc(1, sizeof(*nv));
    if (!nv)
        return NULL;
    nv->priv = calloc(1, sizeof(*nv->priv));
    if (!nv->priv) {
        free(nv);
        return NULL;
    }
    nv->fd = -1;
    nv->notify_fd = -1;
    for (int i = 0; i < VFIOD_NVME_QUEUES; i++) {
        nv->sq[i].event_idx = -1;
        nv->cq[i].event_idx = -1;
    }
    pthread_mutex_init(&nv->lock, NULL);
    pthread_cond_init(&nv->priv->work, NULL);
    pthread_cond_init(&nv->priv->idle, NULL);
    return nv;
}

static void free_jobs(struct job *j)
{
    while (j) {
        struct job *next = j->next;
        free(j->iov);
        free(j);
        j = next;
    }
}

void vfiod_nvme_free(struct vfiod_nvme *nv)
{
    if (!nv)
        return;
    free_jobs(nv->priv->q_head);
    free_jobs(nv->priv->free);
    free(nv->priv->exc);
    pthread_cond_destroy(&nv->priv->work);
    pthread_cond_destroy(&nv->priv->idle);
    pthread_mutex_destroy(&nv->lock);
    free(nv->priv);
    free(nv);
}

void vfiod_nvme_lock(struct vfiod_nvme *nv) { pthread_mutex_lock(&nv->lock); }
void vfiod_nvme_unlock(struct vfiod_nvme *nv) { pthread_mutex_unlock(&nv->lock); }

static void notify(struct vfiod_nvme *nv, uint32_t want)
{
    uint64_t one = 1;
    nv->need_python |= want;
    if (nv->notify_fd >= 0)
        while (write(nv->notify_fd, &one, sizeof(one)) < 0 && errno == EINTR)
            ;
}

/* ---- guest memory: through the PE, or TOO_HARD ------------------------------------------- */

static int bus_master(const struct vfiod_nvme *nv)
{
    return nv->config && (nv->config[PCI_COMMAND] & PCI_COMMAND_MASTER);
}

/* controller.dma_read: bus master, then the PE. 0 or -1 (Python will fault the same way). */
static int dma_read(struct vfiod_nvme *nv, uint64_t iova, void *buf, uint64_t len)
{
    int rc;
    if (!nv->dma || !bus_master(nv))
        return -1;
    vfiod_pe_dma_lock(nv->dma);
    rc = vfiod_pe_dma_read(nv->dma, iova, buf, len);
    vfiod_pe_dma_unlock(nv->dma);
    return rc == VFIOD_DMA_DONE ? 0 : -1;
}

static int dma_write(struct vfiod_nvme *nv, uint64_t iova, const void *buf, uint64_t len)
{
    int rc;
    if (!nv->dma || !bus_master(nv))
        return -1;
    vfiod_pe_dma_lock(nv->dma);
    rc = vfiod_pe_dma_write(nv->dma, iova, buf, len);
    vfiod_pe_dma_unlock(nv->dma);
    return rc == VFIOD_DMA_DONE ? 0 : -1;
}

/* Whether a write of len bytes at iova would translate (nothing written). */
static int dma_writable(struct vfiod_nvme *nv, uint64_t iova, uint64_t len)
{
    struct vfiod_dma_piece p[4];
    long n;
    if (!nv->dma || !bus_master(nv))
        return 0;
    vfiod_pe_dma_lock(nv->dma);
    n = vfiod_pe_dma_pieces(nv->dma, iova, len, 1, p, 0, 4);
    vfiod_pe_dma_unlock(nv->dma);
    return n >= 0;
}

static uint64_t slot_iova(uint64_t base, uint32_t qid, int cq)
{
    return base + (uint64_t)qid * SLOT + (cq ? 4 : 0);
}

/* _read_slot: 0..0xFFFF, or -1 (TOO_HARD). */
static long read_slot(struct vfiod_nvme *nv, uint64_t base, uint32_t qid, int cq)
{
    uint8_t raw[4];
    if (dma_read(nv, slot_iova(base, qid, cq), raw, 4))
        return -1;
    return ld32(raw) & 0xFFFF;
}

static int write_slot(struct vfiod_nvme *nv, uint64_t base, uint32_t qid, int cq, uint32_t v)
{
    uint8_t raw[4];
    st32(raw, v);
    return dma_write(nv, slot_iova(base, qid, cq), raw, 4);
}

/* ---- queues ------------------------------------------------------------------------------ */

/* CompletionQueue.full, with the credit of commands in flight. */
static int cq_full(const struct vfiod_nvme_cq *cq)
{
    uint32_t used = (cq->tail + cq->size - cq->head) % cq->size + cq->inflight;
    return used + 1 >= cq->size;
}

static int run_valid(const struct vfiod_nvme *nv, uint32_t qid)
{
    const struct vfiod_nvme_private *p = nv->priv;
    return p->run_left && p->run_qid == qid && p->run_next == nv->sq[qid].head;
}

void vfiod_nvme_drop_run(struct vfiod_nvme *nv) { nv->priv->run_left = 0; }

void vfiod_nvme_put_run(struct vfiod_nvme *nv, uint32_t qid, const uint8_t *raw, uint32_t n)
{
    struct vfiod_nvme_private *p = nv->priv;
    if (n > VFIOD_NVME_FETCH)
        n = VFIOD_NVME_FETCH;
    memcpy(p->run, raw, (size_t)n * SQE);
    p->run_qid = qid;
    p->run_next = nv->sq[qid].head;
    p->run_pos = 0;
    p->run_left = n;
}

void vfiod_nvme_consume(struct vfiod_nvme *nv, uint32_t qid)
{
    struct vfiod_nvme_private *p = nv->priv;
    struct vfiod_nvme_sq *sq = &nv->sq[qid];
    sq->head = (sq->head + 1) % sq->size;
    if (p->run_left && p->run_qid == qid) {
        p->run_pos++;
        p->run_left--;
        p->run_next = sq->head;
    }
}

/* queues.py _write_cqe: 0, or -1 if the slot does not translate (Python posts it: X_POST). */
static int write_cqe(struct vfiod_nvme *nv, struct vfiod_nvme_cq *cq, uint32_t sqid,
                     uint16_t cid, uint32_t status, uint32_t sqhd, int batch)
{
    uint8_t e[CQE];
    st32(e, 0);                          /* DW0 */
    st32(e + 4, 0);                      /* DW1 */
    st16(e + 8, (uint16_t)sqhd);
    st16(e + 10, (uint16_t)sqid);
    st16(e + 12, cid);
    st16(e + 14, (uint16_t)(((status & 0x7FFF) << 1) | cq->phase));
    if (dma_write(nv, cq->base + (uint64_t)cq->tail * CQE, e, CQE))
        return -1;
    cq->tail++;
    if (cq->tail == cq->size) {
        cq->tail = 0;
        cq->phase ^= 1;
    }
    if (batch) { /* the batch raises the vector and publishes EventIdx at its end */
        cq->touched = 1;
        if (cq->ien)
            cq->irq_pending = 1;
    }
    return 0;
}

static struct vfiod_nvme_exc *exc_push(struct vfiod_nvme *nv)
{
    struct vfiod_nvme_private *p = nv->priv;
    if (p->exc_head + nv->nexc == p->exc_cap) {
        if (p->exc_head) {
            memmove(p->exc, p->exc + p->exc_head, nv->nexc * sizeof(*p->exc));
            p->exc_head = 0;
        } else {
            uint32_t cap = p->exc_cap ? p->exc_cap * 2 : 16;
            struct vfiod_nvme_exc *e = realloc(p->exc, cap * sizeof(*e));
            if (!e)
                return NULL;
            p->exc = e;
            p->exc_cap = cap;
        }
    }
    return &p->exc[p->exc_head + nv->nexc++];
}

int vfiod_nvme_take(struct vfiod_nvme *nv, struct vfiod_nvme_exc *out)
{
    struct vfiod_nvme_private *p = nv->priv;
    if (!nv->nexc)
        return 0;
    *out = p->exc[p->exc_head++];
    if (!--nv->nexc)
        p->exc_head = 0;
    return 1;
}

void vfiod_nvme_release(struct vfiod_nvme *nv, uint32_t cqid)
{
    if (cqid < VFIOD_NVME_QUEUES && nv->cq[cqid].inflight)
        nv->cq[cqid].inflight--;
}

/* ---- one command: nvm.py NvmCommands.execute, prp.py prp_pieces ----------------------------- */

static int prp_add(struct vfiod_nvme_private *p, uint32_t *n, uint64_t iova, uint64_t len)
{
    if (*n && p->prp_iova[*n - 1] + p->prp_len[*n - 1] == iova) {
        p->prp_len[*n - 1] += len;
        return 0;
    }
    if (*n == PRP_MAX)
        return -1;
    p->prp_iova[*n] = iova;
    p->prp_len[*n] = len;
    (*n)++;
    return 0;
}

/* prp_pieces for the success path; -1 wherever Python raises (or C gives up). */
static long prp_walk(struct vfiod_nvme *nv, uint64_t prp1, uint64_t prp2, uint64_t length)
{
    struct vfiod_nvme_private *p = nv->priv;
    const uint64_t page = nv->page_size, mask = page - 1;
    uint64_t first, remaining, needed, list_addr, hops = 0;
    uint32_t n = 0;

    if (prp1 & 3)
        return -1;
    first = page - (prp1 & mask);
    if (first > length)
        first = length;
    prp_add(p, &n, prp1, first);
    remaining = length - first;
    if (!remaining)
        return n;
    if (remaining <= page) {
        if (prp2 & mask)
            return -1;
        return prp_add(p, &n, prp2, remaining) ? -1 : (long)n;
    }
    if (prp2 & 7)
        return -1;
    needed = (remaining + mask) / page;
    list_addr = prp2;
    while (needed) {
        uint64_t avail, take, data;
        int chained;
        if (++hops > needed + 2)
            return -1;
        avail = (page - (list_addr & mask)) / 8;
        chained = needed > avail;
        take = chained ? avail : needed;
        if (take > LIST_MAX || dma_read(nv, list_addr, p->list, take * 8))
            return -1;
        data = chained ? take - 1 : take;
        for (uint64_t i = 0; i < data; i++) {
            uint64_t size = remaining < page ? remaining : page;
            if (le64toh(p->list[i]) & mask)
                return -1;
            if (prp_add(p, &n, le64toh(p->list[i]), size))
                return -1;
            remaining -= size;
        }
        needed -= data;
        if (chained) {
            list_addr = le64toh(p->list[take - 1]);
            if (list_addr & 7)
                return -1;
        }
    }
    return n;
}

static struct job *job_get(struct vfiod_nvme *nv, uint32_t niov)
{
    struct vfiod_nvme_private *p = nv->priv;
    struct job *j = p->free;
    if (j)
        p->free = j->next;
    else if (!(j = calloc(1, sizeof(*j))))
        return NULL;
    if (j->cap < niov) {
        struct iovec *iov = realloc(j->iov, niov * sizeof(*iov));
        if (!iov) {
            j->next = p->free;
            p->free = j;
            return NULL;
        }
        j->iov = iov;
        j->cap = niov;
    }
    j->next = NULL;
    j->fail = 0;
    j->synced = 0;
    j->err = 0;
    j->niov = 0;
    return j;
}

static void job_put(struct vfiod_nvme *nv, struct job *j)
{
    j->next = nv->priv->free;
    nv->priv->free = j;
}

/* A job for the entry, or NULL: Python runs it (nothing was changed). */
static struct job *prepare(struct vfiod_nvme *nv, uint32_t sqid, const uint8_t *e)
{
    struct vfiod_nvme_private *p = nv->priv;
    const uint8_t opcode = e[0], flags = e[1];
    const uint32_t nsid = ld32(e + 4), cdw12 = ld32(e + 48);
    uint64_t slba, nlb, length;
    long nprp, npieces = 0;
    struct job *j;

    if (flags & 0xC3) /* FUSE or PSDT: Invalid Field */
        return NULL;
    if (opcode == IO_FLUSH) {
        if (nsid != NSID && nsid != NSID_ALL)
            return NULL;
        if (!(j = job_get(nv, 1)))
            return NULL;
        j->kind = J_FLUSH;
        j->len = 0;
        goto out;
    }
    if ((opcode != IO_READ && opcode != IO_WRITE) || nsid != NSID || !bus_master(nv))
        return NULL;
    slba = ld64(e + 40);
    nlb = (cdw12 & 0xFFFF) + 1;
    length = nlb << nv->lba_shift;
    if (length > nv->max_transfer || slba >= nv->nsze || nlb > nv->nsze - slba)
        return NULL;
    nprp = prp_walk(nv, ld64(e + 24), ld64(e + 32), length);
    if (nprp < 0)
        return NULL;
    vfiod_pe_dma_lock(nv->dma);
    for (long i = 0; i < nprp && npieces >= 0; i++)
        npieces = vfiod_pe_dma_pieces(nv->dma, p->prp_iova[i], p->prp_len[i],
                                      opcode == IO_READ, p->pieces, npieces,
                                      VFIOD_NVME_MAX_IOV);
    if (npieces < 0 || !(j = job_get(nv, (uint32_t)npieces))) {
        vfiod_pe_dma_unlock(nv->dma);
        return NULL;
    }
    if (vfiod_pe_dma_iovecs(nv->dma, p->pieces, npieces, j->iov) < 0) {
        vfiod_pe_dma_unlock(nv->dma);
        job_put(nv, j);
        return NULL;
    }
    vfiod_pe_dma_unlock(nv->dma);
    j->niov = (uint32_t)npieces;
    j->kind = opcode == IO_READ ? J_READ : J_WRITE;
    j->offset = slba << nv->lba_shift;
    j->len = length;
    j->fua = opcode == IO_WRITE && ((cdw12 & FUA) || !nv->wce);
out:
    j->sqid = sqid;
    j->cqid = nv->sq[sqid].cqid;
    j->cid = (uint16_t)(e[2] | (e[3] << 8));
    j->opcode = opcode;
    j->t0 = now_ns();
    memcpy(j->sqe, e, SQE);
    return j;
}

/* mover.py _vectored_io: every byte, or -1 (errno in j->err; a read short of the end of a file
 * that shrank also fails here: Python reads it again and fills with zeros). No lock held. */
static int move(struct vfiod_nvme *nv, struct job *j)
{
    struct iovec *iov = j->iov;
    uint32_t left = j->niov;
    uint64_t done = 0;
    while (left) {
        ssize_t got = j->kind == J_READ
                          ? preadv(nv->fd, iov, (int)left, (off_t)(j->offset + done))
                          : pwritev(nv->fd, iov, (int)left, (off_t)(j->offset + done));
        if (got < 0) {
            if (errno == EINTR)
                continue;
            j->err = errno;
            return -1;
        }
        if (got == 0) {
            j->err = EIO;
            return -1;
        }
        done += (uint64_t)got;
        while (left && (uint64_t)got >= iov->iov_len) { /* resume a short count */
            got -= (ssize_t)iov->iov_len;
            iov++;
            left--;
        }
        if (left && got) {
            iov->iov_base = (uint8_t *)iov->iov_base + got;
            iov->iov_len -= (size_t)got;
        }
    }
    return 0;
}

/* Run the job's I/O (no lock held): sets j->fail when Python must finish it. */
static void run(struct vfiod_nvme *nv, struct job *j)
{
    if (j->kind != J_FLUSH && move(nv, j)) {
        j->fail = VFIOD_NVME_X_REDO;
        return;
    }
    if (j->kind == J_FLUSH || j->fua) {
        if (fdatasync(nv->fd)) {
            j->err = errno;
            j->fail = VFIOD_NVME_X_FLUSH;
        } else {
            j->synced = 1; /* counted under the lock, in finish() */
        }
    }
}

static void exc_from_job(struct vfiod_nvme *nv, struct job *j, uint32_t kind)
{
    struct vfiod_nvme_exc *x = exc_push(nv);
    if (!x)
        return; /* out of memory: the command is lost, as a controller losing it would be */
    x->kind = kind;
    x->sqid = j->sqid;
    x->cqid = j->cqid;
    x->cid = j->cid;
    x->sqhd = (uint16_t)nv->sq[j->sqid].head;
    x->status = 0;
    x->err = j->err;
    memcpy(x->sqe, j->sqe, SQE);
}

/* Counters of a command that ran: the SMART counts NvmCommands keeps, and (when it succeeded)
 * what the dispatch records per opcode, latency included. */
static void account(struct vfiod_nvme *nv, struct job *j)
{
    uint64_t ns;
    int b = 0;
    if (j->kind == J_READ) {
        nv->reads++;
        nv->bytes_read += j->len;
    } else if (j->kind == J_WRITE) {
        nv->writes++; /* a failed FUA write too: it was written, then its flush failed */
        nv->bytes_written += j->len;
    }
    if (j->fail)
        return;
    nv->ok[j->kind]++;
    ns = now_ns() - j->t0;
    while (b < VFIOD_NVME_BUCKETS - 1 && ns > nv->lat_bounds_ns[b])
        b++;
    nv->lat[b]++;
    nv->lat_ns += ns;
}

/*
 * The command ran (lock held): count it, post its completion, raise its vector (batch=1: at the
 * end of the batch, as Python does; batch=0, a worker: now). Returns 1 if it became an
 * exception (which keeps the entry of CQ credit until Python completes it).
 */
static int finish(struct vfiod_nvme *nv, struct job *j, int batch)
{
    struct vfiod_nvme_sq *sq = &nv->sq[j->sqid];
    struct vfiod_nvme_cq *cq = &nv->cq[j->cqid];

    if (sq->inflight && !--sq->inflight)
        pthread_cond_broadcast(&nv->priv->idle);
    if (j->synced)
        nv->syncs++;
    if (j->fail == VFIOD_NVME_X_REDO) { /* nothing counted: Python runs it again */
        exc_from_job(nv, j, VFIOD_NVME_X_REDO);
        return 1;
    }
    if (j->kind != J_FLUSH || !j->fail)
        account(nv, j);
    if (j->fail) {
        exc_from_job(nv, j, j->fail);
        return 1;
    }
    if (nv->halted || !cq->valid || !sq->valid) { /* queues.py _post: dropped */
        vfiod_nvme_release(nv, j->cqid);
        return 0;
    }
    if (write_cqe(nv, cq, j->sqid, j->cid, 0, sq->head, batch)) {
        exc_from_job(nv, j, VFIOD_NVME_X_POST);
        return 1;
    }
    vfiod_nvme_release(nv, j->cqid); /* the credit became the entry */
    if (!batch && cq->ien) {
        const uint32_t mode = nv->irq ? nv->irq->mode : VFIOD_IRQ_OFF;
        if (mode == VFIOD_IRQ_OFF) {
            notify(nv, VFIOD_NVME_WANT_INTX); /* Python drives the level */
        } else if (cq->vector < nv->vectors &&
                   !(mode == VFIOD_IRQ_MSI && cq->vector < 32 && (nv->intms >> cq->vector) & 1)) {
            vfiod_irq_fire(nv->irq, cq->vector);
        }
    }
    return 0;
}

/* ---- the drain: queues.py QueueEngine._drain ------------------------------------------------ */

int vfiod_nvme_drain(struct vfiod_nvme *nv, uint32_t qid)
{
    struct vfiod_nvme_private *p = nv->priv;
    struct vfiod_nvme_sq *sq;
    struct vfiod_nvme_cq *cq;

    if (qid == 0 || qid >= VFIOD_NVME_QUEUES)
        return VFIOD_NVME_GONE;
    sq = &nv->sq[qid];
    cq = &nv->cq[sq->cqid];
    while (sq->head != sq->tail) {
        const uint8_t *e;
        struct job *j;
        if (nv->halted || !sq->valid)
            return VFIOD_NVME_GONE;
        if (!run_valid(nv, qid)) {
            uint32_t count = (sq->tail + sq->size - sq->head) % sq->size;
            uint32_t n = sq->size - sq->head;
            uint64_t iova = sq->base + (uint64_t)sq->head * SQE;
            if (n > count)
                n = count;
            if (n > VFIOD_NVME_FETCH)
                n = VFIOD_NVME_FETCH;
            if (dma_read(nv, iova, p->run, (uint64_t)n * SQE)) {
                nv->fetch_iova = iova;
                nv->fetch_n = n;
                return VFIOD_NVME_FETCH_RUN;
            }
            p->run_qid = qid;
            p->run_next = sq->head;
            p->run_pos = 0;
            p->run_left = n;
        }
        if (cq->overflow || (cq_full(cq) && !nv->shadow)) {
            p->run_left = 0; /* Python's run ends with its drain */
            return VFIOD_NVME_STALLED;
        }
        if (cq_full(cq))
            return VFIOD_NVME_ROOM;
        e = p->run + (size_t)p->run_pos * SQE;
        j = nv->dma ? prepare(nv, qid, e) : NULL;
        if (!j) {
            memcpy(nv->cmd, e, SQE);
            return VFIOD_NVME_COMMAND;
        }
        vfiod_nvme_consume(nv, qid);
        sq->inflight++;
        cq->inflight++;
        if (nv->workers) {
            nv->inflight++;
            if (p->q_tail)
                p->q_tail->next = j;
            else
                p->q_head = j;
            p->q_tail = j;
            pthread_cond_signal(&p->work);
            continue;
        }
        run(nv, j);
        if (finish(nv, j, 1)) {
            job_put(nv, j);
            return VFIOD_NVME_EXCEPTION;
        }
        job_put(nv, j);
    }
    return VFIOD_NVME_DONE;
}

/* ---- the end of a batch: queues.py _end_batch (message interrupts only) -------------------- */

/* _publish_cq: the CQ's resting EventIdx. */
static uint32_t cq_event_idx(const struct vfiod_nvme *nv, uint32_t qid, int msg)
{
    const struct vfiod_nvme_cq *cq = &nv->cq[qid];
    int need = !msg;
    for (uint32_t s = 1; !need && s < VFIOD_NVME_QUEUES; s++) {
        const struct vfiod_nvme_sq *sq = &nv->sq[s];
        if (sq->valid && sq->cqid == qid && sq->head != sq->tail)
            need = 1;
    }
    return need || cq->overflow ? cq->head : EVENTIDX_QUIET;
}

int vfiod_nvme_end_batch(struct vfiod_nvme *nv)
{
    const uint32_t mode = nv->irq ? nv->irq->mode : VFIOD_IRQ_OFF;
    const int msg = mode != VFIOD_IRQ_OFF;
    uint32_t masked;

    if (!msg || nv->irq->intx_level)
        return VFIOD_NVME_TOO_HARD; /* the INTx level is Python's */
    if (nv->shadow && !nv->halted) {
        const int all = (uint32_t)msg != nv->msix_seen;
        /* every slot first, so that a fault leaves everything to Python */
        for (uint32_t q = 0; q < VFIOD_NVME_QUEUES; q++) {
            struct vfiod_nvme_cq *cq = &nv->cq[q];
            if (!cq->valid || !(all || cq->touched))
                continue;
            if ((int32_t)cq_event_idx(nv, q, msg) != cq->event_idx &&
                !dma_writable(nv, slot_iova(nv->shadow_ei, q, 1), 4))
                return VFIOD_NVME_TOO_HARD;
        }
        for (uint32_t q = 0; q < VFIOD_NVME_QUEUES; q++) {
            struct vfiod_nvme_cq *cq = &nv->cq[q];
            uint32_t v;
            if (!cq->valid || !(all || cq->touched))
                continue;
            v = cq_event_idx(nv, q, msg);
            if ((int32_t)v == cq->event_idx)
                continue;
            if (write_slot(nv, nv->shadow_ei, q, 1, v))
                return VFIOD_NVME_TOO_HARD; /* the RAM file shrank meanwhile: Python faults */
            cq->event_idx = (int32_t)v;
        }
    }
    nv->msix_seen = (uint32_t)msg;
    masked = mode == VFIOD_IRQ_MSIX ? 0 : nv->intms; /* INTMS masks MSI vectors only */
    for (uint32_t q = 0; q < VFIOD_NVME_QUEUES; q++) {
        struct vfiod_nvme_cq *cq = &nv->cq[q];
        cq->touched = 0;
        if (!cq->irq_pending)
            continue;
        cq->irq_pending = 0;
        if (cq->valid && cq->vector < nv->vectors &&
            (cq->vector >= 32 || !((masked >> cq->vector) & 1)))
            vfiod_irq_fire(nv->irq, cq->vector);
    }
    return VFIOD_NVME_DONE;
}

/* ---- doorbells: queues.py sq_doorbell / cq_doorbell / _run_sq ------------------------------- */

/* _load_sq_tail: 0, or -1 (TOO_HARD). */
static int load_sq_tail(struct vfiod_nvme *nv, uint32_t qid)
{
    long v = read_slot(nv, nv->shadow_db, qid, 0);
    if (v < 0)
        return -1;
    if ((uint32_t)v < nv->sq[qid].size)
        nv->sq[qid].tail = (uint32_t)v;
    return 0;
}

/* _run_sq: 0, or -1 (TOO_HARD: whatever was done stays done). */
static int run_sq(struct vfiod_nvme *nv, uint32_t qid)
{
    struct vfiod_nvme_sq *sq = &nv->sq[qid];
    int rc;
    if (!nv->shadow) {
        rc = vfiod_nvme_drain(nv, qid);
        return rc == VFIOD_NVME_DONE || rc == VFIOD_NVME_STALLED || rc == VFIOD_NVME_GONE ? 0
                                                                                           : -1;
    }
    if (load_sq_tail(nv, qid))
        return -1;
    for (;;) {
        uint32_t before;
        rc = vfiod_nvme_drain(nv, qid);
        if (rc != VFIOD_NVME_DONE && rc != VFIOD_NVME_STALLED && rc != VFIOD_NVME_GONE)
            return -1;
        if (nv->halted || !sq->valid)
            return 0;
        if (sq->event_idx != (int32_t)sq->tail) {
            if (write_slot(nv, nv->shadow_ei, qid, 0, sq->tail))
                return -1;
            sq->event_idx = (int32_t)sq->tail;
        }
        before = sq->tail;
        if (load_sq_tail(nv, qid))
            return -1;
        if (rc == VFIOD_NVME_STALLED || sq->tail == before)
            return 0;
    }
}

int vfiod_nvme_doorbell(struct vfiod_nvme *nv, uint64_t offset, uint32_t value)
{
    uint32_t qid, is_cq;

    if (!nv->enabled || !nv->dma || (offset & 3) || offset >= 8ull * VFIOD_NVME_QUEUES)
        return VFIOD_NVME_TOO_HARD;
    qid = (uint32_t)(offset / 8);
    is_cq = (uint32_t)(offset / 4) & 1;
    if (qid == 0 || nv->nexc)
        return VFIOD_NVME_TOO_HARD; /* the admin queue; exceptions go first */
    value &= 0xFFFF;
    if (!is_cq) {
        struct vfiod_nvme_sq *sq = &nv->sq[qid];
        if (sq->valid && value < sq->size && !nv->halted) {
            sq->tail = value;
            if (run_sq(nv, qid) || vfiod_nvme_end_batch(nv) != VFIOD_NVME_DONE)
                return VFIOD_NVME_TOO_HARD;
        } /* else an invalid doorbell write: ignored */
    } else {
        struct vfiod_nvme_cq *cq = &nv->cq[qid];
        if (cq->valid && value < cq->size && !nv->halted) {
            long slot = -1;
            if (nv->shadow && (slot = read_slot(nv, nv->shadow_db, qid, 1)) < 0)
                return VFIOD_NVME_TOO_HARD; /* nothing changed yet */
            cq->head = value;
            if (slot >= 0 && (uint32_t)slot < cq->size)
                cq->head = (uint32_t)slot;
            cq->touched = 1;
            /* _cq_progress: owed completions first (Python's), then stalled SQs */
            if (cq->overflow)
                return VFIOD_NVME_TOO_HARD;
            for (uint32_t s = 1; s < VFIOD_NVME_QUEUES; s++) {
                struct vfiod_nvme_sq *sq = &nv->sq[s];
                if (sq->valid && sq->cqid == qid && sq->head != sq->tail && run_sq(nv, s))
                    return VFIOD_NVME_TOO_HARD;
            }
            if (vfiod_nvme_end_batch(nv) != VFIOD_NVME_DONE)
                return VFIOD_NVME_TOO_HARD;
        }
    }
    nv->doorbells[is_cq]++;
    return VFIOD_NVME_DONE;
}

int vfiod_nvme_doorbell_hook(void *ctx, uint64_t offset, const uint8_t *data, uint32_t count)
{
    struct vfiod_nvme *nv = ctx;
    int rc;
    if (count != 4)
        return 1;
    pthread_mutex_lock(&nv->lock);
    rc = vfiod_nvme_doorbell(nv, offset, ld32(data));
    if (rc == VFIOD_NVME_DONE) {
        nv->hooked++;
        if (nv->irq && nv->irq->npending)
            notify(nv, 0); /* vectors Python must fire */
    }
    pthread_mutex_unlock(&nv->lock);
    return rc == VFIOD_NVME_DONE ? 0 : 1;
}

/* ---- the pool ------------------------------------------------------------------------------- */

void vfiod_nvme_quiesce(struct vfiod_nvme *nv, uint32_t sqid)
{
    for (;;) {
        int busy = sqid < VFIOD_NVME_QUEUES ? nv->sq[sqid].inflight != 0 : nv->inflight != 0;
        if (!busy)
            return;
        pthread_cond_wait(&nv->priv->idle, &nv->lock);
    }
}

void vfiod_nvme_reset_queues(struct vfiod_nvme *nv)
{
    struct vfiod_nvme_private *p = nv->priv;
    memset(nv->sq, 0, sizeof(nv->sq));
    memset(nv->cq, 0, sizeof(nv->cq));
    for (int i = 0; i < VFIOD_NVME_QUEUES; i++) {
        nv->sq[i].event_idx = -1;
        nv->cq[i].event_idx = -1;
    }
    nv->halted = 0;
    nv->intms = 0;
    nv->msix_seen = 0;
    nv->shadow = 0;
    nv->shadow_db = nv->shadow_ei = 0;
    nv->nexc = 0;
    nv->need_python = 0;
    p->exc_head = 0;
    p->run_left = 0;
}

void vfiod_nvme_start(struct vfiod_nvme *nv)
{
    pthread_mutex_lock(&nv->lock);
    nv->priv->stop = 0;
    pthread_mutex_unlock(&nv->lock);
}

void vfiod_nvme_stop(struct vfiod_nvme *nv)
{
    pthread_mutex_lock(&nv->lock);
    nv->priv->stop = 1;
    pthread_cond_broadcast(&nv->priv->work);
    pthread_mutex_unlock(&nv->lock);
}

void vfiod_nvme_worker(struct vfiod_nvme *nv)
{
    struct vfiod_nvme_private *p = nv->priv;
    pthread_mutex_lock(&nv->lock);
    nv->workers++;
    for (;;) {
        struct job *j;
        while (!p->q_head && !p->stop)
            pthread_cond_wait(&p->work, &nv->lock);
        j = p->q_head;
        if (!j)
            break; /* stopped, and every queued command is done */
        p->q_head = j->next;
        if (!p->q_head)
            p->q_tail = NULL;
        pthread_mutex_unlock(&nv->lock);
        run(nv, j);
        pthread_mutex_lock(&nv->lock);
        nv->inflight--;
        nv->jobs_async++;
        if (finish(nv, j, 0))
            notify(nv, VFIOD_NVME_WANT_EXC);
        job_put(nv, j);
        if (!nv->inflight)
            pthread_cond_broadcast(&p->idle);
    }
    nv->workers--;
    pthread_mutex_unlock(&nv->lock);
}
