#!/usr/bin/env bash
# The whole tutorial on a fresh machine: install, train standard_lstm_lm_200 on WikiText-2 with
# GluonNLP's settings (3 epochs), export to ONNX, and score the WikiText-2 test split.
# Honours KERASLM_DATA (corpora + nltk_data; downloaded there when missing and online).
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e ".[train,cpu]"

export KERASLM_DATA="${KERASLM_DATA:-$HOME/.keraslm/datasets}"
export NLTK_DATA="${NLTK_DATA:-$KERASLM_DATA/nltk_data}"
NAME="${RUN_NAME:-tutorial-$(date +%Y%m%d-%H%M%S)}"

python -m keraslm.train --name "$NAME" "$@"
python -m export.to_onnx "runs/$NAME"
python serve/score.py --model "bundles/$NAME" --batch-size 10 \
    "$KERASLM_DATA/wikitext-2/wiki.test.tokens"
