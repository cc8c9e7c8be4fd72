//! Which queue of a multi-queue TUN device the kernel hands a packet to.
//!
//! Without help, the kernel sends a flow's packets to the queue that last
//! wrote a packet of the flow (its TUN flow table learns from writes).
//! That suits the server, whose workers each write their own clients'
//! packets, but not a client whose main loop writes every packet from the
//! server: all flows would come back to the main loop's queue. A steering
//! program (`TUNSETSTEERINGEBPF`) replaces that table: the queue is the
//! packet's flow hash modulo the number of queues, so each flow stays on
//! one queue (one worker, in order) and the flows spread over all of them.
//!
//! The program is two instructions, `r0 = skb->hash; exit`, loaded with the
//! `bpf` syscall: a loader crate would bring an ELF toolchain for them.
//! Packets without a hash (rare: the kernel sets it for TCP and connected
//! UDP sockets) all go to queue 0, the main loop's.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `BPF_PROG_TYPE_SOCKET_FILTER`: what a TUN steering program is.
const SOCKET_FILTER: u32 = 1;
/// `BPF_PROG_LOAD`.
const PROG_LOAD: libc::c_long = 5;
/// `TUNSETSTEERINGEBPF`: `_IOR('T', 224, int)`.
const TUN_SET_STEERING_EBPF: libc::c_ulong = 0x8004_54e0;
/// `offsetof(struct __sk_buff, hash)`.
const SKB_HASH: i16 = 68;

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
struct Insn {
    code: u8,
    /// Destination register in the low nibble, source in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

/// The head of `union bpf_attr` for `BPF_PROG_LOAD` (the kernel takes a
/// shorter attribute and reads the fields beyond as zero). No padding:
/// the kernel reads every byte given, and padding is not initialized.
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
}
const _: () = assert!(size_of::<ProgLoad>() == 48);

/// Load the program: `r0 = *(u32 *)(r1 + hash); exit`.
fn load() -> io::Result<OwnedFd> {
    let program = [
        // BPF_LDX | BPF_MEM | BPF_W, r0 <- [r1 + SKB_HASH]
        Insn {
            code: 0x61,
            regs: 0x10,
            off: SKB_HASH,
            imm: 0,
        },
        // BPF_JMP | BPF_EXIT
        Insn {
            code: 0x95,
            regs: 0,
            off: 0,
            imm: 0,
        },
    ];
    let license = c"GPL";
    let attr = ProgLoad {
        prog_type: SOCKET_FILTER,
        insn_cnt: program.len() as u32,
        insns: program.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: `attr` points at `program` and `license`, both alive for
    // the call; the kernel copies what it needs.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            PROG_LOAD,
            &attr as *const ProgLoad,
            size_of::<ProgLoad>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor the kernel just gave us, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Steer the packets of the multi-queue device that `queue` is a queue of
/// by flow hash (see the module's comment). The device keeps the program
/// until it goes.
pub fn by_flow_hash(queue: &impl AsRawFd) -> io::Result<()> {
    let program = load()?;
    let fd: libc::c_int = program.as_raw_fd();
    // SAFETY: TUNSETSTEERINGEBPF reads one int (the program's descriptor)
    // from the pointer; the device takes its own reference to the program.
    let r = unsafe { libc::ioctl(queue.as_raw_fd(), TUN_SET_STEERING_EBPF as _, &fd) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;

    use super::*;
    use crate::testing::{in_own_netns, run};

    /// A datagram to `socket` from its peer, as the tunnel would write it.
    fn reply(socket: &UdpSocket) -> Vec<u8> {
        let (from, to) = (socket.peer_addr().unwrap(), socket.local_addr().unwrap());
        let builder = etherparse::PacketBuilder::ipv4([10, 9, 0, 2], [10, 9, 0, 1], 64)
            .udp(from.port(), to.port());
        let mut packet = Vec::with_capacity(builder.size(1));
        builder.write(&mut packet, b"r").expect("a valid datagram");
        packet
    }

    /// Flows whose packets were all written on queue 0 (as a client's
    /// main loop writes every packet from the server) still spread over
    /// both queues with the program; without it, the kernel's flow table
    /// sends them all back to queue 0. Runs in a network namespace of its
    /// own thread (needs root; it goes with the thread).
    #[test]
    fn flows_written_on_one_queue_spread_over_all() {
        in_own_netns(|| {
            let queue0 = tun_rs::DeviceBuilder::new()
                .name("iptsteer")
                .multi_queue(true)
                .build_sync()
                .expect("a multi-queue TUN device");
            let queue1 = queue0.try_clone().expect("a second queue");
            run("ip addr add 10.9.0.1/24 dev iptsteer");
            run("ip link set dev iptsteer up");
            by_flow_hash(&queue0).expect("steering program attached");
            queue0.set_nonblocking(true).unwrap();
            queue1.set_nonblocking(true).unwrap();
            const FLOWS: u16 = 16;
            let sockets: Vec<UdpSocket> = (0..FLOWS)
                .map(|i| {
                    let s = UdpSocket::bind("10.9.0.1:0").unwrap();
                    s.connect(("10.9.0.2", 6000 + i)).unwrap();
                    s
                })
                .collect();
            // Each flow's first packet comes in on queue 0.
            for s in &sockets {
                queue0.send(&reply(s)).unwrap();
            }
            for s in &sockets {
                s.send(b"q").unwrap();
            }
            let mut counts = [0; 2];
            let mut buf = [0u8; 2048];
            for (count, queue) in counts.iter_mut().zip([&queue0, &queue1]) {
                while let Ok(n) = queue.recv(&mut buf) {
                    // IPv4, UDP, to 10.9.0.2: one of ours (not a stray IPv6 packet)
                    if n > 20 && buf[0] >> 4 == 4 && buf[9] == 17 && buf[16..20] == [10, 9, 0, 2] {
                        *count += 1;
                    }
                }
            }
            assert_eq!(
                counts[0] + counts[1],
                FLOWS,
                "every datagram read once: {counts:?}"
            );
            assert!(
                counts.iter().all(|&c| c > 0),
                "spread over both queues: {counts:?}"
            );
        });
    }
}
