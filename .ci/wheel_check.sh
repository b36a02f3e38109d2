#!/usr/bin/env bash
# The wheel as users get it (issue 22): build the sdist and, from it, the wheel once (as
# `python -m build` does), then install the wheel in fresh virtual environments in a temporary
# folder outside the source tree, working from there (no PYTHONPATH: nothing can import the
# checkout):
#   train host  keraslm-X.whl[train,cpu]: keraslm-train a tiny model on a WikiText-2 prefix,
#               keraslm-export it, keraslm-evaluate it
#   serve host  keraslm-X.whl[cpu,serve,dataset]: TensorFlow must not be importable;
#               keraslm-score, keraslm-generate, keraslm-score-dataset (a small .jsonl, its
#               output read back with pyarrow) and keraslm-serve (the page, POST /v1/score) on
#               that bundle, and keraslm-serve exposed (API keys, allowed hosts, TLS, the header
#               cap) to curl
# Usage: .ci/wheel_check.sh, with a Python on PATH that has setuptools>=77 (the project's .venv,
# which `pip install -e ".[test]"` sets up; .ci/run calls it that way). Offline: the build needs
# no index, the installs only the local pip index. Data: $KERASLM_DATA, else ../shared/data.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DATA="${KERASLM_DATA:-$ROOT/../shared/data}"
[ -d "$DATA/wikitext-2" ] || { echo "wheel check: no corpora at $DATA (set KERASLM_DATA)" >&2; exit 1; }
DATA="$(cd "$DATA" && pwd)"
export KERASLM_DATA="$DATA" NLTK_DATA="${NLTK_DATA:-$DATA/nltk_data}"
export TF_CPP_MIN_LOG_LEVEL=3 PIP_DISABLE_PIP_VERSION_CHECK=1
unset PYTHONPATH

WORK="$(mktemp -d "${TMPDIR:-/tmp}/keraslm-wheel-check.XXXXXX")"
case "$WORK/" in "$ROOT"/*) echo "wheel check: $WORK is inside the source tree" >&2; exit 1 ;; esac
SERVER_PID=""  # the background subshell running in_env; the server is its child
stop_serve() {
    if [ -n "$SERVER_PID" ]; then
        pkill -TERM -P "$SERVER_PID" 2>/dev/null || true
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
    fi
}
cleanup() {
    stop_serve
    if [ "${KEEP_WHEEL_CHECK:-}" = 1 ]; then echo "wheel check: kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
cd "$WORK"

STEP="start"
START=$SECONDS
step() { STEP="$1"; echo "== wheel check [$((SECONDS - START)) s]: $1"; }
fail() { echo "wheel check FAILED at '$STEP': $*" >&2; exit 1; }
trap 'echo "wheel check FAILED at step: $STEP (line $LINENO; the command above failed)" >&2' ERR

# ---- build: sdist, then the wheel from the sdist ---------------------------------------------
step "build the sdist and the wheel"
python - <<'PY' || fail "setuptools>=77 is needed to build (pip install -e '.[test]')"
import setuptools, sys
sys.exit(int(setuptools.__version__.split(".")[0]) < 77)
PY
mkdir src dist
# A copy of the working tree without what is not source, so no stale build/ can leak in.
tar -C "$ROOT" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
    --exclude=./runs --exclude=./bundles --exclude='*.egg-info' --exclude=__pycache__ \
    --exclude=.pytest_cache --exclude=.hypothesis -cf - . | tar -C src -xf -
SDIST="$(cd src && python -c 'import sys; from setuptools import build_meta as b
print(b.build_sdist(sys.argv[1]))' "$WORK/dist" 2>"$WORK/build.log" | tail -n 1)" ||
    { cat "$WORK/build.log" >&2; fail "building the sdist"; }
python -m pip wheel --quiet --no-deps --no-build-isolation --no-index --wheel-dir dist \
    "dist/$SDIST" >>"$WORK/build.log" 2>&1 || { cat "$WORK/build.log" >&2; fail "building the wheel"; }
WHEEL="$(ls "$WORK"/dist/keraslm-*.whl)"
echo "built dist/$SDIST and $(basename "$WHEEL") ($(python -c 'import sys, zipfile
print(len(zipfile.ZipFile(sys.argv[1]).namelist()))' "$WHEEL") files)"
BASE_PY="$(python -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))')"

# new_env NAME EXTRAS: a fresh virtual environment with the wheel and those extras.
new_env() {
    "$BASE_PY" -m venv "$WORK/$1"
    "$WORK/$1/bin/python" -m pip install -qq --upgrade pip
    "$WORK/$1/bin/python" -m pip install -qq "$WHEEL[$2]" || fail "pip install $(basename "$WHEEL")[$2]"
}
# in_env NAME COMMAND...: run in that environment only (its bin first, no other venv, no PYTHONPATH).
in_env() {
    local name="$1"; shift
    env -u PYTHONPATH VIRTUAL_ENV="$WORK/$name" PATH="$WORK/$name/bin:$PATH" "$@"
}
# from_site NAME: the installed packages are imported from the environment, not the checkout.
from_site() {
    in_env "$1" python - "$ROOT" <<'PY' || fail "$1 imports keraslm from outside its environment"
import sys
from pathlib import Path
import export, keraslm, serve
for module in (keraslm, serve, export):
    where = Path(module.__file__).resolve()
    assert Path(sys.prefix).resolve() in where.parents, f"{module.__name__} from {where}"
    assert Path(sys.argv[1]) not in where.parents, f"{module.__name__} from the checkout: {where}"
PY
}

# ---- training host: [train,cpu] ---------------------------------------------------------------
step "install $(basename "$WHEEL")[train,cpu] into a fresh venv (TensorFlow: a minute or more)"
new_env train "train,cpu"
from_site train
step "keraslm-train: a tiny model on the first lines of WikiText-2"
W="$DATA/wikitext-2"
head -n 300 "$W/wiki.train.tokens" >train.txt
head -n 60 "$W/wiki.valid.tokens" >valid.txt
head -n 60 "$W/wiki.test.tokens" >test.txt
in_env train keraslm-train --train train.txt --valid valid.txt --test test.txt --emsize 16 \
    --nhid 16 --nlayers 1 --epochs 1 --batch-size 4 --bptt 10 --eval-batch-size 4 \
    --runs-dir runs --name tiny --quiet --log-interval 0 2>train.log ||
    { tail -n 30 train.log >&2; fail "keraslm-train"; }
[ -f runs/tiny/best.weights.h5 ] || fail "keraslm-train wrote no runs/tiny/best.weights.h5"
step "keraslm-export runs/tiny"
in_env train keraslm-export runs/tiny --out bundle 2>export.log || { tail -n 30 export.log >&2; fail "keraslm-export"; }
[ -f bundle/model.onnx ] && [ -f bundle/bundle.json ] || fail "keraslm-export wrote no bundle/model.onnx"
step "keraslm-evaluate runs/tiny"
in_env train keraslm-evaluate runs/tiny --corpus test.txt --json >evaluate.json 2>evaluate.log ||
    { tail -n 30 evaluate.log >&2; fail "keraslm-evaluate"; }
in_env train python -c 'import json, math, sys; r = json.load(open(sys.argv[1]))
assert math.isfinite(r["perplexity"]) and r["num_tokens"] > 0, r
print("evaluate: perplexity %.2f over %d tokens" % (r["perplexity"], r["num_tokens"]))' evaluate.json ||
    fail "keraslm-evaluate printed no finite perplexity: $(cat evaluate.json)"

# ---- serving host: [cpu,serve,dataset], no TensorFlow ------------------------------------------
step "install $(basename "$WHEEL")[cpu,serve,dataset] into a fresh venv"
new_env serve "cpu,serve,dataset"
from_site serve
step "the serving venv has no TensorFlow"
if in_env serve python -c "import tensorflow" 2>/dev/null; then
    fail "tensorflow is importable in the [cpu,serve] environment: $(in_env serve python -m pip list 2>/dev/null | grep -i tensorflow)"
fi
step "keraslm-score a text file"
echo "the cat sat ." >text.txt
in_env serve keraslm-score text.txt --model bundle --json >score.json 2>score.log ||
    { tail -n 30 score.log >&2; fail "keraslm-score"; }
in_env serve python -c 'import json, math, sys; r = json.load(open(sys.argv[1]))
assert math.isfinite(r["perplexity"]) and r["num_tokens"] > 0, r
print("score: perplexity %.2f" % r["perplexity"])' score.json || fail "keraslm-score output: $(cat score.json)"
step "keraslm-generate"
in_env serve keraslm-generate --model bundle --prompt "The" --tokens 10 --seed 0 --json \
    >generate.json 2>generate.log || { tail -n 30 generate.log >&2; fail "keraslm-generate"; }
in_env serve python -c 'import json, sys; r = json.loads(open(sys.argv[1]).readline())
assert len(r["tokens"]) == 10, r
print("generate:", r["text"])' generate.json || fail "keraslm-generate output: $(cat generate.json)"
step "keraslm-score-dataset a small .jsonl"
mkdir shards
printf '%s\n' '{"id": "a", "text": "the cat sat ."}' '{"text": "the game began", "lang": "en"}' \
    'not json' >shards/docs.jsonl
in_env serve keraslm-score-dataset shards --model bundle --out scored --workers 2 \
    >dataset.out 2>dataset.log || { tail -n 30 dataset.log >&2; fail "keraslm-score-dataset"; }
in_env serve python - <<'PY' || fail "keraslm-score-dataset output: $(cat dataset.out dataset.log)"
import os, pyarrow.parquet as pq
from serve.scorer import Scorer
assert os.listdir("scored") == ["docs.parquet"], os.listdir("scored")
rows = pq.read_table("scored/docs.parquet").to_pylist()
assert [r["id"] for r in rows] == ["a", "shards/docs.jsonl:2", "shards/docs.jsonl:3"], rows
assert [r["lang"] for r in rows] == [None, "en", None], rows
assert rows[2]["error"].startswith("not valid JSON") and rows[2]["num_tokens"] is None, rows
for row, score in zip(rows, Scorer("bundle").score(["the cat sat .", "the game began"])):
    assert row["error"] is None and row["num_tokens"] == score.num_tokens, (row, score)
    assert abs(row["log_likelihood"] - score.log_likelihood) < 1e-6, (row, score)
print("score-dataset: 3 documents, 1 error, the numbers of Scorer.score")
PY
in_env serve keraslm-score-dataset shards --model bundle --out scored >dataset.out 2>dataset.log ||
    { tail -n 30 dataset.log >&2; fail "keraslm-score-dataset, run again"; }
grep -q "skipping 1 shard(s) already written" dataset.log ||
    fail "keraslm-score-dataset run again did not skip docs.parquet: $(cat dataset.log)"

CURL=(curl --silent --show-error --noproxy '*' --max-time 30)

start_serve() {  # start_serve URL ARGS...: keraslm-serve in the background, once /readyz is 200
    local url="$1"; shift
    in_env serve keraslm-serve --model bundle --log-level warning "$@" >serve.log 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 1 600); do
        kill -0 "$SERVER_PID" 2>/dev/null || { cat serve.log >&2; fail "keraslm-serve exited before it was ready"; }
        [ "$("${CURL[@]}" -o /dev/null -w '%{http_code}' "$url/readyz" 2>/dev/null)" = 200 ] && return
        sleep 0.2
    done
    cat serve.log >&2
    fail "keraslm-serve not ready at $url/readyz within 120 s"
}

free_port() {
    in_env serve python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

step "keraslm-serve: /readyz, the page, POST /v1/score"
PORT="$(free_port)"
URL="http://127.0.0.1:$PORT"
start_serve "$URL" --port "$PORT"
CODE="$("${CURL[@]}" -o page.html -w '%{http_code}' "$URL/")"
[ "$CODE" = 200 ] || fail "GET / answered $CODE"
grep -qi "<html" page.html || fail "GET / is not the page: $(head -c 300 page.html)"
CODE="$("${CURL[@]}" -o scored.json -w '%{http_code}' -H 'Content-Type: application/json' \
    -d '{"texts": ["the cat sat ."]}' "$URL/v1/score")"
[ "$CODE" = 200 ] || fail "POST /v1/score answered $CODE: $(cat scored.json)"
in_env serve python -c 'import json, math, sys; r = json.load(open(sys.argv[1]))["results"]
assert len(r) == 1 and math.isfinite(r[0]["perplexity"]), r
print("serve: POST /v1/score perplexity %.2f" % r[0]["perplexity"])' scored.json ||
    fail "POST /v1/score output: $(cat scored.json)"
stop_serve

step "keraslm-serve exposed: API keys, allowed hosts, TLS, the head cap"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" -keyout key.pem -out cert.pem 2>/dev/null ||
    fail "openssl could not make a certificate"
KEY="$(openssl rand -hex 16)"
printf '# the tests key\n%s\n' "$KEY" >keys.txt
PORT="$(free_port)"
URL="https://localhost:$PORT"
CURL+=(--cacert cert.pem)
start_serve "$URL" --port "$PORT" --api-key-file keys.txt --ssl-certfile cert.pem --ssl-keyfile key.pem
expect() {  # expect CODE WHAT CURL-ARGS...
    local want="$1" what="$2"; shift 2
    local got; got="$("${CURL[@]}" -o answer.json -w '%{http_code}' "$@")"
    [ "$got" = "$want" ] || fail "$what answered $got, not $want: $(head -c 300 answer.json)"
    echo "serve: $what -> $got"
}
SCORE=(-H 'Content-Type: application/json' -d '{"texts": ["the cat sat ."]}')
expect 401 "https POST /v1/score without a key" "${SCORE[@]}" "$URL/v1/score"
expect 401 "https POST /v1/score with a wrong key" -H "Authorization: Bearer not-$KEY" "${SCORE[@]}" "$URL/v1/score"
expect 200 "https POST /v1/score with the key" -H "Authorization: Bearer $KEY" "${SCORE[@]}" "$URL/v1/score"
expect 421 "https POST /v1/score for Host: evil.example" -H "Host: evil.example" -H "Authorization: Bearer $KEY" "${SCORE[@]}" "$URL/v1/score"
expect 431 "https GET /healthz with a 100 kB header" -H "X-Big: $(head -c 100000 /dev/zero | tr '\0' a)" "$URL/healthz"
expect 401 "https GET /metrics without a key" "$URL/metrics"
stop_serve

step "passed in $((SECONDS - START)) s"
