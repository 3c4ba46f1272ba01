#!/usr/bin/env bash
# Screenshots of the demo in the MLflow UI, for the README. Four views (--view, default metrics):
#   metrics     one run's metric charts (the run page's "Model metrics" tab)
#               -> docs/mlflow-run-metrics.png
#   runs        the experiment's runs table with every nested run expanded (the tree: pipeline ->
#               index, shard, stats, demo -> evaluate, evaluate-10crop) -> docs/mlflow-runs.png
#   evaluation  the latest `evaluate` run's Artifacts tab showing confusion_matrix.png
#               -> docs/mlflow-evaluation.png
#   models      the experiment's logged models (the "Models" tab: each epoch's checkpoint epoch-1 ..
#               epoch-N and the final model) ranked by val_top1, best first
#               -> docs/mlflow-checkpoint-models.png
#
# Starts a throwaway `mlflow server` on 127.0.0.1 (a free port) over the given tracking store,
# waits for /health, looks up the experiment and run ids by name (the latest run of that name;
# models: the experiment's logged models as the REST API ranks them by val_top1),
# opens (all with ?workflowType=machine_learning: the "Model training" sidebar, not the GenAI one)
#   metrics:    http://127.0.0.1:PORT/#/experiments/<experiment_id>/runs/<run_id>/model-metrics
#   runs:       http://127.0.0.1:PORT/#/experiments/<experiment_id>/runs
#   evaluation: http://127.0.0.1:PORT/#/experiments/<experiment_id>/runs/<run_id>/artifacts/<file>
#   models:     http://127.0.0.1:PORT/#/experiments/<experiment_id>/models
# in headless Chromium (Debian's /usr/bin/chromium), waits until the view is ready (metrics: every
# chart in the window drawn; runs: every parent run's children shown, the Run Name and Source
# columns widened until nothing is cut off; evaluation: the image loaded; models: the columns
# picked, the rows in the order the REST API ranks them by val_top1 and the values descending)
# and writes the PNG.
# The server (and Chromium) are stopped on exit (trap).
# Installs nothing: if Chromium is missing it says how to get it.
#
# Run from the repository root, after `make demo` (and, once, `apt-get install -y chromium`):
#   infra/screenshot/mlflow_run.sh                           # demo store -> docs/mlflow-run-metrics.png
#   infra/screenshot/mlflow_run.sh --view runs               # -> docs/mlflow-runs.png
#   infra/screenshot/mlflow_run.sh --view evaluation         # -> docs/mlflow-evaluation.png
#   infra/screenshot/mlflow_run.sh --view models             # -> docs/mlflow-checkpoint-models.png
#   infra/screenshot/mlflow_run.sh --store sqlite:////abs/path/mlflow.db --experiment demo \
#       --run demo --out docs/mlflow-run-metrics.png [--artifacts DIR] [--view metrics]
#   infra/screenshot/mlflow_run.sh --view evaluation --run evaluate-10crop --file confusion_matrix.png \
#       --out /tmp/cm-10crop.png
# The same settings as environment variables (flags win):
#   VIEW            metrics, runs, evaluation or models (default metrics)
#   STORE_URI       backend store URI        (default sqlite:///$PWD/demo/mlflow.db)
#   EXPERIMENT      experiment name          (default demo)
#   RUN_NAME        run name                 (default demo; evaluation: evaluate; runs, models: unused)
#   OUT             output PNG               (default docs/mlflow-run-metrics.png, docs/mlflow-runs.png,
#                                             docs/mlflow-evaluation.png, docs/mlflow-checkpoint-models.png)
#   ARTIFACT_FILE   evaluation: the image shown, a path in the run's artifacts (--file;
#                                             default confusion_matrix.png)
#   ARTIFACTS       server's artifact root   (default: the mlartifacts/ folder next to a SQLite store)
#   WINDOW_SIZE     browser window, W,H      (default metrics 1600,1780: the 12 demo charts, 3 per
#                                             row; runs 1600,560: the 7 demo runs; evaluation 1600,800;
#                                             models 1600,600: the demo's 9 models)
#   RENDER_TIMEOUT  seconds to wait for the view (default 120)
#   CHROMIUM        Chromium binary          (default /usr/bin/chromium)
# Needs the project venv (.venv, `make install`) or an `mlflow` on PATH. Takes ~20-90 s on 2 cores
# (each view; mostly the server's start).
#
# Why not just `chromium --headless --screenshot --virtual-time-budget=...`: that works (with a
# budget of ~60 s), but the UI of a server on localhost opens its "MLflow Assistant" side panel on
# first load, covering a third of the charts, and a fixed budget is a guess. So Chromium is driven
# over the DevTools protocol instead (--remote-debugging-pipe, Python stdlib only, no open port):
# two localStorage entries mark the panel as already shown and closed (and should it open anyway,
# its Close button is clicked), then it waits until the view is ready.
#
# What the views rely on in the MLflow UI (3.17; fix here when it changes):
#   runs: the expand/collapse button of a parent run is
#     button[data-component-id$="runnamecellrenderer.tsx_46"] (no aria-expanded; the icon is a plus
#     or minus square), inside its ag-grid row [role=row][row-id=<run_id>]. Which rows should show
#     children comes from the REST API (mlflow.parentRunId tags): a parent is clicked while a child
#     of it has no row (again after 10 s, should the click have got lost). Columns are widened by
#     dragging (mouse events) the ag-grid resize handle
#     .ag-header-cell[col-id="attributes.`Run Name`"] .ag-header-cell-resize (same for `Source`)
#     by what the text its cells cut off with an ellipsis lacks (scrollWidth - clientWidth).
#   evaluation: the route .../runs/<run_id>/artifacts/<path> selects the file; the preview is an
#     <img> under .mlflow-artifact-right. Should the route stop selecting it, the file's tree node
#     [data-testid=artifact-tree-node][artifact-name=<file>] is clicked.
#   models: the route has no sort parameter (the list's sort and columns live in React state), and
#     the UI offers no sorting by a metric: its metric columns are not sortable and its Sort button
#     button[data-component-id="mlflow.logged_model.list.sort"] only flips Created (both behind a
#     feature flag that is off in 3.17). So the table is sorted through ag-grid's column API (the
#     columnApi bean of the context of an ag-grid element's __agComponent): applyColumnState with
#     the val_top1 column (col-id metrics.{"metricKey":"val_top1","datasetName":..,"datasetDigest":..})
#     descending fires the grid's sortChanged, on which the UI asks its REST API for the models
#     ordered by metrics.val_top1 of that dataset. The Sort button, whose label stays "Sort: Created",
#     is then hidden. Columns are chosen in the picker that
#     button[data-component-id="mlflow.logged_model.list.columns"] opens on pointerdown (a [role=menu]
#     holding a checkable tree: nodes *-tree-treenode found by title, their *-tree-checkbox clicked,
#     their state in the classes *-tree-treenode-checkbox-checked / -indeterminate): Status, Logged
#     from, Dataset, Parameters and the "No dataset" metrics off, leaving Model name, Created, Source
#     run, Registered models and the dataset's metrics (val_loss, val_top1, val_top5). It is opened
#     only once rows are shown (its tree keeps the check marks it opened with) and closed with Escape.
#     Rows are read from .ag-row[row-index] .ag-cell[col-id] (the name: the link in col-id "name"; a
#     cell's col-id is HTML-escaped, &quot;) and must list the models in the order of the REST API
#     (POST /api/2.0/mlflow/logged-models/search, order_by [{"field_name": "metrics.val_top1",
#     "ascending": false}]: best first, the final model, which has no val_top1, last) with the
#     val_top1 values shown descending.
set -euo pipefail

VIEW=${VIEW:-metrics}
STORE_URI=${STORE_URI:-sqlite:///$PWD/demo/mlflow.db}
EXPERIMENT=${EXPERIMENT:-demo}
RUN_NAME=${RUN_NAME:-}
OUT=${OUT:-}
ARTIFACT_FILE=${ARTIFACT_FILE:-confusion_matrix.png}
ARTIFACTS=${ARTIFACTS:-}
WINDOW_SIZE=${WINDOW_SIZE:-}
RENDER_TIMEOUT=${RENDER_TIMEOUT:-120}
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}

die() { echo "mlflow_run.sh: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

while (( $# )); do
    case $1 in
        --view) VIEW=${2:?}; shift 2 ;;
        --store) STORE_URI=${2:?}; shift 2 ;;
        --experiment) EXPERIMENT=${2:?}; shift 2 ;;
        --run) RUN_NAME=${2:?}; shift 2 ;;
        --out) OUT=${2:?}; shift 2 ;;
        --file) ARTIFACT_FILE=${2:?}; shift 2 ;;
        --artifacts) ARTIFACTS=${2:?}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
case $VIEW in
    metrics)    RUN_NAME=${RUN_NAME:-demo} OUT=${OUT:-docs/mlflow-run-metrics.png} WINDOW_SIZE=${WINDOW_SIZE:-1600,1780} ;;
    runs)       RUN_NAME=- OUT=${OUT:-docs/mlflow-runs.png} WINDOW_SIZE=${WINDOW_SIZE:-1600,560} ;;
    evaluation) RUN_NAME=${RUN_NAME:-evaluate} OUT=${OUT:-docs/mlflow-evaluation.png} WINDOW_SIZE=${WINDOW_SIZE:-1600,800} ;;
    models)     RUN_NAME=- OUT=${OUT:-docs/mlflow-checkpoint-models.png} WINDOW_SIZE=${WINDOW_SIZE:-1600,600} ;;
    *) die "VIEW (--view) must be metrics, runs, evaluation or models, not '$VIEW'" ;;
esac
[[ $WINDOW_SIZE =~ ^[0-9]+,[0-9]+$ ]] || die "WINDOW_SIZE must be W,H (e.g. 1600,1780), not '$WINDOW_SIZE'"
[[ -n $ARTIFACT_FILE && $ARTIFACT_FILE != /* ]] || die "ARTIFACT_FILE (--file) must be a path inside the run's artifacts, not '$ARTIFACT_FILE'"

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

read -r EXP_ID RUN_ID < <("$PY" - "$URL" "$EXPERIMENT" "$RUN_NAME" "$VIEW" "$ARTIFACT_FILE" "$WORK/runs.json" <<'PY'
import json, posixpath, sys
from mlflow.tracking import MlflowClient

url, exp_name, run_name, view, artifact, runs_json = sys.argv[1:]
client = MlflowClient(tracking_uri=url)
exp = client.get_experiment_by_name(exp_name)
if exp is None:
    sys.exit(f"no experiment named {exp_name!r}")
if view == "runs":
    # Which runs the table should show under which: the experiment's active runs (what the table
    # lists by default) by their mlflow.parentRunId tag.
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    ids = {r.info.run_id for r in runs}
    children = {}
    for r in runs:
        parent = r.data.tags.get("mlflow.parentRunId")
        if parent in ids:
            children.setdefault(parent, []).append(r.info.run_id)
    with open(runs_json, "w") as f:
        json.dump({"runs": len(runs), "children": children}, f)
    print(exp.experiment_id, "-")
    sys.exit()
if view == "models":
    # The order the table should show: the experiment's logged models as the REST API ranks them
    # by val_top1, best first (models without it last), what the UI asks for once sorted by it.
    import urllib.request
    models, token = [], None
    while True:
        body = {"experiment_ids": [exp.experiment_id], "max_results": 100,
                "order_by": [{"field_name": "metrics.val_top1", "ascending": False}]}
        if token:
            body["page_token"] = token
        req = urllib.request.Request(url + "/api/2.0/mlflow/logged-models/search",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        page = json.load(urllib.request.urlopen(req, timeout=30))
        models += page.get("models", [])
        token = page.get("next_page_token")
        if not token:
            break
    ranked = [{"name": m["info"]["name"],
               "value": next((x["value"] for x in m.get("data", {}).get("metrics", [])
                              if x["key"] == "val_top1"), None)} for m in models]
    if not any(m["value"] is not None for m in ranked):
        sys.exit(f"no logged model with a val_top1 metric in experiment {exp_name!r}")
    with open(runs_json, "w") as f:
        json.dump({"metric": "val_top1", "models": ranked}, f)
    print(exp.experiment_id, "-")
    sys.exit()
quoted = run_name.replace("'", "\\'")
runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{quoted}'",
                          order_by=["attributes.start_time DESC"], max_results=1)
if not runs:
    sys.exit(f"no run named {run_name!r} in experiment {exp_name!r}")
if view == "evaluation":
    run_id, folder = runs[0].info.run_id, posixpath.dirname(artifact)
    if artifact not in {a.path for a in client.list_artifacts(run_id, folder or None)}:
        sys.exit(f"run {run_name!r} ({run_id}) has no artifact {artifact!r}")
print(exp.experiment_id, runs[0].info.run_id)
PY
) || true
# workflowType=machine_learning: the sidebar of the "Model training" view, not the GenAI one.
case $VIEW in
    metrics)
        [[ -n ${RUN_ID:-} ]] || die "could not find run '$RUN_NAME' in experiment '$EXPERIMENT'"
        PAGE="$URL/#/experiments/$EXP_ID/runs/$RUN_ID/model-metrics?workflowType=machine_learning"
        echo "run $RUN_ID (experiment $EXP_ID): $PAGE" ;;
    runs)
        [[ -n ${EXP_ID:-} ]] || die "could not find experiment '$EXPERIMENT'"
        PAGE="$URL/#/experiments/$EXP_ID/runs?workflowType=machine_learning"
        echo "experiment $EXP_ID: $PAGE" ;;
    evaluation)
        [[ -n ${RUN_ID:-} ]] || die "could not find run '$RUN_NAME' with artifact '$ARTIFACT_FILE' in experiment '$EXPERIMENT'"
        path=$("$PY" -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$ARTIFACT_FILE")
        PAGE="$URL/#/experiments/$EXP_ID/runs/$RUN_ID/artifacts/$path?workflowType=machine_learning"
        echo "run $RUN_ID (experiment $EXP_ID): $PAGE" ;;
    models)
        [[ -n ${EXP_ID:-} ]] || die "could not find logged models with val_top1 in experiment '$EXPERIMENT'"
        PAGE="$URL/#/experiments/$EXP_ID/models?workflowType=machine_learning"
        echo "experiment $EXP_ID: $PAGE" ;;
esac

mkdir -p "$(dirname "$OUT")"
case $VIEW in   # what the view needs besides the page
    metrics) extra= ;;
    runs) extra=$WORK/runs.json ;;
    evaluation) extra=$ARTIFACT_FILE ;;
    models) extra=$WORK/runs.json ;;
esac
"$PY" - "$CHROMIUM" "$PAGE" "$OUT" "$WINDOW_SIZE" "$RENDER_TIMEOUT" "$WORK/chromium" "$VIEW" "$extra" <<'PY'
# Drive headless Chromium over the DevTools protocol on a pipe (fd 3: to Chromium, fd 4: from it;
# NUL-separated JSON messages): no debugging port, nothing beyond the standard library.
import base64, fcntl, json, os, subprocess, sys, time

chromium, url, out, size, timeout, profile, view, extra = sys.argv[1:]
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

# If the Assistant panel opened anyway, close it (and count that as not ready yet).
CLOSE_PANEL = """
  const close = document.querySelector('button[data-component-id="mlflow.assistant.chat_panel.close"]');
  if (close) close.click();"""
# metrics: is every chart card that starts inside the window drawn (cards off-screen are drawn lazily)?
METRICS = """(() => {%s
  const grid = document.querySelector('[data-testid=draggable-chart-cards-grid]');
  const cards = grid ? [...grid.children] : [];
  const inView = cards.filter(c => c.getBoundingClientRect().top < innerHeight);
  const drawn = inView.filter(c => c.querySelector('.js-plotly-plot .scatterlayer .trace'));
  return {cards: cards.length, inView: inView.length, drawn: drawn.length, panel: !!close,
          text: document.body ? document.body.innerText.slice(0, 300) : ''};
})()""" % CLOSE_PANEL
# runs: click the expander of every shown parent run that lacks a child row (again after 10 s if
# the click got lost), and measure how much wider the Run Name and Source cells want to be (what
# their text cut off with an ellipsis lacks) and where the column's resize handle is.
RUNS = """((children, fit) => {%s
  const shown = new Set([...document.querySelectorAll('[role=row][row-id]')].map(r => r.getAttribute('row-id')));
  const inView = new Set([...document.querySelectorAll('[role=row][row-id]')]
    .filter(r => r.getBoundingClientRect().bottom <= innerHeight).map(r => r.getAttribute('row-id')));
  const clicked = window.__screenshotClicked = window.__screenshotClicked || {};
  const collapsed = [];
  for (const b of document.querySelectorAll('button[data-component-id$="runnamecellrenderer.tsx_46"]')) {
    const id = b.closest('[role=row]')?.getAttribute('row-id');
    if ((children[id] || []).every(c => shown.has(c))) continue;
    collapsed.push(id);
    if (!clicked[id] || Date.now() - clicked[id] > 10000) { clicked[id] = Date.now(); b.click(); }
  }
  const lack = {};
  for (const col of fit) {
    let need = 0;
    for (const cell of document.querySelectorAll(`.ag-cell[col-id="${col}"]`))
      for (const e of [cell, ...cell.querySelectorAll('*')])
        if (getComputedStyle(e).textOverflow === 'ellipsis') need = Math.max(need, e.scrollWidth - e.clientWidth);
    const h = document.querySelector(`.ag-header-cell[col-id="${col}"] .ag-header-cell-resize`);
    const r = h && h.getBoundingClientRect();
    const hit = r && document.elementFromPoint(r.x + 2, r.y + r.height / 2) === h;  // not off-screen or covered
    lack[col] = [need, hit ? r.x + 2 : null, hit ? r.y + r.height / 2 : null];
  }
  return {shown: shown.size, inView: inView.size, collapsed, expanded: Object.keys(clicked).length,
          lack, panel: !!close, text: document.body ? document.body.innerText.slice(0, 300) : ''};
})(%s, %s)"""
FIT = ["attributes.`Run Name`", "attributes.`Source`"]
# evaluation: is the file selected (its name above the preview) and its <img> loaded? If not after a
# few seconds, click the file in the artifact tree (again every 5 s).
EVALUATION = """((name, click) => {%s
  const right = document.querySelector('.mlflow-artifact-right');
  const img = right && right.querySelector('img');
  const node = document.querySelector(`[data-testid=artifact-tree-node][artifact-name="${CSS.escape(name.split('/').pop())}"]`);
  const selected = !!right && right.innerText.includes(name.split('/').pop());
  if (click && !selected && node) node.click();
  return {selected, loaded: !!(img && img.complete && img.naturalWidth > 0), node: !!node,
          width: img ? img.naturalWidth : 0, height: img ? img.naturalHeight : 0, panel: !!close,
          text: document.body ? document.body.innerText.slice(0, 300) : ''};
})(%s, %s)"""
# models: once the rows are there, pick the columns in the "Columns" picker (one click per look:
# uncheck the Status, Logged from and Dataset attributes, the parameters and the metrics without a
# dataset; check the metrics of a dataset should they be off), close it, sort the table by `metric`
# descending through ag-grid's column API (what clicking a sortable header does: the UI then asks
# the REST API for that order), and compare the rows' order with the REST API's (`ranked`) and
# check that the values shown descend.
MODELS = """((ranked, metric) => {%s
  const has = (e, suffix) => [...e.classList].some(c => c.endsWith(suffix));
  const all = (root, part) => [...root.querySelectorAll(`[class*="${part}"]`)].filter(e => has(e, part));
  const comp = [...document.querySelectorAll('[class*=ag-]')].find(e => e.__agComponent && e.__agComponent.getContext);
  const columnApi = comp && comp.__agComponent.getContext().getBean('columnApi');
  const cols = columnApi ? columnApi.getColumnState() : [];
  const dataset = id => { try { return JSON.parse(id.slice('metrics.'.length)).datasetName; } catch (e) { return undefined; } };
  const metricCol = (cols.find(c => c.colId.startsWith(`metrics.{"metricKey":${JSON.stringify(metric)},"datasetName"`))
    || cols.find(c => c.colId.startsWith(`metrics.{"metricKey":${JSON.stringify(metric)}`)) || {}).colId;
  const unwanted = cols.filter(c => !c.hide && (['status', 'source', 'dataset'].includes(c.colId) || c.colId.startsWith('params.')
    || (c.colId.startsWith('metrics.') && !dataset(c.colId)))).map(c => c.colId);
  const missing = cols.filter(c => c.hide && (c.colId.startsWith('metrics.') && dataset(c.colId) || c.colId === metricCol)).map(c => c.colId);
  const isMetric = id => !!metricCol && id.replace(/&quot;/g, '"') === metricCol;   // cells: col-id HTML-escaped
  const rows = [];
  for (const r of document.querySelectorAll('.ag-row[row-index]')) {
    const i = +r.getAttribute('row-index'), row = rows[i] = rows[i] || {};
    for (const c of r.querySelectorAll('.ag-cell[col-id]')) {
      const id = c.getAttribute('col-id'), text = (id === 'name' && c.querySelector('a') || c).innerText.trim();
      if (id === 'name') {
        row.name = text, row.bottom = c.getBoundingClientRect().bottom;
        row.cut = Math.max(0, ...[c, ...c.querySelectorAll('*')].filter(e => getComputedStyle(e).textOverflow === 'ellipsis')
          .map(e => e.scrollWidth - e.clientWidth));
      }
      if (isMetric(id)) row.value = text === '' || isNaN(parseFloat(text)) ? null : parseFloat(text);
    }
  }
  const shown = [];
  for (const row of rows) { if (!row || !row.name) break; shown.push(row); }
  const now = Date.now(), act = shown.length > 0 && now - (window.__screenshotActed || 0) > 1500;
  const done = what => { window.__screenshotActed = now; return what; };
  let action = null;
  const tree = document.querySelector('[role=menu] [role=tree]');
  const menu = tree && tree.closest('[role=menu]');
  if (act && (unwanted.length || missing.length) && !menu) {
    const b = document.querySelector('button[data-component-id="mlflow.logged_model.list.columns"]');
    if (b) action = done('open the column picker'), b.dispatchEvent(new PointerEvent('pointerdown', {bubbles: true, button: 0, pointerType: 'mouse'}));
  } else if (act && menu) {
    const nodes = all(menu, '-tree-treenode').filter(n => n.innerText.trim()).map(n => ({
      title: n.innerText.trim(), level: all(n, '-tree-indent-unit').length, full: has(n, '-checkbox-checked'),
      on: has(n, '-checkbox-checked') || has(n, '-checkbox-indeterminate'), box: all(n, '-tree-checkbox')[0]}));
    const under = parent => { const out = [];
      for (const x of parent ? nodes.slice(nodes.indexOf(parent) + 1) : []) { if (x.level <= parent.level) break; out.push(x); }
      return out.filter(x => x.level === parent.level + 1); };
    const top = title => nodes.find(x => x.level === 0 && x.title === title);
    const todo = [...under(top('Model attributes')).filter(x => x.on && ['Status', 'Logged from', 'Dataset'].includes(x.title)),
                  ...[top('Parameters')].filter(x => x && x.on),
                  ...under(top('Metrics')).filter(x => x.title === 'No dataset' ? x.on : !x.full)];
    if (todo.length)
      todo[0].box.click(), action = done(`${todo[0].full || todo[0].title === 'No dataset' ? 'uncheck' : 'check'} ${todo[0].title}`);
    else if (!unwanted.length && !missing.length)
      action = done('close the column picker'), menu.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape', bubbles: true}));
  }
  const sorted = cols.filter(c => c.sort).map(c => [c.colId, c.sort]);
  const sortedOk = !!metricCol && sorted.length === 1 && sorted[0][0] === metricCol && sorted[0][1] === 'desc';
  if (!action && act && !menu && metricCol && !sortedOk) {
    action = done(`sort by ${metric}`);
    columnApi.applyColumnState({state: [{colId: metricCol, sort: 'desc'}], defaultState: {sort: null}});
  }
  // Once sorted: hide the "Sort" button (without the UI's metric sorting it always reads
  // "Sort: Created") and take the focus ring off the Columns button the picker returned focus to.
  const sortButton = document.querySelector('button[data-component-id="mlflow.logged_model.list.sort"]');
  if (sortedOk && sortButton) sortButton.style.setProperty('display', 'none', 'important');
  const focused = document.activeElement;
  if (!menu && focused && focused.matches('button[data-component-id="mlflow.logged_model.list.columns"]')) focused.blur();
  const values = shown.map(r => r.value);
  const descending = values.every((v, i) => i === 0 || v === null || (values[i - 1] !== null && values[i - 1] >= v));
  const ordered = shown.length > 0 && shown.every((r, i) => ranked[i] && ranked[i].name === r.name) && descending;
  const header = metricCol && [...document.querySelectorAll('.ag-header-cell[col-id]')].find(h => isMetric(h.getAttribute('col-id')));
  const hr = header && header.getBoundingClientRect();
  return {columns: cols.filter(c => !c.hide).length, unwanted: unwanted.length, missing: missing.length, picker: !!menu,
          sorted, sortedOk, shown: shown.map(r => r.name), values, ordered, inView: shown.filter(r => r.bottom <= innerHeight).length,
          cut: shown.filter(r => r.cut > 1).map(r => r.name), header: !!hr && hr.width > 0 && hr.right <= innerWidth,
          sortHidden: !sortButton || sortButton.getBoundingClientRect().width === 0,
          action, panel: !!close, text: document.body ? document.body.innerText.slice(0, 300) : ''};
})(%s, %s)"""

def evaluate(expression):
    return call("Runtime.evaluate", s, expression=expression, returnByValue=True)["result"]["value"]

def mouse_drag(x, y, dx):
    """Press at (x, y), move right by dx in steps, release: what resizing a column by hand does."""
    call("Input.dispatchMouseEvent", s, type="mouseMoved", x=x, y=y)
    call("Input.dispatchMouseEvent", s, type="mousePressed", x=x, y=y, button="left", buttons=1, clickCount=1)
    for step in range(1, 11):
        call("Input.dispatchMouseEvent", s, type="mouseMoved", x=x + dx * step / 10, y=y, button="left", buttons=1)
    call("Input.dispatchMouseEvent", s, type="mouseReleased", x=x + dx, y=y, button="left", clickCount=1)

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
    if view == "runs":
        with open(extra) as f:
            tree = json.load(f)
    if view == "models":
        with open(extra) as f:
            ranked = json.load(f)
    call("Page.navigate", s, url=url)
    t0, ready_since, state, resizes, last_click = time.monotonic(), None, {}, 0, 0
    while time.monotonic() - t0 < float(timeout):
        time.sleep(0.5)
        if view == "metrics":
            state = evaluate(METRICS)
            ready = state["inView"] > 0 and state["drawn"] == state["inView"] and not state["panel"]
        elif view == "runs":
            state = evaluate(RUNS % (CLOSE_PANEL, json.dumps(tree["children"]), json.dumps(FIT)))
            ready = state["shown"] > 0 and not state["collapsed"] and not state["panel"]
            short = {col: v for col, v in state["lack"].items() if v[0] > 1 and v[1] is not None}
            if ready and short and resizes < 2 * len(FIT):   # widen one column, then look again
                resizes += 1
                need, x, y = next(iter(short.values()))
                mouse_drag(x, y, min(need + 4, 400))
                ready = False
        elif view == "models":
            state = evaluate(MODELS % (CLOSE_PANEL, json.dumps(ranked["models"]), json.dumps(ranked["metric"])))
            if state["action"]:
                print(f"  {state['action']}", flush=True)
            ready = (state["ordered"] and state["sortedOk"] and not state["unwanted"] and not state["missing"]
                     and not state["picker"] and state["header"] and state["sortHidden"] and not state["panel"]
                     and len(state["shown"]) >= min(len(ranked["models"]), state["inView"] + 1))
        else:
            click = time.monotonic() - t0 > 5 and time.monotonic() - last_click > 5
            state = evaluate(EVALUATION % (CLOSE_PANEL, json.dumps(extra), json.dumps(click)))
            if click and not state["selected"] and state["node"]:
                last_click = time.monotonic()
            ready = state["selected"] and state["loaded"] and not state["panel"]
        ready_since = (ready_since or time.monotonic()) if ready else None
        if ready_since and time.monotonic() - ready_since >= (2 if view == "metrics" else 1):
            break   # let the last charts (rows, image) settle
    else:
        what = {"metrics": "charts not drawn", "runs": "runs not expanded",
                "evaluation": f"{extra} not shown", "models": "models not ranked"}[view]
        sys.exit(f"{what} after {timeout} s: {state}")
    took = time.monotonic() - t0
    if view == "metrics":
        print(f"{state['drawn']} of {state['cards']} charts drawn after {took:.0f} s"
              + ("" if state["drawn"] == state["cards"] else " (a taller WINDOW_SIZE shows the rest)"))
    elif view == "runs":
        print(f"{state['shown']} of {tree['runs']} runs shown ({state['expanded']} expanded), "
              f"{state['inView']} in the picture, after {took:.0f} s"
              + ("" if state["inView"] == state["shown"] else " (a taller WINDOW_SIZE shows the rest)")
              + "".join(f"; {col} still {v[0]} px short" for col, v in state["lack"].items() if v[0] > 1))
    elif view == "models":
        print(f"{len(state['shown'])} of {len(ranked['models'])} models shown ranked by {ranked['metric']} "
              f"({', '.join(f'{n} {v}' for n, v in zip(state['shown'], state['values']))}), "
              f"{state['inView']} in the picture, after {took:.0f} s"
              + ("" if state["inView"] == len(ranked["models"]) else " (a taller WINDOW_SIZE shows the rest)")
              + (f"; names cut off: {state['cut']}" if state["cut"] else ""))
    else:
        print(f"{extra} ({state['width']}x{state['height']}) shown after {took:.0f} s")
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
