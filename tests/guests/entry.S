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

/* Exception stubs for vectors 0-31: push a dummy error code where the CPU
   pushes none, push the vector, and report through guest_exception(). */
    .text
    .code64
.macro EXC vec, has_err
    .globl exc_\vec
exc_\vec:
    .if \has_err == 0
    push $0
    .endif
    push $\vec
    jmp exc_common
.endm
EXC 0,0; EXC 1,0; EXC 2,0; EXC 3,0; EXC 4,0; EXC 5,0; EXC 6,0; EXC 7,0
EXC 8,1; EXC 9,0; EXC 10,1; EXC 11,1; EXC 12,1; EXC 13,1; EXC 14,1; EXC 15,0
EXC 16,0; EXC 17,1; EXC 18,0; EXC 19,0; EXC 20,0; EXC 21,1; EXC 22,0; EXC 23,0
EXC 24,0; EXC 25,0; EXC 26,0; EXC 27,0; EXC 28,0; EXC 29,1; EXC 30,1; EXC 31,0
exc_common:
    mov %rsp, %rdi            /* [vector, error, rip, cs, rflags, rsp, ss] */
    and $-16, %rsp
    call guest_exception
1:  cli
    hlt
    jmp 1b
    .section .rodata
    .globl exc_table
exc_table:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad exc_\v
    .endr
