//! The data path allocates nothing: after the handshake, sealing and opening
//! data messages in both directions must not touch the heap, in the engines
//! and through the client `Connection` and server `Endpoint` that drive
//! them on UDP.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use iptun_proto::connection::{self, Connection, Event, PathConfig, Remote};
use iptun_proto::crypto::PrivateKey;
use iptun_proto::endpoint::{self, Endpoint, Input, ListenerConfig, Reservation, UdpAddr};
use iptun_proto::engine::{Client, ClientConfig, ClientOutput, Server, ServerConfig, ServerOutput};
use iptun_proto::pool::AddressPool;
use iptun_proto::transport::{PacketList, TunSink};

struct Counting;

thread_local! {
    /// Only the test's own thread counts, into its own counter: the test
    /// harness's threads, and the other tests running at the same time,
    /// allocate when they like (it made this test flaky).
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator, only counting calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.try_with(Cell::get).unwrap_or(false) {
            let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Run `f` and return how many allocations this thread made meanwhile.
fn allocations(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.with(Cell::get);
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    ALLOCATIONS.with(Cell::get) - before
}

fn ipv4_packet(src: [u8; 4], dst: [u8; 4], len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p
}

fn configs() -> (ServerConfig, ClientConfig) {
    let (server_key, client_key) = (PrivateKey::generate(), PrivateKey::generate());
    let pool = AddressPool::new("10.1.0.0/24".parse().unwrap(), None).unwrap();
    let server = ServerConfig::new(server_key.clone(), vec![client_key.public_key()], pool);
    (
        server,
        ClientConfig::new(client_key, server_key.public_key()),
    )
}

#[test]
fn data_path_does_not_allocate() {
    let now = Instant::now();
    let (server_config, client_config) = configs();
    let mut server: Server<SocketAddr> = Server::new(server_config, now);
    let mut client = Client::new(client_config, now, 1);
    let from: SocketAddr = "192.0.2.2:4000".parse().unwrap();
    let (mut a, mut b) = (vec![0u8; 65536], vec![0u8; 65536]);

    let n = client.poll_timers(now, &mut a).unwrap();
    let ServerOutput::Reply(resp) = server.handle_datagram(now, &from, &a[..n], &mut b).unwrap()
    else {
        panic!()
    };
    let resp = resp.to_vec();
    let ClientOutput::Send(confirm) = client.handle_datagram(now, &resp, &mut a).unwrap() else {
        panic!()
    };
    let confirm = confirm.to_vec();
    server
        .handle_datagram(now, &from, &confirm, &mut b)
        .unwrap();
    let me = client.tunnel().unwrap().client_v4.octets();

    let up = ipv4_packet(me, [198, 51, 100, 2], 1400);
    let down = ipv4_packet([198, 51, 100, 2], me, 1400);
    let n = allocations(|| {
        for _ in 0..1000 {
            let n = client.handle_tun_packet(now, &up, &mut a).unwrap();
            assert!(matches!(
                server.handle_datagram(now, &from, &a[..n], &mut b),
                Ok(ServerOutput::Tun(_))
            ));
            let ServerOutput::Send(_, msg) = server.handle_tun_packet(now, &down, &mut b).unwrap()
            else {
                panic!()
            };
            assert!(matches!(
                client.handle_datagram(now, msg, &mut a),
                Ok(ClientOutput::Tun(_))
            ));
        }
    });
    assert_eq!(n, 0, "allocations on the data path");
}

/// A TUN device's write batch of one packet, reused: what a driver with a
/// preallocated batch gives the connection and the endpoint.
struct Slot {
    buf: Vec<u8>,
    written: usize,
}

impl TunSink for Slot {
    fn buffer(&mut self, len: usize) -> Option<&mut [u8]> {
        self.buf.get_mut(..len)
    }

    fn commit(&mut self, _len: usize) {
        self.written += 1;
    }
}

/// One client and the server on UDP, with their drivers' send buffers.
struct Pair {
    conn: Connection,
    endpoint: Endpoint,
    client: UdpAddr,
    server: SocketAddr,
    /// The client's and the server's buffers for sealing TUN packets.
    a: Vec<u8>,
    b: Vec<u8>,
    /// The buffer for `poll_transmit` (the endpoint swaps it for one of
    /// its own, of the message's length: too short to seal into).
    tx: Vec<u8>,
}

impl Pair {
    fn new(now: Instant) -> Self {
        let (server_config, client_config) = configs();
        let server: SocketAddr = "192.0.2.1:3000".parse().unwrap();
        let path = PathConfig::Udp { server };
        Self {
            conn: Connection::new(client_config, vec![path], now, 1),
            endpoint: Endpoint::new(server_config, vec![ListenerConfig::Udp], now),
            client: "192.0.2.2:4000".parse::<SocketAddr>().unwrap().into(),
            server,
            a: vec![0; connection::BUF_LEN],
            b: vec![0; endpoint::BUF_LEN],
            tx: Vec::with_capacity(endpoint::BUF_LEN),
        }
    }

    /// Carry what each side sends to the other until neither sends more;
    /// returns how many datagrams went.
    fn exchange(&mut self, now: Instant, tun: &mut impl TunSink) -> usize {
        let mut moved = 0;
        loop {
            let before = moved;
            while let Some(t) = self.conn.poll_transmit(now, &mut self.tx) {
                let input = Input::Datagram {
                    from: self.client,
                    bytes: &self.tx[..t.len],
                };
                self.endpoint.handle_input(now, 0, input, tun);
                moved += 1;
            }
            while let Some(t) = self.endpoint.poll_transmit(now, &mut self.tx) {
                let from = Remote::Addr(self.server);
                self.conn.handle_input(now, 0, from, &self.tx[..t.len], tun);
                moved += 1;
            }
            if moved == before {
                return moved;
            }
        }
    }

    /// Time passed: both sides' timers, as their drivers run them.
    fn timers(&mut self, now: Instant) {
        if self.conn.poll_timeout().is_some_and(|t| t <= now) {
            self.conn.handle_timeout(now);
        }
        if self.endpoint.poll_timeout().is_some_and(|t| t <= now) {
            self.endpoint.handle_timeout(now);
        }
    }
}

#[test]
fn connection_and_endpoint_data_path_does_not_allocate() {
    let start = Instant::now();
    let mut p = Pair::new(start);
    // The handshake and the key confirmation (allocations allowed).
    let mut list = PacketList::default();
    assert!(p.exchange(start, &mut list) >= 4);
    let Some(Event::Configured(config)) = p.conn.poll_event() else {
        panic!("not configured")
    };
    let me = config.client_v4.octets();
    let up = ipv4_packet(me, [198, 51, 100, 2], 1400);
    let down = ipv4_packet([198, 51, 100, 2], me, 1400);
    let mut tun = Slot {
        buf: vec![0; 2048],
        written: 0,
    };

    // A packet each way every millisecond for a second, with the drivers'
    // whole loop: timers, inputs, and the (empty) transmit queues drained.
    // Every other packet up is reserved and then sealed apart, as the
    // client's loops do outside its lock; every fourth millisecond one
    // more goes up, reserved after that one but sealed and delivered
    // before it: the server takes the two as reordered.
    let mut now = start;
    let mut reordered = 0;
    let n = allocations(|| {
        for i in 0..1000 {
            now += Duration::from_millis(1);
            p.timers(now);
            let t = if i % 2 == 1 {
                let room = p.a.len();
                let reserve = p.conn.reserve_tun_packet(now, 0, &up, room);
                let (first, t) = reserve.expect("reserved");
                if i % 4 == 3 {
                    let reserve = p.conn.reserve_tun_packet(now, 0, &up, room);
                    let (second, t) = reserve.expect("reserved");
                    let len = second.seal(&up, &mut p.b).expect("sealed");
                    assert_eq!(len, t.len);
                    let input = Input::Datagram {
                        from: p.client,
                        bytes: &p.b[..len],
                    };
                    p.endpoint.handle_input(now, 0, input, &mut tun);
                    reordered += 1;
                }
                first.seal(&up, &mut p.a).expect("sealed");
                t
            } else {
                p.conn
                    .handle_tun_packet(now, &up, &mut p.a)
                    .expect("sealed")
            };
            let input = Input::Datagram {
                from: p.client,
                bytes: &p.a[..t.len],
            };
            p.endpoint.handle_input(now, 0, input, &mut tun);
            // Down, likewise: every other packet reserved, sealed apart.
            let len = if i % 2 == 1 {
                let room = p.b.len();
                let Reservation::Udp(reserved, to) =
                    p.endpoint.reserve_tun_packet(now, 0, &down, room)
                else {
                    panic!("not reserved for the client's UDP peer")
                };
                assert_eq!(to, p.client);
                reserved.seal(&down, &mut p.b).expect("sealed")
            } else {
                let t = p.endpoint.handle_tun_packet(now, &down, &mut p.b);
                t.expect("sealed").len
            };
            p.conn
                .handle_input(now, 0, Remote::Addr(p.server), &p.b[..len], &mut tun);
            assert_eq!(p.exchange(now, &mut tun), 0, "nothing else to send");
        }
    });
    assert_eq!(reordered, 250);
    assert_eq!(
        tun.written,
        2000 + reordered,
        "every packet delivered, each way"
    );
    assert_eq!(n, 0, "allocations on the data path");
}
