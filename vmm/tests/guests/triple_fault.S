/* triple_fault: prints a marker, then executes UD2 with an IDT that has no present entry:
   #UD -> #GP -> #DF -> triple fault, which KVM reports as a shutdown. */
        .intel_syntax noprefix
        .code64
        .global _start
        .text
_start:
        mov     dx, 0x3f8
        mov     al, 'T'
        out     dx, al
        ud2
