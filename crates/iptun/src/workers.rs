//! Worker threads: each runs a job until the [`Workers`] are dropped,
//! which stops and joins them all. A job is either a loop with a runtime
//! of its own, or a lean loop that waits in `poll(2)` itself ([`wait`]):
//! after an idle spell, its first syscall for a packet comes about 20 µs
//! sooner than a runtime's (whose driver, timers and task machinery are
//! cold by then).

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;
use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The workers besides the main loop, running until dropped.
pub struct Workers {
    stop: Arc<Stop>,
    threads: Vec<JoinHandle<()>>,
}

/// Tells the workers to stop: a runtime's loop waits on its token, a lean
/// loop on its event (readable once set, for good).
pub struct Stop {
    token: CancellationToken,
    event: OwnedFd,
}

impl Stop {
    fn new() -> anyhow::Result<Self> {
        let event = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .context("creating the workers' stop event")?;
        Ok(Self {
            token: CancellationToken::new(),
            event,
        })
    }

    fn set(&self) {
        self.token.cancel();
        // Cannot fail but for a counter at its maximum, which is set too.
        let _ = rustix::io::write(&self.event, &1u64.to_ne_bytes());
    }

    /// Resolves once the workers are to stop.
    pub async fn cancelled(&self) {
        self.token.cancelled().await;
    }
}

/// Reports of workers that stopped on an error (or panicked), and why.
pub struct Failures(mpsc::UnboundedReceiver<anyhow::Error>);

impl Failures {
    /// The next worker to fail (never, with no workers).
    pub async fn next(&mut self) -> anyhow::Error {
        match self.0.recv().await {
            Some(e) => e,
            None => std::future::pending().await, // no workers
        }
    }
}

/// Block until one of `fds` is ready for what it asks, the workers are to
/// stop, or `timeout` passed: returns whether they are to stop (the
/// `revents` of `fds` tell the rest).
pub fn wait<'a>(
    stop: &'a Stop,
    fds: &mut Vec<PollFd<'a>>,
    timeout: Option<Duration>,
) -> std::io::Result<bool> {
    // A timeout too long for a timespec waits for good.
    let timeout = timeout.and_then(|t| Timespec::try_from(t).ok());
    fds.push(PollFd::new(&stop.event, PollFlags::IN));
    let polled = loop {
        match rustix::event::poll(fds, timeout.as_ref()) {
            Err(rustix::io::Errno::INTR) => continue,
            r => break r,
        }
    };
    let stopped = fds.pop().is_some_and(|e| !e.revents().is_empty());
    polled?;
    Ok(stopped)
}

/// What a worker runs: until the token is cancelled, or an error.
pub type Job = Box<dyn FnOnce(&Stop) -> anyhow::Result<()> + Send>;

/// What one worker runs: worker `n` (from 1) of what all share, with its
/// assignment and its end of the queue to the main loop.
pub type Run<S, A, T> = fn(&Arc<S>, usize, A, mpsc::Sender<T>, &Stop) -> anyhow::Result<()>;

/// One job per assignment, each running `run`, and the main loop's end of
/// the bounded queue (`capacity`) they all send to.
pub fn jobs<S, A, T>(
    shared: &Arc<S>,
    assignments: Vec<A>,
    capacity: usize,
    run: Run<S, A, T>,
) -> (Vec<Job>, mpsc::Receiver<T>)
where
    S: Send + Sync + 'static,
    A: Send + 'static,
    T: Send + 'static,
{
    let (to_main, from_workers) = mpsc::channel(capacity);
    let jobs = (1..)
        .zip(assignments)
        .map(|(n, a)| {
            let (shared, to_main) = (shared.clone(), to_main.clone());
            Box::new(move |stop: &Stop| run(&shared, n, a, to_main, stop)) as Job
        })
        .collect();
    (jobs, from_workers)
}

impl Workers {
    /// Start one thread per job, named "iptun worker N" (numbered from 1:
    /// the main loop is 0), and the reports of those that fail.
    pub fn spawn(jobs: Vec<Job>) -> anyhow::Result<(Self, Failures)> {
        let stop = Arc::new(Stop::new()?);
        let (report, failed) = mpsc::unbounded_channel();
        let mut threads = Vec::new();
        for (n, job) in (1..).zip(jobs) {
            let (stop, report) = (stop.clone(), report.clone());
            let thread = std::thread::Builder::new()
                .name(format!("iptun worker {n}"))
                .spawn(move || {
                    // A panic in the worker is reported like an error.
                    let outcome =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&stop)))
                            .unwrap_or_else(|_| Err(anyhow::anyhow!("panicked")));
                    if let Err(e) = outcome {
                        let _ = report.send(e.context(format!("worker {n}")));
                    }
                })
                .context("starting a worker thread")?;
            threads.push(thread);
        }
        Ok((Self { stop, threads }, Failures(failed)))
    }
}

impl Drop for Workers {
    /// Stop every worker and wait for it: its TUN queue and sockets close
    /// before the daemon undoes its network settings.
    fn drop(&mut self) {
        self.stop.set();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Run `f` on a new single-threaded runtime of this thread.
pub fn block_on<F: Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(f)
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc as std_mpsc;
    use std::time::Instant;

    use super::*;

    /// A lean job: waits on `socket` until told to stop, counting the
    /// datagrams it reads.
    fn lean_job(socket: std::net::UdpSocket, read: std_mpsc::Sender<usize>) -> Job {
        Box::new(move |stop: &Stop| {
            socket.set_nonblocking(true)?;
            let mut buf = [0; 64];
            loop {
                let mut fds = vec![PollFd::new(&socket, PollFlags::IN)];
                if wait(stop, &mut fds, None)? {
                    return Ok(());
                }
                while let Ok(n) = socket.recv(&mut buf) {
                    let _ = read.send(n);
                }
            }
        })
    }

    #[test]
    fn a_lean_worker_wakes_for_its_descriptor_and_stops_when_dropped() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = socket.local_addr().unwrap();
        let (tx, read) = std_mpsc::channel();
        let (workers, _failures) = Workers::spawn(vec![lean_job(socket, tx)]).unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.send_to(b"hello", to).unwrap();
        let second = Duration::from_secs(5);
        assert_eq!(read.recv_timeout(second), Ok(5), "woken by the datagram");
        // Dropping the workers sets the stop event: the blocked poll
        // returns and the thread is joined (a hang here fails the test
        // by its watchdog below).
        let (done, dropped) = std_mpsc::channel();
        std::thread::spawn(move || {
            drop(workers);
            let _ = done.send(());
        });
        assert_eq!(dropped.recv_timeout(second), Ok(()), "worker joined");
    }

    #[test]
    fn wait_returns_after_its_timeout_with_nothing_ready() {
        let stop = Stop::new().unwrap();
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut fds = vec![PollFd::new(&socket, PollFlags::IN)];
        let start = Instant::now();
        let stopped = wait(&stop, &mut fds, Some(Duration::from_millis(20))).unwrap();
        assert!(!stopped && fds[0].revents().is_empty());
        assert!(start.elapsed() >= Duration::from_millis(20));
        stop.set();
        assert!(
            wait(&stop, &mut fds, None).unwrap(),
            "the stop event is set for good"
        );
        assert!(wait(&stop, &mut fds, None).unwrap());
    }
}
