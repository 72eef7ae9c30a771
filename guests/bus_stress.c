/*
 * Bus stress: every vCPU hammers ranges that the host removes and re-adds (as a guest moving
 * BARs makes pyvmm do) until the host says stop, and checks that every access was served by
 * the range it addressed, at the offset it addressed.
 *
 * The contract (tests/test_bus_stress.py sets it up):
 * - control, MMIO 0xD0000000 (host memory): dword 0 becomes nonzero when the guest must stop;
 *   vCPU N writes its counts at 0x100 + 32 * N: MMIO served, MMIO all ones, port served, port
 *   all ones (u64 each).
 * - MMIO range r (0..3) at 0xD0010000 + r * 0x1000, 0x100 bytes: dword at offset o reads
 *   0xA0000000 | r << 16 | o, or all ones while the host has it removed.
 * - port range r (0..3) at 0x700 + r * 0x10, 0x10 ports: inl at offset o (0, 4, 8, 12) reads
 *   0xB0000000 | r << 16 | o, or all ones.
 * Any other value: prints it and guest_exit(1) (MMIO) or guest_exit(2) (port).
 * Once told to stop, every range must be back: a last read of each must be served (not all
 * ones), or guest_exit(3) (MMIO) or guest_exit(4) (port): a vCPU left on a stale table.
 */
#include "runtime.h"

#define CONTROL 0xD0000000ul
#define MMIO_RANGES 0xD0010000ul
#define PORT_RANGES 0x700
#define RANGES 4

static spinlock_t print_lock;

static void wrong(unsigned cpu, const char *what, unsigned long address, u32 value, u32 want,
		  int code)
{
	spin_lock(&print_lock);
	printf("FAIL: cpu %u %s %lx read %x (want %x)\n", cpu, what, address, value, want);
	spin_unlock(&print_lock);
	guest_exit(code);
}

int guest_main(unsigned cpu, unsigned ncpus)
{
	u64 mmio_served = 0, mmio_ones = 0, port_served = 0, port_ones = 0;
	unsigned long i;

	(void)ncpus;
	for (i = 0; !(i % 16 == 0 && mmio_read32(CONTROL)); i++) {
		unsigned range = (i + cpu) % RANGES;
		unsigned offset = (i * 4 + cpu * 0x40) % 0x100;
		unsigned long address = MMIO_RANGES + range * 0x1000 + offset;
		u32 want = 0xA0000000u | range << 16 | offset;
		u32 value = mmio_read32(address);

		if (value == 0xFFFFFFFFu)
			mmio_ones++;
		else if (value == want)
			mmio_served++;
		else
			wrong(cpu, "mmio", address, value, want, 1);
		if (i % 4 == 0) {
			u16 port = PORT_RANGES + range * 0x10 + (i / 4 % 4) * 4;

			want = 0xB0000000u | range << 16 | (port & 0xF);
			value = inl(port);
			if (value == 0xFFFFFFFFu)
				port_ones++;
			else if (value == want)
				port_served++;
			else
				wrong(cpu, "port", port, value, want, 2);
		}
	}
	for (i = 0; i < RANGES; i++) {
		unsigned long address = MMIO_RANGES + i * 0x1000;
		u16 port = PORT_RANGES + i * 0x10;
		u32 value = mmio_read32(address);

		if (value != (0xA0000000u | i << 16))
			wrong(cpu, "last mmio", address, value, 0xA0000000u | i << 16, 3);
		value = inl(port);
		if (value != (0xB0000000u | i << 16))
			wrong(cpu, "last port", port, value, 0xB0000000u | i << 16, 4);
	}
	mmio_write64(CONTROL + 0x100 + 32 * cpu, mmio_served);
	mmio_write64(CONTROL + 0x108 + 32 * cpu, mmio_ones);
	mmio_write64(CONTROL + 0x110 + 32 * cpu, port_served);
	mmio_write64(CONTROL + 0x118 + 32 * cpu, port_ones);
	guest_halt();
}
