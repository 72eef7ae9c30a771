/*
 * The PC platform a multiboot kernel finds, found the way an OS finds it
 * and cross-checked, one source against another (docs/guest-abi.md,
 * "Multiboot", "Firmware tables and CMOS", "fw_cfg"):
 *  - fw_cfg, every value read through the legacy ports and by DMA, which
 *    must agree: signature, ID, RAM size, CPU counts, the command line (the
 *    --append text, which the boot loader also put after the kernel's path
 *    in the multiboot command line) and etc/e820, whose low RAM must end
 *    where the multiboot mem_upper says and whose RAM must add up to the
 *    RAM size;
 *  - CMOS: the memory size fields against mem_upper and the RAM size, and
 *    the CPU count;
 *  - the CPUs from ACPI (RSDP, XSDT -> MADT local APICs) and from the MP
 *    table (floating pointer -> processor entries): the same APIC IDs, as
 *    many as fw_cfg counts;
 *  - then the boot CPU starts every other one, by the APIC IDs the MADT
 *    gave, with INIT/SIPI, and counts who came up.
 * Output: one line per item, "mb_platform: all ok" last, then power-off.
 * A failed check prints "FAIL: <what> (got X, want Y)" and exits with its
 * own code (enum failure). Finding tables, fw_cfg access and the AP
 * start-up are the runtime's (tables.c, fwcfg.c, smp.c).
 */
#include "runtime.h"
#include "multiboot.h"
#include "apic.h"
#include "fwcfg.h"
#include "smp.h"
#include "tables.h"

enum failure {
	F_MAGIC = 1,
	F_FW_CFG,           /* signature, ID or DMA register missing */
	F_FW_CFG_BOTH_WAYS, /* legacy and DMA disagree, or a DMA failed */
	F_CMDLINE,
	F_E820,
	F_CMOS,
	F_ACPI,
	F_MPTABLE,
	F_CPUS,             /* the sources disagree about the CPUs */
	F_SMP,
};

#define MIB 0x100000ull
#define MAX_ITEM 512        /* the longest item read both ways (command line, e820) */
#define MAX_E820 8

static u8 legacy_buf[MAX_ITEM];
static u8 dma_buf[MAX_ITEM];

/* n bytes of item key into legacy_buf, checked against the same by DMA. */
static void read_both(u16 key, u32 n, const char *what)
{
	int r;

	guest_expect(F_FW_CFG_BOTH_WAYS, what, n <= MAX_ITEM, 1);
	r = fw_cfg_read_both(key, legacy_buf, dma_buf, n);
	if (r == FW_CFG_DIFFERENT)
		guest_fail(F_FW_CFG_BOTH_WAYS, what, 1, 0);  /* "legacy != dma" */
	guest_expect(F_FW_CFG_BOTH_WAYS, what, (u32)r, 0);
}

static u32 string_length(const char *s)
{
	u32 n = 0;

	while (s[n])
		n++;
	return n;
}

static void print_ids(const u8 *ids, unsigned n)
{
	for (unsigned i = 0; i < n && i < TABLES_MAX_CPUS; i++)
		printf(" %u", ids[i]);
}

/* ---- fw_cfg ---- */

struct fw_cfg_values {
	u64 ram_size;
	unsigned cpus;
	u64 low_ram_end;   /* end of etc/e820's RAM range at 0 */
};

static void check_fw_cfg_ids(void)
{
	u8 sig[4];
	u32 id;
	u64 dma_signature;

	fw_cfg_select(FW_CFG_SIGNATURE);
	fw_cfg_read(sig, 4);
	guest_expect(F_FW_CFG, "fw_cfg signature", get_le32(sig), get_le32("QEMU"));
	id = (u32)fw_cfg_read_le(FW_CFG_ID, 4);
	guest_expect(F_FW_CFG, "fw_cfg id: traditional and dma",
		     id & (FW_CFG_VERSION | FW_CFG_VERSION_DMA), FW_CFG_VERSION | FW_CFG_VERSION_DMA);
	dma_signature = fw_cfg_dma_signature();
	guest_expect(F_FW_CFG, "fw_cfg dma signature", dma_signature, FW_CFG_DMA_SIGNATURE);
	printf("fw_cfg: signature QEMU id %x dma signature QEMU CFG\n", id);
}

/* The command line item must be what the boot loader appended to the
 * kernel's path in the multiboot command line ("%s %s", as QEMU writes it). */
static void check_cmdline(const char *mbi_cmdline)
{
	u32 size, length, mbi_length = string_length(mbi_cmdline);

	read_both(FW_CFG_CMDLINE_SIZE, 4, "fw_cfg cmdline size");
	size = get_le32(legacy_buf);
	guest_expect(F_CMDLINE, "fw_cfg cmdline size in [1, 512]", size >= 1 && size <= MAX_ITEM, 1);
	read_both(FW_CFG_CMDLINE_DATA, size, "fw_cfg cmdline");
	length = size - 1;
	guest_expect(F_CMDLINE, "fw_cfg cmdline NUL-terminated at its size", legacy_buf[length], 0);
	guest_expect(F_CMDLINE, "fw_cfg cmdline length", string_length((const char *)legacy_buf),
		     length);
	if (mbi_length < length + 1 || mbi_cmdline[mbi_length - length - 1] != ' ' ||
	    memcmp(mbi_cmdline + mbi_length - length, legacy_buf, length))
		guest_fail(F_CMDLINE, "fw_cfg cmdline ends the multiboot command line", 0, 1);
	printf("fw_cfg: cmdline \"%s\" (size %u), legacy = dma, the multiboot command line's "
	       "after the kernel path\n", (const char *)legacy_buf, size);
}

static void check_e820(struct fw_cfg_values *v, const struct multiboot_info *mbi)
{
	u32 size;
	u16 select = fw_cfg_find_file("etc/e820", &size);
	const struct fw_cfg_e820_entry *map = (const void *)legacy_buf;
	u64 ram = 0;

	guest_expect(F_E820, "etc/e820 in the file directory", select != 0, 1);
	guest_expect(F_E820, "etc/e820 size",
		     size && size % sizeof(*map) == 0 && size <= MAX_E820 * sizeof(*map), 1);
	read_both(select, size, "etc/e820");
	printf("fw_cfg: etc/e820 at %04x, %u bytes, legacy = dma\n", select, size);
	v->low_ram_end = 0;
	for (u32 i = 0; i < size / sizeof(*map); i++) {
		printf("e820 %016llx %016llx %u\n", map[i].address, map[i].length, map[i].type);
		if (map[i].type != 1)
			continue;
		ram += map[i].length;
		if (map[i].address == 0)
			v->low_ram_end = map[i].length;
	}
	guest_expect(F_E820, "etc/e820 RAM = ram_size", ram, v->ram_size);
	guest_expect(F_E820, "etc/e820 RAM at 0 ends at 1 MiB + mem_upper", v->low_ram_end,
		     MIB + (u64)mbi->mem_upper * 1024);
	printf("fw_cfg: etc/e820 agrees with mem_upper %u KiB and ram_size\n", mbi->mem_upper);
}

static void check_fw_cfg(struct fw_cfg_values *v, const struct multiboot_info *mbi)
{
	unsigned max_cpus;

	check_fw_cfg_ids();
	read_both(FW_CFG_RAM_SIZE, 8, "fw_cfg ram size");
	v->ram_size = get_le64(legacy_buf);
	read_both(FW_CFG_NB_CPUS, 2, "fw_cfg nb cpus");
	v->cpus = get_le16(legacy_buf);
	read_both(FW_CFG_MAX_CPUS, 2, "fw_cfg max cpus");
	max_cpus = get_le16(legacy_buf);
	printf("fw_cfg: ram_size %016llx nb_cpus %u max_cpus %u, legacy = dma\n", v->ram_size,
	       v->cpus, max_cpus);
	check_cmdline((const char *)(uptr)mbi->cmdline);
	check_e820(v, mbi);
}

/* ---- CMOS ---- */

static u8 cmos_read(u8 index)
{
	outb(0x70, index);
	return inb(0x71);
}

static u32 cmos_read16(u8 index)
{
	return cmos_read(index) | (u32)cmos_read(index + 1) << 8;
}

static void check_cmos(const struct fw_cfg_values *v, const struct multiboot_info *mbi)
{
	u32 extended = cmos_read16(0x17), above_16m = cmos_read16(0x34);
	u32 above_4g = cmos_read16(0x5B) | (u32)cmos_read(0x5D) << 16;
	unsigned cpus = cmos_read(0x5F) + 1u;
	/* RAM below the hole ends at 1 MiB + mem_upper; the fields count it in
	 * KiB above 1 MiB and in 64 KiB units above 16 MiB, each in 16 bits. */
	u64 top = MIB + (u64)mbi->mem_upper * 1024;
	u64 want_16m = top > 16 * MIB ? (top - 16 * MIB) >> 16 : 0;

	guest_expect(F_CMOS, "cmos 0x17 = mem_upper (at most 0xffff)", extended,
		     mbi->mem_upper < 0xFFFF ? mbi->mem_upper : 0xFFFF);
	guest_expect(F_CMOS, "cmos 0x30 = 0x17", cmos_read16(0x30), extended);
	guest_expect(F_CMOS, "cmos 0x34 (64 KiB above 16 MiB)", above_16m,
		     want_16m < 0xFFFF ? want_16m : 0xFFFF);
	guest_expect(F_CMOS, "cmos 0x5b (64 KiB above 4 GiB) = ram_size - below",
		     (u64)above_4g << 16, v->ram_size - top);
	guest_expect(F_CMOS, "cmos 0x5f + 1 = nb_cpus", cpus, v->cpus);
	printf("cmos: extended %u KiB, above 16M %u x 64 KiB, above 4G %u x 64 KiB, cpus %u: "
	       "agree with mem_upper and ram_size\n", extended, above_16m, above_4g, cpus);
}

/* ---- the CPUs, twice ---- */

static void find_cpus(struct madt_info *madt, unsigned cpus)
{
	const u8 *rsdp = acpi_find_rsdp(), *root, *table;
	const u8 *floating = mp_find_floating();
	struct mp_info mp;

	guest_expect(F_ACPI, "an RSDP in 0xe0000-0xfffff", rsdp != 0, 1);
	root = acpi_root(rsdp);
	guest_expect(F_ACPI, "the RSDP's root table checks out", root != 0, 1);
	table = acpi_find_table(root, "APIC");
	guest_expect(F_ACPI, "a MADT listed in the root table", table != 0, 1);
	madt_parse(table, madt);
	printf("acpi: RSDP at 0x%x, ", (u32)(uptr)rsdp);
	serial_write(root, 4);  /* XSDT, or RSDT under an ACPI 1.0 RSDP */
	printf(" at 0x%x, MADT at 0x%x: %u enabled CPUs, APIC IDs", (u32)(uptr)root,
	       (u32)(uptr)table, madt->cpus);
	print_ids(madt->apic_ids, madt->cpus);
	print("\n");

	guest_expect(F_MPTABLE, "an MP floating pointer in 0xf0000-0xfffff", floating != 0, 1);
	guest_expect(F_MPTABLE, "the MP configuration table checks out", mp_parse(floating, &mp),
		     MP_OK);
	printf("mptable: at 0x%x, %u enabled CPUs, APIC IDs", (u32)(uptr)floating, mp.cpus);
	print_ids(mp.apic_ids, mp.cpus);
	printf(", BSP %u\n", mp.bsp);

	guest_expect(F_CPUS, "madt cpus = fw_cfg nb_cpus", madt->cpus, cpus);
	guest_expect(F_CPUS, "mp table cpus = fw_cfg nb_cpus", mp.cpus, cpus);
	guest_expect(F_CPUS, "at most 64 cpus", cpus <= TABLES_MAX_CPUS, 1);
	for (unsigned i = 0; i < cpus; i++)
		guest_expect(F_CPUS, "mp table apic id = madt's", mp.apic_ids[i],
			     madt->apic_ids[i]);
	guest_expect(F_CPUS, "mp table bsp = this cpu", mp.bsp, lapic_id());
}

/* Start every CPU the MADT lists but this one, each by its APIC ID. */
static void start_aps(const struct madt_info *madt)
{
	unsigned self = lapic_id(), started = 0, up;
	u64 want = 0, ids;

	lapic_enable();
	smp_install_trampoline();
	for (unsigned i = 0; i < madt->cpus; i++) {
		want |= 1ull << madt->apic_ids[i];
		if (madt->apic_ids[i] == self)
			continue;
		smp_start_ap(madt->apic_ids[i]);
		started++;
	}
	smp_wait_for_aps(started, AP_WAIT_SPINS);
	/* A little longer, so that an AP that should not have started is counted. */
	spin_delay(AP_SETTLE_SPINS);
	up = smp_aps_up() + 1;
	ids = smp_ap_ids() | 1ull << self;
	printf("smp: started %u APs by INIT/SIPI: %u cpus up, APIC IDs:", started, up);
	for (unsigned id = 0; id < 64; id++)
		if (ids & (1ull << id))
			printf(" %u", id);
	print("\n");
	guest_expect(F_SMP, "cpus up", up, madt->cpus);
	guest_expect(F_SMP, "apic ids up = the madt's", ids, want);
}

int multiboot_main(u32 magic, const struct multiboot_info *mbi)
{
	struct fw_cfg_values v;
	struct madt_info madt;

	guest_expect(F_MAGIC, "multiboot magic", magic, MULTIBOOT_BOOTLOADER_MAGIC);
	guest_expect(F_MAGIC, "multiboot memory and command line",
		     mbi->flags & (MBI_MEMORY | MBI_CMDLINE), MBI_MEMORY | MBI_CMDLINE);
	check_fw_cfg(&v, mbi);
	check_cmos(&v, mbi);
	find_cpus(&madt, v.cpus);
	start_aps(&madt);
	print("mb_platform: all ok\n");
	return 0;
}
