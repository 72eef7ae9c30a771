/*
 * 32-bit protected-mode entry (ELF32 guests).
 *
 * Same idea as entry64.S: EDI = vCPU index, ESI = vCPU count, ESP = 0, so
 * each vCPU first takes its own 16 KiB slice of a .bss array as stack.
 * The VMM has already loaded flat segments (CS 0x18, data 0x10) and paging
 * is off, so linear = physical and nothing else needs setting up.
 */
#define MAX_CPUS 64
#define STACK_SIZE 16384

	.section .text.entry, "ax"
	.code32
	.globl _start
	.type _start, @function
_start:
	cmpl $MAX_CPUS, %edi
	jae too_many_cpus

	leal 1(%edi), %eax
	shll $14, %eax                   /* log2(STACK_SIZE) */
	leal stacks(%eax), %esp

	/* The i386 calling convention passes arguments on the stack; the
	 * padding keeps esp 16-byte aligned at the call, as gcc assumes. */
	subl $8, %esp
	pushl %esi                       /* ncpus */
	pushl %edi                       /* cpu */
	call guest_main
	addl $16, %esp

	testl %eax, %eax
	jz 1f
	subl $12, %esp
	pushl %eax
	call guest_exit                  /* nonzero: exit status (r << 1) | 1 */
1:	call guest_poweroff              /* zero: clean power-off, status 0 */

too_many_cpus:
	cli
	hlt
	jmp too_many_cpus
	.size _start, . - _start

	.section .bss
	.balign 16
stacks:
	.skip MAX_CPUS * STACK_SIZE

	.section .note.GNU-stack, "", @progbits
