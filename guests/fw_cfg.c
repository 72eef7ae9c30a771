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
 * with what pyvmm says it configured.
 */
#include "runtime.h"

#define FW_CFG_SELECTOR 0x510
#define FW_CFG_DATA 0x511
#define FW_CFG_DMA_HIGH 0x514   /* most significant half of the address */
#define FW_CFG_DMA_LOW 0x518    /* least significant half: starts the transfer */

/* Selector keys (QEMU's include/standard-headers/linux/qemu_fw_cfg.h). */
#define FW_CFG_SIGNATURE 0x00
#define FW_CFG_ID 0x01
#define FW_CFG_RAM_SIZE 0x03
#define FW_CFG_NB_CPUS 0x05
#define FW_CFG_MAX_CPUS 0x0f
#define FW_CFG_FILE_DIR 0x19
#define FW_CFG_VERSION 0x01      /* ID bit 0: the traditional interface */
#define FW_CFG_VERSION_DMA 0x02  /* ID bit 1: the DMA interface */

#define DMA_CTL_ERROR 0x01
#define DMA_CTL_READ 0x02
#define DMA_CTL_SKIP 0x04
#define DMA_CTL_SELECT 0x08
#define DMA_CTL_WRITE 0x10

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

/* The DMA control structure: every field big-endian. */
struct dma_access {
	u32 control;
	u32 length;
	u64 address;
};

/* Directory entry, also big-endian. */
struct file_entry {
	u32 size;
	u16 select;
	u16 reserved;
	char name[56];
};

struct e820_entry {
	u64 address;
	u64 length;
	u32 type;
} __attribute__((packed));

static volatile struct dma_access dma;
/* Read buffers: legacy into the first, DMA into the second. */
static u8 legacy_buf[4 + MAX_FILES * sizeof(struct file_entry)];
static u8 dma_buf[sizeof(legacy_buf)];

static u32 be32(u32 v) { return __builtin_bswap32(v); }
static u64 be64(u64 v) { return __builtin_bswap64(v); }

static int fail(enum failure code, const char *what, u64 got, u64 want)
{
	printf("FAIL: %s (got %llx, want %llx)\n", what, got, want);
	return code;
}

static int same(const void *a, const void *b, u32 n)
{
	const u8 *x = a, *y = b;

	for (u32 i = 0; i < n; i++)
		if (x[i] != y[i])
			return 0;
	return 1;
}

static void legacy_select(u16 key)
{
	outw(FW_CFG_SELECTOR, key);
}

/* n bytes of the selected item from where the last read stopped. */
static void legacy_read(void *buf, u32 n)
{
	u8 *p = buf;

	while (n--)
		*p++ = inb(FW_CFG_DATA);
}

/* Run one DMA operation with the structure at s; returns its final control. */
static u32 dma_run(volatile struct dma_access *s, u32 control, void *buf, u32 n)
{
	u64 at = (uptr)s;

	s->control = be32(control);
	s->length = be32(n);
	s->address = be64((uptr)buf);
	/* The register is big-endian: outl sends the low byte first, so swap. */
	outl(FW_CFG_DMA_HIGH, be32((u32)(at >> 32)));
	outl(FW_CFG_DMA_LOW, be32((u32)at));
	return be32(s->control);
}

static u32 dma_read(u16 key, void *buf, u32 n)
{
	return dma_run(&dma, (u32)key << 16 | DMA_CTL_SELECT | DMA_CTL_READ, buf, n);
}

/* Item key read both ways into legacy_buf and dma_buf; nonzero if they differ. */
static int read_both(u16 key, u32 n, const char *what)
{
	u32 status;

	legacy_select(key);
	legacy_read(legacy_buf, n);
	memset(dma_buf, 0xAA, n);
	status = dma_read(key, dma_buf, n);
	if (status)
		return fail(FAIL_DMA_STATUS, what, status, 0);
	if (!same(legacy_buf, dma_buf, n))
		return fail(FAIL_MISMATCH, what, 0, 0);
	return 0;
}

static u64 le(const u8 *p, unsigned n)
{
	u64 v = 0;

	while (n--)
		v = v << 8 | p[n];
	return v;
}

int guest_main(unsigned cpu, unsigned ncpus)
{
	u8 sig[4];
	int r;

	(void)ncpus;
	if (cpu != 0)
		guest_halt();

	/* Is it there: "QEMU" through the legacy interface, then the features. */
	legacy_select(FW_CFG_SIGNATURE);
	legacy_read(sig, 4);
	if (!same(sig, "QEMU", 4))
		return fail(FAIL_SIGNATURE, "signature", le(sig, 4), 0x554d4551);
	legacy_select(FW_CFG_ID);
	legacy_read(sig, 4);
	u32 id = (u32)le(sig, 4);
	u32 want = FW_CFG_VERSION | FW_CFG_VERSION_DMA;
	if ((id & want) != want)
		return fail(FAIL_ID, "id: traditional and dma interfaces", id, want);
	/* The DMA address register reads "QEMU CFG", in port order. */
	u32 hi = be32(inl(FW_CFG_DMA_HIGH)), lo = be32(inl(FW_CFG_DMA_LOW));
	if (hi != 0x51454d55 || lo != 0x20434647)
		return fail(FAIL_DMA_SIGNATURE, "dma signature", (u64)hi << 32 | lo,
			    0x51454d5520434647ULL);
	printf("signature QEMU id %x dma signature QEMU CFG\n", id);

	if ((r = read_both(FW_CFG_RAM_SIZE, 8, "ram size")))
		return r;
	u64 ram_size = le(legacy_buf, 8);
	if ((r = read_both(FW_CFG_NB_CPUS, 2, "nb cpus")))
		return r;
	u32 nb_cpus = (u32)le(legacy_buf, 2);
	if ((r = read_both(FW_CFG_MAX_CPUS, 2, "max cpus")))
		return r;
	printf("ram_size %016llx nb_cpus %u max_cpus %u\n", ram_size, nb_cpus,
	       (u32)le(legacy_buf, 2));

	/* The directory: the count first, as firmware does, then exactly the entries. */
	legacy_select(FW_CFG_FILE_DIR);
	legacy_read(legacy_buf, 4);
	u32 count = (u32)legacy_buf[0] << 24 | (u32)legacy_buf[1] << 16 |
		    (u32)legacy_buf[2] << 8 | legacy_buf[3];
	if (count > MAX_FILES)
		return fail(FAIL_TOO_MANY_FILES, "file count", count, MAX_FILES);
	u32 dir_size = 4 + count * (u32)sizeof(struct file_entry);
	if ((r = read_both(FW_CFG_FILE_DIR, dir_size, "file directory")))
		return r;
	struct file_entry files[MAX_FILES];
	memcpy(files, legacy_buf + 4, count * sizeof(struct file_entry));
	u16 e820_select = 0;
	u32 e820_size = 0;
	for (u32 i = 0; i < count; i++) {
		files[i].name[55] = 0;
		printf("file %04x %u %s\n", __builtin_bswap16(files[i].select),
		       be32(files[i].size), files[i].name);
		if (same(files[i].name, "etc/e820", 9)) {
			e820_select = __builtin_bswap16(files[i].select);
			e820_size = be32(files[i].size);
		}
	}
	if (!e820_select)
		return fail(FAIL_NO_E820, "etc/e820 in the directory", 0, 1);
	if (!e820_size || e820_size % sizeof(struct e820_entry) ||
	    e820_size > MAX_E820 * sizeof(struct e820_entry))
		return fail(FAIL_E820_SIZE, "etc/e820 size", e820_size, 20);

	/* etc/e820 both ways; then the legacy read goes one past the end, which reads 0. */
	if ((r = read_both(e820_select, e820_size, "etc/e820")))
		return r;
	u8 past = inb(FW_CFG_DATA);
	if (past != 0)
		return fail(FAIL_PAST_END, "read past the end", past, 0);
	struct e820_entry map[MAX_E820];
	memcpy(map, legacy_buf, e820_size);
	for (u32 i = 0; i < e820_size / sizeof(struct e820_entry); i++)
		printf("e820 %016llx %016llx %u\n", map[i].address, map[i].length, map[i].type);

	/* SKIP: select and step over the first entry, then read the rest. */
	u32 rest = e820_size - (u32)sizeof(struct e820_entry);
	u32 s1 = dma_run(&dma, (u32)e820_select << 16 | DMA_CTL_SELECT | DMA_CTL_SKIP, 0,
			 sizeof(struct e820_entry));
	u32 s2 = dma_run(&dma, DMA_CTL_READ, dma_buf, rest);
	if (s1 || s2 || !same(dma_buf, legacy_buf + sizeof(struct e820_entry), rest))
		return fail(FAIL_SKIP, "dma skip", (u64)s1 << 32 | s2, 0);

	/* Items are read-only: a DMA write must come back with the error bit. */
	u32 s3 = dma_run(&dma, (u32)e820_select << 16 | DMA_CTL_SELECT | DMA_CTL_WRITE, dma_buf, 4);
	if (!(s3 & DMA_CTL_ERROR))
		return fail(FAIL_WRITE_ACCEPTED, "dma write refused", s3, DMA_CTL_ERROR);

	/* With RAM above 4 GiB, a control structure and buffer there use the high half. */
	if (ram_size > 3 * 0x40000000ULL) {
		volatile struct dma_access *high = (volatile struct dma_access *)(uptr)HIGH_RAM;
		u8 *buf = (u8 *)(uptr)(HIGH_RAM + 64);
		u32 s4 = dma_run(high, (u32)e820_select << 16 | DMA_CTL_SELECT | DMA_CTL_READ,
				 buf, e820_size);
		if (s4)
			return fail(FAIL_DMA_STATUS, "dma above 4 GiB", s4, 0);
		if (!same(buf, legacy_buf, e820_size))
			return fail(FAIL_MISMATCH, "dma above 4 GiB", 0, 0);
		print("dma above 4 GiB ok\n");
	}

	print("dma skip ok, dma write refused\nfw_cfg: all ok\n");
	return 0;
}
