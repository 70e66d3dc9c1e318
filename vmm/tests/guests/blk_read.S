/* blk_read: a minimal virtio-blk driver against a read-only disk in the first virtio-mmio slot.
   It checks the device id, VERSION_1 and RO, sets up the request queue, then sends three
   requests, each header -> data -> status (one chain in flight, completion polled):
   an IN of sector 1, whose first and last 16 bytes it prints; an OUT to sector 0, whose status
   it prints ("OUT <status>"); an IN of the sector past the end ("RANGE <status>"). Then
   "BLK DONE" and a machine reset. */
        .intel_syntax noprefix
        .code64
        .global _start
        .text

/* blk_init, blk_request, print_status and the BLK* addresses come from here. */
#include "virtio_blk.inc"

_start:
        call    blk_init
        mov     dword ptr [rbx + 0x70], 15          /* DRIVER_OK */

        /* IN sector 1 */
        xor     eax, eax
        mov     edx, 1
        mov     ecx, DESC_WRITE
        call    blk_request
        cmp     al, 0
        mov     ah, 'i'
        jne     fail
        cmp     r9d, 513
        mov     ah, 'l'
        jne     fail
        mov     esi, BDATA
        mov     ecx, 16
        call    print
        mov     esi, BDATA + 496
        mov     ecx, 16
        call    print

        /* OUT sector 0: refused on a read-only disk */
        mov     eax, 1
        xor     edx, edx
        xor     ecx, ecx
        call    blk_request
        lea     rsi, [rip + out_msg]
        mov     ecx, 4
        call    print_status

        /* IN of the sector past the end */
        xor     eax, eax
        mov     rdx, qword ptr [V_CAP]
        mov     ecx, DESC_WRITE
        call    blk_request
        lea     rsi, [rip + range_msg]
        mov     ecx, 6
        call    print_status

        lea     rsi, [rip + done_msg]
        mov     ecx, 9
        call    print
        jmp     reset

out_msg:
        .ascii  "OUT "
range_msg:
        .ascii  "RANGE "
done_msg:
        .ascii  "BLK DONE\n"
