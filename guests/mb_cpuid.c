/*
 * What the CPUID a guest is given says about the machine, checked as Linux
 * checks it at boot (arch/x86/kernel/cpu/hypervisor.c, kvm.c, fpu/xstate.c):
 *  - CPUID.1:ECX[31], the hypervisor bit: without it Linux never looks at
 *    the hypervisor leaves, so a KVM guest gets no kvm-clock;
 *  - leaf 0x40000000: "KVMKVMKVM\0\0\0" and the highest hypervisor leaf;
 *    leaf 0x40000001: the KVM features (kvm-clock is bit 3, CLOCKSOURCE2);
 *  - CPUID.1:EBX[31:24], the boot CPU's initial APIC ID: 0;
 *  - XSAVE, when offered: CR4.OSXSAVE on, then XCR0 set to every user
 *    state component leaf 0xD.0 offers; CPUID.1:ECX[27] (OSXSAVE) must now
 *    read 1 and leaf 0xD.0 EBX (the save area XCR0 needs) must equal the
 *    end of the last enabled component (leaf 0xD.i: size EAX at offset
 *    EBX). Linux turns XSAVE off with "XSAVE consistency problem" when
 *    these disagree; the VMM's KVM recomputes EBX when XCR0 changes.
 * Multiboot, so the same kernel runs under QEMU's -kernel:
 *   pyvmm run mb_cpuid
 *   qemu-system-x86_64 -machine q35 -accel kvm -kernel mb_cpuid.elf ...
 * Output: one line per check, "mb_cpuid: all ok" last, then power-off; a
 * failed check prints "FAIL: ..." and exits with its step (enum failure).
 */
#include "runtime.h"
#include "multiboot.h"
#include "cpuid.h"

#define CPUID_1_ECX_XSAVE (1u << 26)
#define CPUID_1_ECX_OSXSAVE (1u << 27)
#define CPUID_1_ECX_HYPERVISOR (1u << 31)
#define KVM_FEATURE_CLOCKSOURCE2 (1u << 3)
#define CR4_OSXSAVE (1u << 18)
/* The user state components a guest can enable in XCR0: x87 to PKRU, not
 * AMX (bits 17-18, which need the host's per-process permission). */
#define XCR0_USER_MASK 0x2FFull
#define LEGACY_AREA 576u   /* the legacy region and the XSAVE header */

enum failure {
	NO_HYPERVISOR_BIT = 1,
	NOT_KVM,
	NO_KVM_FEATURES_LEAF,
	NO_KVM_CLOCK,
	BAD_APIC_ID,
	NO_OSXSAVE,
	XSAVE_SIZE_MISMATCH,
};

static void check_hypervisor(void)
{
	struct regs one = cpuid(1, 0), leaf = cpuid(0x40000000, 0);
	char signature[13];

	printf("hypervisor bit %u\n", (one.ecx & CPUID_1_ECX_HYPERVISOR) ? 1u : 0u);
	if (!(one.ecx & CPUID_1_ECX_HYPERVISOR))
		guest_fail(NO_HYPERVISOR_BIT, "CPUID.1:ECX[31]", one.ecx, one.ecx | CPUID_1_ECX_HYPERVISOR);
	memcpy(signature, &leaf.ebx, 4);
	memcpy(signature + 4, &leaf.ecx, 4);
	memcpy(signature + 8, &leaf.edx, 4);
	signature[12] = 0;
	printf("hypervisor leaf max 0x%x signature %s\n", leaf.eax, signature);
	if (memcmp(signature, "KVMKVMKVM\0\0\0", 12) != 0)
		guest_fail(NOT_KVM, "leaf 0x40000000 signature (EBX)", leaf.ebx, 0x4b4d564b);
	if (leaf.eax < 0x40000001)
		guest_fail(NO_KVM_FEATURES_LEAF, "highest hypervisor leaf", leaf.eax, 0x40000001);
	struct regs features = cpuid(0x40000001, 0);
	printf("kvm features 0x%x\n", features.eax);
	if (!(features.eax & KVM_FEATURE_CLOCKSOURCE2))
		guest_fail(NO_KVM_CLOCK, "KVM_FEATURE_CLOCKSOURCE2", features.eax,
			   features.eax | KVM_FEATURE_CLOCKSOURCE2);
}

static u32 read_cr4(void)
{
	u32 cr4;

	__asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
	return cr4;
}

/* The end of the last component of mask in the standard (non-compacted) format. */
static u32 xsave_size(u64 mask)
{
	u32 size = LEGACY_AREA;

	for (unsigned i = 2; i < 64; i++) {
		if (!(mask & (1ull << i)))
			continue;
		struct regs component = cpuid(0xD, i);
		if (component.ebx + component.eax > size)
			size = component.ebx + component.eax;
	}
	return size;
}

static void check_xsave(void)
{
	if (!(cpuid(1, 0).ecx & CPUID_1_ECX_XSAVE)) {
		print("xsave not offered\n");
		return;
	}
	struct regs leaf = cpuid(0xD, 0);
	u64 xcr0 = (((u64)leaf.edx << 32 | leaf.eax) & XCR0_USER_MASK) | 1;

	__asm__ volatile("mov %0, %%cr4" :: "r"(read_cr4() | CR4_OSXSAVE));
	if (!(cpuid(1, 0).ecx & CPUID_1_ECX_OSXSAVE))
		guest_fail(NO_OSXSAVE, "CPUID.1:ECX[27] after CR4.OSXSAVE", 0, 1);
	__asm__ volatile("xsetbv" :: "c"(0), "a"((u32)xcr0), "d"((u32)(xcr0 >> 32)));
	u32 reported = cpuid(0xD, 0).ebx, computed = xsave_size(xcr0);
	printf("xsave xcr0 0x%x size %u components end at %u\n", (u32)xcr0, reported, computed);
	if (reported != computed)
		guest_fail(XSAVE_SIZE_MISMATCH, "CPUID 0xD.0 EBX after XSETBV", reported, computed);
}

int multiboot_main(u32 magic, const struct multiboot_info *mbi)
{
	(void)magic;
	(void)mbi;
	check_hypervisor();
	u32 apic_id = cpuid(1, 0).ebx >> 24;
	printf("apic id %u\n", apic_id);
	if (apic_id != 0)
		guest_fail(BAD_APIC_ID, "CPUID.1:EBX[31:24]", apic_id, 0);
	check_xsave();
	print("mb_cpuid: all ok\n");
	return 0;
}
