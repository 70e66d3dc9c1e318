/* counter_balloon: counter.S whose every step also goes through a virtqueue, for the
   snapshot tests of virtio device state. It drives the virtio-balloon device in the first
   virtio-mmio slot (negotiates VERSION_1 only, sets up the inflate and deflate queues,
   DRIVER_OK); then, for each number n, it makes one deflate chain (a 4-byte page-frame buffer)
   available as the n-th, notifies the queue, and polls the used ring until the device has
   used it: the used index must then be exactly n (mod 2^16), else "MISMATCH" and a reset.
   So a restore that loses the queue's position (the device would answer old chains again or
   skip ahead), or a notification caught in flight by the snapshot, shows in the console: a
   mismatch, or a guest that stops counting. Interrupts stay disabled; everything is polled. */
        .intel_syntax noprefix
        .code64
        .text

/* setup_queue, fail, QSZ and the ring addresses (virtio_vsock.inc's, for any device). */
#include "virtio_vsock.inc"

        .set INFLATEQ, RXQ              /* desc table; avail at +0x100, used at +0x200 */
        .set DEFLATEQ, TXQ
        .set PFNBUF,   RXHDR            /* the page-frame number each chain carries */

        .macro  counter_setup
        mov     ebx, MMIO
        mov     ah, 'm'
        cmp     dword ptr [rbx + 0x00], 0x74726976  /* "virt" */
        jne     fail
        mov     ah, 'd'
        cmp     dword ptr [rbx + 0x08], 5           /* balloon */
        jne     fail
        mov     dword ptr [rbx + 0x70], 0           /* reset */
        mov     dword ptr [rbx + 0x70], 1           /* ACKNOWLEDGE */
        mov     dword ptr [rbx + 0x70], 3           /* DRIVER */
        mov     dword ptr [rbx + 0x24], 0
        mov     dword ptr [rbx + 0x20], 0           /* no device-specific feature */
        mov     dword ptr [rbx + 0x24], 1
        mov     dword ptr [rbx + 0x20], 1           /* VERSION_1 */
        mov     dword ptr [rbx + 0x70], 11          /* FEATURES_OK */
        mov     ah, 'F'
        test    dword ptr [rbx + 0x70], 8
        jz      fail
        xor     ecx, ecx
        mov     edx, INFLATEQ
        call    setup_queue
        mov     ecx, 1
        mov     edx, DEFLATEQ
        call    setup_queue
        mov     dword ptr [rbx + 0x70], 15          /* DRIVER_OK */
        mov     dword ptr [PFNBUF], 0x300           /* a frame the guest never uses */
        .endm

        /* chain n = r12: descriptor slot (n - 1) mod QSZ, avail idx n */
        .macro  counter_step
        lea     rcx, [r12 - 1]
        and     ecx, QSZ - 1
        mov     rax, rcx
        shl     rax, 4
        mov     qword ptr [DEFLATEQ + rax + 0], PFNBUF
        mov     dword ptr [DEFLATEQ + rax + 8], 4
        mov     word ptr [DEFLATEQ + rax + 12], 0
        mov     word ptr [DEFLATEQ + 0x100 + 4 + rcx*2], cx
        mov     word ptr [DEFLATEQ + 0x100 + 2], r12w   /* avail idx */
        mov     dword ptr [rbx + 0x50], 1               /* notify the deflate queue */
        lea     rax, [r12 - 1]
85:
        cmp     ax, word ptr [DEFLATEQ + 0x200 + 2]     /* used idx still n - 1? */
        je      85b
        cmp     r12w, word ptr [DEFLATEQ + 0x200 + 2]
        jne     mismatch
        .endm

#define COUNTER_HOOKS
#define DELAY 5000
#include "counter.S"
