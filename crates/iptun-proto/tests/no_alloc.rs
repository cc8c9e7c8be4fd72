//! The data path allocates nothing: after the handshake, sealing and opening
//! data messages in both directions must not touch the heap.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use iptun_proto::crypto::PrivateKey;
use iptun_proto::engine::{Client, ClientConfig, ClientOutput, Server, ServerConfig, ServerOutput};
use iptun_proto::pool::AddressPool;

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Only the test's own thread counts: the test harness's threads
    /// allocate when they like (it made this test flaky).
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

// SAFETY: forwards to the system allocator, only counting calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.try_with(Cell::get).unwrap_or(false) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

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

#[test]
fn data_path_does_not_allocate() {
    let now = Instant::now();
    let (server_key, client_key) = (PrivateKey::generate(), PrivateKey::generate());
    let pool = AddressPool::new("10.1.0.0/24".parse().unwrap(), None).unwrap();
    let server_config = ServerConfig::new(server_key.clone(), vec![client_key.public_key()], pool);
    let mut server: Server<SocketAddr> = Server::new(server_config, now);
    let mut client = Client::new(
        ClientConfig::new(client_key, server_key.public_key()),
        now,
        1,
    );
    let from: SocketAddr = "192.0.2.2:4000".parse().unwrap();
    let (mut a, mut b) = (vec![0u8; 65536], vec![0u8; 65536]);

    let n = client.poll_timers(now, &mut a).unwrap();
    let ServerOutput::Send(_, resp) = server.handle_datagram(now, &from, &a[..n], &mut b).unwrap()
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
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    COUNTING.with(|c| c.set(true));
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
    COUNTING.with(|c| c.set(false));
    assert_eq!(
        ALLOCATIONS.load(Ordering::Relaxed) - before,
        0,
        "allocations on the data path"
    );
}
