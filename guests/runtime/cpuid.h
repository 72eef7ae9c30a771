/* CPUID, one leaf and subleaf at a time, for the guests that report what their CPU says. */
#ifndef PYVMM_GUEST_CPUID_H
#define PYVMM_GUEST_CPUID_H

#include "runtime.h"

struct regs { u32 eax, ebx, ecx, edx; };

static inline struct regs cpuid(u32 leaf, u32 subleaf)
{
	struct regs r;

	__asm__ volatile("cpuid"
			 : "=a"(r.eax), "=b"(r.ebx), "=c"(r.ecx), "=d"(r.edx)
			 : "a"(leaf), "c"(subleaf));
	return r;
}

#endif
