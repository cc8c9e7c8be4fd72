//! Checks the namespace harness itself (no iptun involved).

mod common;

use std::time::Duration;

use common::*;

#[test]
fn topology_pings_transfers_and_cleans_up() {
    require_root();
    let prefix = ns_prefix("hself");
    {
        let topo = Topology::new("hself");
        assert_eq!(list_netns(&prefix).len(), 3);
        assert!(
            ping(topo.client(), topo.server_addr(), 2),
            "client -> server"
        );
        assert!(ping(&topo.server, TARGET_ADDR, 2), "server -> target");
        // No forwarding and no routes: the target is unreachable from the client.
        assert!(
            !ping(topo.client(), TARGET_ADDR, 1),
            "client -> target without tunnel"
        );

        let (sent, received) =
            tcp_transfer_sha256(&topo.server, &topo.target, TARGET_ADDR, 1 << 20);
        assert_eq!(sent, received);
        assert!(sent.ends_with(" 1048576"), "{sent}");
    }
    assert_eq!(list_netns(&prefix), Vec::<String>::new());
}

#[test]
fn second_client_has_its_own_link() {
    require_root();
    let prefix = ns_prefix("hcli2");
    {
        let mut topo = Topology::new("hcli2");
        let c1 = topo.add_client(1);
        assert_eq!(c1.server_addr, "203.0.113.1");
        assert!(ping(&topo.clients[1].ns, "203.0.113.1", 1));
        assert!(ping(&topo.clients[0].ns, "192.0.2.1", 1));
        // Clients cannot reach each other directly.
        assert!(!ping(&topo.clients[1].ns, "192.0.2.2", 1));
    }
    assert!(list_netns(&prefix).is_empty());
}

#[test]
fn cleanup_on_panic_and_stale_namespace() {
    require_root();
    let prefix = ns_prefix("hpanic");
    let result = std::panic::catch_unwind(|| {
        let topo = Topology::new("hpanic");
        let _sleeper = topo.server.spawn(&["sleep", "600"]);
        panic!("deliberate");
    });
    assert!(result.is_err());
    assert!(
        list_netns(&prefix).is_empty(),
        "left: {:?}",
        list_netns(&prefix)
    );

    // A namespace left by a crashed run (with a process in it) is replaced.
    let stale = Netns::new("hstale", "x");
    let mut sleeper = stale.spawn(&["sleep", "600"]);
    // Until `ip netns exec` has entered the namespace, nothing can find it there.
    wait_until(Duration::from_secs(5), "sleeper in namespace", || {
        stale.pids().contains(&sleeper.pid())
    });
    std::mem::forget(stale);
    let fresh = Netns::new("hstale", "x");
    assert!(
        sleeper.wait_timeout(Duration::from_secs(5)).is_some(),
        "stale process not killed"
    );
    fresh.exec_ok(&["true"]);
    drop(fresh);
    assert!(list_netns(&ns_prefix("hstale")).is_empty());
}

#[test]
fn proc_log_and_stop() {
    require_root();
    let ns = Netns::new("hproc", "x");
    let mut p = ns.spawn(&[
        "sh",
        "-c",
        "echo to-stderr >&2; echo to-stdout; exec sleep 600",
    ]);
    wait_until(Duration::from_secs(5), "both lines in the log", || {
        let log = p.log();
        log.contains("to-stderr") && log.contains("to-stdout")
    });
    let status = p.stop(Duration::from_secs(5));
    assert!(!status.success());
}
