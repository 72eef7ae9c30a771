/*
 * Real-mode hello, in plain assembly (no C runtime: gcc's -m16 output
 * still assumes 32-bit-capable CPUs and flat data, which is not worth it
 * for one line of output).
 *
 * pyvmm runs this with --mode real. For the entry 0x7C00 the ABI gives
 * CS = (0x7C00 >> 4) & 0xF000 = 0 and IP = 0x7C00, and DS = ES = SS = CS,
 * so every segment base is 0 and the link addresses below are the offsets
 * the CPU uses. SP is 0 on entry; the stack is moved into our own .bss.
 */
	.code16
	.section .text.entry, "ax"
	.globl _start
_start:
	cli
	movw $stack_top, %sp

	test %di, %di            /* only vCPU 0 prints */
	jnz halt

	movw $msg, %si
	movw $msg_len, %cx
	cld
next_byte:
	movw $0x3FD, %dx         /* COM1 line status register */
1:	inb %dx, %al
	testb $0x20, %al         /* transmitter holding register empty? */
	jz 1b
	lodsb                    /* al = ds:[si++] */
	movw $0x3F8, %dx
	outb %al, %dx
	loop next_byte

	movw $0x604, %dx         /* ACPI PM1a control: SLP_EN -> power off */
	movw $0x2000, %ax
	outw %ax, %dx
halt:
	cli
	hlt
	jmp halt

	.section .rodata
msg:
	.ascii "Hello from real mode!\n"
	.set msg_len, . - msg

	.section .bss
	.balign 16
	.skip 512
stack_top:

	.section .note.GNU-stack, "", @progbits
