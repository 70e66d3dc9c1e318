/* vsock_reconnect: for the snapshot tests of the vsock device. It posts one 4-byte buffer on
   the event queue, connects to host port 5000 (-> the host's <uds>_5000 listener), sends
   "before\n" and prints "CONNECTED\n"; then it polls the event queue. A device restored from a
   snapshot puts VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (id 0) there: the guest prints
   "TRANSPORT RESET\n", connects again from a new port, sends "after\n", prints
   "RECONNECTED\n" and halts. Another event id: "FAIL e" and a reset. */
        .intel_syntax noprefix
        .code64
        .global _start
        .text

/* The driver routines and constants come first: GAS must know the constants before use. */
#include "virtio_vsock.inc"

        .set EVBUF, VARS + 0x100        /* the event buffer */

_start:
        mov     dword ptr [V_LPORT], 1234
        mov     dword ptr [V_PPORT], 5000
        mov     dword ptr [V_BUFALLOC], 8192
        call    virtio_init
        mov     dword ptr [EVBUF], 0xffffffff
        mov     qword ptr [EVQ + 0], EVBUF          /* descriptor 0: the event buffer */
        mov     dword ptr [EVQ + 8], 4
        mov     word ptr [EVQ + 12], DESC_WRITE
        mov     word ptr [EVQ + 0x100 + 4], 0       /* avail ring entry 0 */
        mov     word ptr [EVQ + 0x100 + 2], 1       /* avail idx */
        mov     dword ptr [rbx + 0x50], 2           /* notify the event queue */

        call    connect
        lea     rsi, [rip + before]
        mov     ecx, before_end - before
        mov     eax, OP_RW
        xor     edx, edx
        call    send_pkt
        lea     rsi, [rip + connected]
        mov     ecx, connected_end - connected
        call    print

wait_event:
        cmp     word ptr [EVQ + 0x200 + 2], 0       /* used idx */
        je      wait_event
        mov     ah, 'e'
        cmp     dword ptr [EVBUF], 0                /* TRANSPORT_RESET */
        jne     fail
        lea     rsi, [rip + reset_msg]
        mov     ecx, reset_end - reset_msg
        call    print

        mov     dword ptr [V_LPORT], 1235           /* a new connection */
        mov     dword ptr [V_FWD], 0
        mov     dword ptr [V_TXCNT], 0
        call    connect
        lea     rsi, [rip + after]
        mov     ecx, after_end - after
        mov     eax, OP_RW
        xor     edx, edx
        call    send_pkt
        lea     rsi, [rip + reconnected]
        mov     ecx, reconnected_end - reconnected
        call    print
halt:
        hlt
        jmp     halt

/* connect: sends REQUEST from V_LPORT to V_PPORT and waits for the RESPONSE, giving back
   (and ignoring) whatever else arrives meanwhile. */
connect:
        mov     eax, OP_REQUEST
        xor     edx, edx
        xor     ecx, ecx
        call    send_pkt
1:      call    wait_rx
        push    rax
        call    repost_rx
        pop     rax
        cmp     eax, OP_RESPONSE
        jne     1b
        ret

before:
        .ascii  "before\n"
before_end:
after:
        .ascii  "after\n"
after_end:
connected:
        .ascii  "CONNECTED\n"
connected_end:
reset_msg:
        .ascii  "TRANSPORT RESET\n"
reset_end:
reconnected:
        .ascii  "RECONNECTED\n"
reconnected_end:
