/*
 * A 16550A UART, as in the PC's COM1: the register file a guest driver programs, a
 * transmit path that never stalls, a receive FIFO that Python fills from stdin, and the
 * interrupt line (IRQ 4 on a PC) raised through KVM_IRQ_LINE when the guest enabled an
 * interrupt that is pending.
 *
 * Transmit: output to a regular file (a file, a memfd capture) cannot stall, so the vCPU
 * writes it itself, line-buffered, and every byte is kept. Output to anything else (a pipe,
 * a terminal, a socket) has a consumer that may stop reading, and a vCPU blocked in write()
 * under the UART lock would keep the run past its timeout or SIGTERM. So the vCPU only
 * appends to a 1 MiB ring; a writer thread drains it with poll() and non-blocking writes on
 * its own open file description; a full ring drops the byte and counts it. The guest's THR
 * stays always empty (LSR.THRE=1): the stop never waits on the consumer.
 *
 * It lives in C because a guest printing a line polls LSR and writes THR once per byte:
 * two exits per byte, which must not each cost a trip through Python.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "pyvmm.h"

enum {
	UART_RBR_THR = 0, UART_IER = 1, UART_IIR_FCR = 2, UART_LCR = 3,
	UART_MCR = 4, UART_LSR = 5, UART_MSR = 6, UART_SCR = 7,
};

#define IER_RDI 0x01   /* received data available */
#define IER_THRI 0x02  /* transmit holding register empty */
#define IIR_NONE 0x01
#define IIR_THRI 0x02
#define IIR_RDI 0x04
#define IIR_FIFO 0xc0
#define FCR_ENABLE 0x01
#define FCR_CLEAR_RX 0x02
#define LCR_DLAB 0x80
#define LSR_DR 0x01
#define LSR_THRE 0x20
#define LSR_TEMT 0x40
#define MCR_LOOP 0x10
#define MSR_LOOPBACK_IDLE 0xb0 /* DCD, DSR, CTS asserted: "a terminal is attached" */

#define RX_SIZE 4096
#define TX_SIZE 4096
#define RING_SIZE (1u << 20)
#define WRITE_CHUNK 4096 /* PIPE_BUF: at most what one write hands the consumer */

struct pyvmm_uart {
	pthread_mutex_t lock;
	int out_fd;
	int vm_fd;
	uint32_t irq;
	int irq_level;
	uint8_t ier, fcr, lcr, mcr, scr, dll, dlm;
	int thri_pending;
	uint8_t rx[RX_SIZE];
	uint32_t rx_head, rx_count;
	uint8_t tx[TX_SIZE];
	uint32_t tx_count;
	uint64_t bytes_out;
	uint64_t dropped;
	/* The ring and its writer thread, for output that may stall (ring != NULL). */
	uint8_t *ring;
	uint32_t ring_head, ring_count;
	uint32_t inflight;    /* bytes the writer took from the ring and is writing */
	int writer_fd;        /* out_fd, reopened O_NONBLOCK where /proc allows */
	int wake_fd;          /* eventfd: abandon the chunk in flight, or close */
	int writer_waiting, closing, abandon, broken;
	pthread_cond_t ready;   /* the writer waits for bytes */
	pthread_cond_t drained; /* pyvmm_uart_drain waits for an empty ring */
	pthread_t writer;
};

void pyvmm_uart_set_vm_fd(struct pyvmm_uart *uart, int vm_fd)
{
	uart->vm_fd = vm_fd;
}

static int write_pending(struct pyvmm_uart *uart, const uint8_t *bytes, uint32_t length)
{
	uint32_t done = 0;
	struct pollfd fds[2] = {
		{ .fd = uart->writer_fd, .events = POLLOUT },
		{ .fd = uart->wake_fd, .events = POLLIN },
	};

	while (done < length) {
		uint64_t wakes;
		ssize_t written;

		if (poll(fds, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		if (fds[1].revents) {
			if (read(uart->wake_fd, &wakes, sizeof(wakes)) < 0 && errno != EAGAIN)
				return -1;
			pthread_mutex_lock(&uart->lock);
			wakes = uart->abandon || uart->closing;
			uart->abandon = 0;
			pthread_mutex_unlock(&uart->lock);
			if (wakes)
				return 0; /* the bytes in flight were counted as dropped */
		}
		if (!fds[0].revents)
			continue;
		written = write(uart->writer_fd, bytes + done, length - done);
		if (written < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return -1; /* EPIPE or worse: the reader is gone */
		}
		done += written;
	}
	return 0;
}

static void *writer_main(void *arg)
{
	struct pyvmm_uart *uart = arg;
	uint8_t chunk[WRITE_CHUNK];

	pthread_mutex_lock(&uart->lock);
	for (;;) {
		uint32_t length;

		while (!uart->ring_count && !uart->closing) {
			uart->writer_waiting = 1;
			pthread_cond_wait(&uart->ready, &uart->lock);
			uart->writer_waiting = 0;
		}
		if (uart->closing)
			break;
		length = uart->ring_count;
		if (length > RING_SIZE - uart->ring_head)
			length = RING_SIZE - uart->ring_head;
		if (length > WRITE_CHUNK)
			length = WRITE_CHUNK;
		memcpy(chunk, uart->ring + uart->ring_head, length);
		uart->ring_head = (uart->ring_head + length) % RING_SIZE;
		uart->ring_count -= length;
		uart->inflight = length;
		pthread_mutex_unlock(&uart->lock);
		if (write_pending(uart, chunk, length) < 0) {
			pthread_mutex_lock(&uart->lock);
			/* Everything from here on is dropped and counted. */
			uart->broken = 1;
			uart->dropped += uart->inflight + uart->ring_count;
			uart->ring_count = 0;
		} else {
			pthread_mutex_lock(&uart->lock);
		}
		/* A drain that gave up counted the chunk in flight; a wake it left is harmless. */
		uart->abandon = 0;
		uart->inflight = 0;
		if (!uart->ring_count)
			pthread_cond_broadcast(&uart->drained);
	}
	pthread_mutex_unlock(&uart->lock);
	return NULL;
}

/* A new open file description for fd, so O_NONBLOCK is not shared with whoever else
 * holds the pipe or terminal (a shell, the parent process). */
static int reopen_nonblocking(int fd)
{
	char path[64];
	int reopened;

	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	reopened = open(path, O_WRONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
	return reopened >= 0 ? reopened : fd; /* a socket: poll, then a write of <= PIPE_BUF */
}

static int start_writer(struct pyvmm_uart *uart)
{
	pthread_condattr_t attr;
	sigset_t all, previous;
	int error;

	uart->ring = malloc(RING_SIZE);
	if (!uart->ring)
		return -1;
	uart->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (uart->wake_fd < 0)
		return -1;
	uart->writer_fd = reopen_nonblocking(uart->out_fd);
	pthread_cond_init(&uart->ready, NULL);
	pthread_condattr_init(&attr);
	pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
	pthread_cond_init(&uart->drained, &attr);
	pthread_condattr_destroy(&attr);
	/* The writer takes no signals: SIGINT/SIGTERM and the kick are for other threads. */
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &previous);
	error = pthread_create(&uart->writer, NULL, writer_main, uart);
	pthread_sigmask(SIG_SETMASK, &previous, NULL);
	if (error) {
		pthread_cond_destroy(&uart->ready);
		pthread_cond_destroy(&uart->drained);
		return -1;
	}
	return 0;
}

static void release_writer_resources(struct pyvmm_uart *uart)
{
	if (uart->writer_fd >= 0 && uart->writer_fd != uart->out_fd)
		close(uart->writer_fd);
	if (uart->wake_fd >= 0)
		close(uart->wake_fd);
	free(uart->ring);
}

struct pyvmm_uart *pyvmm_uart_new(int out_fd, int vm_fd, uint32_t irq)
{
	struct pyvmm_uart *uart = calloc(1, sizeof(*uart));
	struct stat status;

	if (!uart)
		return NULL;
	pthread_mutex_init(&uart->lock, NULL);
	uart->out_fd = out_fd;
	uart->vm_fd = vm_fd;
	uart->irq = irq;
	uart->dll = 12; /* 9600 baud, what firmware leaves behind */
	uart->lcr = 0x03;
	uart->writer_fd = uart->wake_fd = -1;
	if (fstat(out_fd, &status) == 0 && !S_ISREG(status.st_mode) && start_writer(uart) < 0) {
		release_writer_resources(uart);
		pthread_mutex_destroy(&uart->lock);
		free(uart);
		return NULL;
	}
	return uart;
}

void pyvmm_uart_free(struct pyvmm_uart *uart)
{
	uint64_t one = 1;

	if (!uart)
		return;
	if (uart->ring) {
		pthread_mutex_lock(&uart->lock);
		uart->closing = 1;
		uart->dropped += uart->ring_count + uart->inflight;
		uart->ring_count = 0;
		pthread_cond_signal(&uart->ready);
		pthread_mutex_unlock(&uart->lock);
		/* Bounded: the writer only ever blocks in poll(), which the eventfd ends. */
		if (write(uart->wake_fd, &one, sizeof(one)) < 0)
			perror("pyvmm: uart wake");
		pthread_join(uart->writer, NULL);
		pthread_cond_destroy(&uart->ready);
		pthread_cond_destroy(&uart->drained);
		release_writer_resources(uart);
	}
	pthread_mutex_destroy(&uart->lock);
	free(uart);
}

static int tx_flush_locked(struct pyvmm_uart *uart)
{
	uint32_t written = 0;

	while (written < uart->tx_count) {
		ssize_t done = write(uart->out_fd, uart->tx + written, uart->tx_count - written);
		if (done < 0) {
			if (errno == EINTR)
				continue;
			uart->dropped += uart->tx_count - written;
			uart->tx_count = 0;
			return -errno; /* a full disk must not wedge the guest */
		}
		written += done;
	}
	uart->tx_count = 0;
	return 0;
}

int pyvmm_uart_flush(struct pyvmm_uart *uart)
{
	int result;

	pthread_mutex_lock(&uart->lock);
	result = tx_flush_locked(uart);
	pthread_mutex_unlock(&uart->lock);
	return result;
}

uint64_t pyvmm_uart_drain(struct pyvmm_uart *uart, uint32_t timeout_ms)
{
	struct timespec deadline;
	uint64_t dropped, one = 1;
	int abandon = 0;

	pthread_mutex_lock(&uart->lock);
	tx_flush_locked(uart);
	if (uart->ring) {
		clock_gettime(CLOCK_MONOTONIC, &deadline);
		deadline.tv_sec += timeout_ms / 1000;
		deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000;
		if (deadline.tv_nsec >= 1000000000) {
			deadline.tv_sec++;
			deadline.tv_nsec -= 1000000000;
		}
		if (uart->writer_waiting)
			pthread_cond_signal(&uart->ready);
		while (uart->ring_count || uart->inflight)
			if (pthread_cond_timedwait(&uart->drained, &uart->lock, &deadline) == ETIMEDOUT)
				break;
		if (uart->ring_count || uart->inflight) {
			/* The consumer stalled: give up on what it has not taken, and count it. */
			uart->dropped += uart->ring_count + uart->inflight;
			uart->ring_count = uart->inflight = 0;
			uart->abandon = abandon = 1;
		}
	}
	dropped = uart->dropped;
	pthread_mutex_unlock(&uart->lock);
	if (abandon && write(uart->wake_fd, &one, sizeof(one)) < 0)
		perror("pyvmm: uart wake");
	return dropped;
}

uint64_t pyvmm_uart_dropped(struct pyvmm_uart *uart)
{
	return uart->dropped;
}

uint64_t pyvmm_uart_bytes_out(struct pyvmm_uart *uart)
{
	return uart->bytes_out;
}

static uint8_t pending_interrupt(const struct pyvmm_uart *uart)
{
	if ((uart->ier & IER_RDI) && uart->rx_count)
		return IIR_RDI;
	if ((uart->ier & IER_THRI) && uart->thri_pending)
		return IIR_THRI;
	return IIR_NONE;
}

/* Drive the line to match the pending state; no ioctl when nothing changed. */
static void update_irq_locked(struct pyvmm_uart *uart)
{
	int level = pending_interrupt(uart) != IIR_NONE;
	struct kvm_irq_level line = { .irq = uart->irq, .level = level };

	if (level == uart->irq_level || uart->vm_fd < 0)
		return;
	uart->irq_level = level;
	ioctl(uart->vm_fd, KVM_IRQ_LINE, &line);
}

static void transmit_locked(struct pyvmm_uart *uart, uint8_t byte)
{
	if (uart->mcr & MCR_LOOP) {
		if (uart->rx_count < RX_SIZE)
			uart->rx[(uart->rx_head + uart->rx_count++) % RX_SIZE] = byte;
		return;
	}
	uart->bytes_out++;
	if (uart->ring) {
		if (uart->broken || uart->ring_count == RING_SIZE) {
			uart->dropped++;
			return;
		}
		uart->ring[(uart->ring_head + uart->ring_count++) % RING_SIZE] = byte;
		/* Line-buffered: the writer wakes for a whole line or a full chunk. */
		if (uart->writer_waiting && (byte == '\n' || uart->ring_count >= WRITE_CHUNK))
			pthread_cond_signal(&uart->ready);
		return;
	}
	uart->tx[uart->tx_count++] = byte;
	/* Line-buffered, so interactive output and test logs show whole lines promptly. */
	if (byte == '\n' || uart->tx_count == TX_SIZE)
		tx_flush_locked(uart);
}

static uint8_t read_register(struct pyvmm_uart *uart, uint64_t offset)
{
	uint8_t value, iir;

	switch (offset) {
	case UART_RBR_THR:
		if (uart->lcr & LCR_DLAB)
			return uart->dll;
		if (!uart->rx_count)
			return 0;
		value = uart->rx[uart->rx_head];
		uart->rx_head = (uart->rx_head + 1) % RX_SIZE;
		uart->rx_count--;
		return value;
	case UART_IER:
		return (uart->lcr & LCR_DLAB) ? uart->dlm : uart->ier;
	case UART_IIR_FCR:
		iir = pending_interrupt(uart);
		/* Reading IIR acknowledges a transmit-empty interrupt. */
		if (iir == IIR_THRI)
			uart->thri_pending = 0;
		return iir | ((uart->fcr & FCR_ENABLE) ? IIR_FIFO : 0);
	case UART_LCR:
		return uart->lcr;
	case UART_MCR:
		return uart->mcr;
	case UART_LSR:
		return LSR_THRE | LSR_TEMT | (uart->rx_count ? LSR_DR : 0);
	case UART_MSR:
		/* Loopback wires RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD. */
		if (uart->mcr & MCR_LOOP)
			return (uart->mcr & 0x02) << 3 | (uart->mcr & 0x01) << 5 |
			       (uart->mcr & 0x0c) << 4;
		return MSR_LOOPBACK_IDLE;
	case UART_SCR:
		return uart->scr;
	}
	return 0xff;
}

static void write_register(struct pyvmm_uart *uart, uint64_t offset, uint8_t value)
{
	switch (offset) {
	case UART_RBR_THR:
		if (uart->lcr & LCR_DLAB) {
			uart->dll = value;
			return;
		}
		transmit_locked(uart, value);
		/* The byte left at once: the holding register is empty again. */
		uart->thri_pending = 1;
		return;
	case UART_IER:
		if (uart->lcr & LCR_DLAB) {
			uart->dlm = value;
			return;
		}
		/* Enabling THRI while THR is empty raises it at once, as on real parts. */
		if (!(uart->ier & IER_THRI) && (value & IER_THRI))
			uart->thri_pending = 1;
		uart->ier = value & 0x0f;
		return;
	case UART_IIR_FCR:
		uart->fcr = value;
		if (value & FCR_CLEAR_RX)
			uart->rx_head = uart->rx_count = 0;
		return;
	case UART_LCR:
		uart->lcr = value;
		return;
	case UART_MCR:
		uart->mcr = value & 0x1f;
		return;
	case UART_SCR:
		uart->scr = value;
		return;
	}
	/* LSR and MSR are read-only. */
}

void pyvmm_uart_io(struct pyvmm_uart *uart, uint64_t offset, uint8_t *data, uint32_t size,
		   int is_write)
{
	uint32_t i;

	pthread_mutex_lock(&uart->lock);
	/* Wider accesses touch consecutive registers, as on the ISA bus. */
	for (i = 0; i < size; i++) {
		if (is_write)
			write_register(uart, offset + i, data[i]);
		else
			data[i] = read_register(uart, offset + i);
	}
	update_irq_locked(uart);
	pthread_mutex_unlock(&uart->lock);
}

void pyvmm_uart_push_input(struct pyvmm_uart *uart, const uint8_t *bytes, uint32_t length)
{
	uint32_t i;

	pthread_mutex_lock(&uart->lock);
	/* A full FIFO drops bytes, as an overrun on real hardware would. */
	for (i = 0; i < length && uart->rx_count < RX_SIZE; i++)
		uart->rx[(uart->rx_head + uart->rx_count++) % RX_SIZE] = bytes[i];
	update_irq_locked(uart);
	pthread_mutex_unlock(&uart->lock);
}
