#!/usr/bin/env bash
# The whole tutorial on a fresh machine: install, train standard_lstm_lm_200 on WikiText-2 with
# GluonNLP's settings (3 epochs), export to ONNX, and score the WikiText-2 test split.
# Honours KERASLM_DATA (corpora + nltk_data; downloaded there when missing and online).
# It ends with a summary: where the run, the bundle and the scores are, and what to try next.

# summary NAME SCORES: the closing lines (tests/test_quiet.py sources this file to check them).
summary() {
    local name="$1" scores="$2"
    cat <<SUMMARY

== done ==
run:     runs/$name   (config.json, metrics.jsonl, best.weights.h5; python -m keraslm.plot $name)
bundle:  bundles/$name   (model.onnx; its card: bundles/$name/README.md)
scores:  $scores   (WikiText-2 test split)

Next:
  echo "the game began in 1998 ." | python serve/score.py --model bundles/$name -   # your own text
  python serve/generate.py --model bundles/$name --prompt "The" --seed 0            # generate
  python -m serve.server --model bundles/$name   # then open http://127.0.0.1:8080/ (the page)
(activate the environment first: . .venv/bin/activate)
SUMMARY
}

main() {
    set -euo pipefail
    cd "$(dirname "$0")"
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
    fi
    . .venv/bin/activate
    # -qq: errors only (warnings about a machine's own pip configuration are not ours to show)
    python -m pip install -qq --upgrade pip
    python -m pip install -qq -e ".[train,cpu,serve]"

    export KERASLM_DATA="${KERASLM_DATA:-$HOME/.keraslm/datasets}"
    export NLTK_DATA="${NLTK_DATA:-$KERASLM_DATA/nltk_data}"
    local name="${RUN_NAME:-tutorial-$(date +%Y%m%d-%H%M%S)}"

    python -m keraslm.train --name "$name" "$@"
    python -m export.to_onnx "runs/$name"
    python serve/score.py --model "bundles/$name" --batch-size 10 \
        "$KERASLM_DATA/wikitext-2/wiki.test.tokens" | tee "runs/$name/test-scores.txt"
    summary "$name" "runs/$name/test-scores.txt"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
