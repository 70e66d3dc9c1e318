/* counter_fast: counter.S without the pause between numbers, and with the IIR check after
   every byte (CHECK_IIR), so that a snapshot almost always lands on or next to a port access: a
   vCPU parked right after an OUT exit (on hardware KVM the instruction completes only on the
   next KVM_RUN) or an IN exit (on every KVM, kvm_pvm included, the value reaches RAX and RIP
   moves on only on the next KVM_RUN). */
#define DELAY 1
#define CHECK_IIR
#include "counter.S"
