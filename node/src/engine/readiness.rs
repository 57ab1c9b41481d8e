//! Readiness registrations for the packet threads: each thread registers the one descriptor it reads with its own
//! runtime, for readability only.
//!
//! Owns: the one `unsafe` call this needs (tokio's registration constructors are `unsafe` because a registration
//! must not outlive its descriptor). Must not own the descriptors: the socket and the device belong to `Shared`.

use std::io;
use std::os::fd::BorrowedFd;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Registers `fd` for readability with the current runtime (the calling packet thread's). Only readability: a
/// registration that also asked for writability would wake the thread whenever a send frees buffer space.
#[allow(unsafe_code)]
pub(crate) fn register_readable(fd: BorrowedFd<'_>) -> io::Result<AsyncFd<BorrowedFd<'_>>> {
    // SAFETY: tokio requires the descriptor to stay open, and to be the same file, for as long as the registration
    // lives. The registration holds a `BorrowedFd<'_>`, so the borrow checker keeps the owner (and with it the open
    // descriptor) alive until the registration is dropped; nothing closes or replaces a borrowed descriptor.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(|e| e.into_parts().1)
}
