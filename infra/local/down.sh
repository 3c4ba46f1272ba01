#!/usr/bin/env bash
# make down: stop the local stack that up.sh started (Ray head, MLflow server, SeaweedFS).
# Safe to run twice, and when nothing runs. The state in .stack/ stays (runs, buckets,
# credentials) for the next `make up`; `rm -rf .stack` after `make down` forgets it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/stack.sh"

# stop NAME WORD GRACE [TARGET]: SIGTERM the pid we recorded (TARGET=group: its whole process
# group), give it GRACE seconds, then SIGKILL what is left of the group. Each service runs in a
# session of its own (up.sh's setsid), so its group holds only that service's processes:
# MLflow's uvicorn worker, Ray's GCS, raylet, dashboard and workers.
stop() {
    local name=$1 word=$2 grace=$3 target=${4:-leader} pid t
    if ! pid_alive "$name" "$word"; then
        echo "down: $name not running"
        rm -f "$PIDS/$name.pid"
        return 0
    fi
    pid=$(<"$PIDS/$name.pid")
    if [[ $target == group ]]; then kill -TERM -- "-$pid" 2>/dev/null || true
    else kill -TERM "$pid" 2>/dev/null || true; fi
    for ((t = 0; t < grace * 2; t++)); do
        kill -0 -- "-$pid" 2>/dev/null || break
        sleep 0.5
    done
    if kill -0 -- "-$pid" 2>/dev/null; then   # the leader or any of its group is still there
        kill -KILL -- "-$pid" 2>/dev/null || true
        for ((t = 0; t < 20; t++)); do
            kill -0 -- "-$pid" 2>/dev/null || break
            sleep 0.25
        done
        echo "down: $name stopped (pid $pid, SIGKILL after ${grace}s)"
    else
        echo "down: $name stopped (pid $pid)"
    fi
    rm -f "$PIDS/$name.pid"
}

# Ray first: running jobs write to S3 and MLflow until they end. The `ray start --block` parent
# shuts its head's processes down in order on SIGTERM (a few seconds; signalling them all at
# once can leave it hanging). `ray stop` is not used: it stops every Ray on the machine, other
# people's and the tests' included.
stop ray "ray start" 30
# MLflow: the whole group at once (the CLI process, its uvicorn server), all exit by themselves.
stop mlflow "mlflow server" 20 group
# SeaweedFS needs more than 20 s to exit on SIGTERM: a short wait, then SIGKILL. That loses
# nothing it acknowledged: acknowledged writes are already in its files (the kernel's to flush).
stop weed "weed -logdir=" 3
