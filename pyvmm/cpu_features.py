"""CPUID feature flags by QEMU's names, for `-cpu host,+FEATURE,-FEATURE` on pyvmm's vCPUs.

A harness that runs `qemu-system-x86_64 -cpu host,-x2apic` expects the guest not to see
x2APIC. The names are QEMU's (target/i386/cpu.c's feature words), and so is what happens
to a feature the host lacks: a warning, and the bit stays clear.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from pyvmm.errors import ConfigurationError
from pyvmm.ioctl import Cdata


@dataclass(frozen=True)
class CpuidBit:
    """Where a feature lives: CPUID leaf, subleaf, register and bit."""

    function: int
    index: int
    register: str
    bit: int

    def describe(self, name: str) -> str:
        """QEMU's spelling of the bit in its warnings: CPUID.07H:EBX.avx2 [bit 5]."""
        leaf = f"{self.function:02X}H" if self.function < 0x100 else f"{self.function:08X}H"
        return f"CPUID.{leaf}:{self.register.upper()}.{name} [bit {self.bit}]"


# Each feature register and its flags from bit 0 up, as QEMU names them ("-": no name).
_WORDS: dict[tuple[int, int, str], str] = {
    (0x1, 0, "edx"): (
        "fpu vme de pse tsc msr pae mce "
        "cx8 apic - sep mtrr pge mca cmov "
        "pat pse36 pn clflush - ds acpi mmx "
        "fxsr sse sse2 ss ht tm ia64 pbe"
    ),
    (0x1, 0, "ecx"): (
        "pni pclmulqdq dtes64 monitor ds-cpl vmx smx est "
        "tm2 ssse3 cid - fma cx16 xtpr pdcm "
        "- pcid dca sse4.1 sse4.2 x2apic movbe popcnt "
        "tsc-deadline aes xsave - avx f16c rdrand hypervisor"
    ),
    (0x7, 0, "ebx"): (
        "fsgsbase tsc-adjust sgx bmi1 hle avx2 - smep "
        "bmi2 erms invpcid rtm - - mpx - "
        "avx512f avx512dq rdseed adx smap avx512ifma pcommit clflushopt "
        "clwb intel-pt avx512pf avx512er avx512cd sha-ni avx512bw avx512vl"
    ),
    (0x7, 0, "ecx"): (
        "- avx512vbmi umip pku - waitpkg avx512vbmi2 - "
        "gfni vaes vpclmulqdq avx512vnni avx512bitalg - avx512-vpopcntdq - "
        "la57 - - - - - rdpid - "
        "- cldemote - movdiri movdir64b - sgxlc -"
    ),
    (0x7, 0, "edx"): (
        "- - avx512-4vnniw avx512-4fmaps fsrm - - - "
        "avx512-vp2intersect - md-clear - - - serialize - "
        "tsx-ldtrk - pconfig - - - amx-bf16 avx512-fp16 "
        "amx-tile amx-int8 spec-ctrl stibp - arch-capabilities core-capability ssbd"
    ),
    (0x80000001, 0, "edx"): (
        "- - - - - - - - "
        "- - - syscall - - - - "
        "- - - - nx - mmxext - "
        "- fxsr-opt pdpe1gb rdtscp - lm 3dnowext 3dnow"
    ),
    (0x80000001, 0, "ecx"): (
        "lahf-lm cmp-legacy svm extapic cr8legacy abm sse4a misalignsse "
        "3dnowprefetch osvw ibs xop skinit wdt - lwp "
        "fma4 tce - nodeid-msr - tbm topoext perfctr-core "
        "perfctr-nb - - - - - - -"
    ),
    (0x40000001, 0, "eax"): (
        "kvmclock kvm-nopiodelay kvm-mmu kvmclock kvm-asyncpf kvm-steal-time kvm-pv-eoi "
        "kvm-pv-unhalt - kvm-pv-tlb-flush kvm-asyncpf-vmexit kvm-pv-ipi kvm-poll-control "
        "kvm-pv-sched-yield kvm-asyncpf-int kvm-msi-ext-dest-id"
    ),
}


def _bits() -> Iterator[tuple[str, CpuidBit]]:
    for (function, index, register), names in _WORDS.items():
        for bit, name in enumerate(names.split()):
            if name != "-":
                yield name, CpuidBit(function, index, register, bit)


#: Every feature name QEMU's -cpu takes, with the CPUID bits it stands for (QEMU's
#: "kvmclock" is two bits, the old and the new kvm-clock MSRs).
FEATURES: dict[str, tuple[CpuidBit, ...]] = {}
for _name, _bit in _bits():
    FEATURES[_name] = (*FEATURES.get(_name, ()), _bit)
# QEMU's aliases: the names /proc/cpuinfo uses, and underscores for dashes.
for _alias, _name in {
    "sse3": "pni",
    "sse4_1": "sse4.1",
    "sse4_2": "sse4.2",
    "lahf_lm": "lahf-lm",
    "i64": "lm",
    "ds_cpl": "ds-cpl",
    "tsc_adjust": "tsc-adjust",
    "fxsr_opt": "fxsr-opt",
}.items():
    FEATURES[_alias] = FEATURES[_name]

#: Bits pyvmm sets on every vCPU whatever -cpu says (see docs/guest-abi.md).
ALWAYS_SET = {"hypervisor"}
#: What QEMU's `-cpu host` leaves clear although KVM offers it, until -cpu asks for it:
#: TOPOEXT promises cache topology leaves that only a -smp topology can fill in.
HOST_MODEL_CLEARS = {"topoext": False}


def parse_cpu_option(text: str) -> tuple[str, dict[str, bool]]:
    """Split QEMU's `-cpu MODEL[,+feat][,-feat][,feat=on|off]` into the model and its flags.

    Later flags win, as in QEMU; a bare FEATURE means on. An unknown feature or property is
    a one-line error in QEMU's words.
    """
    model, *items = text.split(",")
    features: dict[str, bool] = {}
    for item in items:
        name, equals, value = item.partition("=")
        if item[:1] in "+-" and item[1:]:
            name, on = item[1:], item[0] == "+"
        elif not equals:
            on = True  # QEMU reads a bare FEATURE as FEATURE=on
        elif value in ("on", "true", "off", "false"):
            on = value in ("on", "true")
        else:
            raise ConfigurationError(f"-cpu {text}: {name} is on or off, not {value!r}")
        if name not in FEATURES:
            raise ConfigurationError(f"-cpu {text}: Property '{model}-x86_64-cpu.{name}' not found")
        if name in ALWAYS_SET and not on:
            raise ConfigurationError(
                f"-cpu {text}: pyvmm always sets the {name} bit (as QEMU does by default): "
                f"leave -{name} out"
            )
        features[name] = on
    return model, features


def apply_cpu_features(cpuid: Cdata, features: Mapping[str, bool]) -> list[str]:
    """Set or clear each feature in a kvm_cpuid2 (in place); return a warning per feature lost.

    Before features, the bits QEMU's host model leaves off (HOST_MODEL_CLEARS) are cleared.

    As QEMU does for `-cpu host,+FEATURE`, a feature KVM does not offer stays clear, with
    QEMU's warning: "host doesn't support requested feature: CPUID.07H:EBX.avx2 [bit 5]".
    """
    entries = {
        (cpuid.entries[i].function, cpuid.entries[i].index): cpuid.entries[i]
        for i in range(cpuid.nent)
    }
    warnings = []
    for name, on in {**HOST_MODEL_CLEARS, **features}.items():
        if name in ALWAYS_SET:
            continue
        for bit in FEATURES[name]:
            entry = entries.get((bit.function, bit.index))
            mask = 1 << bit.bit
            if not on:
                if entry is not None:
                    setattr(entry, bit.register, getattr(entry, bit.register) & ~mask)
            elif entry is None or not getattr(entry, bit.register) & mask:
                warnings.append(f"host doesn't support requested feature: {bit.describe(name)}")
    return warnings
