//! The ICMP echo transport's socket: a raw ICMP (or ICMPv6) socket, which
//! sees every echo request (server) or reply (client) that reaches the host.
//! A kernel filter keeps everything else out. One syscall per message; the
//! poll discipline that decides *when* to send lives in `iptun_proto::poll`.

use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd as _;

use anyhow::Context as _;
use iptun_proto::wire::icmp::{self, Family};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::sockopt;

// From <linux/icmp.h> and <linux/icmpv6.h>; libc does not carry them.
const ICMP_FILTER: libc::c_int = 1;
const ICMPV6_FILTER: libc::c_int = 1;

/// Which echo messages a socket wants to see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Echo requests (the server).
    Server,
    /// Echo replies (the client).
    Client,
}

/// A raw ICMP socket of one family.
pub struct IcmpSocket {
    fd: AsyncFd<Socket>,
    family: Family,
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
        // SAFETY: the socket owns its fd and keeps it open for as long as the
        // AsyncFd (which owns the socket) lives.
        let fd = unsafe { AsyncFd::register(socket) }.map_err(|e| e.into_parts().1)?;
        Ok(Self { fd, family })
    }

    /// The socket's family.
    pub fn family(&self) -> Family {
        self.family
    }

    /// Ready for a receive.
    pub fn poll_readable(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        self.fd.poll_read_ready(cx).map_ok(|_| ())
    }

    /// Receive one message without blocking: the sender and the ICMP bytes
    /// (the IPv4 header, which raw IPv4 sockets deliver, is stripped).
    /// `Ok(None)` for something that is not ICMP we can read.
    pub fn try_recv<'b>(&self, buf: &'b mut [u8]) -> io::Result<Option<(IpAddr, &'b [u8])>> {
        let (n, from) = self.fd.try_io(Interest::READABLE, |s| {
            // SAFETY: `MaybeUninit<u8>` has the layout of `u8`, and recv only writes.
            let uninit =
                unsafe { &mut *(std::ptr::from_mut::<[u8]>(buf) as *mut [MaybeUninit<u8>]) };
            s.recv_from(uninit)
        })?;
        let packet = &buf[..n];
        Ok(match self.family {
            Family::V4 => icmp::strip_ipv4(packet)
                .ok()
                .map(|(src, icmp)| (IpAddr::V4(src), icmp)),
            Family::V6 => from.as_socket().map(|a| (a.ip(), packet)),
        })
    }

    /// Send one ICMP message to `to`; waits briefly when the socket buffer
    /// is full, then drops (as the network would).
    pub fn send_to(&self, to: IpAddr, message: &[u8]) {
        let addr = SockAddr::from(SocketAddr::new(to, 0));
        for _ in 0..2 {
            match self.fd.get_ref().send_to(message, &addr) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    sockopt::wait_writable(self.fd.as_raw_fd())
                }
                Err(e) => return tracing::debug!("ICMP send to {to} failed: {e}"),
                Ok(_) => return,
            }
        }
    }
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
