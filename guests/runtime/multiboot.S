/*
 * Multiboot (version 1) header and entry of the multiboot test kernels.
 *
 * The header must lie 4-byte aligned in the image's first 8 KiB: it is the
 * first thing in .text (runtime/multiboot.ld). Built twice:
 *  - plain: an ELF32 image; the boot loader loads it by its program headers.
 *  - with -DAOUT_KLUDGE: flag bit 16 set and the address fields filled in,
 *    so that the image loads from a flat binary (objcopy -O binary) with no
 *    ELF header at all, as a.out kernels did.
 *
 * The boot loader enters at _start in 32-bit protected mode with flat
 * segments, paging and interrupts off, EAX = 0x2BADB002 and EBX = the
 * multiboot information. Nothing else is defined: not ESP, not the GDT.
 */
#define HEADER_MAGIC 0x1BADB002
#define PAGE_ALIGN_MODULES (1 << 0)
#define MEMORY_INFO (1 << 1)
#define ADDRESS_FIELDS (1 << 16)     /* the "a.out kludge" */
#define STACK_SIZE 16384

#ifdef AOUT_KLUDGE
#define HEADER_FLAGS (PAGE_ALIGN_MODULES | MEMORY_INFO | ADDRESS_FIELDS)
#else
#define HEADER_FLAGS (PAGE_ALIGN_MODULES | MEMORY_INFO)
#endif

	.section .multiboot, "a"
	.balign 4
multiboot_header:
	.long HEADER_MAGIC
	.long HEADER_FLAGS
	.long -(HEADER_MAGIC + HEADER_FLAGS)   /* the three sum to 0 mod 2^32 */
#ifdef AOUT_KLUDGE
	.long multiboot_header    /* header_addr: where this header lands */
	.long __image_start       /* load_addr: file offset 0 of the flat image */
	.long __load_end          /* load_end_addr: end of .data, the file's end */
	.long __image_end         /* bss_end_addr: the loader zeroes .bss */
	.long _start              /* entry_addr */
#endif

	.section .text.entry, "ax"
	.code32
	.globl _start
	.type _start, @function
_start:
	movl $stack_top, %esp
	/* Keep the entry state for the kernel to check: nothing before this
	 * line touches EFLAGS or CR0, and EAX/EBX stay as the loader set them. */
	pushfl
	popl entry_eflags
	movl %cr0, %ecx
	movl %ecx, entry_cr0
	/* i386 calling convention: arguments on the stack, esp 16-byte
	 * aligned at the call (the padding), as gcc assumes. */
	subl $8, %esp
	pushl %ebx                       /* struct multiboot_info * */
	pushl %eax                       /* magic */
	call multiboot_main
	addl $16, %esp

	testl %eax, %eax
	jz 1f
	subl $12, %esp
	pushl %eax
	call guest_exit                  /* nonzero: exit status (r << 1) | 1 */
1:	call guest_poweroff              /* zero: clean power-off, status 0 */
	.size _start, . - _start

	.section .bss
	.balign 4
	.globl entry_eflags, entry_cr0
entry_eflags:
	.long 0
entry_cr0:
	.long 0
	.balign 16
stack:
	.skip STACK_SIZE
stack_top:

	.section .note.GNU-stack, "", @progbits
