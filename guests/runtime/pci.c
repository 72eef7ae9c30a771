/*
 * PCI configuration access and the helpers built on it (see pci.h).
 */
#include "pci.h"

/*
 * Mechanism #1: bit 31 enables the cycle, then bus, device and function,
 * and the register number in bits 7:2 (a dword; the low two bits must be 0).
 * The byte or word within that dword is chosen by which data port is used:
 * 0xCFC + (off & 3).
 */
static void pci_select(const struct pci_dev *d, u8 off)
{
	outl(PCI_CONFIG_ADDRESS, 0x80000000u | ((u32)d->bus << 16) |
		 ((u32)d->slot << 11) | ((u32)d->fn << 8) | (off & 0xFC));
}

u8 pci_read8(const struct pci_dev *d, u8 off)
{
	pci_select(d, off);
	return inb(PCI_CONFIG_DATA + (off & 3));
}

u16 pci_read16(const struct pci_dev *d, u8 off)
{
	pci_select(d, off);
	return inw(PCI_CONFIG_DATA + (off & 2));
}

u32 pci_read32(const struct pci_dev *d, u8 off)
{
	pci_select(d, off);
	return inl(PCI_CONFIG_DATA);
}

void pci_write8(const struct pci_dev *d, u8 off, u8 v)
{
	pci_select(d, off);
	outb(PCI_CONFIG_DATA + (off & 3), v);
}

void pci_write16(const struct pci_dev *d, u8 off, u16 v)
{
	pci_select(d, off);
	outw(PCI_CONFIG_DATA + (off & 2), v);
}

void pci_write32(const struct pci_dev *d, u8 off, u32 v)
{
	pci_select(d, off);
	outl(PCI_CONFIG_DATA, v);
}

int pci_find(u16 vendor, u16 device, struct pci_dev *d)
{
	for (u8 slot = 0; slot < 32; slot++) {
		struct pci_dev probe = { 0, slot, 0 };
		/* One dword holds both IDs. An empty slot reads as all ones
		 * (vendor 0xFFFF is reserved for exactly that). */
		u32 id = pci_read32(&probe, PCI_VENDOR_ID);

		if ((id & 0xFFFF) == vendor && (id >> 16) == device) {
			*d = probe;
			return 0;
		}
	}
	return -1;
}

void pci_require(u16 vendor, u16 device, struct pci_dev *d)
{
	if (pci_find(vendor, device, d) == 0)
		return;
	printf("FAIL: find %04x:%04x on bus 0 (got nothing, want a device)\n", vendor, device);
	guest_exit(PCI_NOT_FOUND);
}

unsigned pci_require_any(const u16 (*ids)[2], unsigned n, struct pci_dev *d)
{
	for (unsigned i = 0; i < n; i++)
		if (pci_find(ids[i][0], ids[i][1], d) == 0)
			return i;
	print("FAIL: find ");
	for (unsigned i = 0; i < n; i++)
		printf("%s%04x:%04x", i ? " or " : "", ids[i][0], ids[i][1]);
	print(" on bus 0 (got nothing, want a device)\n");
	guest_exit(PCI_NOT_FOUND);
}

uptr pci_require_memory_bar(const struct pci_dev *d, unsigned index, u8 code)
{
	struct pci_bar bar = pci_read_bar(d, index);

	if (bar.io || bar.address == 0 || bar.address >= 0x100000000ull) {
		printf("FAIL: bar%u (got 0x%llx%s, want memory below 4 GiB)\n", index, bar.address,
		       bar.io ? " in I/O space" : "");
		guest_exit(code);
	}
	return (uptr)bar.address;
}

struct pci_bar pci_read_bar(const struct pci_dev *d, unsigned index)
{
	u8 off = (u8)(PCI_BAR0 + 4 * index);
	u32 low = pci_read32(d, off);
	struct pci_bar bar = { 0, 0, 0 };

	if (low & 1) {
		/* I/O BAR: bit 0 set, bit 1 reserved, the rest is the port. */
		bar.io = 1;
		bar.address = low & ~3u;
		return bar;
	}
	/* Memory BAR: bits 2:1 are the type (0: 32-bit, 2: 64-bit), bit 3
	 * prefetchable, and the address starts at bit 4. */
	bar.address = low & ~0xFu;
	if (((low >> 1) & 3) == 2) {
		bar.mem64 = 1;
		bar.address |= (u64)pci_read32(d, (u8)(off + 4)) << 32;
	}
	return bar;
}

u8 pci_find_cap(const struct pci_dev *d, u8 id)
{
	if (!(pci_read16(d, PCI_STATUS) & PCI_STATUS_CAP_LIST))
		return 0;
	/* Each capability starts with its ID and the offset of the next one
	 * (0 ends the list); the low two bits of a pointer are reserved. The
	 * list lives in 0x40..0xFF, so at most 48 entries: a bound on the walk
	 * that a broken (circular) list cannot defeat. */
	u8 pos = pci_read8(d, PCI_CAPABILITY_LIST) & 0xFC;

	for (int n = 0; pos && n < 48; n++) {
		if (pci_read8(d, pos) == id)
			return pos;
		pos = pci_read8(d, (u8)(pos + 1)) & 0xFC;
	}
	return 0;
}

u16 pci_command(const struct pci_dev *d, u16 set, u16 clear)
{
	u16 cmd = (u16)((pci_read16(d, PCI_COMMAND) & ~clear) | set);

	pci_write16(d, PCI_COMMAND, cmd);
	return pci_read16(d, PCI_COMMAND);
}

void pci_print_location(const struct pci_dev *d)
{
	printf("%02x:%02x.%u", d->bus, d->slot, d->fn);
}

NORETURN void fail(u8 code, const char *what, u64 got, u64 want)
{
	printf("FAIL: %s (got 0x%llx, want 0x%llx)\n", what, got, want);
	guest_exit(code);
}
