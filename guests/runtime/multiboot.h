/*
 * Multiboot (version 1) for the multiboot test kernels: the structures a
 * boot loader hands over (Multiboot Specification 0.6.96, section 3.3) and
 * the entry point that runtime/multiboot.S calls.
 *
 * These kernels are booted the way QEMU's -kernel boots them: 32-bit
 * protected mode, paging off, EAX = MULTIBOOT_BOOTLOADER_MAGIC and EBX =
 * the physical address of struct multiboot_info. Only the boot CPU runs.
 */
#ifndef GUEST_MULTIBOOT_H
#define GUEST_MULTIBOOT_H

#include "runtime.h"

#define MULTIBOOT_BOOTLOADER_MAGIC 0x2BADB002

/* multiboot_info.flags: which fields the boot loader filled in. */
#define MBI_MEMORY (1u << 0)       /* mem_lower, mem_upper */
#define MBI_BOOT_DEVICE (1u << 1)
#define MBI_CMDLINE (1u << 2)
#define MBI_MODS (1u << 3)
#define MBI_MMAP (1u << 6)
#define MBI_BOOT_LOADER_NAME (1u << 9)

struct multiboot_info {
	u32 flags;
	u32 mem_lower;     /* KiB of RAM from 0 */
	u32 mem_upper;     /* KiB of RAM from 1 MiB to the first hole */
	u32 boot_device;
	u32 cmdline;       /* physical address of a NUL-terminated string */
	u32 mods_count;
	u32 mods_addr;     /* physical address of mods_count struct multiboot_module */
	u32 syms[4];
	u32 mmap_length;   /* bytes of memory map */
	u32 mmap_addr;
	u32 drives_length;
	u32 drives_addr;
	u32 config_table;
	u32 boot_loader_name;
	u32 apm_table;
};

struct multiboot_module {
	u32 mod_start;
	u32 mod_end;       /* one past the module's last byte */
	u32 string;        /* the module's command line */
	u32 reserved;
};

/* One memory map entry. size counts the bytes after itself (20 here), so
 * the next entry is at (char *)entry + entry->size + 4. */
struct multiboot_mmap_entry {
	u32 size;
	u64 addr;
	u64 len;
	u32 type;          /* 1: usable RAM; anything else: not */
} __attribute__((packed));

#define MULTIBOOT_MEMORY_AVAILABLE 1

/* Provided by each multiboot kernel. Returning 0 powers off, anything else
 * r exits with status (r << 1) | 1, as guest_main does for ELF guests. */
int multiboot_main(u32 magic, const struct multiboot_info *mbi);

/* The image's extent, from runtime/multiboot.ld: what the boot loader must
 * not have put anything on. */
extern char __image_start[], __image_end[];

/* EFLAGS and CR0 as the boot loader left them, saved by _start. */
extern u32 entry_eflags, entry_cr0;

#endif
