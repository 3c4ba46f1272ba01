#!/usr/bin/env bash
# Screenshot of one MLflow run's metric charts (the run page's "Model metrics" tab), for the README.
#
# Starts a throwaway `mlflow server` on 127.0.0.1 (a free port) over the given tracking store,
# waits for /health, looks up the experiment and run ids by name (the latest run of that name),
# opens
#   http://127.0.0.1:PORT/#/experiments/<experiment_id>/runs/<run_id>/model-metrics?workflowType=machine_learning
# in headless Chromium (Debian's /usr/bin/chromium), waits until every chart in the window has
# been drawn and writes the PNG. The server (and Chromium) are stopped on exit (trap).
# Installs nothing: if Chromium is missing it says how to get it.
#
# Run from the repository root, after `make demo` (and, once, `apt-get install -y chromium`):
#   infra/screenshot/mlflow_run.sh                           # demo store -> docs/mlflow-run-metrics.png
#   infra/screenshot/mlflow_run.sh --store sqlite:////abs/path/mlflow.db --experiment demo \
#       --run demo --out docs/mlflow-run-metrics.png [--artifacts DIR]
# The same settings as environment variables (flags win):
#   STORE_URI       backend store URI        (default sqlite:///$PWD/demo/mlflow.db)
#   EXPERIMENT      experiment name          (default demo)
#   RUN_NAME        run name                 (default demo)
#   OUT             output PNG               (default docs/mlflow-run-metrics.png)
#   ARTIFACTS       server's artifact root   (default: the mlartifacts/ folder next to a SQLite store)
#   WINDOW_SIZE     browser window, W,H      (default 1600,1780: the 12 demo charts, 3 per row)
#   RENDER_TIMEOUT  seconds to wait for the charts (default 120)
#   CHROMIUM        Chromium binary          (default /usr/bin/chromium)
# Needs the project venv (.venv, `make install`) or an `mlflow` on PATH. Takes ~40-90 s on 2 cores.
#
# Why not just `chromium --headless --screenshot --virtual-time-budget=...`: that works (with a
# budget of ~60 s), but the UI of a server on localhost opens its "MLflow Assistant" side panel on
# first load, covering a third of the charts, and a fixed budget is a guess. So Chromium is driven
# over the DevTools protocol instead (--remote-debugging-pipe, Python stdlib only, no open port):
# two localStorage entries mark the panel as already shown and closed (and should it open anyway,
# its Close button is clicked), then it waits until the charts are drawn.
set -euo pipefail

STORE_URI=${STORE_URI:-sqlite:///$PWD/demo/mlflow.db}
EXPERIMENT=${EXPERIMENT:-demo}
RUN_NAME=${RUN_NAME:-demo}
OUT=${OUT:-docs/mlflow-run-metrics.png}
ARTIFACTS=${ARTIFACTS:-}
WINDOW_SIZE=${WINDOW_SIZE:-1600,1780}
RENDER_TIMEOUT=${RENDER_TIMEOUT:-120}
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}

die() { echo "mlflow_run.sh: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

while (( $# )); do
    case $1 in
        --store) STORE_URI=${2:?}; shift 2 ;;
        --experiment) EXPERIMENT=${2:?}; shift 2 ;;
        --run) RUN_NAME=${2:?}; shift 2 ;;
        --out) OUT=${2:?}; shift 2 ;;
        --artifacts) ARTIFACTS=${2:?}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
[[ $WINDOW_SIZE =~ ^[0-9]+,[0-9]+$ ]] || die "WINDOW_SIZE must be W,H (e.g. 1600,1780), not '$WINDOW_SIZE'"

[[ -x $CHROMIUM ]] || die "$CHROMIUM not found: install it with  apt-get install -y chromium  (as root)"
if [[ -x .venv/bin/mlflow ]]; then
    MLFLOW=.venv/bin/mlflow PY=.venv/bin/python
else
    MLFLOW=$(command -v mlflow) || die "no mlflow: run 'make install' (creates .venv) or put mlflow on PATH"
    PY=$(dirname "$MLFLOW")/python
    [[ -x $PY ]] || PY=python3
fi

# A SQLite store must exist (the server would otherwise quietly create an empty one).
if [[ $STORE_URI == sqlite:///* ]]; then
    db=${STORE_URI#sqlite:///}
    [[ -f $db ]] || die "no store at $db: run 'make demo' first, or pass --store"
    [[ -n $ARTIFACTS || ! -d $(dirname "$db")/mlartifacts ]] || ARTIFACTS=$(dirname "$db")/mlartifacts
fi

WORK=$(mktemp -d)
# Runs keep their own absolute artifact URIs; the root only matters for what the server writes.
ARTIFACTS=${ARTIFACTS:-$WORK/artifacts}
SERVER_PID=
cleanup() {
    if [[ -n $SERVER_PID ]]; then
        kill -- "-$SERVER_PID" 2>/dev/null || true   # its own process group: server and workers
        for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 -- "-$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL=http://127.0.0.1:$PORT
start=$SECONDS

# set -m: the server gets a process group of its own (pgid = its pid), which the trap stops.
# No job runner, no telemetry: only the UI and its REST API, on loopback.
set -m
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true \
    "$MLFLOW" server --backend-store-uri "$STORE_URI" --artifacts-destination "$ARTIFACTS" \
    --host 127.0.0.1 --port "$PORT" --workers 1 >"$WORK/server.log" 2>&1 </dev/null &
SERVER_PID=$!
set +m

health() { "$PY" -c 'import sys, urllib.request; sys.exit(urllib.request.urlopen(sys.argv[1], timeout=2).read() != b"OK")' "$URL/health" 2>/dev/null; }
for _ in $(seq 240); do
    health && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log" >&2; die "mlflow server exited"; }
    sleep 0.5
done
health || { tail -20 "$WORK/server.log" >&2; die "mlflow server did not answer $URL/health within 120 s"; }
echo "mlflow server up at $URL after $((SECONDS - start)) s"

read -r EXP_ID RUN_ID < <("$PY" - "$URL" "$EXPERIMENT" "$RUN_NAME" <<'PY'
import sys
from mlflow.tracking import MlflowClient

url, exp_name, run_name = sys.argv[1:]
client = MlflowClient(tracking_uri=url)
exp = client.get_experiment_by_name(exp_name)
if exp is None:
    sys.exit(f"no experiment named {exp_name!r}")
quoted = run_name.replace("'", "\\'")
runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{quoted}'",
                          order_by=["attributes.start_time DESC"], max_results=1)
if not runs:
    sys.exit(f"no run named {run_name!r} in experiment {exp_name!r}")
print(exp.experiment_id, runs[0].info.run_id)
PY
) || true
[[ -n ${RUN_ID:-} ]] || die "could not find run '$RUN_NAME' in experiment '$EXPERIMENT'"
# workflowType=machine_learning: the sidebar of the "Model training" view, not the GenAI one.
PAGE="$URL/#/experiments/$EXP_ID/runs/$RUN_ID/model-metrics?workflowType=machine_learning"
echo "run $RUN_ID (experiment $EXP_ID): $PAGE"

mkdir -p "$(dirname "$OUT")"
"$PY" - "$CHROMIUM" "$PAGE" "$OUT" "$WINDOW_SIZE" "$RENDER_TIMEOUT" "$WORK/chromium" <<'PY'
# Drive headless Chromium over the DevTools protocol on a pipe (fd 3: to Chromium, fd 4: from it;
# NUL-separated JSON messages): no debugging port, nothing beyond the standard library.
import base64, fcntl, json, os, subprocess, sys, time

chromium, url, out, size, timeout, profile = sys.argv[1:]
width, height = map(int, size.split(","))
to_r, to_w = os.pipe()
from_r, from_w = os.pipe()
to_r, from_w = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_r, from_w))  # out of the way of 3, 4

def child_fds():
    os.dup2(to_r, 3)
    os.dup2(from_w, 4)

browser = subprocess.Popen(
    [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
     "--disable-background-networking", "--disable-component-update", "--disable-sync",
     "--hide-scrollbars", "--force-device-scale-factor=1", f"--user-data-dir={profile}",
     f"--window-size={width},{height}", "--remote-debugging-pipe", "about:blank"],
    pass_fds=(3, 4), preexec_fn=child_fds, stdin=subprocess.DEVNULL,
    stdout=subprocess.DEVNULL, stderr=open(profile + ".log", "w"))
for fd in (to_r, from_w):
    os.close(fd)
buf, last_id = b"", 0

def call(method, session=None, **params):
    global buf, last_id
    last_id += 1
    msg = {"id": last_id, "method": method, "params": params}
    if session:
        msg["sessionId"] = session
    os.write(to_w, json.dumps(msg).encode() + b"\0")
    while True:
        while b"\0" not in buf:
            chunk = os.read(from_r, 1 << 20)
            if not chunk:
                sys.exit(f"chromium went away during {method} (log: {profile}.log)")
            buf += chunk
        raw, buf = buf.split(b"\0", 1)
        reply = json.loads(raw)
        if reply.get("id") == last_id:
            if "error" in reply:
                sys.exit(f"{method}: {reply['error']}")
            return reply["result"]

# Is every chart card that starts inside the window drawn (cards off-screen are drawn lazily)?
# If the Assistant panel opened anyway, close it (and count that as not ready yet).
STATE = """(() => {
  const close = document.querySelector('button[data-component-id="mlflow.assistant.chat_panel.close"]');
  if (close) close.click();
  const grid = document.querySelector('[data-testid=draggable-chart-cards-grid]');
  const cards = grid ? [...grid.children] : [];
  const inView = cards.filter(c => c.getBoundingClientRect().top < innerHeight);
  const drawn = inView.filter(c => c.querySelector('.js-plotly-plot .scatterlayer .trace'));
  return {cards: cards.length, inView: inView.length, drawn: drawn.length, panel: !!close,
          text: document.body ? document.body.innerText.slice(0, 300) : ''};
})()"""
try:
    target = call("Target.createTarget", url="about:blank")["targetId"]
    s = call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    call("Emulation.setDeviceMetricsOverride", s, width=width, height=height,
         deviceScaleFactor=1, mobile=False)
    call("Page.enable", s)
    # The UI (for a server on localhost) opens its Assistant side panel once, on first load:
    # mark that as done and the panel as closed (keys: `${key}_v${version}`, JSON values).
    call("Page.addScriptToEvaluateOnNewDocument", s, source="""try {
      localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
      localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
    } catch (e) {}""")
    call("Page.navigate", s, url=url)
    t0, ready_since, state = time.monotonic(), None, {}
    while time.monotonic() - t0 < float(timeout):
        time.sleep(0.5)
        state = call("Runtime.evaluate", s, expression=STATE, returnByValue=True)["result"]["value"]
        ready = state["inView"] > 0 and state["drawn"] == state["inView"] and not state["panel"]
        ready_since = (ready_since or time.monotonic()) if ready else None
        if ready_since and time.monotonic() - ready_since >= 2:   # let the last charts settle
            break
    else:
        sys.exit(f"charts not drawn after {timeout} s: {state}")
    print(f"{state['drawn']} of {state['cards']} charts drawn after {time.monotonic() - t0:.0f} s"
          + ("" if state["drawn"] == state["cards"] else " (a taller WINDOW_SIZE shows the rest)"))
    png = call("Page.captureScreenshot", s, format="png")["data"]
    with open(out, "wb") as f:
        f.write(base64.b64decode(png))
    try:
        call("Browser.close")
    except SystemExit:
        pass
    browser.wait(10)
finally:
    if browser.poll() is None:
        browser.kill()
        browser.wait()
PY
echo "wrote $OUT ($(( $(stat -c %s "$OUT") / 1024 )) KiB) in $((SECONDS - start)) s"
