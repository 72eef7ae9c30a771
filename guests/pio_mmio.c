/*
 * Port-I/O and MMIO exerciser. The host tests give the test machine
 * devices that store what is written and return it on read, then compare
 * this guest's output line by line, so the order and width of every access
 * below is part of the contract: one instruction, one exit, one width.
 */
#include "runtime.h"

#define MMIO_RW 0xD0000000UL     /* read/write test window */
#define MMIO_FD 0xD0001000UL     /* second window, see tests */

static void print_bytes_hex(const u8 *p, unsigned n)
{
	while (n--)
		print_hex(*p++, 2);
}

int guest_main(unsigned cpu, unsigned ncpus)
{
	(void)ncpus;
	if (cpu != 0)
		guest_halt();

	/* Port I/O, one access of each width. */
	outb(0x500, 0x11);
	outw(0x502, 0x2233);
	outl(0x504, 0x44556677);
	u8 b = inb(0x500);
	u16 w = inw(0x502);
	u32 l = inl(0x504);
	printf("pio %02x %04x %08x\n", b, w, l);

	/* String I/O: "rep outsb"/"rep insb" move all 5 bytes in one exit each. */
	static const char out[5] = { 'p', 'y', 'v', 'm', 'm' };
	u8 in[5] = { 0 };
	outsb(0x508, out, sizeof(out));
	insb(0x508, in, sizeof(in));
	print("pio-str ");
	print_bytes_hex(in, sizeof(in));
	print("\n");

	/* MMIO, one access of each width. */
	mmio_write8(MMIO_RW + 0, 0xA1);
	mmio_write16(MMIO_RW + 2, 0xB2C3);
	mmio_write32(MMIO_RW + 4, 0xD4E5F607);
	mmio_write64(MMIO_RW + 8, 0x0123456789ABCDEFULL);
	u8 mb = mmio_read8(MMIO_RW + 0);
	u16 mw = mmio_read16(MMIO_RW + 2);
	u32 ml = mmio_read32(MMIO_RW + 4);
	u64 mq = mmio_read64(MMIO_RW + 8);
	printf("mmio %02x %04x %08x %016llx\n", mb, mw, ml, mq);

	mmio_write32(MMIO_FD + 0, 0xCAFEF00D);
	u32 fd0 = mmio_read32(MMIO_FD + 0);
	u32 fd4 = mmio_read32(MMIO_FD + 4);
	printf("fd %08x %08x\n", fd0, fd4);

	print("done\n");
	return 0;
}
