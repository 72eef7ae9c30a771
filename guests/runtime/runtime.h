/*
 * The freestanding runtime shared by the test guests.
 *
 * There is no libc and no system header here on purpose: the guests must
 * build for both x86-64 and i386 with a stock gcc, and the i386 side has no
 * C library installed on most machines (that would need gcc-multilib).
 * Everything a guest needs is in this header and the few .c/.S files next
 * to it.
 */
#ifndef GUEST_RUNTIME_H
#define GUEST_RUNTIME_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned long uptr;  /* pointer-sized on both i386 and x86-64 */

#define NORETURN __attribute__((noreturn))

/* Fixed I/O ports of the pyvmm machine (docs/guest-abi.md, "Devices"). */
#define COM1_PORT 0x3F8
#define COM1_LSR (COM1_PORT + 5)
#define LSR_THRE 0x20          /* transmit holding register empty */
#define DEBUG_EXIT_PORT 0xF4   /* isa-debug-exit */
#define PM1A_CNT_PORT 0x604    /* ACPI PM1a control */
#define PM1A_SLP_EN 0x2000

/* Provided by each guest. Returning 0 powers off, anything else is passed
 * to guest_exit(), so a test can tell "finished" from "failed at step r". */
int guest_main(unsigned cpu, unsigned ncpus);

/* ---- port I/O ----
 * Every in/out traps to the VMM (KVM_EXIT_IO); that is the point of most of
 * these guests. The "memory" clobber keeps the compiler from moving memory
 * accesses across a device access. */
static inline void outb(u16 port, u8 v)  { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port) : "memory"); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" :: "a"(v), "Nd"(port) : "memory"); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port) : "memory"); }

static inline u8 inb(u16 port)  { u8 v;  __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port) : "memory"); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port) : "memory"); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port) : "memory"); return v; }

/* String I/O: one instruction moves n bytes, which KVM reports as a single
 * exit with count = n (the VMM has to handle the whole buffer at once). */
static inline void outsb(u16 port, const void *buf, uptr n)
{
	__asm__ volatile("rep outsb" : "+S"(buf), "+c"(n) : "d"(port) : "memory");
}

static inline void insb(u16 port, void *buf, uptr n)
{
	__asm__ volatile("rep insb" : "+D"(buf), "+c"(n) : "d"(port) : "memory");
}

/* ---- MMIO ----
 * volatile makes each call exactly one load or store of exactly that width,
 * which is what the VMM sees as one KVM_EXIT_MMIO of len 1, 2, 4 or 8. */
static inline void mmio_write8(uptr a, u8 v)   { *(volatile u8 *)a = v; }
static inline void mmio_write16(uptr a, u16 v) { *(volatile u16 *)a = v; }
static inline void mmio_write32(uptr a, u32 v) { *(volatile u32 *)a = v; }
static inline u8 mmio_read8(uptr a)   { return *(volatile u8 *)a; }
static inline u16 mmio_read16(uptr a) { return *(volatile u16 *)a; }
static inline u32 mmio_read32(uptr a) { return *(volatile u32 *)a; }
#ifdef __x86_64__
/* Only in 64-bit code: i386 would split a u64 access into two 32-bit ones. */
static inline void mmio_write64(uptr a, u64 v) { *(volatile u64 *)a = v; }
static inline u64 mmio_read64(uptr a) { return *(volatile u64 *)a; }
#endif

/* ---- spinlock ----
 * All vCPUs start at once (no INIT/SIPI) and share one UART, so output from
 * several vCPUs must be serialised or lines interleave byte by byte. */
typedef struct { volatile u32 locked; } spinlock_t;

static inline void spin_lock(spinlock_t *l)
{
	while (__atomic_exchange_n(&l->locked, 1, __ATOMIC_ACQUIRE))
		while (l->locked)
			__builtin_ia32_pause();  /* be polite to a hyperthread sibling */
}

static inline void spin_unlock(spinlock_t *l)
{
	__atomic_store_n(&l->locked, 0, __ATOMIC_RELEASE);
}

/* ---- serial console (serial.c) ---- */
void serial_putc(char c);
void serial_write(const void *buf, uptr n);
void print(const char *s);
void print_hex(u64 v, unsigned digits);   /* zero-padded, lowercase */
void print_dec(u64 v);
/* %s %c %d %u %x %p %%, with optional 0/width and l/ll (e.g. %016llx). */
void printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- string.c: what gcc may call behind our back, and memcmp ---- */
void *memset(void *dst, int c, uptr n);
void *memcpy(void *dst, const void *src, uptr n);
int memcmp(const void *a, const void *b, uptr n);

/* ---- little-endian fields at any alignment ----
 * Firmware tables and fw_cfg items are byte layouts with fields wherever the
 * format puts them; reading byte by byte needs no alignment and no packed
 * struct per table. */
static inline u16 get_le16(const void *p)
{
	const u8 *b = p;

	return (u16)(b[0] | b[1] << 8);
}

static inline u32 get_le32(const void *p)
{
	return get_le16(p) | (u32)get_le16((const u8 *)p + 2) << 16;
}

static inline u64 get_le64(const void *p)
{
	return get_le32(p) | (u64)get_le32((const u8 *)p + 4) << 32;
}

/* ---- ending a run (exit.c) ---- */
NORETURN void guest_exit(u8 v);   /* exit status (v << 1) | 1 */
NORETURN void guest_poweroff(void);  /* exit status 0 */
NORETURN void guest_halt(void);   /* this vCPU is done: cli; hlt forever */
/* A failed check: print "FAIL: what (got 0x.., want 0x..)", then
 * guest_exit(code), so the test sees what failed and at which step. */
NORETURN void guest_fail(u8 code, const char *what, u64 got, u64 want);
void guest_expect(u8 code, const char *what, u64 got, u64 want);  /* fails unless equal */

#endif
