/*
 * Output on the 16550A UART at COM1.
 *
 * Bytes are sent exactly as given (no "\n" -> "\r\n"): the host tests
 * compare the guest's output byte for byte.
 */
#include "runtime.h"

void serial_putc(char c)
{
	/* Wait for room in the transmitter. A VMM's UART is usually always
	 * ready, but a guest that skips this check would only work on VMMs. */
	while (!(inb(COM1_LSR) & LSR_THRE))
		;
	outb(COM1_PORT, (u8)c);
}

void serial_write(const void *buf, uptr n)
{
	const char *p = buf;

	while (n--)
		serial_putc(*p++);
}

void print(const char *s)
{
	while (*s)
		serial_putc(*s++);
}

void print_hex(u64 v, unsigned digits)
{
	static const char hexdig[] = "0123456789abcdef";
	char buf[16];
	int n = 0;

	do {
		buf[n++] = hexdig[v & 0xf];
		v >>= 4;
	} while (v && n < 16);
	while (n < (int)digits && n < 16)
		buf[n++] = '0';
	while (n)
		serial_putc(buf[--n]);
}

/*
 * v / 10 by binary long division. Written out because "v / 10" on a u64 in
 * 32-bit code becomes a call to libgcc's __udivdi3, and the guests link
 * without libgcc (the i386 libgcc only exists with gcc-multilib).
 */
static u64 divmod10(u64 v, unsigned *rem)
{
	u64 q = 0;
	u32 r = 0;

	for (int bit = 63; bit >= 0; bit--) {
		r = (r << 1) | (u32)((v >> bit) & 1);
		q <<= 1;
		if (r >= 10) {
			r -= 10;
			q |= 1;
		}
	}
	*rem = r;
	return q;
}

/* Print v in decimal, left-padded with pad to width. */
static void put_dec(u64 v, unsigned width, char pad)
{
	char buf[20];
	unsigned n = 0, d;

	do {
		v = divmod10(v, &d);
		buf[n++] = (char)('0' + d);
	} while (v);
	while (n < width && n < sizeof(buf))
		buf[n++] = pad;
	while (n)
		serial_putc(buf[--n]);
}

void print_dec(u64 v)
{
	put_dec(v, 0, ' ');
}

void printf(const char *fmt, ...)
{
	__builtin_va_list ap;

	__builtin_va_start(ap, fmt);
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			serial_putc(*fmt);
			continue;
		}
		fmt++;

		char pad = ' ';
		unsigned width = 0;
		int longs = 0;

		if (*fmt == '0') {
			pad = '0';
			fmt++;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (unsigned)(*fmt++ - '0');
		while (*fmt == 'l') {
			longs++;
			fmt++;
		}

		/* Fetch integer arguments at the width the caller passed them. */
		u64 v = 0;
		int is_signed = (*fmt == 'd' || *fmt == 'i');

		if (*fmt == 'd' || *fmt == 'i' || *fmt == 'u' || *fmt == 'x') {
			if (longs >= 2)
				v = __builtin_va_arg(ap, u64);
			else if (longs == 1)
				v = is_signed ? (u64)__builtin_va_arg(ap, long)
					      : __builtin_va_arg(ap, unsigned long);
			else
				v = is_signed ? (u64)__builtin_va_arg(ap, int)
					      : __builtin_va_arg(ap, unsigned int);
		}

		switch (*fmt) {
		case 'd':
		case 'i':
			if ((long long)v < 0) {
				serial_putc('-');
				v = -v;
				width = width ? width - 1 : 0;
			}
			put_dec(v, width, pad);
			break;
		case 'u':
			put_dec(v, width, pad);
			break;
		case 'x':
			if (pad == '0')
				print_hex(v, width);
			else
				print_hex(v, 1);  /* space padding: not needed, not done */
			break;
		case 'p':
			print("0x");
			print_hex((uptr)__builtin_va_arg(ap, void *), 2 * sizeof(void *));
			break;
		case 's':
			print(__builtin_va_arg(ap, const char *));
			break;
		case 'c':
			serial_putc((char)__builtin_va_arg(ap, int));
			break;
		case '%':
			serial_putc('%');
			break;
		case '\0':
			fmt--;  /* lone '%' at the end: stop at the terminator */
			break;
		default:
			serial_putc('%');
			serial_putc(*fmt);
			break;
		}
	}
	__builtin_va_end(ap);
}
