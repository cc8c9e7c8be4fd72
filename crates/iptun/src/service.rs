//! What a daemon does for the tools around it: the requests that the
//! control socket (`iptun status`, `iptun reload`) and the metrics endpoint
//! pass to the event loop, and the service manager's notifications
//! (systemd's `Type=notify`: ready, reloading, a status line).
//!
//! The loop owns the endpoint or connection; nothing else may touch it. So
//! the tasks serving those sockets send a [`Request`] over a channel and
//! await a snapshot, which the loop makes between two batches of packets,
//! as cheaply as a status: a slow reader or a scraper never stalls the
//! tunnel.

use prometheus_client::registry::Registry;
use sd_notify::NotifyState;
use tokio::sync::{mpsc, oneshot};

use crate::control::Status;

/// Requests waiting at most; a flood of them waits in the tasks, not in the loop.
const QUEUED_REQUESTS: usize = 16;

/// Something the event loop is asked for.
pub enum Request {
    /// A status snapshot (`iptun status`).
    Status(oneshot::Sender<Status>),
    /// Re-read the admitted keys (`iptun reload`): what changed, or why
    /// nothing did.
    Reload(oneshot::Sender<Result<String, String>>),
    /// A metrics snapshot (`GET /metrics`).
    Metrics(oneshot::Sender<Registry>),
}

/// The loop's end and the tasks' end of the request channel.
pub fn channel() -> (mpsc::Sender<Request>, mpsc::Receiver<Request>) {
    mpsc::channel(QUEUED_REQUESTS)
}

/// Ask the loop, and wait for its answer (`None` if the loop is gone).
pub async fn ask<T>(
    requests: &mpsc::Sender<Request>,
    make: impl FnOnce(oneshot::Sender<T>) -> Request,
) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    requests.send(make(tx)).await.ok()?;
    rx.await.ok()
}

/// Tell the service manager the daemon is ready (once up, and again after
/// a reload), with a status line. Without a service manager
/// (`NOTIFY_SOCKET` unset) this does nothing.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tell the service manager a reload started; [`ready`] ends it.
pub fn reloading() {
    // systemd wants the time with it (required by `Type=notify-reload`).
    let mut states = vec![NotifyState::Reloading];
    states.extend(NotifyState::monotonic_usec_now().ok());
    notify(&states);
}

/// Update the status line `systemctl status` shows.
pub fn status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("telling the service manager (NOTIFY_SOCKET): {e}");
    }
}
