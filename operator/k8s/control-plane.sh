#!/usr/bin/env bash
# A real Kubernetes control plane on 127.0.0.1 for the operator's
# end-to-end suite (operator/tests/k8s): etcd, kube-apiserver (RBAC on),
# kube-controller-manager, kube-scheduler, and kwok simulating one node, so
# that Pods of StatefulSets and Deployments are scheduled and become Ready.
#
#   control-plane.sh build             build the binaries once (cached), print their directory
#   control-plane.sh up DIR [--watch PID [--remove]]
#                                      start in DIR (certs, kubeconfig, logs, pids);
#                                      with --watch, stop by itself when PID exits
#                                      (and with --remove, delete DIR then)
#   control-plane.sh down DIR          stop what `up` started in DIR
#   control-plane.sh versions          the pinned versions
#
# The binaries are built from source with Go and the Go module proxy (no
# downloads of prebuilt binaries) into
#   ${WARREN_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/warren/k8s/<kubernetes version>}/bin
# and rebuilt only when a pinned version changes. A cold build takes a while
# (see docs/kubernetes.md for the measured time); Go builds run under `nice`.
#
# After `up`, DIR holds: kubeconfig (cluster admin, client certificate),
# env (KUBECONFIG=..., WARREN_K8S_API=https://127.0.0.1:PORT), ca.crt,
# sa.key / sa.pub (service-account signing keys), logs/*.log, pids/*.pid.
set -euo pipefail

K8S_VERSION=v1.37.2
ETCD_VERSION=v3.6.16
KWOK_VERSION=v0.8.0

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${WARREN_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/warren/k8s/$K8S_VERSION}"
bin="$cache/bin"
# Bounded waits (seconds).
START_TIMEOUT="${WARREN_K8S_START_TIMEOUT:-120}"

log() { printf 'control-plane: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- build ----

go_env() {
    command -v go >/dev/null || die "Go is required to build the control plane (go 1.26 or newer)"
    export GOFLAGS="-mod=mod -trimpath"
    export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
    export CGO_ENABLED=0
}

# stamp NAME VERSION: whether bin/NAME was built from VERSION.
built() { [ -x "$bin/$1" ] && [ "$(cat "$bin/.$1.version" 2>/dev/null)" = "$2" ]; }
stamp() { echo "$2" > "$bin/.$1.version"; }

# A wrapper module in $cache/src/NAME, started afresh.
wrapper() {
    local dir="$cache/src/$1"
    rm -rf "$dir"
    mkdir -p "$dir"
    printf 'module warren.local/k8s-%s\n\ngo 1.26.0\n' "$1" > "$dir/go.mod"
    echo "$dir"
}

build_etcd() {
    built etcd "$ETCD_VERSION" && return 0
    log "building etcd $ETCD_VERSION"
    local dir; dir="$(wrapper etcd)"
    # go.etcd.io/etcd/server/v3's own go.mod has replace directives, so
    # `go install ...@version` is refused: build it as a tool of a wrapper.
    (cd "$dir" && go get -tool "go.etcd.io/etcd/server/v3@$ETCD_VERSION" \
        && nice -n 10 go build -ldflags "-s -w" -o "$bin/etcd" go.etcd.io/etcd/server/v3)
    stamp etcd "$ETCD_VERSION"
}

build_kubernetes() {
    local names=(kube-apiserver kube-controller-manager kube-scheduler) all=1 n
    for n in "${names[@]}"; do built "$n" "$K8S_VERSION" || all=0; done
    [ "$all" = 1 ] && return 0
    log "building kube-apiserver, kube-controller-manager, kube-scheduler $K8S_VERSION"
    local dir gomod staging minor
    dir="$(wrapper kubernetes)"
    gomod="$(cd "$dir" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
    [ -f "$gomod" ] || die "could not download k8s.io/kubernetes@$K8S_VERSION"
    # k8s.io/kubernetes replaces every staging module k8s.io/NAME with
    # ./staging/src/k8s.io/NAME; each is published as k8s.io/NAME v0.MINOR.PATCH.
    staging="v0.${K8S_VERSION#v1.}"
    {
        echo
        grep -E '^godebug ' "$gomod" || true
        echo "require k8s.io/kubernetes $K8S_VERSION"
        echo "replace ("
        grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging/src/k8s\.io/[a-z0-9-]+' "$gomod" \
            | awk -v v="$staging" '{ printf "\t%s => %s %s\n", $1, $1, v }'
        echo ")"
    } >> "$dir/go.mod"
    grep -q '=> k8s.io/apiserver' "$dir/go.mod" || die "found no staging replace directives in $gomod"
    minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
    local pkg=k8s.io/component-base/version
    local ldflags="-s -w -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    ldflags+=" -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION -X k8s.io/client-go/pkg/version.gitMajor=1"
    ldflags+=" -X k8s.io/client-go/pkg/version.gitMinor=$minor"
    local pkgs=()
    for n in "${names[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$n"); done
    (cd "$dir" && go get -tool "${pkgs[@]}" && nice -n 10 go build -ldflags "$ldflags" -o "$bin/" "${pkgs[@]}")
    for n in "${names[@]}"; do stamp "$n" "$K8S_VERSION"; done
}

build_kwok() {
    built kwok "$KWOK_VERSION" && [ -s "$bin/kwok-stages.yaml" ] && return 0
    log "building kwok $KWOK_VERSION"
    local dir src f; dir="$(wrapper kwok)"
    (cd "$dir" && go get -tool "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" \
        && nice -n 10 go build -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" -o "$bin/kwok" sigs.k8s.io/kwok/cmd/kwok)
    # The stages kwokctl uses by default: nodes become Ready and keep their
    # lease; pods are scheduled, Running and Ready at once, and deleted.
    src="$(cd "$dir" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)/kustomize/stage"
    : > "$bin/kwok-stages.yaml"
    for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
             pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
        [ -f "$src/$f" ] || die "kwok $KWOK_VERSION has no stage $f"
        { echo "---"; cat "$src/$f"; } >> "$bin/kwok-stages.yaml"
    done
    stamp kwok "$KWOK_VERSION"
}

cmd_build() {
    mkdir -p "$bin"
    local started=$SECONDS need=0 n
    for n in etcd kube-apiserver kube-controller-manager kube-scheduler kwok; do [ -x "$bin/$n" ] || need=1; done
    [ "$need" = 1 ] || { built etcd "$ETCD_VERSION" && built kube-apiserver "$K8S_VERSION" && built kwok "$KWOK_VERSION" && [ -s "$bin/kwok-stages.yaml" ]; } || need=1
    if [ "$need" = 1 ]; then
        go_env
        build_etcd
        build_kubernetes
        build_kwok
        log "built in $((SECONDS - started)) s: $bin"
    fi
    echo "$bin"
}

# ------------------------------------------------------------------- up ----

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# wait_for WHAT SECONDS COMMAND...: polls COMMAND every 0.2 s, and gives up
# at once when the component WHAT (a pid file of $WAIT_DIR) has exited.
wait_for() {
    local what="$1" limit="$2"; shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || { log "$what not ready within ${limit}s"; return 1; }
        if [ -n "${WAIT_DIR:-}" ] && [ -f "$WAIT_DIR/pids/$what.pid" ] && ! alive "$WAIT_DIR" "$what"; then
            log "$what exited"; return 1
        fi
        sleep 0.2
    done
}

# start DIR NAME ARGS...: runs a component in the background, in its own
# process group, logging to DIR/logs/NAME.log.
start() {
    local dir="$1" name="$2"; shift 2
    setsid "$@" >"$dir/logs/$name.log" 2>&1 < /dev/null &
    echo $! > "$dir/pids/$name.pid"
}

alive() { kill -0 "$(cat "$1/pids/$2.pid")" 2>/dev/null; }

# client NAME SUBJECT: a client certificate signed by the test CA.
client() {
    openssl genrsa -out "$1.key" 2048 2>/dev/null
    openssl req -new -key "$1.key" -subj "$2" -out "$1.csr" 2>/dev/null
    printf 'extendedKeyUsage=clientAuth\n' > client.ext
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -sha256 -extfile client.ext -out "$1.crt" 2>/dev/null
}

certs() {
    local d="$1"
    (
        cd "$d"
        openssl genrsa -out ca.key 2048 2>/dev/null
        openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=warren-test-ca" -out ca.crt 2>/dev/null
        # A serving certificate for 127.0.0.1 and localhost.
        openssl genrsa -out apiserver.key 2048 2>/dev/null
        openssl req -new -key apiserver.key -subj "/CN=kube-apiserver" -out apiserver.csr 2>/dev/null
        printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n' > apiserver.ext
        openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -sha256 -extfile apiserver.ext -out apiserver.crt 2>/dev/null
        # Client identities: the admin (system:masters), the controller
        # manager and the scheduler (their bootstrap RBAC roles).
        client admin /O=system:masters/CN=admin
        client kube-controller-manager /CN=system:kube-controller-manager
        client kube-scheduler /CN=system:kube-scheduler
        # The service-account token signing key pair.
        openssl genrsa -out sa.key 2048 2>/dev/null
        openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
        rm -f ./*.csr ./*.ext ca.srl
    )
}

kubeconfig() { # DIR NAME SERVER
    local d="$1" name="$2" server="$3"
    cat > "$d/$name.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: warren-test
  cluster:
    server: $server
    certificate-authority: $d/ca.crt
users:
- name: $name
  user:
    client-certificate: $d/$name.crt
    client-key: $d/$name.key
contexts:
- name: warren-test
  context: {cluster: warren-test, user: $name, namespace: default}
current-context: warren-test
EOF
}

# kube ARGS...: kubectl-free requests with curl as the admin.
kube() {
    local d="$1" method="$2" path="$3" body="${4:-}"
    local args=(-sS --fail-with-body --max-time 10 --cacert "$d/ca.crt" --cert "$d/admin.crt" --key "$d/admin.key" -X "$method")
    [ -n "$body" ] && args+=(-H 'Content-Type: application/json' --data "$body")
    curl "${args[@]}" "$(cat "$d/api")$path"
}

cmd_up() {
    local dir="${1:?usage: control-plane.sh up DIR [--watch PID]}"; shift
    local watch="" remove=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --watch) watch="$2"; shift 2 ;;
            --remove) remove=1; shift ;;
            *) die "unknown argument $1" ;;
        esac
    done
    local started=$SECONDS
    cmd_build >/dev/null
    WAIT_DIR="$dir"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    [ -e "$dir/pids/kube-apiserver.pid" ] && alive "$dir" kube-apiserver && die "a control plane already runs in $dir"
    # Always a fresh cluster: new certificates, keys and an empty etcd.
    rm -rf "$dir/etcd" "$dir/logs" "$dir/pids" "$dir/helm"
    mkdir -p "$dir/logs" "$dir/pids" "$dir/etcd"
    certs "$dir"

    local etcd_port etcd_peer api_port kcm_port sched_port
    etcd_port="$(free_port)"; etcd_peer="$(free_port)"; api_port="$(free_port)"
    kcm_port="$(free_port)"; sched_port="$(free_port)"
    local api="https://127.0.0.1:$api_port"
    echo "$api" > "$dir/api"
    # Audit: one line per request of the Warren operator's ServiceAccounts
    # (namespace warren-system), so tests can count the operator's requests.
    cat > "$dir/audit-policy.yaml" <<'EOF'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived", "ResponseStarted"]
rules:
- level: Metadata
  userGroups: ["system:serviceaccounts:warren-system"]
- level: None
EOF

    start "$dir" etcd "$bin/etcd" --name warren-test --data-dir "$dir/etcd" \
        --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
        --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
        --initial-cluster "warren-test=http://127.0.0.1:$etcd_peer" --unsafe-no-fsync --quota-backend-bytes 2147483648 \
        --log-level warn
    WAIT_DIR="$dir"
    wait_for etcd 30 curl -sf "http://127.0.0.1:$etcd_port/health" || { tail -20 "$dir/logs/etcd.log" >&2; cmd_down "$dir"; exit 1; }

    start "$dir" kube-apiserver "$bin/kube-apiserver" \
        --etcd-servers "http://127.0.0.1:$etcd_port" \
        --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
        --endpoint-reconciler-type none \
        --tls-cert-file "$dir/apiserver.crt" --tls-private-key-file "$dir/apiserver.key" \
        --client-ca-file "$dir/ca.crt" \
        --service-account-issuer https://kubernetes.default.svc \
        --service-account-key-file "$dir/sa.pub" --service-account-signing-key-file "$dir/sa.key" \
        --service-cluster-ip-range 10.96.0.0/16 \
        --authorization-mode RBAC \
        --enable-admission-plugins OwnerReferencesPermissionEnforcement \
        --allow-privileged=true --cert-dir "$dir/apiserver-certs" \
        --audit-policy-file "$dir/audit-policy.yaml" --audit-log-path "$dir/logs/audit.log" --audit-log-format json \
        --v 1
    kubeconfig "$dir" admin "$api"
    kubeconfig "$dir" kube-controller-manager "$api"
    kubeconfig "$dir" kube-scheduler "$api"
    cp "$dir/admin.kubeconfig" "$dir/kubeconfig"
    if ! wait_for kube-apiserver "$START_TIMEOUT" kube "$dir" GET /readyz; then
        tail -30 "$dir/logs/kube-apiserver.log" >&2; cmd_down "$dir"; exit 1
    fi

    start "$dir" kube-controller-manager "$bin/kube-controller-manager" \
        --kubeconfig "$dir/kube-controller-manager.kubeconfig" \
        --authentication-kubeconfig "$dir/kube-controller-manager.kubeconfig" \
        --authorization-kubeconfig "$dir/kube-controller-manager.kubeconfig" \
        --bind-address 127.0.0.1 --secure-port "$kcm_port" \
        --leader-elect=false --use-service-account-credentials=true \
        --service-account-private-key-file "$dir/sa.key" --root-ca-file "$dir/ca.crt" \
        --cluster-signing-cert-file "$dir/ca.crt" --cluster-signing-key-file "$dir/ca.key" \
        --concurrent-statefulset-syncs 5 --concurrent-gc-syncs 20 \
        --v 1
    start "$dir" kube-scheduler "$bin/kube-scheduler" \
        --kubeconfig "$dir/kube-scheduler.kubeconfig" \
        --authentication-kubeconfig "$dir/kube-scheduler.kubeconfig" \
        --authorization-kubeconfig "$dir/kube-scheduler.kubeconfig" \
        --bind-address 127.0.0.1 --secure-port "$sched_port" --leader-elect=false --v 1
    # kwok: one simulated node (loopback addresses only), whose Pods it
    # marks Running and Ready.
    start "$dir" kwok "$bin/kwok" --kubeconfig "$dir/admin.kubeconfig" --config "$bin/kwok-stages.yaml" \
        --manage-all-nodes=false --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
        --node-ip 127.0.0.2 --cidr 127.10.0.0/16 --node-lease-duration-seconds 40 \
        --server-address "127.0.0.1:$(free_port)"

    kube "$dir" POST /api/v1/nodes '{
      "apiVersion": "v1", "kind": "Node",
      "metadata": {"name": "kwok-node-0",
        "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
        "labels": {"kubernetes.io/hostname": "kwok-node-0", "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                   "topology.kubernetes.io/zone": "zone-a", "type": "kwok"}},
      "status": {"allocatable": {"cpu": "64", "memory": "256Gi", "pods": "500"},
                 "capacity": {"cpu": "64", "memory": "256Gi", "pods": "500"}}}' >/dev/null

    node_ready() { kube "$dir" GET /api/v1/nodes/kwok-node-0 | grep -q '"type": "Ready",' && kube "$dir" GET /api/v1/nodes/kwok-node-0 | tr -d ' \n' | grep -q '"type":"Ready","status":"True"'; }
    default_sa() { kube "$dir" GET /api/v1/namespaces/default/serviceaccounts/default; }
    for check in "kwok node:node_ready" "kube-controller-manager (default ServiceAccount):default_sa"; do
        if ! wait_for "${check%%:*}" "$START_TIMEOUT" "${check#*:}"; then
            for c in kube-controller-manager kwok; do tail -20 "$dir/logs/$c.log" >&2; done
            cmd_down "$dir"; exit 1
        fi
    done
    for c in etcd kube-apiserver kube-controller-manager kube-scheduler kwok; do
        alive "$dir" "$c" || { tail -20 "$dir/logs/$c.log" >&2; cmd_down "$dir"; die "$c exited"; }
    done
    printf 'KUBECONFIG=%s\nWARREN_K8S_API=%s\nWARREN_K8S_DIR=%s\n' "$dir/kubeconfig" "$api" "$dir" > "$dir/env"
    if [ -n "$watch" ]; then
        # Stop with the process that asked for the control plane, however it ends.
        setsid bash -c 'while kill -0 "$1" 2>/dev/null && [ -e "$2/api" ]; do sleep 1; done; "$3" down "$2"; [ -z "$4" ] || rm -rf "$2"' \
            watch "$watch" "$dir" "$here/control-plane.sh" "$remove" >/dev/null 2>&1 < /dev/null &
        echo $! > "$dir/pids/watch.pid"
    fi
    log "up in $((SECONDS - started)) s: $api (KUBECONFIG=$dir/kubeconfig)"
    echo "$dir/kubeconfig"
}

cmd_down() {
    local dir="${1:?usage: control-plane.sh down DIR}" c pid
    [ -d "$dir/pids" ] || return 0
    rm -f "$dir/api"
    # The reverse order of start; TERM, then KILL after a bounded wait.
    for c in kwok kube-scheduler kube-controller-manager kube-apiserver etcd; do
        [ -f "$dir/pids/$c.pid" ] || continue
        pid="$(cat "$dir/pids/$c.pid")"
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
        rm -f "$dir/pids/$c.pid"
    done
    if [ -f "$dir/pids/watch.pid" ]; then
        pid="$(cat "$dir/pids/watch.pid")"
        rm -f "$dir/pids/watch.pid"
        [ "$pid" != "$$" ] && [ "$pid" != "$PPID" ] && kill "$pid" 2>/dev/null || true
    fi
    log "stopped the control plane in $dir"
}

case "${1:-}" in
    build) cmd_build ;;
    up) shift; cmd_up "$@" ;;
    down) shift; cmd_down "$@" ;;
    versions) echo "kubernetes $K8S_VERSION, etcd $ETCD_VERSION, kwok $KWOK_VERSION" ;;
    *) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; [ -z "${1:-}" ] || exit 2 ;;
esac
