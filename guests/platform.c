/*
 * What PC firmware leaves for an OS, found and checked the way an OS finds
 * it (docs/guest-abi.md, "Firmware tables and CMOS"):
 *  - CMOS: the memory size fields and the CPU count firmware fills, a byte
 *    of CMOS RAM written and read back, and the RTC (BCD, 24-hour, valid);
 *  - ACPI: the RSDP by scanning 0xE0000-0xFFFFF on 16-byte boundaries,
 *    every checksum, XSDT -> MADT (CPUs, IOAPIC), FADT (PM1a control port,
 *    reset register, DSDT, FACS), MCFG (ECAM), and \_S5 in the DSDT's AML;
 *  - the MP table: its floating pointer in 0xF0000-0xFFFFF, the
 *    configuration table, its processor and IOAPIC entries.
 * Everything found is printed; then the guest powers off by writing
 * SLP_TYPa | SLP_EN to the PM1a control port the FADT gave, which only ends
 * the run if that port is right.
 *
 * Only vCPU 0 works; the others halt. Each failed check prints
 * "FAIL: <what> (got X, want Y)" and exits with its own code (enum failure).
 * Finding and parsing the tables is runtime/tables.c's, shared with the
 * multiboot kernels; the checks of every field are this guest's.
 */
#include "runtime.h"
#include "tables.h"

enum failure {
	F_CMOS_MEMORY = 1,
	F_CMOS_CPUS,
	F_CMOS_RAM,
	F_RTC_STATUS,
	F_RTC_VALUE,
	F_RSDP,
	F_CHECKSUM,
	F_XSDT,
	F_MADT,
	F_FADT,
	F_FACS,
	F_DSDT,
	F_MCFG,
	F_MPTABLE,
	F_POWER_OFF,
};

#define CMOS_INDEX 0x70
#define CMOS_DATA 0x71

/* ---- CMOS and RTC ------------------------------------------------------- */

static u8 cmos_read(u8 index)
{
	outb(CMOS_INDEX, index);
	return inb(CMOS_DATA);
}

static void cmos_write(u8 index, u8 value)
{
	outb(CMOS_INDEX, index);
	outb(CMOS_DATA, value);
}

static u16 cmos_read16(u8 index)
{
	return (u16)(cmos_read(index) | cmos_read(index + 1) << 8);
}

static void check_cmos(unsigned ncpus)
{
	u32 base = cmos_read16(0x15), extended = cmos_read16(0x17);
	u32 above_16m = cmos_read16(0x34);
	u32 above_4g = cmos_read(0x5B) | cmos_read(0x5C) << 8 | (u32)cmos_read(0x5D) << 16;
	unsigned cpus = cmos_read(0x5F) + 1u;

	guest_expect(F_CMOS_MEMORY, "cmos base memory (KiB)", base, 640);
	/* 0x30/0x31 repeat 0x17/0x18 (the second copy is the one POST tested). */
	guest_expect(F_CMOS_MEMORY, "cmos 0x30 = 0x17", cmos_read16(0x30), extended);
	guest_expect(F_CMOS_CPUS, "cmos cpu count", cpus, ncpus);

	/* Below 16 MiB the KiB count says it; beyond, the 64 KiB count does. */
	u64 below = above_16m ? (16ull << 20) + ((u64)above_16m << 16)
			      : (1ull << 20) + ((u64)extended << 10);
	u64 total = below + ((u64)above_4g << 16);

	printf("cmos: base %u KiB, extended %u KiB, above 16M %u x 64 KiB, "
	       "above 4G %u x 64 KiB, cpus %u, ram %llu MiB\n",
	       base, extended, above_16m, above_4g, cpus, total >> 20);

	/* CMOS RAM outside the clock keeps what is written (0x50 is unused). */
	cmos_write(0x50, 0xA5);
	guest_expect(F_CMOS_RAM, "cmos ram 0x50 after writing 0xa5", cmos_read(0x50), 0xA5);
	cmos_write(0x50, 0x5A);
	guest_expect(F_CMOS_RAM, "cmos ram 0x50 after writing 0x5a", cmos_read(0x50), 0x5A);
	print("cmos: ram byte kept\n");
}

/* A BCD clock field in [lo, hi], or fail. */
static unsigned rtc_field(u8 index, const char *what, unsigned lo, unsigned hi)
{
	u8 v = cmos_read(index);
	unsigned n = (v >> 4) * 10u + (v & 0xF);

	if ((v & 0xF) > 9 || (v >> 4) > 9)
		guest_fail(F_RTC_VALUE, what, v, 0);
	if (n < lo || n > hi)
		guest_fail(F_RTC_VALUE, what, n, lo);
	return n;
}

static void check_rtc(void)
{
	u8 a = cmos_read(0x0A), b = cmos_read(0x0B), d = cmos_read(0x0D);

	guest_expect(F_RTC_STATUS, "rtc register A update in progress", a & 0x80, 0);
	guest_expect(F_RTC_STATUS, "rtc register B binary mode", b & 0x04, 0);
	guest_expect(F_RTC_STATUS, "rtc register B 24-hour mode", b & 0x02, 0x02);
	guest_expect(F_RTC_STATUS, "rtc register D valid ram and time", d & 0x80, 0x80);

	unsigned sec = rtc_field(0x00, "rtc seconds", 0, 59);
	unsigned min = rtc_field(0x02, "rtc minutes", 0, 59);
	unsigned hour = rtc_field(0x04, "rtc hours", 0, 23);
	unsigned wday = rtc_field(0x06, "rtc day of week", 1, 7);
	unsigned day = rtc_field(0x07, "rtc day of month", 1, 31);
	unsigned month = rtc_field(0x08, "rtc month", 1, 12);
	unsigned year = rtc_field(0x09, "rtc year", 0, 99);
	unsigned century = rtc_field(0x32, "rtc century", 19, 21);

	printf("rtc: %u%02u-%02u-%02u %02u:%02u:%02u, weekday %u, 24-hour BCD\n",
	       century, year, month, day, hour, min, sec, wday);
}

/* ---- ACPI ---------------------------------------------------------------- */

/* A system description table: the signature and a checksum that holds
 * (acpi_table_at() checks both; this says which one failed). */
static const u8 *acpi_table(u64 address, const char *sig)
{
	const u8 *t = phys(address);

	if (memcmp(t, sig, 4))
		guest_fail(F_XSDT, sig, get_le32(t), get_le32(sig));
	if (checksum8(t, get_le32(t + 4)))
		guest_fail(F_CHECKSUM, sig, checksum8(t, get_le32(t + 4)), 0);
	return t;
}

static void check_madt(const u8 *t, unsigned ncpus)
{
	struct madt_info m;

	madt_parse(t, &m);
	guest_expect(F_MADT, "madt flags PCAT_COMPAT", m.flags & 1, 1);
	for (unsigned i = 0; i < m.cpus && i < TABLES_MAX_CPUS; i++)
		guest_expect(F_MADT, "madt local apic id", m.apic_ids[i], i);
	guest_expect(F_MADT, "madt enabled cpus", m.cpus, ncpus);
	guest_expect(F_MADT, "madt irq 0 override", m.isa_gsi[0], 2);
	printf("acpi: MADT: local APIC 0x%x, %u enabled CPUs, IOAPIC %u at 0x%x GSI %u, "
	       "%u overrides (IRQ 0 -> GSI %u), NMI LINT%u\n",
	       m.lapic_address, m.cpus, m.ioapic_id, m.ioapic_address, m.ioapic_gsi_base,
	       m.overrides, m.isa_gsi[0], m.nmi_lint);
}

/* \_S5's SLP_TYPa, from the DSDT's AML: Name (_S5_, Package (n) {typ, ...}). */
static unsigned s5_sleep_type(const u8 *dsdt)
{
	u32 length = get_le32(dsdt + 4);

	for (u32 i = 36 + 2; i + 8 < length; i++) {
		const u8 *p = dsdt + i;

		if (memcmp(p, "_S5_", 4) || p[4] != 0x12)  /* PackageOp */
			continue;
		if (p[-1] != 0x08 && !(p[-1] == '\\' && p[-2] == 0x08))  /* NameOp */
			continue;
		p += 5;
		p += 1 + (p[0] >> 6);	/* PkgLength: its top two bits count extra bytes */
		p += 1;			/* NumElements */
		if (p[0] == 0x00 || p[0] == 0x01)	/* ZeroOp, OneOp */
			return p[0];
		if (p[0] == 0x0A)	/* BytePrefix */
			return p[1];
		guest_fail(F_DSDT, "\\_S5 SLP_TYPa encoding", p[0], 0x0A);
	}
	guest_fail(F_DSDT, "no \\_S5 in the DSDT", 0, 1);
}

/* Returns the PM1a control port. */
static u16 check_fadt(const u8 *t, unsigned *slp_typ)
{
	u32 length = get_le32(t + 4);
	u16 sci = get_le16(t + 46);
	u64 pm1a_cnt = get_le32(t + 64);
	u64 dsdt = get_le32(t + 40), facs = get_le32(t + 36);

	if (length >= 184 && get_le64(t + 176))	/* X_PM1a_CNT_BLK, a GAS */
		pm1a_cnt = get_le64(t + 176);
	if (length >= 148 && get_le64(t + 140))	/* X_DSDT */
		dsdt = get_le64(t + 140);
	if (length >= 140 && get_le64(t + 132))	/* X_FIRMWARE_CTRL */
		facs = get_le64(t + 132);
	guest_expect(F_FADT, "fadt HW_REDUCED_ACPI", get_le32(t + 112) & (1u << 20), 0);
	guest_expect(F_FADT, "fadt RESET_REG_SUP", get_le32(t + 112) & (1u << 10), 1u << 10);
	guest_expect(F_FADT, "fadt reset register space (system I/O)", t[116], 1);
	guest_expect(F_FADT, "fadt PM1 control length", t[89], 2);

	const u8 *f = phys(facs);

	if (memcmp(f, "FACS", 4) || get_le32(f + 4) < 64)
		guest_fail(F_FACS, "facs signature and length", get_le32(f), get_le32("FACS"));

	const u8 *d = acpi_table(dsdt, "DSDT");

	*slp_typ = s5_sleep_type(d);
	printf("acpi: FADT: revision %u, SCI %u, PM1a control 0x%llx, "
	       "reset register 0x%llx = 0x%02x, DSDT 0x%llx (%u bytes), FACS ok\n",
	       t[8], sci, pm1a_cnt, get_le64(t + 120), t[128], dsdt, get_le32(d + 4));
	printf("acpi: DSDT: \\_S5 SLP_TYPa %u\n", *slp_typ);
	return (u16)pm1a_cnt;
}

static void check_mcfg(const u8 *t)
{
	guest_expect(F_MCFG, "mcfg length (one allocation)", get_le32(t + 4), 60);
	printf("acpi: MCFG: ECAM 0x%llx, segment %u, buses %u-%u\n",
	       get_le64(t + 44), get_le16(t + 52), t[54], t[55]);
}

static u16 check_acpi(unsigned ncpus, unsigned *slp_typ)
{
	const u8 *rsdp = acpi_find_rsdp();

	if (!rsdp)
		guest_fail(F_RSDP, "no RSDP in 0xe0000-0xfffff", 0, 1);
	guest_expect(F_RSDP, "rsdp revision", rsdp[15], 2);
	if (checksum8(rsdp, get_le32(rsdp + 20)))
		guest_fail(F_CHECKSUM, "rsdp extended checksum",
			   checksum8(rsdp, get_le32(rsdp + 20)), 0);
	printf("acpi: RSDP at 0x%llx, revision %u, RSDT 0x%x, XSDT 0x%llx\n",
	       (u64)(uptr)rsdp, rsdp[15], get_le32(rsdp + 16), get_le64(rsdp + 24));

	const u8 *xsdt = acpi_table(get_le64(rsdp + 24), "XSDT");
	const u8 *madt = 0, *fadt = 0, *mcfg = 0;

	acpi_table(get_le32(rsdp + 16), "RSDT");
	print("acpi: XSDT lists");
	for (u32 i = 0; i < acpi_root_entries(xsdt); i++) {
		const u8 *t = phys(acpi_root_entry(xsdt, i));

		print(" ");
		serial_write(t, 4);
		if (!memcmp(t, "APIC", 4))
			madt = acpi_table((uptr)t, "APIC");
		else if (!memcmp(t, "FACP", 4))
			fadt = acpi_table((uptr)t, "FACP");
		else if (!memcmp(t, "MCFG", 4))
			mcfg = acpi_table((uptr)t, "MCFG");
	}
	print("\n");
	if (!madt || !fadt || !mcfg)
		guest_fail(F_XSDT, "xsdt lists APIC, FACP and MCFG", !!madt + !!fadt + !!mcfg, 3);
	check_madt(madt, ncpus);
	u16 port = check_fadt(fadt, slp_typ);
	check_mcfg(mcfg);
	return port;
}

/* ---- the MP table -------------------------------------------------------- */

static void check_mptable(unsigned ncpus)
{
	const u8 *mp = mp_find_floating(), *c;
	struct mp_info info;

	if (!mp)
		guest_fail(F_MPTABLE, "no MP floating pointer in 0xf0000-0xfffff", 0, 1);
	c = phys(get_le32(mp + 4));
	switch (mp_parse(mp, &info)) {
	case MP_OK:
		break;
	case MP_BAD_CHECKSUM:
		guest_fail(F_CHECKSUM, "mp configuration table", checksum8(c, get_le16(c + 4)), 0);
	default:
		guest_fail(F_MPTABLE, "mp configuration table signature", get_le32(c),
			   get_le32("PCMP"));
	}
	guest_expect(F_MPTABLE, "mp table enabled processors", info.cpus, ncpus);
	guest_expect(F_MPTABLE, "mp table bootstrap processor", info.bsp, 0);
	printf("mptable: at 0x%llx, %u enabled CPUs, BSP APIC %u, IOAPIC %u at 0x%x, "
	       "local APIC 0x%x, %u I/O interrupts, %u local interrupts\n",
	       (u64)(uptr)mp, info.cpus, info.bsp, info.ioapic_id, info.ioapic_address,
	       info.lapic_address, info.io_interrupts, info.local_interrupts);
}

int guest_main(unsigned cpu, unsigned ncpus)
{
	unsigned slp_typ;

	if (cpu != 0)
		guest_halt();
	check_cmos(ncpus);
	check_rtc();
	u16 pm1a_cnt = check_acpi(ncpus, &slp_typ);
	check_mptable(ncpus);
	printf("platform: powering off through port 0x%x\n", pm1a_cnt);
	outw(pm1a_cnt, (u16)(slp_typ << 10 | PM1A_SLP_EN));
	print("FAIL: still running after the FADT's power-off\n");
	return F_POWER_OFF;
}
