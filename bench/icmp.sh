#!/usr/bin/env bash
# bench/icmp.sh - throughput and RTT of iptun over ICMP echo, compared in one
# run with the raw veth path, with ptunnel-ng (TCP over ICMP) and with iptun
# over UDP; and iptun over ICMP through a firewall that passes only LIMIT
# echo requests a second.
#
# Usage (as root):
#   bench/icmp.sh                          # raw, ptunnel, icmp, limit, udp
#   bench/icmp.sh --only raw,icmp          # any subset of: raw,ptunnel,icmp,limit,udp
#
# Environment:
#   IPTUN=path     iptun binary (default: <repo>/target/release/iptun; built
#                  with `cargo build --release -p iptun` when missing)
#   RUNS=n         measure each path n times, keep the best (default 1)
#   DURATION=s     iperf seconds per measurement (default 10)
#   PINGS=n        pings per measurement, 0.2 s apart (default 20)
#   PAUSE=s        idle seconds between measurements (default 3)
#   PTUNNEL_OPTS   tuning flags for both ptunnel-ng ends (default "-a 1 -y 1400";
#                  "" measures ptunnel-ng's defaults, about 0.5 Mbit/s)
#   LIMIT=n        echo requests a second the firewall of the limit rows passes
#                  (nftables `limit rate over n/second drop` in the server's
#                  namespace; default 300)
#   JSON=file      also write the results there as JSON
#   KEEP_LOGS=1    keep the temp dir with logs (it is kept on failure anyway)
#
# Topology: netns iptbi-s (192.0.2.1/24) <-veth-> netns iptbi-c (192.0.2.2/24).
# All tunnels run over that one link; the iperf server runs in iptbi-s, the
# client in iptbi-c (client -> server, plus server -> client for iptun-icmp).
# Nothing leaves the namespaces.
set -euo pipefail

PREFIX=iptbi
PATHS=raw,ptunnel,icmp,limit,udp
ALIASES=(ptunnel-ng=ptunnel iptun-icmp=icmp iptun-udp=udp)
LIMIT=${LIMIT:-300}
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"   # namespaces, measuring, iptun, report

PT_IPERF_PORT=5202   # iperf2 -s in the server namespace, reached through ptunnel-ng
PT_ECHO_PORT=5203    # TCP echo in the server namespace, for ptunnel-ng's RTT
PT_LPORT=4000        # ptunnel-ng client's local TCP port (-> PT_IPERF_PORT)
PT_LPORT_ECHO=4001   # ptunnel-ng client's local TCP port (-> PT_ECHO_PORT)
PT_PIDFILE=/run/ptunnel.pid   # ptunnel-ng always creates it, even without -d
PTUNNEL_OPTS=${PTUNNEL_OPTS--a 1 -y 1400}

PT_PIDFILE_WAS_THERE=0
[[ -e $PT_PIDFILE ]] && PT_PIDFILE_WAS_THERE=1
teardown_hook() { # ptunnel-ng's empty pid file, if it was not there before us
    if [[ $PT_PIDFILE_WAS_THERE -eq 0 && -e $PT_PIDFILE && ! -s $PT_PIDFILE ]]; then
        rm -f "$PT_PIDFILE"
    fi
}

parse_args "$@"
bench_start

# ---------------------------------------------------------------- tools
if want ptunnel; then
    ensure_apt ptunnel-ng ptunnel-ng
    ensure_apt iperf iperf   # iperf2: one TCP connection per test (see below)
    ensure_apt stdbuf coreutils
fi
if want icmp || want limit || want udp; then iptun_setup; fi

netns_up

# ---------------------------------------------------------------- ptunnel-ng
# ptunnel-ng forwards TCP connections, not IP packets, so it gets its own
# measuring tools:
# - throughput: iperf2, not iperf3. ptunnel-ng 1.42 (Debian; says 1.41)
#   derives a session's ID from the time in whole seconds, so two connections
#   accepted in the same second share an ID and the proxy drops the second
#   one as a duplicate. iperf3 always opens a control and a data connection a
#   few ms apart, and its data never flows; iperf2 sends over one connection.
#   The figure is the iperf2 server's (the receiver's): bytes received / time
#   from first to last byte.
#   The sender's socket buffer is capped (-w 128K) so that the data still
#   queued in front of a slow tunnel when the sender stops drains quickly.
# - RTT: no ICMP ping through a TCP forwarder; instead a 1-byte TCP echo round
#   trip through the tunnel to an echo server in the server namespace, PINGS
#   times 0.2 s apart (marked * in the table; includes two loopback TCP hops).
# Consecutive ptunnel-ng connections are kept >= 1.1 s apart for the same reason.
cat >"$TMP/echo_server.py" <<'EOF'
import socket, sys, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(8)
def serve(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        b = c.recv(4096)
        if not b:
            break
        c.sendall(b)
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
EOF
cat >"$TMP/echo_rtt.py" <<'EOF'
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
c = socket.create_connection(("127.0.0.1", port), timeout=10)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def rtt():
    t = time.perf_counter()
    c.sendall(b"x")
    if c.recv(1) != b"x":
        sys.exit("echo: connection closed")
    return time.perf_counter() - t
for _ in range(3):   # warm-up: session set-up on the first byte
    rtt()
    time.sleep(0.2)
samples = []
for _ in range(n):
    samples.append(rtt())
    time.sleep(0.2)
c.close()
print("%.3f" % (1000 * sum(samples) / len(samples)))
EOF

PT_LAST=0   # time of the last ptunnel-ng connection (see above)
pt_space() {
    local now
    now=$(date +%s.%N)
    awk -v a="$now" -v b="$PT_LAST" 'BEGIN{exit !(a-b < 1.1)}' && sleep 1.1
    PT_LAST=$(date +%s.%N)
}

pt_client() { # tag local-port remote-port; sets PT_C
    bg "$NS_C" "$TMP/ptunnel-client-$1-stdout.log" ptunnel-ng -p$UL_S -l$2 -r127.0.0.1 -R$3 \
        $PTUNNEL_OPTS -v 1 -o"$TMP/ptunnel-client-$1-$RUN.log"
    PT_C=$BG_PID
    wait_listen "$NS_C" "$2" $PT_C "ptunnel-ng client ($1)"
}

pt_rtt() { # -> avg TCP echo RTT ms
    local out rc=0
    pt_client echo $PT_LPORT_ECHO $PT_ECHO_PORT
    pt_space
    out=$(timeout 60 ip netns exec "$NS_C" python3 "$TMP/echo_rtt.py" $PT_LPORT_ECHO "$PINGS" 2>&1) || rc=1
    kill -0 $PT_S 2>/dev/null || rc=1
    stop_pids $PT_C
    PT_LAST=$(date +%s.%N)
    [[ $rc -eq 0 ]] || { echo "$out" >&2; return 1; }
    echo "$out"
}

pt_mbit() { # -> Mbit/s received by the iperf2 server
    local before n line
    pt_client iperf $PT_LPORT $PT_IPERF_PORT
    pt_space
    before=$(grep -c , "$TMP/iperf2-server.log" || true)
    timeout $((3 * DURATION + 60)) ip netns exec "$NS_C" iperf -c 127.0.0.1 -p $PT_LPORT \
        -t "$DURATION" -w 128K -y C >"$TMP/iperf2-client-$RUN.log" 2>&1 \
        || { cat "$TMP/iperf2-client-$RUN.log" >&2; stop_pids $PT_C; return 1; }
    # the server reports once the connection is closed at its end
    for _ in $(seq 600); do
        n=$(grep -c , "$TMP/iperf2-server.log" || true)
        [[ $n -gt $before ]] && break
        sleep 0.1
    done
    kill -0 $PT_S 2>/dev/null || { echo "ptunnel-ng server exited" >&2; return 1; }
    stop_pids $PT_C
    PT_LAST=$(date +%s.%N)
    [[ $n -gt $before ]] || { echo "iperf2 server: no report within 60 s of the client's end" >&2; return 1; }
    line=$(grep , "$TMP/iperf2-server.log" | tail -n 1)
    awk -F, '{ if ($8 + 0 <= 0) exit 1; printf "%.1f\n", $9 / 1e6 }' <<<"$line" \
        || { echo "iperf2 server: nothing received ($line)" >&2; return 1; }
}

# ---------------------------------------------------------------- measuring
# 1. raw veth
if want raw; then measure_raw; fi

# 2. ptunnel-ng
if want ptunnel; then
    pause
    log "ptunnel-ng: 127.0.0.1:$PT_LPORT in $NS_C -> icmp $UL_S -> 127.0.0.1:$PT_IPERF_PORT in $NS_S (opts: ${PTUNNEL_OPTS:-defaults})"
    # the proxy answers the echo requests itself: the kernel must not as well
    # (each request would then get two replies)
    echo_ignore=$(ip netns exec "$NS_S" sysctl -n net.ipv4.icmp_echo_ignore_all)
    ip netns exec "$NS_S" sysctl -qw net.ipv4.icmp_echo_ignore_all=1
    bg "$NS_S" "$TMP/iperf2-server.log" stdbuf -oL iperf -s -p $PT_IPERF_PORT -y C
    wait_listen "$NS_S" $PT_IPERF_PORT $BG_PID "iperf -s"
    PT_IPERF=$BG_PID
    bg "$NS_S" "$TMP/echo-server.log" python3 "$TMP/echo_server.py" $PT_ECHO_PORT
    wait_listen "$NS_S" $PT_ECHO_PORT $BG_PID "echo server"
    PT_ECHO=$BG_PID
    # -r/-R take their argument attached (-r127.0.0.1), not after a space
    bg "$NS_S" "$TMP/ptunnel-server-stdout.log" ptunnel-ng -r127.0.0.1 $PTUNNEL_OPTS -v 1 \
        -o"$TMP/ptunnel-server.log"
    PT_S=$BG_PID
    sleep 0.5
    kill -0 $PT_S 2>/dev/null || die "ptunnel-ng server exited"
    measure ptunnel-ng "pt_rtt" "pt_mbit"
    stop_pids $PT_S $PT_IPERF $PT_ECHO
    ip netns exec "$NS_S" sysctl -qw net.ipv4.icmp_echo_ignore_all="$echo_ignore"
fi

# 3. iptun over ICMP, both directions (downstream rides on echo replies)
if want icmp; then
    pause
    log "iptun-icmp: client -> $IPTUN_ADDR_S over icmp $UL_S ($IPTUN)"
    iptun_up icmp icmp://0.0.0.0 icmp://$UL_S
    measure iptun-icmp "ping_avg $NS_C $IPTUN_ADDR_S" "iperf3_mbit $NS_C $IPTUN_ADDR_S icmp"
    sleep "$PAUSE"
    log "iptun-icmp (down): $IPTUN_ADDR_S -> client (iperf3 -R)"
    measure "iptun-icmp (down)" - "iperf3_mbit $NS_C $IPTUN_ADDR_S icmp-down -R"
    iptun_down
fi

# 4. iptun over ICMP through a firewall that passes LIMIT echo requests a
# second and silently drops the rest (burst 5): the pacing should find that
# rate. What the firewall lets through is LIMIT requests of one TCP segment
# (1368 bytes at MTU 1420) each a second, either way.
limit_on() {
    ip netns exec "$NS_S" nft -f - <<EOF
table inet iptbi_limit {
    chain input {
        type filter hook input priority -10; policy accept;
        icmp type echo-request limit rate over $LIMIT/second counter drop
    }
}
EOF
}
limit_drops() {
    ip netns exec "$NS_S" nft list table inet iptbi_limit | sed -n 's/.*counter packets \([0-9]*\).*/\1/p'
}
if want limit; then
    pause
    log "iptun-icmp (limit): $LIMIT echo requests a second pass to $UL_S"
    limit_on
    iptun_up limit icmp://0.0.0.0 icmp://$UL_S
    measure "icmp, $LIMIT/s limit" - "iperf3_mbit $NS_C $IPTUN_ADDR_S limit"
    sleep "$PAUSE"
    measure "icmp, $LIMIT/s (down)" - "iperf3_mbit $NS_C $IPTUN_ADDR_S limit-down -R"
    log "the limit dropped $(limit_drops) echo requests"
    iptun_down
    ip netns exec "$NS_S" nft delete table inet iptbi_limit
fi

# 5. iptun over UDP (the reference for the ICMP floor)
if want udp; then measure_iptun_udp; fi

# ---------------------------------------------------------------- report
RTT_NOTE[ptunnel-ng]="*"   # a TCP echo, not a ping: see the footnote
print_table 18 1 "vs_raw:raw veth:8:3" "vs_ptunnel:ptunnel-ng:11:1" "vs_udp:iptun-udp:10:2"

pt=${MBIT[ptunnel-ng]:-}
udp=${MBIT[iptun-udp]:-}
icmp=${MBIT[iptun-icmp]:-}
FLOORS_JSON=""
floor() { # label json-key value base factor: prints PASS/FAIL, adds to FLOORS_JSON
    if [[ -z $3 || -z $4 ]]; then
        echo "  $1: n/a (path not measured)"
        return
    fi
    awk -v l="$1" -v a="$3" -v b="$4" -v f="$5" 'BEGIN{
        printf "  %s: %.3fx (floor %sx) %s\n", l, a / b, f, (a >= f * b) ? "PASS" : "FAIL" }'
    FLOORS_JSON+=$(awk -v k="$2" -v a="$3" -v b="$4" -v f="$5" 'BEGIN{
        printf ",\"%s\":%.3f,\"%s_pass\":%s", k, a / b, k, (a >= f * b) ? "true" : "false" }')
}
echo "floors for iptun-icmp (client->server):"
floor "vs ptunnel-ng" icmp_vs_ptunnel "$icmp" "$pt" 5
floor "vs iptun-udp " icmp_vs_udp "$icmp" "$udp" 0.5
if [[ -n $pt ]]; then
    echo "(* ptunnel-ng forwards TCP only: its rtt is a 1-byte TCP echo round trip through the tunnel, its Mbit/s from iperf2; ptunnel-ng opts: ${PTUNNEL_OPTS:-defaults})"
fi
if [[ -n ${MBIT[icmp, $LIMIT/s limit]:-} ]]; then
    allowed=$(awk -v l="$LIMIT" 'BEGIN{printf "%.2f", l * 1368 * 8 / 1e6}')
    echo "through the $LIMIT/s limit, of the $allowed Mbit/s it lets through:" \
        "$(awk -v a="${MBIT[icmp, $LIMIT/s limit]}" -v b="$allowed" 'BEGIN{printf "%.0f %%", 100 * a / b}') up," \
        "$(awk -v a="${MBIT[icmp, $LIMIT/s (down)]}" -v b="$allowed" 'BEGIN{printf "%.0f %%", 100 * a / b}') down (floor 70 %)"
fi
echo "(runs=$RUNS, best of; ${DURATION}s single TCP stream client->server unless (down); ${PINGS} pings at 0.2 s; $(nproc) cores)"

write_json "\"ptunnel_opts\":\"$PTUNNEL_OPTS\"," "$FLOORS_JSON"
