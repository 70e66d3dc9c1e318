//! Shared helpers for the integration tests: where the built binaries and the guest image are,
//! and how a test that cannot run on this machine says so.
