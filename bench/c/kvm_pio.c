/* Baseline for the exit round-trip benchmark: the smallest C VMM that runs
   pyvirt's test guest ELF (test=pio: 200000 `outb` to port 0x80, then an ACPI
   power-off) with the same machine shape as pyvirt's KVM backend (in-kernel
   irqchip + PIT, long mode entry, identity-mapped 4 GiB). Prints the seconds
   spent in the KVM_RUN loop and the number of port-0x80 exits.
   Usage: kvm_pio GUEST.elf */
#include <elf.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MEM (256UL << 20)
#define die(msg) do { perror(msg); exit(1); } while (0)

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: %s guest.elf\n", argv[0]); return 2; }
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM");
    uint8_t *mem = mmap(NULL, MEM, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    struct kvm_userspace_memory_region r = { .slot = 0, .guest_phys_addr = 0, .memory_size = MEM,
                                             .userspace_addr = (uint64_t)mem };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r) < 0) die("KVM_SET_USER_MEMORY_REGION");
    ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000UL);
    if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0) die("KVM_CREATE_IRQCHIP");
    struct kvm_pit_config pit = { .flags = KVM_PIT_SPEAKER_DUMMY };
    if (ioctl(vm, KVM_CREATE_PIT2, &pit) < 0) die("KVM_CREATE_PIT2");

    /* load the ELF's PT_LOAD segments at their physical addresses */
    int gf = open(argv[1], O_RDONLY);
    struct stat st; fstat(gf, &st);
    uint8_t *img = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, gf, 0);
    Elf64_Ehdr *eh = (Elf64_Ehdr *)img;
    for (int i = 0; i < eh->e_phnum; i++) {
        Elf64_Phdr *ph = (Elf64_Phdr *)(img + eh->e_phoff + i * eh->e_phentsize);
        if (ph->p_type != PT_LOAD) continue;
        if (ph->p_paddr + ph->p_memsz > MEM) { fprintf(stderr, "segment outside RAM\n"); return 1; }
        memcpy(mem + ph->p_paddr, img + ph->p_offset, ph->p_filesz);
    }
    /* zero page with the command line, GDT, identity page tables (as pyvirt) */
    strcpy((char *)mem + 0x20000, "test=pio");
    *(uint32_t *)(mem + 0x7000 + 0x228) = 0x20000;
    uint64_t *gdt = (uint64_t *)(mem + 0x500);
    gdt[0] = 0; gdt[1] = 0; gdt[2] = 0x00af9b000000ffffULL; gdt[3] = 0x00cf93000000ffffULL;
    uint64_t *pml4 = (uint64_t *)(mem + 0x9000), *pdpt = (uint64_t *)(mem + 0xa000);
    pml4[0] = 0xa000 | 3;
    for (int i = 0; i < 4; i++) {
        pdpt[i] = (0xb000 + i * 0x1000) | 3;
        uint64_t *pd = (uint64_t *)(mem + 0xb000 + i * 0x1000);
        for (int j = 0; j < 512; j++) pd[j] = (((uint64_t)i << 30) + ((uint64_t)j << 21)) | 0x83;
    }

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) die("KVM_CREATE_VCPU");
    int mmap_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);

    struct { struct kvm_cpuid2 c; struct kvm_cpuid_entry2 e[256]; } cpuid = { .c.nent = 256 };
    if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, &cpuid) == 0) ioctl(vcpu, KVM_SET_CPUID2, &cpuid);

    struct kvm_sregs sregs;
    ioctl(vcpu, KVM_GET_SREGS, &sregs);
    struct kvm_segment code = { .base = 0, .limit = 0xffffffff, .selector = 0x10, .type = 11,
                                .present = 1, .s = 1, .l = 1, .g = 1 };
    struct kvm_segment data = { .base = 0, .limit = 0xffffffff, .selector = 0x18, .type = 3,
                                .present = 1, .s = 1, .db = 1, .g = 1 };
    sregs.cs = code; sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
    sregs.gdt.base = 0x500; sregs.gdt.limit = 4 * 8 - 1;
    sregs.cr3 = 0x9000; sregs.cr4 = 0x20; sregs.cr0 = 0x80050033; sregs.efer = 0x500;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
    struct kvm_regs regs = { .rip = eh->e_entry, .rsi = 0x7000, .rsp = 0x8ff0, .rflags = 2 };
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");

    struct timespec t0, t1;
    long port80 = 0;
    int started = 0;
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
        if (run->exit_reason != KVM_EXIT_IO) {
            fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
            return 1;
        }
        uint8_t *d = (uint8_t *)run + run->io.data_offset;
        if (run->io.port == 0x80) {
            if (!started) { clock_gettime(CLOCK_MONOTONIC, &t0); started = 1; }
            port80++;
        } else if (run->io.port == 0x3fd && run->io.direction == KVM_EXIT_IO_IN) {
            d[0] = 0x60;  /* LSR: transmitter empty */
        } else if (run->io.port == 0x3f8 && run->io.direction == KVM_EXIT_IO_OUT) {
            if (port80 == 200000) clock_gettime(CLOCK_MONOTONIC, &t1);
        } else if (run->io.port == 0x604 && run->io.direction == KVM_EXIT_IO_OUT) {
            break;
        }
    }
    printf("%.6f %ld\n", (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9, port80);
    return 0;
}
