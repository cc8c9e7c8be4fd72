//! The ICMP echo transport's socket: a raw ICMP (or ICMPv6) socket, which
//! sees every echo request (server) or reply (client) that reaches the host.
//! A kernel filter keeps everything else out. One syscall per message; the
//! poll discipline that decides *when* to send lives in `iptun_proto::transport::poll`.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd as _;

use anyhow::Context as _;
use iptun_proto::wire::icmp::{self, Family};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::{HeldSend, sockopt};

// From <linux/icmp.h> and <linux/icmpv6.h>; libc does not carry them.
const ICMP_FILTER: libc::c_int = 1;
const ICMPV6_FILTER: libc::c_int = 1;

/// The status counter of messages dropped for a full send buffer or qdisc.
pub const SEND_BUFFER_FULL: &str = "icmp_send_buffer_full";

/// Which echo messages a socket wants to see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Echo requests (the server).
    Server,
    /// Echo replies (the client).
    Client,
}

/// A raw ICMP socket of one family. Sends never block: a message the full
/// socket buffer refused is held (one, as UDP holds one run), the socket
/// says it is blocked, and the loop sends nothing new on it until it is
/// writable and the held message has gone ([`HeldSend::poll_writable`],
/// [`HeldSend::retry`]). Messages sent meanwhile are dropped and counted.
pub struct IcmpSocket {
    fd: AsyncFd<Socket>,
    family: Family,
    held: Held,
}

/// The message a full socket buffer refused. Its buffer stays allocated
/// once a message was held.
#[derive(Default)]
struct Held {
    to: Option<(IpAddr, Option<IpAddr>)>,
    message: Vec<u8>,
    dropped: u64,
}

impl IcmpSocket {
    /// Open a raw socket (needs root or CAP_NET_RAW).
    pub fn open(family: Family, role: Role) -> anyhow::Result<Self> {
        let (domain, protocol) = match family {
            Family::V4 => (Domain::IPV4, Protocol::ICMPV4),
            Family::V6 => (Domain::IPV6, Protocol::ICMPV6),
        };
        let socket = Socket::new(domain, Type::RAW, Some(protocol))
            .context("opening a raw ICMP socket (needs root or CAP_NET_RAW)")?;
        socket.set_nonblocking(true)?;
        let fd = socket.as_raw_fd();
        sockopt::size_buffers(fd);
        filter(fd, family, role).context("setting the ICMP filter")?;
        // Let routers fragment what does not fit, rather than fail (DF off).
        match family {
            Family::V4 => sockopt::set(
                fd,
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                &libc::IP_PMTUDISC_DONT,
            )?,
            Family::V6 => sockopt::set(
                fd,
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU_DISCOVER,
                &libc::IPV6_PMTUDISC_DONT,
            )?,
        }
        // Learn which local address each message was sent to: replies must leave
        // from it, and broadcasts get none.
        match family {
            Family::V4 => sockopt::set(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, &1 as &libc::c_int)?,
            Family::V6 => sockopt::set(
                fd,
                libc::IPPROTO_IPV6,
                libc::IPV6_RECVPKTINFO,
                &1 as &libc::c_int,
            )?,
        }
        // SAFETY: the socket owns its fd and keeps it open for as long as the
        // AsyncFd (which owns the socket) lives.
        let fd = unsafe { AsyncFd::register(socket) }.map_err(|e| e.into_parts().1)?;
        Ok(Self {
            fd,
            family,
            held: Held::default(),
        })
    }

    /// Ready for a receive.
    pub fn poll_readable(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        self.fd.poll_read_ready(cx).map_ok(|_| ())
    }

    /// Receive one message without blocking. `Ok(None)` for something
    /// that is not ICMP we can read.
    pub fn try_recv<'b>(&self, buf: &'b mut [u8]) -> io::Result<Option<Received<'b>>> {
        let mut control = [0u64; 16]; // aligned room for one pktinfo cmsg
        let (n, from, local) = self.fd.try_io(Interest::READABLE, |s| {
            recv_with_pktinfo(s.as_raw_fd(), buf, &mut control)
        })?;
        let packet = &buf[..n];
        Ok(match self.family {
            Family::V4 => icmp::strip_ipv4(packet)
                .ok()
                .map(|(src, dst, icmp)| Received {
                    from: IpAddr::V4(src),
                    // Sent to one of our addresses, not to a broadcast or
                    // multicast one: the kernel's reply address equals it.
                    to: (local == Some(IpAddr::V4(dst))).then_some(IpAddr::V4(dst)),
                    icmp,
                }),
            Family::V6 => from.map(|from| Received {
                from,
                to: local.filter(|a| !a.is_multicast()),
                icmp: packet,
            }),
        })
    }

    /// Receive up to `max` messages without blocking, handing each to `f`;
    /// whether the socket ran dry.
    pub fn drain(
        &self,
        buf: &mut [u8],
        max: usize,
        mut f: impl FnMut(Received<'_>),
    ) -> io::Result<bool> {
        for _ in 0..max {
            match self.try_recv(buf) {
                Ok(Some(r)) => f(r),
                Ok(None) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    /// Send one ICMP message to `to`, from the local address `from` when
    /// given (a reply leaves from the address its request was sent to, or a
    /// stateful firewall would not match it). A full socket buffer holds
    /// the message (see [`IcmpSocket`]); while one is held, the message is
    /// dropped and counted, as the network would drop it. An error other
    /// than a full buffer (no route, say) is returned.
    pub fn send(&mut self, to: IpAddr, from: Option<IpAddr>, message: &[u8]) -> io::Result<()> {
        if self.is_blocked() {
            self.held.dropped += 1;
            return Ok(());
        }
        match send_with_source(self.fd.as_raw_fd(), to, from, message) {
            Err(e) if is_full(&e) => {
                self.held.to = Some((to, from));
                self.held.message.clear();
                self.held.message.extend_from_slice(message);
                Ok(())
            }
            Err(e) => {
                tracing::debug!("ICMP send to {to} failed: {e}");
                Err(e)
            }
            Ok(()) => Ok(()),
        }
    }
}

impl HeldSend for IcmpSocket {
    /// A message waits for room in the socket buffer.
    fn is_blocked(&self) -> bool {
        self.held.to.is_some()
    }

    /// Ready when blocked and the socket may have room (then call
    /// [`HeldSend::retry`]); pending otherwise.
    fn poll_writable(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if !self.is_blocked() {
            return std::task::Poll::Pending;
        }
        self.fd.poll_write_ready(cx).map(drop)
    }

    /// Send the held message. If there is still no room, tokio's
    /// readiness is cleared, so [`HeldSend::poll_writable`] waits for
    /// the socket's next write-space wakeup; but if the socket has room
    /// and the send failed all the same, the queue that refused it was a
    /// qdisc's, and the message is dropped (no wakeup would come for it).
    fn retry(&mut self) {
        let Some((to, from)) = self.held.to else {
            return;
        };
        let fd = self.fd.as_raw_fd();
        match send_with_source(fd, to, from, &self.held.message) {
            Err(e) if is_full(&e) => {
                // Cleared first, then checked: a wakeup after the check
                // sets readiness again and is not lost.
                let _ = self.fd.try_io(Interest::WRITABLE, |_| {
                    Err::<(), _>(io::ErrorKind::WouldBlock.into())
                });
                if sockopt::writable_now(fd) {
                    self.held.dropped += 1;
                    self.held.to = None;
                }
            }
            Err(e) => {
                tracing::debug!("ICMP send to {to} failed: {e}");
                self.held.to = None;
            }
            Ok(()) => self.held.to = None,
        }
    }

    /// Messages dropped because the socket buffer stayed full.
    fn dropped(&self) -> u64 {
        self.held.dropped
    }

    fn drop_counter(&self) -> &'static str {
        SEND_BUFFER_FULL
    }
}

/// A send refused for want of room. A raw socket says `ENOBUFS` where a
/// UDP socket says `EAGAIN` (it allocates without waiting for send-buffer
/// space), and a full qdisc says `ENOBUFS` too.
fn is_full(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::ENOBUFS)
}

/// One message from a raw ICMP socket.
pub struct Received<'b> {
    /// The sender.
    pub from: IpAddr,
    /// The local unicast address it was sent to; `None` for broadcast and
    /// multicast, which get no answer (as the kernel does by default).
    pub to: Option<IpAddr>,
    /// The ICMP message.
    pub icmp: &'b [u8],
}

/// `recvmsg` with the packet-info control message: bytes, sender, and the
/// local address the kernel would reply from (IPv4: `ipi_spec_dst`; IPv6:
/// the packet's destination).
fn recv_with_pktinfo(
    fd: i32,
    buf: &mut [u8],
    control: &mut [u64; 16],
) -> io::Result<(usize, Option<IpAddr>, Option<IpAddr>)> {
    let mut addr = socket2::SockAddrStorage::zeroed();
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&raw mut addr).cast();
    msg.msg_namelen = addr.size_of();
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(control);
    // SAFETY: msg points at live buffers of the sizes given.
    let n = unsafe { libc::recvmsg(fd, &raw mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled `addr` with `msg_namelen` bytes.
    let from = unsafe { SockAddr::new(addr, msg.msg_namelen) }
        .as_socket()
        .map(|a| a.ip());
    let mut local = None;
    // SAFETY: walking the control buffer the kernel filled, with its macros.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            let data = libc::CMSG_DATA(cmsg);
            match ((*cmsg).cmsg_level, (*cmsg).cmsg_type) {
                (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                    let info = std::ptr::read_unaligned(data.cast::<libc::in_pktinfo>());
                    local = Some(IpAddr::V4(u32::from_be(info.ipi_spec_dst.s_addr).into()));
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    let info = std::ptr::read_unaligned(data.cast::<libc::in6_pktinfo>());
                    local = Some(IpAddr::V6(info.ipi6_addr.s6_addr.into()));
                }
                _ => {}
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    Ok((n as usize, from, local))
}

/// `sendmsg` to `to`, with a packet-info control message choosing the
/// source address when `from` is given.
fn send_with_source(fd: i32, to: IpAddr, from: Option<IpAddr>, message: &[u8]) -> io::Result<()> {
    let to = SockAddr::from(SocketAddr::new(to, 0));
    let mut iov = libc::iovec {
        iov_base: message.as_ptr().cast_mut().cast(),
        iov_len: message.len(),
    };
    let mut control = [0u64; 16];
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = to.as_ptr().cast_mut().cast();
    msg.msg_namelen = to.len();
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    if let Some(from) = from {
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: the control buffer has room for one pktinfo cmsg, written
        // through the kernel's own macros.
        unsafe {
            let (level, kind, len) = match from {
                IpAddr::V4(_) => (
                    libc::IPPROTO_IP,
                    libc::IP_PKTINFO,
                    size_of::<libc::in_pktinfo>(),
                ),
                IpAddr::V6(_) => (
                    libc::IPPROTO_IPV6,
                    libc::IPV6_PKTINFO,
                    size_of::<libc::in6_pktinfo>(),
                ),
            };
            msg.msg_controllen = libc::CMSG_SPACE(len as u32) as usize;
            let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
            (*cmsg).cmsg_level = level;
            (*cmsg).cmsg_type = kind;
            (*cmsg).cmsg_len = libc::CMSG_LEN(len as u32) as usize;
            let data = libc::CMSG_DATA(cmsg);
            match from {
                IpAddr::V4(a) => std::ptr::write_unaligned(
                    data.cast::<libc::in_pktinfo>(),
                    libc::in_pktinfo {
                        ipi_ifindex: 0,
                        ipi_spec_dst: libc::in_addr {
                            s_addr: u32::from(a).to_be(),
                        },
                        ipi_addr: libc::in_addr { s_addr: 0 },
                    },
                ),
                IpAddr::V6(a) => std::ptr::write_unaligned(
                    data.cast::<libc::in6_pktinfo>(),
                    libc::in6_pktinfo {
                        ipi6_addr: libc::in6_addr {
                            s6_addr: a.octets(),
                        },
                        ipi6_ifindex: 0,
                    },
                ),
            }
        }
    }
    // SAFETY: msg points at live buffers of the sizes given.
    if unsafe { libc::sendmsg(fd, &raw const msg, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Block every ICMP type but the echo messages this role wants.
fn filter(fd: i32, family: Family, role: Role) -> io::Result<()> {
    match family {
        Family::V4 => {
            let wanted: u32 = if role == Role::Server { 8 } else { 0 };
            sockopt::set(fd, libc::SOL_RAW, ICMP_FILTER, &!(1u32 << wanted))
        }
        Family::V6 => {
            let wanted: usize = if role == Role::Server { 128 } else { 129 };
            let mut blocked = [u32::MAX; 8];
            blocked[wanted / 32] &= !(1 << (wanted % 32));
            sockopt::set(fd, libc::IPPROTO_ICMPV6, ICMPV6_FILTER, &blocked)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{in_own_netns, run};

    /// A full socket buffer holds one message and drops (and counts) the
    /// rest without blocking the loop; room again sends the held one.
    /// Runs in a network namespace of its own thread (needs root; it goes
    /// with the thread): a veth whose token bucket passes almost nothing
    /// keeps the sent messages queued and charged to the socket's small
    /// send buffer.
    #[test]
    fn full_send_buffer_holds_one_and_counts_drops() {
        in_own_netns(|| {
            run("ip link add name iptqa type veth peer name iptqb");
            run("ip link set dev iptqa up");
            run("ip link set dev iptqb up");
            run("ip addr add 192.0.2.1/24 dev iptqa");
            run("ip neigh add 192.0.2.9 lladdr 02:00:00:00:00:09 dev iptqa");
            run("tc qdisc add dev iptqa root tbf rate 1kbit burst 1600 limit 1000000");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut socket = IcmpSocket::open(Family::V4, Role::Client).unwrap();
                let fd = socket.fd.as_raw_fd();
                sockopt::set(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, &4096).unwrap();
                let mut message = [0u8; 1000];
                message[0] = 8; // echo request
                let to: IpAddr = [192, 0, 2, 9].into();
                let mut sent = 0;
                while !socket.is_blocked() {
                    socket.send(to, None, &message).unwrap();
                    sent += 1;
                    assert!(
                        sent < 1000,
                        "the send buffer never filled ({} dropped)",
                        socket.dropped()
                    );
                }
                for _ in 0..5 {
                    socket.send(to, None, &message).unwrap();
                }
                assert_eq!(socket.dropped(), 5, "sends while one is held are counted");
                let never_ready = tokio::time::timeout(
                    std::time::Duration::from_millis(100),
                    std::future::poll_fn(|cx| socket.poll_writable(cx)),
                );
                // The queue still holds everything: not writable yet (or a
                // stale edge, which a retry then finds still full).
                if never_ready.await.is_ok() {
                    socket.retry();
                    assert!(socket.is_blocked(), "still full");
                }
                // Freeing the queued messages makes room: the held one goes.
                run("tc qdisc del dev iptqa root");
                tokio::time::timeout(std::time::Duration::from_secs(5), async {
                    while socket.is_blocked() {
                        std::future::poll_fn(|cx| socket.poll_writable(cx)).await;
                        socket.retry();
                    }
                })
                .await
                .expect("the held message left once there was room");
                assert_eq!(socket.dropped(), 5);
            });
        });
    }
}
