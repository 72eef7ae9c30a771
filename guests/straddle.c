/*
 * Accesses that straddle the end of a range (tests/test_bus_stress.py forwards the ranges to
 * a memfd): the part inside the range reaches the fd, the part past its end reads as ones
 * and is dropped on write.
 * - MMIO 0xD0001000, 8 bytes: a qword read at 0xD0001004, then a qword write of
 *   0x1122334455667788 there.
 * - ports 0x510-0x511: a dword inl at 0x511, then outl 0xA1B2C3D4 at 0x511.
 * Prints both reads and powers off; the test checks the memfd.
 */
#include "runtime.h"

int guest_main(unsigned cpu, unsigned ncpus)
{
	u64 mmio;
	u32 port;

	(void)cpu;
	(void)ncpus;
	mmio = mmio_read64(0xD0001004ul);
	mmio_write64(0xD0001004ul, 0x1122334455667788ull);
	port = inl(0x511);
	outl(0x511, 0xA1B2C3D4u);
	printf("mmio %lx port %x\n", (unsigned long)mmio, port);
	return 0;
}
