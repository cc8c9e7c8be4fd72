//! `--pcap FILE`: the inner IP packets, both ways, in a pcapng file that
//! tcpdump and Wireshark read (one raw-IP interface: the TUN device).
//! Packets read from the device go into the tunnel (outbound), packets
//! written to it came out of it (inbound); on a server each carries a
//! comment naming the client it belongs to (its tunnel address). The file
//! stops growing at a size limit; off by default, and a debugging aid: one
//! buffered write per packet.

use std::borrow::Cow;
use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use iptun_proto::wire::InnerPacket;
use pcap_file::DataLink;
use pcap_file::pcapng::PcapNgWriter;
use pcap_file::pcapng::blocks::enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption};
use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionBlock;

/// Which way a packet went, seen from the host with the TUN device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Read from the device: into the tunnel.
    IntoTunnel,
    /// Written to the device: out of the tunnel.
    OutOfTunnel,
}

/// A pcapng capture file being written.
pub struct Capture {
    writer: PcapNgWriter<BufWriter<File>>,
    path: PathBuf,
    written: u64,
    limit: u64,
    /// Servers tag packets with their client; a client has one session.
    tag_clients: bool,
    full: bool,
}

impl Capture {
    /// Create (or truncate) `path`; stop writing after `limit` bytes.
    pub fn create(path: &Path, limit: u64, tag_clients: bool) -> anyhow::Result<Self> {
        let file = File::create(path).with_context(|| format!("--pcap {}", path.display()))?;
        let mut writer = PcapNgWriter::new(BufWriter::new(file))
            .with_context(|| format!("--pcap {}: writing the header", path.display()))?;
        let interface = InterfaceDescriptionBlock {
            linktype: DataLink::RAW,
            snaplen: 0,
            options: Vec::new(),
        };
        writer
            .write_pcapng_block(interface)
            .with_context(|| format!("--pcap {}: writing the header", path.display()))?;
        Ok(Self {
            writer,
            path: path.to_owned(),
            written: 0,
            limit,
            tag_clients,
            full: false,
        })
    }

    /// Record one inner packet.
    pub fn packet(&mut self, packet: &[u8], direction: Direction) {
        if self.full {
            return;
        }
        if self.written + packet.len() as u64 > self.limit {
            self.full = true;
            let _ = self.writer.get_mut().flush();
            tracing::warn!(
                "--pcap {}: {} bytes written, the limit: capture stopped",
                self.path.display(),
                self.written
            );
            return;
        }
        let (flags, way) = match direction {
            Direction::IntoTunnel => (0b10, "into the tunnel"),
            Direction::OutOfTunnel => (0b01, "out of the tunnel"),
        };
        let mut options = vec![EnhancedPacketOption::Flags(flags)];
        if self.tag_clients
            && let Some(client) = client_of(packet, direction)
        {
            options.push(EnhancedPacketOption::Comment(Cow::Owned(format!(
                "client {client}, {way}"
            ))));
        }
        let block = EnhancedPacketBlock {
            interface_id: 0,
            timestamp: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
            original_len: packet.len() as u32,
            data: Cow::Borrowed(packet),
            options,
        };
        match self.writer.write_pcapng_block(block) {
            Ok(n) => self.written += n as u64,
            Err(e) => {
                self.full = true;
                tracing::warn!("--pcap {}: {e}: capture stopped", self.path.display());
            }
        }
    }

    /// Push what is buffered to the file (after each batch, so a reader
    /// sees the packets while the daemon runs).
    pub fn flush(&mut self) {
        let _ = self.writer.get_mut().flush();
    }
}

/// On a server, the client a packet belongs to: the destination of what
/// goes into the tunnel, the source of what comes out.
fn client_of(packet: &[u8], direction: Direction) -> Option<IpAddr> {
    let p = InnerPacket::new_checked(packet).ok()?;
    Some(match direction {
        Direction::IntoTunnel => p.dst(),
        Direction::OutOfTunnel => p.src(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcap_file::pcapng::{Block, PcapNgReader};

    #[test]
    fn packets_read_back_with_direction_and_client_and_the_limit_holds() {
        let path =
            std::env::temp_dir().join(format!("iptun-capture-{}.pcapng", std::process::id()));
        let mut p = vec![0x45, 0, 0, 24, 0, 0, 0, 0, 64, 253, 0, 0];
        p.extend_from_slice(&[10, 1, 0, 1, 10, 1, 0, 7, 1, 2, 3, 4]);
        let mut c = Capture::create(&path, 200, true).unwrap();
        for _ in 0..5 {
            c.packet(&p, Direction::IntoTunnel);
        }
        drop(c);
        let mut r = PcapNgReader::new(File::open(&path).unwrap()).unwrap();
        let mut packets = Vec::new();
        while let Some(block) = r.next_block() {
            if let Block::EnhancedPacket(e) = block.unwrap() {
                packets.push((e.data.to_vec(), format!("{:?}", e.options)));
            }
        }
        std::fs::remove_file(&path).unwrap();
        assert!(
            !packets.is_empty() && packets.len() < 5,
            "{} packets: the limit",
            packets.len()
        );
        assert_eq!(packets[0].0, p);
        assert!(
            packets[0].1.contains("client 10.1.0.7, into the tunnel"),
            "{}",
            packets[0].1
        );
    }

    #[test]
    fn an_unwritable_path_is_named() {
        let e = Capture::create(Path::new("/nonexistent/dir/x.pcapng"), 1 << 20, false);
        let e = format!("{:#}", e.err().unwrap());
        assert!(e.contains("--pcap /nonexistent/dir/x.pcapng"), "{e}");
    }
}
