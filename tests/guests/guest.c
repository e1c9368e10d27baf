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
     count     LAPIC timer every 1 ms counting ticks (and the largest TSC gap
               between two) while the main loop counts as fast as it can; both
               in the COUNT_AREA page, which the host reads (test_kvm_state.py)
     count-hlt the same, but the main loop counts one per wake-up from hlt
     virtio-blk  a virtio 1.2 modern PCI driver: find 1af4:1042, move BAR0 below
               4 GiB, MSI-X, split queue; write, flush, read back, GET_ID
               (see tests/integration/test_kvm_virtio.py)
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

/* ---- count, count-hlt: counters the host reads from guest memory ---- */
#define COUNT_AREA 0x30000UL  /* a free page after the command line (layout.py) */
#define COUNT_MAGIC 0x544e554f43564b50ULL  /* "PKVCOUNT" */
struct count_area {
    uint64_t magic;      /* written once the timer runs */
    uint64_t counter;    /* the main loop's count */
    uint64_t ticks;      /* timer interrupts */
    uint64_t last_tsc;   /* TSC at the last tick */
    uint64_t max_gap;    /* largest TSC delta between two ticks (the host may zero it) */
    uint64_t backwards;  /* ticks whose TSC was below the previous one */
};
static volatile struct count_area *const count_area = (volatile struct count_area *)COUNT_AREA;
static inline uint64_t rdtsc(void) {
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (uint64_t)hi << 32 | lo;
}
__attribute__((interrupt)) static void count_isr(struct iframe *f) {
    (void)f;
    uint64_t now = rdtsc(), last = count_area->last_tsc;
    if (last) {
        if (now < last) count_area->backwards++;
        else if (now - last > count_area->max_gap) count_area->max_gap = now - last;
    }
    count_area->last_tsc = now;
    count_area->ticks++;
    lapic_eoi();
}
static void test_count(int use_hlt) {
    count_area->counter = count_area->ticks = count_area->last_tsc = 0;
    count_area->max_gap = count_area->backwards = 0;
    set_gate(0x42, count_isr);
    load_idt();
    lapic_enable();
    mmio_w32(LAPIC + 0x3e0, 0x3);               /* divide by 16: 16 ns/count under KVM */
    mmio_w32(LAPIC + 0x320, 0x42 | (1 << 17));  /* periodic, vector 0x42 */
    mmio_w32(LAPIC + 0x380, 62500);             /* 1 ms */
    count_area->magic = COUNT_MAGIC;
    puts_poll(use_hlt ? "count-hlt: running\n" : "count: running\n");
    __asm__ volatile("sti");
    if (use_hlt) for (;;) { __asm__ volatile("hlt"); count_area->counter++; }
    for (;;) count_area->counter++;
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

/* ---- virtio-blk: a minimal virtio 1.2 modern PCI driver ----
   Virtio 1.2: 4.1 (PCI transport), 5.2 (block device), 2.7 (split virtqueue).
   Finds 1af4:1042 on bus 0 with configuration mechanism #1, walks its
   capability list through ECAM, sizes BAR0 and moves it into the 32-bit
   window (the VMM placed it above 4 GiB, outside our identity map), then
   initialises the device as 3.1.1 says with one 16-entry split queue and
   MSI-X vector 0 for it. Requests: a batch of four posted before one kick
   (read sector 0, GET_ID, two 4-sector writes at sector 16, one through an
   indirect table), a FLUSH, then two reads of sectors 16-23 compared with
   what was written. Completions are waited for in hlt, woken by the MSI. */
static inline void outl(uint16_t p, uint32_t v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(p)); }
static inline uint32_t inl(uint16_t p) { uint32_t v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline uint16_t inw(uint16_t p) { uint16_t v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline void mmio_w8(uint64_t a, uint8_t v) { *(volatile uint8_t *)a = v; }
static inline void mmio_w16(uint64_t a, uint16_t v) { *(volatile uint16_t *)a = v; }
static inline uint8_t mmio_r8(uint64_t a) { return *(volatile uint8_t *)a; }
static inline uint16_t mmio_r16(uint64_t a) { return *(volatile uint16_t *)a; }
static inline void mb(void) { __asm__ volatile("mfence" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

#define PCI_ECAM 0xe0000000UL
#define PCI_CMD_IO 0x1
#define PCI_CMD_MEM 0x2
#define PCI_CMD_MASTER 0x4
#define PCI_CMD_INTX_OFF 0x400
#define VBLK_BAR_NEW 0xd0000000UL  /* where we move BAR0: the 32-bit PCI window */
#define VBLK_VECTOR 0x50
#define WATCHDOG_VECTOR 0x41

static uint32_t pci_addr(int dev, int reg) { return 0x80000000u | (uint32_t)dev << 11 | (uint32_t)(reg & 0xfc); }
static uint32_t cfg_r32(int dev, int reg) { outl(0xcf8, pci_addr(dev, reg)); return inl(0xcfc); }
static uint16_t cfg_r16(int dev, int reg) { outl(0xcf8, pci_addr(dev, reg)); return inw((uint16_t)(0xcfc + (reg & 2))); }
static void cfg_w32(int dev, int reg, uint32_t v) { outl(0xcf8, pci_addr(dev, reg)); outl(0xcfc, v); }
static void cfg_w16(int dev, int reg, uint16_t v) { outl(0xcf8, pci_addr(dev, reg)); outw((uint16_t)(0xcfc + (reg & 2)), v); }
static uint64_t ecam(int dev, int reg) { return PCI_ECAM + ((uint64_t)dev << 15) + (uint64_t)reg; }

/* common configuration (4.1.4.3) */
#define VC_DFSELECT 0x00
#define VC_DFEATURE 0x04
#define VC_GFSELECT 0x08
#define VC_GFEATURE 0x0c
#define VC_CONFIG_MSIX 0x10
#define VC_NUM_QUEUES 0x12
#define VC_STATUS 0x14
#define VC_GENERATION 0x15
#define VC_QSELECT 0x16
#define VC_QSIZE 0x18
#define VC_QMSIX 0x1a
#define VC_QENABLE 0x1c
#define VC_QNOTIFY_OFF 0x1e
#define VC_QDESC 0x20
#define VC_QDRIVER 0x28
#define VC_QDEVICE 0x30
#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 0x40
#define S_FAILED 0x80
#define NO_VECTOR 0xffff
/* feature bits */
#define BLK_F_SEG_MAX 2
#define BLK_F_RO 5
#define BLK_F_BLK_SIZE 6
#define BLK_F_FLUSH 9
#define F_INDIRECT_DESC 28
#define F_EVENT_IDX 29
#define F_VERSION_1 32
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define BLK_T_GET_ID 8

#define VQ_SIZE 16
#define VQD_NEXT 1
#define VQD_WRITE 2
#define VQD_INDIRECT 4
struct vq_desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
struct vq_avail { uint16_t flags, idx, ring[VQ_SIZE], used_event; };
struct vq_used_elem { uint32_t id, len; };
struct vq_used { uint16_t flags, idx; struct vq_used_elem ring[VQ_SIZE]; uint16_t avail_event; };
static struct vq_desc vq_desc[VQ_SIZE] __attribute__((aligned(4096)));
static volatile struct vq_avail vq_avail __attribute__((aligned(4096)));
static volatile struct vq_used vq_used __attribute__((aligned(4096)));

/* request slot r owns descriptors 4r..4r+3 (head 4r) */
#define NREQ 4
struct blk_hdr { uint32_t type, reserved; uint64_t sector; };
static struct blk_hdr req_hdr[NREQ] __attribute__((aligned(16)));
static volatile uint8_t req_status[NREQ];
static uint32_t req_len[NREQ], req_want[NREQ];
static int req_busy[NREQ];
static struct vq_desc req_indirect[NREQ][4] __attribute__((aligned(16)));
static uint8_t sector0[512] __attribute__((aligned(512)));
static uint8_t wbuf[4096] __attribute__((aligned(4096)));
static uint8_t rbuf[4096] __attribute__((aligned(4096)));
static char idbuf[24];

static uint64_t vb_common, vb_isr, vb_devcfg, vq_notify;
static int vq_event_idx, vq_indirect;
static uint16_t vq_next_avail, vq_last_used;
static uint32_t vq_kicks;
static volatile uint32_t vblk_irqs, watchdog_fired;

__attribute__((interrupt)) static void vblk_isr(struct iframe *f) { (void)f; vblk_irqs++; lapic_eoi(); }
__attribute__((interrupt)) static void watchdog_isr(struct iframe *f) { (void)f; watchdog_fired = 1; lapic_eoi(); }

static void vblk_fail(const char *why) {
    puts_poll("virtio-blk: FAIL: ");
    puts_poll(why);
    puts_poll("\n");
    poweroff();
}
static void put_hex32(uint32_t v) { for (int i = 24; i >= 0; i -= 8) put_hex2((uint8_t)(v >> i)); }
static void put_dec64(uint64_t v) {
    char b[21]; int i = 0;
    do { b[i++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (i) putc_poll(b[--i]);
}
static uint8_t pattern(uint32_t i) { return (uint8_t)((i * 7) ^ (i >> 9) ^ 0xa5); }

/* post request slot r: header, optional data (split in nseg equal segments,
   device-writable for reads), status; through an indirect table if asked */
static void vblk_post(int r, uint32_t type, uint64_t sector, void *buf, uint32_t len, int nseg,
                      int indirect) {
    int dev_writes = type == BLK_T_IN || type == BLK_T_GET_ID;
    struct vq_desc *d = indirect ? req_indirect[r] : &vq_desc[4 * r];
    int base = indirect ? 0 : 4 * r, n = 0;
    if (req_busy[r]) vblk_fail("request slot busy");
    req_hdr[r] = (struct blk_hdr){ type, 0, sector };
    req_status[r] = 0xff;
    d[n] = (struct vq_desc){ (uint64_t)&req_hdr[r], sizeof(struct blk_hdr), VQD_NEXT, (uint16_t)(base + n + 1) };
    n++;
    for (int s = 0; s < nseg; s++, n++)
        d[n] = (struct vq_desc){ (uint64_t)buf + s * (len / nseg), len / (uint32_t)nseg,
                                 (uint16_t)(VQD_NEXT | (dev_writes ? VQD_WRITE : 0)), (uint16_t)(base + n + 1) };
    d[n] = (struct vq_desc){ (uint64_t)&req_status[r], 1, VQD_WRITE, 0 };
    n++;
    if (indirect)
        vq_desc[4 * r] = (struct vq_desc){ (uint64_t)req_indirect[r], (uint32_t)(n * sizeof(struct vq_desc)), VQD_INDIRECT, 0 };
    req_busy[r] = 1;
    req_want[r] = (dev_writes ? len : 0) + 1;  /* what the used ring's len must say */
    vq_avail.ring[vq_next_avail % VQ_SIZE] = (uint16_t)(4 * r);
    vq_next_avail++;
}

/* publish what was posted and notify the device unless it said not to (2.7.13) */
static void vblk_kick(void) {
    uint16_t old = vq_avail.idx, new = vq_next_avail;
    barrier();                 /* descriptors and ring entries before idx (x86: stores in order) */
    vq_avail.idx = new;
    mb();                      /* idx visible before we read the device's suppression state */
    int need;
    if (vq_event_idx) {
        uint16_t ev = vq_used.avail_event;
        need = (uint16_t)(new - ev - 1) < (uint16_t)(new - old);
    } else {
        need = !(vq_used.flags & 1);
    }
    if (need) {
        mmio_w16(vq_notify, 0);  /* queue 0: a 16-bit write of the queue index */
        vq_kicks++;
    }
}

static int vblk_reap(void) {
    int n = 0;
    while (vq_last_used != vq_used.idx) {
        barrier();
        struct vq_used_elem e = vq_used.ring[vq_last_used % VQ_SIZE];
        int r = (int)(e.id / 4);
        if (e.id % 4 || r >= NREQ || !req_busy[r]) vblk_fail("used ring names a buffer we did not post");
        req_len[r] = e.len;
        req_busy[r] = 0;
        vq_last_used++;
        n++;
    }
    if (vq_event_idx) vq_avail.used_event = vq_last_used;  /* interrupt me on the next one */
    return n;
}

/* sleep in hlt until `outstanding` requests completed; a LAPIC one-shot timer
   (5 s) is the watchdog */
static void vblk_wait(int outstanding) {
    watchdog_fired = 0;
    mmio_w32(LAPIC + 0x3e0, 0x3);                   /* divide by 16: 16 ns/count under KVM */
    mmio_w32(LAPIC + 0x320, WATCHDOG_VECTOR);       /* one-shot */
    mmio_w32(LAPIC + 0x380, 312500000);             /* 5 s */
    for (;;) {
        __asm__ volatile("cli");
        outstanding -= vblk_reap();
        mb();
        if (vq_used.idx != vq_last_used) continue;  /* completed while we published used_event */
        if (outstanding <= 0) break;
        if (watchdog_fired) {
            __asm__ volatile("sti");
            puts_poll("virtio-blk: used idx=");
            put_dec(vq_used.idx);
            puts_poll(" irqs=");
            put_dec(vblk_irqs);
            puts_poll("\n");
            vblk_fail("timeout waiting for completions");
        }
        __asm__ volatile("sti; hlt");  /* the interrupt shadow makes check-then-sleep race free */
    }
    __asm__ volatile("sti");
    mmio_w32(LAPIC + 0x380, 0);                     /* disarm */
}

static void vblk_check(int r, const char *what, int may_ioerr) {
    if (req_status[r] == 0 && req_len[r] == req_want[r]) return;
    puts_poll("virtio-blk: ");
    puts_poll(what);
    puts_poll(" status=");
    put_dec(req_status[r]);
    puts_poll(req_status[r] == 1 ? " (IOERR)" : req_status[r] == 2 ? " (UNSUPP)" : "");
    puts_poll(" len=");
    put_dec(req_len[r]);
    puts_poll("\n");
    if (!(may_ioerr && req_status[r] == 1 && req_len[r] == 1)) vblk_fail("request failed");
}

static void test_virtio_blk(void) {
    /* find the device: bus 0, mechanism #1 */
    int dev = -1;
    for (int d = 0; d < 32 && dev < 0; d++)
        if (cfg_r32(d, 0) == 0x10421af4) dev = d;
    if (dev < 0) vblk_fail("no virtio-blk (1af4:1042) on bus 0");
    if (mmio_r32(ecam(dev, 0)) != 0x10421af4) vblk_fail("ECAM disagrees with CF8/CFC");
    puts_poll("virtio-blk: found at 00:");
    put_hex2((uint8_t)dev);
    puts_poll(".0\n");

    /* capabilities (4.1.4), walked through ECAM */
    uint32_t off_common = 0, off_notify = 0, off_isr = 0, off_dev = 0, notify_mult = 0;
    int have = 0, msix = 0;
    if (!(mmio_r16(ecam(dev, 0x06)) & 0x10)) vblk_fail("no capability list");
    for (uint8_t p = mmio_r8(ecam(dev, 0x34)) & 0xfc, guard = 0; p && guard < 48; guard++) {
        uint8_t id = mmio_r8(ecam(dev, p));
        if (id == 0x09) {
            uint8_t type = mmio_r8(ecam(dev, p + 3)), bar = mmio_r8(ecam(dev, p + 4));
            uint32_t off = mmio_r32(ecam(dev, p + 8));
            if (type >= 1 && type <= 4 && !(have & (1 << type))) {  /* the first of each kind */
                if (bar != 0) vblk_fail("virtio structure outside BAR0");
                have |= 1 << type;
                if (type == 1) off_common = off;
                if (type == 2) { off_notify = off; notify_mult = mmio_r32(ecam(dev, p + 16)); }
                if (type == 3) off_isr = off;
                if (type == 4) off_dev = off;
            }
        } else if (id == 0x11) {
            msix = p;
        }
        p = mmio_r8(ecam(dev, p + 1)) & 0xfc;
    }
    if (have != 0x1e) vblk_fail("missing virtio capabilities");
    if (!msix) vblk_fail("no MSI-X capability");
    uint32_t tbl = cfg_r32(dev, msix + 4);
    if ((tbl & 7) != 0) vblk_fail("MSI-X table outside BAR0");

    /* size BAR0 and move it into the 32-bit window, decoding off meanwhile */
    uint16_t cmd = cfg_r16(dev, 0x04);
    cfg_w16(dev, 0x04, (uint16_t)(cmd & ~(PCI_CMD_IO | PCI_CMD_MEM | PCI_CMD_MASTER)));
    uint32_t lo = cfg_r32(dev, 0x10), hi = cfg_r32(dev, 0x14);
    if ((lo & 0x7) != 0x4) vblk_fail("BAR0 is not a 64-bit memory BAR");
    uint64_t old = (uint64_t)hi << 32 | (lo & ~0xfu);
    cfg_w32(dev, 0x10, 0xffffffff);
    cfg_w32(dev, 0x14, 0xffffffff);
    uint64_t mask = (uint64_t)cfg_r32(dev, 0x14) << 32 | (cfg_r32(dev, 0x10) & ~0xfu);
    uint64_t size = ~mask + 1;
    if (!size || size & (size - 1) || size > 0x100000 || VBLK_BAR_NEW % size) vblk_fail("odd BAR0 size");
    cfg_w32(dev, 0x10, (uint32_t)VBLK_BAR_NEW);
    cfg_w32(dev, 0x14, 0);
    cfg_w16(dev, 0x04, (uint16_t)((cmd | PCI_CMD_MEM | PCI_CMD_MASTER | PCI_CMD_INTX_OFF) & ~PCI_CMD_IO));
    if ((cfg_r32(dev, 0x10) & ~0xfu) != VBLK_BAR_NEW || cfg_r32(dev, 0x14) != 0) vblk_fail("BAR0 did not take");
    puts_poll("virtio-blk: BAR0 ");
    put_hex64(old);
    puts_poll(" -> ");
    put_hex64(VBLK_BAR_NEW);
    puts_poll(" size ");
    put_hex32((uint32_t)size);
    puts_poll("\n");
    vb_common = VBLK_BAR_NEW + off_common;
    vb_isr = VBLK_BAR_NEW + off_isr;
    vb_devcfg = VBLK_BAR_NEW + off_dev;
    uint64_t msix_table = VBLK_BAR_NEW + (tbl & ~7u);
    (void)vb_isr;

    /* interrupts: our vector, the LAPIC, MSI-X on with the function masked */
    set_gate(VBLK_VECTOR, vblk_isr);
    set_gate(WATCHDOG_VECTOR, watchdog_isr);
    load_idt();
    lapic_enable();
    uint32_t apic_id = mmio_r32(LAPIC + 0x20) >> 24;
    uint16_t mctl = cfg_r16(dev, msix + 2);
    cfg_w16(dev, msix + 2, (uint16_t)(mctl | 0x8000 | 0x4000));  /* enable + function mask */
    mmio_w32(msix_table + 12, 1);                                /* entry 0 masked while written */
    mmio_w32(msix_table + 0, 0xfee00000u | apic_id << 12);       /* fixed, physical destination */
    mmio_w32(msix_table + 4, 0);
    mmio_w32(msix_table + 8, VBLK_VECTOR);                       /* edge, fixed delivery */
    mmio_w32(msix_table + 12, 0);                                /* unmask the entry */
    cfg_w16(dev, msix + 2, (uint16_t)((mctl | 0x8000) & ~0x4000)); /* function unmasked */

    /* device initialisation (3.1.1) */
    mmio_w8(vb_common + VC_STATUS, 0);
    for (int i = 0; mmio_r8(vb_common + VC_STATUS) != 0; i++) if (i > 1000) vblk_fail("reset did not finish");
    mmio_w8(vb_common + VC_STATUS, S_ACKNOWLEDGE);
    mmio_w8(vb_common + VC_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    mmio_w32(vb_common + VC_DFSELECT, 0);
    uint64_t dfeat = mmio_r32(vb_common + VC_DFEATURE);
    mmio_w32(vb_common + VC_DFSELECT, 1);
    dfeat |= (uint64_t)mmio_r32(vb_common + VC_DFEATURE) << 32;
    if (!(dfeat >> F_VERSION_1 & 1)) vblk_fail("device lacks VIRTIO_F_VERSION_1");
    uint64_t want = 1ULL << F_VERSION_1 | 1ULL << F_EVENT_IDX | 1ULL << F_INDIRECT_DESC
                  | 1ULL << BLK_F_RO | 1ULL << BLK_F_FLUSH | 1ULL << BLK_F_BLK_SIZE | 1ULL << BLK_F_SEG_MAX;
    uint64_t gfeat = dfeat & want;
    mmio_w32(vb_common + VC_GFSELECT, 0);
    mmio_w32(vb_common + VC_GFEATURE, (uint32_t)gfeat);
    mmio_w32(vb_common + VC_GFSELECT, 1);
    mmio_w32(vb_common + VC_GFEATURE, (uint32_t)(gfeat >> 32));
    mmio_w8(vb_common + VC_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    if (!(mmio_r8(vb_common + VC_STATUS) & S_FEATURES_OK)) vblk_fail("device refused our features");
    vq_event_idx = (int)(gfeat >> F_EVENT_IDX & 1);
    vq_indirect = (int)(gfeat >> F_INDIRECT_DESC & 1);
    int ro = (int)(gfeat >> BLK_F_RO & 1);
    puts_poll("virtio-blk: features device=");
    put_hex64(dfeat);
    puts_poll(" driver=");
    put_hex64(gfeat);
    puts_poll("\n");
    if (ro) puts_poll("virtio-blk: read-only device (VIRTIO_BLK_F_RO)\n");

    /* queue 0 (4.1.5.1.3) */
    if (mmio_r16(vb_common + VC_NUM_QUEUES) < 1) vblk_fail("no queues");
    mmio_w16(vb_common + VC_CONFIG_MSIX, NO_VECTOR);
    mmio_w16(vb_common + VC_QSELECT, 0);
    uint16_t qmax = mmio_r16(vb_common + VC_QSIZE);
    if (qmax < VQ_SIZE) vblk_fail("queue too small");
    mmio_w16(vb_common + VC_QSIZE, VQ_SIZE);
    mmio_w32(vb_common + VC_QDESC, (uint32_t)(uint64_t)vq_desc);
    mmio_w32(vb_common + VC_QDESC + 4, (uint32_t)((uint64_t)vq_desc >> 32));
    mmio_w32(vb_common + VC_QDRIVER, (uint32_t)(uint64_t)&vq_avail);
    mmio_w32(vb_common + VC_QDRIVER + 4, (uint32_t)((uint64_t)&vq_avail >> 32));
    mmio_w32(vb_common + VC_QDEVICE, (uint32_t)(uint64_t)&vq_used);
    mmio_w32(vb_common + VC_QDEVICE + 4, (uint32_t)((uint64_t)&vq_used >> 32));
    mmio_w16(vb_common + VC_QMSIX, 0);
    if (mmio_r16(vb_common + VC_QMSIX) != 0) vblk_fail("device did not take MSI-X vector 0");
    vq_notify = VBLK_BAR_NEW + off_notify + (uint64_t)mmio_r16(vb_common + VC_QNOTIFY_OFF) * notify_mult;
    mmio_w16(vb_common + VC_QENABLE, 1);
    mmio_w8(vb_common + VC_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    if (mmio_r8(vb_common + VC_STATUS) & (S_NEEDS_RESET | S_FAILED)) vblk_fail("device needs a reset");

    /* capacity: a 64-bit field, read twice-32 under the generation counter (4.1.3.1) */
    uint64_t capacity;
    for (;;) {
        uint8_t g = mmio_r8(vb_common + VC_GENERATION);
        capacity = mmio_r32(vb_devcfg) | (uint64_t)mmio_r32(vb_devcfg + 4) << 32;
        if (mmio_r8(vb_common + VC_GENERATION) == g) break;
    }
    if (capacity < 24) vblk_fail("disk smaller than 24 sectors");

    /* batch 1: four requests, one kick */
    for (uint32_t i = 0; i < sizeof(wbuf); i++) wbuf[i] = pattern(i);
    vblk_post(0, BLK_T_IN, 0, sector0, 512, 1, 0);
    vblk_post(1, BLK_T_GET_ID, 0, idbuf, 20, 1, 0);
    vblk_post(2, BLK_T_OUT, 16, wbuf, 2048, 1, vq_indirect);
    vblk_post(3, BLK_T_OUT, 20, wbuf + 2048, 2048, 2, 0);
    vblk_kick();
    vblk_wait(4);
    vblk_check(0, "read sector 0", 0);
    vblk_check(1, "GET_ID", 0);
    vblk_check(2, "write sectors 16-19", ro);
    vblk_check(3, "write sectors 20-23", ro);
    if (!ro && (req_status[2] || req_status[3])) vblk_fail("write failed");
    if (ro && (req_status[2] != 1 || req_status[3] != 1)) vblk_fail("write to a read-only disk succeeded");
    uint32_t h = 2166136261u;  /* FNV-1a over sector 0 */
    for (int i = 0; i < 512; i++) h = (h ^ sector0[i]) * 16777619u;
    puts_poll("virtio-blk: sector0 fnv1a=");
    put_hex32(h);
    puts_poll(" text=");
    for (int i = 0; i < 32 && sector0[i] >= 0x20 && sector0[i] < 0x7f; i++) putc_poll((char)sector0[i]);
    puts_poll("\n");

    /* batch 2: flush; batch 3: read 16-23 back in two requests */
    vblk_post(0, BLK_T_FLUSH, 0, 0, 0, 0, 0);
    vblk_kick();
    vblk_wait(1);
    vblk_check(0, "FLUSH", 0);
    for (uint32_t i = 0; i < sizeof(rbuf); i++) rbuf[i] = 0;
    vblk_post(0, BLK_T_IN, 16, rbuf, 2048, 1, vq_indirect);
    vblk_post(1, BLK_T_IN, 20, rbuf + 2048, 2048, 4, 0);
    vblk_kick();
    vblk_wait(2);
    vblk_check(0, "read sectors 16-19", 0);
    vblk_check(1, "read sectors 20-23", 0);
    int same = 1;
    for (uint32_t i = 0; i < sizeof(rbuf); i++) if (rbuf[i] != wbuf[i]) { same = 0; break; }
    if (!ro && !same) vblk_fail("read back differs from what was written");
    if (ro && same) vblk_fail("read-only disk holds what we wrote");

    puts_poll("virtio-blk: kicks=");
    put_dec(vq_kicks);
    puts_poll(" used_idx=");
    put_dec(vq_used.idx);
    puts_poll(" event_idx=");
    put_dec((uint32_t)vq_event_idx);
    puts_poll(" indirect=");
    put_dec((uint32_t)vq_indirect);
    puts_poll("\n");
    puts_poll("virtio-blk: capacity=");
    put_dec64(capacity);
    puts_poll(" sectors serial=");
    for (int i = 0; i < 20 && idbuf[i]; i++) putc_poll(idbuf[i]);
    if (ro) puts_poll(" read-only: writes rejected with IOERR, data unchanged");
    else puts_poll(" wrote+read 8 sectors ok");
    puts_poll(", irqs=");
    put_dec(vblk_irqs);
    puts_poll("\n");
    mmio_w8(vb_common + VC_STATUS, 0);  /* reset the device before leaving */
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
    if (is(t, "virtio-blk")) test_virtio_blk();
    if (is(t, "count")) test_count(0);
    if (is(t, "count-hlt")) test_count(1);
    if (is(t, "halt")) { puts_poll("halting\n"); for (;;) __asm__ volatile("cli; hlt"); }
    puts_poll("unknown test\n");
    poweroff();
}
