/*
 * QEMU's fw_cfg device at the x86 ports, as firmware drives it (QEMU's
 * docs/specs/fw_cfg.rst; docs/guest-abi.md, "fw_cfg"). Built for both word
 * sizes: the 64-bit fw_cfg guest and the 32-bit multiboot kernels.
 *
 * Two ways to read an item:
 *  - legacy: a word write of the key to 0x510 selects it and rewinds it,
 *    then each byte read of 0x511 returns the next byte (one exit each);
 *  - DMA: a control structure in RAM {be32 control, be32 length, be64
 *    address}; writing its address big-endian, high half to 0x514, then low
 *    half to 0x518, runs the transfer (two exits for any length). When the
 *    write returns, control is 0, or has FW_CFG_DMA_ERROR set.
 */
#ifndef GUEST_FWCFG_H
#define GUEST_FWCFG_H

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
#define FW_CFG_CMDLINE_SIZE 0x14
#define FW_CFG_CMDLINE_DATA 0x15
#define FW_CFG_FILE_DIR 0x19
#define FW_CFG_VERSION 0x01      /* ID bit 0: the traditional interface */
#define FW_CFG_VERSION_DMA 0x02  /* ID bit 1: the DMA interface */

/* What the DMA address register reads, in port order: "QEMU CFG". */
#define FW_CFG_DMA_SIGNATURE 0x51454d5520434647ULL

#define FW_CFG_DMA_ERROR 0x01
#define FW_CFG_DMA_READ 0x02
#define FW_CFG_DMA_SKIP 0x04
#define FW_CFG_DMA_SELECT 0x08
#define FW_CFG_DMA_WRITE 0x10

/* The DMA control structure: every field big-endian. */
struct fw_cfg_dma_access {
	u32 control;
	u32 length;
	u64 address;
};

/* A file directory entry (after the be32 count), big-endian too. */
struct fw_cfg_file {
	u32 size;
	u16 select;
	u16 reserved;
	char name[56];
};

/* etc/e820: packed little-endian entries. */
struct fw_cfg_e820_entry {
	u64 address;
	u64 length;
	u32 type;
} __attribute__((packed));

static inline u32 be32(u32 v) { return __builtin_bswap32(v); }
static inline u64 be64(u64 v) { return __builtin_bswap64(v); }

/* ---- legacy interface ---- */
void fw_cfg_select(u16 key);
/* n bytes of the selected item, from where the last read stopped. */
void fw_cfg_read(void *buf, u32 n);
/* The first n (<= 8) bytes of item key as a little-endian number. */
u64 fw_cfg_read_le(u16 key, unsigned n);

/* ---- DMA interface ---- */
/* The DMA address register read back: FW_CFG_DMA_SIGNATURE if it is there. */
u64 fw_cfg_dma_signature(void);
/* One operation with the structure at s; returns the final control (host order). */
u32 fw_cfg_dma_at(volatile struct fw_cfg_dma_access *s, u32 control, void *buf, u32 n);
/* The same with the runtime's own structure. */
u32 fw_cfg_dma(u32 control, void *buf, u32 n);
/* Select key and read n bytes of it. */
u32 fw_cfg_dma_read(u16 key, void *buf, u32 n);

/*
 * Read n bytes of item key both ways: through the legacy port into legacy,
 * by DMA into dma (filled with 0xAA first, so a transfer that wrote nothing
 * cannot match). Returns 0 if both gave the same bytes, FW_CFG_DIFFERENT if
 * not, or the DMA's failed control word.
 */
#define FW_CFG_DIFFERENT (-1)
int fw_cfg_read_both(u16 key, void *legacy, void *dma, u32 n);

/* Look a file up in the directory by DMA, entry by entry, as firmware
 * does: its selector and size, or 0 if there is no such file. */
u16 fw_cfg_find_file(const char *name, u32 *size);

#endif
