//! The server loop's side of the HTTP listeners: the connection tasks
//! ([`http_server`]) send [`Event`]s here; what the endpoint answers goes
//! back batched per WebSocket, or as the body of a held long-poll response.
//! The long-poll discipline itself (mailboxes, holds) is the endpoint's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use iptun_proto::endpoint::{Input, ListenerId};
use iptun_proto::transport::http::BATCH_TARGET;
use tokio::sync::{mpsc, oneshot};

use super::worker::Core;
use crate::transport::http_server::{self, Event, Listener};
use crate::tun::Tun;

/// One WebSocket's way back: its task's queue and the batch being built.
struct WsDown {
    tx: mpsc::Sender<Bytes>,
    batch: Vec<u8>,
}

/// The HTTP listeners' connections.
pub struct HttpConnections {
    events: mpsc::Receiver<(usize, Event)>,
    events_tx: mpsc::Sender<(usize, Event)>,
    listeners: usize,
    ws: HashMap<u64, WsDown>,
    /// WebSockets with a batch waiting for [`HttpConnections::flush`].
    dirty: Vec<u64>,
    /// Long-poll responses owed, by the endpoint's request handle.
    polls: HashMap<u64, oneshot::Sender<Vec<u8>>>,
    next_request: u64,
    /// Downstream batches dropped because a WebSocket's queue was full.
    pub queue_full: u64,
}

impl HttpConnections {
    pub fn new() -> Self {
        let (events_tx, events) = mpsc::channel(256);
        Self {
            events,
            events_tx,
            listeners: 0,
            ws: HashMap::new(),
            dirty: Vec::new(),
            polls: HashMap::new(),
            next_request: 0,
            queue_full: 0,
        }
    }

    /// Listen on `addr` for `path` as the endpoint's listener `index`;
    /// returns the bound address.
    pub async fn add(
        &mut self,
        index: ListenerId,
        addr: SocketAddr,
        path: &str,
        tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    ) -> anyhow::Result<SocketAddr> {
        let listener = Listener {
            index,
            path: path.to_owned(),
            tls,
        };
        let local = http_server::spawn(addr, listener, self.events_tx.clone()).await?;
        self.listeners += 1;
        Ok(local)
    }

    /// The next event, once one is there.
    pub async fn next_event(&mut self) -> Option<(usize, Event)> {
        if self.listeners == 0 {
            return std::future::pending().await;
        }
        self.events.recv().await
    }

    /// Hand `first` and whatever other events wait (up to a bound) to the endpoint.
    pub async fn receive(
        &mut self,
        core: &Core,
        tun: &mut Tun,
        first: (usize, Event),
    ) -> std::io::Result<()> {
        let mut next = Some(first);
        for _ in 0..crate::daemon::MAX_BATCHES_PER_WAKEUP * 8 {
            let Some((listener, event)) = next.take() else {
                break;
            };
            let now = Instant::now();
            match event {
                Event::WsOpen { conn, tx } => {
                    let batch = Vec::new();
                    self.ws.insert(conn, WsDown { tx, batch });
                }
                Event::WsClosed { conn } => {
                    self.ws.remove(&conn);
                }
                Event::WsData { conn, body } => {
                    let input = Input::WebSocket { conn, body: &body };
                    core.lock().ep.handle_input(now, listener, input, tun);
                }
                Event::Poll {
                    tag,
                    auth,
                    body,
                    reply,
                } => {
                    let request = self.next_request;
                    self.next_request += 1;
                    self.polls.insert(request, reply);
                    let input = Input::Poll {
                        tag,
                        request,
                        body: &body,
                        auth,
                    };
                    core.lock().ep.handle_input(now, listener, input, tun);
                }
            }
            tun.flush().await?;
            next = self.events.try_recv().ok();
        }
        Ok(())
    }

    /// A framed message for WebSocket `conn`.
    pub fn send_ws(&mut self, conn: u64, framed: &[u8]) {
        let Some(ws) = self.ws.get_mut(&conn) else {
            return; // closed meanwhile
        };
        if ws.batch.is_empty() {
            self.dirty.push(conn);
        }
        ws.batch.extend_from_slice(framed);
        if ws.batch.len() >= BATCH_TARGET {
            Self::send_batch(ws, &mut self.queue_full);
        }
    }

    /// The body answering long-poll `request`.
    pub fn answer(&mut self, request: u64, body: Vec<u8>) {
        if let Some(reply) = self.polls.remove(&request) {
            let _ = reply.send(body); // the client may have gone
        }
    }

    fn send_batch(ws: &mut WsDown, queue_full: &mut u64) {
        if ws.batch.is_empty() {
            return;
        }
        let body = Bytes::copy_from_slice(&ws.batch);
        ws.batch.clear();
        if ws.tx.try_send(body).is_err() {
            *queue_full += 1; // the inner TCP sees loss and slows down
        }
    }

    /// Send the batches built since the last flush.
    pub fn flush(&mut self) {
        for conn in self.dirty.drain(..) {
            if let Some(ws) = self.ws.get_mut(&conn) {
                Self::send_batch(ws, &mut self.queue_full);
            }
        }
    }
}
