"""The 16550A UART at COM1 (ports 0x3F8-0x3FF, IRQ 4).

The register file runs natively in csrc/uart.c, so a guest's printing costs no Python. This
module decides where output goes (stdout, a file, a pipe, or a capture buffer for tests) and
feeds input from a file descriptor, such as stdin, through a small reader thread.
"""

from __future__ import annotations

import os
import selectors
import threading

from pyvmm._native import ffi, lib
from pyvmm.bus import Bus, NativeHandler
from pyvmm.errors import ConfigurationError

COM1_BASE = 0x3F8
COM1_IRQ = 4


def open_output(spec: str | int) -> tuple[int, bool]:
    """Resolve a --serial value to (fd, owned): stdio, file:PATH, capture, none, or an fd."""
    if isinstance(spec, int):
        return spec, False
    if spec == "stdio":
        return 1, False
    if spec == "capture":
        return os.memfd_create("pyvmm-serial", os.MFD_CLOEXEC), True
    if spec == "none":
        return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC), True
    if spec.startswith("file:"):
        path = spec[len("file:") :]
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
            return os.open(path, flags, 0o644), True
        except OSError as error:
            raise ConfigurationError(
                f"cannot open serial output {path}: {error.strerror}"
            ) from None
    raise ConfigurationError(f"bad serial output {spec!r}: use stdio, file:PATH, capture or none")


class Serial16550:
    """COM1: a native 16550A whose output goes to an fd and whose input comes from one."""

    def __init__(self, bus: Bus, output: str | int = "stdio", vm_fd: int = -1) -> None:
        """Create the UART on bus; vm_fd >= 0 lets it raise IRQ 4 on an in-kernel irqchip."""
        self.out_fd, self._owns_out = open_output(output)
        self._capture = output == "capture"
        self.uart = lib.pyvmm_uart_new(self.out_fd, vm_fd, COM1_IRQ)
        if self.uart == ffi.NULL:
            raise MemoryError("cannot allocate the UART")
        bus.add(COM1_BASE, 8, NativeHandler(lib.PYVMM_HANDLER_UART, device=self.uart), "COM1")
        self._input_thread: threading.Thread | None = None
        self._wake_read, self._wake_write = -1, -1

    def start_input(self, fd: int = 0) -> None:
        """Feed bytes read from fd (stdin by default) to the guest until close()."""
        self._wake_read, self._wake_write = os.pipe2(os.O_CLOEXEC)
        self._input_thread = threading.Thread(
            target=self._pump_input, args=(fd,), name="pyvmm-serial-input", daemon=True
        )
        self._input_thread.start()

    def _pump_input(self, fd: int) -> None:
        with selectors.PollSelector() as selector:  # poll, unlike epoll, takes files
            selector.register(fd, selectors.EVENT_READ)
            selector.register(self._wake_read, selectors.EVENT_READ)
            while True:
                ready = {key.fd for key, _ in selector.select()}
                if self._wake_read in ready:
                    return
                data = os.read(fd, 4096)
                if not data:
                    return
                lib.pyvmm_uart_push_input(self.uart, data, len(data))

    def push_input(self, data: bytes) -> None:
        """Queue bytes for the guest to read from the receive register."""
        lib.pyvmm_uart_push_input(self.uart, data, len(data))

    def flush(self) -> None:
        """Write out any buffered output (the UART buffers a line at a time)."""
        lib.pyvmm_uart_flush(self.uart)

    @property
    def bytes_out(self) -> int:
        """How many bytes the guest has transmitted."""
        return lib.pyvmm_uart_bytes_out(self.uart)

    def captured(self) -> bytes:
        """All output so far, when the output is 'capture'."""
        if not self._capture:
            raise ValueError("serial output is not captured")
        self.flush()
        return os.pread(self.out_fd, os.fstat(self.out_fd).st_size, 0)

    def close(self) -> None:
        """Stop input, flush output, free the UART and close what it owns."""
        if self._input_thread is not None:
            os.write(self._wake_write, b"x")
            self._input_thread.join()
            self._input_thread = None
            os.close(self._wake_read)
            os.close(self._wake_write)
        if self.uart is not None:
            self.flush()
            lib.pyvmm_uart_free(self.uart)
            self.uart = None
        if self._owns_out and self.out_fd >= 0:
            os.close(self.out_fd)
        self.out_fd = -1
