//! Worker threads: each runs a job (a loop with a runtime of its own) until
//! the [`Workers`] are dropped, which stops and joins them all.

use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Context as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The workers besides the main loop, running until dropped.
pub struct Workers {
    stop: CancellationToken,
    threads: Vec<JoinHandle<()>>,
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

/// What a worker runs: until the token is cancelled, or an error.
pub type Job = Box<dyn FnOnce(&CancellationToken) -> anyhow::Result<()> + Send>;

/// What one worker runs: worker `n` (from 1) of what all share, with its
/// assignment and its end of the queue to the main loop.
pub type Run<S, A, T> =
    fn(&Arc<S>, usize, A, mpsc::Sender<T>, &CancellationToken) -> anyhow::Result<()>;

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
            Box::new(move |stop: &CancellationToken| run(&shared, n, a, to_main, stop)) as Job
        })
        .collect();
    (jobs, from_workers)
}

impl Workers {
    /// Start one thread per job, named "iptun worker N" (numbered from 1:
    /// the main loop is 0), and the reports of those that fail.
    pub fn spawn(jobs: Vec<Job>) -> anyhow::Result<(Self, Failures)> {
        let stop = CancellationToken::new();
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
        self.stop.cancel();
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
