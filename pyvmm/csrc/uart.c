/*
 * A 16550A UART, as in the PC's COM1: the register file a guest driver programs, a
 * transmit path that never stalls (uart_tx.c), a receive FIFO that Python fills from
 * stdin, and the interrupt line (IRQ 4 on a PC) raised through KVM_IRQ_LINE when the guest
 * enabled an interrupt that is pending.
 *
 * It lives in C because a guest printing a line polls LSR and writes THR once per byte:
 * two exits per byte, which must not each cost a trip through Python.
 */
#include <stdlib.h>
#include <sys/ioctl.h>

#include "pyvmm.h"
#include "uart_private.h"

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

void pyvmm_uart_set_vm_fd(struct pyvmm_uart *uart, int vm_fd)
{
	uart->vm_fd = vm_fd;
}

struct pyvmm_uart *pyvmm_uart_new(int out_fd, int vm_fd, uint32_t irq)
{
	struct pyvmm_uart *uart = calloc(1, sizeof(*uart));

	if (!uart)
		return NULL;
	pthread_mutex_init(&uart->lock, NULL);
	uart->out_fd = out_fd;
	uart->vm_fd = vm_fd;
	uart->irq = irq;
	uart->dll = 12; /* 9600 baud, what firmware leaves behind */
	uart->lcr = 0x03;
	if (uart_tx_open(uart) < 0) {
		pthread_mutex_destroy(&uart->lock);
		free(uart);
		return NULL;
	}
	return uart;
}

void pyvmm_uart_free(struct pyvmm_uart *uart)
{
	if (!uart)
		return;
	uart_tx_close(uart);
	pthread_mutex_destroy(&uart->lock);
	free(uart);
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
	uart_tx_byte_locked(uart, byte);
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
