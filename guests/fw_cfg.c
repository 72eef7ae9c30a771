/*
 * QEMU's fw_cfg device, read the way firmware reads it (QEMU's
 * docs/specs/fw_cfg.rst). Needs the device: pyvmm adds it only when asked
 * (add_fw_cfg in pyvmm/devices/fw_cfg.py).
 *
 * Every value is read twice, through the legacy interface (select with a
 * word write to 0x510, then one byte read of 0x511 per byte: one exit each)
 * and through the DMA interface (one control structure in RAM, its address
 * written big-endian to 0x514/0x518: two exits for any length), and the
 * two must give the same bytes. The host test compares each printed line
 * with what pyvmm says it configured. The port and DMA accesses themselves
 * are runtime/fwcfg.c's, shared with the multiboot kernels.
 */
#include "runtime.h"
#include "fwcfg.h"

#define MAX_FILES 16
#define MAX_E820 8
#define HIGH_RAM 0x100000000ULL /* RAM above 3 GiB continues here */

enum failure {
	FAIL_SIGNATURE = 1,
	FAIL_ID,
	FAIL_DMA_SIGNATURE,
	FAIL_DMA_STATUS,
	FAIL_MISMATCH,
	FAIL_TOO_MANY_FILES,
	FAIL_NO_E820,
	FAIL_E820_SIZE,
	FAIL_PAST_END,
	FAIL_SKIP,
	FAIL_WRITE_ACCEPTED,
};

/* Read buffers: legacy into the first, DMA into the second. */
static u8 legacy_buf[4 + MAX_FILES * sizeof(struct fw_cfg_file)];
static u8 dma_buf[sizeof(legacy_buf)];

static int fail(enum failure code, const char *what, u64 got, u64 want)
{
	printf("FAIL: %s (got %llx, want %llx)\n", what, got, want);
	return code;
}

/* Item key read both ways into legacy_buf and dma_buf; nonzero if they differ. */
static int read_both(u16 key, u32 n, const char *what)
{
	int r = fw_cfg_read_both(key, legacy_buf, dma_buf, n);

	if (r == FW_CFG_DIFFERENT)
		return fail(FAIL_MISMATCH, what, 0, 0);
	if (r)
		return fail(FAIL_DMA_STATUS, what, (u32)r, 0);
	return 0;
}

int guest_main(unsigned cpu, unsigned ncpus)
{
	u8 sig[4];
	int r;

	(void)ncpus;
	if (cpu != 0)
		guest_halt();

	/* Is it there: "QEMU" through the legacy interface, then the features. */
	fw_cfg_select(FW_CFG_SIGNATURE);
	fw_cfg_read(sig, 4);
	if (memcmp(sig, "QEMU", 4))
		return fail(FAIL_SIGNATURE, "signature", get_le32(sig), 0x554d4551);
	u32 id = (u32)fw_cfg_read_le(FW_CFG_ID, 4);
	u32 want = FW_CFG_VERSION | FW_CFG_VERSION_DMA;
	if ((id & want) != want)
		return fail(FAIL_ID, "id: traditional and dma interfaces", id, want);
	/* The DMA address register reads "QEMU CFG", in port order. */
	u64 dma_signature = fw_cfg_dma_signature();
	if (dma_signature != FW_CFG_DMA_SIGNATURE)
		return fail(FAIL_DMA_SIGNATURE, "dma signature", dma_signature,
			    FW_CFG_DMA_SIGNATURE);
	printf("signature QEMU id %x dma signature QEMU CFG\n", id);

	if ((r = read_both(FW_CFG_RAM_SIZE, 8, "ram size")))
		return r;
	u64 ram_size = get_le64(legacy_buf);
	if ((r = read_both(FW_CFG_NB_CPUS, 2, "nb cpus")))
		return r;
	u32 nb_cpus = get_le16(legacy_buf);
	if ((r = read_both(FW_CFG_MAX_CPUS, 2, "max cpus")))
		return r;
	printf("ram_size %016llx nb_cpus %u max_cpus %u\n", ram_size, nb_cpus,
	       get_le16(legacy_buf));

	/* The directory: the count first, as firmware does, then exactly the entries. */
	fw_cfg_select(FW_CFG_FILE_DIR);
	fw_cfg_read(legacy_buf, 4);
	u32 count = (u32)legacy_buf[0] << 24 | (u32)legacy_buf[1] << 16 |
		    (u32)legacy_buf[2] << 8 | legacy_buf[3];
	if (count > MAX_FILES)
		return fail(FAIL_TOO_MANY_FILES, "file count", count, MAX_FILES);
	u32 dir_size = 4 + count * (u32)sizeof(struct fw_cfg_file);
	if ((r = read_both(FW_CFG_FILE_DIR, dir_size, "file directory")))
		return r;
	struct fw_cfg_file files[MAX_FILES];
	memcpy(files, legacy_buf + 4, count * sizeof(struct fw_cfg_file));
	u16 e820_select = 0;
	u32 e820_size = 0;
	for (u32 i = 0; i < count; i++) {
		files[i].name[55] = 0;
		printf("file %04x %u %s\n", __builtin_bswap16(files[i].select),
		       be32(files[i].size), files[i].name);
		if (!memcmp(files[i].name, "etc/e820", 9)) {
			e820_select = __builtin_bswap16(files[i].select);
			e820_size = be32(files[i].size);
		}
	}
	if (!e820_select)
		return fail(FAIL_NO_E820, "etc/e820 in the directory", 0, 1);
	if (!e820_size || e820_size % sizeof(struct fw_cfg_e820_entry) ||
	    e820_size > MAX_E820 * sizeof(struct fw_cfg_e820_entry))
		return fail(FAIL_E820_SIZE, "etc/e820 size", e820_size, 20);

	/* etc/e820 both ways; then the legacy read goes one past the end, which reads 0. */
	if ((r = read_both(e820_select, e820_size, "etc/e820")))
		return r;
	u8 past = inb(FW_CFG_DATA);
	if (past != 0)
		return fail(FAIL_PAST_END, "read past the end", past, 0);
	struct fw_cfg_e820_entry map[MAX_E820];
	memcpy(map, legacy_buf, e820_size);
	for (u32 i = 0; i < e820_size / sizeof(struct fw_cfg_e820_entry); i++)
		printf("e820 %016llx %016llx %u\n", map[i].address, map[i].length, map[i].type);

	/* SKIP: select and step over the first entry, then read the rest. */
	u32 rest = e820_size - (u32)sizeof(struct fw_cfg_e820_entry);
	u32 s1 = fw_cfg_dma((u32)e820_select << 16 | FW_CFG_DMA_SELECT | FW_CFG_DMA_SKIP, 0,
			    sizeof(struct fw_cfg_e820_entry));
	u32 s2 = fw_cfg_dma(FW_CFG_DMA_READ, dma_buf, rest);
	if (s1 || s2 || memcmp(dma_buf, legacy_buf + sizeof(struct fw_cfg_e820_entry), rest))
		return fail(FAIL_SKIP, "dma skip", (u64)s1 << 32 | s2, 0);

	/* Items are read-only: a DMA write must come back with the error bit. */
	u32 s3 = fw_cfg_dma((u32)e820_select << 16 | FW_CFG_DMA_SELECT | FW_CFG_DMA_WRITE,
			    dma_buf, 4);
	if (!(s3 & FW_CFG_DMA_ERROR))
		return fail(FAIL_WRITE_ACCEPTED, "dma write refused", s3, FW_CFG_DMA_ERROR);

	/* With RAM above 4 GiB, a control structure and buffer there use the high half. */
	if (ram_size > 3 * 0x40000000ULL) {
		volatile struct fw_cfg_dma_access *high =
			(volatile struct fw_cfg_dma_access *)(uptr)HIGH_RAM;
		u8 *buf = (u8 *)(uptr)(HIGH_RAM + 64);
		u32 s4 = fw_cfg_dma_at(high,
				       (u32)e820_select << 16 | FW_CFG_DMA_SELECT | FW_CFG_DMA_READ,
				       buf, e820_size);
		if (s4)
			return fail(FAIL_DMA_STATUS, "dma above 4 GiB", s4, 0);
		if (memcmp(buf, legacy_buf, e820_size))
			return fail(FAIL_MISMATCH, "dma above 4 GiB", 0, 0);
		print("dma above 4 GiB ok\n");
	}

	print("dma skip ok, dma write refused\nfw_cfg: all ok\n");
	return 0;
}
