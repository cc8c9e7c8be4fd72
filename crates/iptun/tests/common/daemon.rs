//! A running `iptun server` or `iptun client`, as the end-to-end tests drive
//! it: through its own control socket and `iptun status --json`.

use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::{Netns, Proc, RemoveOnDrop, control_path, iptun_bin, wait_until};

/// How long a daemon may take to answer on its control socket after start,
/// and to exit after a signal.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `iptun server` or `iptun client` with its own control socket
/// (`/run/iptun` is shared by all namespaces, so tests in parallel need
/// their own). Dropping it kills the process (printing its log if the test
/// is failing), then removes the socket.
pub struct Daemon {
    // Fields drop in order: the process dies before its socket is removed.
    process: Proc,
    control: RemoveOnDrop,
}

impl Daemon {
    /// `iptun ARGS --control SOCKET` in `ns`, the socket named after the
    /// test's `tag` and the daemon's `role`.
    pub fn spawn(ns: &Netns, tag: &str, role: &str, args: &[&str]) -> Self {
        Self::spawn_wrapped(ns, tag, role, &[], args)
    }

    /// Like [`Daemon::spawn`], run under `wrapper` (e.g. `env -u VAR ...`,
    /// to control the proxy variables the daemon sees).
    pub fn spawn_wrapped(
        ns: &Netns,
        tag: &str,
        role: &str,
        wrapper: &[String],
        args: &[&str],
    ) -> Self {
        let control = control_path(tag, role);
        let control_arg = control.to_str().expect("utf-8 path");
        let mut all: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        all.push(iptun_bin());
        all.extend_from_slice(args);
        all.extend_from_slice(&["--control", control_arg]);
        Self {
            process: ns.spawn(&all),
            control: RemoveOnDrop(control),
        }
    }

    /// The control socket (the daemon removes it when it exits cleanly).
    pub fn control(&self) -> &Path {
        &self.control.0
    }

    /// Everything the daemon has logged so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Panics with the log if the daemon has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.process.try_wait() {
            panic!(
                "iptun exited unexpectedly with {status}; log:\n{}",
                self.process.log()
            );
        }
    }

    /// The daemon's entry of `iptun status --json` (bounded to 5 s), if it
    /// answers; panics on bad JSON or more than one daemon on the socket.
    pub fn status(&self) -> Option<Value> {
        let out = Command::new("timeout")
            .arg("5")
            .arg(iptun_bin())
            .args(["status", "--json", "--control"])
            .arg(self.control())
            .stdin(Stdio::null())
            .output()
            .expect("run iptun status");
        if !out.status.success() {
            return None;
        }
        let all: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "iptun status printed bad JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        let all = all.as_array().expect("status is a JSON array");
        assert_eq!(all.len(), 1, "one daemon per control socket: {all:?}");
        Some(all[0].clone())
    }

    /// The status of a daemon that must be running and answering.
    pub fn status_ok(&mut self) -> Value {
        self.assert_running();
        self.status()
            .unwrap_or_else(|| panic!("no status; log:\n{}", self.process.log()))
    }

    /// Waits until the daemon answers on its control socket (its event
    /// loop runs: TUN device, NAT and sockets are set up); returns that
    /// first status.
    pub fn wait_up(&mut self) -> Value {
        self.wait_for(DAEMON_TIMEOUT, "the daemon to answer", Self::status)
    }

    /// Polls `get` until it gives a value, within `timeout`; panics (with
    /// the log) if the daemon exits meanwhile, so a crash fails at once
    /// rather than as a timeout.
    pub fn wait_for<T>(
        &mut self,
        timeout: Duration,
        what: &str,
        mut get: impl FnMut(&Self) -> Option<T>,
    ) -> T {
        let mut value = None;
        wait_until(timeout, what, || {
            self.assert_running();
            value = get(self);
            value.is_some()
        });
        value.expect("checked")
    }

    /// The client's first tunnel address, if it has one.
    pub fn tunnel_address(&self) -> Option<String> {
        self.status().and_then(|s| {
            s["addresses"]
                .as_array()?
                .first()?
                .as_str()
                .map(str::to_string)
        })
    }

    /// Waits (up to `timeout`: each transport's handshake takes its own
    /// time) until a client has its tunnel configuration (addresses and
    /// routes: both are set before the status shows the addresses);
    /// returns its first tunnel address.
    pub fn wait_tunnel_address(&mut self, timeout: Duration) -> String {
        self.wait_for(timeout, "the client's tunnel address", Self::tunnel_address)
    }

    /// The client's session (transport, endpoint, path...).
    pub fn session(&mut self) -> Value {
        let st = self.status_ok();
        let session = st["sessions"][0].clone();
        assert!(session.is_object(), "no session: {st:#}");
        session
    }

    /// Sends a signal by name (`HUP`, ...) and returns at once.
    pub fn signal(&self, sig: &str) {
        self.process.signal(sig);
    }

    /// SIGTERM, then waits; panics (with the log) unless it exits cleanly.
    pub fn stop(&mut self) -> ExitStatus {
        self.stop_with("TERM")
    }

    /// SIGTERM or SIGINT, then waits; panics (with the log) unless the
    /// daemon exits cleanly.
    pub fn stop_with(&mut self, signal: &str) -> ExitStatus {
        self.process.signal(signal);
        let status = self
            .process
            .wait_timeout(DAEMON_TIMEOUT)
            .unwrap_or_else(|| panic!("no exit within {DAEMON_TIMEOUT:?} of SIG{signal}"));
        assert!(
            status.success(),
            "exit after SIG{signal}: {status}; log:\n{}",
            self.process.log()
        );
        status
    }
}
