/*
 * Starting the other CPUs as an OS does on a PC: INIT, then SIPI, through
 * the boot CPU's local APIC (apic.h). For the multiboot kernels, where only
 * the boot CPU runs and the others wait in their reset state
 * (docs/guest-abi.md, "Multiboot"); pyvmm's own ELF guests start every vCPU
 * at once and need none of this.
 *
 * A started AP begins in real mode at CS:IP = (vector << 8):0, that is at
 * physical vector << 12, so its first instructions must be below 1 MiB:
 * smp_install_trampoline() copies a small 16-bit trampoline to AP_TRAMPOLINE
 * (vector 0x08). Each AP that runs it sets its APIC ID (CPUID leaf 1) in a
 * bitmap, counts itself and halts for good.
 */
#ifndef GUEST_SMP_H
#define GUEST_SMP_H

#include "runtime.h"

/* The trampoline page, below the multiboot information at 0x9000. */
#define AP_TRAMPOLINE 0x8000u

/* Busy-wait bounds, in loop iterations: on a slow, emulated KVM (~1.5 us
 * per instruction) 200000 is about a second. */
#define AP_WAIT_SPINS 200000u
#define AP_SETTLE_SPINS 20000u

/* Copy the trampoline into place and clear the count and bitmap. */
void smp_install_trampoline(void);

/* How many APs have run the trampoline, and which APIC IDs they have (bit
 * n: APIC ID n; IDs up to 63). */
unsigned smp_aps_up(void);
u64 smp_ap_ids(void);

/* INIT, then two SIPIs (as the MP specification says; one is enough on
 * KVM, and a SIPI to a running CPU is ignored) to one APIC ID, or to every
 * other CPU at once. The local APIC must be enabled (lapic_enable()). */
void smp_start_ap(unsigned apic_id);
void smp_start_all_aps(void);

/* Spin until at least n APs are up or spins iterations have passed;
 * returns how many are up. */
unsigned smp_wait_for_aps(unsigned n, u32 spins);

/* Spin for about n loop iterations with nothing else to do. */
void spin_delay(u32 n);

#endif
