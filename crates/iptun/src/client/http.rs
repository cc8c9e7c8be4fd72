//! The client loop's side of the HTTP transports: messages are framed into
//! batches ([`Batch`]) for the connection task
//! ([`http_client`](crate::transport::http_client)), and what it brings
//! back is unframed into the engine.

use std::net::{SocketAddr, ToSocketAddrs as _};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use anyhow::Context as _;
use bytes::Bytes;
use iptun_proto::engine::{Client, ClientOutput};
use iptun_proto::http::{BATCH_TARGET, Batch, messages};
use tokio::sync::mpsc;

use crate::daemon::MAX_BATCHES_PER_WAKEUP;
use crate::transport::http_client::{self, Down, Info, Mode};
use crate::transport::tls::{self, Trust};
use crate::tun::Tun;
use crate::url::HttpUrl;

/// Batches queued for the connection task; beyond, new ones are dropped
/// (a short outer queue keeps the inner TCP's delay short).
const UP_QUEUE: usize = 32;

/// The client's HTTP settings besides the URL.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    pub trust: Trust,
    /// `--proxy` as given (`None`: from the environment).
    pub proxy: Option<String>,
    pub mode: Mode,
}

pub(super) struct HttpPath {
    url: HttpUrl,
    first_hop: SocketAddr,
    up: mpsc::Sender<Bytes>,
    down: mpsc::Receiver<Down>,
    /// What `poll_readable` took off the channel, for `receive`.
    pending: Option<Down>,
    batch: Batch,
    info: Arc<Mutex<Info>>,
    /// Batches dropped because the connection could not take them.
    dropped: u64,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HttpPath {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpPath {
    pub(super) fn open(url: HttpUrl, options: &HttpOptions) -> anyhow::Result<Self> {
        let proxy =
            http_client::proxy_for(&url, options.proxy.as_deref(), |k| std::env::var(k).ok())?;
        let (host, port) = match &proxy {
            Some(p) => {
                let (h, port) = p.authority.rsplit_once(':').expect("authority has a port");
                (h.trim_matches(['[', ']']).to_owned(), port.parse()?)
            }
            None => (url.host.clone(), url.port),
        };
        let first_hop = (host.as_str(), port)
            .to_socket_addrs()
            .with_context(|| format!("resolving {host}"))?
            .next()
            .with_context(|| format!("{host} has no address"))?;
        let tls = if url.tls {
            Some(tls::client(&options.trust)?)
        } else {
            None
        };
        let mut tag = [0u8; 8];
        getrandom::fill(&mut tag).map_err(|e| anyhow::anyhow!("getrandom: {e}"))?;
        let info = Arc::new(Mutex::new(Info {
            mode: "connecting",
            proxy: proxy.as_ref().map(|p| p.authority.clone()),
            ..Info::default()
        }));
        let config = http_client::Config {
            url: url.clone(),
            connect_to: first_hop,
            proxy,
            tls,
            mode: options.mode,
            tag: u64::from_le_bytes(tag),
        };
        let (up, up_rx) = mpsc::channel(UP_QUEUE);
        let (down_tx, down) = mpsc::channel(UP_QUEUE);
        let task = tokio::spawn(http_client::run(config, up_rx, down_tx, info.clone()));
        Ok(Self {
            url,
            first_hop,
            up,
            down,
            pending: None,
            batch: Batch::new(),
            info,
            dropped: 0,
            task,
        })
    }

    /// The first hop's address (the proxy's, or the server's).
    pub(super) fn first_hop(&self) -> SocketAddr {
        self.first_hop
    }

    pub(super) fn scheme(&self) -> &'static str {
        if self.url.tls { "https" } else { "http" }
    }

    pub(super) fn url(&self) -> &HttpUrl {
        &self.url
    }

    pub(super) fn send_with(&mut self, fill: impl FnOnce(&mut [u8]) -> Option<usize>) {
        self.batch.push_with(fill);
        if self.batch.len() >= BATCH_TARGET {
            self.flush();
        }
    }

    pub(super) fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        if self.up.try_send(Bytes::from(self.batch.take())).is_err() {
            self.dropped += 1;
        }
    }

    pub(super) fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.pending.is_none() {
            match self.down.poll_recv(cx) {
                Poll::Ready(Some(d)) => self.pending = Some(d),
                Poll::Ready(None) => {
                    return Poll::Ready(Err(std::io::Error::other("the HTTP task ended")));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Handle what the connection task brought (up to a bound).
    pub(super) async fn receive(
        &mut self,
        engine: &mut Client,
        tun: &mut Tun,
    ) -> anyhow::Result<bool> {
        let mut dry = false;
        for _ in 0..MAX_BATCHES_PER_WAKEUP {
            let Some(down) = self.pending.take().or_else(|| self.down.try_recv().ok()) else {
                dry = true;
                break;
            };
            let now = Instant::now();
            match down {
                Down::Data(body) => self.deliver(engine, tun, &body, now).await?,
                // Tell the server at once which connection is ours now.
                Down::Connected if engine.is_connected(now) => {
                    self.send_with(|out| engine.seal_keepalive(now, out).ok());
                }
                Down::Connected => {}
            }
        }
        tun.flush().await.context("writing to the TUN device")?;
        self.flush();
        Ok(dry)
    }

    async fn deliver(
        &mut self,
        engine: &mut Client,
        tun: &mut Tun,
        body: &[u8],
        now: Instant,
    ) -> anyhow::Result<()> {
        for msg in messages(body) {
            if tun.stage_buffer(msg.len()).is_none() {
                tun.flush().await.context("writing to the TUN device")?;
            }
            let Some(buf) = tun.stage_buffer(msg.len()) else {
                continue;
            };
            match engine.handle_datagram(now, msg, buf) {
                Ok(ClientOutput::Tun(packet)) => {
                    let n = packet.len();
                    tun.commit(n);
                }
                Ok(ClientOutput::Send(reply)) => self.batch.push(reply),
                Ok(ClientOutput::Nothing) | Err(_) => {}
            }
        }
        Ok(())
    }

    pub(super) fn path_info(&self) -> serde_json::Value {
        let info = self.info.lock().expect("not poisoned").clone();
        let mut v = serde_json::to_value(info).unwrap_or_default();
        v["dropped_batches"] = self.dropped.into();
        v
    }
}
