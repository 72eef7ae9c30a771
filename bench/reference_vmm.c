/*
 * A minimal reference VMM for the exit-cost benchmark (bench/exits.py builds it with gcc
 * at run time). It is the floor pyvmm is compared against: one vCPU, one memory slot, no
 * devices, and a KVM_RUN loop whose switch answers the guest's two port reads and ignores
 * everything else.
 *
 *   reference_vmm IMAGE.bin N MODE [fd]
 *
 * loads IMAGE.bin (guests/exits.S as a flat binary) at 0x100000, enters it there in 32-bit
 * protected mode with flat segments (no GDT in memory: KVM takes the hidden segment state
 * from KVM_SET_SREGS), answers inl(0x518) with N and inl(0x51C) with MODE, ignores the
 * outl(0x510)s and the MMIO writes, and stops at the power-off write to port 0x604.
 *
 * With "fd", it serves ports 0x510-0x51F and the MMIO page at 0xD0002000 the way pyvmm's
 * native loop serves a forwarded range: pread/pwrite on a memfd (N and MODE stored at
 * offsets 8 and 12 of the port memfd). This separates the cost of those syscalls from the
 * cost of pyvmm's loop when comparing with pyvmm's native (forward_pio/forward_mmio) path.
 *
 * It prints one line:
 *
 *   exits=E ns=T
 *
 * where T is CLOCK_MONOTONIC from just before the first KVM_RUN to just after the last exit
 * is handled, the span pyvmm's RunResult.elapsed covers. Exit status 0 on success; on any
 * failure a message on stderr and exit status 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE (4u << 20)  /* 4 MiB at guest-physical 0: image at 1 MiB plus its .bss */
#define LOAD_ADDR 0x100000u
#define PORT_PIO 0x510
#define PORT_PIO_LEN 16
#define MMIO_BASE 0xD0002000ull
#define MMIO_LEN 0x1000ull
#define PORT_N 0x518
#define PORT_MODE 0x51C
#define PORT_PM1A_CNT 0x604
#define SLP_EN 0x2000u

static void die(const char *what)
{
	fprintf(stderr, "reference_vmm: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void flat_segment(struct kvm_segment *seg, uint16_t selector, uint8_t type)
{
	memset(seg, 0, sizeof(*seg));
	seg->base = 0;
	seg->limit = 0xffffffff;
	seg->selector = selector;
	seg->type = type; /* 11: code, execute/read, accessed; 3: data, read/write, accessed */
	seg->present = 1;
	seg->dpl = 0;
	seg->db = 1;      /* 32-bit */
	seg->s = 1;       /* code/data, not system */
	seg->l = 0;
	seg->g = 1;       /* 4 KiB granularity: limit covers 4 GiB */
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv)
{
	if (argc < 4 || argc > 5 || (argc == 5 && strcmp(argv[4], "fd") != 0)) {
		fprintf(stderr, "usage: %s IMAGE.bin N MODE [fd]\n", argv[0]);
		return 2;
	}
	uint32_t n = (uint32_t)strtoul(argv[2], NULL, 0);
	uint32_t mode = (uint32_t)strtoul(argv[3], NULL, 0);
	int pio_fd = -1, mmio_fd = -1;

	if (argc == 5) {
		uint32_t registers[4] = { 0, 0, n, mode };

		pio_fd = memfd_create("reference-pio", MFD_CLOEXEC);
		mmio_fd = memfd_create("reference-mmio", MFD_CLOEXEC);
		if (pio_fd < 0 || mmio_fd < 0 || ftruncate(mmio_fd, MMIO_LEN) < 0 ||
		    pwrite(pio_fd, registers, sizeof(registers), 0) != sizeof(registers))
			die("memfd");
	}

	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("open /dev/kvm");
	if (ioctl(kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION) {
		fprintf(stderr, "reference_vmm: unexpected KVM API version\n");
		return 1;
	}
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		die("KVM_CREATE_VM");
	/* Harmless where not needed; VMX wants it before the first KVM_RUN (pyvmm sets it too). */
	ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000ul);

	uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap guest memory");
	struct kvm_userspace_memory_region region = {
		.slot = 0,
		.guest_phys_addr = 0,
		.memory_size = MEM_SIZE,
		.userspace_addr = (uint64_t)(uintptr_t)mem,
	};
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		die("KVM_SET_USER_MEMORY_REGION");

	int image = open(argv[1], O_RDONLY | O_CLOEXEC);
	if (image < 0)
		die(argv[1]);
	ssize_t got = read(image, mem + LOAD_ADDR, MEM_SIZE - LOAD_ADDR);
	if (got <= 0)
		die("read image");
	close(image);

	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		die("KVM_CREATE_VCPU");
	int mmap_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (mmap_size < (int)sizeof(struct kvm_run))
		die("KVM_GET_VCPU_MMAP_SIZE");
	struct kvm_run *run = mmap(NULL, (size_t)mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED,
				   vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");

	struct kvm_sregs sregs;
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
		die("KVM_GET_SREGS");
	flat_segment(&sregs.cs, 0x08, 11);
	flat_segment(&sregs.ds, 0x10, 3);
	sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
	sregs.cr0 |= 1; /* PE; paging stays off */
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
		die("KVM_SET_SREGS");
	struct kvm_regs regs = { .rip = LOAD_ADDR, .rflags = 0x2 };
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
		die("KVM_SET_REGS");

	uint64_t exits = 0;
	uint64_t start = now_ns();
	for (;;) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			die("KVM_RUN");
		}
		exits++;
		switch (run->exit_reason) {
		case KVM_EXIT_IO: {
			uint8_t *data = (uint8_t *)run + run->io.data_offset;
			uint16_t port = run->io.port;

			if (pio_fd >= 0 && port >= PORT_PIO && port < PORT_PIO + PORT_PIO_LEN) {
				ssize_t done = run->io.direction == KVM_EXIT_IO_IN ?
					pread(pio_fd, data, run->io.size, port - PORT_PIO) :
					pwrite(pio_fd, data, run->io.size, port - PORT_PIO);

				if (done != run->io.size)
					die("port pread/pwrite");
			} else if (run->io.direction == KVM_EXIT_IO_IN) {
				uint32_t value = 0;

				if (run->io.port == PORT_N)
					value = n;
				else if (run->io.port == PORT_MODE)
					value = mode;
				memcpy(data, &value, run->io.size < 4 ? run->io.size : 4);
			} else if (run->io.port == PORT_PM1A_CNT) {
				uint16_t value = 0;

				memcpy(&value, data, run->io.size < 2 ? run->io.size : 2);
				if (value & SLP_EN)
					goto done;
			}
			/* Without fd, outl(0x510, i) is ignored. */
			break;
		}
		case KVM_EXIT_MMIO:
			if (mmio_fd >= 0 && run->mmio.phys_addr - MMIO_BASE < MMIO_LEN) {
				off_t at = (off_t)(run->mmio.phys_addr - MMIO_BASE);
				ssize_t done = run->mmio.is_write ?
					pwrite(mmio_fd, run->mmio.data, run->mmio.len, at) :
					pread(mmio_fd, run->mmio.data, run->mmio.len, at);

				if (done != (ssize_t)run->mmio.len)
					die("MMIO pread/pwrite");
			} else if (!run->mmio.is_write)
				memset(run->mmio.data, 0, run->mmio.len);
			break; /* without fd, writes are ignored */
		case KVM_EXIT_HLT:
			fprintf(stderr, "reference_vmm: guest halted before powering off\n");
			return 1;
		default:
			fprintf(stderr, "reference_vmm: unexpected exit reason %u after %llu exits\n",
				run->exit_reason, (unsigned long long)exits);
			return 1;
		}
	}
done:;
	uint64_t elapsed = now_ns() - start;

	printf("exits=%llu ns=%llu\n", (unsigned long long)exits, (unsigned long long)elapsed);
	return 0;
}
