/* Reads one line from the serial port and prints it back: the UART's input path. */
#include "runtime.h"

#define LSR_DATA_READY 0x01

static char serial_getc(void)
{
	/* Polling: every LSR read is an exit, which pyvmm answers natively. */
	while (!(inb(COM1_LSR) & LSR_DATA_READY))
		__asm__ volatile("pause");
	return (char)inb(COM1_PORT);
}

int guest_main(unsigned cpu, unsigned ncpus)
{
	char line[80];
	unsigned length = 0;

	(void)ncpus;
	if (cpu != 0)
		guest_halt();
	print("type a line\n");
	for (;;) {
		char c = serial_getc();
		if (c == '\n' || c == '\r' || length == sizeof(line) - 1)
			break;
		line[length++] = c;
	}
	line[length] = 0;
	printf("got: %s\n", line);
	return 0;
}
