/*
 * PCI configuration space for the guests that drive an assigned device
 * (docs/guest-abi.md, "PCI (with --device)"), and the failure report they
 * share. Linked only into those guests (see the Makefile).
 *
 * There are two ways to reach configuration space, and both are here:
 *  - mechanism #1, the PC's original one: write the address of a dword to
 *    port 0xCF8, then read or write its bytes at ports 0xCFC-0xCFF. Two
 *    port exits per access, 256 bytes per function.
 *  - ECAM (PCI Express "enhanced configuration access"): every function's
 *    4 KiB of configuration space is plain MMIO at a fixed address, one
 *    exit per access.
 * The guests scan and configure through mechanism #1 and use ECAM to check
 * that the VMM shows the same registers at both.
 */
#ifndef GUEST_PCI_H
#define GUEST_PCI_H

#include "runtime.h"

#define PCI_CONFIG_ADDRESS 0xCF8
#define PCI_CONFIG_DATA 0xCFC
#define PCI_ECAM_BASE 0xE0000000u

/* Configuration space header (type 0), offsets and bits. */
#define PCI_VENDOR_ID 0x00
#define PCI_DEVICE_ID 0x02
#define PCI_COMMAND 0x04
#define  PCI_COMMAND_IO 0x0001             /* decode the I/O BARs */
#define  PCI_COMMAND_MEMORY 0x0002         /* decode the memory BARs */
#define  PCI_COMMAND_MASTER 0x0004         /* may do DMA (and so send MSIs) */
#define  PCI_COMMAND_INTX_DISABLE 0x0400   /* keep INTx deasserted */
#define PCI_STATUS 0x06
#define  PCI_STATUS_CAP_LIST 0x0010        /* the capability list exists */
#define PCI_BAR0 0x10
#define PCI_CAPABILITY_LIST 0x34
#define PCI_INTERRUPT_LINE 0x3C            /* the INTx IRQ (10 or 11): 8259 and IOAPIC */
#define PCI_INTERRUPT_PIN 0x3D             /* 0: none, 1: INTA ... 4: INTD */

/* Capability IDs (the first byte of each capability). */
#define PCI_CAP_ID_MSI 0x05
#define PCI_CAP_ID_MSIX 0x11

/* One function: bus 0 slot S function 0 is the only kind pyvmm has. */
struct pci_dev {
	u8 bus, slot, fn;
};

/* Mechanism #1: off may be any offset aligned to the access size (0..0xFF). */
u8 pci_read8(const struct pci_dev *d, u8 off);
u16 pci_read16(const struct pci_dev *d, u8 off);
u32 pci_read32(const struct pci_dev *d, u8 off);
void pci_write8(const struct pci_dev *d, u8 off, u8 v);
void pci_write16(const struct pci_dev *d, u8 off, u16 v);
void pci_write32(const struct pci_dev *d, u8 off, u32 v);

/* ECAM: the same registers (and the extended ones, 0x100..0xFFF) as MMIO. */
static inline uptr pci_ecam_address(const struct pci_dev *d, u16 off)
{
	return PCI_ECAM_BASE + ((uptr)d->bus << 20) + ((uptr)d->slot << 15) +
	       ((uptr)d->fn << 12) + off;
}
static inline u32 pci_ecam_read32(const struct pci_dev *d, u16 off)
{
	return mmio_read32(pci_ecam_address(d, off));
}
static inline u16 pci_ecam_read16(const struct pci_dev *d, u16 off)
{
	return mmio_read16(pci_ecam_address(d, off));
}
static inline void pci_ecam_write32(const struct pci_dev *d, u16 off, u32 v)
{
	mmio_write32(pci_ecam_address(d, off), v);
}

/* Scan bus 0, slots 0-31, function 0, through mechanism #1. Returns 0 and
 * fills *d when vendor:device is there, -1 when it is not. */
int pci_find(u16 vendor, u16 device, struct pci_dev *d);
/* The failure code every PCI guest gives "device not found". */
#define PCI_NOT_FOUND 1
/* pci_find, or print the FAIL line and guest_exit(PCI_NOT_FOUND). */
void pci_require(u16 vendor, u16 device, struct pci_dev *d);
/* The first of n (vendor, device) pairs that pci_find finds, by its index in
 * ids; if none, the FAIL line and guest_exit(PCI_NOT_FOUND). */
unsigned pci_require_any(const u16 (*ids)[2], unsigned n, struct pci_dev *d);

/* What a base address register says. pyvmm has already placed every BAR
 * (as firmware would), so the guest only reads them. */
struct pci_bar {
	u64 address;  /* port number for I/O, guest-physical address for memory */
	u8 io;        /* 1: I/O space (ports), 0: memory space */
	u8 mem64;     /* a 64-bit memory BAR: it also takes the next BAR slot */
};
struct pci_bar pci_read_bar(const struct pci_dev *d, unsigned index);
/* The address of a memory BAR below 4 GiB (where the identity map reaches), or print the
 * FAIL line and guest_exit(code). */
uptr pci_require_memory_bar(const struct pci_dev *d, unsigned index, u8 code);

/* Offset of the first capability with this ID, or 0 if there is none. */
u8 pci_find_cap(const struct pci_dev *d, u8 id);

/* Read-modify-write of the command register; returns the new value. */
u16 pci_command(const struct pci_dev *d, u16 set, u16 clear);

/* "dev 00:01.0" style, for the progress lines. */
void pci_print_location(const struct pci_dev *d);

/*
 * Device DMA reads and writes plain RAM behind the compiler's back. The
 * MMIO helpers are volatile accesses, which the compiler keeps in order
 * with each other but not with ordinary loads and stores: put a barrier
 * between filling a buffer and the register write that starts a transfer,
 * and between seeing a transfer end and reading what it wrote. (The CPU
 * needs nothing more: x86 DMA is cache-coherent, and stores reach memory
 * in program order.)
 */
static inline void barrier(void)
{
	__asm__ volatile("" ::: "memory");
}

/* Print "FAIL: <what> (got 0x<got>, want 0x<want>)" and end the run with
 * guest_exit(code), status (code << 1) | 1. */
NORETURN void fail(u8 code, const char *what, u64 got, u64 want);

/* fail() unless got == want. */
static inline void expect(u8 code, const char *what, u64 got, u64 want)
{
	if (got != want)
		fail(code, what, got, want);
}

#endif
