//! The TUN device: creating it (address, prefix, MTU, offloads) and the reusable batch buffers used to write to it.
//!
//! Owns: everything tun-rs specific. With offload on (`IFF_VNET_HDR` + TSO/GRO), every read and write carries a
//! 10-byte virtio header, so the engine reads with `recv_multiple` (which splits a TSO super-packet into MTU-sized
//! segments) and writes with `send_multiple` (which coalesces a batch of TCP/UDP segments back into super-packets);
//! without offload the same calls degrade to one packet per syscall. Packets therefore always sit at [`TUN_OFFSET`]
//! in their buffers, whichever mode the device is in.
//!
//! The device is non-blocking and registered with no runtime of its own: only the outbound packet thread waits for
//! it, through a [`TunReader`] registered in that thread's runtime for readability alone (reads are plain
//! non-blocking calls on the device, also from the inbound thread: see `outbound::Outbound`). Writes (the inbound
//! thread's) never wait: a TUN write does not block (the kernel queues the packet or drops it).

use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use tokio::io::Interest;
use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};
use tun_rs::{DeviceBuilder, GROTable, IDEAL_BATCH_SIZE, SyncDevice, VIRTIO_NET_HDR_LEN};

use super::readiness::register_readable;
use super::{EngineConfig, EngineError};

/// Headroom in front of every packet for the virtio-net header (unused but harmless without offload).
pub(crate) const TUN_OFFSET: usize = VIRTIO_NET_HDR_LEN;

/// Packets per TUN batch: tun-rs's (and wireguard-go's) ideal batch; a 64 KiB TSO read splits into at most ~45.
pub(crate) const TUN_BATCH: usize = IDEAL_BATCH_SIZE;

/// Largest IP packet (a GRO super-packet written back to the device can reach this).
pub(crate) const MAX_IP_PACKET: usize = 65535;

/// Creates the device with the node's address and the overlay prefix (so the kernel routes the whole overlay into
/// it) and the MTU, in non-blocking mode.
pub(crate) fn open(config: &EngineConfig, offload: bool) -> Result<SyncDevice, EngineError> {
    let open_error = |source| EngineError::OpenTun {
        name: config.interface.clone(),
        source,
    };
    let device = DeviceBuilder::new()
        .name(config.interface.clone())
        .ipv4(config.address, config.network.prefix_len(), None)
        .mtu(config.mtu)
        .offload(offload)
        .build_sync()
        .map_err(open_error)?;
    device.set_nonblocking(true).map_err(open_error)?;
    disable_ipv6(&config.interface);
    Ok(device)
}

/// What the outbound thread waits for: a packet, or an error condition (a TUN device whose interface was deleted
/// reports only `EPOLLERR`; waiting for it too lets the next read return the error instead of hanging).
const READ_INTEREST: Interest = Interest::READABLE.add(Interest::ERROR);

/// The device's read side, registered for readability only with the runtime that created it (the outbound packet
/// thread's). Borrows the device, so it cannot outlive the descriptor.
pub(crate) struct TunReader<'a> {
    readiness: AsyncFd<BorrowedFd<'a>>,
}

impl<'a> TunReader<'a> {
    pub(crate) fn new(device: &'a SyncDevice) -> io::Result<Self> {
        Ok(Self {
            readiness: register_readable(device.as_fd())?,
        })
    }

    /// Waits until the device is readable (or reports an error). The caller reads through the device itself and
    /// clears the readiness when a read said `WouldBlock`.
    pub(crate) async fn readable(&self) -> io::Result<AsyncFdReadyGuard<'_, BorrowedFd<'a>>> {
        self.readiness.ready(READ_INTEREST).await
    }
}

/// The overlay is IPv4 only: without this the kernel gives the device a link-local IPv6 address and sends router
/// solicitations and MLD reports into it, which the engine could only drop. Best effort (IPv6 may be off already);
/// the sysctl is per network namespace, like the device.
fn disable_ipv6(interface: &str) {
    let path = format!("/proc/sys/net/ipv6/conf/{interface}/disable_ipv6");
    if let Err(e) = std::fs::write(&path, "1") {
        tracing::debug!(%path, error = %e, "could not disable IPv6 on the TUN device");
    }
}

/// Decrypted packets waiting to be written to the device in one `send_multiple`.
///
/// Each buffer has room for a full 64 KiB super-packet so GRO coalescing never reallocates; only the bytes actually
/// used are ever touched.
pub(crate) struct TunWriteBatch {
    bufs: Vec<Vec<u8>>,
    count: usize,
    gro: GROTable,
    /// The device has a virtio header (offload on).
    offload: bool,
    /// Coalescing turned off after the kernel kept refusing coalesced writes (see [`GRO_EINVAL_LIMIT`]).
    gro_disabled: bool,
    einval_streak: u32,
}

/// Some kernels (Linux e269d79c7d35, fixed by 89add40066f9) reject coalesced TUN writes with EINVAL; Tailscale probes
/// for it and turns GRO off. We turn it off after this many consecutive failed batches and then write each packet
/// with an empty virtio header (still correct, only slower). Not after one: a single odd packet must not be able to
/// cost every flow its GRO.
const GRO_EINVAL_LIMIT: u32 = 3;

impl TunWriteBatch {
    pub(crate) fn new(offload: bool) -> Self {
        Self {
            bufs: (0..TUN_BATCH)
                .map(|_| Vec::with_capacity(TUN_OFFSET + MAX_IP_PACKET))
                .collect(),
            count: 0,
            gro: GROTable::new(),
            offload,
            gro_disabled: false,
            einval_streak: 0,
        }
    }

    /// The packets waiting to be written (tests only).
    #[cfg(test)]
    pub(crate) fn pending(&self) -> Vec<&[u8]> {
        self.bufs[..self.count].iter().map(|b| &b[TUN_OFFSET..]).collect()
    }

    /// Packets are waiting for [`Self::flush`].
    pub(crate) fn has_pending(&self) -> bool {
        self.count > 0
    }

    pub(crate) fn is_full(&self) -> bool {
        self.count == self.bufs.len()
    }

    /// The next free slot, `len` bytes long (room for a decrypted datagram of that size). Call only when not full.
    pub(crate) fn slot(&mut self, len: usize) -> &mut [u8] {
        let buf = &mut self.bufs[self.count];
        buf.resize(TUN_OFFSET + len, 0);
        &mut buf[TUN_OFFSET..]
    }

    /// Keeps the first `len` bytes of the current slot as a packet to write.
    pub(crate) fn commit(&mut self, len: usize) {
        self.bufs[self.count].truncate(TUN_OFFSET + len);
        self.count += 1;
    }

    /// Writes the batch (coalescing segments when offload is on) and empties it.
    pub(crate) fn flush(&mut self, device: &SyncDevice) -> io::Result<()> {
        if self.count == 0 {
            return Ok(());
        }
        let bufs = &mut self.bufs[..self.count];
        self.count = 0;
        if self.gro_disabled {
            let mut result = Ok(());
            for buf in bufs {
                // An all-zero virtio header: no GSO, checksum already complete.
                buf[..TUN_OFFSET].fill(0);
                if let Err(e) = device.send(buf) {
                    result = Err(e);
                }
            }
            return result;
        }
        let result = device.send_multiple(&mut self.gro, bufs, TUN_OFFSET).map(|_| ());
        match &result {
            Err(e) if self.offload && e.raw_os_error() == Some(libc::EINVAL) => {
                self.einval_streak += 1;
                if self.einval_streak >= GRO_EINVAL_LIMIT {
                    tracing::warn!("the kernel rejects coalesced TUN writes; turning TUN GRO off (lower throughput)");
                    self.gro_disabled = true;
                }
            }
            _ => self.einval_streak = 0,
        }
        result
    }
}
