/*
 * pyvmm-fw: pyvmm's own firmware, the path from the reset vector to a kernel.
 *
 * `pyvmm run --firmware KERNEL` maps this image (64 KiB) at the top of the
 * first 4 GiB and leaves the boot CPU in the state a CPU comes out of reset
 * in: real mode, CS base 0xFFFF0000, IP 0xFFF0, so the first instruction it
 * runs is the one at 0xFFFFFFF0, the reset vector at the end of this file.
 * From there:
 *
 *  1. real mode (16-bit): load a GDT and switch to protected mode;
 *  2. protected mode (32-bit): enable the MTRRs, build an identity map of the
 *     first 4 GiB, enable long mode;
 *  3. long mode (64-bit): find the file etc/pyvmm/boot in fw_cfg, read it,
 *     copy each piece of the kernel it lists to its address with fw_cfg DMA,
 *     extend the identity map to what the kernel gets, write the kernel's GDT;
 *  4. enter the kernel with its boot protocol's entry state: pyvmm's ELF ABI
 *     (long or protected mode), multiboot (protected mode, paging off) or
 *     Linux's 64-bit boot protocol. For protected mode the firmware leaves
 *     long mode again.
 *
 * pyvmm loaded and prepared the kernel (multiboot information, zero page...)
 * exactly as for a direct boot, but published it in fw_cfg instead of
 * writing it into guest RAM; firmware/README.md describes the boot record,
 * and docs/guest-abi.md ("Firmware") what a kernel finds.
 *
 * Several CPUs run this code only for pyvmm's ELF ABI, which starts every
 * vCPU at the entry at once: they all come out of reset here, the boot CPU
 * (APIC ID 0) does the work and the others wait for its "go" in RAM.
 * Multiboot and Linux kernels start the other CPUs themselves (INIT/SIPI).
 *
 * Any exception in here is a triple fault (there is no IDT), which ends the
 * run with pyvmm's status 8 and a register dump; a missing or bad boot
 * record is said on COM1 first.
 */

#define ROM_BASE 0xFFFF0000

/* Selectors of the firmware's GDT: pyvmm's boot GDT (docs/guest-abi.md). */
#define CODE64 0x08
#define DATA 0x10
#define CODE32 0x18
/* Linux's 64-bit boot protocol wants __BOOT_CS 0x10 and __BOOT_DS 0x18. */
#define LINUX_CS 0x10
#define LINUX_DS 0x18

#define CR0_PE 0x00000001
#define CR0_MP 0x00000002
#define CR0_NE 0x00000020
#define CR0_WP 0x00010000
#define CR0_NW 0x20000000
#define CR0_CD 0x40000000
#define CR0_PG 0x80000000
#define CR4_PAE 0x020
#define CR4_OSFXSR 0x200
#define CR4_OSXMMEXCPT 0x400
#define MSR_EFER 0xC0000080
#define EFER_LME 0x100
#define MSR_MTRR_DEF_TYPE 0x2FF
#define MTRR_ON_WRITE_BACK 0xC06   /* MTRRs and fixed MTRRs on, default WB */

#define PAGE_PRESENT_WRITE 0x03
#define PAGE_HUGE 0x80             /* a 2 MiB page in a page directory */
#define TWO_MIB 0x200000

/* fw_cfg, as QEMU's docs/specs/fw_cfg.rst describes it. */
#define FW_CFG_DMA_HIGH 0x514      /* big-endian, high half of the address */
#define FW_CFG_DMA_LOW 0x518       /* low half: writing it runs the transfer */
#define FW_CFG_FILE_DIR 0x19
#define DMA_ERROR 0x01
#define DMA_READ 0x02
#define DMA_SELECT 0x08
#define QEMU_LE 0x554D4551         /* "QEMU", read as a little-endian dword */

#define COM1 0x3F8
#define COM1_LSR 0x3FD
#define LSR_THRE 0x20              /* transmit holding register empty */

/*
 * RAM the firmware uses (all of it below the kernel's 1 MiB, and none of it
 * where a boot protocol puts anything): the "boot page" 0x1000-0x1FFF,
 * which the direct path uses for its GDT too, and the identity map from
 * 0x2000, where the direct path builds the same tables.
 */
#define KERNEL_GDT_DEFAULT 0x1000  /* where the record usually puts the GDT */
#define DMA_ACCESS 0x1020          /* FWCfgDmaAccess {be32 control, length; be64 address} */
#define KERNEL_GDTR 0x1030         /* the kernel's GDT pseudo-descriptor: u16 limit, u64 base */
#define GO_FLAG 0x1040             /* the boot CPU writes GO here when the kernel is loaded */
#define GO 0x474F                  /* "GO" */
#define DIRENT 0x1080              /* one fw_cfg directory entry, 64 bytes */
#define RECORD 0x1100              /* the boot record, up to RECORD_END */
#define RECORD_END 0x1F00
#define STACK_TOP 0x2000           /* the boot CPU's stack: 0x1F00-0x1FFF */
#define PML4 0x2000
#define PDPT 0x3000
#define PD 0x4000                  /* one page directory per GiB from here */

/* The boot record, etc/pyvmm/boot (pyvmm/firmware.py writes it). */
#define R_MAGIC 0                  /* "PYVMBOOT" */
#define R_PROTOCOL 8               /* u8: 0 ELF ABI, 1 multiboot, 2 Linux */
#define R_MODE 9                   /* u8: 0 long mode, 1 protected mode */
#define R_COUNT 10                 /* u16: blobs that follow the header */
#define R_MAP_GIB 12               /* u32: GiB the kernel's identity map covers */
#define R_GDT 16                   /* u32: where the kernel's GDT goes */
#define R_ENTRY 24                 /* u64 each: entry point and registers */
#define R_RAX 32
#define R_RBX 40
#define R_RSI 48
#define R_BLOBS 64                 /* {u64 address, u32 length, u16 select, u16 0} */
#define BLOB_SIZE 16
#define PROTOCOL_LINUX 2
#define MODE_PROTECTED 1

/* ------------------------------------------------------------------------
 * 1. Real mode. CS.base is 0xFFFF0000 (not CS << 4, as it will be after
 * the first far jump), so this 64 KiB segment is the ROM: every address
 * below is an offset into it, and there is no far jump until protected
 * mode. The segment is 64 KiB, so the linker puts this code right below
 * the reset vector, within reach of its 16-bit near jump.
 */
	.section .text16, "ax"
	.code16
reset:
	cli                         /* already clear at reset: say so */
	cld
	/* An IDT of limit 0: any exception from here on, firmware or kernel,
	 * is a triple fault, which pyvmm reports (the direct path's IDT too). */
	lidtl %cs:(idt_none - ROM_BASE)
	/* The GDT lives in the ROM. lgdtl (32-bit operand) loads all 32 bits
	 * of its base; a 16-bit lgdt would keep only 24. */
	lgdtl %cs:(gdt_rom - ROM_BASE)
	/* Protected mode, and caches on: reset leaves CR0 = CD|NW|ET. MP and
	 * NE are what the direct path sets (FPU errors as exceptions). */
	movl %cr0, %eax
	andl $~(CR0_CD | CR0_NW), %eax
	orl $(CR0_PE | CR0_MP | CR0_NE), %eax
	movl %eax, %cr0
	/* The far jump loads CS from the GDT: flat 32-bit code, base 0. */
	ljmpl $CODE32, $start32

/* ------------------------------------------------------------------------
 * 2. Protected mode, paging off: linear = physical, RAM and ROM alike.
 */
	.section .text, "ax"
	.code32
start32:
	movl $DATA, %eax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movw %ax, %fs
	movw %ax, %gs

	/* At reset the MTRRs are off and all memory is uncached. Firmware
	 * turns them on, default type write-back (each CPU has its own). */
	movl $MSR_MTRR_DEF_TYPE, %ecx
	movl $MTRR_ON_WRITE_BACK, %eax
	xorl %edx, %edx
	wrmsr

	/* Which CPU is this? CPUID leaf 1 gives the APIC ID in EBX[31:24];
	 * pyvmm numbers vCPUs by it, and 0 is the boot CPU. */
	movl $1, %eax
	cpuid
	shrl $24, %ebx
	jnz wait_for_go

	/* The boot CPU builds the identity map of [0, 4 GiB) that long mode
	 * needs: RAM, this ROM at its top, and nothing more. 2 MiB pages, so
	 * one PML4 entry, four PDPT entries and four page directories.
	 * Fresh RAM is zero, but write both halves of each entry anyway. */
	movl $(PDPT | PAGE_PRESENT_WRITE), PML4
	movl $0, PML4 + 4
	movl $PDPT, %edi
	movl $(PD | PAGE_PRESENT_WRITE), %eax
	movl $4, %ecx
1:	movl %eax, (%edi)           /* PDPT[g] -> the page directory of GiB g */
	movl $0, 4(%edi)
	addl $4096, %eax
	addl $8, %edi
	loop 1b
	/* The four page directories follow each other, so their 2048 entries
	 * form one array: entry i maps the 2 MiB at i * 2 MiB. */
	movl $PD, %edi
	movl $(PAGE_HUGE | PAGE_PRESENT_WRITE), %eax
	movl $(4 * 512), %ecx
2:	movl %eax, (%edi)
	movl $0, 4(%edi)
	addl $TWO_MIB, %eax
	addl $8, %edi
	loop 2b

enable_long_mode:
	/* Long mode is PAE paging plus EFER.LME, switched on by CR0.PG. The
	 * CR4 bits besides PAE are the direct path's (SSE usable). */
	movl $(CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT), %eax
	movl %eax, %cr4
	movl $PML4, %eax
	movl %eax, %cr3
	movl $MSR_EFER, %ecx
	rdmsr
	orl $EFER_LME, %eax
	wrmsr
	movl %cr0, %eax
	orl $(CR0_PG | CR0_WP), %eax
	movl %eax, %cr0
	/* Now in compatibility mode; the far jump to a 64-bit segment makes
	 * it 64-bit mode. */
	ljmp $CODE64, $start64

wait_for_go:
	/* The other CPUs (ELF ABI only) wait until the boot CPU has built the
	 * page tables and loaded the kernel, then follow it into long mode.
	 * No HLT: nothing would wake them, and pyvmm ends a run whose vCPUs
	 * all halt with interrupts off. */
	pause
	cmpl $GO, GO_FLAG
	jne wait_for_go
	jmp enable_long_mode

/* ------------------------------------------------------------------------
 * 3. Long mode: find the kernel through fw_cfg.
 */
	.code64
start64:
	movl $1, %eax
	cpuid
	shrl $24, %ebx
	jnz enter_kernel            /* another CPU: the boot CPU did the rest */
	movl $STACK_TOP, %esp

	/* The fw_cfg DMA address register reads "QEMU CFG" when DMA is there
	 * (one exit, where checking the signature and ID items is three). */
	movw $FW_CFG_DMA_HIGH, %dx
	inl %dx, %eax
	cmpl $QEMU_LE, %eax
	jne no_fw_cfg

	/* Find etc/pyvmm/boot in the file directory: a be32 count, then one
	 * 64-byte entry per file {be32 size, be16 select, be16, name[56]}.
	 * Select the directory and read the count; then each further read
	 * (without SELECT) continues where the last one stopped, so one
	 * 64-byte buffer does for any number of files. */
	movl $(FW_CFG_FILE_DIR << 16 | DMA_SELECT | DMA_READ), %edi
	movl $4, %esi
	movl $DIRENT, %edx
	call fw_cfg_dma
	movl DIRENT, %r12d
	bswapl %r12d                /* fw_cfg's directory is big-endian */
next_file:
	testl %r12d, %r12d
	jz no_boot_file
	decl %r12d
	movl $DMA_READ, %edi
	movl $64, %esi
	movl $DIRENT, %edx
	call fw_cfg_dma
	leaq boot_file_name(%rip), %rsi
	movl $(DIRENT + 8), %edi
	movl $boot_file_name_size, %ecx   /* the name and its NUL */
	repe cmpsb
	jne next_file

	/* Read the whole record (its size is in the entry) into RAM. */
	movl DIRENT, %esi
	bswapl %esi                 /* size */
	cmpl $(RECORD_END - RECORD), %esi
	ja bad_record
	movzwl DIRENT + 4, %edi
	rolw $8, %di                /* select, big-endian */
	shll $16, %edi
	orl $(DMA_SELECT | DMA_READ), %edi
	movl $RECORD, %edx
	call fw_cfg_dma
	/* Check it is a record this firmware knows, and holds its blobs. */
	movabsq $0x544F4F424D565950, %rax   /* "PYVMBOOT" */
	cmpq %rax, RECORD + R_MAGIC
	jne bad_record
	movzwl RECORD + R_COUNT, %r12d
	movl %r12d, %eax
	shll $4, %eax               /* * BLOB_SIZE */
	addl $R_BLOBS, %eax
	cmpl %esi, %eax
	ja bad_record

	/* Copy each blob to its address: one DMA transfer each, whatever its
	 * size. A blob may be longer than its fw_cfg item: DMA reads past the
	 * end of an item as zeros, which is how an ELF segment's bss is
	 * cleared without a line of code. */
	movl $(RECORD + R_BLOBS), %ebx
copy_blob:
	testl %r12d, %r12d
	jz blobs_done
	movzwl 12(%rbx), %edi       /* select */
	shll $16, %edi
	orl $(DMA_SELECT | DMA_READ), %edi
	movl 8(%rbx), %esi          /* length */
	movq (%rbx), %rdx           /* guest-physical address */
	call fw_cfg_dma
	addl $BLOB_SIZE, %ebx
	decl %r12d
	jmp copy_blob
blobs_done:

	/* The kernel's identity map: the first 4 GiB are mapped; add the GiB
	 * above up to R_MAP_GIB (RAM above 4 GiB, 64-bit BARs), one page
	 * directory each, right after the first four, as the direct path has
	 * them. The new entries are not in use yet: no TLB flush needed. */
	movl RECORD + R_MAP_GIB, %ecx
	movl $4, %eax               /* g: the next GiB to map */
map_gib:
	cmpl %ecx, %eax
	jae map_done
	movl %eax, %esi
	shll $12, %esi
	addl $PD, %esi              /* its page directory */
	leal PAGE_PRESENT_WRITE(%rsi), %edx
	movq %rdx, PDPT(, %rax, 8)
	movq %rax, %rdx
	shlq $30, %rdx              /* g GiB */
	orq $(PAGE_HUGE | PAGE_PRESENT_WRITE), %rdx
	movl $512, %edi
1:	movq %rdx, (%rsi)
	addq $TWO_MIB, %rdx
	addl $8, %esi
	decl %edi
	jnz 1b
	incl %eax
	jmp map_gib
map_done:

	/* The kernel's GDT, at the address the direct path uses (the record
	 * says), with the selectors its protocol names. */
	leaq gdt_pyvmm(%rip), %rsi
	cmpb $PROTOCOL_LINUX, RECORD + R_PROTOCOL
	jne 1f
	leaq gdt_linux(%rip), %rsi
1:	movl RECORD + R_GDT, %edi
	movl $4, %ecx
	rep movsq
	movw $(4 * 8 - 1), KERNEL_GDTR
	movl RECORD + R_GDT, %eax
	movq %rax, KERNEL_GDTR + 2

	/* Done: let the other CPUs go (they read the flag in a loop). */
	movl $GO, GO_FLAG

/* ------------------------------------------------------------------------
 * 4. Enter the kernel, every CPU: the GDT, CS, data segments, registers and
 * flags of the direct path's entry state, then a jump to the entry point.
 */
enter_kernel:
	lgdt KERNEL_GDTR
	/* Registers the kernel must find zero. The firmware used some; KVM's
	 * reset state has the CPU signature in EDX. */
	xorl %ecx, %ecx
	xorl %edx, %edx
	xorl %ebp, %ebp
	xorl %r8d, %r8d
	xorl %r9d, %r9d
	xorl %r10d, %r10d
	xorl %r11d, %r11d
	xorl %r12d, %r12d
	xorl %r13d, %r13d
	xorl %r14d, %r14d
	xorl %r15d, %r15d
	/* Reload CS from the kernel's GDT with a far jump through a pointer in
	 * the ROM (m16:32): no stack needed, and the other CPUs have none. */
	cmpb $PROTOCOL_LINUX, RECORD + R_PROTOCOL
	je 1f
	cmpb $MODE_PROTECTED, RECORD + R_MODE
	je 2f
	ljmpl *to_long64(%rip)
1:	ljmpl *to_linux64(%rip)
2:	ljmpl *to_protected32(%rip)

long64:                         /* pyvmm's ELF ABI, 64-bit: CS 0x08, data 0x10 */
	movl $DATA, %eax
	jmp 1f
linux64:                        /* Linux: CS 0x10 (__BOOT_CS), data 0x18 (__BOOT_DS) */
	movl $LINUX_DS, %eax
1:	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movw %ax, %fs
	movw %ax, %gs
	/* RDI: this CPU's index (the ELF ABI's; 0 for multiboot and Linux). */
	movl $1, %eax
	cpuid
	shrl $24, %ebx
	movl %ebx, %edi
	xorl %ecx, %ecx             /* cpuid wrote them */
	xorl %edx, %edx
	/* RFLAGS = 0x2 exactly (interrupts off, no arithmetic flags): pop it
	 * from a constant in the ROM, then use only MOVs, which leave flags. */
	leaq rflags_at_entry(%rip), %rsp
	popfq
	movq RECORD + R_RAX, %rax
	movq RECORD + R_RBX, %rbx
	movq RECORD + R_RSI, %rsi
	movl $0, %esp               /* the entry state has RSP = 0 */
	jmp *RECORD + R_ENTRY

	.code32
protected32:
	/* Multiboot and ELF32: 32-bit protected mode, paging off. We are in
	 * compatibility mode (a 32-bit segment of long mode); clearing CR0.PG
	 * leaves long mode (this code is identity-mapped, so the next fetch
	 * works either way), then EFER.LME can go, and PAE and CR3 too, for
	 * the direct path's CR0 = PE|MP|ET|NE, CR4 = OSFXSR|OSXMMEXCPT. */
	movl %cr0, %eax
	andl $~(CR0_PG | CR0_WP), %eax
	movl %eax, %cr0
	movl $MSR_EFER, %ecx
	rdmsr
	andl $~EFER_LME, %eax
	wrmsr
	movl $(CR4_OSFXSR | CR4_OSXMMEXCPT), %eax
	movl %eax, %cr4
	xorl %eax, %eax
	movl %eax, %cr3
	movl $DATA, %eax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movw %ax, %fs
	movw %ax, %gs
	movl $1, %eax
	cpuid
	shrl $24, %ebx
	movl %ebx, %edi             /* EDI: the CPU's index, as above */
	xorl %ecx, %ecx
	xorl %edx, %edx
	movl $rflags_at_entry, %esp
	popfl
	movl RECORD + R_RAX, %eax   /* multiboot: 0x2BADB002 */
	movl RECORD + R_RBX, %ebx   /* multiboot: the information structure */
	movl RECORD + R_RSI, %esi
	movl $0, %esp
	jmp *RECORD + R_ENTRY

/* ------------------------------------------------------------------------
 * Helpers (64-bit, boot CPU only: they need its stack).
 */
	.code64
/*
 * One fw_cfg DMA transfer: control EDI (operation, and the item to select
 * in bits 31-16), length ESI, guest-physical address RDX. Fails the boot on
 * an error. Clobbers EAX and EDX.
 */
fw_cfg_dma:
	/* The FWCfgDmaAccess structure is big-endian, in RAM (the ROM is
	 * read-only, and the device writes the result back into it). */
	movl %edi, %eax
	bswapl %eax
	movl %eax, DMA_ACCESS
	movl %esi, %eax
	bswapl %eax
	movl %eax, DMA_ACCESS + 4
	bswapq %rdx
	movq %rdx, DMA_ACCESS + 8
	/* Writing the structure's address runs the transfer. The high half is
	 * 0 (it is below 4 GiB, and the register is 0 after each transfer), so
	 * only the low half is written, big-endian: one exit per transfer. */
	movl $DMA_ACCESS, %eax
	bswapl %eax
	movw $FW_CFG_DMA_LOW, %dx
	outl %eax, %dx
	/* The spec's completion test: control is 0, or just the error bit.
	 * (QEMU and pyvmm finish before the OUT returns; poll anyway.) */
1:	movl DMA_ACCESS, %eax
	bswapl %eax
	testl $~DMA_ERROR, %eax
	jnz 1b
	testl %eax, %eax
	jnz dma_failed
	ret

no_fw_cfg:
	leaq msg_no_fw_cfg(%rip), %rsi
	jmp fail
no_boot_file:
	leaq msg_no_boot_file(%rip), %rsi
	jmp fail
bad_record:
	leaq msg_bad_record(%rip), %rsi
	jmp fail
dma_failed:
	leaq msg_dma_failed(%rip), %rsi
fail:
	/* Say why on COM1 (all a firmware has to talk through), then stop: ud2
	 * with no IDT is a triple fault, which ends the run (status 8). */
	movw $COM1_LSR, %dx
	inb %dx, %al
	testb $LSR_THRE, %al
	jz fail
	lodsb
	testb %al, %al
	jz 1f
	movw $COM1, %dx
	outb %al, %dx
	jmp fail
1:	ud2

/* ------------------------------------------------------------------------
 * Read-only data. Descriptors have the accessed bit set (type 0x9B, 0x93):
 * the CPU would otherwise write it into the GDT, here the ROM.
 */
	.section .rodata, "a"
	.balign 8
gdt_pyvmm:                      /* pyvmm's boot GDT (pyvmm/x86.py) */
	.quad 0
	.quad 0x00AF9B000000FFFF    /* 0x08: 64-bit code */
	.quad 0x00CF93000000FFFF    /* 0x10: flat data */
	.quad 0x00CF9B000000FFFF    /* 0x18: flat 32-bit code */
gdt_linux:                      /* Linux's boot GDT (pyvmm/linux.py) */
	.quad 0
	.quad 0
	.quad 0x00AF9B000000FFFF    /* 0x10: __BOOT_CS, 64-bit code */
	.quad 0x00CF93000000FFFF    /* 0x18: __BOOT_DS, flat data */
rflags_at_entry:
	.quad 0x2                   /* bit 1 is always set */
gdt_rom:                        /* lgdt operand: limit, 32-bit base */
	.word 4 * 8 - 1
	.long gdt_pyvmm
idt_none:                       /* lidt operand: limit 0, base 0 */
	.word 0
	.long 0
to_long64:                      /* far pointers (m16:32): offset, selector */
	.long long64
	.word CODE64
to_linux64:
	.long linux64
	.word LINUX_CS
to_protected32:
	.long protected32
	.word CODE32
boot_file_name:
	.asciz "etc/pyvmm/boot"
	.set boot_file_name_size, . - boot_file_name
msg_no_fw_cfg:
	.asciz "pyvmm firmware: no fw_cfg DMA interface at port 0x514\n"
msg_no_boot_file:
	.asciz "pyvmm firmware: fw_cfg has no etc/pyvmm/boot: nothing to boot\n"
msg_bad_record:
	.asciz "pyvmm firmware: etc/pyvmm/boot is not a boot record this firmware reads\n"
msg_dma_failed:
	.asciz "pyvmm firmware: a fw_cfg DMA transfer failed\n"

/* ------------------------------------------------------------------------
 * The reset vector, at 0xFFFFFFF0: the first instruction after reset. 16
 * bytes are all there is before the end of the address space: jump back.
 */
	.section .reset, "ax"
	.code16
	.globl reset_vector
reset_vector:
	jmp reset
	.org 8, 0
	.ascii "PYVMMFW"            /* pyvmm checks this before it maps the image */
	.byte 0                     /* the Makefile sets it: all bytes sum to 0 mod 256 */

	.section .note.GNU-stack, "", @progbits
