"""The ELF, multiboot and bzImage parsers under property-based fuzzing: mutated, truncated
and field-flipped images, loaded into real guest RAM through the entry the CLI uses
(boot.load_guest). The only failure allowed is a PyvmmError with a one-line message.

The budget is fixed and the examples derandomized, so a CI run is reproducible.
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.boot import load_guest
from pyvmm.errors import PyvmmError
from pyvmm.guests import IMAGES
from pyvmm.memory import GuestMemory
from tests.test_linux import bzimage

#: Examples per parser and protocol: a fixed CI budget.
EXAMPLES = 300
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SEEDS = {
    "elf64": IMAGES / "hello.elf",
    "elf32": IMAGES / "hello32.elf",
    "multiboot_elf": IMAGES / "multiboot_info.elf",
    "multiboot_aout": IMAGES / "multiboot_aout.bin",
}

#: Where each seed's parsed fields are: the ELF header and program headers, the multiboot
#: header, the bzImage setup header. Mutations land there most of the time.
HOT = {
    "elf": (0, 0x200),
    "multiboot_aout": (0, 0x60),
    "bzimage": (0x1F0, 0x270),
}


def _hot_range(name: str, image: bytes) -> tuple[int, int]:
    if name.startswith("multiboot"):
        offset = next(
            at
            for at in range(0, min(len(image), 8192) - 3, 4)
            if struct.unpack_from("<I", image, at)[0] == 0x1BADB002
        )
        return offset, offset + 48
    if name == "bzimage":
        return HOT["bzimage"]
    return HOT["elf"]


def _keep_magic(name: str, image: bytearray, seed: bytes, hot: tuple[int, int]) -> None:
    """Put back what makes the parser look further (magic, checksum) after the mutations."""
    if name == "bzimage":
        image[0x1FE:0x200], image[0x202:0x206] = seed[0x1FE:0x200], seed[0x202:0x206]
    elif name.startswith("multiboot"):
        offset = hot[0]
        image[offset : offset + 4] = seed[offset : offset + 4]
        flags = struct.unpack_from("<I", image, offset + 4)[0]
        struct.pack_into("<I", image, offset + 8, -(0x1BADB002 + flags) & 0xFFFFFFFF)
    else:
        image[:5] = seed[:5]  # ELF magic and class


@st.composite
def mutated(draw: st.DrawFn, name: str, seed: bytes, hot: tuple[int, int]) -> bytes:
    """seed with some bytes, words or fields overwritten, maybe truncated or extended.

    Mostly the magic (and a multiboot checksum) is kept, so the parser gets past it to the
    fields behind; a quarter of the images are cut short somewhere.
    """
    image = bytearray(seed)
    for _ in range(draw(st.integers(0, 6))):
        in_hot = draw(st.booleans()) or draw(st.booleans())
        low, high = hot if in_hot else (0, len(image))
        width = draw(st.sampled_from([1, 2, 4, 8]))
        offset = draw(st.integers(low, high - width))
        value = draw(
            st.one_of(
                st.integers(0, (1 << (8 * width)) - 1),
                st.sampled_from([0, 1, (1 << (8 * width)) - 1, 1 << (8 * width - 1)]),
            )
        )
        image[offset : offset + width] = value.to_bytes(width, "little")
    if draw(st.integers(0, 3)):
        _keep_magic(name, image, seed, hot)
    if draw(st.integers(0, 3)) == 0:
        del image[draw(st.integers(0, len(image))) :]
    if draw(st.integers(0, 9)) == 0:
        image += draw(st.binary(max_size=64))
    return bytes(image)


@pytest.fixture(scope="module")
def memory():
    memory = GuestMemory("16M")
    yield memory
    memory.close()


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="pyvmm-fuzz-") as path:
        yield Path(path)


def assert_loads_or_refuses(memory: GuestMemory, path: Path, data: bytes, **options) -> None:
    """Load data from path the CLI's way: success, or one PyvmmError line; nothing else."""
    path.write_bytes(data)
    try:
        load_guest(memory, path, **options)
    except PyvmmError as error:
        assert error.message and "\n" not in error.message, error.message
        assert int(error.exit_status) % 2 == 0


def _fuzz(name: str, seed: bytes, **options):
    @FUZZ
    @given(data=mutated(name, seed, _hot_range(name, seed)))
    def run(memory: GuestMemory, workdir: Path, data: bytes) -> None:
        assert_loads_or_refuses(memory, workdir / name, data, **options)

    return run


_ELF64 = SEEDS["elf64"].read_bytes()
_ELF32 = SEEDS["elf32"].read_bytes()
_MB_ELF = SEEDS["multiboot_elf"].read_bytes()
_MB_AOUT = SEEDS["multiboot_aout"].read_bytes()
_BZIMAGE = bzimage()

test_elf64_loader = _fuzz("elf64", _ELF64, boot="elf")
test_elf32_loader = _fuzz("elf32", _ELF32, boot="elf", mode="protected")
test_multiboot_elf_parser = _fuzz("multiboot_elf", _MB_ELF, boot="multiboot")
test_multiboot_aout_parser = _fuzz("multiboot_aout", _MB_AOUT)
test_bzimage_parser = _fuzz("bzimage", _BZIMAGE, boot="linux", append="console=ttyS0")


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None)
@given(data=st.binary(max_size=0x300))
def test_random_bytes_are_refused_in_one_line(memory: GuestMemory, workdir: Path, data: bytes):
    assert_loads_or_refuses(memory, workdir / "random", data)


@pytest.mark.usefixtures("kvm_required")
@pytest.mark.parametrize(
    ("seed", "offset", "value"),
    [
        ("elf64", 0x20, b"\xff" * 8),  # e_phoff far past the end
        ("elf64", 0x38, b"\xff\xff"),  # e_phnum 65535
        ("elf32", 0x12, b"\x28\x00"),  # e_machine ARM
        ("multiboot_aout", None, None),  # cut inside the a.out kludge's load range
        ("bzimage", 0x201, b"\xff"),  # setup header length past the file
        ("bzimage", 0x260, b"\xff\xff\xff\x7f"),  # init_size 2 GiB
    ],
)
def test_the_cli_refuses_mutated_images_in_one_line(
    pyvmm_cli, tmp_path: Path, seed: str, offset: int | None, value: bytes | None
) -> None:
    image = bytearray(_BZIMAGE if seed == "bzimage" else SEEDS[seed].read_bytes())
    if offset is None:
        del image[len(image) // 2 :]
    else:
        image[offset : offset + len(value)] = value
    if seed == "bzimage":
        del image[0x270:]  # and cut short after the header
    path = tmp_path / seed
    path.write_bytes(bytes(image))
    completed = pyvmm_cli("run", str(path), "--timeout", "10", timeout=60)
    assert completed.returncode % 2 == 0 and completed.returncode != 0, completed.stderr
    assert "Traceback" not in completed.stderr
    assert len(completed.stderr.splitlines()) == 1 and completed.stderr.startswith("pyvmm: ")
