/*
 * The vCPU run loop: KVM_RUN, decode the exit, serve it natively when the claimed range
 * has a native handler, and return to Python only when Python must act. Python calls
 * pyvmm_vcpu_run() with the GIL released (cffi does that for every API-mode call), so
 * vCPUs run in parallel and a native exit costs a bus lookup and a function call.
 */
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "pyvmm.h"

#define ACPI_PM1_SLP_EN (1u << 13)
#define RESET_CONTROL_RESET_CPU (1u << 2)

/* Binary search: buses hold a handful of ranges, but the lookup is on every exit. */
static const struct pyvmm_range *bus_find(const struct pyvmm_bus *bus, uint64_t address,
					  uint32_t *index)
{
	uint32_t low = 0, high = bus ? bus->count : 0;

	while (low < high) {
		uint32_t middle = low + (high - low) / 2;
		const struct pyvmm_range *range = &bus->ranges[middle];

		if (address < range->base) {
			high = middle;
		} else if (address - range->base >= range->length) {
			low = middle + 1;
		} else {
			*index = middle;
			return range;
		}
	}
	return NULL;
}

/*
 * The table of a bus for this exit, pinned in *in_use before use (a hazard pointer). The
 * common case, the table this loop pinned last time, costs two loads and no store: that pin
 * has been visible since it was validated, so Python cannot have freed it since.
 */
static const struct pyvmm_bus *bus_pin(const struct pyvmm_bus *const *slot,
				       const struct pyvmm_bus **in_use)
{
	const struct pyvmm_bus *bus = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
	const struct pyvmm_bus *again;

	while (bus != *in_use) {
		/* Dekker with pyvmm_loop_publish: store the pin, then check it is still current. */
		__atomic_store_n(in_use, bus, __ATOMIC_SEQ_CST);
		again = __atomic_load_n(slot, __ATOMIC_SEQ_CST);
		if (again == bus)
			break;
		bus = again;
	}
	return bus;
}

void pyvmm_loop_publish(struct pyvmm_vcpu_loop *loop, int is_mmio, const struct pyvmm_bus *bus)
{
	__atomic_store_n(is_mmio ? &loop->mmio : &loop->pio, bus, __ATOMIC_SEQ_CST);
}

static uint64_t load_le(const uint8_t *data, uint32_t size)
{
	uint64_t value = 0;

	memcpy(&value, data, size < 8 ? size : 8);
	return value;
}

/* SERVED: done; TO_PYTHON: served, but Python must see it (an MSI-X table write). */
enum { SERVED = 0, TO_PYTHON = -1 };

static void record_fault(struct pyvmm_forward_faults *faults, uint64_t fd_offset, int error,
			 uint32_t size, int is_write)
{
	if (__atomic_fetch_add(&faults->count, 1, __ATOMIC_RELAXED) != 0)
		return;
	faults->first_offset = fd_offset;
	faults->first_errno = error;
	faults->first_size = size;
	faults->first_is_write = is_write;
	__atomic_store_n(&faults->first_ready, 1, __ATOMIC_RELEASE);
}

/* An access straddling the end of the range moves only the bytes inside it; the rest reads
 * as ones, as with PYVMM_HANDLER_BUFFER. The fd is never touched past the range. A failure
 * ends the run, or on a tolerant range (.faults) is the guest's: see struct pyvmm_range. */
static int forward(struct pyvmm_vcpu_loop *loop, const struct pyvmm_range *range,
		   uint64_t offset, uint8_t *data, uint32_t size, int is_write)
{
	uint32_t inside = range->length - offset < size ? (uint32_t)(range->length - offset) : size;
	ssize_t done;
	int error;

	if (is_write) {
		done = pwrite(range->fd, data, inside, range->fd_offset + offset);
	} else {
		memset(data + inside, 0xff, size - inside);
		done = pread(range->fd, data, inside, range->fd_offset + offset);
	}
	if (done == (ssize_t)inside)
		return SERVED;
	error = done < 0 ? errno : EIO;  /* a short transfer: the device gave up part way */
	if (range->faults) {
		if (!is_write)
			memset(data, 0xff, size);  /* the whole access, even what a short read gave */
		record_fault(range->faults, range->fd_offset + offset, error, size, is_write);
		return SERVED;
	}
	loop->error = error;
	loop->error_in_device = 1;
	loop->access_offset = offset;
	return PYVMM_STOP_ERROR;
}

/*
 * The MSI-X table is the VMM's (the guest's address/data become KVM routes), so it is
 * emulated here; everything else in the window (the PBA, registers sharing the table's page)
 * goes to the device.
 */
static int serve_msix(struct pyvmm_vcpu_loop *loop, const struct pyvmm_range *range,
		      uint64_t offset, uint8_t *data, uint32_t size, int is_write)
{
	const struct pyvmm_msix_window *msix = range->device;

	if (offset < msix->table_offset || offset - msix->table_offset + size > msix->table_size)
		return forward(loop, range, offset, data, size, is_write);
	if (!is_write) {
		memcpy(data, msix->table + (offset - msix->table_offset), size);
		return SERVED;
	}
	memcpy(msix->table + (offset - msix->table_offset), data, size);
	return TO_PYTHON;
}

/*
 * Serve one item of an access natively. Returns SERVED, or a pyvmm_stop reason that ends
 * the loop (a guest exit, an fd error).
 */
static int serve_native(struct pyvmm_vcpu_loop *loop, const struct pyvmm_range *range,
			uint64_t address, uint8_t *data, uint32_t size, int is_write)
{
	uint64_t offset = address - range->base;
	uint64_t inside;

	__atomic_fetch_add(&((struct pyvmm_range *)range)->hits, 1, __ATOMIC_RELAXED);
	switch (range->kind) {
	case PYVMM_HANDLER_UART:
		pyvmm_uart_io(range->device, offset, data, size, is_write);
		return SERVED;
	case PYVMM_HANDLER_DEBUG_EXIT:
		if (!is_write) {
			memset(data, 0xff, size);
			return SERVED;
		}
		loop->exit_status = (load_le(data, size) << 1) | 1;
		return PYVMM_STOP_GUEST_EXIT;
	case PYVMM_HANDLER_POWEROFF:
		if (!is_write) {
			memset(data, 0, size);
			return SERVED;
		}
		if (!(load_le(data, size) & ACPI_PM1_SLP_EN))
			return SERVED;
		loop->exit_status = 0;
		return PYVMM_STOP_GUEST_EXIT;
	case PYVMM_HANDLER_BUFFER:
		/* An access straddling the end keeps to the buffer; the rest reads as ones. */
		inside = range->length - offset < size ? range->length - offset : size;
		if (is_write) {
			memcpy((uint8_t *)range->device + offset, data, inside);
		} else {
			memset(data, 0xff, size);
			memcpy(data, (uint8_t *)range->device + offset, inside);
		}
		return SERVED;
	case PYVMM_HANDLER_RESET:
		if (!is_write) {
			memset(data, 0, size);
			return SERVED;
		}
		return load_le(data, size) & RESET_CONTROL_RESET_CPU ? PYVMM_STOP_REBOOT : SERVED;
	case PYVMM_HANDLER_FD:
		return forward(loop, range, offset, data, size, is_write);
	case PYVMM_HANDLER_MSIX:
		return serve_msix(loop, range, offset, data, size, is_write);
	}
	loop->error = EINVAL;
	return PYVMM_STOP_ERROR;
}

static int unclaimed(struct pyvmm_vcpu_loop *loop, struct pyvmm_unclaimed *record,
		     uint64_t address, uint8_t *data, uint32_t size, int is_write)
{
	record->count++;
	record->last_address = address;
	record->last_size = size;
	record->last_is_write = is_write;
	if (!is_write)
		memset(data, 0xff, size);
	return loop->fail_on_unclaimed ? PYVMM_STOP_UNCLAIMED : SERVED;
}

/* Hand the access to Python: it completes the data in kvm_run and calls us again. */
static int to_python(struct pyvmm_vcpu_loop *loop, const struct pyvmm_bus *bus, uint32_t index,
		     uint64_t offset, int is_mmio, int is_write, uint32_t size, uint32_t count,
		     uint32_t data_offset)
{
	loop->access_bus = (uint64_t)(uintptr_t)bus;
	loop->access_range = index;
	loop->access_offset = offset;
	loop->access_is_mmio = is_mmio;
	loop->access_is_write = is_write;
	loop->access_size = size;
	loop->access_count = count;
	loop->access_data_offset = data_offset;
	loop->python_exits++;
	return PYVMM_STOP_PYTHON;
}

static int handle_io(struct pyvmm_vcpu_loop *loop)
{
	struct kvm_run *run = loop->run;
	uint8_t *data = (uint8_t *)run + run->io.data_offset;
	int is_write = run->io.direction == KVM_EXIT_IO_OUT;
	uint32_t index, item;
	/* Read once: Python may swap in a new table (see struct pyvmm_bus) at any time. */
	const struct pyvmm_bus *bus = bus_pin(&loop->pio, &loop->pio_in_use);
	const struct pyvmm_range *range = bus_find(bus, run->io.port, &index);

	if (!range)
		return unclaimed(loop, &loop->unclaimed_pio, run->io.port, data,
				 run->io.size * run->io.count, is_write);
	if (range->kind == PYVMM_HANDLER_PYTHON) {
		__atomic_fetch_add(&((struct pyvmm_range *)range)->hits, 1, __ATOMIC_RELAXED);
		return to_python(loop, bus, index, run->io.port - range->base, 0, is_write,
				 run->io.size, run->io.count, run->io.data_offset);
	}
	/* String I/O (rep ins/outs) arrives as count items back to back. */
	for (item = 0; item < run->io.count; item++) {
		int stop = serve_native(loop, range, run->io.port, data + item * run->io.size,
					run->io.size, is_write);
		/* TO_PYTHON cannot happen here: an MSI-X table lives in a memory BAR. */
		if (stop != SERVED && stop != TO_PYTHON)
			return stop;
	}
	return SERVED;
}

static int handle_mmio(struct pyvmm_vcpu_loop *loop)
{
	struct kvm_run *run = loop->run;
	uint32_t index;
	const struct pyvmm_bus *bus = bus_pin(&loop->mmio, &loop->mmio_in_use);
	const struct pyvmm_range *range = bus_find(bus, run->mmio.phys_addr, &index);
	int stop;

	if (!range)
		return unclaimed(loop, &loop->unclaimed_mmio, run->mmio.phys_addr,
				 run->mmio.data, run->mmio.len, run->mmio.is_write);

	if (range->kind != PYVMM_HANDLER_PYTHON) {
		stop = serve_native(loop, range, run->mmio.phys_addr, run->mmio.data,
				    run->mmio.len, run->mmio.is_write);
		if (stop != TO_PYTHON)
			return stop;
	} else {
		__atomic_fetch_add(&((struct pyvmm_range *)range)->hits, 1, __ATOMIC_RELAXED);
	}
	return to_python(loop, bus, index, run->mmio.phys_addr - range->base, 1,
			 run->mmio.is_write, run->mmio.len, 1,
			 (uint32_t)((uint8_t *)run->mmio.data - (uint8_t *)run));
}

static void ignore_kick(int signum)
{
	(void)signum; /* interrupting KVM_RUN with EINTR is the whole point */
}

int pyvmm_install_kick_handler(int signum)
{
	struct sigaction action = { .sa_handler = ignore_kick };

	/* No SA_RESTART: the ioctl must come back with EINTR. */
	sigemptyset(&action.sa_mask);
	return sigaction(signum, &action, NULL) < 0 ? -errno : 0;
}

int pyvmm_ioctl(int fd, unsigned long request, void *argument)
{
	int result = ioctl(fd, request, argument);

	return result < 0 ? -errno : result;
}

int pyvmm_ioctl_value(int fd, unsigned long request, unsigned long argument)
{
	int result = ioctl(fd, request, argument);

	return result < 0 ? -errno : result;
}

int pyvmm_vcpu_run(struct pyvmm_vcpu_loop *loop)
{
	struct kvm_run *run = loop->run;
	int stop;

	for (;;) {
		if (*loop->stop)
			return PYVMM_STOP_INTERRUPTED;
		if (ioctl(loop->vcpu_fd, KVM_RUN, 0) < 0) {
			/* EINTR is the stop kick (or a stray signal: just go round). */
			if (errno == EINTR || errno == EAGAIN)
				continue;
			loop->error = errno;
			return PYVMM_STOP_ERROR;
		}
		loop->exits++;
		loop->exit_reasons[run->exit_reason < 31 ? run->exit_reason : 31]++;
		switch (run->exit_reason) {
		case KVM_EXIT_IO:
			stop = handle_io(loop);
			break;
		case KVM_EXIT_MMIO:
			stop = handle_mmio(loop);
			break;
		case KVM_EXIT_HLT:
			stop = run->if_flag ? PYVMM_STOP_HALTED_IF : PYVMM_STOP_HALTED;
			break;
		case KVM_EXIT_INTR:
			stop = SERVED;
			break;
		case KVM_EXIT_SHUTDOWN:
			stop = PYVMM_STOP_SHUTDOWN;
			break;
		case KVM_EXIT_FAIL_ENTRY:
			stop = PYVMM_STOP_FAIL_ENTRY;
			break;
		case KVM_EXIT_INTERNAL_ERROR:
			stop = PYVMM_STOP_INTERNAL_ERROR;
			break;
		case KVM_EXIT_SYSTEM_EVENT:
			stop = PYVMM_STOP_SYSTEM_EVENT;
			break;
		default:
			stop = PYVMM_STOP_UNHANDLED_EXIT;
			break;
		}
		if (stop != SERVED)
			return stop;
	}
}
