/*
 * What uart.c (the register file) and uart_tx.c (the transmit path) share: the UART's state.
 * Private to those two files; Python sees struct pyvmm_uart only as an opaque pointer.
 */
#ifndef PYVMM_UART_PRIVATE_H
#define PYVMM_UART_PRIVATE_H

#include <pthread.h>
#include <stdint.h>

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

/* Set up the transmit path for out_fd (a ring and its writer unless it is a regular file). */
int uart_tx_open(struct pyvmm_uart *uart);
/* Stop the writer (what it still holds is dropped and counted) and release the ring. */
void uart_tx_close(struct pyvmm_uart *uart);
/* Send one byte the guest wrote to THR (not in loopback); the caller holds uart->lock. */
void uart_tx_byte_locked(struct pyvmm_uart *uart, uint8_t byte);

#endif
