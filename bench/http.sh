#!/usr/bin/env bash
# bench/http.sh - throughput and RTT of iptun over HTTPS through a forward
# proxy (WebSocket, and long-poll), compared in one run with OpenVPN in TCP
# mode through the SAME proxy and with iptun's own UDP transport.
#
# Usage (as root):
#   bench/http.sh                          # all paths, both directions
#   bench/http.sh --only openvpn,udp       # any subset of: raw,udp,ws,longpoll,openvpn
#
# Environment:
#   IPTUN=path     iptun binary (default: <repo>/target/release/iptun; built
#                  with `cargo build --release -p iptun` when missing); ws and
#                  longpoll need one with the https transport
#   RUNS=n         measure each path n times, keep the best (default 1)
#   DURATION=s     iperf3 seconds per measurement (default 10)
#   PINGS=n        pings per measurement, 0.2 s apart (default 20)
#   PAUSE=s        idle seconds between measurements (default 3)
#   DOWN=0         measure client->server only (default 1: also iperf3 -R)
#   JSON=file      also write the results there as JSON
#   KEEP_LOGS=1    keep the temp dir with logs (it is kept on failure anyway)
#
# Topology (three namespaces):
#   iptbh-c 192.0.2.2 <-veth-> 192.0.2.1 iptbh-m 203.0.113.1 <-veth-> 203.0.113.2 iptbh-s
# iptbh-m runs squid on 192.0.2.1:3128 (our own config in the temp dir, basic
# auth, CONNECT allowed to 443 and 8443 only) and also routes between its two
# links, for the raw and udp paths. The proxied paths use the proxy
# explicitly (CONNECT), as a client behind a corporate proxy would:
#   ws        iptun client --server https://203.0.113.2/tunnel --proxy http://u:p@192.0.2.1:3128
#             --tls-pin <the server's self-signed pin> (default --http-mode auto: WebSocket)
#   longpoll  the same with --http-mode long-poll
#   openvpn   OpenVPN 2.6 p2p TLS, --proto tcp-client --http-proxy 192.0.2.1 3128 (basic
#             auth file), data channel AES-256-GCM, to 203.0.113.2:8443
#   udp       iptun over udp://203.0.113.2:3000, routed through iptbh-m (no proxy)
#   raw       192.0.2.2 -> 203.0.113.2, routed, no tunnel
# iperf3 -s runs in iptbh-s; "up" is client -> server, "down" is iperf3 -R.
# Nothing leaves the namespaces.
set -euo pipefail

PREFIX=iptbh
PATHS=raw,udp,ws,longpoll,openvpn
ALIASES=(iptun-udp=udp iptun-ws=ws iptun-longpoll=longpoll openvpn-tcp=openvpn)
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"   # namespaces, measuring, iptun, report

export PATH="$PATH:/usr/sbin:/sbin"   # squid, openvpn

NS_M=$PREFIX-m                 # the proxy namespace (lib.sh knows NS_C, NS_S)
VETH_CM=$PREFIX-c0             # client's end of client <-> middle
VETH_MC=$PREFIX-m0             # middle's end of client <-> middle
VETH_MS=$PREFIX-m1             # middle's end of middle <-> server
VETH_SM=$PREFIX-s0             # server's end of middle <-> server
ADDR_C=192.0.2.2
ADDR_MC=192.0.2.1              # middle, client side: squid listens here
ADDR_MS=203.0.113.1            # middle, server side
ADDR_S=203.0.113.2             # the tunnel servers
PROXY_PORT=3128
PROXY_USER=tunneler
PROXY_PASS=pr0xy-Pass          # nothing leaves the namespaces
PROXY_URL=http://$PROXY_USER:$PROXY_PASS@$ADDR_MC:$PROXY_PORT
HTTPS_URL=https://$ADDR_S/tunnel
OVPN_PORT=8443
OVPN_TUN=ovpn0
OVPN_ADDR_S=10.8.0.1
OVPN_ADDR_C=10.8.0.2
DOWN=${DOWN:-1}

declare -A DIR=() BASE=()      # path -> up/down; path -> the name without direction

teardown_hook() { # the middle namespace, which lib.sh's teardown doesn't know
    if ip netns list | grep -qw "$NS_M"; then
        kill_ns_procs "$NS_M"
        ip netns del "$NS_M" 2>/dev/null || true
    fi
    # squid's shared memory (named after our service name), if it was killed
    rm -f /dev/shm/"$PREFIX"squid-*.shm
}

parse_args "$@"
bench_start

# ---------------------------------------------------------------- tools
if want ws || want longpoll || want openvpn; then
    ensure_apt squid squid
    ensure_apt openssl openssl
fi
if want openvpn; then
    ensure_apt openvpn openvpn
fi
if want udp || want ws || want longpoll; then
    iptun_setup
    if want ws || want longpoll; then
        "$IPTUN" server --help 2>&1 | grep -q 'https://' \
            || die "$IPTUN has no https transport (its --help names no https:// listener); try --only raw,udp,openvpn"
    fi
fi

# ---------------------------------------------------------------- topology
netns3_up() {
    local ns
    teardown   # stale namespaces / processes from an earlier run (hook: NS_M too)
    for ns in "$NS_C" "$NS_M" "$NS_S"; do
        ip netns add "$ns"
        ip -n "$ns" link set lo up
    done
    ip link add "$VETH_CM" netns "$NS_C" type veth peer name "$VETH_MC" netns "$NS_M"
    ip link add "$VETH_MS" netns "$NS_M" type veth peer name "$VETH_SM" netns "$NS_S"
    ip -n "$NS_C" addr add $ADDR_C/24 dev "$VETH_CM"
    ip -n "$NS_M" addr add $ADDR_MC/24 dev "$VETH_MC"
    ip -n "$NS_M" addr add $ADDR_MS/24 dev "$VETH_MS"
    ip -n "$NS_S" addr add $ADDR_S/24 dev "$VETH_SM"
    ip -n "$NS_C" link set "$VETH_CM" up
    ip -n "$NS_M" link set "$VETH_MC" up
    ip -n "$NS_M" link set "$VETH_MS" up
    ip -n "$NS_S" link set "$VETH_SM" up
    # the middle namespace also routes (raw and udp paths)
    ip netns exec "$NS_M" sysctl -qw net.ipv4.ip_forward=1
    ip -n "$NS_C" route add 203.0.113.0/24 via $ADDR_MC
    ip -n "$NS_S" route add 192.0.2.0/24 via $ADDR_MS

    bg "$NS_S" "$TMP/iperf3-server.log" iperf3 -s
    wait_listen "$NS_S" 5201 "$BG_PID" "iperf3 -s"
    ip netns exec "$NS_C" ping -c 1 -W 2 $ADDR_MC >/dev/null || die "$ADDR_C -> $ADDR_MC not reachable"
    ip netns exec "$NS_M" ping -c 1 -W 2 $ADDR_S >/dev/null || die "$ADDR_MS -> $ADDR_S not reachable"
    ip netns exec "$NS_C" ping -c 1 -W 2 $ADDR_S >/dev/null || die "$ADDR_C -> $ADDR_S not routed"
}

# Our own squid in the middle namespace (never the system's service), as in
# crates/iptun/tests/common/http.rs: basic auth against an apr1 hash, CONNECT
# to 443 and 8443 only, no cache, no access log per request beyond the
# default (it costs nothing per byte of a CONNECT tunnel).
squid_up() {
    local d="$TMP/squid"
    mkdir -p "$d"
    chmod 755 "$TMP"
    chmod 777 "$d"      # squid runs as Debian's `proxy` user
    printf '%s:%s\n' "$PROXY_USER" "$(openssl passwd -apr1 "$PROXY_PASS")" >"$d/passwd"
    chmod 644 "$d/passwd"
    cat >"$d/squid.conf" <<EOF
# Written by bench/http.sh: our own squid, not the system's.
http_port $ADDR_MC:$PROXY_PORT
pid_filename $d/squid.pid
cache_log stdio:$d/cache.log
access_log stdio:$d/access.log
cache_store_log none
cache deny all
cache_mem 8 MB
coredump_dir $d
netdb_filename none
pinger_enable off
collapsed_forwarding_shared_entries_limit 0
dns_nameservers 127.0.0.1
shutdown_lifetime 0 seconds
forwarded_for delete
via off
auth_param basic program /usr/lib/squid/basic_ncsa_auth $d/passwd
auth_param basic children 2 startup=1 idle=1
auth_param basic realm iptun-bench
acl authed proxy_auth REQUIRED
acl tunnel_ports port 443 $OVPN_PORT
acl CONNECT method CONNECT
http_access deny CONNECT !tunnel_ports
http_access allow authed
http_access deny all
EOF
    squid -k parse -f "$d/squid.conf" >"$TMP/squid-parse.log" 2>&1 \
        || { cat "$TMP/squid-parse.log" >&2; die "squid -k parse rejects $d/squid.conf"; }
    bg "$NS_M" "$TMP/squid.log" squid -N -d1 -n "${PREFIX}squid" -f "$d/squid.conf"
    SQUID=$BG_PID
    wait_listen "$NS_M" $PROXY_PORT "$SQUID" squid
    # the proxy works and wants its password
    local code
    code=$(ip netns exec "$NS_C" env -u http_proxy -u https_proxy -u HTTP_PROXY -u HTTPS_PROXY \
        curl -s -o /dev/null -w '%{http_connect}' --max-time 5 -p -x "http://$ADDR_MC:$PROXY_PORT" \
        "http://$ADDR_S:443/" || true)
    [[ $code == 407 ]] || die "squid: CONNECT without credentials got '$code', expected 407"
    log "squid $(squid -v | sed -n 's/.*Version \([^ ]*\).*/\1/p') up on $ADDR_MC:$PROXY_PORT (basic auth)"
}

# ---------------------------------------------------------------- measuring
# up (ping + iperf3) and, with DOWN=1, down (iperf3 -R) for one tunnel
measure_both() { # base-name dst tag
    local name=$1 dst=$2 tag=$3
    measure "$name up" "ping_avg $NS_C $dst" "iperf3_mbit $NS_C $dst $tag-up"
    DIR["$name up"]=up; BASE["$name up"]=$name
    if [[ $DOWN == 1 ]]; then
        sleep 1
        measure "$name down" - "iperf3_mbit $NS_C $dst $tag-down -R"
        DIR["$name down"]=down; BASE["$name down"]=$name
    fi
}

measure_raw3() {
    pause
    log "raw: $ADDR_C -> $ADDR_S, routed through $NS_M"
    measure_both raw $ADDR_S raw
}

measure_udp() {
    pause
    log "iptun-udp: client -> $IPTUN_ADDR_S over udp://$ADDR_S:$IPTUN_PORT, routed ($IPTUN)"
    iptun_up udp udp://0.0.0.0:$IPTUN_PORT udp://$ADDR_S:$IPTUN_PORT
    measure_both iptun-udp $IPTUN_ADDR_S udp
    iptun_down
}

# iptun over https through squid; the server's self-signed certificate is
# pinned with the pin it logs. Extra client flags: $3...
measure_iptun_http() { # name tag [client flags]
    local name=$1 tag=$2 pin mode; shift 2
    pause
    log "$name: client -> $IPTUN_ADDR_S over $HTTPS_URL through squid $ADDR_MC:$PROXY_PORT $* ($IPTUN)"
    bg "$NS_S" "$TMP/iptun-$tag-server.log" "$IPTUN" server --private-key "$TMP/iptun-s.key" \
        --allow "$(cat "$TMP/iptun-c.pub")" --listen "$HTTPS_URL" --tun $IPTUN_TUN
    IT_S=$BG_PID
    wait_ipv4 "$NS_S" $IPTUN_TUN 10 $IT_S || die "iptun server: no IPv4 on $IPTUN_TUN within 10 s$(alive $IT_S)"
    pin=""
    for _ in $(seq 100); do
        pin=$(grep -o 'TLS certificate pin: sha256:[0-9a-f]\{64\}' "$TMP/iptun-$tag-server.log" | head -n1 | sed 's/.*: //') || true
        [[ -n $pin ]] && break
        sleep 0.1
    done
    [[ -n $pin ]] || die "iptun server: no 'TLS certificate pin: sha256:...' in its log"
    bg "$NS_C" "$TMP/iptun-$tag-client.log" env -u http_proxy -u https_proxy -u HTTP_PROXY -u HTTPS_PROXY \
        "$IPTUN" client --private-key "$TMP/iptun-c.key" --server-key "$(cat "$TMP/iptun-s.pub")" \
        --server "$HTTPS_URL" --tls-pin "$pin" --proxy "$PROXY_URL" --tun $IPTUN_TUN "$@"
    IT_C=$BG_PID
    wait_ipv4 "$NS_C" $IPTUN_TUN 30 $IT_C || die "iptun client: no IPv4 on $IPTUN_TUN within 30 s$(alive $IT_C)"
    ip netns exec "$NS_C" ping -c 5 -i 0.2 -W 2 $IPTUN_ADDR_S >/dev/null 2>&1 || \
        ip netns exec "$NS_C" ping -c 2 -W 3 $IPTUN_ADDR_S >/dev/null || die "$name: no ping through tunnel"
    mode=$(ip netns exec "$NS_C" "$IPTUN" status --json 2>/dev/null \
        | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s[0]["sessions"][0]["path"]["mode"])' 2>/dev/null || echo "?")
    log "$name: mode $mode"
    measure_both "$name" $IPTUN_ADDR_S "$tag"
    iptun_down
    # squid logs a CONNECT when the tunnel closes: the traffic went through it
    sleep 0.5
    grep -q "CONNECT $ADDR_S:443 $PROXY_USER" "$TMP/squid/access.log" 2>/dev/null \
        || die "$name: squid logged no authenticated CONNECT to $ADDR_S:443"
}

# A quick PKI (CA, server and client certificates, P-256) for OpenVPN's TLS
# mode: static-key mode can't do AES-256-GCM.
ovpn_pki() {
    local d="$TMP/ovpn" n eku
    mkdir -p "$d"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$d/ca.key" \
        -out "$d/ca.pem" -days 2 -subj "/CN=iptun bench CA" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
        >"$TMP/openssl.log" 2>&1 || die "openssl: CA"
    for n in server client; do
        if [[ $n == server ]]; then eku=serverAuth; else eku=clientAuth; fi
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$d/$n.key" \
            -out "$d/$n.csr" -subj "/CN=$n" >>"$TMP/openssl.log" 2>&1 || die "openssl: $n key"
        printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=%s\n' \
            "$eku" >"$d/$n.ext"
        openssl x509 -req -in "$d/$n.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
            -out "$d/$n.pem" -days 2 -extfile "$d/$n.ext" >>"$TMP/openssl.log" 2>&1 || die "openssl: $n cert"
    done
    printf '%s\n%s\n' "$PROXY_USER" "$PROXY_PASS" >"$d/proxy-auth"
    chmod 600 "$d/proxy-auth"
}

# OpenVPN point-to-point, TLS mode, TCP through squid's CONNECT.
measure_openvpn() {
    local d="$TMP/ovpn" srv cli common
    pause
    ovpn_pki
    common=(--dev "$OVPN_TUN" --dev-type tun --data-ciphers AES-256-GCM --cipher AES-256-GCM
            --ca "$d/ca.pem" --dh none --socket-flags TCP_NODELAY --verb 3)
    log "openvpn-tcp: $OVPN_ADDR_C -> $OVPN_ADDR_S, tcp $ADDR_S:$OVPN_PORT through squid $ADDR_MC:$PROXY_PORT, AES-256-GCM"
    bg "$NS_S" "$TMP/openvpn-server.log" openvpn "${common[@]}" --proto tcp-server \
        --local $ADDR_S --lport $OVPN_PORT --tls-server --cert "$d/server.pem" --key "$d/server.key" \
        --ifconfig $OVPN_ADDR_S $OVPN_ADDR_C
    srv=$BG_PID
    wait_listen "$NS_S" $OVPN_PORT $srv "openvpn server"
    bg "$NS_C" "$TMP/openvpn-client.log" openvpn "${common[@]}" --proto tcp-client \
        --remote $ADDR_S $OVPN_PORT --http-proxy $ADDR_MC $PROXY_PORT "$d/proxy-auth" basic \
        --tls-client --remote-cert-tls server --cert "$d/client.pem" --key "$d/client.key" \
        --ifconfig $OVPN_ADDR_C $OVPN_ADDR_S
    cli=$BG_PID
    for _ in $(seq 200); do
        grep -q 'Initialization Sequence Completed' "$TMP/openvpn-client.log" && break
        kill -0 $cli 2>/dev/null || die "openvpn client exited"
        sleep 0.1
    done
    grep -q 'Initialization Sequence Completed' "$TMP/openvpn-client.log" \
        || die "openvpn client: not connected within 20 s"
    grep -E "HTTP proxy returned|Data Channel: cipher" "$TMP/openvpn-client.log" | sed 's/^/    /' >&2 || true
    ip netns exec "$NS_C" ping -c 5 -i 0.2 -W 2 $OVPN_ADDR_S >/dev/null 2>&1 || \
        ip netns exec "$NS_C" ping -c 2 -W 3 $OVPN_ADDR_S >/dev/null || die "openvpn-tcp: no ping through tunnel"
    measure_both openvpn-tcp $OVPN_ADDR_S openvpn
    if ! kill -0 $srv 2>/dev/null || ! kill -0 $cli 2>/dev/null; then die "openvpn exited during the measurement"; fi
    stop_pids $cli $srv
}

netns3_up
if want ws || want longpoll || want openvpn; then squid_up; fi

if want raw; then measure_raw3; fi
if want udp; then measure_udp; fi
if want ws; then measure_iptun_http iptun-ws ws; fi
if want longpoll; then measure_iptun_http iptun-longpoll longpoll --http-mode long-poll; fi
if want openvpn; then measure_openvpn; fi

if [[ -n ${SQUID:-} ]]; then
    kill -0 "$SQUID" 2>/dev/null || die "squid exited during the measurements"
    stop_pids "$SQUID"
fi

# ---------------------------------------------------------------- report
# Mbit/s divided by another path's in the same direction ("-" if not measured)
ratio() { # path reference-base
    local ref="$2 ${DIR[$1]}"
    awk -v a="${MBIT[$1]}" -v b="${MBIT[$ref]:-}" \
        'BEGIN{ if (b == "" || b + 0 == 0) print "-"; else printf "%.2f", a / b }'
}
echo
printf "%-20s %10s %8s %12s %10s\n" path Mbit/s rtt_ms vs_openvpn vs_udp
for n in "${ORDER[@]}"; do
    r=${RTT[$n]}
    [[ $r == - ]] || r=$(awk -v r="$r" 'BEGIN{printf "%.3f", r}')
    printf "%-20s %10s %8s %12s %10s\n" "$n" "$(awk -v m="${MBIT[$n]}" 'BEGIN{printf "%.1f", m}')" "$r" \
        "$(ratio "$n" openvpn-tcp)" "$(ratio "$n" iptun-udp)"
done
echo "(runs=$RUNS, best of; iperf3 ${DURATION}s single TCP stream, up = client->server, down = -R;" \
    "${PINGS} pings at 0.2 s; squid basic auth via CONNECT for ws, longpoll, openvpn; $(nproc) cores)"

RATIOS_JSON="" sep=""
for n in "${ORDER[@]}"; do
    for ref in openvpn-tcp iptun-udp; do
        [[ ${BASE[$n]} != "$ref" ]] || continue
        v=$(ratio "$n" $ref)
        [[ $v == - ]] && continue
        RATIOS_JSON+="$sep\"$n / $ref ${DIR[$n]}\":$v"; sep=","
    done
done
write_json "\"proxy\":\"squid $(squid -v 2>/dev/null | sed -n 's/.*Version \([^ ]*\).*/\1/p')\",\"openvpn\":\"$(openvpn --version 2>/dev/null | awk 'NR==1{print $2}')\",\"openvpn_cipher\":\"AES-256-GCM\"," \
    ",\"ratios\":{$RATIOS_JSON}"
