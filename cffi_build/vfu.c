/*
 * The session fast path (see vfu.h). The wire rules here are the exact subset of what the
 * Python session accepts and answers with success; anything else is punted untouched.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "vfu.h"

#define HDR 16
#define CMD_DMA_MAP 2
#define CMD_DMA_UNMAP 3
#define CMD_REGION_READ 9
#define CMD_REGION_WRITE 10
#define FLAG_REPLY 0x1u
#define FLAG_NO_REPLY 0x10u
#define CONFIG_REGION 7
#define READ_MAX 4096       /* larger reads are rare: the session does them */
#define RECV_ROOM (64 * 1024)
#define SEND_START (64 * 1024)
#define MARKS 256

struct hdr {
    uint16_t id, cmd;
    uint32_t size, flags, error;
};

static inline uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

struct vfu_session *vfu_new(int sock, uint32_t max_xfer, uint32_t max_msg)
{
    struct vfu_session *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    s->sock = sock;
    s->max_xfer = max_xfer;
    s->max_msg = max_msg;
    s->batch = 64;
    s->stall_ms = 5000;
    s->rcap = (uint64_t)max_msg + RECV_ROOM;
    s->rbuf = malloc(s->rcap);
    s->mcap = MARKS;
    s->marks = calloc(s->mcap, sizeof(*s->marks));
    s->scap = SEND_START;
    s->sbuf = malloc(s->scap);
    if (!s->rbuf || !s->marks || !s->sbuf) {
        vfu_free(s);
        return NULL;
    }
    return s;
}

static struct vfu_mark *mark_at(const struct vfu_session *s, uint32_t i)
{
    return &s->marks[(s->mhead + i) % s->mcap];
}

void vfu_free(struct vfu_session *s)
{
    if (!s)
        return;
    if (s->marks) /* fds still buffered are ours: nobody else will close them */
        for (uint32_t i = 0; i < s->mcount; i++) {
            struct vfu_mark *m = mark_at(s, i);
            for (uint32_t k = 0; k < m->nfds; k++)
                if (m->fds[k] >= 0)
                    close(m->fds[k]);
        }
    free(s->rbuf);
    free(s->marks);
    free(s->sbuf);
    free(s);
}

/* ---- the receive buffer ------------------------------------------------------------------- */

static void compact(struct vfu_session *s)
{
    if (s->rhead) {
        memmove(s->rbuf, s->rbuf + s->rhead, s->rtail - s->rhead);
        s->rtail -= s->rhead;
        s->rhead = 0;
    }
}

static int add_mark(struct vfu_session *s, uint64_t last, const int *fds, uint32_t nfds)
{
    struct vfu_mark *m;
    if (s->mcount == s->mcap)
        return -ENOSPC;
    m = mark_at(s, s->mcount++);
    m->last = last;
    m->nfds = nfds;
    memcpy(m->fds, fds, nfds * sizeof(int));
    return 0;
}

int vfu_feed(struct vfu_session *s, const uint8_t *data, uint64_t n, const int *fds,
             uint32_t nfds)
{
    if (nfds > VFU_RECV_FDS || (nfds && !n))
        return -EINVAL;
    compact(s);
    if (n > s->rcap - s->rtail || (nfds && s->mcount == s->mcap))
        return -ENOSPC;
    memcpy(s->rbuf + s->rtail, data, n);
    s->rtail += n;
    if (nfds)
        add_mark(s, s->rpos + (s->rtail - s->rhead) - 1, fds, nfds);
    return 0;
}

uint64_t vfu_buffered(const struct vfu_session *s) { return s->rtail - s->rhead; }
const uint8_t *vfu_data(const struct vfu_session *s) { return s->rbuf + s->rhead; }
uint32_t vfu_mark_count(const struct vfu_session *s) { return s->mcount; }

/* Mark i: its fds, and the offset of its last byte relative to the buffer's first byte. */
uint64_t vfu_mark_end(const struct vfu_session *s, uint32_t i, int *fds, uint32_t *nfds)
{
    const struct vfu_mark *m = mark_at(s, i);
    memcpy(fds, m->fds, m->nfds * sizeof(int));
    *nfds = m->nfds;
    return m->last - s->rpos;
}

/* The session took the buffer (and owns its fds now): start empty at the same stream offset. */
void vfu_forget(struct vfu_session *s)
{
    s->rpos += s->rtail - s->rhead;
    s->rhead = s->rtail = 0;
    s->mhead = s->mcount = 0;
}

/* ---- replies ------------------------------------------------------------------------------- */

static uint8_t *reply_room(struct vfu_session *s, uint64_t n)
{
    uint8_t *p;
    if (s->slen + n > s->scap) {
        uint64_t cap = s->scap * 2;
        while (cap < s->slen + n)
            cap *= 2;
        p = realloc(s->sbuf, cap);
        if (!p)
            return NULL;
        s->sbuf = p;
        s->scap = cap;
    }
    p = s->sbuf + s->slen;
    s->slen += n;
    s->pending++;
    return p;
}

static uint8_t *reply(struct vfu_session *s, const struct hdr *req, uint32_t size)
{
    struct hdr h = {req->id, req->cmd, size, FLAG_REPLY, 0};
    uint8_t *p = reply_room(s, size);
    if (p)
        memcpy(p, &h, HDR);
    return p;
}

/* Send what is queued. block: wait for room (or the wake fd); else VFU_WANT_WRITE. */
static long send_all(struct vfu_session *s, int block)
{
    uint64_t done = 0;
    while (done < s->slen) {
        ssize_t n = send(s->sock, s->sbuf + done, s->slen - done, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            done += (uint64_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct pollfd p = {s->sock, POLLOUT, 0};
            int n = block ? poll(&p, 1, s->stall_ms ? (int)s->stall_ms : -1) : 0;
            if (n < 0 && errno != EINTR)
                return -errno;
            if (n == 0) {
                /* non-blocking, or a peer that has not read for a while: the session decides
                 * (it checks whether the peer process still exists, and waits on) */
                memmove(s->sbuf, s->sbuf + done, s->slen - done);
                s->slen -= done;
                return VFU_WANT_WRITE;
            }
            continue; /* room, or a hang-up (vfu_wake): the send says which */
        }
        return n < 0 ? -errno : -EPIPE;
    }
    s->slen = 0;
    s->pending = 0;
    return 0;
}

long vfu_flush(struct vfu_session *s) { return send_all(s, 0); }

/* ---- the messages -------------------------------------------------------------------------- */

static const struct vfu_range *find_range(const struct vfu_session *s, uint32_t region,
                                          uint64_t offset, uint64_t count)
{
    for (uint32_t i = 0; i < s->nranges; i++) {
        const struct vfu_range *r = &s->ranges[i];
        if (r->region == region && offset >= r->offset && offset - r->offset <= r->size &&
            count <= r->size - (offset - r->offset))
            return r;
    }
    return NULL;
}

static int blocked(const struct vfu_session *s, uint32_t region)
{
    const struct vfiod_eeh_flags *e = s->dma ? s->dma->eeh : NULL;
    if (!e)
        return 0;
    return region == CONFIG_REGION ? e->config_blocked : !e->mmio_enabled;
}

/* Handle the complete message m (size bytes, fds of its marks); 0 done, VFU_PUNT if not ours. */
static int handle(struct vfu_session *s, const uint8_t *m, const struct hdr *h, int *fds,
                  uint32_t nfds)
{
    const uint8_t *body = m + HDR;
    const int no_reply = (h->flags & FLAG_NO_REPLY) != 0;

    if (h->flags & ~FLAG_NO_REPLY)
        return VFU_PUNT; /* a reply, an error flag, an unknown type: the session decides */
    switch (h->cmd) {
    case CMD_DMA_MAP: {
        if (!s->dma || h->size != HDR + 32 || nfds != 1 || ld32(body) != 32)
            return VFU_PUNT;
        if (vfiod_pe_dma_map(s->dma, ld64(body + 16), ld64(body + 24), ld64(body + 8),
                             ld32(body + 4), fds[0]) != VFIOD_DMA_DONE)
            return VFU_PUNT;
        break; /* the map closed the fd: the same file again, the session keeps its first */
    }
    case CMD_DMA_UNMAP: {
        if (!s->dma || h->size != HDR + 24 || nfds || ld32(body) != 24 || ld32(body + 4))
            return VFU_PUNT;
        if (vfiod_pe_dma_unmap(s->dma, ld64(body + 8), ld64(body + 16)) != VFIOD_DMA_DONE)
            return VFU_PUNT;
        break;
    }
    case CMD_REGION_READ: {
        uint64_t offset = ld64(body);
        uint32_t region = ld32(body + 8), count = ld32(body + 12);
        const struct vfu_range *r = NULL;
        uint8_t *p;
        if (h->size != HDR + 16 || nfds || count > s->max_xfer || count > READ_MAX)
            return VFU_PUNT;
        if (!blocked(s, region) &&
            (!(r = find_range(s, region, offset, count)) || r->kind == VFU_RANGE_HOOK))
            return VFU_PUNT;
        if (no_reply)
            break; /* answered by nobody, as the session does */
        p = reply(s, h, HDR + 16 + count);
        if (!p)
            return VFU_PUNT;
        memcpy(p + HDR, body, 16);
        if (r)
            memcpy(p + HDR + 16, r->data + (offset - r->offset), count);
        else
            memset(p + HDR + 16, 0xff, count); /* a frozen PE's loads read all-ones */
        return 0;
    }
    case CMD_REGION_WRITE: {
        uint64_t offset;
        uint32_t region, count;
        const struct vfu_range *r;
        if (h->size < HDR + 16 || nfds)
            return VFU_PUNT;
        offset = ld64(body);
        region = ld32(body + 8);
        count = ld32(body + 12);
        if (h->size - HDR - 16 != count || count > s->max_xfer)
            return VFU_PUNT;
        if (!blocked(s, region)) { /* a frozen PE drops stores */
            const uint8_t *src = body + 16;
            uint8_t *dst;
            r = find_range(s, region, offset, count);
            if (!r || r->kind == VFU_RANGE_RO)
                return VFU_PUNT;
            if (r->kind == VFU_RANGE_HOOK) {
                if (r->hook(r->ctx, offset - r->offset, src, count))
                    return VFU_PUNT; /* the function does it, message untouched */
                break;
            }
            dst = r->data + (offset - r->offset);
            if (r->kind == VFU_RANGE_CONFIG) {
                const uint64_t at = offset - r->offset;
                for (uint32_t i = 0; i < count; i++)
                    if (r->hooked[at + i])
                        return VFU_PUNT; /* the function reacts to this register */
                for (uint32_t i = 0; i < count; i++) {
                    uint8_t wm = r->wmask[at + i], v = src[i];
                    uint8_t nv = (uint8_t)((dst[i] & ~wm) | (v & wm));
                    dst[i] = (uint8_t)(nv & ~(v & r->w1cmask[at + i]));
                }
            } else {
                memcpy(dst, src, count);
            }
        }
        break;
    }
    default:
        return VFU_PUNT;
    }
    if (!no_reply && !reply(s, h, HDR))
        return VFU_PUNT; /* out of memory for the reply: the session will say so */
    return 0;
}

/* Handle the complete messages at the head of the buffer: 0 (need more data) or VFU_PUNT. */
static long process(struct vfu_session *s, int block)
{
    uint32_t handled = 0;

    s->streaming = 0;
    while (s->rtail - s->rhead >= HDR) {
        struct hdr h;
        uint64_t end;
        uint32_t nmarks = 0, nfds = 0;
        int fds[VFU_RECV_FDS];
        memcpy(&h, s->rbuf + s->rhead, HDR);
        if (h.size < HDR || h.size > s->max_msg)
            return VFU_PUNT; /* the session ends the stream */
        if (s->rtail - s->rhead < h.size) {
            if (s->rcap - s->rhead < h.size)
                compact(s);
            return 0;
        }
        end = s->rpos + h.size;
        while (nmarks < s->mcount && mark_at(s, nmarks)->last < end) {
            const struct vfu_mark *mk = mark_at(s, nmarks++);
            if (nfds + mk->nfds > VFU_RECV_FDS)
                return VFU_PUNT;
            memcpy(fds + nfds, mk->fds, mk->nfds * sizeof(int));
            nfds += mk->nfds;
        }
        if (handle(s, s->rbuf + s->rhead, &h, fds, nfds) != 0) {
            s->punts++;
            s->streak = 0;
            return VFU_PUNT;
        }
        /* consumed: every fd of the message was used (closed) by its handler */
        s->mhead = (s->mhead + nmarks) % s->mcap;
        s->mcount -= nmarks;
        s->rhead += h.size;
        s->rpos += h.size;
        s->messages++;
        s->streak++;
        /* several messages in one read, or one with an fd (each of those arrives in a read of
         * its own): the peer is pipelining, so more is probably waiting already */
        if (++handled > 1 || nfds)
            s->streaming = 1;
        if (s->pending >= s->batch) {
            long rc = send_all(s, block);
            if (rc)
                return rc;
        }
    }
    return 0;
}

/* Sleep until the socket is readable, hung up or shut down (vfu_wake): the read says which. */
static long sleep_readable(struct vfu_session *s)
{
    struct pollfd p = {s->sock, POLLIN, 0};
    s->sleeps++;
    if (poll(&p, 1, -1) < 0 && errno != EINTR)
        return -errno;
    return 0;
}

/* One recvmsg into the buffer: 0 (bytes arrived), or VFU_EOF (also after vfu_wake),
 * VFU_NEED_DATA, VFU_CTRUNC, VFU_PUNT (no room for more fd batches: the session reads on),
 * -errno.
 * sleep_first: the peer waits for our replies, so a read now would only fail. */
static long receive(struct vfu_session *s, int block, int sleep_first)
{
    char cbuf[CMSG_SPACE(VFU_RECV_FDS * sizeof(int))];

    if (s->rcap - s->rtail < RECV_ROOM)
        compact(s);
    if (s->mcount == s->mcap)
        return VFU_PUNT;
    for (int wait = block && sleep_first;; wait = 0) {
        struct iovec iov = {s->rbuf + s->rtail, s->rcap - s->rtail};
        struct msghdr mh = {0};
        ssize_t n;
        mh.msg_iov = &iov;
        mh.msg_iovlen = 1;
        mh.msg_control = cbuf;
        mh.msg_controllen = sizeof(cbuf);
        if (!iov.iov_len)
            return VFU_PUNT; /* a message the buffer cannot hold: the session judges it */
        /* a blocking run has the socket in blocking mode (vfu_run): the read sleeps itself,
         * one system call for the sleep and the bytes */
        if (wait)
            s->sleeps++;
        n = recvmsg(s->sock, &mh, (wait ? 0 : MSG_DONTWAIT) | MSG_CMSG_CLOEXEC);
        if (n >= 0) {
            int fds[VFU_RECV_FDS];
            uint32_t nfds = 0;
            for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
                if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                    uint32_t k = (uint32_t)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                    for (uint32_t i = 0; i < k; i++) {
                        int fd;
                        memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
                        if (nfds < VFU_RECV_FDS)
                            fds[nfds++] = fd;
                        else
                            close(fd);
                    }
                }
            }
            if (mh.msg_flags & MSG_CTRUNC) {
                for (uint32_t i = 0; i < nfds; i++)
                    close(fds[i]);
                return VFU_CTRUNC;
            }
            if (n == 0) {
                for (uint32_t i = 0; i < nfds; i++)
                    close(fds[i]); /* cannot happen on a stream socket; never leak them */
                return VFU_EOF;
            }
            if (nfds)
                add_mark(s, s->rpos + (s->rtail - s->rhead) + (uint64_t)n - 1, fds, nfds);
            s->rtail += (uint64_t)n;
            return 0;
        }
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            return -errno;
        if (!block)
            return VFU_NEED_DATA;
        {
            long rc = sleep_readable(s);
            if (rc)
                return rc;
        }
    }
}

static long run(struct vfu_session *s, int block)
{
    for (;;) {
        long rc = process(s, block);
        int replied;
        if (rc == VFU_PUNT) {
            long sent = send_all(s, block); /* the session's replies must come after ours */
            return sent ? sent : VFU_PUNT;
        }
        if (rc)
            return rc;
        if (s->streaming && s->pending && s->pending < s->batch) {
            /* a pipelining peer: read what else it sent before answering, one send for all */
            rc = receive(s, 0, 0);
            if (rc == 0)
                continue;
            if (rc != VFU_NEED_DATA) {
                long sent = send_all(s, block);
                return sent ? sent : rc;
            }
        }
        /* A peer that waits for a reply cannot have sent more yet: after answering it, sleep
         * first instead of trying a read that fails (one system call less per message). */
        replied = s->slen > 0 && s->rhead == s->rtail && !s->streaming;
        rc = send_all(s, block);
        if (rc)
            return rc;
        rc = receive(s, block, replied);
        if (rc == VFU_PUNT) {
            rc = send_all(s, block);
            return rc ? rc : VFU_PUNT;
        }
        if (rc)
            return rc;
    }
}

/* A blocking run owns the stream (the session waits for it), so the socket is in blocking mode
 * for its length and a synchronous peer's next request costs one recvmsg, not a poll and a
 * recvmsg; sends keep MSG_DONTWAIT (the stall check). The mode is restored before the session
 * has the socket again. */
long vfu_run(struct vfu_session *s, int block)
{
    int flags = block ? fcntl(s->sock, F_GETFL) : -1;
    long rc;
    if (flags >= 0 && (flags & O_NONBLOCK) && fcntl(s->sock, F_SETFL, flags & ~O_NONBLOCK) < 0)
        flags = -1;
    rc = run(s, block);
    if (flags >= 0 && (flags & O_NONBLOCK))
        fcntl(s->sock, F_SETFL, flags);
    return rc;
}

/* End a blocking run from another thread: its poll returns and its read sees EOF (a send, an
 * error). For a session that is going away: the socket carries nothing more. */
void vfu_wake(struct vfu_session *s) { shutdown(s->sock, SHUT_RDWR); }
