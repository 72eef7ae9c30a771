/*
 * fw_cfg through its legacy ports and by DMA (see fwcfg.h).
 */
#include "fwcfg.h"

/* The runtime's own DMA control structure. Its address is what the guest
 * writes to the DMA register, so it must be in RAM below 4 GiB, as .bss is. */
static volatile struct fw_cfg_dma_access dma_access;

void fw_cfg_select(u16 key)
{
	outw(FW_CFG_SELECTOR, key);
}

void fw_cfg_read(void *buf, u32 n)
{
	u8 *p = buf;

	while (n--)
		*p++ = inb(FW_CFG_DATA);
}

u64 fw_cfg_read_le(u16 key, unsigned n)
{
	u8 bytes[8] = { 0 };

	fw_cfg_select(key);
	fw_cfg_read(bytes, n > 8 ? 8 : n);
	return get_le64(bytes);
}

u64 fw_cfg_dma_signature(void)
{
	/* The register is big-endian: inl gives the first port's byte lowest. */
	return (u64)be32(inl(FW_CFG_DMA_HIGH)) << 32 | be32(inl(FW_CFG_DMA_LOW));
}

u32 fw_cfg_dma_at(volatile struct fw_cfg_dma_access *s, u32 control, void *buf, u32 n)
{
	u64 at = (uptr)s;

	s->control = be32(control);
	s->length = be32(n);
	s->address = be64((uptr)buf);
	/* outl sends the low byte first, so swap. Both halves always: a test
	 * counts two exits per transfer, and the high half may be stale. */
	outl(FW_CFG_DMA_HIGH, be32((u32)(at >> 32)));
	outl(FW_CFG_DMA_LOW, be32((u32)at));
	return be32(s->control);
}

u32 fw_cfg_dma(u32 control, void *buf, u32 n)
{
	return fw_cfg_dma_at(&dma_access, control, buf, n);
}

u32 fw_cfg_dma_read(u16 key, void *buf, u32 n)
{
	return fw_cfg_dma((u32)key << 16 | FW_CFG_DMA_SELECT | FW_CFG_DMA_READ, buf, n);
}

int fw_cfg_read_both(u16 key, void *legacy, void *dma, u32 n)
{
	u32 status;

	fw_cfg_select(key);
	fw_cfg_read(legacy, n);
	memset(dma, 0xAA, n);
	status = fw_cfg_dma_read(key, dma, n);
	if (status)
		return (int)status;
	return memcmp(legacy, dma, n) ? FW_CFG_DIFFERENT : 0;
}

/* Whether two NUL-terminated names are the same. */
static int same_name(const char *a, const char *b)
{
	while (*a && *a == *b) {
		a++;
		b++;
	}
	return *a == *b;
}

u16 fw_cfg_find_file(const char *name, u32 *size)
{
	u32 count;
	struct fw_cfg_file file;

	if (fw_cfg_dma_read(FW_CFG_FILE_DIR, &count, sizeof(count)))
		return 0;
	/* Each READ without SELECT goes on where the last one stopped. */
	for (u32 i = be32(count); i; i--) {
		if (fw_cfg_dma(FW_CFG_DMA_READ, &file, sizeof(file)))
			return 0;
		file.name[sizeof(file.name) - 1] = 0;
		if (same_name(file.name, name)) {
			*size = be32(file.size);
			return __builtin_bswap16(file.select);
		}
	}
	return 0;
}
