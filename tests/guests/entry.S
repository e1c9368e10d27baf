/* Entry of the pyvirt test guest. The VMM enters here in 64-bit long mode
   (Linux 64-bit boot protocol): CS=0x10, DS/SS=0x18, paging identity-maps
   0-4 GiB, interrupts off, RSI = boot_params. */
    .section .text.entry, "ax"
    .code64
    .globl _start
_start:
    lea stack_top(%rip), %rsp
    mov %rsi, %rdi
    call guest_main
1:  cli
    hlt
    jmp 1b

/* Application processors: INIT/SIPI start them in real mode at 0x6000
   (SIPI vector 6). Go real -> protected -> long mode, reusing the BSP's GDT
   (0x500: 0x10 code64, 0x18 data) and page tables (CR3 = 0x9000). */
    .section .trampoline, "ax"
    .code16
    .globl ap_trampoline
ap_trampoline:
    cli
    xor %ax, %ax
    mov %ax, %ds
    lgdtl ap_gdt_ptr
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $ap_protected
    .code32
ap_protected:
    mov $0x18, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov %cr4, %eax
    or $0x20, %eax            /* PAE */
    mov %eax, %cr4
    mov $0x9000, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx     /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000000, %eax      /* PG */
    mov %eax, %cr0
    ljmpl $0x10, $ap_long
    .code64
ap_long:
    /* per-AP stack: atomically take the next 4 KiB slot */
    mov $1, %eax
    lock xadd %eax, ap_counter
    inc %eax
    shl $12, %eax
    lea ap_stacks(%rip), %rsp
    add %rax, %rsp
    mov %eax, %edi
    shr $12, %edi
    mov $ap_main, %rax
    call *%rax
2:  cli
    hlt
    jmp 2b

    .p2align 3
ap_gdt:
    .quad 0
    .quad 0x00cf9b000000ffff  /* 0x08: 32-bit flat code, for the hop */
    .quad 0x00af9b000000ffff  /* 0x10: 64-bit code */
    .quad 0x00cf93000000ffff  /* 0x18: flat data */
ap_gdt_ptr:
    .word ap_gdt_ptr - ap_gdt - 1
    .long ap_gdt
    .globl ap_counter
ap_counter:
    .long 0

    .bss
    .p2align 12
    .space 16384
stack_top:
    .globl ap_stacks
ap_stacks:
    .space 4096 * 8
