/*
 * ACPI and MP table lookup (see tables.h). The layouts are the ACPI 6
 * specification's (RSDP, table header, MADT entries) and the MP
 * specification 1.4's; offsets are written out, with the field's name.
 */
#include "tables.h"

u8 checksum8(const void *p, u32 n)
{
	const u8 *b = p;
	u8 s = 0;

	while (n--)
		s += *b++;
	return s;
}

/* ---- ACPI ---- */

const u8 *acpi_find_rsdp(void)
{
	for (u32 a = BIOS_AREA_START; a < BIOS_AREA_END; a += 16) {
		const u8 *p = phys(a);

		if (!memcmp(p, "RSD PTR ", 8) && !checksum8(p, 20))
			return p;
	}
	return 0;
}

const u8 *acpi_table_at(u64 address, const char *sig)
{
	const u8 *t = phys(address);

	/* Length at offset 4 covers the whole table, header included. */
	if (!address || memcmp(t, sig, 4) || checksum8(t, get_le32(t + 4)))
		return 0;
	return t;
}

const u8 *acpi_root(const u8 *rsdp)
{
	/* Revision (offset 15) 2+ adds the XSDT address at 24; older RSDPs
	 * (QEMU's x86 machines still write one) have only the RSDT at 16. */
	if (rsdp[15] >= 2 && get_le64(rsdp + 24))
		return acpi_table_at(get_le64(rsdp + 24), "XSDT");
	return acpi_table_at(get_le32(rsdp + 16), "RSDT");
}

/* Entries start after the 36-byte header: 64-bit in the XSDT, 32-bit in the RSDT. */
static u32 root_entry_size(const u8 *root)
{
	return root[0] == 'X' ? 8 : 4;
}

u32 acpi_root_entries(const u8 *root)
{
	return (get_le32(root + 4) - 36) / root_entry_size(root);
}

u64 acpi_root_entry(const u8 *root, u32 i)
{
	const u8 *e = root + 36 + i * root_entry_size(root);

	return root_entry_size(root) == 8 ? get_le64(e) : get_le32(e);
}

const u8 *acpi_find_table(const u8 *root, const char *sig)
{
	for (u32 i = 0; i < acpi_root_entries(root); i++) {
		const u8 *t = acpi_table_at(acpi_root_entry(root, i), sig);

		if (t)
			return t;
	}
	return 0;
}

void madt_parse(const u8 *t, struct madt_info *m)
{
	u32 length = get_le32(t + 4);

	memset(m, 0, sizeof(*m));
	m->lapic_address = get_le32(t + 36);
	m->flags = get_le32(t + 40);
	m->nmi_lint = 0xFF;
	for (unsigned irq = 0; irq < 16; irq++)
		m->isa_gsi[irq] = irq;  /* identity unless overridden */

	/* Entries from offset 44: type, length, then the type's fields. A zero
	 * length would loop forever: stop there. */
	for (u32 off = 44; off + 2 <= length && t[off + 1]; off += t[off + 1]) {
		const u8 *e = t + off;

		switch (e[0]) {
		case 0: /* processor local APIC: UID, APIC ID, flags (bit 0: enabled) */
			if (get_le32(e + 4) & 1) {
				if (m->cpus < TABLES_MAX_CPUS)
					m->apic_ids[m->cpus] = e[3];
				m->cpus++;
			}
			break;
		case 1: /* IOAPIC: ID, reserved, address, GSI base */
			if (!m->ioapics++) {
				m->ioapic_id = e[2];
				m->ioapic_address = get_le32(e + 4);
				m->ioapic_gsi_base = get_le32(e + 8);
			}
			break;
		case 2: /* interrupt source override: bus (0 = ISA), source, GSI, flags */
			m->overrides++;
			if (e[2] == 0 && e[3] < 16) {
				m->isa_gsi[e[3]] = get_le32(e + 4);
				m->isa_flags[e[3]] = get_le16(e + 8);
			}
			break;
		case 4: /* local APIC NMI: UID, flags, LINT# */
			m->nmi_lint = e[5];
			break;
		}
	}
}

/* ---- the MP table ---- */

const u8 *mp_find_floating(void)
{
	for (u32 a = 0xF0000; a < BIOS_AREA_END; a += 16) {
		const u8 *p = phys(a);

		/* Byte 8: the structure's length in 16-byte units (1). */
		if (!memcmp(p, "_MP_", 4) && p[8] && !checksum8(p, 16u * p[8]))
			return p;
	}
	return 0;
}

enum mp_error mp_parse(const u8 *floating, struct mp_info *info)
{
	u32 address = get_le32(floating + 4);
	const u8 *c = phys(address);

	memset(info, 0, sizeof(*info));
	info->bsp = 0xFF;
	if (!address)
		return MP_NO_TABLE;  /* a "default configuration": none of ours */
	if (memcmp(c, "PCMP", 4))
		return MP_BAD_SIGNATURE;

	u16 length = get_le16(c + 4), count = get_le16(c + 34);

	if (checksum8(c, length))
		return MP_BAD_CHECKSUM;
	info->lapic_address = get_le32(c + 36);

	/* Entries from offset 44; a processor entry is 20 bytes, the others 8. */
	const u8 *e = c + 44;

	for (u16 i = 0; i < count && e < c + length; i++) {
		switch (e[0]) {
		case 0: /* processor: APIC ID, version, flags (bit 0 enabled, bit 1 BSP) */
			if (e[3] & 1) {
				if (info->cpus < TABLES_MAX_CPUS)
					info->apic_ids[info->cpus] = e[1];
				info->cpus++;
			}
			if (e[3] & 2)
				info->bsp = e[1];
			e += 20;
			continue;
		case 2: /* IOAPIC: ID, version, flags, address */
			info->ioapic_id = e[1];
			info->ioapic_address = get_le32(e + 4);
			break;
		case 3:
			info->io_interrupts++;
			break;
		case 4:
			info->local_interrupts++;
			break;
		}
		e += 8;
	}
	return MP_OK;
}

int mp_pci_interrupt(const u8 *floating, u8 slot, u8 pin, u8 *ioapic_pin, u16 *flags)
{
	const u8 *c = phys(get_le32(floating + 4));
	u16 length = get_le16(c + 4), count = get_le16(c + 34);
	const u8 *e = c + 44;
	int pci_bus = -1;

	/* The spec orders the entries: buses come before the interrupts that name them. */
	for (u16 i = 0; i < count && e < c + length; i++) {
		if (e[0] == 0) {
			e += 20;
			continue;
		}
		if (e[0] == 1 && !memcmp(e + 2, "PCI   ", 6) && pci_bus < 0)
			pci_bus = e[1];
		if (e[0] == 3 && pci_bus >= 0 && e[4] == pci_bus &&
		    e[5] == (u8)(slot << 2 | (pin - 1))) {
			*flags = get_le16(e + 2);
			*ioapic_pin = e[7];
			return 0;
		}
		e += 8;
	}
	return -1;
}
