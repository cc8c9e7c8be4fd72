//! The TUN device, read and written in batches.
//!
//! With offloads on (`IFF_VNET_HDR`), one read can return a TCP or UDP
//! "superpacket" of up to 64 KiB that tun-rs splits into MTU-sized packets
//! for us, and writes are coalesced back into superpackets (GRO) before they
//! reach the kernel. That turns one syscall per packet into one per batch,
//! which is most of the difference between a few hundred Mbit/s and
//! several Gbit/s.

use std::io;

use anyhow::Context as _;
use tun_rs::{AsyncDevice, DeviceBuilder, GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use crate::capture::{Capture, Direction};

/// Room kept in front of every packet buffer: tun-rs needs the virtio
/// header in front of packets it writes, and we keep it 16-byte aligned.
pub const HEADROOM: usize = 16;
const _: () = assert!(HEADROOM >= VIRTIO_NET_HDR_LEN);

/// Largest packet a TUN read or write can carry.
const MAX_PACKET: usize = 65535;
/// Packets staged for one coalesced write, to begin with.
const WRITE_BATCH: usize = 512;
/// Capacity of every write buffer. tun-rs coalesces a TCP or UDP flow's
/// packets into the buffer of the flow's first packet, and only when that
/// buffer can hold the whole superpacket without reallocating (its
/// `InsufficientCap` check: `2 * offset + coalesced length`). With smaller
/// buffers nothing coalesces and every packet is its own write, and its own
/// trip through the kernel's TCP receive path. Untouched capacity costs
/// address space, not memory: only a superpacket's head buffer is filled.
const WRITE_BUFFER: usize = 2 * HEADROOM + MAX_PACKET;
/// The most packets one write batch grows to (a long-poll body of a
/// megabyte holds more than `WRITE_BATCH` packets); beyond, packets are
/// dropped and counted by the caller.
const MAX_WRITE_BATCH: usize = 8192;

/// An open TUN device with its batch buffers.
pub struct Tun {
    device: AsyncDevice,
    name: String,
    /// Raw read buffer (virtio header plus superpacket).
    raw: Vec<u8>,
    /// Packets read: `HEADROOM` bytes, then the packet.
    read_bufs: Vec<Vec<u8>>,
    read_sizes: Vec<usize>,
    /// Packets staged for writing: `HEADROOM` bytes, then the packet.
    write_bufs: Vec<Vec<u8>>,
    staged: usize,
    gro: GROTable,
    /// `--pcap`: every packet read and written, if set.
    capture: Option<Capture>,
}

impl Tun {
    /// Create the device `name` (it disappears when this is dropped).
    pub fn create(name: &str, offload: bool) -> anyhow::Result<Self> {
        let device = DeviceBuilder::new()
            .name(name)
            .offload(offload)
            .build_async()
            .with_context(|| {
                format!("creating TUN device {name} (is /dev/net/tun there, and are we root?)")
            })?;
        let name = device.name().unwrap_or_else(|_| name.to_owned());
        Ok(Self {
            device,
            name,
            raw: vec![0; VIRTIO_NET_HDR_LEN + MAX_PACKET],
            read_bufs: vec![vec![0; HEADROOM + MAX_PACKET]; IDEAL_BATCH_SIZE],
            read_sizes: vec![0; IDEAL_BATCH_SIZE],
            // Enough to take every datagram of one UDP receive batch, each
            // big enough to become a coalesced superpacket.
            write_bufs: (0..WRITE_BATCH)
                .map(|_| Vec::with_capacity(WRITE_BUFFER))
                .collect(),
            staged: 0,
            gro: GROTable::default(),
            capture: None,
        })
    }

    /// Record every packet read and written in `capture`.
    pub fn set_capture(&mut self, capture: Capture) {
        self.capture = Some(capture);
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
        let n = self.device.try_recv_multiple(
            &mut self.raw,
            &mut self.read_bufs,
            &mut self.read_sizes,
            HEADROOM,
        )?;
        for (buf, &size) in self.read_bufs.iter().zip(&self.read_sizes).take(n) {
            let packet = &buf[HEADROOM..HEADROOM + size];
            if let Some(c) = &mut self.capture {
                c.packet(packet, Direction::IntoTunnel);
            }
            f(packet);
        }
        if let Some(c) = &mut self.capture {
            c.flush();
        }
        Ok(())
    }

    /// A buffer of at least `len` bytes to write the next packet into, or
    /// `None` when the batch is full (call [`Tun::flush`] first). The batch
    /// grows as needed up to `MAX_WRITE_BATCH` packets, and keeps its size.
    pub fn stage_buffer(&mut self, len: usize) -> Option<&mut [u8]> {
        if self.staged == self.write_bufs.len() && self.staged < MAX_WRITE_BATCH {
            self.write_bufs.push(Vec::with_capacity(WRITE_BUFFER));
        }
        let buf = self.write_bufs.get_mut(self.staged)?;
        buf.resize(HEADROOM + len, 0);
        Some(&mut buf[HEADROOM..])
    }

    /// Commit the packet of `len` bytes written into the last staged buffer.
    pub fn commit(&mut self, len: usize) {
        self.write_bufs[self.staged].truncate(HEADROOM + len);
        self.staged += 1;
    }

    /// Write every staged packet (coalescing where offloads allow).
    pub async fn flush(&mut self) -> io::Result<()> {
        if self.staged == 0 {
            return Ok(());
        }
        let staged = std::mem::take(&mut self.staged);
        if let Some(c) = &mut self.capture {
            for buf in &self.write_bufs[..staged] {
                c.packet(&buf[HEADROOM..], Direction::OutOfTunnel);
            }
            c.flush();
        }
        let result = self
            .device
            .send_multiple(&mut self.gro, &mut self.write_bufs[..staged], HEADROOM)
            .await;
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
