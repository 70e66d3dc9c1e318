/* vsock_listen: listens on port 6000. When the host's "CONNECT 6000" arrives as a REQUEST, it
   accepts (RESPONSE), sends "hello from guest\n", prints the host's reply on COM1, closes with
   SHUTDOWN(both), waits for the host's RST, prints "LISTEN DONE" and resets. */
        .intel_syntax noprefix
        .code64
        .global _start
        .text

/* The driver routines and constants come first: GAS must know the constants before use.
   The VMM enters at _start (the ELF entry), wherever it lies. */
#include "virtio_vsock.inc"

_start:
        mov     dword ptr [V_LPORT], 6000
        mov     dword ptr [V_BUFALLOC], 8192
        call    virtio_init

        call    wait_rx
        cmp     eax, OP_REQUEST
        mov     ah, 'Q'
        jne     fail
        mov     ah, 'P'
        cmp     dword ptr [r10 + 20], 6000      /* dst_port */
        jne     fail
        mov     eax, dword ptr [r10 + 16]       /* the host's port */
        mov     dword ptr [V_PPORT], eax
        call    repost_rx
        mov     eax, OP_RESPONSE
        xor     edx, edx
        xor     ecx, ecx
        call    send_pkt
        lea     rsi, [rip + hello]
        mov     ecx, hello_end - hello
        mov     eax, OP_RW
        xor     edx, edx
        call    send_pkt

wait_data:
        call    wait_rx
        cmp     eax, OP_RW
        je      got_data
        push    rax
        call    repost_rx
        pop     rax
        cmp     eax, OP_CREDIT_UPDATE
        je      wait_data
        mov     ah, 'W'
        jmp     fail
got_data:
        push    r8
        mov     rsi, r11
        call    print                           /* ecx = length */
        pop     r8
        call    repost_rx
        mov     eax, OP_SHUTDOWN
        mov     edx, 3
        xor     ecx, ecx
        call    send_pkt
wait_rst:
        call    wait_rx
        push    rax
        call    repost_rx
        pop     rax
        cmp     eax, OP_RST
        jne     wait_rst
        lea     rsi, [rip + done_msg]
        mov     ecx, done_msg_end - done_msg
        call    print
        jmp     reset

hello:
        .ascii  "hello from guest\n"
hello_end:
done_msg:
        .ascii  "LISTEN DONE\n"
done_msg_end:

