#!/usr/bin/env bash
# The GluonNLP word language model tutorial, end to end, with this package:
#   1. train standard_lstm_lm_200 on WikiText-2 for 3 epochs (batch 20, bptt 35, lr 20, clip 0.25)
#   2. export it to ONNX and score WikiText-2 test with the scorer
#   3. evaluate it zero-shot on Sherlock Holmes valid
#   4. fine-tune it on Sherlock Holmes for 3 epochs, export, score Sherlock Holmes test
# Steps 3-4 run twice: with the product's Moses settings and with the tutorial's (--moses-tutorial).
#
# Resumable: a finished step is skipped; an interrupted training continues from its checkpoint.
# Outputs: runs/tutorial-*, bundles/tutorial-*, and logs + JSON reports in $OUT (docs/results).
#     bench/reproduce_tutorial.sh            # about an hour on 2 CPU cores
#     EXTRA="--max-batches 20" OUT=/tmp/smoke bench/reproduce_tutorial.sh   # a quick smoke test
#     SEED=1 PREFIX=seed1 STAGES=wikitext bench/reproduce_tutorial.sh        # another seed, step 1-2
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="${OUT:-docs/results}"
RUNS="${RUNS:-runs}"
BUNDLES="${BUNDLES:-bundles}"
EXTRA="${EXTRA:-}"
SEED="${SEED:-0}"
STAGES="${STAGES:-wikitext sherlock}"
PREFIX="${PREFIX:-tutorial}"
mkdir -p "$OUT"

log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/reproduce.log"; }

# train NAME ARGS...: train into $RUNS/NAME unless it already finished its epochs; resume if begun.
train() {
    local name="$1"; shift
    local epochs=3
    if [ -f "$RUNS/$name/metrics.jsonl" ] && [ "$(wc -l < "$RUNS/$name/metrics.jsonl")" -ge "$epochs" ]; then
        log "train $name: done already"; return
    fi
    if [ -f "$RUNS/$name/checkpoint/latest.npz" ]; then
        log "train $name: resuming"
        "$PY" -m keraslm.train --resume "$name" --runs-dir "$RUNS" --quiet 2>&1 | tee -a "$OUT/$name.train.log"
    else
        rm -rf "${RUNS:?}/$name"
        log "train $name: $*"
        # shellcheck disable=SC2086
        "$PY" -m keraslm.train --name "$name" --runs-dir "$RUNS" --epochs "$epochs" \
            --checkpoint-every 200 --seed "$SEED" --quiet "$@" $EXTRA 2>&1 | tee -a "$OUT/$name.train.log"
    fi
}

export_and_score() {  # NAME TEXT_FILE [score.py args]
    local name="$1" text="$2"; shift 2
    if [ ! -f "$BUNDLES/$name/bundle.json" ]; then
        log "export $name"
        "$PY" -m export.to_onnx "$RUNS/$name" --out "$BUNDLES/$name" 2>&1 | tee -a "$OUT/$name.export.log"
    fi
    log "score $text with $name $*"
    "$PY" serve/score.py "$text" --model "$BUNDLES/$name" --json "$@" > "$OUT/$name.score.json"
    cat "$OUT/$name.score.json" | tee -a "$OUT/reproduce.log"
}

DATA="${KERASLM_DATA:-$HOME/.keraslm/datasets}"
WT2="$PREFIX-wikitext2"
train "$WT2"
export_and_score "$WT2" "$DATA/wikitext-2/wiki.test.tokens" --batch-size 1

case " $STAGES " in *" sherlock "*) ;; *) log "all done"; exit 0 ;; esac
for moses in product tutorial; do
    flag=""; [ "$moses" = tutorial ] && flag="--moses-tutorial"
    log "zero-shot Sherlock Holmes valid ($moses Moses settings)"
    # shellcheck disable=SC2086
    "$PY" -m keraslm.evaluate "$WT2" --runs-dir "$RUNS" --corpus sherlockholmes --split valid \
        --batch-size 10 --json $flag > "$OUT/$WT2.sherlock-valid.$moses.json"
    cat "$OUT/$WT2.sherlock-valid.$moses.json" | tee -a "$OUT/reproduce.log"
    tuned="$PREFIX-sherlock-$moses"
    # shellcheck disable=SC2086
    train "$tuned" --finetune-from "$WT2" --corpus sherlockholmes $flag
    export_and_score "$tuned" "$DATA/sherlockholmes/sherlockholmes.test.txt" --batch-size 1
done
log "all done"
