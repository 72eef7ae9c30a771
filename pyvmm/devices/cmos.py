"""The CMOS RAM and real-time clock (an MC146818) at ports 0x70 (index) and 0x71 (data).

What test kernels read from it:

- The clock: seconds, minutes, hours, day of week and month, month, year and century
  (index 0x32, the FADT's CENTURY), from the host's clock in UTC (QEMU's default,
  ``-rtc base=utc``). Register B starts as 24-hour BCD (0x02); a guest may switch it to
  binary or 12-hour mode, and may set the clock (the difference to the host's is kept).
  Reading is never mid-update (each read computes the time afresh), so register A's
  update-in-progress bit always reads 0. No interrupts: register C reads 0, IRQ 8 never
  fires.
- The fields PC firmware fills, as QEMU's pc_cmos_init does (SeaBIOS reads them back):

  | index | what |
  |---|---|
  | 0x15/0x16 | base memory in KiB: 640 |
  | 0x17/0x18, 0x30/0x31 | memory from 1 MiB up to the hole, in KiB, at most 0xFFFF (~64 MiB) |
  | 0x34/0x35 | memory from 16 MiB up to the hole, in 64 KiB units, at most 0xFFFF |
  | 0x5B-0x5D | memory above 4 GiB in 64 KiB units (24 bits) |
  | 0x5F | number of vCPUs minus 1 |
  | 0x14 | equipment byte: an FPU (QEMU also reports a PS/2 mouse; pyvmm has none) |
  | 0x2E/0x2F | the AT checksum of 0x10-0x2D, high byte first |

  RAM "up to the hole" is RAM below 4 GiB: pyvmm puts RAM above 3 GiB at 4 GiB.

The rest of the 128 bytes is RAM: what a guest writes there it reads back. Bit 7 of the
index (NMI disable on a PC) is ignored. Every access is served in Python: kernels read the
clock and memory size a few times, not in loops that matter.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pyvmm.memory import HIGH_RAM_START, MIB

if TYPE_CHECKING:
    from pyvmm.bus import Bus
    from pyvmm.memory import GuestMemory

INDEX_PORT = 0x70
DATA_PORT = 0x71
CMOS_SIZE = 128

SECONDS, MINUTES, HOURS, DAY_OF_WEEK = 0x00, 0x02, 0x04, 0x06
DAY_OF_MONTH, MONTH, YEAR = 0x07, 0x08, 0x09
REGISTER_A, REGISTER_B, REGISTER_C, REGISTER_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32
CLOCK_REGISTERS = (SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR, CENTURY)

REGISTER_A_DEFAULT = 0x26  # 32.768 kHz time base, 1024 Hz rate (unused: no interrupts)
REGISTER_A_UIP = 0x80
REGISTER_B_SET = 0x80  # updates stopped while the guest sets the clock
REGISTER_B_BINARY = 0x04  # DM: binary, not BCD
REGISTER_B_24_HOUR = 0x02
REGISTER_B_DEFAULT = REGISTER_B_24_HOUR  # BCD, 24-hour, no interrupts
REGISTER_D_VALID = 0x80  # VRT: the battery is fine, RAM and time are valid
HOUR_PM = 0x80  # in 12-hour mode

BASE_MEMORY_KIB = 640
EQUIPMENT = 0x14
EQUIPMENT_FPU = 0x02
CHECKSUM_RANGE = (0x10, 0x2E)  # the AT BIOS checksum covers 0x10-0x2D; stored at 0x2E/0x2F


def memory_fields(below_4g: int, above_4g: int, cpus: int) -> dict[int, int]:
    """The CMOS bytes firmware fills for RAM below and above 4 GiB and cpus vCPUs."""
    base_kib = min(below_4g // 1024, BASE_MEMORY_KIB)
    extended_kib = min(max(below_4g - MIB, 0) // 1024, 0xFFFF)
    above_16m = min(max(below_4g - 16 * MIB, 0) // (64 * 1024), 0xFFFF)
    above_4g_units = above_4g // (64 * 1024)
    fields = {
        0x15: base_kib & 0xFF, 0x16: base_kib >> 8,
        0x17: extended_kib & 0xFF, 0x18: extended_kib >> 8,
        0x30: extended_kib & 0xFF, 0x31: extended_kib >> 8,
        0x34: above_16m & 0xFF, 0x35: above_16m >> 8,
        0x5B: above_4g_units & 0xFF, 0x5C: (above_4g_units >> 8) & 0xFF,
        0x5D: (above_4g_units >> 16) & 0xFF,
        0x5F: cpus - 1,
    }  # fmt: skip
    return fields


def _to_bcd(value: int) -> int:
    return (value // 10) << 4 | value % 10


def _from_bcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0xF)


class Cmos:
    """128 bytes of CMOS RAM with the MC146818 clock over its first 14 (and the century)."""

    def __init__(
        self, below_4g: int, above_4g: int, cpus: int, clock: Callable[[], float] = time.time
    ) -> None:
        """CMOS for RAM of below_4g + above_4g bytes and cpus vCPUs; clock gives host time."""
        self.ram = bytearray(CMOS_SIZE)
        self.index = 0
        self.clock = clock
        #: Guest time minus host time, in seconds: what the guest's own setting of the clock
        #: changed.
        self.offset = 0.0
        self.ram[REGISTER_A] = REGISTER_A_DEFAULT
        self.ram[REGISTER_B] = REGISTER_B_DEFAULT
        self.ram[REGISTER_D] = REGISTER_D_VALID
        self.ram[EQUIPMENT] = EQUIPMENT_FPU
        for index, value in memory_fields(below_4g, above_4g, cpus).items():
            self.ram[index] = value
        checksum = sum(self.ram[CHECKSUM_RANGE[0] : CHECKSUM_RANGE[1]])
        self.ram[0x2E], self.ram[0x2F] = checksum >> 8 & 0xFF, checksum & 0xFF

    # ---- the port pair ------------------------------------------------------------------
    def __call__(self, offset: int, data: memoryview, is_write: bool) -> None:
        """Serve ports 0x70-0x71; a word access at 0x70 is the index, then the data."""
        for i in range(len(data)):
            port = offset + i
            if port == 0:
                if is_write:
                    self.index = data[i] & 0x7F  # bit 7: NMI disable, which pyvmm ignores
                else:
                    data[i] = 0xFF  # the index register is write-only, as QEMU reads it
            elif is_write:
                self.write(self.index, data[i])
            else:
                data[i] = self.read(self.index)

    # ---- registers ----------------------------------------------------------------------
    def read(self, index: int) -> int:
        """The value of CMOS byte index (0-127) as the guest reads it."""
        if index in CLOCK_REGISTERS and not self.ram[REGISTER_B] & REGISTER_B_SET:
            return self._clock_fields(self._now())[index]
        if index == REGISTER_A:
            return self.ram[REGISTER_A] & ~REGISTER_A_UIP
        if index == REGISTER_C:
            return 0  # no interrupt flags: nothing raises them
        return self.ram[index]

    def write(self, index: int, value: int) -> None:
        """A guest write of value to CMOS byte index."""
        if index in (REGISTER_C, REGISTER_D):
            return  # read-only
        if index == REGISTER_A:
            self.ram[index] = value & ~REGISTER_A_UIP
            return
        if index == REGISTER_B:
            setting = bool(value & REGISTER_B_SET)
            was_setting = bool(self.ram[REGISTER_B] & REGISTER_B_SET)
            if setting and not was_setting:
                self._freeze()  # the clock registers now hold what the guest will change
            self.ram[REGISTER_B] = value
            if was_setting and not setting:
                self._set_clock_from_ram()
            return
        if index in CLOCK_REGISTERS and not self.ram[REGISTER_B] & REGISTER_B_SET:
            # Setting one field without SET: the others keep running from now.
            self._freeze()
            self.ram[index] = value
            self._set_clock_from_ram()
            return
        self.ram[index] = value

    # ---- the clock ----------------------------------------------------------------------
    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock() + self.offset, tz=UTC)

    def _encode(self, value: int) -> int:
        return value if self.ram[REGISTER_B] & REGISTER_B_BINARY else _to_bcd(value)

    def _decode(self, value: int) -> int:
        return value if self.ram[REGISTER_B] & REGISTER_B_BINARY else _from_bcd(value)

    def _clock_fields(self, now: datetime) -> dict[int, int]:
        hour = now.hour
        if self.ram[REGISTER_B] & REGISTER_B_24_HOUR:
            hours = self._encode(hour)
        else:
            hours = self._encode(hour % 12 or 12) | (HOUR_PM if hour >= 12 else 0)
        return {
            SECONDS: self._encode(now.second),
            MINUTES: self._encode(now.minute),
            HOURS: hours,
            DAY_OF_WEEK: self._encode(now.isoweekday() % 7 + 1),  # 1 = Sunday
            DAY_OF_MONTH: self._encode(now.day),
            MONTH: self._encode(now.month),
            YEAR: self._encode(now.year % 100),
            CENTURY: self._encode(now.year // 100),
        }

    def _freeze(self) -> None:
        for index, value in self._clock_fields(self._now()).items():
            self.ram[index] = value

    def _set_clock_from_ram(self) -> None:
        """Take the clock registers as the guest's new time (ignored if not a valid date)."""
        ram = self.ram
        hours = ram[HOURS]
        if ram[REGISTER_B] & REGISTER_B_24_HOUR:
            hour = self._decode(hours)
        else:
            hour = self._decode(hours & ~HOUR_PM) % 12 + (12 if hours & HOUR_PM else 0)
        try:
            wanted = datetime(
                self._decode(ram[CENTURY]) * 100 + self._decode(ram[YEAR]),
                self._decode(ram[MONTH]),
                self._decode(ram[DAY_OF_MONTH]),
                hour,
                self._decode(ram[MINUTES]),
                self._decode(ram[SECONDS]),
                tzinfo=UTC,
            )
        except ValueError:
            return  # as a real RTC would tick on nonsense, but there is no sense to keep
        # Keep the fraction of the current second, so setting one field does not move the
        # others back by up to a second.
        host = self.clock()
        self.offset = wanted.timestamp() + (host + self.offset) % 1 - host


def ram_split(memory: GuestMemory) -> tuple[int, int]:
    """(RAM below 4 GiB, RAM above) of a guest's memory."""
    below = sum(r.size for r in memory.regions if r.guest_phys_addr < HIGH_RAM_START)
    return below, sum(r.size for r in memory.regions) - below


def add_cmos(pio_bus: Bus, memory: GuestMemory, cpus: int) -> Cmos:
    """Put the CMOS/RTC at ports 0x70-0x71 of pio_bus, filled for memory and cpus."""
    below, above = ram_split(memory)
    cmos = Cmos(below, above, cpus)
    pio_bus.add(INDEX_PORT, 2, cmos, "cmos-rtc")
    return cmos
