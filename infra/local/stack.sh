# Shared settings of the local stack, sourced by up.sh and down.sh (not run on its own).
#
# Everything listens on loopback only: STACK_HOST is not a setting. Ports are variables; the
# defaults sit next to, not on, each program's own default port, so the stack does not collide
# with a `weed mini`, `mlflow server` or `ray start` that a test or a person starts with defaults.
# The weed gRPC ports and Ray's worker ports are pinned outside 10002-19999 (the worker-port
# range every other Ray on the machine draws from) and below the kernel's ephemeral range.

STACK_HOST=127.0.0.1
ROOT=${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
VENV=${VENV:-$ROOT/.venv}
STACK_DIR=${STACK_DIR:-$ROOT/.stack}

# S3 (SeaweedFS). `weed mini` defaults: 8333 (S3), 9333 (master), 9340 (volume), 8888 (filer),
# 23646 (admin), gRPC at each +10000.
STACK_S3_PORT=${STACK_S3_PORT:-8433}
STACK_WEED_MASTER_PORT=${STACK_WEED_MASTER_PORT:-9433}
STACK_WEED_VOLUME_PORT=${STACK_WEED_VOLUME_PORT:-9440}
STACK_WEED_FILER_PORT=${STACK_WEED_FILER_PORT:-8988}
STACK_WEED_ADMIN_PORT=${STACK_WEED_ADMIN_PORT:-23746}
STACK_WEED_GRPC_BASE=${STACK_WEED_GRPC_BASE:-24000}   # gRPC ports: base+1 .. base+5
STACK_BUCKET=${STACK_BUCKET:-alexnet}
STACK_S3_ACCESS_KEY=${STACK_S3_ACCESS_KEY:-alexnet-local}
STACK_REGION=${STACK_REGION:-us-east-1}   # SeaweedFS ignores it; boto3 and MLflow want one

# MLflow tracking server (its default port is 5000).
STACK_MLFLOW_PORT=${STACK_MLFLOW_PORT:-5055}

# Ray head (defaults: GCS 6379, dashboard 8265, client 10001, dashboard agent 52365).
STACK_RAY_PORT=${STACK_RAY_PORT:-6380}
STACK_RAY_CLIENT_PORT=${STACK_RAY_CLIENT_PORT:-6381}
STACK_RAY_DASHBOARD_PORT=${STACK_RAY_DASHBOARD_PORT:-8266}
STACK_RAY_AGENT_PORT=${STACK_RAY_AGENT_PORT:-8267}
STACK_RAY_MIN_WORKER_PORT=${STACK_RAY_MIN_WORKER_PORT:-20100}
STACK_RAY_MAX_WORKER_PORT=${STACK_RAY_MAX_WORKER_PORT:-20999}
STACK_RAY_CPUS=${STACK_RAY_CPUS:-2}
STACK_RAY_OBJECT_STORE_BYTES=${STACK_RAY_OBJECT_STORE_BYTES:-1000000000}  # 1 GB: shards travel as files, not objects

PIDS=$STACK_DIR/pids
LOGS=$STACK_DIR/logs

# pid_alive NAME WORD: the pid in $PIDS/NAME.pid is running and is still the program we
# started (its command line contains WORD), so a recycled pid is never signalled.
pid_alive() {
    local f=$PIDS/$1.pid pid
    [[ -f $f ]] || return 1
    pid=$(<"$f")
    [[ $pid =~ ^[0-9]+$ ]] && [[ -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$2"
}

# port_open PORT: something accepts TCP connections on loopback:PORT.
port_open() {
    (exec 3<>"/dev/tcp/$STACK_HOST/$1") 2>/dev/null
}
