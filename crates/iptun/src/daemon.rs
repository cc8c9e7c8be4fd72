//! What the server and client loops share: signals, reading key files,
//! and rate-limited reporting of drops.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use iptun_proto::DropCounters;
use iptun_proto::crypto::{PrivateKey, PublicKey};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::service::Request;
use crate::workers::Failures;

/// Why a daemon's loop ends: SIGTERM or SIGINT (`Ok`), or a worker's
/// error. The rare inputs live in tasks of their own (this one, the
/// control socket's, the drop reports'), so that the loop's wait, which
/// every packet goes through, polls only the inputs that carry traffic
/// (measured: about 10 µs less on an idle client's first hop).
pub type Stop = tokio::sync::oneshot::Receiver<anyhow::Result<()>>;

/// Watch for the end of the daemon: the signal handlers are in place when
/// this returns (a signal from then on stops the daemon cleanly).
pub fn watch_stop(mut failures: Failures) -> anyhow::Result<Stop> {
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let (tx, stop) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let why = tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM: shutting down");
                Ok(())
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: shutting down");
                Ok(())
            }
            e = failures.next() => Err(e),
        };
        let _ = tx.send(why);
    });
    Ok(stop)
}

/// On each SIGHUP, ask the loop to re-read the admitted keys, as
/// `iptun reload` does (`systemctl reload`).
pub fn reload_on_hangup(requests: mpsc::Sender<Request>) -> anyhow::Result<()> {
    let mut hangup = signal(SignalKind::hangup()).context("installing a SIGHUP handler")?;
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            let (reply, _) = tokio::sync::oneshot::channel();
            if requests.send(Request::Reload(reply)).await.is_err() {
                break;
            }
        }
    });
    Ok(())
}

/// Log new drops every [`REPORT_EVERY`] (see [`DropReporter`]), from a
/// task of its own: `drops` reads the totals.
pub fn report_drops(drops: impl Fn() -> DropCounters + Send + 'static) {
    tokio::spawn(async move {
        let mut reporter = DropReporter::new();
        let mut every = tokio::time::interval(REPORT_EVERY);
        loop {
            every.tick().await;
            reporter.tick(Instant::now(), drops());
        }
    });
}

/// Read a private key file.
pub fn read_private_key(path: Option<&Path>) -> anyhow::Result<PrivateKey> {
    let path =
        path.context("--private-key FILE is required (create one with `iptun genkey > FILE`)")?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading private key {}", path.display()))?;
    PrivateKey::from_base64(&text).with_context(|| format!("private key {}", path.display()))
}

/// Parse a public key given on the command line or in a file.
pub fn parse_public_key(text: &str, what: &str) -> anyhow::Result<PublicKey> {
    PublicKey::from_base64(text).with_context(|| format!("{what} `{}`", text.trim()))
}

/// Batches one wakeup handles before the event loop looks at its other
/// sources again: without a bound, a socket that never runs dry (a flood of
/// garbage datagrams) starves the TUN device, the timers and the control
/// socket. A source that did not run dry returns `false`, and the loop then
/// yields to the runtime (which polls the I/O driver and timers); its
/// readiness stays set, so it is served again at once.
pub const MAX_BATCHES_PER_WAKEUP: usize = 64;

/// Logs a summary of new drops at most every few seconds, never per packet.
pub struct DropReporter {
    seen: u64,
    last_report: Option<Instant>,
}

const REPORT_EVERY: Duration = Duration::from_secs(10);

impl DropReporter {
    pub fn new() -> Self {
        Self {
            seen: 0,
            last_report: None,
        }
    }

    /// Call periodically with the current totals.
    pub fn tick(&mut self, now: Instant, drops: DropCounters) {
        let total = drops.total();
        if total == self.seen
            || self
                .last_report
                .is_some_and(|t| now.duration_since(t) < REPORT_EVERY)
        {
            return;
        }
        let reasons: Vec<String> = drops.nonzero().map(|(r, n)| format!("{r} {n}")).collect();
        tracing::warn!(
            "dropped {} packets since the last report (totals: {})",
            total - self.seen,
            reasons.join(", ")
        );
        self.seen = total;
        self.last_report = Some(now);
    }
}

/// Nanoseconds since the Unix epoch (handshake timestamps).
pub fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
