//! `iptun probe`: what gets through from here? For each `--server` URL, one
//! after another, a session of its own (no TUN device, no routes): whether
//! the handshake completes and how long it takes, the round-trip time of
//! small probes, and a short throughput figure each way from padded probes
//! (the server answers each probe on the path it came by; see
//! `iptun_proto::wire::control`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use iptun_proto::connection::{Connection, Event};
use serde::Serialize;

use crate::cli::ProbeArgs;
use crate::client::{self, Core, OpenPaths, PathDriver};
use crate::daemon;
use crate::tun::Discard;
use crate::url::ServerUrl;

/// How long a handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// Probes for the round-trip time.
const RTT_PROBES: usize = 5;
/// Bytes of a padded probe, and of a padded reply: what fits a 1280-byte
/// path with room for every transport's headers.
const BULK: u16 = 1100;
/// Bulk probes in flight.
const WINDOW: usize = 64;
/// A probe unanswered this long is taken as lost.
const PROBE_LOST: Duration = Duration::from_secs(3);

/// What one URL gave.
#[derive(Debug, Default, Serialize)]
struct Report {
    url: String,
    transport: &'static str,
    ok: bool,
    error: Option<String>,
    handshake_ms: Option<f64>,
    rtt_ms: Option<f64>,
    up_mbit_s: Option<f64>,
    down_mbit_s: Option<f64>,
}

/// Run `iptun probe`; fails (exit 1) when nothing works.
pub async fn run(args: ProbeArgs) -> anyhow::Result<()> {
    let (json, seconds) = (args.json, args.seconds);
    anyhow::ensure!(
        (1..=60).contains(&seconds),
        "--seconds {seconds}: between 1 and 60"
    );
    let c = &args.client;
    anyhow::ensure!(
        c.route.is_empty() && c.tun.is_none() && c.control.is_none() && c.pcap.is_none(),
        "--route, --tun, --control and --pcap do not apply to probe (it makes no TUN device)"
    );
    let s = client::settings(args.client)?;
    let mut reports = Vec::new();
    for url in &s.servers {
        let mut one = s.clone();
        one.servers = vec![url.clone()];
        let mut report = Report {
            url: url.to_string(),
            transport: client::transport_name(url),
            ..Report::default()
        };
        if !json {
            eprintln!("probing {url} ...");
        }
        if let Err(e) = probe(&one, Duration::from_secs(seconds), &mut report).await {
            report.error = Some(format!("{e:#}"));
        }
        reports.push(report);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        print!("{}", table(&reports));
    }
    anyhow::ensure!(
        reports.iter().any(|r| r.ok),
        "no transport reaches the server from here"
    );
    Ok(())
}

fn table(reports: &[Report]) -> String {
    use std::fmt::Write as _;
    let width = reports
        .iter()
        .map(|r| r.url.len())
        .max()
        .unwrap_or(3)
        .max(3);
    let mut out = format!(
        "{:<width$}  {:>10}  {:>9}  {:>13}  {:>13}\n",
        "URL", "handshake", "RTT", "up", "down"
    );
    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1} ms"));
    let mbit = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2} Mbit/s"));
    for r in reports {
        let _ = match &r.error {
            Some(e) => writeln!(out, "{:<width$}  failed: {e}", r.url),
            None => writeln!(
                out,
                "{:<width$}  {:>10}  {:>9}  {:>13}  {:>13}",
                r.url,
                ms(r.handshake_ms),
                ms(r.rtt_ms),
                mbit(r.up_mbit_s),
                mbit(r.down_mbit_s),
            ),
        };
    }
    out
}

/// One URL's session.
struct Session {
    core: Arc<Core>,
    drivers: Vec<PathDriver>,
    sink: Discard,
    buf: Vec<u8>,
    url: ServerUrl,
    /// Probe replies: bytes the server got, bytes of the reply, RTT.
    replies: Vec<(u16, usize, Duration)>,
}

async fn probe(s: &client::Settings, seconds: Duration, report: &mut Report) -> anyhow::Result<()> {
    let OpenPaths {
        mut urls,
        drivers,
        configs,
    } = client::open_paths(s)?;
    let start = Instant::now();
    let conn = Connection::new(s.config.clone(), configs, start, daemon::unix_nanos());
    let mut session = Session {
        core: Core::new(conn, 1),
        drivers,
        sink: Discard::default(),
        buf: Vec::new(),
        url: urls.remove(0),
        replies: Vec::new(),
    };
    let up = session
        .run_until(HANDSHAKE_TIMEOUT, |s| {
            s.core.lock().is_connected(Instant::now())
        })
        .await?;
    anyhow::ensure!(up, "no handshake within {} s", HANDSHAKE_TIMEOUT.as_secs());
    report.handshake_ms = Some(start.elapsed().as_secs_f64() * 1000.0);
    report.ok = true;

    let mut rtts = Vec::new();
    for _ in 0..RTT_PROBES {
        session.replies.clear();
        session.measure(16, 16);
        if session
            .run_until(PROBE_LOST, |s| !s.replies.is_empty())
            .await?
        {
            rtts.push(session.replies[0].2);
        }
    }
    rtts.sort();
    report.rtt_ms = rtts.get(rtts.len() / 2).map(|d| d.as_secs_f64() * 1000.0);
    report.up_mbit_s = Some(session.bulk(seconds, BULK, 16).await?);
    report.down_mbit_s = Some(session.bulk(seconds, 16, BULK).await?);
    Ok(())
}

impl Session {
    fn measure(&mut self, len: u16, reply_len: u16) -> bool {
        let mut conn = self.core.lock();
        let path = conn.current_path();
        conn.measure(Instant::now(), path, usize::from(len), reply_len)
    }

    /// Keep `WINDOW` probes of `len` bytes asking for `reply_len` in flight
    /// for `time`; Mbit/s of what arrived (the server's count upstream, the
    /// replies' size downstream).
    async fn bulk(&mut self, time: Duration, len: u16, reply_len: u16) -> anyhow::Result<f64> {
        self.replies.clear();
        let start = Instant::now();
        let mut in_flight: VecDeque<Instant> = VecDeque::new();
        let mut seen = 0;
        while start.elapsed() < time {
            let now = Instant::now();
            for _ in seen..self.replies.len() {
                in_flight.pop_front();
            }
            seen = self.replies.len();
            while in_flight.front().is_some_and(|&t| now - t >= PROBE_LOST) {
                in_flight.pop_front();
            }
            while in_flight.len() < WINDOW && self.measure(len, reply_len) {
                in_flight.push_back(now);
            }
            // Back as soon as half the window is answered, to fill it again.
            let step = Duration::from_millis(50).min(time.saturating_sub(start.elapsed()));
            let refill = seen + in_flight.len() / 2 + 1;
            self.run_until(step, |s| s.replies.len() >= refill).await?;
        }
        let took = start.elapsed().as_secs_f64();
        let bytes: usize = if len > reply_len {
            self.replies.iter().map(|r| usize::from(r.0)).sum()
        } else {
            self.replies.iter().map(|r| r.1).sum()
        };
        Ok(bytes as f64 * 8.0 / took / 1e6)
    }

    /// Drive the session until `done` or `limit` passes; whether `done`.
    async fn run_until(
        &mut self,
        limit: Duration,
        done: impl Fn(&Self) -> bool,
    ) -> anyhow::Result<bool> {
        let end = tokio::time::Instant::now() + limit;
        loop {
            client::transmit(&self.core, &mut self.drivers, &mut self.buf);
            loop {
                let Some(e) = self.core.lock().poll_event() else {
                    break;
                };
                match e {
                    Event::Measured {
                        sent,
                        received,
                        rtt,
                        ..
                    } => self.replies.push((sent, received, rtt)),
                    Event::Http { path, command } => self.drivers[path].command(command),
                    Event::Failed { why, .. } => tracing::debug!("{}: {why}", self.url),
                    Event::Configured(_) | Event::Moved { .. } => {}
                }
            }
            if done(self) {
                return Ok(true);
            }
            let deadline = self
                .core
                .lock()
                .poll_timeout()
                .map_or(end, |t| tokio::time::Instant::from_std(t).min(end));
            let ready = std::future::poll_fn(|cx| {
                for (i, d) in self.drivers.iter_mut().enumerate() {
                    if let std::task::Poll::Ready(r) = d.poll_readable(cx) {
                        return std::task::Poll::Ready((i, r));
                    }
                }
                std::task::Poll::Pending
            });
            tokio::select! {
                (i, r) = ready => {
                    r.with_context(|| format!("waiting on {}", self.url))?;
                    self.drivers[i].receive(&self.core, i, &mut self.sink).await?;
                }
                () = tokio::time::sleep_until(deadline) => {
                    if tokio::time::Instant::now() >= end {
                        return Ok(done(self));
                    }
                    self.core.lock().handle_timeout(Instant::now());
                }
            }
        }
    }
}
