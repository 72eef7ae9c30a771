"""Build steps that pyproject.toml cannot express: the cffi extension, the test guests and
the firmware.

The extension comes from pyvmm/_build.py (cffi API mode). The guests are built from
guests/ by the machine's gcc and as, and land inside the package (pyvmm/guest_images) so
that ``pyvmm run`` finds its default guest wherever pyvmm is installed; so does the
firmware, from firmware/ into pyvmm/firmware_images, for ``pyvmm run --firmware``.
"""

import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "pyvmm"))
from _build import ffibuilder  # noqa: E402

sys.path.pop(0)


class BuildExtAndGuests(build_ext):
    """build_ext that also compiles the test guests and the firmware into the package."""

    def run(self) -> None:
        """Build the extension, then the guests and the firmware next to it."""
        super().run()
        package_dir = ROOT / "pyvmm" if self.inplace else Path(self.build_lib) / "pyvmm"
        out = (package_dir / "guest_images").resolve()
        out.mkdir(parents=True, exist_ok=True)
        objects = (ROOT / "build" / "guests").resolve()
        subprocess.run(
            ["make", "-s", "-C", str(ROOT / "guests"), f"OUT={out}", f"OBJ={objects}"], check=True
        )
        firmware = (package_dir / "firmware_images").resolve()
        firmware.mkdir(parents=True, exist_ok=True)
        objects = (ROOT / "build" / "firmware").resolve()
        subprocess.run(
            ["make", "-s", "-C", str(ROOT / "firmware"), f"OUT={firmware}", f"OBJ={objects}"],
            check=True,
        )


setup(
    ext_modules=[ffibuilder.distutils_extension(tmpdir="build/cffi")],
    cmdclass={"build_ext": BuildExtAndGuests},
)
