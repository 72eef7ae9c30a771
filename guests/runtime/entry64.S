/*
 * Long-mode entry (ELF64 guests).
 *
 * pyvmm starts every vCPU here at once with RDI = vCPU index, RSI = vCPU
 * count and RSP = 0 (docs/guest-abi.md). So the first job is a stack, and
 * it must be a different one per vCPU: index i gets the i-th 16 KiB slice
 * of a .bss array, which needs no locking because the index alone picks it.
 */
#define MAX_CPUS 64
#define STACK_SIZE 16384

	.section .text.entry, "ax"
	.code64
	.globl _start
	.type _start, @function
_start:
	cmpq $MAX_CPUS, %rdi
	jae too_many_cpus

	/* rsp = stacks + (index + 1) * STACK_SIZE: the top of slice i. */
	leaq 1(%rdi), %rax
	shlq $14, %rax                   /* log2(STACK_SIZE) */
	leaq stacks(%rip), %rsp
	addq %rax, %rsp
	/* rsp is 16-byte aligned here, as the SysV ABI wants before a call. */

	/* guest_main(cpu, ncpus): the arguments already sit in RDI and RSI,
	 * which is why the ABI passes them there. */
	call guest_main

	testl %eax, %eax
	jz 1f
	movl %eax, %edi
	call guest_exit                  /* nonzero: exit status (r << 1) | 1 */
1:	call guest_poweroff              /* zero: clean power-off, status 0 */

too_many_cpus:
	/* No stack to run C on. Stay out of the way of the vCPUs that have one. */
	cli
	hlt
	jmp too_many_cpus
	.size _start, . - _start

	.section .bss
	.balign 16
stacks:
	.skip MAX_CPUS * STACK_SIZE

	.section .note.GNU-stack, "", @progbits
