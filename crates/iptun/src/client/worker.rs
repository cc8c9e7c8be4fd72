//! Workers: the client's upstream on more cores (`--workers N`).
//!
//! The TUN device gets N queues, and a steering program spreads the
//! outgoing flows over them by flow hash ([`crate::steering`]): each flow
//! stays on one queue, in order. The main loop serves queue 0 and all the
//! rest: every socket's receiving side, the timers, the control socket.
//! Each worker is a thread with a runtime of its own that reads its queue,
//! takes each packet's place in the session under the connection's lock
//! (never held across an await, nor around a syscall of the UDP data
//! path), seals it without the lock, and sends it on its own descriptor of
//! the current path's UDP socket, registered for writing only. A packet
//! the worker cannot send (the current path is ICMP, DNS or HTTP) goes to
//! the main loop through a bounded queue, and is dropped (counted) when
//! that is full.
//!
//! Downstream stays on the main loop: the server's datagrams all come to
//! one socket from one address, and spreading them over threads would
//! reorder their flows.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Instant;

use anyhow::Context as _;
use iptun_proto::connection::{Connection, PathId, Transmit};
use iptun_proto::transport::Kind;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::daemon::MAX_BATCHES_PER_WAKEUP;
use crate::transport::HeldSend;
use crate::transport::udp::{self, UdpSender};
use crate::tun::{Queue, Tun};
use crate::workers::{self, Job};

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

    /// After a worker's batch: wake the main loop if the connection's next
    /// deadline came before the one it sleeps to.
    fn after_batch(&self) {
        let next = self.lock().poll_timeout();
        let mut main = self.main_deadline.lock().unwrap_or_else(|e| e.into_inner());
        if next.is_some_and(|t| main.is_none_or(|d| t < d)) {
            *main = next;
            self.wake_main.notify_one();
        }
    }
}

/// Packets the workers hand to the main loop.
pub type FromWorkers = mpsc::Receiver<Vec<u8>>;

/// Packets the workers may queue for the main loop.
const TO_MAIN: usize = 1024;

/// What a worker serves: a TUN queue, and for each path (in order) a
/// descriptor of its UDP socket and the server's address, or `None` for a
/// path that is not UDP.
pub struct Assignment {
    pub queue: Queue,
    pub sockets: Vec<Option<(std::net::UdpSocket, SocketAddr)>>,
}

/// The workers' jobs, one per assignment.
pub fn jobs(core: &Arc<Core>, assignments: Vec<Assignment>) -> (Vec<Job>, FromWorkers) {
    workers::jobs(core, assignments, TO_MAIN, run)
}

/// Worker `n`: its queue and its senders, on a runtime of its own.
fn run(
    core: &Arc<Core>,
    n: usize,
    a: Assignment,
    to_main: mpsc::Sender<Vec<u8>>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    workers::block_on(async {
        let tun = Tun::open_queue(a.queue)?;
        let senders = a
            .sockets
            .into_iter()
            .map(|s| {
                s.map(|(socket, server)| Ok((udp::open_sender(socket)?, server)))
                    .transpose()
            })
            .collect::<anyhow::Result<_>>()?;
        serve(core, n, tun, senders, &to_main, stop).await
    })
}

/// A path's sender in a worker, and where the server is.
type Sender = Option<(UdpSender, SocketAddr)>;

/// One worker's loop.
async fn serve(
    core: &Core,
    n: usize,
    mut tun: Tun,
    mut senders: Vec<Sender>,
    to_main: &mpsc::Sender<Vec<u8>>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let blocked = senders.iter().flatten().any(|(tx, _)| tx.is_blocked());
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            r = tun.readable(), if !blocked => {
                r.context("waiting on the TUN device")?;
                let dry = from_tun(core, &mut tun, &mut senders, to_main)?;
                core.tun_packets[n - 1].store(tun.packets_read(), Ordering::Relaxed);
                if !dry {
                    tokio::task::yield_now().await;
                }
            }
            i = poll_fn(|cx| writable(&senders, cx)) => {
                if let Some((tx, _)) = &mut senders[i] {
                    tx.retry();
                }
            }
        }
    }
}

/// The index of a sender whose held run may go now.
fn writable(senders: &[Sender], cx: &mut Context<'_>) -> Poll<usize> {
    for (i, s) in senders.iter().enumerate() {
        if let Some((tx, _)) = s
            && tx.poll_writable(cx).is_ready()
        {
            return Poll::Ready(i);
        }
    }
    Poll::Pending
}

/// Read the queue (up to a bound) and carry what it holds. Returns whether
/// the queue ran dry.
fn from_tun(
    core: &Core,
    tun: &mut Tun,
    senders: &mut [Sender],
    to_main: &mpsc::Sender<Vec<u8>>,
) -> anyhow::Result<bool> {
    let flush =
        |senders: &mut [Sender]| senders.iter_mut().flatten().for_each(|(tx, _)| tx.flush());
    let mut dry = false;
    for batch in 0..MAX_BATCHES_PER_WAKEUP {
        if batch == 1 {
            flush(senders); // the first batch leaves at once (see the server's)
        }
        let now = Instant::now();
        let result = tun.try_read_batch(|packet| {
            let conn = core.lock();
            let path = conn.current_path();
            let Some((tx, server)) = senders.get_mut(path).and_then(Option::as_mut) else {
                drop(conn);
                if to_main.try_send(packet.to_vec()).is_err() {
                    core.to_main_full.fetch_add(1, Ordering::Relaxed);
                }
                return;
            };
            tx.send_with((*server).into(), move |buf| {
                Some(seal(conn, now, path, packet, buf)?.len)
            });
        });
        core.after_batch();
        match result {
            // A full socket buffer: read no more until it has room.
            Ok(()) if senders.iter().flatten().any(|(tx, _)| tx.is_blocked()) => break,
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                dry = true;
                break;
            }
            Err(e) => return Err(e).context("reading the TUN device"),
        }
    }
    flush(senders);
    Ok(dry)
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
