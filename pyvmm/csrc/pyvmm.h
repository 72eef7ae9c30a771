/*
 * pyvmm's native layer: the vCPU run loop and the devices that must not cost a trip into
 * Python per access. Python sets these structures up once (pyvmm/bus.py, pyvmm/vcpu.py);
 * the loop then runs KVM_RUN and handles every exit it can without taking the GIL.
 *
 * As in kvm_uapi.h, the text between the cdef markers is also given to cffi's cdef().
 */
#ifndef PYVMM_H
#define PYVMM_H

#include "kvm_uapi.h"
#include "vfio_uapi.h"

/* cdef-begin */
/* How a bus range is served. */
enum pyvmm_handler_kind {
	PYVMM_HANDLER_PYTHON = 0,     /* return to Python with the range index */
	PYVMM_HANDLER_UART = 1,       /* struct pyvmm_uart in .device */
	PYVMM_HANDLER_DEBUG_EXIT = 2, /* QEMU isa-debug-exit: a write of v ends the run, (v << 1) | 1 */
	PYVMM_HANDLER_POWEROFF = 3,   /* ACPI PM1a control: a write with SLP_EN ends the run, status 0 */
	PYVMM_HANDLER_FD = 4,         /* pread/pwrite on .fd at .fd_offset + (address - base);
				       * a failure as .faults says */
	PYVMM_HANDLER_BUFFER = 5,     /* host memory at .device: writes land there, reads come from it */
	PYVMM_HANDLER_RESET = 7,      /* reset control (port 0xCF9): a write with bit 2 set ends the
				       * run as a reboot */
	PYVMM_HANDLER_MSIX = 6,       /* an MSI-X table (struct pyvmm_msix_window in .device) inside
				       * an fd-forwarded window: table reads come from the emulated
				       * table, table writes land there and go to Python, the rest is
				       * forwarded as with PYVMM_HANDLER_FD */
};

/* The emulated MSI-X table inside a trapped window of a BAR. */
struct pyvmm_msix_window {
	uint64_t table_offset;    /* from the window's base */
	uint64_t table_size;      /* 16 bytes per vector */
	uint8_t *table;
};

/*
 * The failed accesses of tolerant forwarded ranges (one record may serve several ranges: the
 * trapped pieces of one BAR). Any vCPU's loop may add to it at any time, without a lock: the
 * failure that takes count from 0 to 1 alone writes the first_* fields, then sets first_ready
 * (release), so a reader that sees first_ready (acquire) sees them whole.
 */
struct pyvmm_forward_faults {
	uint64_t count;           /* failed accesses, all vCPUs */
	uint64_t first_offset;    /* the fd offset of the first one */
	int32_t first_errno;
	uint32_t first_size;      /* bytes */
	uint32_t first_is_write;
	uint32_t first_ready;
};

/* One claimed range of a port I/O or MMIO bus. */
struct pyvmm_range {
	uint64_t base;
	uint64_t length;
	uint32_t kind;
	int32_t fd;
	uint64_t fd_offset;
	void *device;
	uint64_t hits;            /* accesses served (all vCPUs; for --stats) */
	/*
	 * NULL: strict, a failing pread/pwrite on .fd ends the run (PYVMM_STOP_ERROR). Else
	 * tolerant, as QEMU's vfio_region_read/write: the failed read gives all ones, the failed
	 * write is dropped, the failure is recorded here and the guest goes on.
	 */
	struct pyvmm_forward_faults *faults;
};

/*
 * A bus: ranges sorted by base, never overlapping (pyvmm/bus.py checks). A bus that changes
 * while vCPUs run (a guest moving a BAR) gets a new table, swapped into each loop's pointer
 * (pyvmm_loop_publish); the old one is freed once no loop names it in its *_in_use field.
 */
struct pyvmm_bus {
	struct pyvmm_range *ranges;
	uint32_t count;
};

/* Why pyvmm_vcpu_run returned. */
enum pyvmm_stop {
	PYVMM_STOP_PYTHON = 1,         /* a Python range was accessed: see access_* fields */
	PYVMM_STOP_GUEST_EXIT = 2,     /* debug exit or power-off: exit_status */
	PYVMM_STOP_HALTED = 3,         /* HLT with interrupts off: this vCPU is finished */
	PYVMM_STOP_HALTED_IF = 4,      /* HLT with interrupts on and no in-kernel irqchip */
	PYVMM_STOP_SHUTDOWN = 5,       /* triple fault */
	PYVMM_STOP_FAIL_ENTRY = 6,
	PYVMM_STOP_INTERNAL_ERROR = 7,
	PYVMM_STOP_SYSTEM_EVENT = 8,
	PYVMM_STOP_UNCLAIMED = 9,      /* unclaimed access while fail_on_unclaimed is set */
	PYVMM_STOP_UNHANDLED_EXIT = 10,/* an exit reason pyvmm does not handle */
	PYVMM_STOP_INTERRUPTED = 11,   /* *stop was set */
	PYVMM_STOP_ERROR = 12,         /* a syscall failed: error holds errno */
	PYVMM_STOP_REBOOT = 13,        /* the guest reset the machine (reset control register) */
};

/* Accesses that no range claimed. */
struct pyvmm_unclaimed {
	uint64_t count;
	uint64_t last_address;
	uint32_t last_size;
	uint32_t last_is_write;
};

/* Everything one vCPU's loop needs, and what it reports back. */
struct pyvmm_vcpu_loop {
	int vcpu_fd;
	struct kvm_run *run;
	const struct pyvmm_bus *pio;
	const struct pyvmm_bus *mmio;
	/*
	 * Hazard pointers: the table of each bus this loop may still be reading (or that a
	 * Python-handled access it handed back indexes). Python frees a retired table only
	 * when no loop names it here; each loop pins at most one table per bus.
	 */
	const struct pyvmm_bus *pio_in_use;
	const struct pyvmm_bus *mmio_in_use;
	volatile int *stop;
	uint32_t fail_on_unclaimed;
	struct pyvmm_unclaimed unclaimed_pio;
	struct pyvmm_unclaimed unclaimed_mmio;
	/* The access that stopped the loop with PYVMM_STOP_PYTHON. */
	uint32_t access_range;    /* index into the bus's ranges */
	uint32_t access_is_mmio;
	uint32_t access_is_write;
	uint32_t access_size;     /* bytes per item */
	uint32_t access_count;    /* items (rep ins/outs) */
	uint32_t access_data_offset; /* where the data lies in kvm_run */
	uint64_t access_offset;   /* address - range base */
	uint64_t access_bus;      /* the struct pyvmm_bus * that access_range indexes: a bus may
				   * get a new table between this exit and Python's turn */
	uint64_t exit_status;
	int error;
	uint32_t error_in_device; /* the errno came from a forwarded fd, not from KVM_RUN */
	uint64_t exits;           /* every exit from KVM_RUN */
	uint64_t python_exits;    /* exits handed to Python */
	uint64_t exit_reasons[32]; /* exits by KVM_EXIT_* reason (the last counts any above) */
};

int pyvmm_vcpu_run(struct pyvmm_vcpu_loop *loop);

/*
 * Point a loop's pio (is_mmio 0) or mmio table at bus, with a full barrier: a *_in_use field
 * read after this returns either names the old table or its loop will see the new one.
 */
void pyvmm_loop_publish(struct pyvmm_vcpu_loop *loop, int is_mmio, const struct pyvmm_bus *bus);

/*
 * Install a do-nothing handler for the signal that kicks vCPU threads out of KVM_RUN. In C,
 * not through Python's signal module: it may be called from any thread, and it must outlive
 * interpreter shutdown, which resets every Python-installed handler to the default (fatal).
 */
int pyvmm_install_kick_handler(int signum);

/* ioctl(2) that returns -errno on failure, so Python needs no errno round trip. */
int pyvmm_ioctl(int fd, unsigned long request, void *argument);
int pyvmm_ioctl_value(int fd, unsigned long request, unsigned long argument);

/* The 16550A UART: state is private to uart.c. */
struct pyvmm_uart;
struct pyvmm_uart *pyvmm_uart_new(int out_fd, int vm_fd, uint32_t irq);
/* Wire the IRQ once an in-kernel irqchip exists (vm_fd < 0: no IRQ). */
void pyvmm_uart_set_vm_fd(struct pyvmm_uart *uart, int vm_fd);
void pyvmm_uart_free(struct pyvmm_uart *uart);
void pyvmm_uart_push_input(struct pyvmm_uart *uart, const uint8_t *bytes, uint32_t length);
int pyvmm_uart_flush(struct pyvmm_uart *uart);
/* Flush, and wait up to timeout_ms for a stalled consumer to take the ring; what is left is
 * dropped. Returns the total dropped so far. */
uint64_t pyvmm_uart_drain(struct pyvmm_uart *uart, uint32_t timeout_ms);
uint64_t pyvmm_uart_dropped(struct pyvmm_uart *uart);
uint64_t pyvmm_uart_bytes_out(struct pyvmm_uart *uart);
/* cdef-end */

/* Used by the run loop; not visible from Python. */
void pyvmm_uart_io(struct pyvmm_uart *uart, uint64_t offset, uint8_t *data, uint32_t size,
		   int is_write);

#endif
