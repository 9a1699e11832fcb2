#!/usr/bin/env bash
# `make compose-up` / `make compose-down`: the compose cluster with nothing but Debian packages.
#
#   deploy/compose/cluster.sh up     docker (installed and started if missing), the images
#                                    (build-images.sh), `docker-compose up -d`, then waits for the
#                                    gateway and the demo deploy and prints the URL and API key
#   deploy/compose/cluster.sh down   removes the project's containers, networks and volumes
#
# Environment: SNAPWAKE_GATEWAY_PORT (8000), SNAPWAKE_ADMIN_PORT (7001), SNAPWAKE_API_KEY (made
# once and kept in var/compose/api-key), SNAPWAKE_PKI_DIR (var/compose/pki: the development CA
# and the services' certificates, made once), SNAPWAKE_ACCESS_DIR (var/compose/access: the admin
# API's operator token, the gateway's token and the API-key secret, made once, registered by the
# scheduler at start-up), COMPOSE_PROFILES (cpu), SNAPWAKE_COMPOSE_TIMEOUT
# (seconds for the gateway and the demo deploy, 600).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PROJECT=snapwake
FILE=$ROOT/deploy/compose/docker-compose.yml
STATE=$ROOT/var/compose
PY=${PY:-$ROOT/.venv/bin/python}
DOCKERD_LOG=/var/log/snapwake-dockerd.log
export SNAPWAKE_GATEWAY_PORT=${SNAPWAKE_GATEWAY_PORT:-8000}
export SNAPWAKE_ADMIN_PORT=${SNAPWAKE_ADMIN_PORT:-7001}
export SNAPWAKE_BASE_IMAGE=snapwake/python-base:bookworm SNAPWAKE_ETCD_IMAGE=snapwake/etcd:bookworm
export COMPOSE_PROFILES=${COMPOSE_PROFILES:-cpu}
TIMEOUT=${SNAPWAKE_COMPOSE_TIMEOUT:-600}

log() { echo "compose: $*" >&2; }
compose() { docker-compose -p "$PROJECT" -f "$FILE" "$@"; }

# There is no systemd here and CI starts nothing: install docker.io if need be and start dockerd
# once, detached from this shell, with a bounded wait for its socket.
ensure_docker() {
  command -v dockerd >/dev/null || bash "$ROOT/scripts/install-system.sh" docker.io
  docker info >/dev/null 2>&1 && return
  [ "$(id -u)" -eq 0 ] || { log "docker is not running and only root can start dockerd"; exit 1; }
  log "starting dockerd (log: $DOCKERD_LOG)"
  setsid dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && return
    sleep 1
  done
  log "dockerd did not answer within 60 s; see $DOCKERD_LOG"
  exit 1
}

api_key() {
  if [ -z "${SNAPWAKE_API_KEY:-}" ]; then
    mkdir -p "$STATE"
    [ -s "$STATE/api-key" ] || (umask 077 && echo "sk-snapwake-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')" >"$STATE/api-key")
    SNAPWAKE_API_KEY=$(cat "$STATE/api-key")
  fi
  export SNAPWAKE_API_KEY
}

# wait_until SECONDS WHAT COMMAND...: runs COMMAND each second until it succeeds.
wait_until() {
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { log "no $what after $TIMEOUT s"; compose logs --tail=40 >&2; return 1; }
    sleep 1
  done
}

gateway_answers() {
  "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1/healthz"
}

deploy_exited() {
  local id
  id=$(compose ps -q deploy-demo)
  [ -n "$id" ] && [ "$(docker inspect -f '{{.State.Status}}' "$id")" = exited ]
}

# The development CA and one certificate per service and node (kept once made), mounted by
# docker-compose.yml from $SNAPWAKE_PKI_DIR: the services' mutual TLS, and the etcd client
# certificates of the scheduler and nodeagents (the same folders) plus etcd's and its root's.
certificates() {
  export SNAPWAKE_PKI_DIR=${SNAPWAKE_PKI_DIR:-$STATE/pki}
  (cd "$ROOT" && "$PY" -m snapwake.pki "$SNAPWAKE_PKI_DIR" scheduler/scheduler=scheduler gateway/gateway \
    nodeagent/node-1=node-1 blobstore/node-1=node-1 nodeagent/node-2=node-2 blobstore/node-2=node-2 \
    etcd/etcd=etcd admin/etcd-root >/dev/null)
}

# The admin API's first credentials (kept once made): the operator's token (printed by `up`),
# the gateway's, and the API-key secret. Made here without etcd; the scheduler stores each
# token's digest in etcd when it starts (SNAPWAKE_ADMIN_TOKEN_FILES, docker-compose.yml).
access() {
  export SNAPWAKE_ACCESS_DIR=${SNAPWAKE_ACCESS_DIR:-$STATE/access}
  (cd "$ROOT" \
    && "$PY" -m services.scheduler.bootstrap --generate --token-file "$SNAPWAKE_ACCESS_DIR/operator/operator.token" \
    && "$PY" -m services.scheduler.bootstrap --generate --token-file "$SNAPWAKE_ACCESS_DIR/gateway/gateway.token" \
         --secret-file "$SNAPWAKE_ACCESS_DIR/gateway/apikey.secret") >/dev/null
}

up() {
  ensure_docker
  api_key
  certificates
  access
  "$ROOT/deploy/compose/build-images.sh" services
  compose up -d --no-build
  local url=http://localhost:$SNAPWAKE_GATEWAY_PORT
  wait_until "$TIMEOUT" "gateway on $url" gateway_answers "$url"
  log "deploying the demo model (snapshot build and an instance on each node) ..."
  wait_until "$TIMEOUT" "demo deploy" deploy_exited
  local status
  status=$(docker inspect -f '{{.State.ExitCode}}' "$(compose ps -q deploy-demo)")
  if [ "$status" != 0 ]; then
    compose logs deploy-demo >&2
    log "the demo deploy failed (exit $status)"
    exit 1
  fi
  cat <<EOF

Snapwake is up (docker-compose project $PROJECT, profiles $COMPOSE_PROFILES).
  OpenAI base URL: $url/v1
  API key: $SNAPWAKE_API_KEY
  admin API (gRPC over TLS): 127.0.0.1:$SNAPWAKE_ADMIN_PORT (CA $SNAPWAKE_PKI_DIR/ca.crt)
  admin token: $(cat "$SNAPWAKE_ACCESS_DIR/operator/operator.token") (operator; file $SNAPWAKE_ACCESS_DIR/operator/operator.token)
  dashboard: $url/dashboard/

Try:
  snapwake --scheduler 127.0.0.1:$SNAPWAKE_ADMIN_PORT --ca $SNAPWAKE_PKI_DIR/ca.crt --token-file $SNAPWAKE_ACCESS_DIR/operator/operator.token list
  curl $url/v1/chat/completions -H "Authorization: Bearer $SNAPWAKE_API_KEY" -H 'Content-Type: application/json' -d '{"model": "demo", "messages": [{"role": "user", "content": "hello"}]}'

make compose-down removes it all.
EOF
}

down() {
  if ! docker info >/dev/null 2>&1; then
    log "docker is not running: nothing to remove"
    return
  fi
  # The file requires a key; down does not use it.
  SNAPWAKE_API_KEY=${SNAPWAKE_API_KEY:-unused} COMPOSE_PROFILES=cpu,gpu,observability compose down -v --remove-orphans --timeout 30
  # Anything the project still labels (a container of a service since removed from the file).
  local label=label=com.docker.compose.project=$PROJECT
  docker ps -aq --filter "$label" | xargs -r docker rm -f >/dev/null
  docker network ls -q --filter "$label" | xargs -r docker network rm >/dev/null
  docker volume ls -q --filter "$label" | xargs -r docker volume rm >/dev/null
  # The nodes' instance cgroups live in the host's tree; runc removed them, the parents remain.
  for dir in /sys/fs/cgroup/snapwake-compose /sys/fs/cgroup/*/snapwake-compose; do
    [ ! -d "$dir" ] || find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
  log "removed project $PROJECT"
}

case ${1:-} in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
