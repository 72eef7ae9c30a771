"""The 16550A UART at COM1 (ports 0x3F8-0x3FF, IRQ 4).

The UART runs natively (csrc/uart.c, the registers; csrc/uart_tx.c, the transmit path), so a
guest's printing costs no Python. This module decides where output goes (stdout, a file, a
pipe, or a capture buffer for tests) and feeds input from a file descriptor, such as stdin,
through a small reader thread.

Output nobody reads never holds up the stop. Output to a regular file (file:PATH, a capture
memfd, stdout redirected to a file) cannot stall and keeps every byte. Output to anything
else (a pipe, a terminal) goes through a 1 MiB ring that a native writer thread drains; when
the consumer stops reading and the ring fills, further bytes are dropped and counted, and the
guest is never blocked (THR always reads empty). At the end of a run the flush waits at most
FLUSH_TIMEOUT for the consumer, then drops what is left; RunResult.serial_dropped has the count.
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

#: How long the flush at the end of a run waits for a consumer that stopped reading, in seconds.
FLUSH_TIMEOUT = 1.0


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
        # Held while the input thread feeds the UART, so close() never frees it underneath.
        self._input_lock = threading.Lock()

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
                try:
                    data = os.read(fd, 4096)
                except (BlockingIOError, InterruptedError):
                    continue  # stdin may be O_NONBLOCK (set by whoever shares it)
                except OSError:
                    return  # a hung-up terminal: no more input
                if not data:
                    return
                with self._input_lock:
                    if self.uart is None:
                        return
                    lib.pyvmm_uart_push_input(self.uart, data, len(data))

    def push_input(self, data: bytes) -> None:
        """Queue bytes for the guest to read from the receive register."""
        lib.pyvmm_uart_push_input(self.uart, data, len(data))

    def flush(self, timeout: float = FLUSH_TIMEOUT) -> int:
        """Write out buffered output, waiting at most timeout s for a stalled consumer.

        Returns how many bytes have been dropped so far (what the consumer did not take).
        """
        return lib.pyvmm_uart_drain(self.uart, int(timeout * 1000))

    @property
    def bytes_out(self) -> int:
        """How many bytes the guest has transmitted (dropped ones included)."""
        return lib.pyvmm_uart_bytes_out(self.uart)

    @property
    def dropped(self) -> int:
        """How many transmitted bytes never reached the output: its reader stopped reading."""
        return lib.pyvmm_uart_dropped(self.uart)

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
            # Bounded: a read that blocks after poll said "readable" (a terminal another
            # process group took) must not hang the close; the thread checks self.uart.
            self._input_thread.join(FLUSH_TIMEOUT)
            self._input_thread = None
            os.close(self._wake_read)
            os.close(self._wake_write)
        if self.uart is not None:
            self.flush()
            with self._input_lock:
                lib.pyvmm_uart_free(self.uart)
                self.uart = None
        if self._owns_out and self.out_fd >= 0:
            os.close(self.out_fd)
        self.out_fd = -1
