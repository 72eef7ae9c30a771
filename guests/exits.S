/*
 * Exit-cost benchmark guest (32-bit protected mode, ELF32 and raw binary).
 *
 * It does nothing but cause VM exits, so that (time of run) / (exits) is
 * the cost of one round trip through the VMM. The host picks the work:
 *
 *   N    = inl(0x518)                      1 exit
 *   mode = inl(0x51C)                      1 exit
 *   mode & 1: N times outl(0x510, i)       N exits (port I/O)
 *   mode & 2: N times [0xD0002000] = i     N exits (MMIO)
 *   outw(0x604, 0x2000)                    1 exit, power-off
 *
 * so a run takes exactly 2 + N * popcount(mode & 3) + 1 exits. There is
 * no serial output, which would add exits per byte.
 *
 * The same image also runs as exits.bin (objcopy -O binary) under a small
 * C reference VMM that copies it to 0x100000, sets flat 32-bit segments
 * and jumps to 0x100000. Hence: _start is the first byte of the image,
 * the code is position-dependent only on that load address, and it uses no
 * memory but its own image and a stack in its own .bss; EDI/ESI (vCPU
 * index and count under pyvmm) are ignored. Run it with one vCPU.
 */
#define PORT_N      0x518
#define PORT_MODE   0x51C
#define PORT_PIO    0x510
#define MMIO_TARGET 0xD0002000
#define PM1A_CNT    0x604
#define SLP_EN      0x2000

	.code32
	.section .text.entry, "ax"
	.globl _start
	.type _start, @function
_start:
	/* Nothing below pushes, but ESP = 0 would send any push to the top of
	 * the address space (the MMIO hole); keep the stack in our own .bss. */
	movl $stack_top, %esp

	movw $PORT_N, %dx
	inl %dx, %eax
	movl %eax, %ebx          /* ebx = N */
	movw $PORT_MODE, %dx
	inl %dx, %eax
	movl %eax, %esi          /* esi = mode */

	testl $1, %esi
	jz 2f
	xorl %eax, %eax          /* i = 0 */
	movw $PORT_PIO, %dx
	jmp 1f
0:	outl %eax, %dx
	incl %eax
1:	cmpl %ebx, %eax
	jb 0b

2:	testl $2, %esi
	jz 4f
	xorl %eax, %eax
	jmp 3f
0:	movl %eax, MMIO_TARGET
	incl %eax
3:	cmpl %ebx, %eax
	jb 0b

4:	movw $PM1A_CNT, %dx
	movw $SLP_EN, %ax
	outw %ax, %dx
5:	cli
	hlt
	jmp 5b
	.size _start, . - _start

	.section .bss
	.balign 16
	.skip 4096
stack_top:

	.section .note.GNU-stack, "", @progbits
