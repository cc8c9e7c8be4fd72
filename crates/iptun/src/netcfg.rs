//! Host network configuration: addresses, routes, forwarding and NAT.
//!
//! We shell out to iproute2 (`ip`, `-json` where we parse output) and `nft -f -`
//! rather than speak netlink ourselves: the commands are what an operator would
//! type, and their error messages can be shown as they are.

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;

type Action = Box<dyn FnOnce() -> Result<()> + Send>;

/// Cleanup actions recorded as things are changed, run in reverse order by
/// `undo_all` or on drop; failures are logged with `tracing::warn`, never panic.
#[derive(Default)]
pub struct Undo {
    actions: Vec<(String, Action)>,
}

impl Undo {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, what: String, action: impl FnOnce() -> Result<()> + Send + 'static) {
        self.actions.push((what, Box::new(action)));
    }

    /// Runs (and forgets) every recorded action, newest first.
    pub fn undo_all(&mut self) {
        while let Some((what, action)) = self.actions.pop() {
            match action() {
                Ok(()) => tracing::debug!("undone: {what}"),
                Err(e) => tracing::warn!("undo of {what} failed: {e:#}"),
            }
        }
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        self.undo_all()
    }
}

/// Runs `program args`, feeding `stdin` if given; returns stdout, or an error
/// naming the command and carrying its stderr.
fn run<S: AsRef<str>>(program: &str, args: &[S], stdin: Option<&str>) -> Result<String> {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let shown = format!("`{program} {}`", args.join(" "));
    let mut child = Command::new(program)
        .args(&args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {shown}"))?;
    // Dropping the pipe gives the child EOF. A write error (the child quit
    // early) is reported only if the exit status does not explain it.
    let written = match (stdin, child.stdin.take()) {
        (Some(input), Some(mut pipe)) => pipe.write_all(input.as_bytes()),
        _ => Ok(()),
    };
    let out = child
        .wait_with_output()
        .with_context(|| format!("cannot run {shown}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        match err.trim() {
            "" => bail!("{shown} failed with {}", out.status),
            err => bail!("{shown} failed: {err}"),
        }
    }
    written.with_context(|| format!("cannot write to {shown}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip<S: AsRef<str>>(args: &[S]) -> Result<String> {
    run("ip", args, None)
}

/// Set MTU, add addresses (with prefix), bring the link up. (Removing the TUN
/// device itself happens when its fd is closed, so no undo needed for addresses.)
pub fn configure_interface(dev: &str, addrs: &[IpNet], mtu: u16) -> Result<()> {
    ip(&["link", "set", "dev", dev, "mtu", &mtu.to_string()])?;
    for addr in addrs {
        let addr = addr.to_string();
        // `replace` is idempotent; `nodad` makes an IPv6 address usable at once
        // (duplicate detection is pointless on a point-to-point tunnel).
        let mut args = vec!["addr", "replace", addr.as_str(), "dev", dev];
        if addr.contains(':') {
            args.push("nodad");
        }
        ip(&args)?;
    }
    ip(&["link", "set", "dev", dev, "up"])?;
    Ok(())
}

/// Remove every address from `dev` (before applying a changed tunnel config).
pub fn flush_addresses(dev: &str) -> Result<()> {
    ip(&["addr", "flush", "dev", dev]).map(drop)
}

/// Adds `ip route add DST <via...>` and records its removal.
fn add_route_via(undo: &mut Undo, dst: IpNet, via: &[String]) -> Result<()> {
    let dst = dst.to_string();
    let mut args = vec!["route".to_string(), "add".to_string(), dst.clone()];
    args.extend_from_slice(via);
    ip(&args)?;
    args[1] = "del".to_string();
    undo.push(format!("route {dst} {}", via.join(" ")), move || {
        ip(&args).map(drop)
    });
    Ok(())
}

/// Route `dst` through `dev`; records removal in undo.
pub fn add_route(undo: &mut Undo, dst: IpNet, dev: &str) -> Result<()> {
    add_route_via(undo, dst, &["dev".to_string(), dev.to_string()])
}

/// The MTU of the interface the kernel uses to reach `addr` (for sizing the
/// tunnel to its carrier); `None` if it cannot be told.
pub fn path_mtu(addr: IpAddr) -> Option<u16> {
    let path = parse_route_get(&ip(&["-json", "route", "get", &addr.to_string()]).ok()?).ok()?;
    let mtu = std::fs::read_to_string(format!("/sys/class/net/{}/mtu", path.dev)).ok()?;
    mtu.trim().parse().ok()
}

/// The path the kernel currently uses to reach an address.
#[derive(Debug, PartialEq, Eq)]
struct CurrentPath {
    /// `ip route` arguments after the destination: `[via GW] dev DEV`.
    nexthop: Vec<String>,
    dev: String,
    /// The address is our own: no route is needed (the local table wins).
    local: bool,
}

/// Parses the output of `ip -json route get ADDR`.
fn parse_route_get(json: &str) -> Result<CurrentPath> {
    #[derive(Deserialize)]
    struct Via {
        family: String,
        host: String,
    }
    #[derive(Deserialize)]
    struct Entry {
        #[serde(rename = "type")]
        kind: Option<String>,
        gateway: Option<String>,
        // An IPv4 route via an IPv6 gateway (RFC 5549) has `via` instead.
        via: Option<Via>,
        dev: String,
    }
    let entries: Vec<Entry> =
        serde_json::from_str(json).context("cannot parse `ip -json route get`")?;
    let Some(e) = entries.into_iter().next() else {
        bail!("`ip -json route get` returned no route");
    };
    let mut nexthop = Vec::new();
    match (e.gateway, e.via) {
        (Some(gw), _) => nexthop.extend(["via".to_string(), gw]),
        (None, Some(v)) => nexthop.extend(["via".to_string(), v.family, v.host]),
        (None, None) => {} // on-link
    }
    nexthop.extend(["dev".to_string(), e.dev.clone()]);
    Ok(CurrentPath {
        nexthop,
        dev: e.dev,
        local: e.kind.as_deref() == Some("local"),
    })
}

/// For `--route default`: first pin a host route (/32 or /128) for each
/// address in `underlay` (the server, resolvers, a proxy: whatever the
/// tunnel's own paths talk to) via the route it uses now, then route
/// 0.0.0.0/1 and 128.0.0.0/1 (and ::/1 and 8000::/1 when `ipv6` is true)
/// through `dev`. All recorded in undo.
pub fn route_default(undo: &mut Undo, dev: &str, underlay: &[IpAddr], ipv6: bool) -> Result<()> {
    let mut pinned = Vec::new();
    for &server in underlay {
        if pinned.contains(&server) {
            continue;
        }
        pinned.push(server);
        pin_host(undo, dev, server)?;
    }
    // Two halves are more specific than any default route, which stays untouched.
    let mut halves = vec!["0.0.0.0/1", "128.0.0.0/1"];
    if ipv6 {
        halves.extend(["::/1", "8000::/1"]);
    }
    for half in halves {
        add_route(undo, half.parse().expect("valid literal"), dev)?;
    }
    Ok(())
}

/// Keep `server` on the route it uses now (a host route), so traffic to it
/// does not enter the tunnel.
fn pin_host(undo: &mut Undo, dev: &str, server: IpAddr) -> Result<()> {
    let path = parse_route_get(&ip(&["-json", "route", "get", &server.to_string()])?)?;
    if path.dev == dev {
        bail!("{server} is already routed through {dev}; cannot keep it outside the tunnel");
    }
    if !path.local {
        match add_route_via(undo, IpNet::from(server), &path.nexthop) {
            Ok(()) => {}
            // Left behind by a run that was killed: it is the route we want.
            Err(e) if format!("{e:#}").contains("File exists") => {
                tracing::info!("host route for {server} already present, keeping it")
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sets a sysctl through /proc/sys; if it changed, records restoring the old value.
pub fn set_sysctl(undo: &mut Undo, path: &'static str, value: &str) -> Result<()> {
    let old = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
    let old = old.trim().to_string();
    if old == value {
        return Ok(()); // not ours to restore
    }
    std::fs::write(path, value).with_context(|| format!("cannot write {value} to {path}"))?;
    undo.push(format!("{path}={value}"), move || {
        std::fs::write(path, &old).with_context(|| format!("cannot write {old} to {path}"))
    });
    Ok(())
}

/// The nftables script for `enable_nat`: replaces any stale table of that name.
pub fn render_nat_ruleset(
    table: &str,
    dev: &str,
    pool4: Ipv4Net,
    pool6: Option<Ipv6Net>,
) -> String {
    let mut masq = format!(
        "\t\tip saddr {} oifname != \"{dev}\" masquerade\n",
        pool4.trunc()
    );
    if let Some(p6) = pool6 {
        masq += &format!(
            "\t\tip6 saddr {} oifname != \"{dev}\" masquerade\n",
            p6.trunc()
        );
    }
    // nft 1.0.6 has no `destroy`: adding first makes the delete always succeed.
    // The accepts only help against our own policy; a drop in another table
    // (e.g. Docker's FORWARD) still drops.
    format!(
        "add table inet {table}\n\
         delete table inet {table}\n\
         table inet {table} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         {masq}\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"{dev}\" accept\n\
         \t\toifname \"{dev}\" accept\n\
         \t}}\n\
         }}\n"
    )
}

/// For `server --nat`: enables forwarding (restored in undo) and installs our
/// own nftables table `iptun_<dev>` masquerading the pools (deleted in undo).
pub fn enable_nat(
    undo: &mut Undo,
    dev: &str,
    pool4: Ipv4Net,
    pool6: Option<Ipv6Net>,
) -> Result<()> {
    // The name goes unquoted into the table name and quoted into rules.
    if dev.is_empty()
        || !dev
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    {
        bail!("interface name {dev:?} is not usable in an nftables table name");
    }
    set_sysctl(undo, "/proc/sys/net/ipv4/ip_forward", "1")?;
    if pool6.is_some() {
        // Note: this makes the kernel ignore router advertisements (accept_ra=1).
        set_sysctl(undo, "/proc/sys/net/ipv6/conf/all/forwarding", "1")?;
    }
    let table = format!("iptun_{dev}");
    run(
        "nft",
        &["-f", "-"],
        Some(&render_nat_ruleset(&table, dev, pool4, pool6)),
    )?;
    undo.push(format!("nftables table inet {table}"), move || {
        run("nft", &["delete", "table", "inet", &table], None).map(drop)
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nat_ruleset_v4_and_v6() {
        let got = render_nat_ruleset(
            "iptun_tun0",
            "tun0",
            "10.1.0.1/24".parse().unwrap(),
            Some("fd00:1::1/64".parse().unwrap()),
        );
        let want = r#"add table inet iptun_tun0
delete table inet iptun_tun0
table inet iptun_tun0 {
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		ip saddr 10.1.0.0/24 oifname != "tun0" masquerade
		ip6 saddr fd00:1::/64 oifname != "tun0" masquerade
	}
	chain forward {
		type filter hook forward priority filter; policy accept;
		iifname "tun0" accept
		oifname "tun0" accept
	}
}
"#;
        assert_eq!(got, want);
    }

    #[test]
    fn nat_ruleset_v4_only() {
        let got = render_nat_ruleset("t", "d", "10.1.0.0/24".parse().unwrap(), None);
        assert!(got.contains("ip saddr 10.1.0.0/24 oifname != \"d\" masquerade\n\t}"));
        assert!(!got.contains("ip6"));
    }

    #[test]
    fn route_get_via_gateway() {
        let json = r#"[{"dst":"203.0.113.5","gateway":"192.0.2.1","dev":"e0","prefsrc":"192.0.2.2","flags":[],"uid":0,"cache":[]}]"#;
        let p = parse_route_get(json).unwrap();
        assert_eq!(p.nexthop, ["via", "192.0.2.1", "dev", "e0"]);
        assert_eq!(p.dev, "e0");
        assert!(!p.local);
    }

    #[test]
    fn route_get_on_link_v6() {
        let json = r#"[{"dst":"2001:db8::9","from":"::","dev":"e0","protocol":"kernel","prefsrc":"2001:db8::2","metric":256,"flags":[],"pref":"medium"}]"#;
        assert_eq!(parse_route_get(json).unwrap().nexthop, ["dev", "e0"]);
    }

    #[test]
    fn route_get_v6_link_local_gateway() {
        let json = r#"[{"dst":"2001:db8:1::5","from":"::","gateway":"fe80::1","dev":"e0","prefsrc":"2001:db8::2","metric":1024,"flags":[],"pref":"medium"}]"#;
        assert_eq!(
            parse_route_get(json).unwrap().nexthop,
            ["via", "fe80::1", "dev", "e0"]
        );
    }

    #[test]
    fn route_get_v4_via_v6() {
        let json = r#"[{"dst":"203.0.113.5","via":{"family":"inet6","host":"fe80::1"},"dev":"e0","flags":[],"uid":0,"cache":[]}]"#;
        assert_eq!(
            parse_route_get(json).unwrap().nexthop,
            ["via", "inet6", "fe80::1", "dev", "e0"]
        );
    }

    #[test]
    fn route_get_local() {
        let json = r#"[{"type":"local","dst":"127.0.0.1","dev":"lo","prefsrc":"127.0.0.1","flags":[],"uid":0,"cache":["local"]}]"#;
        assert!(parse_route_get(json).unwrap().local);
    }

    #[test]
    fn route_get_garbage() {
        assert!(parse_route_get("[]").is_err());
        assert!(parse_route_get("nope").is_err());
    }

    #[test]
    fn undo_runs_in_reverse_and_survives_errors() {
        use std::sync::{Arc, Mutex};
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut undo = Undo::new();
        for i in 0..3 {
            let log = log.clone();
            undo.push(format!("step {i}"), move || {
                log.lock().unwrap().push(i);
                if i == 1 { bail!("boom") } else { Ok(()) }
            });
        }
        drop(undo);
        assert_eq!(*log.lock().unwrap(), [2, 1, 0]);
    }
}
