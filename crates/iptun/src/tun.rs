//! The TUN device, read and written in batches.
//!
//! With offloads on (`IFF_VNET_HDR`), one read can return a TCP or UDP
//! "superpacket" of up to 64 KiB that tun-rs splits into MTU-sized packets
//! for us, and writes are coalesced back into superpackets (GRO) before they
//! reach the kernel. That turns one syscall per packet into one per batch,
//! which is most of the difference between a few hundred Mbit/s and
//! several Gbit/s.

use std::io;
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use anyhow::Context as _;
use tun_rs::{
    AsyncDevice, DeviceBuilder, ExpandBuffer, GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN,
};

use crate::capture::{Capture, Direction};

/// Room kept in front of every packet buffer: tun-rs needs the virtio
/// header in front of packets it writes, and we keep it 16-byte aligned.
pub const HEADROOM: usize = 16;
const _: () = assert!(HEADROOM >= VIRTIO_NET_HDR_LEN);

/// Largest packet a TUN read or write can carry.
const MAX_PACKET: usize = 65535;
/// Packets staged for one coalesced write, to begin with.
const WRITE_BATCH: usize = 256;
/// The most packets one write batch grows to (a long-poll body of a
/// megabyte holds more than `WRITE_BATCH` packets); beyond, packets are
/// dropped and counted by the caller.
const MAX_WRITE_BATCH: usize = 8192;
/// The most a write buffer grows to. tun-rs coalesces a TCP or UDP flow's
/// packets into the buffer of the flow's first packet, and only when that
/// buffer says it can hold the whole superpacket (its `InsufficientCap`
/// check: `2 * offset + coalesced length`). With less nothing coalesces
/// and every packet is its own write, and its own trip through the
/// kernel's TCP receive path.
const WRITE_BUFFER: usize = 2 * HEADROOM + MAX_PACKET;
/// What a write buffer holds of its own: a packet at the default MTU.
const PACKET_BUFFER: usize = 2 * HEADROOM + 1500;
/// Superpacket-sized buffers a thread keeps for coalescing, at most.
const LARGE_POOL: usize = 64;
/// Packets staged while the writer thread is busy before [`Tun::flush`]
/// waits for it (backpressure on the loop) instead of staging more.
const DEFER_LIMIT: usize = 2 * IDEAL_BATCH_SIZE;
/// A batch this small is written by the loop itself when the writer thread
/// is idle: a ping or a few ACKs should not wait for a thread to wake.
const INLINE_MAX: usize = 8;
/// The writer thread counts as idle once this long has passed since the
/// loop last handed it a batch: under load the thread keeps even small
/// writes off the loop (measured: writing them inline whenever the thread
/// was done cost an upload stream 5-8% in two runs of four).
const INLINE_AFTER: Duration = Duration::from_millis(1);

thread_local! {
    /// Superpacket-sized buffers, lent to the write buffers tun-rs
    /// coalesces into for the time of one write ([`PacketBuf::release`]).
    /// Any buffer of a batch may become a superpacket's head: were each
    /// one superpacket-sized, all of them would come to be filled once
    /// and stay in memory (tens of MiB per TUN queue). The heads of one
    /// write are few, and so are these.
    static LARGE: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One packet buffer of a write batch: `HEADROOM` bytes, then the packet.
/// Its bytes stay initialized between uses, so staging a packet does not
/// zero the buffer first (the packet is written over it at once).
#[derive(Default)]
struct PacketBuf {
    /// Initialized bytes (the most ever used).
    bytes: Vec<u8>,
    /// Bytes in use.
    len: usize,
    /// The buffer's own bytes while `bytes` is a large one from [`LARGE`].
    own: Option<Vec<u8>>,
}

impl PacketBuf {
    fn new() -> Self {
        Self {
            bytes: Vec::with_capacity(PACKET_BUFFER),
            len: 0,
            own: None,
        }
    }

    /// Use the first `len` bytes.
    fn set_len(&mut self, len: usize) {
        if self.bytes.len() < len {
            self.bytes.resize(len, 0);
        }
        self.len = len;
    }

    /// Coalescing is about to grow the packet to `len` bytes: beyond the
    /// buffer's own capacity, it continues in a large buffer of the pool.
    fn reserve_coalescing(&mut self, len: usize) {
        if len <= self.bytes.capacity() {
            return;
        }
        let mut large = LARGE
            .with(|pool| pool.borrow_mut().pop())
            .unwrap_or_else(|| Vec::with_capacity(WRITE_BUFFER));
        if large.len() < self.len {
            large.resize(self.len, 0);
        }
        large[..self.len].copy_from_slice(&self.bytes[..self.len]);
        let own = std::mem::replace(&mut self.bytes, large);
        self.own.get_or_insert(own);
    }

    /// After a write: a large buffer goes back to the pool (of the thread
    /// that wrote, the one whose coalescing took it).
    fn release(&mut self) {
        if let Some(own) = self.own.take() {
            let large = std::mem::replace(&mut self.bytes, own);
            self.len = 0;
            LARGE.with(|pool| {
                let mut pool = pool.borrow_mut();
                if pool.len() < LARGE_POOL {
                    pool.push(large);
                }
            });
        }
    }
}

impl AsRef<[u8]> for PacketBuf {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl AsMut<[u8]> for PacketBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[..self.len]
    }
}

impl ExpandBuffer for PacketBuf {
    /// What coalescing may grow the buffer to (see [`LARGE`]).
    fn buf_capacity(&self) -> usize {
        self.bytes.capacity().max(WRITE_BUFFER)
    }

    fn buf_resize(&mut self, new_len: usize, value: u8) {
        self.reserve_coalescing(new_len);
        let old = self.len;
        self.set_len(new_len);
        if new_len > old {
            self.bytes[old..new_len].fill(value);
        }
    }

    fn buf_extend_from_slice(&mut self, src: &[u8]) {
        let at = self.len;
        self.reserve_coalescing(at + src.len());
        self.set_len(at + src.len());
        self.bytes[at..at + src.len()].copy_from_slice(src);
    }
}

/// Packets staged for one write.
struct WriteBatch {
    bufs: Vec<PacketBuf>,
    staged: usize,
}

impl WriteBatch {
    fn new() -> Self {
        Self {
            bufs: (0..WRITE_BATCH).map(|_| PacketBuf::new()).collect(),
            staged: 0,
        }
    }
}

/// The thread that writes batches to the device: coalescing (tun-rs GRO)
/// and the write syscalls, in which the kernel runs its whole receive path
/// for the packets (TCP included), happen beside the event loop instead of
/// inside it. Two batches exist: the loop fills one while the thread
/// writes the other. Dropping it stops and joins the thread.
struct Writer {
    /// Full batches to the thread (it never holds more than the one batch
    /// there is besides the loop's, so sends never block).
    to_thread: Option<mpsc::SyncSender<WriteBatch>>,
    /// Written batches back, empty.
    written: tokio::sync::mpsc::Receiver<WriteBatch>,
    /// The batch is with the thread.
    busy: bool,
    /// The batch the thread wrote last, taken back (see [`Writer::reclaim`]).
    spare: Option<WriteBatch>,
    /// When the loop last handed the thread a batch.
    handed: Option<Instant>,
    /// The first error the thread met, for the loop to report.
    error: Arc<Mutex<Option<io::Error>>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// The thread is called `thread` (at most 15 bytes show).
    fn spawn(device: Arc<AsyncDevice>, thread: &str, done: Arc<Notify>) -> io::Result<Self> {
        let (to_thread, batches) = mpsc::sync_channel::<WriteBatch>(1);
        let (back, written) = tokio::sync::mpsc::channel(1);
        let error = Arc::new(Mutex::new(None));
        let thread_error = error.clone();
        let thread = std::thread::Builder::new()
            .name(thread.to_owned())
            .spawn(move || {
                let mut gro = GROTable::default();
                // The blocking write (a TUN write never waits for room).
                let sync: &tun_rs::DeviceImpl = &device;
                while let Ok(mut batch) = batches.recv() {
                    let staged = std::mem::take(&mut batch.staged);
                    let bufs = &mut batch.bufs[..staged];
                    let result = sync.send_multiple(&mut gro, bufs, HEADROOM);
                    bufs.iter_mut().for_each(PacketBuf::release);
                    match result {
                        Ok(_) => {}
                        // A packet the kernel refuses (e.g. a bad header) must not stop the tunnel.
                        Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                            tracing::debug!("TUN write rejected: {e}");
                        }
                        Err(e) => {
                            thread_error.lock().expect("not poisoned").get_or_insert(e);
                        }
                    }
                    if back.blocking_send(batch).is_err() {
                        break;
                    }
                    done.notify_one();
                }
            })?;
        Ok(Self {
            to_thread: Some(to_thread),
            written,
            busy: false,
            spare: None,
            handed: None,
            error,
            thread: Some(thread),
        })
    }

    /// Done with its batch, and not under load (see [`INLINE_AFTER`]).
    fn idle(&self, now: Instant) -> bool {
        !self.busy
            && self
                .handed
                .is_none_or(|t| now.duration_since(t) >= INLINE_AFTER)
    }

    /// Take back the batch the thread is done with, if it is, without
    /// waiting (a batch that is with the thread only in name must not keep
    /// small writes from going inline after a burst).
    fn reclaim(&mut self) -> io::Result<()> {
        if !self.busy {
            return Ok(());
        }
        match self.written.try_recv() {
            Ok(b) => self.took_back(b),
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => Ok(()),
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => Err(stopped()),
        }
    }

    /// An empty batch to fill next: a new one before the first hand-over,
    /// then the one the thread wrote last, at once if it is done, else
    /// (when `wait`) once it is; `None` while it is busy and not `wait`.
    async fn take_empty(&mut self, wait: bool) -> io::Result<Option<WriteBatch>> {
        if wait && self.busy {
            let b = self.written.recv().await.ok_or_else(stopped)?;
            self.took_back(b)?;
        }
        self.reclaim()?;
        if self.busy {
            return Ok(None);
        }
        Ok(Some(self.spare.take().unwrap_or_else(WriteBatch::new)))
    }

    /// The thread gave a batch back: keep it, and report what the thread met.
    fn took_back(&mut self, batch: WriteBatch) -> io::Result<()> {
        self.busy = false;
        self.spare = Some(batch);
        match self.error.lock().expect("not poisoned").take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Give the thread a full batch.
    fn send(&mut self, batch: WriteBatch) -> io::Result<()> {
        let tx = self.to_thread.as_ref().expect("set until dropped");
        tx.send(batch).map_err(|_| stopped())?;
        self.busy = true;
        self.handed = Some(Instant::now());
        Ok(())
    }
}

fn stopped() -> io::Error {
    io::Error::other("the TUN writer thread stopped")
}

impl Drop for Writer {
    fn drop(&mut self) {
        // The thread ends when its channel closes; joining it releases its
        // handle on the device, which then disappears.
        drop(self.to_thread.take());
        self.written.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A queue of a multi-queue device, to be served by another thread.
pub struct Queue {
    device: tun_rs::SyncDevice,
    name: String,
    /// 0 for the first queue.
    index: usize,
}

impl std::os::fd::AsRawFd for Queue {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.device.as_raw_fd()
    }
}

/// An open TUN device (one queue of it) with its batch buffers.
pub struct Tun {
    device: Arc<AsyncDevice>,
    name: String,
    /// Which queue of the device this is (0 for the first).
    queue: usize,
    reads: ReadBufs,
    /// Packets staged for writing (the second batch, if any, is with the
    /// writer thread).
    batch: WriteBatch,
    /// `None` until the first flush: a second batch and the thread cost
    /// nothing on a device never written.
    writer: Option<Writer>,
    /// Notified each time the writer thread is done with a batch.
    written: Arc<Notify>,
    /// Coalescing state of the writes the loop makes itself.
    gro: GROTable,
    /// `--pcap`: every packet read and written, if set.
    capture: Option<SharedCapture>,
}

/// A `--pcap` capture, shared by the threads that read and write a device.
type SharedCapture = Arc<Mutex<Capture>>;

/// Record `packets` in the capture, if there is one.
fn record<'a>(
    capture: &Option<SharedCapture>,
    packets: impl Iterator<Item = &'a [u8]>,
    direction: Direction,
) {
    if let Some(c) = capture {
        let mut c = c.lock().unwrap_or_else(|e| e.into_inner());
        packets.for_each(|p| c.packet(p, direction));
        c.flush();
    }
}

/// The buffers a batched read fills.
struct ReadBufs {
    /// Raw read buffer (virtio header plus superpacket).
    raw: Vec<u8>,
    /// Packets read: `HEADROOM` bytes, then the packet.
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    /// Packets read so far.
    packets: u64,
}

impl ReadBufs {
    fn new() -> Self {
        Self {
            raw: vec![0; VIRTIO_NET_HDR_LEN + MAX_PACKET],
            // Not `vec![vec![..]; n]`, whose clones would copy (and so
            // bring into memory) every buffer's zeros.
            bufs: (0..IDEAL_BATCH_SIZE)
                .map(|_| vec![0; HEADROOM + MAX_PACKET])
                .collect(),
            sizes: vec![0; IDEAL_BATCH_SIZE],
            packets: 0,
        }
    }

    /// Read one batch with `recv` (the device's batched read into the raw
    /// buffer, split into the packet buffers at `HEADROOM`, returning how
    /// many), recorded in `capture`: its packets.
    fn read<R>(
        &mut self,
        capture: &Option<SharedCapture>,
        recv: R,
    ) -> io::Result<impl Iterator<Item = &[u8]> + Clone>
    where
        R: FnOnce(&mut [u8], &mut [Vec<u8>], &mut [usize]) -> io::Result<usize>,
    {
        let n = recv(&mut self.raw, &mut self.bufs, &mut self.sizes)?;
        self.packets += n as u64;
        let packets = self
            .bufs
            .iter()
            .zip(&self.sizes)
            .take(n)
            .map(|(buf, &size)| &buf[HEADROOM..HEADROOM + size]);
        record(capture, packets.clone(), Direction::IntoTunnel);
        Ok(packets)
    }
}

/// One queue of the device, read by a lean worker (one that waits in
/// `poll(2)` itself, without a runtime: see [`crate::workers::wait`]).
pub struct TunReader {
    device: tun_rs::SyncDevice,
    reads: ReadBufs,
    /// `--pcap`: every packet read, if set.
    capture: Option<SharedCapture>,
}

impl TunReader {
    fn new(queue: Queue) -> anyhow::Result<Self> {
        queue
            .device
            .set_nonblocking(true)
            .with_context(|| format!("opening a queue of TUN device {}", queue.name))?;
        Ok(Self {
            device: queue.device,
            reads: ReadBufs::new(),
            capture: None,
        })
    }

    /// Read one batch without blocking: its packets. Returns `WouldBlock`
    /// when nothing is pending.
    pub fn try_read(&mut self) -> io::Result<impl Iterator<Item = &[u8]> + Clone> {
        let device = &self.device;
        self.reads.read(&self.capture, |raw, bufs, sizes| {
            device.recv_multiple(raw, bufs, sizes, HEADROOM)
        })
    }

    /// Packets read so far.
    pub fn packets_read(&self) -> u64 {
        self.reads.packets
    }
}

impl std::os::fd::AsRawFd for TunReader {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.device.as_raw_fd()
    }
}

impl std::os::fd::AsFd for TunReader {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.device.as_fd()
    }
}

impl Tun {
    /// Create the device `name` with `queues` queues (`IFF_MULTI_QUEUE`
    /// when more than one): this one, and the others for workers' threads
    /// to open there ([`Tun::open_queue`]). The kernel spreads the packets
    /// it routes into the device over the queues by flow, and sends a
    /// flow's packets to the queue that last wrote that flow's packets (its
    /// flow table keys both directions alike): a session's replies come
    /// back to the worker whose socket its packets arrive on.
    pub fn create_queues(
        name: &str,
        offload: bool,
        queues: usize,
    ) -> anyhow::Result<(Self, Vec<Queue>)> {
        let (first, others) = Self::create_device(name, offload, queues)?;
        Ok((Self::open_queue(first)?, others))
    }

    /// The device `name` with `queues` queues: the first, and the others.
    fn create_device(
        name: &str,
        offload: bool,
        queues: usize,
    ) -> anyhow::Result<(Queue, Vec<Queue>)> {
        let device = DeviceBuilder::new()
            .name(name)
            .offload(offload)
            .multi_queue(queues > 1)
            .build_sync()
            .with_context(|| {
                format!("creating TUN device {name} (is /dev/net/tun there, and are we root?)")
            })?;
        let name = device.name().unwrap_or_else(|_| name.to_owned());
        let others = (1..queues)
            .map(|index| {
                let device = device
                    .try_clone()
                    .with_context(|| format!("opening another queue of {name}"))?;
                Ok(Queue {
                    device,
                    name: name.clone(),
                    index,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let first = Queue {
            device,
            name,
            index: 0,
        };
        Ok((first, others))
    }

    /// Create the device `name` with `queues` queues (`IFF_MULTI_QUEUE`
    /// when more than one): this one, and the others for lean readers.
    /// `capture` records what all of them read, and what this one writes.
    pub fn create_with_readers(
        name: &str,
        offload: bool,
        queues: usize,
        capture: Option<Capture>,
    ) -> anyhow::Result<(Self, Vec<TunReader>)> {
        let (first, others) = Self::create_device(name, offload, queues)?;
        let mut tun = Self::open_queue(first)?;
        tun.capture = capture.map(|c| Arc::new(Mutex::new(c)));
        let readers = others
            .into_iter()
            .map(|q| {
                let mut r = TunReader::new(q)?;
                r.capture = tun.capture.clone();
                Ok(r)
            })
            .collect::<anyhow::Result<_>>()?;
        Ok((tun, readers))
    }

    /// Serve one queue of the device from this thread's runtime.
    pub fn open_queue(queue: Queue) -> anyhow::Result<Self> {
        let device = AsyncDevice::new(queue.device)
            .with_context(|| format!("registering TUN device {} with the runtime", queue.name))?;
        Ok(Self {
            device: Arc::new(device),
            name: queue.name,
            queue: queue.index,
            reads: ReadBufs::new(),
            batch: WriteBatch::new(),
            writer: None,
            written: Arc::new(Notify::new()),
            gro: GROTable::default(),
            capture: None,
        })
    }

    /// Packets read so far.
    pub fn packets_read(&self) -> u64 {
        self.reads.packets
    }

    /// Record every packet read and written in `capture`.
    pub fn set_capture(&mut self, capture: Capture) {
        self.capture = Some(Arc::new(Mutex::new(capture)));
    }

    /// The kernel's name for the device.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Wait until a read would not block.
    pub async fn readable(&self) -> io::Result<()> {
        self.device.readable().await
    }

    /// Read one batch without blocking and hand each packet to `f`.
    /// Returns `WouldBlock` when nothing is pending.
    pub fn try_read_batch(&mut self, mut f: impl FnMut(&[u8])) -> io::Result<()> {
        self.try_read()?.for_each(&mut f);
        Ok(())
    }

    /// Read one batch without blocking: its packets. Returns `WouldBlock`
    /// when nothing is pending.
    pub fn try_read(&mut self) -> io::Result<impl Iterator<Item = &[u8]> + Clone> {
        let device = &self.device;
        self.reads.read(&self.capture, |raw, bufs, sizes| {
            device.try_recv_multiple(raw, bufs, sizes, HEADROOM)
        })
    }

    /// A buffer of at least `len` bytes to write the next packet into, or
    /// `None` when the batch is full (call [`Tun::flush`] first). The batch
    /// grows as needed up to `MAX_WRITE_BATCH` packets, and keeps its size.
    pub fn stage_buffer(&mut self, len: usize) -> Option<&mut [u8]> {
        let b = &mut self.batch;
        if b.staged == b.bufs.len() && b.staged < MAX_WRITE_BATCH {
            b.bufs.push(PacketBuf::new());
        }
        let buf = b.bufs.get_mut(b.staged)?;
        buf.set_len(HEADROOM + len);
        Some(&mut buf.as_mut()[HEADROOM..])
    }

    /// Commit the packet of `len` bytes written into the last staged buffer.
    pub fn commit(&mut self, len: usize) {
        let b = &mut self.batch;
        b.bufs[b.staged].set_len(HEADROOM + len);
        b.staged += 1;
    }

    /// Packets staged and not yet with the writer thread: when this is
    /// true the loop waits on [`Tun::written`] too, and then flushes.
    pub fn has_staged(&self) -> bool {
        self.batch.staged > 0
    }

    /// Notified each time the writer thread is done with a batch (a
    /// notification may also be stale: flushing then does nothing).
    pub fn written(&self) -> Arc<Notify> {
        self.written.clone()
    }

    /// Hand the staged packets to the writer thread (coalescing where
    /// offloads allow). When the thread is still busy with the previous
    /// batch they stay staged (more join them) until it is done, or until
    /// there are so many that this waits for it.
    pub async fn flush(&mut self) -> io::Result<()> {
        let wait = self.batch.staged >= DEFER_LIMIT;
        self.hand_over(wait).await
    }

    async fn hand_over(&mut self, wait: bool) -> io::Result<()> {
        if self.batch.staged == 0 {
            return Ok(());
        }
        if let Some(w) = &mut self.writer {
            w.reclaim()?;
        }
        let idle = || self.writer.as_ref().is_none_or(|w| w.idle(Instant::now()));
        if self.batch.staged <= INLINE_MAX && idle() {
            return self.write_inline();
        }
        let writer = match &mut self.writer {
            Some(w) => w,
            None => self.writer.insert(Writer::spawn(
                self.device.clone(),
                &match self.queue {
                    0 => format!("{} writer", self.name),
                    q => format!("{} writer {q}", self.name),
                },
                self.written.clone(),
            )?),
        };
        let Some(empty) = writer.take_empty(wait).await? else {
            return Ok(()); // stays staged: the thread is busy
        };
        let full = std::mem::replace(&mut self.batch, empty);
        let packets = full.bufs[..full.staged].iter();
        record(
            &self.capture,
            packets.map(|b| &b.as_ref()[HEADROOM..]),
            Direction::OutOfTunnel,
        );
        writer.send(full)
    }

    /// Write the (small) staged batch from the loop: one or a few write
    /// syscalls on the non-blocking descriptor, which a TUN device takes at
    /// once (it never waits for room).
    fn write_inline(&mut self) -> io::Result<()> {
        let staged = std::mem::take(&mut self.batch.staged);
        let bufs = &mut self.batch.bufs[..staged];
        let packets = bufs.iter().map(|b| &b.as_ref()[HEADROOM..]);
        record(&self.capture, packets, Direction::OutOfTunnel);
        let sync: &tun_rs::DeviceImpl = &self.device;
        let result = sync.send_multiple(&mut self.gro, bufs, HEADROOM);
        bufs.iter_mut().for_each(PacketBuf::release);
        match result {
            Ok(_) => Ok(()),
            // A packet the kernel refuses (e.g. a bad header) must not stop the tunnel.
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                tracing::debug!("TUN write rejected: {e}");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

impl iptun_proto::transport::TunSink for Tun {
    fn buffer(&mut self, len: usize) -> Option<&mut [u8]> {
        self.stage_buffer(len)
    }

    fn commit(&mut self, len: usize) {
        Self::commit(self, len);
    }
}

/// Where a daemon's loop writes opened packets: the TUN device, or
/// nothing at all (`iptun probe`, which has no device).
pub trait PacketWriter: iptun_proto::transport::TunSink {
    /// Write what is staged.
    fn flush(&mut self) -> impl Future<Output = io::Result<()>>;
}

impl PacketWriter for Tun {
    fn flush(&mut self) -> impl Future<Output = io::Result<()>> {
        Self::flush(self)
    }
}

/// A [`PacketWriter`] that drops every packet.
#[derive(Default)]
pub struct Discard(Vec<u8>);

impl iptun_proto::transport::TunSink for Discard {
    fn buffer(&mut self, len: usize) -> Option<&mut [u8]> {
        self.0.resize(len, 0);
        Some(&mut self.0)
    }

    fn commit(&mut self, _: usize) {}
}

impl PacketWriter for Discard {
    async fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_buffers_reuse_their_bytes_and_honour_the_resize_contract() {
        let mut b = PacketBuf::new();
        b.set_len(8);
        b.as_mut().copy_from_slice(b"abcdefgh");
        b.set_len(3);
        assert_eq!(b.as_ref(), b"abc");
        // Staging again keeps the old bytes (no zeroing per packet).
        b.set_len(5);
        assert_eq!(b.as_ref(), b"abcde");
        // tun-rs's resize fills what it adds.
        b.buf_resize(7, 0);
        assert_eq!(b.as_ref(), b"abcde\0\0");
        b.buf_extend_from_slice(b"xy");
        assert_eq!(b.as_ref(), b"abcde\0\0xy");
        assert!(b.buf_capacity() >= WRITE_BUFFER);
        // Coalescing past the buffer's own capacity borrows a large one,
        // which goes back after the write; the packet's bytes move along.
        let own = b.bytes.capacity();
        b.buf_extend_from_slice(&[7; 4096]);
        assert!(b.bytes.capacity() >= WRITE_BUFFER);
        assert_eq!(&b.as_ref()[..9], b"abcde\0\0xy");
        assert_eq!(b.as_ref().len(), 9 + 4096);
        b.release();
        assert_eq!(b.bytes.capacity(), own);
        assert_eq!(LARGE.with(|p| p.borrow().len()), 1, "back in the pool");
    }

    /// One TCP segment of a flow, `seq` bytes in, in a staged buffer.
    fn tcp_segment(seq: u32, payload: &[u8]) -> PacketBuf {
        let builder = etherparse::PacketBuilder::ipv4([10, 1, 0, 2], [10, 1, 0, 1], 64)
            .tcp(40000, 5201, seq, 65535)
            .ack(1);
        let mut packet = Vec::with_capacity(builder.size(payload.len()));
        builder
            .write(&mut packet, payload)
            .expect("a valid segment");
        let mut buf = PacketBuf::new();
        buf.set_len(HEADROOM + packet.len());
        buf.as_mut()[HEADROOM..].copy_from_slice(&packet);
        buf
    }

    /// Coalesce a write batch of `packets` segments of one flow, as a
    /// write does (tun-rs GRO): how many allocations it took, and how
    /// many packets are left to write.
    fn coalesce(packets: u32) -> (u64, usize) {
        let payload = [0x5a; 1000];
        let mut bufs: Vec<PacketBuf> = (0..packets)
            .map(|i| tcp_segment(i * payload.len() as u32, &payload))
            .collect();
        let (mut tcp, mut udp) = (Default::default(), Default::default());
        let mut to_write = Vec::with_capacity(bufs.len());
        let info = allocation_counter::measure(|| {
            tun_rs::handle_gro(&mut bufs, HEADROOM, &mut tcp, &mut udp, true, &mut to_write)
                .expect("coalesced");
        });
        bufs.iter_mut().for_each(PacketBuf::release);
        (info.count_total, to_write.len())
    }

    /// Coalescing allocates per batch at most, never per packet: tun-rs
    /// copied each packet into a new Vec (patched in vendor/tun-rs), one
    /// allocation and one free per packet written to the device.
    #[test]
    fn coalescing_a_write_batch_allocates_nothing_per_packet() {
        coalesce(64); // fills this thread's pool of large buffers
        let (few, left) = coalesce(8);
        assert_eq!(left, 1, "8 segments of a flow coalesce into one packet");
        let (many, left) = coalesce(64);
        assert!(left < 4, "64 segments coalesce into a few packets: {left}");
        assert_eq!(few, many, "allocations grow with the packets coalesced");
    }

    fn threads_named(name: &str) -> usize {
        std::fs::read_dir("/proc/self/task")
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|t| {
                        std::fs::read_to_string(t.path().join("comm"))
                            .is_ok_and(|c| c.trim() == name)
                    })
                    .count()
            })
            .unwrap_or(0)
    }

    /// The writer thread starts with the first write, batches come back
    /// to be reused, and dropping the device stops the thread and removes
    /// the device. Needs root (skipped without /dev/net/tun access).
    #[tokio::test]
    async fn writer_thread_stops_and_device_goes_on_drop() {
        let name = format!("iptw{}", std::process::id() % 100_000);
        let Ok((mut tun, _)) = Tun::create_queues(&name, true, 1) else {
            eprintln!("skipped: cannot create a TUN device here");
            return;
        };
        let thread = format!("{name} writer");
        // comm holds at most 15 bytes.
        let thread = &thread[..thread.len().min(15)];
        let stage = |tun: &mut Tun, n: usize| {
            for _ in 0..n {
                // An IPv4 header the kernel drops (the device is down): the
                // write path runs all the same.
                let buf = tun.stage_buffer(20).expect("room");
                buf.fill(0);
                buf[0] = 0x45;
                buf[3] = 20;
                tun.commit(20);
            }
        };
        // A ping's worth is written by the loop itself: no thread.
        stage(&mut tun, 1);
        tun.flush().await.expect("flush");
        assert!(!tun.has_staged());
        assert_eq!(threads_named(thread), 0, "small writes need no thread");
        let written = tun.written();
        for _ in 0..3 {
            stage(&mut tun, INLINE_MAX + 1);
            tun.flush().await.expect("flush");
            // Handed over, or kept staged while the thread is busy.
            assert!(!tun.has_staged() || tun.writer.as_ref().is_some_and(|w| w.busy));
            written.notified().await;
            tun.flush().await.expect("flush");
        }
        assert_eq!(threads_named(thread), 1);
        // Once the thread is done with its batch (back in the channel, not
        // yet taken), a ping's worth is written by the loop again instead
        // of waking the thread: after a burst, small packets keep their RTT.
        let back = |tun: &Tun| {
            tun.writer
                .as_ref()
                .is_some_and(|w| !w.busy || !w.written.is_empty())
        };
        for _ in 0..2000 {
            if back(&tun) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(back(&tun), "the thread finished its batch");
        tokio::time::sleep(INLINE_AFTER).await; // not under load any more
        stage(&mut tun, 1);
        tun.flush().await.expect("flush");
        assert!(!tun.has_staged());
        assert!(
            !tun.writer.as_ref().expect("started").busy,
            "written inline, not handed to the thread"
        );
        drop(tun);
        assert_eq!(threads_named(thread), 0, "the writer thread ended");
        assert!(
            !std::path::Path::new("/sys/class/net").join(&name).exists(),
            "the device is gone"
        );
    }
}
