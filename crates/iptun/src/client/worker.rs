//! Workers: the client's upstream on more cores (`--workers N`).
//!
//! The TUN device gets N queues, and a steering program spreads the
//! outgoing flows over them by flow hash ([`crate::steering`]): each flow
//! stays on one queue, in order. The main loop serves queue 0 and all the
//! rest: every socket's receiving side, the timers, the control socket.
//! Each worker is a lean thread: no async runtime, it waits in `poll(2)`
//! itself ([`workers::wait`]), which after an idle spell gets it to the
//! packet about 20 µs sooner than a runtime would. It reads its queue,
//! takes each packet's place in the session under the connection's lock
//! (never held around a syscall of the UDP data path), seals it without
//! the lock, and sends it on its own descriptor of the current path's UDP
//! socket, which it only writes to. A packet the worker cannot send (the
//! current path is ICMP, DNS or HTTP) goes to the main loop through a
//! bounded queue; while that is full the worker reads no more
//! (backpressure, as for a full socket buffer), and what did not fit of
//! the last batch is dropped (counted).
//!
//! Downstream stays on the main loop: the server's datagrams all come to
//! one socket from one address, and spreading them over threads would
//! reorder their flows.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use iptun_proto::connection::{Connection, PathId, Transmit};
use iptun_proto::transport::Kind;
use rustix::event::{PollFd, PollFlags};
use tokio::sync::{Notify, mpsc};

use crate::daemon::MAX_BATCHES_PER_WAKEUP;
use crate::transport::HeldSend as _;
use crate::transport::udp::{self, UdpSender};
use crate::tun::TunReader;
use crate::workers::{self, Job, Stop};

/// The connection, shared by the main loop and the workers.
pub struct Core {
    conn: Mutex<Connection>,
    /// When the main loop's timer fires next.
    main_deadline: Mutex<Option<Instant>>,
    /// A worker's packet moved the connection's deadline before the main
    /// loop's (a handshake it asked for, say).
    wake_main: Notify,
    /// Packets dropped because the main loop's queue was full.
    to_main_full: AtomicU64,
    /// Packets each worker read from its queue (the first is worker 1's).
    tun_packets: Vec<AtomicU64>,
}

impl Core {
    /// The connection, to be served by `loops` loops (the main one included).
    pub fn new(conn: Connection, loops: usize) -> Arc<Self> {
        Arc::new(Self {
            conn: Mutex::new(conn),
            main_deadline: Mutex::new(None),
            wake_main: Notify::new(),
            to_main_full: AtomicU64::new(0),
            tun_packets: (1..loops).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// Packets each worker read from its queue of the TUN device.
    pub fn workers_tun_packets(&self) -> impl Iterator<Item = u64> + '_ {
        self.tun_packets.iter().map(|n| n.load(Ordering::Relaxed))
    }

    /// Take the lock (a worker that panicked holding it has already
    /// stopped the client: see [`workers::Workers`]).
    pub fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The main loop: when its timer is due, to sleep until then.
    pub fn main_deadline(&self) -> Option<Instant> {
        let next = self.lock().poll_timeout();
        *self.main_deadline.lock().unwrap_or_else(|e| e.into_inner()) = next;
        next
    }

    /// Resolves when a worker moved the main loop's deadline earlier.
    pub async fn main_woken(&self) {
        self.wake_main.notified().await;
    }

    /// Packets the workers dropped because the main loop's queue was full.
    pub fn to_main_full(&self) -> u64 {
        self.to_main_full.load(Ordering::Relaxed)
    }

    /// After a worker's batch: the main loop must learn in time of a
    /// deadline the batch moved before the one it sleeps to. A near one
    /// wakes it now; for a later one (a packet after a quiet spell sets
    /// the path's liveness timers, seconds away) this returns when to look
    /// again, shortly before it: the main loop usually wakes meanwhile
    /// anyway (the reply moves them again), and a thread woken for nothing
    /// would compete for the cores with the packet in flight.
    fn after_batch(&self, now: Instant) -> Option<Instant> {
        let next = self.lock().poll_timeout();
        let mut main = self.main_deadline.lock().unwrap_or_else(|e| e.into_inner());
        match wake_main(*main, next, now) {
            Wake::Now => {
                *main = next;
                self.wake_main.notify_one();
                None
            }
            Wake::LookAgain(at) => Some(at),
            Wake::No => None,
        }
    }
}

/// What a worker does about the main loop, which sleeps until `main`,
/// when the connection's next deadline is `next`.
#[derive(Debug, PartialEq)]
enum Wake {
    Now,
    /// Look again then (the deadline is further away than
    /// [`WAKE_MAIN_AHEAD`]).
    LookAgain(Instant),
    /// The main loop wakes in time for it.
    No,
}

fn wake_main(main: Option<Instant>, next: Option<Instant>, now: Instant) -> Wake {
    let Some(next) = next.filter(|&t| main.is_none_or(|d| t < d)) else {
        return Wake::No;
    };
    match next.checked_sub(WAKE_MAIN_AHEAD) {
        Some(at) if at > now => Wake::LookAgain(at),
        _ => Wake::Now,
    }
}

/// How long before a deadline a worker moved the main loop is woken for it
/// (at the latest).
const WAKE_MAIN_AHEAD: Duration = Duration::from_millis(50);

/// Packets the workers hand to the main loop.
pub type FromWorkers = mpsc::Receiver<Vec<u8>>;

/// Packets the workers may queue for the main loop: a few batches, for the
/// main loop's path to take at its pace (the workers read no more while the
/// queue is full: backpressure, as a loop that reads the device itself
/// stops reading while its path is blocked).
const TO_MAIN: usize = 256;

/// How long a worker waits before it looks again whether the main loop's
/// queue has room.
const MAIN_FULL_WAIT: Duration = Duration::from_millis(1);

/// What a worker serves: a TUN queue, and for each path (in order) a
/// descriptor of its UDP socket and the server's address, or `None` for a
/// path that is not UDP.
pub struct Assignment {
    pub queue: TunReader,
    pub sockets: Vec<Option<(std::net::UdpSocket, SocketAddr)>>,
}

/// The workers' jobs, one per assignment.
pub fn jobs(core: &Arc<Core>, assignments: Vec<Assignment>) -> (Vec<Job>, FromWorkers) {
    workers::jobs(core, assignments, TO_MAIN, run)
}

/// Worker `n`: its queue and its senders, in a lean loop (no runtime: it
/// waits in `poll(2)` itself, see [`workers::wait`]).
fn run(
    core: &Arc<Core>,
    n: usize,
    a: Assignment,
    to_main: mpsc::Sender<Vec<u8>>,
    stop: &Stop,
) -> anyhow::Result<()> {
    let mut tun = a.queue;
    let mut senders: Vec<Sender> = a
        .sockets
        .into_iter()
        .map(|s| {
            s.map(|(socket, server)| Ok((udp::open_plain_sender(socket)?, server)))
                .transpose()
        })
        .collect::<anyhow::Result<_>>()?;
    let mut look_again = None;
    while !wait(&tun, &senders, &to_main, look_again, stop)? {
        // Level-triggered: whatever was ready is ready still. A retry on a
        // socket still full, or a read of a queue still empty, costs one
        // syscall and changes nothing.
        senders
            .iter_mut()
            .flatten()
            .filter(|(tx, _)| tx.is_blocked())
            .for_each(|(tx, _)| tx.retry());
        if !blocked(&senders) && to_main.capacity() > 0 {
            from_tun(core, &mut tun, &mut senders, &to_main)?;
            core.tun_packets[n - 1].store(tun.packets_read(), Ordering::Relaxed);
        }
        look_again = core.after_batch(Instant::now());
    }
    Ok(())
}

/// A path's sender in a worker, and where the server is.
type Sender = Option<(UdpSender, SocketAddr)>;

/// A sender waits for room in its socket buffer.
fn blocked(senders: &[Sender]) -> bool {
    senders.iter().flatten().any(|(tx, _)| tx.is_blocked())
}

/// Wait for the queue to have packets (unless a sender is blocked: the
/// queue waits until it has room, backpressure) or a blocked sender's
/// socket to have room; while the main loop's queue is full, look again
/// after a while, and at `look_again` in any case. Returns whether the
/// workers are to stop.
fn wait(
    tun: &TunReader,
    senders: &[Sender],
    to_main: &mpsc::Sender<Vec<u8>>,
    look_again: Option<Instant>,
    stop: &Stop,
) -> anyhow::Result<bool> {
    let main_full = to_main.capacity() == 0;
    let mut fds = Vec::with_capacity(senders.len() + 2);
    if !blocked(senders) && !main_full {
        fds.push(PollFd::new(tun, PollFlags::IN));
    }
    for (tx, _) in senders.iter().flatten().filter(|(tx, _)| tx.is_blocked()) {
        fds.push(PollFd::from_borrowed_fd(tx.socket_fd(), PollFlags::OUT));
    }
    let until = look_again.map(|t| t.saturating_duration_since(Instant::now()));
    let timeout = match (main_full.then_some(MAIN_FULL_WAIT), until) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    workers::wait(stop, &mut fds, timeout).context("waiting on the TUN queue and the UDP sockets")
}

/// Read the queue (up to a bound) and carry what it holds.
fn from_tun(
    core: &Core,
    tun: &mut TunReader,
    senders: &mut [Sender],
    to_main: &mpsc::Sender<Vec<u8>>,
) -> anyhow::Result<()> {
    let flush =
        |senders: &mut [Sender]| senders.iter_mut().flatten().for_each(|(tx, _)| tx.flush());
    for batch in 0..MAX_BATCHES_PER_WAKEUP {
        if batch == 1 {
            flush(senders); // the first batch leaves at once (see the server's)
        }
        let now = Instant::now();
        let packets = match tun.try_read() {
            Ok(packets) => packets,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e).context("reading the TUN device"),
        };
        for packet in packets {
            let conn = core.lock();
            let path = conn.current_path();
            let Some((tx, server)) = senders.get_mut(path).and_then(Option::as_mut) else {
                drop(conn);
                if to_main.try_send(packet.to_vec()).is_err() {
                    core.to_main_full.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            };
            tx.send_with((*server).into(), move |buf| {
                Some(seal(conn, now, path, packet, buf)?.len)
            });
        }
        // A full socket buffer, or a full queue to the main loop: read no
        // more until it has room.
        if blocked(senders) || to_main.capacity() == 0 {
            break;
        }
    }
    flush(senders);
    Ok(())
}

/// Seal `packet` into `buf` for `path`, the connection's current path,
/// given its lock: on UDP only the packet's counter is taken under the
/// lock and the encryption (most of the work) happens without it; the
/// other transports frame under it (their framing is the connection's).
pub fn seal(
    mut conn: MutexGuard<'_, Connection>,
    now: Instant,
    path: PathId,
    packet: &[u8],
    buf: &mut [u8],
) -> Option<Transmit> {
    if conn.kind(path) != Kind::Udp {
        return conn.handle_tun_packet(now, packet, buf);
    }
    let (reserved, t) = conn.reserve_tun_packet(now, path, packet, buf.len())?;
    drop(conn);
    reserved.seal(packet, buf).ok()?;
    Some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_main_loop_is_woken_for_a_near_deadline_and_later_for_a_far_one() {
        let now = Instant::now();
        let ms = |n| now + Duration::from_millis(n);
        // Before the main loop's (or it sleeps with none): a near one wakes
        // it now, a far one is looked at again shortly before it.
        assert_eq!(wake_main(Some(ms(5000)), Some(ms(10)), now), Wake::Now);
        assert_eq!(wake_main(None, Some(ms(10)), now), Wake::Now);
        assert_eq!(wake_main(Some(ms(5000)), Some(now), now), Wake::Now);
        assert_eq!(
            wake_main(Some(ms(5000)), Some(ms(1000)), now),
            Wake::LookAgain(ms(1000) - WAKE_MAIN_AHEAD)
        );
        // Looked at again when it is due: now it wakes the main loop.
        assert_eq!(
            wake_main(Some(ms(5000)), Some(ms(1000)), ms(1000) - WAKE_MAIN_AHEAD),
            Wake::Now
        );
        // The main loop wakes by then anyway, or there is none.
        assert_eq!(wake_main(Some(ms(10)), Some(ms(10)), now), Wake::No);
        assert_eq!(wake_main(Some(ms(10)), Some(ms(1000)), now), Wake::No);
        assert_eq!(wake_main(Some(ms(10)), None, now), Wake::No);
    }
}
