/*
 * The UART's transmit path: where the bytes a guest writes to THR go.
 *
 * Output to a regular file (a file, a memfd capture) cannot stall, so the vCPU writes it
 * itself, line-buffered, and every byte is kept. Output to anything else (a pipe, a
 * terminal, a socket) has a consumer that may stop reading, and a vCPU blocked in write()
 * under the UART lock would keep the run past its timeout or SIGTERM. So the vCPU only
 * appends to a 1 MiB ring; a writer thread drains it with poll() and non-blocking writes on
 * its own open file description; a full ring drops the byte and counts it. The guest's THR
 * stays always empty (LSR.THRE=1): the stop never waits on the consumer.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "pyvmm.h"
#include "uart_private.h"

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

int uart_tx_open(struct pyvmm_uart *uart)
{
	struct stat status;

	uart->writer_fd = uart->wake_fd = -1;
	if (fstat(uart->out_fd, &status) < 0 || S_ISREG(status.st_mode))
		return 0;
	if (start_writer(uart) < 0) {
		release_writer_resources(uart);
		return -1;
	}
	return 0;
}

void uart_tx_close(struct pyvmm_uart *uart)
{
	uint64_t one = 1;

	if (!uart->ring)
		return;
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

void uart_tx_byte_locked(struct pyvmm_uart *uart, uint8_t byte)
{
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
