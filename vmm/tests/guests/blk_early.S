/* blk_early: a virtio-blk driver that posts a request before DRIVER_OK (issue 12 item 2). It sets
   up the request queue, makes an IN of sector 1 available and notifies, and only then writes
   DRIVER_OK: the device must serve that chain once it is activated, on the VMM thread (serving
   it on the vCPU thread that wrote DRIVER_OK breaks that thread's seccomp filter and kills the
   process with SIGSYS). It prints "EARLY " and the first 16 bytes of the sector, then
   "EARLY DONE" and resets the machine. */
        .intel_syntax noprefix
        .code64
        .global _start
        .text

#include "virtio_blk.inc"

_start:
        call    blk_init
        xor     eax, eax
        mov     edx, 1
        mov     ecx, DESC_WRITE
        call    blk_post                            /* before DRIVER_OK */
        mov     dword ptr [rbx + 0x70], 15          /* DRIVER_OK */
        call    blk_wait
        cmp     al, 0
        mov     ah, 'i'
        jne     fail
        lea     rsi, [rip + early_msg]
        mov     ecx, 6
        call    print
        mov     esi, BDATA
        mov     ecx, 16
        call    print
        lea     rsi, [rip + done_msg]
        mov     ecx, 11
        call    print
        jmp     reset

early_msg:
        .ascii  "EARLY "
done_msg:
        .ascii  "EARLY DONE\n"
