/*
 * Finding and reading what PC firmware leaves in memory for an OS: the ACPI
 * tables and the MP table (docs/guest-abi.md, "Firmware tables and CMOS").
 * Built for both word sizes: the 64-bit platform guest and the 32-bit
 * multiboot kernels find the CPUs, the IOAPIC and the interrupt overrides
 * the same way.
 *
 * Everything here is looked up the way an OS does it (scan the BIOS area
 * for a signature, check the checksum, follow the pointers), not at the
 * addresses pyvmm happens to use, so the same code works under QEMU.
 * Nothing prints or fails here: each function returns 0 (NULL) for "not
 * found / does not check out" and the guest decides what that means.
 */
#ifndef GUEST_TABLES_H
#define GUEST_TABLES_H

#include "runtime.h"

/* Where a PC keeps them: the BIOS area, searched on 16-byte boundaries. */
#define BIOS_AREA_START 0xE0000u
#define BIOS_AREA_END 0x100000u

/* The most CPUs a table parse records one by one (the runtime's stacks
 * allow 64 vCPUs); more are still counted. */
#define TABLES_MAX_CPUS 64

/*
 * A pointer to guest-physical memory: identity-mapped in the 64-bit guests,
 * paging off in the 32-bit ones, so only addresses below 4 GiB make sense
 * there. The empty asm hides the constant from gcc, which would otherwise
 * warn that a fixed address is outside every object it knows of.
 */
static inline const u8 *phys(u64 address)
{
	const u8 *p;
	uptr a = (uptr)address;

	__asm__("" : "=r"(p) : "0"(a));
	return p;
}

/* The 8-bit sum of n bytes: 0 for a table whose checksum holds. */
u8 checksum8(const void *p, u32 n);

/* ---- ACPI ---- */

/* The RSDP ("RSD PTR ", ACPI 1.0 checksum over its first 20 bytes) in
 * 0xE0000-0xFFFFF, or 0. */
const u8 *acpi_find_rsdp(void);

/* The system description table at address if it has signature sig (4
 * characters) and its checksum holds, else 0. */
const u8 *acpi_table_at(u64 address, const char *sig);

/* The root table the RSDP names: the XSDT (revision 2 and later, with an
 * XSDT address) or else the RSDT, checked; 0 if it does not check out.
 * Its entries are 8 bytes (XSDT) or 4 (RSDT): acpi_root_entry reads both. */
const u8 *acpi_root(const u8 *rsdp);
u32 acpi_root_entries(const u8 *root);
u64 acpi_root_entry(const u8 *root, u32 i);

/* The first table with signature sig listed by the root table, checked, or 0. */
const u8 *acpi_find_table(const u8 *root, const char *sig);

/* What the MADT ("APIC") says, in the units an OS uses. */
struct madt_info {
	u32 lapic_address;
	u32 flags;                /* bit 0: PCAT_COMPAT, the 8259s are there */
	unsigned cpus;            /* enabled processor local APICs */
	u8 apic_ids[TABLES_MAX_CPUS];  /* theirs, in table order */
	unsigned ioapics;
	u8 ioapic_id;             /* the first IOAPIC's */
	u32 ioapic_address, ioapic_gsi_base;
	unsigned overrides;       /* interrupt source overrides */
	u32 isa_gsi[16];          /* ISA IRQ i arrives at GSI isa_gsi[i] */
	u16 isa_flags[16];        /* and its MPS INTI flags (0: conforms to ISA) */
	u8 nmi_lint;              /* local APIC NMI input (LINT#), 0xFF if none */
};

/* Parse a checked MADT: ISA IRQs without an override keep GSI = IRQ. */
void madt_parse(const u8 *madt, struct madt_info *m);

/* ---- the MP table (Intel MultiProcessor Specification 1.4) ---- */

/* The floating pointer ("_MP_", checksum over its length) in
 * 0xF0000-0xFFFFF, or 0. */
const u8 *mp_find_floating(void);

struct mp_info {
	u32 lapic_address;
	unsigned cpus;            /* enabled processor entries */
	u8 apic_ids[TABLES_MAX_CPUS];
	unsigned bsp;             /* the bootstrap processor's APIC ID, 0xFF if none */
	u8 ioapic_id;
	u32 ioapic_address;
	unsigned io_interrupts, local_interrupts;
};

enum mp_error {
	MP_OK = 0,
	MP_NO_TABLE,              /* the floating pointer names no configuration table */
	MP_BAD_SIGNATURE,         /* no "PCMP" there */
	MP_BAD_CHECKSUM,
};

/* Check and parse the configuration table the floating pointer names. */
enum mp_error mp_parse(const u8 *floating, struct mp_info *info);

/* The IOAPIC input the MP table wires INTx pin (1 = INTA) of PCI bus 0's slot to, as an OS
 * reads it: the I/O interrupt entry whose source bus is the "PCI" bus entry and whose source
 * IRQ is slot << 2 | (pin - 1). Fills *ioapic_pin and *flags (MPS INTI) and returns 0, or
 * -1 if there is no such entry. Call it on a table mp_parse checked. */
int mp_pci_interrupt(const u8 *floating, u8 slot, u8 pin, u8 *ioapic_pin, u16 *flags);

#endif
