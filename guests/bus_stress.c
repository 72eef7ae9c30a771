/*
 * Bus stress: every vCPU hammers ranges that the host removes and re-adds (as a guest moving
 * BARs makes pyvmm do) until the host says stop, and checks that every access was served by
 * the range it addressed, at the offset it addressed.
 *
 * The contract (tests/test_bus_stress.py sets it up):
 * - control, MMIO 0xD0000000 (host memory): dword 0 becomes nonzero when the guest must stop;
 *   vCPU N writes its counts at 0x100 + 64 * N: MMIO served, MMIO all ones, port served, port
 *   all ones, BAR moves (u64 each).
 * - MMIO range r (0..3) at 0xD0010000 + r * 0x1000, 0x100 bytes: dword at offset o reads
 *   0xA0000000 | r << 16 | o, or all ones while the host has it removed.
 * - port range r (0..3) at 0x700 + r * 0x10, 0x10 ports: inl at offset o (0, 4, 8, 12) reads
 *   0xB0000000 | r << 16 | o, or all ones.
 * - PCI function 00:(N + 1).0 belongs to vCPU N, which moves its BAR0 (4 KiB, memory) by ECAM
 *   writes between 0xD0100000 + N * 0x2000 and 0x1000 above, every 32 accesses: right after
 *   a move the dword at offset o of the new place reads 0xC0000000 | N << 16 | o and the old
 *   place reads all ones, or guest_exit(5).
 * Any other value: prints it and guest_exit(1) (MMIO) or guest_exit(2) (port).
 * Once told to stop, every range must be back: a last read of each must be served (not all
 * ones), or guest_exit(3) (MMIO) or guest_exit(4) (port): a vCPU left on a stale table.
 */
#include "runtime.h"

#define CONTROL 0xD0000000ul
#define MMIO_RANGES 0xD0010000ul
#define PORT_RANGES 0x700
#define RANGES 4
#define ECAM 0xE0000000ul
#define BAR0 0x10
#define BAR_PLACES 0xD0100000ul

static spinlock_t print_lock;
static volatile u32 finished;

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
	u64 mmio_served = 0, mmio_ones = 0, port_served = 0, port_ones = 0, bar_moves = 0;
	unsigned long bar_register = ECAM + ((unsigned long)(cpu + 1) << 15) + BAR0;
	unsigned long bar = BAR_PLACES + cpu * 0x2000;
	unsigned long i;

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
		if (i % 32 == 31) {
			unsigned long old = bar;
			unsigned sample = (i / 32 * 4) % 0x1000;

			bar = bar == BAR_PLACES + cpu * 0x2000 ? bar + 0x1000 : bar - 0x1000;
			mmio_write32(bar_register, (u32)bar);
			bar_moves++;
			want = 0xC0000000u | cpu << 16 | sample;
			value = mmio_read32(bar + sample);
			if (value != want)
				wrong(cpu, "moved bar", bar + sample, value, want, 5);
			value = mmio_read32(old + sample);
			if (value != 0xFFFFFFFFu)
				wrong(cpu, "old bar", old + sample, value, 0xFFFFFFFFu, 5);
		}
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
	mmio_write64(CONTROL + 0x100 + 64 * cpu, mmio_served);
	mmio_write64(CONTROL + 0x108 + 64 * cpu, mmio_ones);
	mmio_write64(CONTROL + 0x110 + 64 * cpu, port_served);
	mmio_write64(CONTROL + 0x118 + 64 * cpu, port_ones);
	mmio_write64(CONTROL + 0x120 + 64 * cpu, bar_moves);
	/* The last vCPU powers off: with PCI there is an in-kernel irqchip, so halting ends no run. */
	if (__atomic_add_fetch(&finished, 1, __ATOMIC_SEQ_CST) == ncpus)
		return 0;
	guest_halt();
}
