/* The message interrupt mirror (see irq.h). */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "irq.h"

void vfiod_irq_init(struct vfiod_irq *m)
{
    memset(m->fd, 0xff, sizeof(m->fd)); /* -1 */
    memset(m->pending, 0, sizeof(m->pending));
    m->npending = 0;
    m->mode = VFIOD_IRQ_OFF;
    m->notify_fd = -1;
    pthread_mutex_init(&m->lock, NULL);
}

int vfiod_irq_set(struct vfiod_irq *m, uint32_t v, int fd)
{
    int dup_fd = -1, old;
    if (v >= VFIOD_IRQ_VECTORS)
        return -EINVAL;
    if (fd >= 0) {
        /* above the numbers Python hands around, so that a closed fd's number is not taken
         * over by a duplicate here (number-based checks and logs stay unambiguous) */
        dup_fd = fcntl(fd, F_DUPFD_CLOEXEC, 100);
        if (dup_fd < 0)
            return -errno;
    }
    pthread_mutex_lock(&m->lock);
    old = m->fd[v];
    m->fd[v] = dup_fd;
    pthread_mutex_unlock(&m->lock);
    if (old >= 0)
        close(old); /* nobody signals it any more: C only writes under the lock */
    return 0;
}

void vfiod_irq_set_mode(struct vfiod_irq *m, uint32_t mode, uint32_t intx_level)
{
    pthread_mutex_lock(&m->lock);
    m->mode = mode;
    m->intx_level = intx_level;
    pthread_mutex_unlock(&m->lock);
}

static void signal_fd(int fd)
{
    uint64_t one = 1;
    /* EAGAIN: the counter is saturated, the interrupt is pending anyway */
    while (write(fd, &one, sizeof(one)) < 0 && errno == EINTR)
        ;
}

int vfiod_irq_fire(struct vfiod_irq *m, uint32_t v)
{
    int done = 0;
    if (v >= VFIOD_IRQ_VECTORS)
        return 0; /* callers keep to their vectors */
    pthread_mutex_lock(&m->lock);
    if (m->fd[v] >= 0) {
        signal_fd(m->fd[v]);
        m->signalled++;
        done = 1;
    } else {
        if (!m->pending[v]) {
            m->pending[v] = 1;
            m->npending++;
        }
        if (m->notify_fd >= 0)
            signal_fd(m->notify_fd);
    }
    pthread_mutex_unlock(&m->lock);
    return done;
}

uint32_t vfiod_irq_take(struct vfiod_irq *m, uint8_t *out, uint32_t max)
{
    uint32_t n = 0;
    pthread_mutex_lock(&m->lock);
    for (uint32_t v = 0; v < VFIOD_IRQ_VECTORS && m->npending && n < max; v++) {
        if (m->pending[v]) {
            m->pending[v] = 0;
            m->npending--;
            out[n++] = (uint8_t)v;
        }
    }
    pthread_mutex_unlock(&m->lock);
    return n;
}

void vfiod_irq_close(struct vfiod_irq *m)
{
    pthread_mutex_lock(&m->lock);
    for (uint32_t v = 0; v < VFIOD_IRQ_VECTORS; v++) {
        if (m->fd[v] >= 0)
            close(m->fd[v]);
        m->fd[v] = -1;
    }
    m->mode = VFIOD_IRQ_OFF;
    pthread_mutex_unlock(&m->lock);
}
