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

/* print, fail, reset, setup_queue and the queue constants (QSZ, RXQ...) come from here. */
#include "virtio_vsock.inc"

        .set BLKQ,     RXQ              /* desc table; avail +0x100, used +0x200 */
        .set BHDR,     RXHDR            /* 16-byte request header */
        .set BDATA,    RXDATA           /* 512-byte data buffer */
        .set BSTATUS,  TXHDR            /* status byte */
        .set V_AVAIL,  VARS+0           /* u16: avail idx */
        .set V_CAP,    VARS+8           /* u64: capacity in sectors */

/* blk_request: eax = type, rdx = sector, ecx = data descriptor flags (DESC_WRITE for IN,
   0 for OUT). Sends header -> 512-byte data -> status, waits until used.
   Returns al = status byte, r9d = used length. */
blk_request:
        mov     dword ptr [BHDR + 0], eax
        mov     dword ptr [BHDR + 4], 0
        mov     qword ptr [BHDR + 8], rdx
        mov     byte ptr [BSTATUS], 0xff
        mov     qword ptr [BLKQ + 0], BHDR
        mov     dword ptr [BLKQ + 8], 16
        mov     word ptr [BLKQ + 12], DESC_NEXT
        mov     word ptr [BLKQ + 14], 1
        mov     qword ptr [BLKQ + 16], BDATA
        mov     dword ptr [BLKQ + 24], 512
        or      ecx, DESC_NEXT
        mov     word ptr [BLKQ + 28], cx
        mov     word ptr [BLKQ + 30], 2
        mov     qword ptr [BLKQ + 32], BSTATUS
        mov     dword ptr [BLKQ + 40], 1
        mov     word ptr [BLKQ + 44], DESC_WRITE
        movzx   ecx, word ptr [V_AVAIL]
        mov     edx, ecx
        and     edx, QSZ - 1
        mov     word ptr [BLKQ + 0x100 + 4 + rdx*2], 0
        inc     ecx
        mov     word ptr [V_AVAIL], cx
        mov     word ptr [BLKQ + 0x100 + 2], cx     /* avail idx */
        mov     dword ptr [rbx + 0x50], 0           /* notify queue 0 */
1:      cmp     cx, word ptr [BLKQ + 0x200 + 2]     /* used idx */
        jne     1b
        mov     r9d, dword ptr [BLKQ + 0x200 + 4 + rdx*8 + 4]   /* used len */
        mov     al, byte ptr [BSTATUS]
        ret

/* print_status: rsi = label, ecx = its length, al = status -> "<label><digit>\n" */
print_status:
        movzx   edi, al
        call    print
        mov     dx, 0x3f8
        lea     eax, [rdi + '0']
        out     dx, al
        mov     al, '\n'
        out     dx, al
        ret

_start:
        mov     ebx, MMIO
        mov     ah, 'm'
        cmp     dword ptr [rbx + 0x00], 0x74726976  /* "virt" */
        jne     fail
        mov     ah, 'd'
        cmp     dword ptr [rbx + 0x08], 2           /* block */
        jne     fail
        mov     rax, qword ptr [rbx + 0x100]        /* config: capacity */
        mov     qword ptr [V_CAP], rax
        mov     dword ptr [rbx + 0x70], 0           /* reset */
        mov     dword ptr [rbx + 0x70], 1           /* ACKNOWLEDGE */
        mov     dword ptr [rbx + 0x70], 3           /* DRIVER */
        mov     dword ptr [rbx + 0x14], 0           /* DeviceFeaturesSel = 0 */
        mov     ah, 'r'
        test    dword ptr [rbx + 0x10], 1 << 5      /* VIRTIO_BLK_F_RO */
        jz      fail
        mov     dword ptr [rbx + 0x14], 1
        mov     ah, 'f'
        test    dword ptr [rbx + 0x10], 1           /* VIRTIO_F_VERSION_1 */
        jz      fail
        mov     dword ptr [rbx + 0x24], 0
        mov     dword ptr [rbx + 0x20], 1 << 5      /* RO */
        mov     dword ptr [rbx + 0x24], 1
        mov     dword ptr [rbx + 0x20], 1           /* VERSION_1 */
        mov     dword ptr [rbx + 0x70], 11          /* FEATURES_OK */
        mov     ah, 'F'
        test    dword ptr [rbx + 0x70], 8
        jz      fail
        xor     ecx, ecx
        mov     edx, BLKQ
        call    setup_queue
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
