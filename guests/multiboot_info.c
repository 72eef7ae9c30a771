/*
 * Multiboot information check: prints everything the boot loader handed
 * over, then checks that it is self-consistent, so a host test can compare
 * the output with what the loader should have built.
 *
 * Booted as QEMU's -kernel boots a multiboot kernel (runtime/multiboot.S):
 *   pyvmm run multiboot_info --append "a b" --initrd "m1 x y,m2"
 *   qemu-system-x86_64 -kernel multiboot_info.elf -append "a b" -initrd "m1 x y,m2"
 *
 * Output, one item per line (numbers in hex unless the name says KiB):
 *   magic M, info at A, entry cr0/eflags, flags F, mem_lower/mem_upper, boot_device,
 *   cmdline "..", boot_loader_name "..", one "mmap BASE LENGTH TYPE" per
 *   entry, "mods N", one "mod I START END "string" fnv1a H first line "..""
 *   per module, then "memory info matches the map" and "layout ok", or a
 *   "FAIL: ..." line and a nonzero exit.
 */
#include "runtime.h"
#include "multiboot.h"

#define PAGE_SIZE 4096u
#define MAX_SHOWN 200      /* longest string printed: a bad pointer stays short */
#define MBI_SIZE 88        /* the fields up to the VBE ones, as QEMU writes them */

enum failure {
	BAD_MAGIC = 1,
	BAD_ENTRY_STATE,
	MISSING_FIELDS,
	BAD_MEMORY_INFO,
	BAD_LAYOUT,
};

/* Print a NUL-terminated string of guest memory, at most MAX_SHOWN bytes. */
static void print_string(u32 address)
{
	const char *s = (const char *)(uptr)address;

	serial_putc('"');
	for (unsigned i = 0; i < MAX_SHOWN && s[i]; i++)
		serial_putc(s[i]);
	serial_putc('"');
}

static u32 string_length(u32 address)
{
	const char *s = (const char *)(uptr)address;
	u32 n = 0;

	while (s[n])
		n++;
	return n;
}

/* FNV-1a, 32-bit: the host test computes the same over the module file, so
 * every byte of every module is checked, not only the line printed. */
static u32 fnv1a(const u8 *p, u32 n)
{
	u32 h = 2166136261u;

	while (n--) {
		h ^= *p++;
		h *= 16777619u;
	}
	return h;
}

static void print_first_line(u32 start, u32 end)
{
	const char *p = (const char *)(uptr)start;
	u32 n = 0;

	serial_putc('"');
	while (start + n < end && n < MAX_SHOWN && p[n] != '\n')
		serial_putc(p[n++]);
	serial_putc('"');
}

static int overlaps(u64 a, u64 a_len, u64 b, u64 b_len)
{
	return a < b + b_len && b < a + a_len;
}

static const struct multiboot_info *info;

/* Whether [address, address + length) lies in one usable memory map range. */
static int in_usable_ram(u64 address, u64 length)
{
	u32 offset = 0;

	while (offset < info->mmap_length) {
		const struct multiboot_mmap_entry *e =
			(const void *)(uptr)(info->mmap_addr + offset);
		if (e->type == MULTIBOOT_MEMORY_AVAILABLE && e->addr <= address &&
		    address + length <= e->addr + e->len)
			return 1;
		offset += e->size + 4;
	}
	return 0;
}

/* End of the usable range that contains address, or address if none does. */
static u64 usable_end(u64 address)
{
	u32 offset = 0;

	while (offset < info->mmap_length) {
		const struct multiboot_mmap_entry *e =
			(const void *)(uptr)(info->mmap_addr + offset);
		if (e->type == MULTIBOOT_MEMORY_AVAILABLE && e->addr <= address &&
		    address < e->addr + e->len)
			return e->addr + e->len;
		offset += e->size + 4;
	}
	return address;
}

/* One piece of boot information: it must be in usable RAM, clear of the
 * kernel image. Returns 0 if it is not, after saying why. */
static int check_piece(const char *what, u32 address, u32 length)
{
	u32 image = (u32)(uptr)__image_start;
	u32 image_len = (u32)(uptr)__image_end - image;

	if (overlaps(address, length, image, image_len)) {
		printf("FAIL: %s [%08x, %08x) overlaps the kernel [%08x, %08x)\n", what, address,
		       address + length, image, image + image_len);
		return 0;
	}
	if (!in_usable_ram(address, length)) {
		printf("FAIL: %s [%08x, %08x) is not in usable RAM\n", what, address,
		       address + length);
		return 0;
	}
	return 1;
}

static int check_layout(void)
{
	const struct multiboot_module *mods = (const void *)(uptr)info->mods_addr;
	int ok = check_piece("info", (u32)(uptr)info, MBI_SIZE) &&
		 check_piece("mmap", info->mmap_addr, info->mmap_length) &&
		 check_piece("cmdline", info->cmdline, string_length(info->cmdline) + 1) &&
		 check_piece("boot_loader_name", info->boot_loader_name,
			     string_length(info->boot_loader_name) + 1) &&
		 check_piece("mods", info->mods_addr, info->mods_count * sizeof(*mods));

	for (u32 i = 0; ok && i < info->mods_count; i++) {
		const struct multiboot_module *m = &mods[i];

		ok = check_piece("module", m->mod_start, m->mod_end - m->mod_start) &&
		     check_piece("module string", m->string, string_length(m->string) + 1);
		if (ok && m->mod_start % PAGE_SIZE) {
			printf("FAIL: module %u at %08x is not page-aligned\n", i, m->mod_start);
			ok = 0;
		}
		for (u32 j = 0; ok && j < i; j++)
			if (overlaps(m->mod_start, m->mod_end - m->mod_start, mods[j].mod_start,
				     mods[j].mod_end - mods[j].mod_start)) {
				printf("FAIL: modules %u and %u overlap\n", j, i);
				ok = 0;
			}
		if (ok && (overlaps(m->mod_start, m->mod_end - m->mod_start, (uptr)info, MBI_SIZE) ||
			   overlaps(m->mod_start, m->mod_end - m->mod_start, info->mmap_addr,
				    info->mmap_length))) {
			printf("FAIL: module %u overlaps the boot information\n", i);
			ok = 0;
		}
	}
	return ok;
}

int multiboot_main(u32 magic, const struct multiboot_info *mbi)
{
	const u32 needed = MBI_MEMORY | MBI_CMDLINE | MBI_MODS | MBI_MMAP | MBI_BOOT_LOADER_NAME;

	printf("magic %08x\n", magic);
	if (magic != MULTIBOOT_BOOTLOADER_MAGIC) {
		print("FAIL: magic\n");
		return BAD_MAGIC;
	}
	info = mbi;
	printf("info at %08x\n", (u32)(uptr)mbi);
	/* The spec's machine state: protected mode (CR0.PE), paging off
	 * (CR0.PG), interrupts off (EFLAGS.IF), not virtual-8086 (EFLAGS.VM). */
	printf("entry cr0 %08x eflags %08x\n", entry_cr0, entry_eflags);
	if (!(entry_cr0 & 1) || (entry_cr0 & 0x80000000u) || (entry_eflags & 0x20200)) {
		print("FAIL: entry state\n");
		return BAD_ENTRY_STATE;
	}
	printf("flags %08x\n", mbi->flags);
	if ((mbi->flags & needed) != needed) {
		printf("FAIL: flags lack %08x\n", needed & ~mbi->flags);
		return MISSING_FIELDS;
	}
	printf("mem_lower %u KiB\n", mbi->mem_lower);
	printf("mem_upper %u KiB\n", mbi->mem_upper);
	if (mbi->flags & MBI_BOOT_DEVICE)
		printf("boot_device %08x\n", mbi->boot_device);
	print("cmdline ");
	print_string(mbi->cmdline);
	print("\nboot_loader_name ");
	print_string(mbi->boot_loader_name);
	print("\n");

	for (u32 offset = 0; offset < mbi->mmap_length;) {
		const struct multiboot_mmap_entry *e = (const void *)(uptr)(mbi->mmap_addr + offset);

		printf("mmap %016llx %016llx %u\n", e->addr, e->len, e->type);
		offset += e->size + 4;
	}

	const struct multiboot_module *mods = (const void *)(uptr)mbi->mods_addr;

	printf("mods %u\n", mbi->mods_count);
	for (u32 i = 0; i < mbi->mods_count; i++) {
		const struct multiboot_module *m = &mods[i];

		printf("mod %u %08x %08x ", i, m->mod_start, m->mod_end);
		print_string(m->string);
		printf(" fnv1a %08x first line ",
		       fnv1a((const u8 *)(uptr)m->mod_start, m->mod_end - m->mod_start));
		print_first_line(m->mod_start, m->mod_end);
		print("\n");
	}

	/* mem_lower and mem_upper must agree with the map: the usable RAM
	 * from 0, and from 1 MiB up to the first hole. */
	if ((u64)mbi->mem_lower * 1024 != usable_end(0) ||
	    (u64)mbi->mem_upper * 1024 + 0x100000 != usable_end(0x100000)) {
		print("FAIL: mem_lower/mem_upper do not match the memory map\n");
		return BAD_MEMORY_INFO;
	}
	print("memory info matches the map\n");

	if (!check_layout())
		return BAD_LAYOUT;
	print("layout ok\n");
	return 0;
}
