//! An interrupt line as an `EventFd` registered with KVM as an irqfd: writing it asserts the GSI
//! in the in-kernel irqchip. vm-superio's `Trigger` is implemented here because the crate does
//! not implement it for `EventFd`.

use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

/// An irqfd-backed interrupt trigger.
#[derive(Debug)]
pub struct IrqTrigger(EventFd);

impl IrqTrigger {
    /// A new, not yet registered, trigger.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self(EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?))
    }

    /// The eventfd to register with `KVM_IRQFD`.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }

    /// Asserts the interrupt.
    pub fn fire(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

impl vm_superio::Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.fire()
    }
}
