/* ticker: forever prints "t" on COM1 after every 20000 loop iterations (about 25 ms of
   emulated ring-0 time on a slow host, microseconds on hardware). Used for stop and pause. */
        .intel_syntax noprefix
        .code64
        .global _start
        .text
_start:
        mov     dx, 0x3f8
tick:
        mov     ecx, 20000
spin:
        dec     ecx
        jnz     spin
        mov     al, 't'
        out     dx, al
        jmp     tick
