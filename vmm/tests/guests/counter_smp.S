/* counter_smp: counter.S for two vCPUs. The boot vCPU starts the second one (INIT and SIPI
   through the local APIC, a real-mode trampoline copied to 0x6000 that enters long mode on the
   VMM's boot GDT and page tables), which then counts on its own, in r13 and in memory
   (`ap_count`), checking before each step that the two agree. The boot vCPU prints its own
   counter, one number per line, each followed by " +" when the second vCPU's count moved since
   the previous line and " =" when it did not. A mismatch on either vCPU prints "MISMATCH\n" or
   "AP MISMATCH\n" and resets. */
        .intel_syntax noprefix
        .code64
        .global _start
#include "counter.inc"
        .set    DELAY, 20000
        .set    TRAMPOLINE, 0x6000
        .set    APIC_BASE, 0xfee00000
        .text
_start:
        /* copy the trampoline below 1 MiB */
        lea     rsi, [rip + ap_trampoline]
        mov     edi, TRAMPOLINE
        mov     ecx, ap_trampoline_end - ap_trampoline
        rep movsb
        /* software-enable the local APIC, then INIT and SIPI (vector 6 = 0x6000) to APIC id 1 */
        mov     eax, APIC_BASE
        mov     dword ptr [rax + 0xf0], 0x1ff
        mov     dword ptr [rax + 0x310], 1 << 24
        mov     dword ptr [rax + 0x300], 0x4500
        mov     ecx, 1000
3:
        dec     ecx
        jnz     3b
        mov     dword ptr [rax + 0x310], 1 << 24
        mov     dword ptr [rax + 0x300], 0x4600 | (TRAMPOLINE >> 12)

        xor     r12, r12
        xor     r14, r14
        mov     qword ptr [rip + count], 0
        mov     r8, 10
next:
        cmp     byte ptr [rip + ap_mismatch], 0
        jne     ap_failed
        cmp     r12, qword ptr [rip + count]
        jne     mismatch
        inc     r12
        mov     qword ptr [rip + count], r12
        PRINT_R12
        mov     al, ' '
        out     dx, al
        mov     rcx, qword ptr [rip + ap_count]
        mov     al, '='
        cmp     rcx, r14
        je      4f
        mov     al, '+'
4:
        mov     r14, rcx
        out     dx, al
        mov     al, '\n'
        out     dx, al
        mov     ecx, DELAY
spin:
        dec     ecx
        jnz     spin
        jmp     next

ap_failed:
        lea     rsi, [rip + ap_mismatch_msg]
        mov     ecx, ap_mismatch_end - ap_mismatch_msg
        jmp     say_and_reset
        MISMATCH_REPORTS

/* The second vCPU, in 64-bit mode. */
ap_entry64:
        mov     ax, 0x10
        mov     ds, ax
        mov     es, ax
        mov     ss, ax
        xor     r13, r13
ap_loop:
        cmp     r13, qword ptr [rip + ap_count]
        jne     ap_bad
        inc     r13
        mov     qword ptr [rip + ap_count], r13
        mov     ecx, 200
5:
        dec     ecx
        jnz     5b
        jmp     ap_loop
ap_bad:
        mov     byte ptr [rip + ap_mismatch], 1
6:
        hlt
        jmp     6b

/* Real-mode start of the second vCPU, run from TRAMPOLINE (CS base): straight to long mode. */
        .code16
ap_trampoline:
        cli
        mov     ax, cs
        mov     ds, ax
        lgdt    [ap_gdtr - ap_trampoline]
        mov     eax, cr4
        or      eax, 0x20               /* PAE */
        mov     cr4, eax
        mov     eax, 0x9000             /* layout::PML4_ADDR */
        mov     cr3, eax
        mov     ecx, 0xc0000080         /* EFER */
        rdmsr
        or      eax, 0x100              /* LME */
        wrmsr
        mov     eax, cr0
        or      eax, 0x80000001         /* PG | PE */
        mov     cr0, eax
        .byte   0x66, 0xea              /* ljmpl 0x08:ap_entry64 */
        .long   ap_entry64
        .word   0x08
ap_gdtr:
        .word   31                      /* the VMM's boot GDT: 4 entries at layout::GDT_ADDR */
        .long   0x500
ap_trampoline_end:
        .code64

ap_mismatch_msg:
        .ascii  "AP MISMATCH\n"
ap_mismatch_end:

        .data
count:
        .quad   0
ap_count:
        .quad   0
ap_mismatch:
        .byte   0

        .bss
digits:
        .skip   24
digits_end:
