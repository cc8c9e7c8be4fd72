//! The server loop's side of the HTTP listeners: the connection tasks
//! ([`http_server`]) send [`Event`]s here; downstream messages go back
//! batched per WebSocket, or into the long-poll [`Mailboxes`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use iptun_proto::engine::{Server, ServerOutput};
use iptun_proto::http::{BATCH_TARGET, Batch, Mailboxes, messages};
use tokio::sync::{mpsc, oneshot};

use super::{Path, Senders};
use crate::daemon::MAX_BATCHES_PER_WAKEUP;
use crate::transport::http_server::{self, Event, Listener};
use crate::tun::Tun;

/// One WebSocket's way back: its task's queue and the batch being built.
struct WsDown {
    tx: mpsc::Sender<Bytes>,
    batch: Batch,
}

/// The HTTP listeners' shared state.
pub(super) struct Listeners {
    events: mpsc::Receiver<(usize, Event)>,
    events_tx: mpsc::Sender<(usize, Event)>,
    /// Per listener: whether it speaks TLS (for status).
    tls: Vec<bool>,
    ws: HashMap<u64, WsDown>,
    /// WebSockets with a batch waiting for [`Listeners::flush`].
    dirty: Vec<u64>,
    polls: Mailboxes<oneshot::Sender<Vec<u8>>>,
    /// Downstream batches dropped because a WebSocket's queue was full.
    queue_full: u64,
    /// Bodies that ended inside a message.
    malformed: u64,
}

impl Listeners {
    pub(super) fn new() -> Self {
        let (events_tx, events) = mpsc::channel(256);
        Self {
            events,
            events_tx,
            tls: Vec::new(),
            ws: HashMap::new(),
            dirty: Vec::new(),
            polls: Mailboxes::new(),
            queue_full: 0,
            malformed: 0,
        }
    }

    /// Listen on `addr` for `path`; returns the bound address.
    pub(super) async fn add(
        &mut self,
        addr: SocketAddr,
        path: &str,
        tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    ) -> anyhow::Result<SocketAddr> {
        let listener = Listener {
            index: self.tls.len(),
            path: path.to_owned(),
            tls: tls.clone(),
        };
        let local = http_server::spawn(addr, listener, self.events_tx.clone()).await?;
        self.tls.push(tls.is_some());
        Ok(local)
    }

    /// The transport's name for listener `i`.
    pub(super) fn scheme(&self, listener: usize) -> &'static str {
        if self.tls.get(listener).copied().unwrap_or(false) {
            "https"
        } else {
            "http"
        }
    }

    /// The next event, once one is there.
    pub(super) async fn next_event(&mut self) -> Option<(usize, Event)> {
        if self.tls.is_empty() {
            return std::future::pending().await;
        }
        self.events.recv().await
    }

    /// A downstream message on the path to a client.
    pub(super) fn send(&mut self, path: Path, msg: &[u8]) {
        match path {
            Path::Ws { conn, .. } => {
                let Some(ws) = self.ws.get_mut(&conn) else {
                    return;
                };
                if ws.batch.is_empty() {
                    self.dirty.push(conn);
                }
                ws.batch.push(msg);
                if ws.batch.len() >= BATCH_TARGET {
                    Self::send_batch(ws, &mut self.queue_full);
                }
            }
            Path::Poll { tag, .. } => self.polls.send(tag, msg),
            _ => {}
        }
    }

    fn send_batch(ws: &mut WsDown, queue_full: &mut u64) {
        if ws.batch.is_empty() {
            return;
        }
        if ws.tx.try_send(Bytes::from(ws.batch.take())).is_err() {
            *queue_full += 1; // the inner TCP sees loss and slows down
        }
    }

    /// Send the batches built since the last flush; answer held polls.
    pub(super) fn flush(&mut self) {
        for conn in self.dirty.drain(..) {
            if let Some(ws) = self.ws.get_mut(&conn) {
                Self::send_batch(ws, &mut self.queue_full);
            }
        }
        while let Some(a) = self.polls.poll_answer() {
            let _ = a.request.send(a.body);
        }
    }

    pub(super) fn next_timeout(&self) -> Option<Instant> {
        self.polls.next_timeout()
    }

    /// Answer polls held past their hold (empty).
    pub(super) fn handle_timeout(&mut self, now: Instant) {
        for a in self.polls.handle_timeout(now) {
            let _ = a.request.send(a.body);
        }
    }

    /// Add this transport's own counters to a status report.
    pub(super) fn add_drops(&self, drops: &mut std::collections::BTreeMap<String, u64>) {
        for (k, v) in [
            ("http_queue_full", self.queue_full),
            ("http_malformed", self.malformed),
            ("http_mailbox_dropped", self.polls.dropped),
        ] {
            if v > 0 {
                *drops.entry(k.into()).or_default() += v;
            }
        }
    }
}

/// Handle `first` and whatever other events are waiting (up to a bound).
pub(super) async fn receive(
    engine: &mut Server<Path>,
    tun: &mut Tun,
    senders: &mut Senders,
    first: (usize, Event),
) -> anyhow::Result<()> {
    let mut next = Some(first);
    for _ in 0..MAX_BATCHES_PER_WAKEUP * 8 {
        let Some((listener, event)) = next.take() else {
            break;
        };
        handle(engine, tun, senders, listener, event).await?;
        next = senders.http.events.try_recv().ok();
    }
    tun.flush().await?;
    senders.flush();
    Ok(())
}

async fn handle(
    engine: &mut Server<Path>,
    tun: &mut Tun,
    senders: &mut Senders,
    listener: usize,
    event: Event,
) -> std::io::Result<()> {
    let now = Instant::now();
    match event {
        Event::WsOpen { conn, tx } => {
            let batch = Batch::new();
            senders.http.ws.insert(conn, WsDown { tx, batch });
        }
        Event::WsClosed { conn } => {
            senders.http.ws.remove(&conn);
        }
        Event::WsData { conn, body } => {
            let from = Path::Ws { listener, conn };
            upstream(engine, tun, senders, &from, &body, now).await?;
        }
        Event::Poll { tag, body, reply } => {
            senders.http.polls.open(now, tag);
            let from = Path::Poll { listener, tag };
            upstream(engine, tun, senders, &from, &body, now).await?;
            let carried_data = !body.is_empty();
            for a in senders.http.polls.request(now, tag, reply, carried_data) {
                let _ = a.request.send(a.body);
            }
        }
    }
    Ok(())
}

/// The messages of one body from `from`, into the engine.
async fn upstream(
    engine: &mut Server<Path>,
    tun: &mut Tun,
    senders: &mut Senders,
    from: &Path,
    body: &[u8],
    now: Instant,
) -> std::io::Result<()> {
    let mut msgs = messages(body);
    for msg in msgs.by_ref() {
        if tun.stage_buffer(msg.len()).is_none() {
            tun.flush().await?; // a body can hold more packets than a write batch
        }
        let Some(buf) = tun.stage_buffer(msg.len()) else {
            continue;
        };
        match engine.handle_datagram(now, from, msg, buf) {
            Ok(ServerOutput::Tun(packet)) => {
                let n = packet.len();
                tun.commit(n);
            }
            Ok(ServerOutput::Send(path, reply)) => senders.send(path, reply),
            Ok(ServerOutput::Nothing) | Err(_) => {}
        }
    }
    if msgs.malformed() {
        senders.http.malformed += 1;
    }
    Ok(())
}
