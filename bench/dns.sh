#!/usr/bin/env bash
# bench/dns.sh - throughput and RTT of iptun over DNS, compared in one run with
# the raw routed path and with iodine (IP over DNS), each tunnel both directly
# to its server and through a recursive resolver (unbound), each way (up:
# client -> server, down: iperf3 -R); iptun with DNS over TLS and DNS over
# HTTPS to the same unbound, and through two unbound instances at once.
#
# Usage (as root):
#   bench/dns.sh                       # raw, iodine (2 paths), iptun (2 paths), DoT, DoH, two resolvers
#   bench/dns.sh --only raw,iodine     # any subset of: raw,iodine,iptun,dot,doh,two
#
# Environment:
#   IPTUN=path     iptun binary (default: <repo>/target/release/iptun; built
#                  with `cargo build --release -p iptun` when missing)
#   RUNS=n         measure each path n times, keep the best (default 1)
#   DURATION=s     iperf3 seconds per measurement (default 10)
#   PINGS=n        pings per measurement, 0.2 s apart (default 20)
#   PAUSE=s        idle seconds between measurements (default 3)
#   IODINE_OPTS    extra flags for the iodine client (default none; it always
#                  gets -f -r -P: foreground, no raw UDP mode, password)
#   JSON=file      also write the results there as JSON
#   KEEP_LOGS=1    keep the temp dir with logs (it is kept on failure anyway)
#
# Topology (three namespaces, routed, no NAT):
#   iptbd-c 192.0.2.2 <-veth-> 192.0.2.1 iptbd-r 203.0.113.1 <-veth-> 203.0.113.2 iptbd-s
# iptbd-r forwards between its two links (raw path, "direct" tunnels) and runs
# unbound on 192.0.2.1:53 with a stub zone t.example.com -> 203.0.113.2@53
# ("via unbound" tunnels; query name minimisation, case randomisation, EDNS
# 1232, and two source addresses toward the server, 203.0.113.1 and .3), and for the dot and doh rows also on 192.0.2.1:853
# (DNS over TLS) and 192.0.2.1:443 (DNS over HTTPS, HTTP/2, /dns-query) with
# a certificate from a CA made for the run (openssl); the client trusts that
# CA (--tls-ca). For the two-resolver row a second unbound, configured alike,
# listens on 192.0.2.3 in the same namespace. iperf3 -s and the tunnel servers run in iptbd-s,
# the clients in iptbd-c (client -> server direction). Nothing leaves the
# namespaces.
set -euo pipefail

PREFIX=iptbd
PATHS=raw,iodine,iptun,dot,doh,two
ALIASES=(iptun-dns=iptun iptun-dot=dot iptun-doh=doh)
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"   # namespaces, measuring, iptun, report

export PATH="$PATH:/usr/sbin:/sbin"   # unbound, iodined

NS_R=$PREFIX-r                 # the resolver namespace (lib.sh knows NS_C, NS_S)
VETH_CR=$PREFIX-c0             # client's end of client <-> resolver
VETH_RC=$PREFIX-r0             # resolver's end of client <-> resolver
VETH_RS=$PREFIX-r1             # resolver's end of resolver <-> server
VETH_SR=$PREFIX-s0             # server's end of resolver <-> server
ADDR_C=192.0.2.2
ADDR_RC=192.0.2.1              # resolver, client side: unbound listens here
ADDR_RC2=192.0.2.3             # the second unbound (two-resolver row)
ADDR_RS=203.0.113.1            # resolver, server side
ADDR_RS2=203.0.113.3           # resolver, server side: its second source address
ADDR_S=203.0.113.2             # the tunnel servers' DNS address
DOMAIN=t.example.com

IODINE_PASS=iptbench-dns       # nothing leaves the namespaces
IODINE_NET_S=10.53.0.1
IODINE_TUN=dns0
IODINE_OPTS=${IODINE_OPTS:-}

declare -A REF=()              # path -> the iodine path it is compared with
declare -A SERVFAILS=()        # path -> SERVFAILs unbound logged while measuring it
FLOORS_JSON=""

teardown_hook() { # the resolver namespace, which lib.sh's teardown doesn't know
    if ip netns list | grep -qw "$NS_R"; then
        kill_ns_procs "$NS_R"
        ip netns del "$NS_R" 2>/dev/null || true
    fi
}

parse_args "$@"
bench_start

# ---------------------------------------------------------------- tools
if want iodine; then
    ensure_apt iodined iodine
fi
if want iodine || want iptun || want dot || want doh || want two; then
    ensure_apt unbound unbound
fi
if want dot || want doh; then
    ensure_apt openssl openssl
fi
if want iptun || want dot || want doh || want two; then
    # a binary without the DNS transport fails at once: its server's log (printed
    # on exit) says "the dns transport is not available in this version"
    iptun_setup
fi

# ---------------------------------------------------------------- topology
netns3_up() {
    local ns
    teardown   # stale namespaces / processes from an earlier run (hook: NS_R too)
    for ns in "$NS_C" "$NS_R" "$NS_S"; do
        ip netns add "$ns"
        ip -n "$ns" link set lo up
    done
    ip link add "$VETH_CR" netns "$NS_C" type veth peer name "$VETH_RC" netns "$NS_R"
    ip link add "$VETH_RS" netns "$NS_R" type veth peer name "$VETH_SR" netns "$NS_S"
    ip -n "$NS_C" addr add $ADDR_C/24 dev "$VETH_CR"
    ip -n "$NS_R" addr add $ADDR_RC/24 dev "$VETH_RC"
    ip -n "$NS_R" addr add $ADDR_RC2/24 dev "$VETH_RC"
    ip -n "$NS_R" addr add $ADDR_RS/24 dev "$VETH_RS"
    ip -n "$NS_R" addr add $ADDR_RS2/24 dev "$VETH_RS"
    ip -n "$NS_S" addr add $ADDR_S/24 dev "$VETH_SR"
    ip -n "$NS_C" link set "$VETH_CR" up
    ip -n "$NS_R" link set "$VETH_RC" up
    ip -n "$NS_R" link set "$VETH_RS" up
    ip -n "$NS_S" link set "$VETH_SR" up
    # the resolver namespace also routes (raw path, direct tunnels)
    ip netns exec "$NS_R" sysctl -qw net.ipv4.ip_forward=1
    ip -n "$NS_C" route add 203.0.113.0/24 via $ADDR_RC
    ip -n "$NS_S" route add 192.0.2.0/24 via $ADDR_RS

    bg "$NS_S" "$TMP/iperf3-server.log" iperf3 -s
    wait_listen "$NS_S" 5201 "$BG_PID" "iperf3 -s"
    ip netns exec "$NS_C" ping -c 1 -W 2 $ADDR_RC >/dev/null || die "$ADDR_C -> $ADDR_RC not reachable"
    ip netns exec "$NS_R" ping -c 1 -W 2 $ADDR_S >/dev/null || die "$ADDR_RS -> $ADDR_S not reachable"
    ip netns exec "$NS_C" ping -c 1 -W 2 $ADDR_S >/dev/null || die "$ADDR_C -> $ADDR_S not routed"
}

# Our own unbound in the resolver namespace (never the system's service), as in
# crates/iptun/tests/common/unbound.rs: every name but the tunnel domain is
# refused before recursion, the domain goes to the stub. No per-query logging
# (it would cost CPU in a throughput test).
# With the dot or doh rows the first serves DoT on 853 and DoH on 443 too.
# Sets UNBOUND (the first) or UNBOUND2 to its pid; logs to $TMP/NAME.log.
unbound_up() { # name address
    local name=$1 addr=$2 d="$TMP/$1" tls=""
    mkdir -p "$d"
    if [[ $name == unbound ]] && { want dot || want doh; }; then
        test_pki "$d"
        tls="    interface: $ADDR_RC@853
    interface: $ADDR_RC@443
    tls-port: 853
    https-port: 443
    http-endpoint: \"/dns-query\"
    tls-service-pem: \"$d/server.pem\"
    tls-service-key: \"$d/server.key\"
"
    fi
    cat >"$d/unbound.conf" <<EOF
# Written by bench/dns.sh: our own unbound, not the system's.
server:
    interface: $addr
    port: 53
${tls}    interface-automatic: no
    access-control: 0.0.0.0/0 allow
    access-control: ::/0 allow
    do-daemonize: no
    chroot: ""
    username: ""
    directory: "$d"
    pidfile: "$d/unbound.pid"
    use-syslog: no
    logfile: ""
    log-time-ascii: yes
    verbosity: 1
    log-servfail: yes
    num-threads: 1
    so-reuseport: no
    module-config: "iterator"
    domain-insecure: "$DOMAIN"
    do-not-query-localhost: no
    harden-referral-path: no
    harden-below-nxdomain: no
    infra-keep-probing: yes
    infra-host-ttl: 30
    # As a resolver is run in the wild (and as issue 11 measured): query
    # names minimised and case-randomised, two source addresses, EDNS 1232.
    qname-minimisation: yes
    use-caps-for-id: yes
    outgoing-interface: $ADDR_RS
    outgoing-interface: $ADDR_RS2
    edns-buffer-size: 1232
    # Its counters in its log every 5 s (requests dropped for a full list,
    # among others): what limits a tunnel through it.
    statistics-interval: 5
    statistics-cumulative: no
    extended-statistics: yes
    local-zone: "." refuse
    local-zone: "$DOMAIN." transparent

stub-zone:
    name: "$DOMAIN."
    stub-addr: $ADDR_S@53

remote-control:
    control-enable: no
EOF
    unbound-checkconf "$d/unbound.conf" >"$TMP/$name-checkconf.log" 2>&1 \
        || { cat "$TMP/$name-checkconf.log" >&2; die "unbound-checkconf rejects $d/unbound.conf"; }
    bg "$NS_R" "$TMP/$name.log" unbound -d -c "$d/unbound.conf"
    if [[ $name == unbound ]]; then UNBOUND=$BG_PID; else UNBOUND2=$BG_PID; fi
    for _ in $(seq 100); do
        grep -q 'start of service' "$TMP/$name.log" && return 0
        kill -0 "$BG_PID" 2>/dev/null || die "$name exited"
        sleep 0.1
    done
    die "$name: no 'start of service' within 10 s"
}

# A CA for the run and unbound's certificate for $ADDR_RC signed by it (P-256,
# as crates/iptun/tests/common/http.rs makes them): DIR/ca.pem for the client.
test_pki() { # dir
    local d=$1
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$d/ca.key" -out "$d/ca.pem" -days 2 -subj "/CN=iptun bench CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        >"$TMP/openssl.log" 2>&1 || { cat "$TMP/openssl.log" >&2; die "openssl: CA"; }
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$d/server.key" -out "$d/server.csr" -subj "/CN=$ADDR_RC" \
        >>"$TMP/openssl.log" 2>&1 || { cat "$TMP/openssl.log" >&2; die "openssl: key"; }
    printf 'subjectAltName=IP:%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' \
        "$ADDR_RC" >"$d/server.ext"
    openssl x509 -req -in "$d/server.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
        -out "$d/server.pem" -days 2 -extfile "$d/server.ext" \
        >>"$TMP/openssl.log" 2>&1 || { cat "$TMP/openssl.log" >&2; die "openssl: certificate"; }
}

# ---------------------------------------------------------------- measuring
# iperf3_mbit with 3 decimals and more time to finish: through a DNS tunnel,
# the end-of-test messages queue behind seconds of data.
iperf3_mbit3() { # ns dst tag [iperf3 args] -> Mbit/s received
    local ns=$1 dst=$2 js="$TMP/iperf3-$3-$RUN.json"; shift 3
    timeout $((DURATION + 90)) ip netns exec "$ns" iperf3 -c "$dst" -t "$DURATION" -J "$@" >"$js" 2>&1 \
        || { cat "$js" >&2; return 1; }
    python3 - "$js" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
if "error" in d:
    sys.exit("iperf3: " + d["error"])
print("%.3f" % (d["end"]["sum_received"]["bits_per_second"] / 1e6))
EOF
}

# SERVFAILs unbound has logged so far: each is a query the tunnel server did
# not answer in time (unbound's upstream timeout); the client gets SERVFAIL
# and the tunnel loses what that query or its answer carried.
servfails() {
    local n=0 f
    for f in "$TMP"/unbound.log "$TMP"/unbound2.log; do
        [[ -f $f ]] && n=$((n + $(grep -c 'SERVFAIL' "$f" || true)))
    done
    echo $n
}
measure_dns() { # name rtt-cmd mbit-cmd: measure, plus unbound's SERVFAILs meanwhile
    local before
    before=$(servfails)
    measure "$@"
    SERVFAILS[$1]=$(($(servfails) - before))
    [[ ${SERVFAILS[$1]} -eq 0 ]] || log "$1: unbound answered ${SERVFAILS[$1]} queries with SERVFAIL (upstream timeout)"
}

# The first packets through a fresh tunnel may be lost; give it a few tries.
tunnel_ping() { # dst what
    ip netns exec "$NS_C" ping -c 5 -i 0.2 -W 3 "$1" >/dev/null 2>&1 || \
        ip netns exec "$NS_C" ping -c 2 -W 5 "$1" >/dev/null || die "$2: no ping through tunnel"
}

measure_raw3() {
    pause
    log "raw: $ADDR_C -> $ADDR_S, routed through $NS_R"
    measure "raw (routed)" "ping_avg $NS_C $ADDR_S" "iperf3_mbit3 $NS_C $ADDR_S raw"
}

# iodined in the server namespace, iodine in the client namespace asking
# NAMESERVER (the server itself, or unbound); -r: DNS only, never raw UDP.
measure_iodine() { # name tag nameserver
    local name=$1 tag=$2 ns_addr=$3 srv cli m
    pause
    log "$name: $IODINE_TUN -> $IODINE_NET_S, queries to $ns_addr for $DOMAIN"
    # -c: no check of the client's IP/port (through a resolver they vary)
    bg "$NS_S" "$TMP/iodined-$tag.log" iodined -f -c -P "$IODINE_PASS" -l $ADDR_S $IODINE_NET_S $DOMAIN
    srv=$BG_PID
    wait_ipv4 "$NS_S" $IODINE_TUN 10 $srv || die "iodined: no IPv4 on $IODINE_TUN within 10 s$(alive $srv)"
    for _ in $(seq 50); do
        ip netns exec "$NS_S" ss -lun 2>/dev/null | grep -q "$ADDR_S:53 " && break
        sleep 0.1
    done
    # shellcheck disable=SC2086   # IODINE_OPTS: words
    bg "$NS_C" "$TMP/iodine-$tag.log" iodine -f -r $IODINE_OPTS -P "$IODINE_PASS" "$ns_addr" $DOMAIN
    cli=$BG_PID
    # login, then probing the query type, encoding and fragment size
    wait_ipv4 "$NS_C" $IODINE_TUN 30 $cli || die "iodine: no IPv4 on $IODINE_TUN within 30 s$(alive $cli)"
    log "iodine client address: $(ip -n "$NS_C" -4 -o addr show dev $IODINE_TUN | awk '{print $4}'), mtu $(ip -n "$NS_C" -o link show dev $IODINE_TUN | sed -n 's/.* mtu \([0-9]*\).*/\1/p')"
    # what it negotiated (the log is complete once "transmitting data" is in)
    for _ in $(seq 100); do grep -q 'transmitting data' "$TMP/iodine-$tag.log" && break; sleep 0.1; done
    grep -iE 'using dns type|switching|fragment size|raw' "$TMP/iodine-$tag.log" | sed 's/^/    /' >&2 || true
    if [[ $tag == unbound ]] && ! ip netns exec "$NS_C" ping -c 5 -i 0.2 -W 3 $IODINE_NET_S >/dev/null 2>&1; then
        # iodined answers a repeated query with other data, and unbound's
        # case-randomisation (use-caps-for-id) fallback repeats queries and
        # wants the same reply: SERVFAIL, "0x20 failed, then got different
        # replies in fallback".
        log "$name: no ping through the tunnel; unbound: $(grep -c '0x20 failed' "$TMP/unbound.log" || true) SERVFAILs for 0x20 fallback replies that differ: not measured"
        stop_pids $cli $srv
        return 0
    fi
    tunnel_ping $IODINE_NET_S "$name"
    # Through the case-randomising unbound, iodine may also stall later
    # (same cause): logged, not the end of the run.
    local may_fail=0
    if [[ $tag == unbound ]]; then m=measure_dns may_fail=1; else m=measure; fi
    MAY_FAIL=$may_fail "$m" "$name" "ping_avg $NS_C $IODINE_NET_S" "iperf3_mbit3 $NS_C $IODINE_NET_S iodine-$tag"
    sleep "$PAUSE"
    MAY_FAIL=$may_fail "$m" "$name (down)" - "iperf3_mbit3 $NS_C $IODINE_NET_S iodine-$tag-down -R"
    if ! kill -0 $srv 2>/dev/null || ! kill -0 $cli 2>/dev/null; then
        [[ $may_fail == 1 ]] || die "iodine exited during the measurement"
        log "$name: iodine exited during the measurement ($(tail -1 "$TMP/iodine-$tag.log"))"
    fi
    stop_pids $cli $srv
}

# iptun over DNS: the server answers for DOMAIN on ADDR_S:53; the client asks
# RESOLVER (the server itself, or unbound: plain, tls://... or https://...),
# with more client flags after it.
measure_iptun_dns() { # name tag resolver [client flags]
    local name=$1 tag=$2 resolver=$3 m
    shift 3
    pause
    log "$name: client -> $IPTUN_ADDR_S over dns://$DOMAIN?resolver=$resolver ($IPTUN)"
    bg "$NS_S" "$TMP/iptun-$tag-server.log" "$IPTUN" server --private-key "$TMP/iptun-s.key" \
        --allow "$(cat "$TMP/iptun-c.pub")" --listen "dns://$ADDR_S:53?domain=$DOMAIN" --tun $IPTUN_TUN
    IT_S=$BG_PID
    wait_ipv4 "$NS_S" $IPTUN_TUN 10 $IT_S || die "iptun server: no IPv4 on $IPTUN_TUN within 10 s$(alive $IT_S)"
    bg "$NS_C" "$TMP/iptun-$tag-client.log" "$IPTUN" client --private-key "$TMP/iptun-c.key" \
        --server-key "$(cat "$TMP/iptun-s.pub")" --server "dns://$DOMAIN?resolver=$resolver" --tun $IPTUN_TUN "$@"
    IT_C=$BG_PID
    wait_ipv4 "$NS_C" $IPTUN_TUN 30 $IT_C || die "iptun client: no IPv4 on $IPTUN_TUN within 30 s$(alive $IT_C)"
    log "iptun client address: $(ip -n "$NS_C" -4 -o addr show dev $IPTUN_TUN | awk '{print $4}'), mtu $(ip -n "$NS_C" -o link show dev $IPTUN_TUN | sed -n 's/.* mtu \([0-9]*\).*/\1/p')"
    tunnel_ping $IPTUN_ADDR_S "$name"
    if [[ $tag != direct ]]; then m=measure_dns; else m=measure; fi
    "$m" "$name" "ping_avg $NS_C $IPTUN_ADDR_S" "iperf3_mbit3 $NS_C $IPTUN_ADDR_S iptun-$tag"
    iptun_dns_status "$tag-up"
    sleep "$PAUSE"
    "$m" "$name (down)" - "iperf3_mbit3 $NS_C $IPTUN_ADDR_S iptun-$tag-down -R"
    iptun_dns_status "$tag-down"
    iptun_down
}

# Both ends' status (JSON) after a measurement, for the kept logs: the
# client's path (window, rate, losses) and the server's DNS counters, which
# are cumulative (the down file includes the up measurement).
iptun_dns_status() { # label
    ip netns exec "$NS_C" "$IPTUN" status --json >"$TMP/status-$1-client.json" 2>&1 || true
    ip netns exec "$NS_S" "$IPTUN" status --json >"$TMP/status-$1-server.json" 2>&1 || true
}

netns3_up
if want iodine || want iptun || want dot || want doh || want two; then unbound_up unbound $ADDR_RC; fi
if want two; then unbound_up unbound2 $ADDR_RC2; fi

# 1. raw, routed through the resolver namespace (no DNS)
if want raw; then measure_raw3; fi

# 2. iodine, directly and through unbound
if want iodine; then
    measure_iodine "iodine direct" direct $ADDR_S
    measure_iodine "iodine via unbound" unbound $ADDR_RC
fi

# 3. iptun over DNS, directly and through unbound
if want iptun; then
    measure_iptun_dns "iptun-dns direct" direct "$ADDR_S:53"
    REF["iptun-dns direct"]="iodine direct"
    measure_iptun_dns "iptun-dns via unbound" unbound "$ADDR_RC"
    REF["iptun-dns via unbound"]="iodine via unbound"
fi
# 4. iptun over DNS over TLS and over HTTPS to unbound (the same resolver and
# stub: only the client's hop changes)
if want dot; then
    measure_iptun_dns "iptun-dot via unbound" dot "tls://$ADDR_RC" --tls-ca "$TMP/unbound/ca.pem"
    REF["iptun-dot via unbound"]="iodine via unbound"
fi
if want doh; then
    measure_iptun_dns "iptun-doh via unbound" doh "https://$ADDR_RC/dns-query" --tls-ca "$TMP/unbound/ca.pem"
    REF["iptun-doh via unbound"]="iodine via unbound"
fi
# 5. iptun through two resolvers at once (queries spread by what each carries)
if want two; then
    measure_iptun_dns "iptun-dns via 2 unbounds" two "$ADDR_RC&resolver=$ADDR_RC2"
    REF["iptun-dns via 2 unbounds"]="iodine via unbound"
fi
REF["iodine direct"]="iodine direct"
REF["iodine via unbound"]="iodine via unbound"
# each (down) row is compared with iodine's (down) row over the same route
for n in "${!REF[@]}"; do REF["$n (down)"]="${REF[$n]} (down)"; done

if [[ -n ${UNBOUND:-} ]]; then
    kill -0 "$UNBOUND" 2>/dev/null || die "unbound exited during the measurements"
    stop_pids "$UNBOUND"
fi
if [[ -n ${UNBOUND2:-} ]]; then
    kill -0 "$UNBOUND2" 2>/dev/null || die "unbound2 exited during the measurements"
    stop_pids "$UNBOUND2"
fi

# ---------------------------------------------------------------- report
# Mbit/s with 3 decimals, rtt, and Mbit/s divided by the iodine path's over the
# same route (direct vs direct, via unbound vs via unbound).
print_dns_table() {
    local n r ref
    echo
    printf "%-22s %10s %9s %10s %9s\n" path Mbit/s rtt_ms vs_iodine servfail
    for n in "${ORDER[@]}"; do
        r=${RTT[$n]}
        [[ $r == - ]] || r=$(awk -v r="$r" 'BEGIN{printf "%.3f", r}')
        ref=${REF[$n]:-}
        [[ -n $ref ]] || ref="(none)"
        printf "%-22s %10s %9s %10s %9s\n" "$n" "$(awk -v m="${MBIT[$n]}" 'BEGIN{printf "%.3f", m}')" "$r" \
            "$(awk -v a="${MBIT[$n]}" -v b="${MBIT[$ref]:-}" \
                'BEGIN{ if (b == "" || b + 0 == 0) print "-"; else printf "%.2f", a / b }')" \
            "${SERVFAILS[$n]:--}"
    done
}
print_dns_table

floor() { # label json-key value base factor: prints PASS/FAIL, adds to FLOORS_JSON
    if [[ -z $3 || -z $4 ]]; then
        echo "  $1: n/a (path not measured)"
        return
    fi
    awk -v l="$1" -v a="$3" -v b="$4" -v f="$5" 'BEGIN{
        if (b + 0 == 0) { printf "  %s: n/a (iodine moved nothing)\n", l; exit }
        printf "  %s: %.3fx (floor %sx) %s\n", l, a / b, f, (a >= f * b) ? "PASS" : "FAIL" }'
    FLOORS_JSON+=$(awk -v k="$2" -v a="$3" -v b="$4" -v f="$5" 'BEGIN{
        if (b + 0 == 0) exit
        printf ",\"%s\":%.3f,\"%s_pass\":%s", k, a / b, k, (a >= f * b) ? "true" : "false" }')
}
echo "floor for iptun-dns via unbound (client->server):"
floor "vs iodine via unbound" unbound_vs_iodine "${MBIT[iptun-dns via unbound]:-}" "${MBIT[iodine via unbound]:-}" 5
echo "goals (issue 11; Mbit/s): via unbound >= 20 up, >= 80 down; direct >= 50 up, >= 150 down:"
goal() { # row goal
    if [[ -z ${MBIT[$1]:-} ]]; then echo "  $1: n/a"; return; fi
    awk -v l="$1" -v a="${MBIT[$1]}" -v g="$2" 'BEGIN{printf "  %-32s %8.1f (goal %s) %s\n", l, a, g, (a >= g) ? "PASS" : "FAIL"}'
}
goal "iptun-dns via unbound" 20
goal "iptun-dns via unbound (down)" 80
goal "iptun-dns direct" 50
goal "iptun-dns direct (down)" 150
echo "(runs=$RUNS, best of; iperf3 ${DURATION}s single TCP stream, up: client->server, down: -R; ${PINGS} pings at 0.2 s; iodine opts: -f -r ${IODINE_OPTS:+$IODINE_OPTS }-P; $(nproc) cores)"

sf_json="" sep=""
for n in "${ORDER[@]}"; do
    [[ -n ${SERVFAILS[$n]:-} ]] || continue
    sf_json+="$sep\"$n\":${SERVFAILS[$n]}"; sep=","
done
write_json "\"iodine_opts\":\"$IODINE_OPTS\",\"unbound_servfails\":{$sf_json}," "$FLOORS_JSON"
