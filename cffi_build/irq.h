/*
 * The C mirror of a function's message interrupts, so that C threads (the NVMe data mover's
 * completions) can signal the guest without Python.
 *
 * The Python IrqController (vfiod/pci/irq.py) owns interrupt state and keeps this mirror
 * current on every change: for each vector, a duplicate of the eventfd to signal when the vector
 * can be delivered right now (MSI or MSI-X enabled, an fd installed, masked by nothing), else
 * -1. C signals what it can; a vector it cannot deliver is recorded as pending for Python, which
 * then fires it through the controller (setting the MSI-X PBA bit or the MSI pending bit, or
 * nothing when messages are off) and is told through ``notify_fd``. The mirror holds its own fd
 * duplicates, so Python may close or replace its fds at any time.
 */
#ifndef VFIOD_IRQ_H
#define VFIOD_IRQ_H

#include <pthread.h>
#include <stdint.h>

#define VFIOD_IRQ_VECTORS 256

#define VFIOD_IRQ_OFF 0  /* neither MSI nor MSI-X enabled (INTx or nothing): Python's */
#define VFIOD_IRQ_MSI 1
#define VFIOD_IRQ_MSIX 2

struct vfiod_irq {
    uint32_t mode;                      /* VFIOD_IRQ_* */
    uint32_t intx_level;                /* INTx asserted (Python's level to drop) */
    int32_t fd[VFIOD_IRQ_VECTORS];      /* deliverable now: our dup of its eventfd, else -1 */
    uint8_t pending[VFIOD_IRQ_VECTORS]; /* for Python to fire */
    uint32_t npending;
    int32_t notify_fd;                  /* eventfd written when a vector becomes pending */
    uint64_t signalled;                 /* eventfd writes done here */
    pthread_mutex_t lock;
};

void vfiod_irq_init(struct vfiod_irq *m);
/* Vector v is deliverable through fd (duplicated here), or not at all (fd < 0); 0 or -errno. */
int vfiod_irq_set(struct vfiod_irq *m, uint32_t v, int fd);
void vfiod_irq_set_mode(struct vfiod_irq *m, uint32_t mode, uint32_t intx_level);
/* Raise vector v: 1 if signalled, 0 if left pending for Python. */
int vfiod_irq_fire(struct vfiod_irq *m, uint32_t v);
/* The vectors pending for Python (cleared); returns how many were written to out. */
uint32_t vfiod_irq_take(struct vfiod_irq *m, uint8_t *out, uint32_t max);
/* Close every duplicate (the function closes). */
void vfiod_irq_close(struct vfiod_irq *m);

#endif
