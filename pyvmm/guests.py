"""The test guests bundled with pyvmm (built from guests/ at install time)."""

from __future__ import annotations

from pathlib import Path

IMAGES = Path(__file__).resolve().parent / "guest_images"


def guest_path(name: str) -> Path:
    """Path of a bundled guest by name ('hello', 'smp', ...), or a path given as is.

    A file of that name in the current directory wins over a bundled guest: `pyvmm run
    hello` with a file ./hello boots ./hello, as any other command would open it.
    """
    if "/" in name or name.endswith((".elf", ".bin")) or Path(name).is_file():
        return Path(name)
    return IMAGES / f"{name}.elf"


def bundled_guests() -> list[str]:
    """Names of the bundled guests."""
    return sorted(path.stem for path in IMAGES.glob("*.elf"))
