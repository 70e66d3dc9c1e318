//! Everything the VMM writes into guest memory to start a kernel: the kernel image itself
//! (linux-loader: ELF vmlinux, or bzImage), an optional initrd, the command line, the zero page
//! with its e820 map, and the MP table. The vCPU registers are set by [`crate::cpu`].

pub mod kernel;
pub mod mptable;
pub mod zero_page;

pub use kernel::{load_initrd, load_kernel, InitrdPlacement, LoadedKernel};

/// Errors while preparing guest memory for boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel image could not be opened.
    #[error("cannot open kernel image {path}: {source}")]
    OpenKernel {
        /// The path given.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// linux-loader could not load the kernel (neither as ELF nor as bzImage).
    #[error("cannot load kernel image: {0}")]
    LoadKernel(linux_loader::loader::Error),
    /// The initrd could not be read.
    #[error("cannot read initrd {path}: {source}")]
    ReadInitrd {
        /// The path given.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The initrd does not fit in guest RAM above the kernel.
    #[error("initrd of {size} bytes does not fit in guest RAM")]
    InitrdTooLarge {
        /// Its size.
        size: u64,
    },
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    /// The command line could not be written.
    #[error("cannot write the kernel command line: {0}")]
    WriteCmdline(linux_loader::loader::Error),
    /// Writing boot structures to guest memory failed.
    #[error("cannot write boot structures: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    /// The zero page could not be written.
    #[error("cannot write the zero page: {0}")]
    ZeroPage(linux_loader::configurator::Error),
    /// Too many vCPUs for the MP table.
    #[error("the MP table cannot describe {0} vCPUs")]
    TooManyCpus(u8),
}
