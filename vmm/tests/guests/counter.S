/* counter: prints an increasing decimal counter on COM1, one number per line ("1\n2\n3\n..."),
   forever, for the snapshot tests. The count is kept twice, in r12 and in memory (`count`);
   before each step the two must agree, else the guest prints "MISMATCH\n" and resets through
   the i8042. So a restore that brings back memory but not registers (or the reverse) shows,
   and a restored guest that repeats or skips a number shows in the console. Between numbers it
   spins DELAY iterations (by default about 25 ms of emulated ring-0 time on a slow host;
   counter_fast.S sets 1, so the guest is almost always in or next to a port access).

   With CHECK_IIR defined it also enables the UART's transmitter-empty interrupt (IER bit 1,
   interrupts stay disabled in the CPU) and, after every byte it writes, reads the interrupt
   identification register, which must say "transmitter empty" (0xc2): that read clears the
   condition (a second read gives 0xc1), so a restore that repeats the IN, or that loses the
   UART's IER or IIR, prints "IIR MISMATCH\n" and resets.

   With COUNTER_HOOKS defined, the including guest's GAS macros run too: `counter_setup` once
   at the start, and `counter_step` after each increment, before the number is printed (with
   r12 the new number; it may clobber rax, rcx, rdx, rsi and rdi, and jump to `mismatch`). */
#ifndef DELAY
#define DELAY 20000
#endif
        .intel_syntax noprefix
        .code64
        .global _start

#include "counter.inc"

        .text
_start:
#ifdef CHECK_IIR
        mov     dx, 0x3f9               /* IER: transmitter-empty interrupt */
        mov     al, 0x02
        out     dx, al
#endif
#ifdef COUNTER_HOOKS
        counter_setup
#endif
        xor     r12, r12
        mov     qword ptr [rip + count], 0
        mov     r8, 10
next:
        cmp     r12, qword ptr [rip + count]
        jne     mismatch
        inc     r12
        mov     qword ptr [rip + count], r12
#ifdef COUNTER_HOOKS
        counter_step
#endif
        PRINT_R12
        mov     al, '\n'
        out     dx, al
        CHECK_THRE
        mov     ecx, DELAY
spin:
        dec     ecx
        jnz     spin
        jmp     next

        MISMATCH_REPORTS

        .data
count:
        .quad   0

        .bss
digits:
        .skip   24
digits_end:
