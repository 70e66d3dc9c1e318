/* counter_blk: counter.S whose every step also reads the disk, for the snapshot tests of
   virtio device state. It drives the read-only virtio-blk device in the first virtio-mmio
   slot (virtio_blk.inc); for each number n it reads sector n mod 8, whose first 8 bytes the
   test wrote as the sector's number, and checks them and the request's status: anything else
   is "MISMATCH" and a reset. So a restore that loses the request queue's position (the guest
   would wait for a used entry that never comes, or find a stale one) or the disk shows in the
   console. Interrupts stay disabled; everything is polled. */
        .intel_syntax noprefix
        .code64
        .text

#include "virtio_blk.inc"

        .macro  counter_setup
        call    blk_init
        mov     dword ptr [rbx + 0x70], 15          /* DRIVER_OK */
        .endm

        .macro  counter_step
        xor     eax, eax                            /* IN */
        mov     rdx, r12
        and     edx, 7                              /* sector n mod 8 */
        push    rdx
        mov     ecx, DESC_WRITE
        call    blk_request
        pop     rdx
        cmp     al, 0                               /* VIRTIO_BLK_S_OK */
        jne     mismatch
        cmp     qword ptr [BDATA], rdx
        jne     mismatch
        .endm

#define COUNTER_HOOKS
#define DELAY 5000
#include "counter.S"
