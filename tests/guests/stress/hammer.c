/* hammer: a hostile guest program for pyvirt's devices (issue #17, "Hardening").
 *
 *   hammer SEED SECONDS [PHASES]     PHASES: comma-separated, default "pio,pcicfg,mmio,rings"
 *                                    ("wild" adds the interrupt controllers, see below)
 *
 * Root in the guest, userland. With a seeded PRNG, for SECONDS split evenly
 * over the phases, it throws random accesses at the VMM:
 *   pio     port I/O over 0-0xFFFF (iopl 3), minus the ports that legitimately
 *           end or reset the VM and minus COM1 (our output channel);
 *   pcicfg  every device's config space through sysfs and through 0xCF8/0xCFC
 *           (BARs, command register, MSI-X control, virtio's PCI_CFG window);
 *   mmio    /dev/mem (O_SYNC): unclaimed ranges below and above 4 GiB, the ECAM,
 *           the virtio BARs (needs iomem=relaxed on the kernel command line);
 *   rings   each virtio device is unbound from its driver and driven by hand:
 *           queues pointing at mlocked pages (physical addresses from
 *           /proc/self/pagemap) full of random descriptors and avail entries,
 *           DRIVER_OK, kicks; buffer addresses are either inside our own pages
 *           or outside guest RAM, so a correct VMM never writes guest memory
 *           we do not own;
 *   wild    the PIC, PIT, ELCR and speaker ports, the LAPIC and IOAPIC pages and
 *           the virtio MSI-X tables: garbage there may wedge the guest kernel
 *           (never the VMM), so it is a separate run; "wildpio" and "wildmmio"
 *           are its two halves alone.
 * Environment: HAMMER_WILD=lapic,ioapic,msix picks the wild MMIO targets (default
 * all); HAMMER_TRACE=1 prints each wild write before doing it (the last line
 * names what wedged the guest).
 * Progress goes straight to the UART data port (outb 0x3F8), bypassing the
 * kernel so that it still comes out when the guest's interrupts are wedged:
 *   HAMMER seed=... seconds=... phases=...
 *   HAMMER phase=NAME rounds=N ops=M
 *   HAMMER-DONE
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define COM1 0x3F8

/* ---- PRNG: splitmix64, seeded from the command line ---- */
static uint64_t rng_state;
static uint64_t rnd(void)
{
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
static uint64_t below(uint64_t n) { return n ? rnd() % n : 0; }
static int chance(int percent) { return (int)below(100) < percent; }
static unsigned rwidth(void) { static const unsigned w[] = {1, 2, 4}; return w[below(3)]; }

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ---- output: straight to the UART, polling LSR.THRE a bounded number of times ---- */
static void say(const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 2, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if (n > (int)sizeof buf - 3) n = sizeof buf - 3;
    buf[n++] = '\r';
    buf[n++] = '\n';
    for (int i = 0; i < n; i++) {
        for (int spin = 0; spin < 1000 && !(inb(COM1 + 5) & 0x20); spin++) {}
        outb(buf[i], COM1);
    }
}

/* ---- port I/O ---- */
static int wild_port(unsigned port)
{
    return (port >= 0x20 && port <= 0x21) || (port >= 0xA0 && port <= 0xA1) ||
           (port >= 0x40 && port <= 0x43) || port == 0x61 || port == 0x4D0 || port == 0x4D1;
}

/* Whether a write of WIDTH bytes at PORT would end or reset the VM, or garble
 * our output channel, or (outside the wild phase) reach an interrupt controller. */
static int port_forbidden(unsigned port, unsigned width, int wild)
{
    unsigned end = port + width; /* exclusive */
    if (port < 0x3F8 + 8 && end > 0x3F8) return 1;          /* COM1: our output */
    if (port == 0xCF9) return 1;                             /* reset control */
    if (port < 0x606 && end > 0x604) return 1;               /* ACPI PM1a_CNT: SLP_EN */
    if (!wild) for (unsigned p = port; p < end; p++) if (wild_port(p)) return 1;
    return 0;
}

/* i8042 commands that reset: 0xFE/0xF0-0xFF pulse the output port (bit 0 = reset
 * line), 0xD1 writes the output port with the next data byte. */
static uint32_t filter_value(unsigned port, uint32_t value)
{
    if (port == 0x64) {
        uint8_t b = value & 0xFF;
        if (b == 0xD1 || b >= 0xF0) value = (value & ~0xFFu) | 0xAD; /* disable kbd */
    }
    return value;
}

static void port_write(unsigned port, unsigned width, uint32_t value)
{
    value = filter_value(port, value);
    if (width == 1) outb(value, port);
    else if (width == 2) outw(value, port);
    else outl(value, port);
}

static uint32_t port_read(unsigned port, unsigned width)
{
    if (width == 1) return inb(port);
    if (width == 2) return inw(port);
    return inl(port);
}

static const unsigned interesting_ports[] = {
    0x60, 0x64, 0x70, 0x71, 0x80, 0x600, 0x601, 0x602, 0x603, 0x608, 0x60C,
    0xCF8, 0xCFC, 0xCFD, 0xCFE, 0xCFF, 0x2F8, 0x3E8, 0x3F0, 0x3F6, 0x1F0, 0x0, 0xC0,
};

static unsigned long phase_pio(double until, int wild)
{
    static const unsigned wild_ports[] = {0x20, 0x21, 0xA0, 0xA1, 0x40, 0x41, 0x42, 0x43,
                                          0x61, 0x4D0, 0x4D1};
    unsigned long ops = 0;
    int trace = getenv("HAMMER_TRACE") != NULL; /* each interrupt controller write */
    while (now() < until) {
        for (int i = 0; i < 256; i++, ops++) {
            unsigned port, width = rwidth();
            if (wild && chance(70))
                port = wild_ports[below(sizeof wild_ports / sizeof *wild_ports)];
            else if (chance(50))
                port = interesting_ports[below(sizeof interesting_ports / sizeof *interesting_ports)];
            else
                port = below(0x10000);
            if (port + width > 0x10000) width = 1;
            if (chance(50)) {
                port_read(port, width);
            } else if (!port_forbidden(port, width, wild)) {
                uint32_t v = (uint32_t)rnd();
                if (trace && wild_port(port)) say("HAMMER out%u(%#x)=%#x", width, port, v);
                port_write(port, width, v);
            }
        }
    }
    return ops;
}

/* ---- PCI devices (sysfs) ---- */
#define MAX_DEVS 32
struct pcidev {
    char name[32];               /* 0000:00:01.0 */
    unsigned bus, dev, fn;
    int cfg_fd;
    unsigned cfg_size;
    uint8_t saved[64];           /* header as found: BARs and command restored after garbage */
    uint16_t vendor;
    uint64_t bar_base[6], bar_len[6];
    unsigned msix_cap;           /* config offset of the MSI-X capability, 0 if none */
    unsigned pcicfg_cap;         /* virtio PCI_CFG capability, 0 if none */
};
static struct pcidev devs[MAX_DEVS];
static int ndevs;

static unsigned find_caps(struct pcidev *d, uint8_t *cfg, unsigned *pcicfg)
{
    unsigned msix = 0, pos = cfg[0x34] & 0xFC;
    *pcicfg = 0;
    for (int n = 0; pos && pos < 256 - 4 && n < 48; n++) {
        if (cfg[pos] == 0x11) msix = pos;
        if (cfg[pos] == 0x09 && cfg[pos + 3] == 5) *pcicfg = pos;
        pos = cfg[pos + 1] & 0xFC;
    }
    (void)d;
    return msix;
}

static void scan_pci(void)
{
    DIR *dir = opendir("/sys/bus/pci/devices");
    struct dirent *e;
    if (!dir) { say("HAMMER no /sys/bus/pci/devices"); return; }
    while ((e = readdir(dir)) && ndevs < MAX_DEVS) {
        if (e->d_name[0] == '.') continue;
        struct pcidev *d = &devs[ndevs];
        char path[160];
        uint8_t cfg[256];
        unsigned dom;
        snprintf(d->name, sizeof d->name, "%.31s", e->d_name);
        if (sscanf(d->name, "%x:%x:%x.%x", &dom, &d->bus, &d->dev, &d->fn) != 4) continue;
        snprintf(path, sizeof path, "/sys/bus/pci/devices/%.31s/config", d->name);
        d->cfg_fd = open(path, O_RDWR);
        if (d->cfg_fd < 0) continue;
        ssize_t got = pread(d->cfg_fd, cfg, sizeof cfg, 0);
        if (got < 64) { close(d->cfg_fd); continue; }
        d->cfg_size = lseek(d->cfg_fd, 0, SEEK_END) > 256 ? 4096 : 256;
        memcpy(d->saved, cfg, 64);
        d->vendor = cfg[0] | cfg[1] << 8;
        d->msix_cap = find_caps(d, cfg, &d->pcicfg_cap);
        snprintf(path, sizeof path, "/sys/bus/pci/devices/%.31s/resource", d->name);
        FILE *f = fopen(path, "r");
        for (int i = 0; f && i < 6; i++) {
            unsigned long long s, en, fl;
            if (fscanf(f, "%llx %llx %llx", &s, &en, &fl) != 3) break;
            if (en > s && (fl & 0x200)) { d->bar_base[i] = s; d->bar_len[i] = en - s + 1; }
        }
        if (f) fclose(f);
        ndevs++;
    }
    closedir(dir);
}

static void unbind(struct pcidev *d);
static void write_file(const char *path, const char *text);

static void cfg_write(struct pcidev *d, unsigned off, unsigned width, uint32_t v)
{
    if (pwrite(d->cfg_fd, &v, width, off) < 0) {}
}

static uint32_t cfg_read(struct pcidev *d, unsigned off, unsigned width)
{
    uint32_t v = 0;
    if (pread(d->cfg_fd, &v, width, off) < 0) {}
    return v;
}

/* Put BARs and the command register back as the kernel left them (memory +
 * bus master on), so the next phase finds the devices where sysfs says. */
static void restore_pci(void)
{
    for (int i = 0; i < ndevs; i++) {
        struct pcidev *d = &devs[i];
        cfg_write(d, 0x04, 2, 0);
        for (unsigned off = 0x10; off < 0x28; off += 4)
            cfg_write(d, off, 4, *(uint32_t *)&d->saved[off]);
        if (d->msix_cap) cfg_write(d, d->msix_cap + 2, 2, 0);
        cfg_write(d, 0x04, 2, (d->saved[4] | d->saved[5] << 8) | 0x6);
    }
}

static void cf8_access(void)
{
    struct pcidev *d = ndevs ? &devs[below(ndevs)] : NULL;
    unsigned bus = d && chance(90) ? d->bus : below(256);
    unsigned dev = d && chance(90) ? d->dev : below(32);
    unsigned fn = d && chance(90) ? d->fn : below(8);
    unsigned reg = below(256), width = rwidth();
    uint32_t addr = (chance(95) ? 0x80000000u : (uint32_t)rnd() & 0x7F000000u) |
                    bus << 16 | dev << 11 | fn << 8 | (reg & 0xFC);
    outl(addr, 0xCF8);
    unsigned port = 0xCFC + (reg & 3);
    if (port + width > 0xD00) width = 1;
    if (chance(50)) port_read(port, width);
    else port_write(port, width, (uint32_t)rnd());
}

static unsigned pick_cfg_offset(struct pcidev *d)
{
    switch (below(8)) {
    case 0: return 0x10 + 4 * below(6);                          /* BARs */
    case 1: return 0x04;                                         /* command */
    case 2: if (d->msix_cap) return d->msix_cap + below(12); break;
    case 3: if (d->pcicfg_cap) return d->pcicfg_cap + below(20); break;
    case 4: return below(64);
    }
    return below(d->cfg_size);
}

static unsigned long phase_pcicfg(double until)
{
    unsigned long ops = 0;
    if (!ndevs) return 0;
    while (now() < until) {
        for (int i = 0; i < 64; i++, ops++) {
            struct pcidev *d = &devs[below(ndevs)];
            if (chance(30)) { cf8_access(); continue; }
            unsigned off = pick_cfg_offset(d), width = rwidth();
            if (off + width > d->cfg_size) width = 1;
            if (chance(40)) cfg_read(d, off, width);
            else cfg_write(d, off, width, (uint32_t)rnd());
        }
        restore_pci();
    }
    return ops;
}

/* ---- MMIO through /dev/mem ---- */
static int memfd = -1;

struct target { uint64_t base, len; const char *what; volatile uint8_t *map; };

static volatile uint8_t *map_phys(uint64_t base, uint64_t len)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, (off_t)base);
    return p == MAP_FAILED ? NULL : (volatile uint8_t *)p;
}

static void mmio_access(volatile uint8_t *p, uint64_t len, int write_ok)
{
    static const unsigned w[] = {1, 2, 4, 8};
    unsigned width = w[below(4)];
    uint64_t off = below(len);
    if (!chance(10)) off &= ~(uint64_t)(width - 1);              /* mostly aligned */
    if (off + width > len) off = len - width;
    volatile uint8_t *a = p + off;
    uint64_t v = rnd();
    if (!write_ok || chance(40)) {
        switch (width) {
        case 1: (void)*a; break;
        case 2: (void)*(volatile uint16_t *)a; break;
        case 4: (void)*(volatile uint32_t *)a; break;
        default: (void)*(volatile uint64_t *)a; break;
        }
        return;
    }
    switch (width) {
    case 1: *a = v; break;
    case 2: *(volatile uint16_t *)a = v; break;
    case 4: *(volatile uint32_t *)a = v; break;
    default: *(volatile uint64_t *)a = v; break;
    }
}

static uint64_t ram_end;   /* end of the highest "System RAM" range in /proc/iomem */

static void read_ram_end(void)
{
    FILE *f = fopen("/proc/iomem", "r");
    char line[256];
    while (f && fgets(line, sizeof line, f)) {
        unsigned long long s, e;
        if (strstr(line, "System RAM") && sscanf(line, " %llx-%llx", &s, &e) == 2 && e + 1 > ram_end)
            ram_end = e + 1;
    }
    if (f) fclose(f);
}

#define MAX_TARGETS 64
static struct target targets[MAX_TARGETS];
static int ntargets;

static void add_target(uint64_t base, uint64_t len, const char *what)
{
    if (ntargets >= MAX_TARGETS) return;
    volatile uint8_t *m = map_phys(base, len);
    if (!m) { say("HAMMER mmio: cannot map %s at %#llx: %s", what, (unsigned long long)base, strerror(errno)); return; }
    targets[ntargets++] = (struct target){base, len, what, m};
}

static void setup_mmio(int wild)
{
    if (memfd < 0) memfd = open("/dev/mem", O_RDWR | O_SYNC);
    if (memfd < 0) { say("HAMMER no /dev/mem: %s", strerror(errno)); return; }
    ntargets = 0;
    if (wild) {
        /* HAMMER_WILD=lapic,ioapic,msix (the default: all) narrows a wedge down */
        const char *which = getenv("HAMMER_WILD");
        if (!which) which = "lapic,ioapic,msix";
        if (strstr(which, "lapic")) add_target(0xFEE00000, PAGE, "lapic");
        if (strstr(which, "ioapic")) add_target(0xFEC00000, PAGE, "ioapic");
        for (int i = 0; i < ndevs && strstr(which, "msix"); i++)
            if (devs[i].msix_cap && devs[i].bar_len[0] >= 0x6000)
                add_target(devs[i].bar_base[0] + 0x4000, 0x2000, "msix");
        return;
    }
    uint64_t re = (ram_end + PAGE - 1) & ~(PAGE - 1);
    add_target(re, 16 * PAGE, "above-ram");
    add_target(0x80000000, 16 * PAGE, "hole-2g");
    add_target(0xBFFFF000, PAGE, "below-pci32");
    add_target(0xC0000000, 16 * PAGE, "pci32");
    add_target(0xDFFF0000, 16 * PAGE, "pci32-top");
    add_target(0xE0000000, 1 << 20, "ecam");
    add_target(0xE0100000, 16 * PAGE, "above-ecam");
    add_target(0xFED00000, PAGE, "hpet");
    add_target(0xFEC00000, PAGE, "ioapic");
    add_target(0xFEE00000, PAGE, "lapic");
    add_target(0xFFFFF000, PAGE, "top-4g");
    add_target(0x100000000ULL, 16 * PAGE, "at-4g");
    add_target(0x400000000ULL, 16 * PAGE, "at-16g");
    add_target(0x800000000ULL - PAGE, PAGE, "below-pci64");
    for (int i = 0; i < ndevs; i++)
        for (int b = 0; b < 6; b++) {
            if (!devs[i].bar_len[b]) continue;
            add_target(devs[i].bar_base[b], devs[i].bar_len[b], "bar");
            add_target(devs[i].bar_base[b] + devs[i].bar_len[b], PAGE, "after-bar");
        }
    add_target(0x1000000000ULL - PAGE, PAGE, "pci64-top");
    add_target(0x1000000000ULL, PAGE, "above-pci64");
}

static unsigned long phase_mmio(double until, int wild)
{
    unsigned long ops = 0;
    int trace = getenv("HAMMER_TRACE") != NULL; /* each LAPIC write, before it is done */
    setup_mmio(wild);
    if (!ntargets) return 0;
    while (now() < until) {
        for (int i = 0; i < 128; i++, ops++) {
            struct target *t = &targets[below(ntargets)];
            int write_ok = 1;
            if (wild && t->base == 0xFEE00000) {
                /* an INIT or SIPI to ourselves parks the only vCPU for good */
                uint64_t off = below(PAGE) & ~3UL;
                uint32_t v = (uint32_t)rnd();
                if (off == 0x300 && ((v >> 8 & 7) == 5 || (v >> 8 & 7) == 6)) v &= ~0x700u;
                if (chance(40)) { (void)*(volatile uint32_t *)(t->map + off); continue; }
                if (trace) say("HAMMER lapic[%#lx]=%#x", (unsigned long)off, v);
                *(volatile uint32_t *)(t->map + off) = v;
                continue;
            }
            if (!wild && t->base == 0xFEE00000) write_ok = 0;       /* LAPIC: reads only */
            if (!wild && t->base == 0xFEC00000) {
                /* IOAPIC: any register selected and read; the kernel selects its own
                 * before each access (with interrupts off), so IOREGSEL is fair game */
                if (chance(50)) *(volatile uint32_t *)t->map = (uint32_t)rnd();
                else (void)*(volatile uint32_t *)(t->map + 0x10);
                continue;
            }
            mmio_access(t->map, t->len, write_ok);
        }
        if (!wild) restore_pci();
    }
    for (int i = 0; i < ntargets; i++) munmap((void *)targets[i].map, targets[i].len);
    ntargets = 0;
    return ops;
}

/* ---- virtio rings, driven by hand ---- */
#define NPAGES 48
static uint8_t *pages[NPAGES];
static uint64_t page_pa[NPAGES];

static int setup_pages(void)
{
    uint8_t *buf = mmap(NULL, NPAGES * PAGE, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (buf == MAP_FAILED || mlock(buf, NPAGES * PAGE)) return -1;
    int pm = open("/proc/self/pagemap", O_RDONLY);
    if (pm < 0) return -1;
    for (int i = 0; i < NPAGES; i++) {
        uint64_t ent = 0;
        pages[i] = buf + i * PAGE;
        pages[i][0] = 1; /* touched */
        if (pread(pm, &ent, 8, ((uintptr_t)pages[i] / PAGE) * 8) != 8 || !(ent >> 63) ||
            !(ent & ((1ULL << 55) - 1))) { close(pm); return -1; }
        page_pa[i] = (ent & ((1ULL << 55) - 1)) * PAGE;
    }
    close(pm);
    return 0;
}

/* pages 0-2: desc/avail/used of the queue being set up; 3-7: indirect tables;
 * 8+: data buffers */
enum { P_DESC, P_AVAIL, P_USED, P_INDIRECT = 3, P_DATA = 8 };

/* A guest-physical address the device must refuse: outside RAM (or wrapping). */
static uint64_t bad_address(uint64_t *len)
{
    switch (below(6)) {
    case 0: return ram_end + below(0xC0000000ULL - ram_end);
    case 1: return 0xC0000000ULL + below(0x40000000ULL);          /* MMIO: BARs, ECAM, APICs */
    case 2: return 0x100000000ULL + below(1ULL << 40);
    case 3: *len = 0x2000 + below(0x10000); return 0ULL - 0x1000;  /* wraps to 0 */
    case 4: return rnd() | (1ULL << 63);
    default: *len = 0x20 + below(0x10000); return ram_end - 0x10;   /* straddles RAM's end */
    }
}

/* A buffer inside one of our data pages. */
static uint64_t good_buffer(uint32_t *len, uint32_t want)
{
    int p = P_DATA + below(NPAGES - P_DATA);
    uint32_t off = below(PAGE);
    if (want && want <= PAGE) off = below(PAGE - want + 1);
    uint32_t max = PAGE - off;
    *len = want && want <= max ? want : 1 + below(max);
    return page_pa[p] + off;
}

struct vdesc { uint64_t addr; uint32_t len; uint16_t flags, next; };

static void random_desc(struct vdesc *d, unsigned qsize, int allow_bad)
{
    uint32_t len;
    if (allow_bad && chance(25)) {
        uint64_t l = below(0x20000);
        d->addr = bad_address(&l);
        d->len = (uint32_t)l;
    } else if (chance(10)) {
        int p = P_INDIRECT + below(P_DATA - P_INDIRECT);
        d->addr = page_pa[p] + 16 * below(8);
        d->len = chance(70) ? 16 * (1 + below(16)) : (uint32_t)below(PAGE);
        if (d->addr % PAGE + d->len > PAGE) d->len = PAGE - d->addr % PAGE;
        d->flags = 4 | (chance(20) ? 1 : 0);                        /* INDIRECT (+ NEXT) */
        d->next = below(qsize + 2);
        return;
    } else {
        d->addr = good_buffer(&len, chance(30) ? 16 : 0);
        d->len = chance(3) ? 0 : len;
    }
    d->flags = below(chance(90) ? 4 : 0x10000);                     /* NEXT, WRITE, rarely junk */
    if (d->flags & 4 && chance(80)) d->flags &= ~4;
    d->next = chance(90) ? below(qsize) : (uint16_t)rnd();
}

/* Fill the indirect pages with random descriptors (addresses as above). */
static void fill_indirect(void)
{
    for (int p = P_INDIRECT; p < P_DATA; p++) {
        struct vdesc *t = (struct vdesc *)pages[p];
        for (unsigned i = 0; i < PAGE / 16; i++) {
            random_desc(&t[i], 16, 1);
            if (t[i].flags & 4 && chance(70)) t[i].flags &= ~4;
        }
    }
}

/* A well-formed chain for the device: virtio-blk header + data + status, or one
 * writable buffer. Returns the head. */
static unsigned good_chain(struct vdesc *dt, unsigned qsize, unsigned head, int blk,
                           uint64_t capacity)
{
    uint32_t len;
    if (!blk || qsize < 3) {
        dt[head].addr = good_buffer(&len, 0);
        dt[head].len = len;
        dt[head].flags = 2;
        return head;
    }
    static const uint32_t types[] = {0, 1, 4, 8, 11, 13, 0, 1, 0, 1, 99};
    unsigned a = head, b = (head + 1) % qsize, c = (head + 2) % qsize;
    uint32_t type = types[below(sizeof types / sizeof *types)];
    uint32_t sectors = 1 + below(8);
    dt[a].addr = good_buffer(&len, 16);
    uint8_t *hdr = pages[0]; /* placeholder, replaced below */
    for (int p = P_DATA; p < NPAGES; p++)
        if (dt[a].addr >= page_pa[p] && dt[a].addr < page_pa[p] + PAGE)
            hdr = pages[p] + (dt[a].addr - page_pa[p]);
    uint64_t sector = chance(80) && capacity > sectors ? below(capacity - sectors + 1) : rnd();
    memcpy(hdr, &type, 4);
    memset(hdr + 4, 0, 4);
    memcpy(hdr + 8, &sector, 8);
    dt[a].len = 16; dt[a].flags = 1; dt[a].next = b;
    dt[b].addr = good_buffer(&len, 512 * sectors <= PAGE ? 512 * sectors : 0);
    dt[b].len = len;
    dt[b].flags = 1 | (type == 1 || type == 11 || type == 13 ? 0 : 2);
    dt[b].next = c;
    dt[c].addr = good_buffer(&len, 1);
    dt[c].len = 1; dt[c].flags = 2; dt[c].next = 0;
    return a;
}

/* common config offsets (virtio 1.2, 4.1.4.3) */
enum { C_DFSEL = 0x00, C_DF = 0x04, C_GFSEL = 0x08, C_GF = 0x0C, C_MSIX = 0x10, C_NUMQ = 0x12,
       C_STATUS = 0x14, C_QSEL = 0x16, C_QSIZE = 0x18, C_QMSIX = 0x1A, C_QENABLE = 0x1C,
       C_QNOTIFY = 0x1E, C_QDESC = 0x20, C_QDRIVER = 0x28, C_QDEVICE = 0x30 };
#define W8(o, v) (*(volatile uint8_t *)(bar + (o)) = (v))
#define W16(o, v) (*(volatile uint16_t *)(bar + (o)) = (v))
#define W32(o, v) (*(volatile uint32_t *)(bar + (o)) = (v))
#define R8(o) (*(volatile uint8_t *)(bar + (o)))
#define R16(o) (*(volatile uint16_t *)(bar + (o)))
#define R32(o) (*(volatile uint32_t *)(bar + (o)))
#define W64(o, v) (W32((o), (uint32_t)(v)), W32((o) + 4, (uint32_t)((v) >> 32)))

static void write_file(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY | O_TRUNC);
    if (fd >= 0) {
        if (write(fd, text, strlen(text)) < 0) {}
        close(fd);
    }
}

static void unbind(struct pcidev *d)
{
    char path[160];
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%.31s/driver/unbind", d->name);
    write_file(path, d->name);
}

static void ring_round(struct pcidev *d, volatile uint8_t *bar)
{
    int blk = (d->saved[2] | d->saved[3] << 8) == 0x1042;
    uint64_t capacity = blk ? (uint64_t)R32(0x2000) | (uint64_t)R32(0x2004) << 32 : 0;
    W8(C_STATUS, 0);
    for (int i = 0; i < 1000 && R8(C_STATUS); i++) {}
    W8(C_STATUS, 1);
    W8(C_STATUS, 3);
    W32(C_DFSEL, 0); uint64_t feat = R32(C_DF);
    W32(C_DFSEL, 1); feat |= (uint64_t)R32(C_DF) << 32;
    uint64_t want = chance(90) ? (feat & rnd()) | (1ULL << 32) : rnd();
    W32(C_GFSEL, 0); W32(C_GF, (uint32_t)want);
    W32(C_GFSEL, 1); W32(C_GF, (uint32_t)(want >> 32));
    W8(C_STATUS, 0xB);
    W16(C_MSIX, chance(80) ? 0xFFFF : (uint16_t)rnd());
    unsigned nq = R16(C_NUMQ);
    if (nq > 8) nq = 8;
    unsigned q = below(nq ? nq : 1);
    W16(C_QSEL, q);
    unsigned max = R16(C_QSIZE), size = max;
    if (max == 0) return;
    while (size > 1 && chance(40)) size >>= 1;
    if (size > 256) size = 256;
    W16(C_QSIZE, chance(95) ? size : (uint16_t)rnd());
    size = R16(C_QSIZE);
    if (!size || size > 256) size = 1;
    W16(C_QMSIX, chance(80) ? 0xFFFF : (uint16_t)rnd());
    uint64_t tmp = 0;
    W64(C_QDESC, chance(95) ? page_pa[P_DESC] : bad_address(&tmp));
    W64(C_QDRIVER, chance(95) ? page_pa[P_AVAIL] : bad_address(&tmp));
    W64(C_QDEVICE, chance(95) ? page_pa[P_USED] : bad_address(&tmp));
    struct vdesc *dt = (struct vdesc *)pages[P_DESC];
    uint16_t *avail = (uint16_t *)pages[P_AVAIL];
    memset(pages[P_USED], 0, PAGE);
    fill_indirect();
    for (unsigned i = 0; i < size; i++) random_desc(&dt[i], size, 1);
    int good = chance(50);
    avail[0] = chance(80) ? 0 : (uint16_t)rnd();                     /* flags */
    avail[1] = 0;
    W16(C_QENABLE, 1);
    W8(C_STATUS, 0xF);
    unsigned notify = R16(C_QNOTIFY);
    uint16_t idx = 0;
    for (int kick = 0; kick < 8; kick++) {
        unsigned n = 1 + below(size);
        for (unsigned i = 0; i < n; i++) {
            unsigned head = below(size);
            if (good) head = good_chain(dt, size, head, blk, capacity);
            avail[2 + (idx + i) % size] = chance(95) ? head : (uint16_t)rnd();
        }
        idx += n;
        if (chance(5)) idx = (uint16_t)rnd();
        __atomic_store_n(&avail[1], idx, __ATOMIC_RELEASE);
        W16(0x3000 + 4 * (chance(95) ? notify : below(8)), q);
        if (chance(20)) W32(below(0x3C) & ~3u, (uint32_t)rnd());      /* live common cfg */
        if (chance(20)) (void)R8(0x1000);                              /* ISR */
        if (chance(10)) W8(0x2000 + below(0x40), (uint8_t)rnd());     /* device config */
        if (chance(10)) random_desc(&dt[below(size)], size, 1);        /* change under it */
        usleep(200);
    }
    usleep(1000);
}

static unsigned long phase_rings(double until)
{
    unsigned long rounds = 0;
    if (setup_pages()) { say("HAMMER rings: cannot lock/translate pages"); return 0; }
    if (memfd < 0) memfd = open("/dev/mem", O_RDWR | O_SYNC);
    volatile uint8_t *bars[MAX_DEVS] = {0};
    for (int i = 0; i < ndevs; i++) {
        struct pcidev *d = &devs[i];
        if (d->vendor != 0x1AF4 || d->bar_len[0] < 0x4000) continue;
        cfg_write(d, 0x04, 2, 0x6);                                    /* memory + master */
        bars[i] = map_phys(d->bar_base[0], 0x4000);
    }
    while (now() < until) {
        int any = 0;
        for (int i = 0; i < ndevs && now() < until; i++) {
            if (!bars[i]) continue;
            any = 1;
            ring_round(&devs[i], bars[i]);
            rounds++;
        }
        if (!any) { say("HAMMER rings: no virtio device"); break; }
        if (rounds % 64 == 0) say("HAMMER phase=rings rounds=%lu", rounds);
    }
    for (int i = 0; i < ndevs; i++) {
        if (!bars[i]) continue;
        volatile uint8_t *bar = bars[i];
        W8(C_STATUS, 0);                      /* reset: the device forgets our pages */
        munmap((void *)bars[i], 0x4000);
    }
    return rounds;
}

static void no_ctrlaltdel(void)
{
    char buf[4096], out[4096];
    size_t o = 0;
    int fd = open("/etc/inittab", O_RDONLY);
    if (fd < 0) return;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return;
    buf[n] = 0;
    for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n"))
        if (!strstr(line, "ctrlaltdel")) o += snprintf(out + o, sizeof out - o, "%s\n", line);
    write_file("/etc/inittab", out);
    kill(1, SIGHUP); /* busybox init re-reads its inittab */
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s SEED SECONDS [pio,pcicfg,mmio,rings,wild]\n", argv[0]);
        return 2;
    }
    uint64_t seed = strtoull(argv[1], NULL, 0);
    double seconds = strtod(argv[2], NULL);
    const char *phases = argc > 3 ? argv[3] : "pio,pcicfg,mmio,rings";
    if (iopl(3)) { perror("iopl"); return 1; }
    rng_state = seed;
    say("");
    say("HAMMER seed=%llu seconds=%.0f phases=%s", (unsigned long long)seed, seconds, phases);
    /* random bytes on the i8042 data port are keystrokes: SysRq-B or Ctrl-Alt-Del would
     * reboot the guest on purpose. Detach the keyboard driver (random i8042 commands
     * may bring it back), turn SysRq off and drop init's ctrlaltdel action. */
    write_file("/proc/sys/kernel/sysrq", "0");
    no_ctrlaltdel();
    write_file("/sys/bus/serio/devices/serio0/drvctl", "none");
    write_file("/sys/bus/serio/devices/serio1/drvctl", "none");
    read_ram_end();
    scan_pci();
    say("HAMMER ram_end=%#llx pci_devices=%d", (unsigned long long)ram_end, ndevs);
    /* the virtio devices are ours from now on: their drivers would only get confused */
    for (int i = 0; i < ndevs; i++)
        if (devs[i].vendor == 0x1AF4) unbind(&devs[i]);

    char list[128];
    snprintf(list, sizeof list, "%s", phases);
    int n = 1;
    for (const char *c = list; *c; c++) n += *c == ',';
    double slice = seconds / n;
    char *save = NULL;
    for (char *ph = strtok_r(list, ",", &save); ph; ph = strtok_r(NULL, ",", &save)) {
        double until = now() + slice;
        unsigned long ops;
        say("HAMMER phase=%s start", ph);
        if (!strcmp(ph, "pio")) ops = phase_pio(until, 0);
        else if (!strcmp(ph, "pcicfg")) ops = phase_pcicfg(until);
        else if (!strcmp(ph, "mmio")) ops = phase_mmio(until, 0);
        else if (!strcmp(ph, "rings")) ops = phase_rings(until);
        else if (!strcmp(ph, "wildpio")) ops = phase_pio(until, 1);
        else if (!strcmp(ph, "wildmmio")) ops = phase_mmio(until, 1);
        else if (!strcmp(ph, "wild")) {
            ops = phase_pio(now() + slice / 2, 1);
            ops += phase_mmio(until, 1);
        } else { say("HAMMER unknown phase %s", ph); return 2; }
        say("HAMMER phase=%s ops=%lu", ph, ops);
    }
    say("HAMMER-DONE");
    return 0;
}
