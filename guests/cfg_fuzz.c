/*
 * A hostile driver: writes seeded random values of random sizes to every
 * configuration-space register of the assigned device (BARs, command, the
 * capability list, MSI/MSI-X control, address and data, the ROM BAR, power
 * management, PCI Express), through both access mechanisms, and to its
 * extended space, with reads of whatever its BARs decode in between; then it
 * ends with a known status. The point is the VMM: whatever a guest writes,
 * the guest may misbehave but the VMM may not die, leak, or leave the device
 * unusable for the next run.
 *
 * The device is the first function on bus 0 after the host bridge. The seed
 * is the 8 bytes (little-endian) after the marker "cfg_fuzz seed:" in the
 * image's data; a test writes its own there (the built image has seed 1).
 *
 * Nothing here writes a BAR's registers: DMA the device could be made to do
 * would land in this guest's own RAM. Reads are kept below 4 GiB, where the
 * identity map reaches. Interrupts stay off, so a vector the guest routed
 * anywhere cannot hurt it.
 *
 * Prints "cfg_fuzz: seed S: W config writes (E via ECAM, X extended), R BAR
 * reads" and ends with guest_exit(FUZZ_DONE), status 85.
 */
#include "pci.h"

#define FUZZ_DONE 42
#define NO_DEVICE 1
#define PASSES 8               /* over 0x00-0xFF, per run */
#define EXTENDED_WRITES 32     /* random dwords in 0x100-0xFFF, per pass */
#define IDENTITY_LIMIT 0x100000000ull

/* volatile: the compiler must read what the test wrote, not fold the default. */
static volatile struct {
	char marker[16];
	u64 value;
} fuzz_seed __attribute__((used, aligned(8))) = { "cfg_fuzz seed:", 1 };

static u64 state;
static unsigned writes, ecam_writes, extended_writes, bar_reads;

/* xorshift64*: small, and every seed gives its own sequence. */
static u64 next_random(void)
{
	state ^= state >> 12;
	state ^= state << 25;
	state ^= state >> 27;
	return state * 0x2545F4914F6CDD1Dull;
}

/*
 * A quarter of the values come from places a VMM must refuse or handle:
 * RAM, the ECAM window, the IOAPIC, the local APIC, the firmware ROM, COM1's
 * and the debug exit's ports, all ones (BAR sizing), MSI and MSI-X enables
 * with too many vectors, D3hot, every command bit.
 */
static const u32 interesting[] = {
	0x00000000, 0xFFFFFFFF, 0x00100000, 0x00000008, 0xC0000000, 0xC0100000,
	0xD0000000, 0xE0000000, 0xFEC00000, 0xFEE00000, 0xFFFF0000, 0x000003F8,
	0x000000F1, 0x00000CF9, 0xFEE0100C, 0x00000071, 0x0000C000, 0x00008000,
	0x00000003, 0x00000007, 0x0000FFFF, 0x80000000,
};

static u32 random_value(void)
{
	u64 r = next_random();

	if ((r & 3) == 0)
		return interesting[(r >> 8) % (sizeof(interesting) / sizeof(interesting[0]))];
	return (u32)(r >> 32);
}

static void config_write(const struct pci_dev *d, u16 off, unsigned size, u32 value, int ecam)
{
	uptr address = pci_ecam_address(d, off);

	writes++;
	if (ecam || off >= 0x100) {
		ecam_writes++;
		if (size == 1)
			mmio_write8(address, (u8)value);
		else if (size == 2)
			mmio_write16(address, (u16)value);
		else
			mmio_write32(address, value);
		return;
	}
	if (size == 1)
		pci_write8(d, (u8)off, (u8)value);
	else if (size == 2)
		pci_write16(d, (u8)off, (u16)value);
	else
		pci_write32(d, (u8)off, value);
}

/* Read a dword inside one BAR, wherever it decodes now, as a driver reads a register. */
static void touch_a_bar(const struct pci_dev *d)
{
	u64 r = next_random();
	unsigned index = (unsigned)(r % 6);
	u16 command = pci_ecam_read16(d, PCI_COMMAND);
	u32 low = pci_ecam_read32(d, (u16)(PCI_BAR0 + 4 * index));
	u32 offset = (u32)(r >> 16) & 0xFFC;  /* every BAR pyvmm places is at least a page */

	if (low & 1) {
		u32 port = (low & ~3u) + (offset & 0xC);

		if ((command & PCI_COMMAND_IO) && port >= 0x1000 && port <= 0xFFFC) {
			(void)inl((u16)port);
			bar_reads++;
		}
		return;
	}
	u64 address = low & ~0xFu;

	if (((low >> 1) & 3) == 2 && index < 5)
		address |= (u64)pci_ecam_read32(d, (u16)(PCI_BAR0 + 4 * index + 4)) << 32;
	if ((command & PCI_COMMAND_MEMORY) && address && address + 0x1000 <= IDENTITY_LIMIT) {
		(void)mmio_read32((uptr)(address + offset));
		bar_reads++;
	}
}

static void fuzz_pass(const struct pci_dev *d)
{
	for (unsigned off = 0; off < 0x100;) {
		u64 r = next_random();
		unsigned size = 1u << (r % 3);

		while (off % size)
			size >>= 1;
		config_write(d, (u16)off, size, random_value(), (int)(r >> 8) & 1);
		if (((r >> 9) & 3) == 0)
			touch_a_bar(d);
		off += size;
	}
	for (unsigned i = 0; i < EXTENDED_WRITES; i++) {
		u16 off = (u16)(0x100 + (next_random() % 0xF00 & ~3u));

		config_write(d, off, 4, random_value(), 1);
		extended_writes++;
	}
}

int guest_main(unsigned cpu, unsigned ncpus)
{
	struct pci_dev dev = { 0, 0, 0 };
	int found = 0;

	(void)ncpus;
	if (cpu != 0)
		guest_halt();
	for (u8 slot = 1; slot < 32 && !found; slot++) {
		struct pci_dev probe = { 0, slot, 0 };

		if ((pci_read32(&probe, PCI_VENDOR_ID) & 0xFFFF) != 0xFFFF) {
			dev = probe;
			found = 1;
		}
	}
	if (!found) {
		printf("FAIL: find a device on bus 0 (got nothing, want one)\n");
		return NO_DEVICE;
	}
	u64 seed = fuzz_seed.value;

	state = seed ? seed : 1;  /* xorshift never leaves 0 */
	printf("cfg_fuzz: dev ");
	pci_print_location(&dev);
	printf(" %08x, seed %llu\n", pci_read32(&dev, PCI_VENDOR_ID), seed);
	for (unsigned pass = 0; pass < PASSES; pass++)
		fuzz_pass(&dev);
	printf("cfg_fuzz: seed %llu: %u config writes (%u via ECAM, %u extended), %u BAR reads\n",
	       seed, writes, ecam_writes, extended_writes, bar_reads);
	return FUZZ_DONE;
}
