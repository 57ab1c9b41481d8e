//! The UDP socket: binding it (dual-stack when the host has IPv6), large buffers, and batched IO through quinn-udp.
//!
//! Owns: every syscall on the socket. Receives use `recvmmsg` with UDP GRO (one read returns up to
//! `quinn_udp::BATCH_SIZE` buffers, each possibly holding many coalesced datagrams of one flow); sends group
//! consecutive datagrams of one destination into a single `sendmsg` with UDP GSO ([`SendBatch`]). Each packet task
//! owns its own batch buffers, so nothing here locks; the socket itself is shared by reference (sends from several
//! threads at once are fine for UDP).
//!
//! The socket is registered with no runtime of its own: only the inbound packet thread waits for it, through a
//! [`UdpReader`] it registers in its own runtime for readability alone (a registration that also asked for
//! writability would wake that thread every time a sent datagram frees buffer space). Sends never wait on a
//! runtime: the socket is non-blocking and a full send buffer is waited out with `poll(2)`, briefly (see
//! [`SEND_WAIT`]).

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::Duration;

use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};

use super::EngineError;
use super::readiness::register_readable;

/// Socket buffer size: wireguard-go uses 7 MiB; smaller buffers cost it 20% throughput and many retransmits
/// (nat-and-dataplane.md D4).
const SOCKET_BUFFER_BYTES: usize = 7 << 20;

/// Receive slots per `recvmmsg`.
pub(crate) const RECV_BATCH: usize = quinn_udp::BATCH_SIZE;

/// Each receive slot holds one GRO super-datagram: the kernel caps those at 64 KiB.
const RECV_SLOT_BYTES: usize = 65536;

/// A GSO send may carry at most this many bytes (IPv4 payload limit with some headroom) ...
const MAX_GSO_BYTES: usize = 65000;

/// How long a send waits for room in a full socket send buffer before the datagram is dropped. The buffer holds
/// 7 MiB, so it is full only when the kernel cannot keep up; waiting a little gives the sender backpressure, and
/// the bound keeps the timer task (which sends from the shared runtime) from stalling it.
const SEND_WAIT: Duration = Duration::from_millis(10);

pub(crate) struct Udp {
    /// Non-blocking; registered with no runtime (see the module doc).
    socket: std::net::UdpSocket,
    state: UdpSocketState,
    /// The socket is `[::]` with IPv4 mapped in; IPv4 destinations must be written as mapped addresses.
    dual_stack: bool,
    port: u16,
}

/// Binds `[::]:port` (dual-stack) or, on a host without IPv6, `0.0.0.0:port`.
pub(crate) fn bind(port: u16) -> Result<Udp, EngineError> {
    let bind_error = |source| EngineError::BindUdp { port, source };
    let (socket, dual_stack) = match bind_dual_stack(port) {
        Ok(socket) => (socket, true),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => return Err(bind_error(e)),
        Err(_) => {
            let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(bind_error)?;
            socket
                .bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())
                .map_err(bind_error)?;
            (socket, false)
        }
    };
    set_buffer_sizes(&socket);
    let state = UdpSocketState::new((&socket).into()).map_err(bind_error)?;
    let socket: std::net::UdpSocket = socket.into();
    socket.set_nonblocking(true).map_err(bind_error)?;
    let local = socket.local_addr().map_err(bind_error)?;
    Ok(Udp {
        socket,
        state,
        dual_stack,
        port: local.port(),
    })
}

fn bind_dual_stack(port: u16) -> io::Result<Socket> {
    let socket = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_only_v6(false)?;
    socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    Ok(socket)
}

/// Asks for large buffers; as root the FORCE variants pass `net.core.{r,w}mem_max`. Best effort: a smaller buffer
/// only costs throughput.
fn set_buffer_sizes(socket: &Socket) {
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = force_buffer_size(socket, libc::SO_RCVBUFFORCE);
    let _ = force_buffer_size(socket, libc::SO_SNDBUFFORCE);
}

#[allow(unsafe_code)]
fn force_buffer_size(socket: &Socket, option: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(SOCKET_BUFFER_BYTES).expect("7 MiB fits in a c_int");
    // SAFETY: the fd is a live socket owned by `socket` for the duration of the call; we pass a pointer to a
    // c_int that lives on this stack frame and its exact size, as setsockopt(2) requires for SO_*BUFFORCE.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&raw const value).cast::<libc::c_void>(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).expect("small"),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The address a datagram came from, with IPv4-mapped IPv6 turned back into IPv4 (so endpoints, the rate limiter's
/// cookie and status all see the address the peer actually has).
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

impl Udp {
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    pub(crate) fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn wire_addr(&self, addr: SocketAddr) -> SocketAddr {
        match addr.ip() {
            IpAddr::V4(v4) if self.dual_stack => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), addr.port()),
            _ => addr,
        }
    }

    /// Sends `contents` (one datagram, or several of `segment_size` bytes each with GSO) to `destination`. Waits at
    /// most [`SEND_WAIT`] for room in the send buffer.
    pub(crate) fn send(&self, destination: SocketAddr, contents: &[u8], segment_size: Option<usize>) -> io::Result<()> {
        let transmit = Transmit {
            destination: self.wire_addr(destination),
            ecn: None,
            contents,
            segment_size,
            src_ip: None,
        };
        match self.state.try_send((&self.socket).into(), &transmit) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait_writable(&self.socket, SEND_WAIT)?;
                self.state.try_send((&self.socket).into(), &transmit)
            }
            result => result,
        }
    }

    /// Receives what is queued now into `batch`, without waiting; returns how many slots were filled
    /// (`WouldBlock` when nothing is queued).
    pub(crate) fn try_recv(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        let RecvBatch { buf, metas } = batch;
        let mut chunks = buf.chunks_mut(RECV_SLOT_BYTES);
        let mut slices: [IoSliceMut<'_>; RECV_BATCH] =
            std::array::from_fn(|_| IoSliceMut::new(chunks.next().expect("the receive buffer holds RECV_BATCH slots")));
        self.state.recv(UdpSockRef::from(&self.socket), &mut slices, metas)
    }

    /// Datagrams the kernel dropped for this socket since it was opened, mostly because its receive buffer was full
    /// (`SO_MEMINFO`'s `SK_MEMINFO_DROPS`: the same number as the `drops` column of /proc/net/udp). The engine never
    /// sees these datagrams; without this count a flood faster than the inbound thread looks half as big as it is.
    /// 0 when the kernel does not tell.
    #[allow(unsafe_code)]
    pub(crate) fn kernel_drops(&self) -> u64 {
        // Not in the libc crate: include/uapi/asm-generic/socket.h (x86, arm, riscv; mips and sparc differ, and
        // meshd does not target them).
        const SO_MEMINFO: libc::c_int = 55;
        // SK_MEMINFO_VARS is 9 on current kernels (SK_MEMINFO_DROPS = 8, since Linux 4.4); room for more.
        const SK_MEMINFO_DROPS: usize = libc::SK_MEMINFO_DROPS as usize;
        let mut info = [0u32; 16];
        let mut len = libc::socklen_t::try_from(std::mem::size_of_val(&info)).expect("64 bytes fit a socklen_t");
        // SAFETY: the descriptor is this live socket; `info` and `len` live on this stack frame and `len` holds
        // the buffer's size in bytes, as getsockopt(2) requires; the kernel writes at most `len` bytes.
        let rc = unsafe {
            libc::getsockopt(
                self.socket.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_MEMINFO,
                info.as_mut_ptr().cast::<libc::c_void>(),
                &raw mut len,
            )
        };
        let filled = usize::try_from(len).unwrap_or(0) / std::mem::size_of::<u32>();
        if rc != 0 || filled <= SK_MEMINFO_DROPS {
            return 0;
        }
        u64::from(info[SK_MEMINFO_DROPS])
    }

    /// Registers the socket for readability with the runtime this is called in (the inbound packet thread's).
    pub(crate) fn reader(&self) -> io::Result<UdpReader<'_>> {
        Ok(UdpReader {
            readiness: register_readable(self.socket.as_fd())?,
        })
    }
}

/// The receiving side of the socket, registered for readability only with the runtime that created it. Borrows the
/// [`Udp`], so it cannot outlive the socket's descriptor.
pub(crate) struct UdpReader<'a> {
    readiness: AsyncFd<BorrowedFd<'a>>,
}

impl<'a> UdpReader<'a> {
    /// Waits until the socket is readable. The caller receives ([`Udp::try_recv`]) and clears the readiness when
    /// the queue is empty.
    pub(crate) async fn readable(&self) -> io::Result<AsyncFdReadyGuard<'_, BorrowedFd<'a>>> {
        self.readiness.readable().await
    }
}

/// Blocks until `socket` has room to send, at most `limit`; `WouldBlock` if it still has none. An interrupted or
/// failed poll returns Ok: the retried send then says what is wrong.
#[allow(unsafe_code)]
fn wait_writable(socket: &std::net::UdpSocket, limit: Duration) -> io::Result<()> {
    let mut pollfd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    let timeout = libc::c_int::try_from(limit.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd on this stack frame, count 1; the descriptor stays open for the call (borrowed).
    let rc = unsafe { libc::poll(&raw mut pollfd, 1, timeout) };
    if rc == 0 {
        Err(io::ErrorKind::WouldBlock.into())
    } else {
        Ok(())
    }
}

/// Reusable receive buffers for one task.
pub(crate) struct RecvBatch {
    buf: Vec<u8>,
    metas: [RecvMeta; RECV_BATCH],
}

impl RecvBatch {
    pub(crate) fn new() -> Self {
        Self {
            buf: vec![0u8; RECV_BATCH * RECV_SLOT_BYTES],
            metas: std::array::from_fn(|_| RecvMeta::default()),
        }
    }

    /// Slot `i` of the last receive: its source and its datagrams (a GRO slot holds several of `stride` bytes).
    pub(crate) fn slot(&self, i: usize) -> (SocketAddr, std::slice::Chunks<'_, u8>) {
        let meta = &self.metas[i];
        let start = i * RECV_SLOT_BYTES;
        let len = meta.len.min(RECV_SLOT_BYTES);
        let stride = if meta.stride == 0 { len.max(1) } else { meta.stride };
        (canonical(meta.addr), self.buf[start..start + len].chunks(stride))
    }
}

/// One GSO run: consecutive datagrams to one destination, all `segment` bytes except possibly the last.
#[derive(Clone, Copy)]
struct Run {
    destination: SocketAddr,
    start: usize,
    len: usize,
    segment: usize,
    count: usize,
    last: usize,
}

/// Outgoing datagrams of one task, written in place by boringtun and sent together by [`SendBatch::flush`].
///
/// Consecutive datagrams to the same destination of equal size (a smaller one may end the run) become one `sendmsg`
/// with a `UDP_SEGMENT` size (GSO): a 64 KiB TSO read from the TUN leaves as one syscall.
pub(crate) struct SendBatch {
    buf: Vec<u8>,
    used: usize,
    slot: usize,
    runs: Vec<Run>,
    max_runs: usize,
}

impl SendBatch {
    /// `slots` datagrams of up to `slot` bytes each.
    pub(crate) fn new(slots: usize, slot: usize) -> Self {
        Self {
            buf: vec![0u8; slots * slot],
            used: 0,
            slot,
            runs: Vec::with_capacity(slots),
            max_runs: slots,
        }
    }

    /// True when the next datagram might not fit: flush first.
    pub(crate) fn needs_flush(&self) -> bool {
        self.used + self.slot > self.buf.len() || self.runs.len() >= self.max_runs
    }

    /// Room for the next datagram (at least `slot` bytes). Call only when `!needs_flush()`.
    pub(crate) fn tail(&mut self) -> &mut [u8] {
        &mut self.buf[self.used..self.used + self.slot]
    }

    /// Keeps the first `len` bytes of the tail as a datagram to `destination`.
    pub(crate) fn commit(&mut self, len: usize, destination: SocketAddr, max_segments: usize) {
        let start = self.used;
        self.used += len;
        if let Some(run) = self.runs.last_mut()
            && run.destination == destination
            && run.count < max_segments
            && run.last == run.segment
            && len <= run.segment
            && run.len + len <= MAX_GSO_BYTES
        {
            run.count += 1;
            run.len += len;
            run.last = len;
            return;
        }
        self.runs.push(Run {
            destination,
            start,
            len,
            segment: len,
            count: 1,
            last: len,
        });
    }

    /// Copies `datagram` in as the next one (for the rare messages boringtun wrote elsewhere, e.g. handshakes).
    pub(crate) fn push_copy(&mut self, datagram: &[u8], destination: SocketAddr, max_segments: usize) {
        let len = datagram.len().min(self.slot);
        self.tail()[..len].copy_from_slice(&datagram[..len]);
        self.commit(len, destination, max_segments);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// The pending datagrams, split per segment, and empties the batch (tests only).
    #[cfg(test)]
    pub(crate) fn take_datagrams(&mut self) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut out = Vec::new();
        for run in &self.runs {
            for chunk in self.buf[run.start..run.start + run.len].chunks(run.segment) {
                out.push((run.destination, chunk.to_vec()));
            }
        }
        self.runs.clear();
        self.used = 0;
        out
    }

    /// Sends everything and empties the batch; returns how many sends failed (the datagrams are lost, like on a
    /// congested link: WireGuard and the inner TCP recover).
    pub(crate) fn flush(&mut self, udp: &Udp) -> u64 {
        let mut failures = 0;
        for run in &self.runs {
            let contents = &self.buf[run.start..run.start + run.len];
            let segment_size = (run.count > 1).then_some(run.segment);
            if let Err(e) = udp.send(run.destination, contents, segment_size) {
                tracing::trace!(destination = %run.destination, error = %e, "udp send failed");
                failures += 1;
            }
        }
        self.runs.clear();
        self.used = 0;
        failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    fn push(batch: &mut SendBatch, len: usize, to: SocketAddr) {
        batch.tail()[..len].fill(len as u8);
        batch.commit(len, to, 64);
    }

    #[test]
    fn gso_runs_group_equal_sizes_to_one_destination() {
        let (a, b) = (addr("198.18.0.1:1"), addr("198.18.0.2:2"));
        let mut batch = SendBatch::new(16, 1500);
        push(&mut batch, 1452, a);
        push(&mut batch, 1452, a);
        push(&mut batch, 600, a); // a shorter one ends the run ...
        push(&mut batch, 1452, a); // ... so this starts a new one
        push(&mut batch, 1452, b);
        push(&mut batch, 1500, b); // larger than the segment: new run
        let shape: Vec<_> = batch
            .runs
            .iter()
            .map(|r| (r.destination, r.count, r.segment, r.len))
            .collect();
        assert_eq!(
            shape,
            vec![
                (a, 3, 1452, 1452 * 2 + 600),
                (a, 1, 1452, 1452),
                (b, 1, 1452, 1452),
                (b, 1, 1500, 1500)
            ]
        );
        // Datagrams are contiguous in the order they were committed.
        assert_eq!(batch.buf[1452 * 2], 600u16 as u8);
    }

    #[test]
    fn runs_respect_segment_limit_and_capacity() {
        let a = addr("198.18.0.1:1");
        let mut batch = SendBatch::new(4, 1500);
        for _ in 0..3 {
            batch.tail()[..100].fill(1);
            batch.commit(100, a, 2);
        }
        assert_eq!(batch.runs.len(), 2, "max 2 segments per send");
        batch.commit(100, a, 1);
        assert!(!batch.needs_flush());
        batch.commit(100, a, 1);
        assert!(batch.needs_flush(), "no more runs than slots");
    }

    /// A flood that outruns the reader: what the kernel drops is counted by `kernel_drops`, so received plus
    /// dropped is everything sent.
    #[test]
    fn kernel_drops_count_what_a_full_receive_buffer_lost() {
        let udp = bind(0).expect("bind");
        let target = SocketAddr::from(([127, 0, 0, 1], udp.port()));
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").expect("sender");
        // Far beyond the 7 MiB buffer (each small datagram costs about 1 KiB of buffer in the kernel), sent before
        // a single one is read.
        let sent = 40_000u64;
        let garbage = [0xEEu8; 200];
        for _ in 0..sent {
            sender.send_to(&garbage, target).expect("send on loopback");
        }
        let mut batch = RecvBatch::new();
        let mut received = 0u64;
        // Bounded: the queue holds at most `sent` datagrams and every receive takes at least one.
        for _ in 0..sent {
            match udp.try_recv(&mut batch) {
                Ok(slots) => {
                    for slot in 0..slots {
                        received += batch.slot(slot).1.count() as u64;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("receive: {e}"),
            }
        }
        let dropped = udp.kernel_drops();
        assert!(
            dropped > 0,
            "the flood overflowed the buffer (received {received} of {sent})"
        );
        assert_eq!(
            received + dropped,
            sent,
            "received {received} + dropped {dropped} = sent"
        );
    }

    #[test]
    fn canonical_unmaps_ipv4() {
        assert_eq!(canonical(addr("[::ffff:198.18.0.1]:5")), addr("198.18.0.1:5"));
        assert_eq!(canonical(addr("[2001:db8::1]:5")), addr("[2001:db8::1]:5"));
    }
}
