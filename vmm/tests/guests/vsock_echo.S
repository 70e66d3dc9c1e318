/* vsock_echo: connects to host port 5000 (-> the host's <uds>_5000 listener), echoes every byte
   it receives back to the host, and closes cleanly when the host shuts its side down:
   SHUTDOWN(both) from the guest, RST from the host, then "ECHO DONE" and an i8042 reset.
   The guest advertises only 8 KiB of receive buffer (buf_alloc), so the host must wait for the
   guest's CREDIT_UPDATEs to send more; the guest checks the host's credit before sending. */
        .intel_syntax noprefix
        .code64
        .global _start
        .text

/* The driver routines and constants come first: GAS must know the constants before use.
   The VMM enters at _start (the ELF entry), wherever it lies. */
#include "virtio_vsock.inc"

_start:
        mov     dword ptr [V_LPORT], 1234
        mov     dword ptr [V_PPORT], 5000
        mov     dword ptr [V_BUFALLOC], 8192
        call    virtio_init
        mov     eax, OP_REQUEST
        xor     edx, edx
        xor     ecx, ecx
        call    send_pkt

        mov     ah, 'R'
        call    wait_rx
        cmp     eax, OP_RESPONSE
        jne     bad_op
        call    repost_rx

loop_rx:
        call    wait_rx
        cmp     eax, OP_RW
        je      on_rw
        cmp     eax, OP_SHUTDOWN
        je      on_shutdown
        cmp     eax, OP_RST
        je      on_rst
        cmp     eax, OP_CREDIT_REQUEST
        je      on_credit_request
        cmp     eax, OP_CREDIT_UPDATE
        je      on_other
bad_op:
        mov     ah, al
        add     ah, '0'
        mov     al, 0
        jmp     fail

on_rw:
        /* Host credit: host_buf_alloc - (tx_cnt - host_fwd_cnt) must cover the echo. */
        mov     eax, dword ptr [V_TXCNT]
        sub     eax, dword ptr [V_HFWD]
        mov     edx, dword ptr [V_HBUF]
        sub     edx, eax
        mov     ah, 'C'
        cmp     edx, ecx
        jb      fail
        push    r8
        push    rcx
        mov     rsi, r11                        /* echo straight from the RX data buffer */
        mov     eax, OP_RW
        xor     edx, edx
        call    send_pkt
        pop     rcx
        pop     r8
        add     dword ptr [V_FWD], ecx          /* consumed: the buffer can be reused */
        call    repost_rx
        mov     eax, OP_CREDIT_UPDATE
        xor     edx, edx
        xor     ecx, ecx
        call    send_pkt
        jmp     loop_rx

on_credit_request:
        call    repost_rx
        mov     eax, OP_CREDIT_UPDATE
        xor     edx, edx
        xor     ecx, ecx
        call    send_pkt
        jmp     loop_rx

on_other:
        call    repost_rx
        jmp     loop_rx

on_shutdown:
        call    repost_rx
        mov     eax, OP_SHUTDOWN
        mov     edx, 3                          /* RCV | SEND */
        xor     ecx, ecx
        call    send_pkt
        jmp     loop_rx

on_rst:
        lea     rsi, [rip + done_msg]
        mov     ecx, done_msg_end - done_msg
        call    print
        jmp     reset

done_msg:
        .ascii  "ECHO DONE\n"
done_msg_end:

