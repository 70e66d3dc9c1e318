/* hello: prints a line on COM1, writes the boot timer, then resets through the i8042.
   Runs at ring 0 in long mode with the VMM's boot page tables. */
        .intel_syntax noprefix
        .code64
        .global _start
        .text
_start:
        lea     rsi, [rip + message]
        mov     ecx, message_end - message
        mov     dx, 0x3f8               /* COM1 transmit register */
print:
        lodsb
        out     dx, al
        loop    print

        mov     dx, 0x440               /* BOOT_TIMER_PORT */
        mov     al, 123                 /* BOOT_TIMER_MAGIC */
        out     dx, al

        mov     al, 0xfe                /* i8042 "pulse reset line" command */
        out     0x64, al
halt:
        hlt
        jmp     halt

message:
        .ascii  "hello from the tiny guest\n"
message_end:
