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
 */
#include "runtime.h"

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

NORETURN static void fail(u8 code, const char *what, u64 got, u64 want)
{
	printf("FAIL: %s (got 0x%llx, want 0x%llx)\n", what, got, want);
	guest_exit(code);
}

static void expect(u8 code, const char *what, u64 got, u64 want)
{
	if (got != want)
		fail(code, what, got, want);
}

/* A pointer to guest-physical memory (identity-mapped). The empty asm hides
 * the constant from gcc, which would otherwise warn that a fixed address is
 * outside every object it knows of. */
static const u8 *phys(u64 address)
{
	const u8 *p;

	__asm__("" : "=r"(p) : "0"(address));
	return p;
}

static u16 get16(const u8 *p) { return (u16)(p[0] | p[1] << 8); }
static u32 get32(const u8 *p) { return get16(p) | (u32)get16(p + 2) << 16; }
static u64 get64(const u8 *p) { return get32(p) | (u64)get32(p + 4) << 32; }

static int same(const u8 *p, const char *s, unsigned n)
{
	for (unsigned i = 0; i < n; i++)
		if (p[i] != (u8)s[i])
			return 0;
	return 1;
}

static u8 sum(const u8 *p, u32 n)
{
	u8 s = 0;

	while (n--)
		s += *p++;
	return s;
}

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

	expect(F_CMOS_MEMORY, "cmos base memory (KiB)", base, 640);
	/* 0x30/0x31 repeat 0x17/0x18 (the second copy is the one POST tested). */
	expect(F_CMOS_MEMORY, "cmos 0x30 = 0x17", cmos_read16(0x30), extended);
	expect(F_CMOS_CPUS, "cmos cpu count", cpus, ncpus);

	/* Below 16 MiB the KiB count says it; beyond, the 64 KiB count does. */
	u64 below = above_16m ? (16ull << 20) + ((u64)above_16m << 16)
			      : (1ull << 20) + ((u64)extended << 10);
	u64 total = below + ((u64)above_4g << 16);

	printf("cmos: base %u KiB, extended %u KiB, above 16M %u x 64 KiB, "
	       "above 4G %u x 64 KiB, cpus %u, ram %llu MiB\n",
	       base, extended, above_16m, above_4g, cpus, total >> 20);

	/* CMOS RAM outside the clock keeps what is written (0x50 is unused). */
	cmos_write(0x50, 0xA5);
	expect(F_CMOS_RAM, "cmos ram 0x50 after writing 0xa5", cmos_read(0x50), 0xA5);
	cmos_write(0x50, 0x5A);
	expect(F_CMOS_RAM, "cmos ram 0x50 after writing 0x5a", cmos_read(0x50), 0x5A);
	print("cmos: ram byte kept\n");
}

/* A BCD clock field in [lo, hi], or fail. */
static unsigned rtc_field(u8 index, const char *what, unsigned lo, unsigned hi)
{
	u8 v = cmos_read(index);
	unsigned n = (v >> 4) * 10u + (v & 0xF);

	if ((v & 0xF) > 9 || (v >> 4) > 9)
		fail(F_RTC_VALUE, what, v, 0);
	if (n < lo || n > hi)
		fail(F_RTC_VALUE, what, n, lo);
	return n;
}

static void check_rtc(void)
{
	u8 a = cmos_read(0x0A), b = cmos_read(0x0B), d = cmos_read(0x0D);

	expect(F_RTC_STATUS, "rtc register A update in progress", a & 0x80, 0);
	expect(F_RTC_STATUS, "rtc register B binary mode", b & 0x04, 0);
	expect(F_RTC_STATUS, "rtc register B 24-hour mode", b & 0x02, 0x02);
	expect(F_RTC_STATUS, "rtc register D valid ram and time", d & 0x80, 0x80);

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

/* A system description table: the signature and a checksum that holds. */
static const u8 *acpi_table(u64 address, const char *sig)
{
	const u8 *t = phys(address);

	if (!same(t, sig, 4))
		fail(F_XSDT, sig, get32(t), get32((const u8 *)sig));
	if (sum(t, get32(t + 4)))
		fail(F_CHECKSUM, sig, sum(t, get32(t + 4)), 0);
	return t;
}

static const u8 *find_rsdp(void)
{
	for (u64 a = 0xE0000; a < 0x100000; a += 16) {
		const u8 *p = phys(a);

		if (same(p, "RSD PTR ", 8) && !sum(p, 20))
			return p;
	}
	fail(F_RSDP, "no RSDP in 0xe0000-0xfffff", 0, 1);
}

struct madt_info {
	unsigned cpus, overrides, irq0_gsi, ioapic_id, ioapic_gsi, nmi_lint;
	u32 lapic, ioapic;
};

static void check_madt(const u8 *t, unsigned ncpus)
{
	struct madt_info m = { .irq0_gsi = 0, .nmi_lint = 9 };
	u32 length = get32(t + 4);

	m.lapic = get32(t + 36);
	expect(F_MADT, "madt flags PCAT_COMPAT", get32(t + 40) & 1, 1);
	for (u32 off = 44; off + 2 <= length && t[off + 1]; off += t[off + 1]) {
		const u8 *e = t + off;

		switch (e[0]) {
		case 0: /* processor local APIC: UID, APIC ID, flags */
			if (get32(e + 4) & 1) {
				expect(F_MADT, "madt local apic id", e[3], m.cpus);
				m.cpus++;
			}
			break;
		case 1: /* IOAPIC: ID, reserved, address, GSI base */
			m.ioapic_id = e[2];
			m.ioapic = get32(e + 4);
			m.ioapic_gsi = get32(e + 8);
			break;
		case 2: /* interrupt source override: bus, source, GSI, flags */
			m.overrides++;
			if (e[3] == 0)
				m.irq0_gsi = get32(e + 4);
			break;
		case 4: /* local APIC NMI: UID, flags, LINT# */
			m.nmi_lint = e[5];
			break;
		}
	}
	expect(F_MADT, "madt enabled cpus", m.cpus, ncpus);
	expect(F_MADT, "madt irq 0 override", m.irq0_gsi, 2);
	printf("acpi: MADT: local APIC 0x%x, %u enabled CPUs, IOAPIC %u at 0x%x GSI %u, "
	       "%u overrides (IRQ 0 -> GSI %u), NMI LINT%u\n",
	       m.lapic, m.cpus, m.ioapic_id, m.ioapic, m.ioapic_gsi, m.overrides,
	       m.irq0_gsi, m.nmi_lint);
}

/* \_S5's SLP_TYPa, from the DSDT's AML: Name (_S5_, Package (n) {typ, ...}). */
static unsigned s5_sleep_type(const u8 *dsdt)
{
	u32 length = get32(dsdt + 4);

	for (u32 i = 36 + 2; i + 8 < length; i++) {
		const u8 *p = dsdt + i;

		if (!same(p, "_S5_", 4) || p[4] != 0x12)  /* PackageOp */
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
		fail(F_DSDT, "\\_S5 SLP_TYPa encoding", p[0], 0x0A);
	}
	fail(F_DSDT, "no \\_S5 in the DSDT", 0, 1);
}

/* Returns the PM1a control port. */
static u16 check_fadt(const u8 *t, unsigned *slp_typ)
{
	u32 length = get32(t + 4);
	u16 sci = get16(t + 46);
	u64 pm1a_cnt = get32(t + 64);
	u64 dsdt = get32(t + 40), facs = get32(t + 36);

	if (length >= 184 && get64(t + 176))	/* X_PM1a_CNT_BLK, a GAS */
		pm1a_cnt = get64(t + 176);
	if (length >= 148 && get64(t + 140))	/* X_DSDT */
		dsdt = get64(t + 140);
	if (length >= 140 && get64(t + 132))	/* X_FIRMWARE_CTRL */
		facs = get64(t + 132);
	expect(F_FADT, "fadt HW_REDUCED_ACPI", get32(t + 112) & (1u << 20), 0);
	expect(F_FADT, "fadt RESET_REG_SUP", get32(t + 112) & (1u << 10), 1u << 10);
	expect(F_FADT, "fadt reset register space (system I/O)", t[116], 1);
	expect(F_FADT, "fadt PM1 control length", t[89], 2);

	const u8 *f = phys(facs);

	if (!same(f, "FACS", 4) || get32(f + 4) < 64)
		fail(F_FACS, "facs signature and length", get32(f), get32((const u8 *)"FACS"));

	const u8 *d = acpi_table(dsdt, "DSDT");

	*slp_typ = s5_sleep_type(d);
	printf("acpi: FADT: revision %u, SCI %u, PM1a control 0x%llx, "
	       "reset register 0x%llx = 0x%02x, DSDT 0x%llx (%u bytes), FACS ok\n",
	       t[8], sci, pm1a_cnt, get64(t + 120), t[128], dsdt, get32(d + 4));
	printf("acpi: DSDT: \\_S5 SLP_TYPa %u\n", *slp_typ);
	return (u16)pm1a_cnt;
}

static void check_mcfg(const u8 *t)
{
	expect(F_MCFG, "mcfg length (one allocation)", get32(t + 4), 60);
	printf("acpi: MCFG: ECAM 0x%llx, segment %u, buses %u-%u\n",
	       get64(t + 44), get16(t + 52), t[54], t[55]);
}

static u16 check_acpi(unsigned ncpus, unsigned *slp_typ)
{
	const u8 *rsdp = find_rsdp();

	expect(F_RSDP, "rsdp revision", rsdp[15], 2);
	if (sum(rsdp, get32(rsdp + 20)))
		fail(F_CHECKSUM, "rsdp extended checksum", sum(rsdp, get32(rsdp + 20)), 0);
	printf("acpi: RSDP at 0x%llx, revision %u, RSDT 0x%x, XSDT 0x%llx\n",
	       (u64)(uptr)rsdp, rsdp[15], get32(rsdp + 16), get64(rsdp + 24));

	const u8 *xsdt = acpi_table(get64(rsdp + 24), "XSDT");
	u32 entries = (get32(xsdt + 4) - 36) / 8;
	const u8 *madt = 0, *fadt = 0, *mcfg = 0;

	acpi_table(get32(rsdp + 16), "RSDT");
	print("acpi: XSDT lists");
	for (u32 i = 0; i < entries; i++) {
		const u8 *t = phys(get64(xsdt + 36 + 8 * i));

		print(" ");
		serial_write(t, 4);
		if (same(t, "APIC", 4))
			madt = acpi_table((uptr)t, "APIC");
		else if (same(t, "FACP", 4))
			fadt = acpi_table((uptr)t, "FACP");
		else if (same(t, "MCFG", 4))
			mcfg = acpi_table((uptr)t, "MCFG");
	}
	print("\n");
	if (!madt || !fadt || !mcfg)
		fail(F_XSDT, "xsdt lists APIC, FACP and MCFG", !!madt + !!fadt + !!mcfg, 3);
	check_madt(madt, ncpus);
	u16 port = check_fadt(fadt, slp_typ);
	check_mcfg(mcfg);
	return port;
}

/* ---- the MP table -------------------------------------------------------- */

static void check_mptable(unsigned ncpus)
{
	const u8 *mp = 0;

	for (u64 a = 0xF0000; a < 0x100000 && !mp; a += 16) {
		const u8 *p = phys(a);

		if (same(p, "_MP_", 4) && p[8] && !sum(p, 16u * p[8]))
			mp = p;
	}
	if (!mp)
		fail(F_MPTABLE, "no MP floating pointer in 0xf0000-0xfffff", 0, 1);

	const u8 *c = phys(get32(mp + 4));
	u16 length = get16(c + 4), count = get16(c + 34);

	if (!same(c, "PCMP", 4))
		fail(F_MPTABLE, "mp configuration table signature", get32(c), 0);
	if (sum(c, length))
		fail(F_CHECKSUM, "mp configuration table", sum(c, length), 0);

	unsigned cpus = 0, bsp = 0xFF, ioapic_id = 0xFF, io_ints = 0, local_ints = 0;
	u32 ioapic = 0;
	const u8 *e = c + 44;

	for (u16 i = 0; i < count && e < c + length; i++) {
		if (e[0] == 0) {	/* processor: APIC ID, version, flags, ... */
			if (e[3] & 1)
				cpus++;
			if (e[3] & 2)
				bsp = e[1];
			e += 20;
			continue;
		}
		if (e[0] == 2) {	/* IOAPIC: ID, version, flags, address */
			ioapic_id = e[1];
			ioapic = get32(e + 4);
		} else if (e[0] == 3) {
			io_ints++;
		} else if (e[0] == 4) {
			local_ints++;
		}
		e += 8;
	}
	expect(F_MPTABLE, "mp table enabled processors", cpus, ncpus);
	expect(F_MPTABLE, "mp table bootstrap processor", bsp, 0);
	printf("mptable: at 0x%llx, %u enabled CPUs, BSP APIC %u, IOAPIC %u at 0x%x, "
	       "local APIC 0x%x, %u I/O interrupts, %u local interrupts\n",
	       (u64)(uptr)mp, cpus, bsp, ioapic_id, ioapic, get32(c + 36), io_ints, local_ints);
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
