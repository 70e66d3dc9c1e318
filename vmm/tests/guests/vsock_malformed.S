/* vsock_malformed: a hostile driver. After a normal set-up it posts TX chains that must be
   refused without harm — a buffer outside guest RAM, a descriptor loop, a device-writable
   buffer on the TX queue, a header announcing more data than its buffer holds — then a valid
   REQUEST to port 5001 (which must still work: "CONNECTED"), then corrupts the TX avail index
   (a jump past the queue size), which must put the device in DEVICE_NEEDS_RESET
   ("NEEDS_RESET"). Then it resets the machine. */
        .intel_syntax noprefix
        .code64
        .global _start
        .text

/* The driver routines and constants come first: GAS must know the constants before use.
   The VMM enters at _start (the ELF entry), wherever it lies. */
#include "virtio_vsock.inc"

_start:
        mov     dword ptr [V_LPORT], 1234
        mov     dword ptr [V_PPORT], 5001
        mov     dword ptr [V_BUFALLOC], 8192
        call    virtio_init

        /* 1: header buffer far outside guest RAM */
        mov     rax, 0x7fff00000000
        mov     qword ptr [TXQ + 0], rax
        mov     dword ptr [TXQ + 8], 44
        mov     word ptr [TXQ + 12], 0
        xor     eax, eax
        call    submit_tx

        /* 2: descriptors 2 -> 3 -> 2 ... (a loop) */
        mov     qword ptr [TXQ + 32], TXHDR
        mov     dword ptr [TXQ + 40], 44
        mov     word ptr [TXQ + 44], DESC_NEXT
        mov     word ptr [TXQ + 46], 3
        mov     qword ptr [TXQ + 48], TXHDR
        mov     dword ptr [TXQ + 56], 44
        mov     word ptr [TXQ + 60], DESC_NEXT
        mov     word ptr [TXQ + 62], 2
        mov     eax, 2
        call    submit_tx

        /* 3: a device-writable buffer on the TX queue */
        mov     qword ptr [TXQ + 0], TXHDR
        mov     dword ptr [TXQ + 8], 44
        mov     word ptr [TXQ + 12], DESC_WRITE
        xor     eax, eax
        call    submit_tx

        /* 4: header says 4000 data bytes, the data buffer has 10 */
        mov     edi, TXHDR
        mov     qword ptr [rdi + 0], GUEST_CID
        mov     qword ptr [rdi + 8], HOST_CID
        mov     dword ptr [rdi + 16], 1234
        mov     dword ptr [rdi + 20], 5001
        mov     dword ptr [rdi + 24], 4000
        mov     word ptr [rdi + 28], 1
        mov     word ptr [rdi + 30], OP_RW
        mov     qword ptr [TXQ + 0], TXHDR
        mov     dword ptr [TXQ + 8], 44
        mov     word ptr [TXQ + 12], DESC_NEXT
        mov     word ptr [TXQ + 14], 1
        mov     qword ptr [TXQ + 16], RXDATA + 0x3000
        mov     dword ptr [TXQ + 24], 10
        mov     word ptr [TXQ + 28], 0
        xor     eax, eax
        call    submit_tx

        /* The device still works: connect to the host's <uds>_5001 listener. */
        mov     eax, OP_REQUEST
        xor     edx, edx
        xor     ecx, ecx
        call    send_pkt
        call    wait_rx
        cmp     eax, OP_RESPONSE
        mov     ah, 'R'
        jne     fail
        lea     rsi, [rip + connected]
        mov     ecx, connected_end - connected
        call    print

        /* Corrupt the TX avail index: 100 entries "available" in an 8-entry queue. */
        movzx   ecx, word ptr [V_TXIDX]
        add     ecx, 100
        mov     word ptr [TXQ + 0x100 + 2], cx
        mov     dword ptr [rbx + 0x50], 1
wait_needs_reset:
        test    dword ptr [rbx + 0x70], 0x40
        jz      wait_needs_reset
        lea     rsi, [rip + needs_reset]
        mov     ecx, needs_reset_end - needs_reset
        call    print
        jmp     reset

connected:
        .ascii  "CONNECTED\n"
connected_end:
needs_reset:
        .ascii  "NEEDS_RESET\n"
needs_reset_end:

