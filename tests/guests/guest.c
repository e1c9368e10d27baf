/* pyvirt test guest: one freestanding binary, the test picked by "test=NAME"
   on the kernel command line. Runs in ring 0, 64-bit, identity-mapped.
   Tests (see tests/integration/test_kvm_guests.py):
     boot      print "!" at once, then power off (VMM start-up benchmark)
     hello     print a line with THRE interrupts, echo input with RX interrupts
               until 'q', then power off
     timer     count 10 LAPIC timer interrupts (periodic), print, power off
     rtc       print the CMOS RTC date/time, power off
     reset     print "boot", reset via the i8042 (0xFE to port 0x64)
     reset-cf9 print "boot", reset via port 0xCF9
     triple    load an empty IDT and fault: triple fault
     smp       start every AP with INIT/SIPI/SIPI, each reports, power off
     pio       200000 byte writes to port 0x80, then power off
     halt      cli; hlt forever (the VMM must still stop on a signal)
*/
#include <stdint.h>

#define COM1 0x3f8
#define PM1A_CNT 0x604
#define LAPIC 0xfee00000UL
#define IOAPIC 0xfec00000UL

struct idt_gate { uint16_t off0, sel; uint8_t ist, type; uint16_t off1; uint32_t off2, zero; };
static struct idt_gate idt[256] __attribute__((aligned(16)));
struct __attribute__((packed)) dtr { uint16_t limit; uint64_t base; };

static inline void outb(uint16_t p, uint8_t v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(p)); }
static inline void outw(uint16_t p, uint16_t v) { __asm__ volatile("outw %0, %1" :: "a"(v), "Nd"(p)); }
static inline uint8_t inb(uint16_t p) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline void mmio_w32(uint64_t a, uint32_t v) { *(volatile uint32_t *)a = v; }
static inline uint32_t mmio_r32(uint64_t a) { return *(volatile uint32_t *)a; }

static void putc_poll(char c) {
    while (!(inb(COM1 + 5) & 0x20)) {}
    outb(COM1, (uint8_t)c);
}
static void puts_poll(const char *s) { while (*s) { if (*s == '\n') putc_poll('\r'); putc_poll(*s++); } }
static void put_hex2(uint8_t v) { const char *h = "0123456789abcdef"; putc_poll(h[v >> 4]); putc_poll(h[v & 15]); }
static void put_dec(uint32_t v) {
    char b[12]; int i = 0;
    do { b[i++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (i) putc_poll(b[--i]);
}

static void poweroff(void) {
    outw(PM1A_CNT, (5 << 10) | (1 << 13));  /* SLP_TYP=5 (our \_S5), SLP_EN */
    for (;;) __asm__ volatile("cli; hlt");
}

static void set_gate(int vec, void *fn) {
    uint64_t a = (uint64_t)fn;
    idt[vec] = (struct idt_gate){ (uint16_t)a, 0x10, 0, 0x8e, (uint16_t)(a >> 16), (uint32_t)(a >> 32), 0 };
}
extern void *exc_table[32];
static void put_hex64(uint64_t v) { for (int i = 56; i >= 0; i -= 8) put_hex2((uint8_t)(v >> i)); }
void guest_exception(uint64_t *f) {
    puts_poll("\nEXCEPTION ");
    put_dec((uint32_t)f[0]);
    puts_poll(" error ");
    put_hex64(f[1]);
    puts_poll(" rip ");
    put_hex64(f[2]);
    puts_poll("\n");
    poweroff();
}
static void load_idt(void) {
    for (int v = 0; v < 32; v++) if (!idt[v].type) set_gate(v, exc_table[v]);
    struct dtr d = { sizeof(idt) - 1, (uint64_t)idt };
    __asm__ volatile("lidt %0" :: "m"(d));
}
static void lapic_eoi(void) { mmio_w32(LAPIC + 0xb0, 0); }
static void lapic_enable(void) {
    mmio_w32(LAPIC + 0xf0, 0x1ff);  /* SVR: software enable, spurious vector 0xff */
    mmio_w32(LAPIC + 0x80, 0);      /* TPR: accept everything */
}
static void ioapic_route(int pin, int vector, int dest) {
    mmio_w32(IOAPIC, 0x10 + 2 * pin + 1);
    mmio_w32(IOAPIC + 0x10, (uint32_t)dest << 24);
    mmio_w32(IOAPIC, 0x10 + 2 * pin);
    mmio_w32(IOAPIC + 0x10, (uint32_t)vector);  /* fixed, physical, edge, high, unmasked */
}

struct iframe;

/* ---- hello: interrupt-driven UART ---- */
static const char hello_msg[] = "Hello from the pyvirt test guest (interrupt-driven UART)\r\n";
static volatile int tx_pos;
static volatile int tx_done;
static volatile char rx_buf[256];
static volatile unsigned rx_head, rx_tail;

__attribute__((interrupt)) static void uart_isr(struct iframe *f) {
    (void)f;
    for (;;) {
        uint8_t iir = inb(COM1 + 2);
        if (iir & 1) break;                      /* no interrupt pending */
        switch (iir & 0x0e) {
        case 0x02:                               /* THR empty */
            if (hello_msg[tx_pos]) outb(COM1, (uint8_t)hello_msg[tx_pos++]);
            else { tx_done = 1; outb(COM1 + 1, 0x01); }  /* keep RX, stop THRE */
            break;
        case 0x04: case 0x0c:                    /* RX data / timeout */
            while (inb(COM1 + 5) & 1) rx_buf[rx_head++ & 255] = (char)inb(COM1);
            break;
        default:
            (void)inb(COM1 + 5); (void)inb(COM1 + 6);
        }
    }
    lapic_eoi();
}

static void test_hello(void) {
    set_gate(0x24, uart_isr);
    load_idt();
    lapic_enable();
    ioapic_route(4, 0x24, 0);
    outb(COM1 + 3, 0x03);           /* 8N1 */
    outb(COM1 + 2, 0x07);           /* FIFO on, reset both */
    outb(COM1 + 4, 0x08);           /* OUT2: let the IRQ reach the PIC/IOAPIC */
    outb(COM1 + 1, 0x03);           /* RX data + THR empty interrupts */
    __asm__ volatile("sti");
    while (!tx_done) __asm__ volatile("hlt");
    for (;;) {
        __asm__ volatile("cli");
        if (rx_tail == rx_head) { __asm__ volatile("sti; hlt"); continue; }
        char c = rx_buf[rx_tail++ & 255];
        __asm__ volatile("sti");
        if (c == 'q') break;
        if (c >= 'a' && c <= 'z') c = (char)(c - 32);  /* echo upper-cased: proves it went through us */
        if (c == '\n' || c == '\r') puts_poll("\n"); else putc_poll(c);
    }
    puts_poll("\nbye\n");
    poweroff();
}

/* ---- timer: LAPIC periodic ---- */
static volatile uint32_t ticks;
__attribute__((interrupt)) static void timer_isr(struct iframe *f) { (void)f; ticks++; lapic_eoi(); }

static void test_timer(void) {
    set_gate(0x40, timer_isr);
    load_idt();
    lapic_enable();
    mmio_w32(LAPIC + 0x3e0, 0x3);          /* divide by 16 */
    mmio_w32(LAPIC + 0x320, 0x40 | (1 << 17));  /* periodic, vector 0x40 */
    mmio_w32(LAPIC + 0x380, 200000);
    __asm__ volatile("sti");
    while (ticks < 10) __asm__ volatile("hlt");
    mmio_w32(LAPIC + 0x320, 1 << 16);      /* mask */
    puts_poll("timer: ");
    put_dec(ticks);
    puts_poll(" ticks\n");
    poweroff();
}

/* ---- rtc ---- */
static uint8_t cmos(uint8_t r) { outb(0x70, r); return inb(0x71); }
static void test_rtc(void) {
    while (cmos(0x0a) & 0x80) {}           /* wait out an update in progress */
    uint8_t s = cmos(0), mi = cmos(2), h = cmos(4), d = cmos(7), mo = cmos(8), y = cmos(9), c = cmos(0x32);
    uint8_t b = cmos(0x0b);
    puts_poll("RTC ");
    if (!(b & 0x04)) {                      /* BCD: nibbles are decimal digits */
        put_hex2(c); put_hex2(y); putc_poll('-'); put_hex2(mo); putc_poll('-'); put_hex2(d);
        putc_poll(' '); put_hex2(h); putc_poll(':'); put_hex2(mi); putc_poll(':'); put_hex2(s);
    } else {
        puts_poll("binary");
    }
    puts_poll("\n");
    poweroff();
}

/* ---- smp ---- */
extern volatile uint32_t ap_counter;
extern char ap_trampoline[];
static volatile uint32_t ap_seen;
static volatile int print_lock;

void ap_main(uint32_t n) {
    while (__atomic_exchange_n(&print_lock, 1, __ATOMIC_ACQUIRE)) {}
    puts_poll("AP ");
    put_dec(n);
    puts_poll(" up, APIC ID ");
    put_dec(mmio_r32(LAPIC + 0x20) >> 24);
    puts_poll("\n");
    __atomic_store_n(&print_lock, 0, __ATOMIC_RELEASE);
    __atomic_fetch_add(&ap_seen, 1, __ATOMIC_SEQ_CST);
}

static void delay(unsigned n) { for (volatile unsigned i = 0; i < n; i++) {} }

static void test_smp(uint32_t ncpus) {
    lapic_enable();
    uint32_t vec = (uint32_t)((uint64_t)ap_trampoline >> 12);
    for (uint32_t id = 1; id < ncpus; id++) {
        mmio_w32(LAPIC + 0x310, id << 24);
        mmio_w32(LAPIC + 0x300, 0x4500);         /* INIT, assert */
        delay(1000);
        mmio_w32(LAPIC + 0x310, id << 24);
        mmio_w32(LAPIC + 0x300, 0x4600 | vec);   /* SIPI */
        delay(200);
        mmio_w32(LAPIC + 0x310, id << 24);
        mmio_w32(LAPIC + 0x300, 0x4600 | vec);   /* second SIPI, as the MP spec says */
    }
    for (uint64_t spin = 0; ap_seen < ncpus - 1 && spin < 2000000000ULL; spin++) __asm__ volatile("pause");
    while (__atomic_exchange_n(&print_lock, 1, __ATOMIC_ACQUIRE)) {}
    puts_poll("cpus=");
    put_dec(ap_seen + 1);
    puts_poll("\n");
    poweroff();
}

/* ---- command line ---- */
static const char *find_test(const char *cl) {
    for (const char *p = cl; *p; p++)
        if (p[0] == 't' && p[1] == 'e' && p[2] == 's' && p[3] == 't' && p[4] == '=' && (p == cl || p[-1] == ' '))
            return p + 5;
    return "";
}
static int is(const char *t, const char *name) {
    while (*name) if (*t++ != *name++) return 0;
    return *t == 0 || *t == ' ';
}
static uint32_t find_ncpus(const char *cl) {
    for (const char *p = cl; *p; p++)
        if (p[0] == 'n' && p[1] == 'c' && p[2] == 'p' && p[3] == 'u' && p[4] == 's' && p[5] == '=')
            return (uint32_t)(p[6] - '0');
    return 2;
}

void guest_main(uint8_t *boot_params) {
    const char *cl = (const char *)(uint64_t)*(uint32_t *)(boot_params + 0x228);  /* hdr.cmd_line_ptr */
    const char *t = find_test(cl);
    outb(0x21, 0xff);  /* mask the 8259s, as an OS does: we route through the IOAPIC */
    outb(0xa1, 0xff);
    if (is(t, "boot")) { putc_poll('!'); poweroff(); }
    if (is(t, "hello")) test_hello();
    if (is(t, "timer")) test_timer();
    if (is(t, "rtc")) test_rtc();
    if (is(t, "reset")) { puts_poll("boot\n"); outb(0x64, 0xfe); for (;;) __asm__ volatile("cli; hlt"); }
    if (is(t, "reset-cf9")) { puts_poll("boot\n"); outb(0xcf9, 0x06); for (;;) __asm__ volatile("cli; hlt"); }
    if (is(t, "triple")) {
        struct dtr d = { 0, 0 };
        puts_poll("faulting\n");
        __asm__ volatile("lidt %0; ud2" :: "m"(d));
    }
    if (is(t, "smp")) test_smp(find_ncpus(cl));
    if (is(t, "pio")) {
        for (int i = 0; i < 200000; i++) outb(0x80, (uint8_t)i);
        puts_poll("pio done\n");
        poweroff();
    }
    if (is(t, "halt")) { puts_poll("halting\n"); for (;;) __asm__ volatile("cli; hlt"); }
    puts_poll("unknown test\n");
    poweroff();
}
