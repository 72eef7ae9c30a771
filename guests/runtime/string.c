/*
 * memset, memcpy and memcmp. Guests rarely call the first two, but gcc may
 * emit calls to them on its own (zeroing or copying a struct), even with
 * -ffreestanding, and there is no libc to provide them. rep stos/movs keeps
 * them short and stops gcc from "optimising" a C loop back into a call to
 * itself. memcmp is for the guests: signatures of firmware tables, fw_cfg
 * names and items read two ways.
 */
#include "runtime.h"

void *memset(void *dst, int c, uptr n)
{
	void *d = dst;

	__asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
	return dst;
}

void *memcpy(void *dst, const void *src, uptr n)
{
	void *d = dst;

	__asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
	return dst;
}

int memcmp(const void *a, const void *b, uptr n)
{
	const u8 *x = a, *y = b;

	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x < *y ? -1 : 1;
	return 0;
}
