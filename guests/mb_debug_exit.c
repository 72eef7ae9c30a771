/*
 * isa-debug-exit wherever the command line puts it, as QEMU's
 * `-device isa-debug-exit,iobase=P,iosize=S` does (hw/misc/debugexit.c): a
 * write of v to the device's ports, at any offset and of any width, ends the
 * run with status (v << 1) | 1.
 *   pyvmm run mb_debug_exit --device isa-debug-exit,iobase=0x501,iosize=2 \
 *       --append "port=0x502 value=5 width=2"
 *   qemu-system-x86_64 -kernel mb_debug_exit.elf \
 *       -device isa-debug-exit,iobase=0x501,iosize=2 -append "port=0x502 ..."
 * Both end with status 11. The command line's words (anywhere in it, since
 * QEMU puts the kernel's path first): port=N (hex with 0x, or decimal),
 * value=N, width=1|2|4 (default 1). A write that nothing claims returns, and
 * the guest then says so and powers off (status 0).
 */
#include "runtime.h"
#include "multiboot.h"

/* The value N of the word "key=N" in line, or fallback where there is none. */
static u32 word_value(const char *line, const char *key, u32 fallback)
{
	for (const char *s = line; *s; s++) {
		if (s != line && s[-1] != ' ')
			continue;  /* only whole words: "xport=" is not "port=" */
		const char *k = key, *p = s;
		while (*k && *p == *k)
			k++, p++;
		if (*k || *p != '=')
			continue;
		p++;
		u32 base = 10, v = 0;
		if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X'))
			base = 16, p += 2;
		for (;; p++) {
			u32 d;
			if (*p >= '0' && *p <= '9')
				d = *p - '0';
			else if (base == 16 && *p >= 'a' && *p <= 'f')
				d = *p - 'a' + 10;
			else if (base == 16 && *p >= 'A' && *p <= 'F')
				d = *p - 'A' + 10;
			else
				break;
			v = v * base + d;
		}
		return v;
	}
	return fallback;
}

int multiboot_main(u32 magic, const struct multiboot_info *mbi)
{
	if (magic != MULTIBOOT_BOOTLOADER_MAGIC || !(mbi->flags & MBI_CMDLINE)) {
		print("mb_debug_exit: no multiboot command line\n");
		return 1;
	}
	const char *cmdline = (const char *)(uptr)mbi->cmdline;
	u16 port = word_value(cmdline, "port", DEBUG_EXIT_PORT);
	u32 value = word_value(cmdline, "value", 0);
	u32 width = word_value(cmdline, "width", 1);
	printf("mb_debug_exit: writing %u (width %u) to port 0x%x\n", value, width, port);
	if (width == 4)
		outl(port, value);
	else if (width == 2)
		outw(port, value);
	else
		outb(port, value);
	print("mb_debug_exit: the write did not end the run\n");
	return 0;
}
