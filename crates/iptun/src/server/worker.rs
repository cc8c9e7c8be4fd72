//! Workers: the server's data path on every core.
//!
//! Each worker is a thread with a runtime of its own, one queue of the
//! multi-queue TUN device and a socket of each UDP listener, all bound to
//! the listener's address (`SO_REUSEPORT`). The kernel keeps a client's
//! datagrams on one socket (it picks by source and destination) and sends
//! the replies of a flow to the queue that wrote the flow's packets, so a
//! client's traffic stays on one worker both ways, and several clients
//! spread over the cores.
//!
//! The workers share the one [`Endpoint`] (sessions, handshakes, every
//! transport's state) under a lock held while a packet is opened or
//! sealed, never across an await or around a syscall: reads, writes and
//! sends, where the kernel does most of the work, run in parallel. The
//! main loop is worker 0; it alone keeps the timers, the control socket
//! and the other listeners: a raw ICMP socket sees every echo request, an
//! HTTP connection lives on one thread, and a DNS session's queries come
//! from any port of its resolvers (spread over workers, they would reach
//! the TUN device out of order). Their sessions' replies come back to the
//! main loop's queue; what a worker has to send there all the same goes to
//! the main loop through a bounded queue.

use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::workers::Stop;
use anyhow::Context as _;
use iptun_proto::endpoint::{Endpoint, Transmit};
use tokio::sync::{Notify, mpsc};

use super::{Drivers, ListenerDriver, from_tun, ready_listener, transmit};
use crate::transport::udp;
use crate::tun::{Queue, Tun};
use crate::workers::{self, Job};

/// What every worker shares.
pub struct Core {
    state: Mutex<Shared>,
    /// A worker's batch set a deadline before the one the main loop
    /// sleeps to (a handshake's first sweep, a DNS answer's fill wait).
    wake_main: Notify,
}

/// The state behind [`Core`]'s lock.
pub struct Shared {
    pub ep: Endpoint,
    /// When the main loop's timer fires next.
    main_deadline: Option<Instant>,
    /// What each worker carried, as of its last batch (the main loop's,
    /// first, is counted when asked: see [`Drivers::carried`]).
    pub carried: Vec<Carried>,
}

/// What one loop carried.
#[derive(Clone, Copy, Debug, Default)]
pub struct Carried {
    /// Datagrams received on its sockets.
    pub datagrams: u64,
    /// Packets read from its TUN queue.
    pub tun_packets: u64,
    /// Datagrams it dropped for a full socket buffer.
    pub send_buffer_full: u64,
    /// Transmits it dropped because the main loop's queue was full.
    pub to_main_full: u64,
}

impl Core {
    /// The endpoint, to be served by `loops` loops (the main one included).
    pub fn new(ep: Endpoint, loops: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(Shared {
                ep,
                main_deadline: None,
                carried: vec![Carried::default(); loops],
            }),
            wake_main: Notify::new(),
        })
    }

    /// Take the lock (a worker that panicked holding it has already
    /// stopped the server: see [`crate::workers::Workers`]).
    pub fn lock(&self) -> MutexGuard<'_, Shared> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The main loop: when its timer is due, to sleep until then.
    pub fn main_deadline(&self) -> Option<Instant> {
        let mut shared = self.lock();
        shared.main_deadline = shared.ep.poll_timeout();
        shared.main_deadline
    }

    /// Resolves when a worker moved the main loop's deadline earlier.
    pub async fn main_woken(&self) {
        self.wake_main.notified().await;
    }

    /// After a worker's batch: wake the main loop if the endpoint's next
    /// deadline came before the one it sleeps to.
    fn after_batch(&self, shared: &mut Shared) {
        let next = shared.ep.poll_timeout();
        if next.is_some_and(|t| shared.main_deadline.is_none_or(|d| t < d)) {
            shared.main_deadline = next;
            self.wake_main.notify_one();
        }
    }
}

/// What a worker serves: a TUN queue and, for each of the endpoint's
/// listeners (in order), a socket sharing a UDP listener's address, or
/// `None` for a listener the main loop serves alone.
pub struct Assignment {
    pub queue: Queue,
    pub sockets: Vec<Option<std::net::UdpSocket>>,
}

/// Where a worker sends what is to go out on a listener the main loop
/// serves alone (rare: the kernel brings a session's packets to the queue
/// of the loop whose listener received the session's packets).
pub type ToMain = mpsc::Sender<(Transmit, Vec<u8>)>;

/// Transmits the workers may queue for the main loop.
const TO_MAIN: usize = 1024;

/// The main loop's end of [`ToMain`].
pub type FromWorkers = mpsc::Receiver<(Transmit, Vec<u8>)>;

/// The workers' jobs, one per assignment (numbered from 1: the main loop
/// is 0, and receives what they send on its listeners).
pub fn jobs(core: &Arc<Core>, assignments: Vec<Assignment>) -> (Vec<Job>, FromWorkers) {
    workers::jobs(core, assignments, TO_MAIN, run)
}

fn run(
    core: &Arc<Core>,
    n: usize,
    a: Assignment,
    to_main: ToMain,
    stop: &Stop,
) -> anyhow::Result<()> {
    workers::block_on(async {
        let tun = Tun::open_queue(a.queue)?;
        let mut drivers = Drivers::new();
        drivers.main = Some(to_main);
        for (i, socket) in a.sockets.into_iter().enumerate() {
            let Some(socket) = socket else {
                drivers.listeners.push(ListenerDriver::Main);
                continue;
            };
            let (rx, tx) = udp::open(socket)?;
            drivers.first_udp.get_or_insert(i);
            drivers.listeners.push(ListenerDriver::Udp { rx, tx });
        }
        serve(core, n, tun, drivers, stop).await
    })
}

/// One worker's loop: the main loop's data path, without its timers and
/// control.
async fn serve(
    core: &Core,
    n: usize,
    mut tun: Tun,
    mut drivers: Drivers,
    stop: &Stop,
) -> anyhow::Result<()> {
    let written = tun.written();
    loop {
        let blocked = drivers.is_blocked();
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            r = tun.readable(), if !blocked => {
                r.context("waiting on the TUN device")?;
                if !from_tun(core, &mut tun, &mut drivers)? {
                    tokio::task::yield_now().await;
                }
            }
            (i, writable) = poll_fn(|cx| ready_listener(&drivers.listeners, cx)) => {
                if writable {
                    drivers.listeners[i].retry();
                } else if !drivers.listeners[i].receive(core, i, &mut tun).await? {
                    core.lock().ep.note_backlog(Instant::now());
                    tokio::task::yield_now().await;
                }
            }
            () = written.notified(), if tun.has_staged() => {
                tun.flush().await.context("writing to the TUN device")?;
            }
        }
        let mut shared = core.lock();
        transmit(&mut shared.ep, &mut drivers);
        shared.carried[n] = drivers.carried(&tun);
        core.after_batch(&mut shared);
        drop(shared);
        drivers.flush();
    }
}

/// Workers to start by default: one per core, at most `MAX_DEFAULT`.
pub fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_DEFAULT))
}

/// Beyond this many, the shared endpoint's lock (about a fifth of a
/// packet's work happens under it) gains little from more threads.
const MAX_DEFAULT: usize = 8;

/// The most workers `--workers` takes (a TUN device has at most 256 queues).
pub const MAX: usize = 64;
