//! The UDP transport, the fast path: batched receives (`recvmmsg` with GRO,
//! so one syscall can bring dozens of datagrams) and batched sends (GSO: a
//! run of equal-sized datagrams to one destination leaves in one syscall).
//! quinn-udp handles the kernel details and falls back where a feature is
//! missing.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::Context as _;
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::{HeldSend, sockopt};

/// Receive buffers per batch, each large enough for a full GRO train.
const RECV_BUFFERS: usize = 8;
const RECV_BUFFER_LEN: usize = 64 * 1024;
/// Most bytes one GSO send may carry (a UDP length field, less headers).
const GSO_MAX_BYTES: usize = 65000;
/// The largest datagram we ever build.
const MAX_DATAGRAM: usize = 65535;

/// The status counter of datagrams dropped for a full send buffer.
pub const SEND_BUFFER_FULL: &str = "udp_send_buffer_full";

/// A remote address, and our address it reached us at (replies leave
/// from it).
pub use iptun_proto::endpoint::UdpAddr as Peer;

/// Bind a UDP socket to `addr` and return its receiving and sending halves.
pub fn bind(addr: SocketAddr) -> anyhow::Result<(UdpReceiver, UdpSender)> {
    let socket = std::net::UdpSocket::bind(addr).with_context(|| format!("binding UDP {addr}"))?;
    open(socket)
}

/// Bind one of several sockets sharing `addr` (`SO_REUSEPORT`): the kernel
/// spreads the datagrams over them by their source and destination, so
/// each client's datagrams keep to one socket. Any of them sends from
/// `addr`. Only sockets of the same user can join the group. Serve it
/// with [`open`], from the thread whose runtime is to wait on it.
pub fn bind_shared(addr: SocketAddr) -> anyhow::Result<std::net::UdpSocket> {
    let bind = || -> io::Result<std::net::UdpSocket> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        socket.set_reuse_port(true)?;
        socket.bind(&addr.into())?;
        Ok(socket.into())
    };
    bind().with_context(|| format!("binding UDP {addr} (shared with the other workers)"))
}

/// A bound socket's receiving and sending halves, registered with this
/// thread's runtime.
pub fn open(socket: std::net::UdpSocket) -> anyhow::Result<(UdpReceiver, UdpSender)> {
    socket.set_nonblocking(true)?;
    sockopt::size_buffers(std::os::fd::AsRawFd::as_raw_fd(&socket));
    let state = Arc::new(UdpSocketState::new(UdpSockRef::from(&socket))?);
    let max_segments = state.max_gso_segments();
    let sending = socket.try_clone()?;
    // Registered for reading only: with writing too, every datagram sent
    // would wake the loop once more, for nothing, when the kernel frees
    // its buffer (the socket's write space callback).
    let socket = register(socket, Interest::READABLE)?;
    let receiver = UdpReceiver {
        socket,
        state: state.clone(),
        bufs: vec![0; RECV_BUFFER_LEN * RECV_BUFFERS],
        meta: vec![RecvMeta::default(); RECV_BUFFERS],
        received: 0,
    };
    Ok((
        receiver,
        UdpSender {
            socket: SendSocket::Runtime {
                socket: sending,
                waiting: None,
            },
            state,
            batch: SendBatch::new(max_segments),
            held: Box::default(),
        },
    ))
}

/// Another sending half for a socket whose receiving half another loop
/// serves, for a lean worker (no runtime): when it is blocked, the worker
/// waits in `poll(2)` for the socket ([`UdpSender::socket_fd`]) to be
/// writable, then calls [`HeldSend::retry`].
pub fn open_plain_sender(socket: std::net::UdpSocket) -> anyhow::Result<UdpSender> {
    socket.set_nonblocking(true)?;
    let state = Arc::new(UdpSocketState::new(UdpSockRef::from(&socket))?);
    let max_segments = state.max_gso_segments();
    Ok(UdpSender {
        socket: SendSocket::Plain(socket),
        state,
        batch: SendBatch::new(max_segments),
        held: Box::default(),
    })
}

/// A socket for talking to `server` from any local port.
pub fn bind_for(server: SocketAddr) -> anyhow::Result<(UdpReceiver, UdpSender)> {
    let any: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .expect("valid");
    bind(any)
}

/// The receiving half: batched `recvmmsg` with GRO.
pub struct UdpReceiver {
    socket: AsyncFd<std::net::UdpSocket>,
    state: Arc<UdpSocketState>,
    /// `RECV_BUFFERS` receive buffers back to back.
    bufs: Vec<u8>,
    meta: Vec<RecvMeta>,
    /// Datagrams received so far.
    received: u64,
}

impl UdpReceiver {
    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.get_ref().local_addr()
    }

    /// A second descriptor of the socket, for a sender on another thread.
    pub fn try_clone_socket(&self) -> io::Result<std::net::UdpSocket> {
        self.socket.get_ref().try_clone()
    }

    /// Datagrams received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Ready for a receive (as a poll function, so a loop can wait on many).
    pub fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.socket.poll_read_ready(cx).map_ok(drop)
    }

    /// Receive one batch without blocking and hand each datagram to `f`.
    /// Returns `WouldBlock` when nothing is pending.
    pub fn try_recv_batch(&mut self, mut f: impl FnMut(Peer, &[u8])) -> io::Result<()> {
        for (peer, datagram) in self.try_recv()? {
            f(peer, datagram);
        }
        Ok(())
    }

    /// Receive one batch without blocking: its datagrams, with where each
    /// came from. Returns `WouldBlock` when nothing is pending.
    pub fn try_recv(&mut self) -> io::Result<impl Iterator<Item = (Peer, &[u8])>> {
        let Self {
            socket,
            state,
            bufs,
            meta,
            received,
        } = self;
        let mut chunks = bufs.chunks_mut(RECV_BUFFER_LEN);
        let mut slices: [IoSliceMut<'_>; RECV_BUFFERS] =
            std::array::from_fn(|_| IoSliceMut::new(chunks.next().expect("RECV_BUFFERS chunks")));
        let n = socket.try_io(Interest::READABLE, |s| {
            state.recv(UdpSockRef::from(s), &mut slices, meta)
        })?;
        let batch = meta.iter().zip(bufs.chunks(RECV_BUFFER_LEN)).take(n);
        *received += batch
            .clone()
            .map(|(m, _)| m.len.div_ceil(m.stride.max(1)) as u64)
            .sum::<u64>();
        Ok(batch.flat_map(|(m, buf)| {
            let peer = Peer {
                addr: m.addr,
                local: m.dst_ip,
            };
            // With GRO one buffer holds several datagrams of `stride` bytes.
            buf[..m.len].chunks(m.stride.max(1)).map(move |d| (peer, d))
        }))
    }
}

/// The sending half: datagrams to one destination are batched into GSO
/// sends. Sends never block or await: when the socket buffer is full the
/// run that did not fit is held (one run, a bounded queue), the sender
/// says it is blocked, and the loop stops reading the TUN device until the
/// socket is writable again and the held run has gone
/// ([`HeldSend::poll_writable`], [`HeldSend::retry`]). Runs sent while
/// one is held are dropped, as the network would, and counted.
pub struct UdpSender {
    socket: SendSocket,
    state: Arc<UdpSocketState>,
    batch: SendBatch,
    held: Box<Held>,
}

/// The run a full socket buffer refused, kept for one retry, and the
/// datagrams dropped while it was held. Its buffer is allocated on the
/// first refusal only.
#[derive(Default)]
struct Held {
    buf: Vec<u8>,
    len: usize,
    to: Option<Peer>,
    segment: usize,
    count: usize,
    dropped: u64,
}

impl Held {
    fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Keep the run of `batch`; if one is held already, drop it instead
    /// (counted). Returns whether it was kept.
    fn keep(&mut self, batch: &SendBatch) -> bool {
        if !self.is_empty() {
            self.dropped += batch.count as u64;
            return false;
        }
        self.buf.resize(batch.len.max(self.buf.len()), 0);
        self.buf[..batch.len].copy_from_slice(&batch.buf[..batch.len]);
        self.len = batch.len;
        self.to = batch.to;
        self.segment = batch.segment;
        self.count = batch.count;
        true
    }

    fn transmit(&self) -> Option<Transmit<'_>> {
        let to = self.to.filter(|_| self.count > 0)?;
        Some(Transmit {
            destination: to.addr,
            ecn: None,
            contents: &self.buf[..self.len],
            segment_size: (self.count > 1).then_some(self.segment),
            src_ip: to.local,
        })
    }

    fn clear(&mut self) {
        self.count = 0;
        self.len = 0;
    }

    /// Drop the held run (counted).
    fn drop_run(&mut self) {
        self.dropped += self.count as u64;
        self.clear();
    }
}

impl UdpSender {
    /// Build a datagram for `to` in place: `fill` writes it into the given
    /// buffer and returns its length (or `None` to send nothing). Datagrams
    /// are batched; call [`UdpSender::flush`] at the end of a burst.
    pub fn send_with(&mut self, to: Peer, fill: impl FnOnce(&mut [u8]) -> Option<usize>) {
        self.send_with_any(|buf| Some((to, fill(buf)?)));
    }

    /// Build a datagram in place whose destination is known only once it
    /// is built: `fill` writes it and returns where it goes and its length.
    pub fn send_with_any(&mut self, fill: impl FnOnce(&mut [u8]) -> Option<(Peer, usize)>) {
        let Some((to, len)) = fill(self.batch.tail()) else {
            return;
        };
        if !self.batch.try_join(to, len) {
            // The new datagram cannot ride with the current run: send the run,
            // then start a new one with it.
            let run = self.batch.len;
            self.transmit_run();
            self.batch.start_run(to, run, len);
        }
        if self.batch.is_full() {
            self.flush();
        }
    }

    /// Queue a copy of `datagram` for `to`.
    pub fn send(&mut self, to: Peer, datagram: &[u8]) {
        self.send_with(to, |buf| {
            buf[..datagram.len()].copy_from_slice(datagram);
            Some(datagram.len())
        });
    }

    /// The socket, for a lean worker to wait on.
    pub fn socket_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        match &self.socket {
            SendSocket::Runtime { socket, .. } | SendSocket::Plain(socket) => socket.as_fd(),
        }
    }

    /// Send whatever is batched.
    pub fn flush(&mut self) {
        self.transmit_run();
        self.batch.clear();
    }

    fn transmit_run(&mut self) {
        let b = &self.batch;
        let Some(to) = b.to.filter(|_| b.count > 0) else {
            return;
        };
        if !self.held.is_empty() {
            // Still blocked: the network would drop it too.
            self.held.keep(b);
            return;
        }
        let t = Transmit {
            destination: to.addr,
            ecn: None,
            contents: &b.buf[..b.len],
            segment_size: (b.count > 1).then_some(b.segment),
            src_ip: to.local,
        };
        // The syscall itself, not through tokio's readiness: a socket the
        // reactor has not polled yet counts as not writable there, and a
        // path's first datagram (a handshake) would be lost.
        match self.state.try_send(self.socket.sock_ref(), &t) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if self.held.keep(b) && !self.socket.wait_writable() {
                    self.held.drop_run();
                }
            }
            // A lost datagram is the inner protocol's business; an unreachable
            // peer must not stop the tunnel.
            Err(e) => tracing::debug!("UDP send to {} failed: {e}", to.addr),
            Ok(()) => {}
        }
    }
}

impl HeldSend for UdpSender {
    /// A run waits for room in the socket buffer: stop feeding this sender
    /// until [`HeldSend::retry`] sent it.
    fn is_blocked(&self) -> bool {
        !self.held.is_empty()
    }

    /// Ready when blocked and the socket may have room (then call
    /// [`HeldSend::retry`]); pending otherwise.
    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.is_blocked() {
            return Poll::Pending;
        }
        match &self.socket {
            SendSocket::Runtime {
                waiting: Some(w), ..
            } => w.poll_write_ready(cx).map(drop),
            // Never blocked without (see `wait_writable`).
            SendSocket::Runtime { waiting: None, .. } => Poll::Pending,
            // A lean worker waits for it itself.
            SendSocket::Plain(_) => Poll::Pending,
        }
    }

    /// Send the held run, through tokio's readiness this time (for a
    /// socket registered with it): if the buffer is still full, readiness
    /// is cleared and [`HeldSend::poll_writable`] waits for the next edge.
    fn retry(&mut self) {
        let Self {
            socket,
            state,
            held,
            ..
        } = self;
        let Some(t) = held.transmit() else { return };
        let r = match &*socket {
            SendSocket::Runtime {
                socket: s,
                waiting: Some(w),
            } => w.try_io(Interest::WRITABLE, |_| state.try_send(s.into(), &t)),
            s => state.try_send(s.sock_ref(), &t),
        };
        match r {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => tracing::debug!("UDP send to {} failed: {e}", t.destination),
            Ok(()) => {}
        }
        held.clear();
        socket.stop_waiting();
    }

    /// Datagrams dropped because the socket buffer stayed full.
    fn dropped(&self) -> u64 {
        self.held.dropped
    }

    fn drop_counter(&self) -> &'static str {
        SEND_BUFFER_FULL
    }
}

/// Register `socket` with this thread's runtime for `interest`.
fn register(
    socket: std::net::UdpSocket,
    interest: Interest,
) -> io::Result<AsyncFd<std::net::UdpSocket>> {
    // SAFETY: the AsyncFd owns the socket, whose descriptor stays open and
    // the same until the AsyncFd goes.
    unsafe { AsyncFd::register_with_interest(socket, interest) }.map_err(|e| e.into_parts().1)
}

/// The socket a [`UdpSender`] sends on: a runtime's loop's, registered
/// with it for writing only while a run is held (see [`open`] for why not
/// always), or one a lean worker writes to ([`open_plain_sender`]).
enum SendSocket {
    Runtime {
        socket: std::net::UdpSocket,
        waiting: Option<AsyncFd<std::net::UdpSocket>>,
    },
    Plain(std::net::UdpSocket),
}

impl SendSocket {
    fn sock_ref(&self) -> UdpSockRef<'_> {
        match self {
            Self::Runtime { socket, .. } | Self::Plain(socket) => socket.into(),
        }
    }

    /// A run is held: have the runtime say when the socket has room.
    /// Returns false if it cannot (no descriptor left): the run is then
    /// dropped, as the network would.
    fn wait_writable(&mut self) -> bool {
        let Self::Runtime { socket, waiting } = self else {
            return true; // a lean worker waits itself
        };
        if waiting.is_some() {
            return true;
        }
        let registered = socket
            .try_clone()
            .and_then(|s| register(s, Interest::WRITABLE));
        match registered {
            Ok(w) => *waiting = Some(w),
            Err(e) => tracing::debug!("waiting for room on a UDP socket: {e}"),
        }
        waiting.is_some()
    }

    fn stop_waiting(&mut self) {
        if let Self::Runtime { waiting, .. } = self {
            *waiting = None;
        }
    }
}

/// A run of datagrams to one destination, all `segment` bytes long except
/// possibly the last: exactly what one GSO send can carry.
struct SendBatch {
    buf: Vec<u8>,
    len: usize,
    to: Option<Peer>,
    segment: usize,
    count: usize,
    max_segments: usize,
    /// A shorter datagram ended the run: nothing more may join.
    closed: bool,
}

impl SendBatch {
    fn new(max_segments: usize) -> Self {
        Self {
            // Room for a full run plus one maximum-size datagram after it.
            buf: vec![0; GSO_MAX_BYTES + MAX_DATAGRAM],
            len: 0,
            to: None,
            segment: 0,
            count: 0,
            max_segments: max_segments.max(1),
            closed: false,
        }
    }

    /// Where the next datagram is written.
    fn tail(&mut self) -> &mut [u8] {
        &mut self.buf[self.len..]
    }

    /// Add the datagram just written at the tail to the run, if it fits the
    /// GSO rules (same destination, not longer than the others).
    fn try_join(&mut self, to: Peer, len: usize) -> bool {
        if self.count == 0 {
            self.start_run(to, self.len, len);
            return true;
        }
        if self.to != Some(to)
            || self.closed
            || len > self.segment
            || self.len + len > GSO_MAX_BYTES
        {
            return false;
        }
        self.len += len;
        self.count += 1;
        self.closed = len < self.segment;
        true
    }

    /// Start a new run with the datagram at `buf[at..at + len]`.
    fn start_run(&mut self, to: Peer, at: usize, len: usize) {
        self.buf.copy_within(at..at + len, 0);
        self.len = len;
        self.to = Some(to);
        self.segment = len;
        self.count = 1;
        self.closed = false;
    }

    fn is_full(&self) -> bool {
        self.closed || self.count >= self.max_segments || self.len + self.segment > GSO_MAX_BYTES
    }

    fn clear(&mut self) {
        self.len = 0;
        self.count = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> Peer {
        SocketAddr::from(([192, 0, 2, 1], port)).into()
    }

    #[test]
    fn equal_datagrams_join_until_a_short_one_closes_the_run() {
        let mut b = SendBatch::new(64);
        assert!(b.try_join(addr(1), 100));
        assert!(b.try_join(addr(1), 100));
        assert!(!b.is_full());
        assert!(b.try_join(addr(1), 60));
        assert!(b.is_full());
        assert_eq!((b.len, b.count, b.segment), (260, 3, 100));
    }

    #[test]
    fn longer_datagram_or_other_destination_starts_a_new_run() {
        let mut b = SendBatch::new(64);
        assert!(b.try_join(addr(1), 100));
        assert!(!b.try_join(addr(1), 101));
        assert!(!b.try_join(addr(2), 100));
        b.tail()[..3].copy_from_slice(b"xyz");
        b.start_run(addr(2), 100, 3);
        assert_eq!((b.len, b.count, &b.buf[..3]), (3, 1, &b"xyz"[..]));
    }

    #[test]
    fn another_local_address_starts_a_new_run() {
        let mut b = SendBatch::new(64);
        assert!(b.try_join(addr(1), 100));
        let other = Peer {
            local: Some([192, 0, 2, 9].into()),
            ..addr(1)
        };
        assert!(!b.try_join(other, 100));
    }

    #[test]
    fn one_refused_run_is_held_and_more_are_dropped_and_counted() {
        let mut b = SendBatch::new(64);
        let mut held = Held::default();
        b.tail()[..3].copy_from_slice(b"abc");
        assert!(b.try_join(addr(1), 3));
        assert!(held.keep(&b), "the first refused run is held");
        assert!(!held.is_empty());
        b.clear();
        assert!(b.try_join(addr(1), 100));
        assert!(b.try_join(addr(1), 100));
        assert!(!held.keep(&b), "the queue (one run) is full");
        assert_eq!(held.dropped, 2, "both datagrams of the second run counted");
        let t = held.transmit().expect("held run");
        assert_eq!((t.contents, t.segment_size), (&b"abc"[..], None));
        held.clear();
        assert!(held.is_empty() && held.transmit().is_none());
        assert!(held.keep(&b), "room again once sent");
        assert_eq!(held.transmit().expect("run").segment_size, Some(100));
    }

    #[test]
    fn a_held_run_that_cannot_wait_is_dropped_and_counted() {
        let mut b = SendBatch::new(64);
        let mut held = Held::default();
        assert!(b.try_join(addr(1), 100) && b.try_join(addr(1), 100));
        assert!(held.keep(&b));
        held.drop_run();
        assert!(held.is_empty() && held.transmit().is_none());
        assert_eq!(held.dropped, 2);
    }

    #[test]
    fn respects_segment_limit() {
        let mut b = SendBatch::new(2);
        assert!(b.try_join(addr(1), 100));
        assert!(b.try_join(addr(1), 100));
        assert!(b.is_full());
    }
}
