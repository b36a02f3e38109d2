"""The presets awd_lstm_lm_1150 and awd_lstm_lm_600 as GluonNLP defines them: its predefined
arguments (gluonnlp/model/language_model.py, v0.x), its AWDRNN's layer shapes, and so its
parameter count, written out here from those shapes."""

from __future__ import annotations

import pytest

from keraslm import train as train_cli
from keraslm.config import PRESETS, preset_config
from keraslm.model import build_model

WIKITEXT2_VOCAB = 33_278

# GluonNLP's awd_lstm_lm_1150_hparams and awd_lstm_lm_600_hparams (mode 'lstm')
GLUONNLP = {
    "awd_lstm_lm_1150": {"embed_size": 400, "hidden_size": 1150, "num_layers": 3,
                         "tie_weights": True, "dropout": 0.4, "weight_drop": 0.5,
                         "drop_h": 0.2, "drop_i": 0.65, "drop_e": 0.1},
    "awd_lstm_lm_600": {"embed_size": 200, "hidden_size": 600, "num_layers": 3,
                        "tie_weights": True, "dropout": 0.2, "weight_drop": 0.2,
                        "drop_h": 0.1, "drop_i": 0.3, "drop_e": 0.05},
}
# GluonNLP's argument -> keraslm's LMConfig field
FIELD = {"embed_size": "emsize", "hidden_size": "nhid", "num_layers": "nlayers",
         "tie_weights": "tied", "dropout": "dropout", "weight_drop": "weight_dropout",
         "drop_h": "dropout_h", "drop_i": "dropout_i", "drop_e": "dropout_e"}


def gluonnlp_lstm_sizes(hparams: dict) -> list[tuple[int, int]]:
    """(input, hidden) units of each LSTM of GluonNLP's AWDRNN._get_encoder: the first reads
    the embedding, each next one the previous layer; every layer is hidden_size wide except
    the last of a tied model, which is embed_size wide."""
    embed, hidden, layers = (hparams[k] for k in ("embed_size", "hidden_size", "num_layers"))
    outputs = [hidden if layer != layers - 1 or not hparams["tie_weights"] else embed
               for layer in range(layers)]
    return list(zip([embed, *outputs[:-1]], outputs))


def gluonnlp_parameters(hparams: dict, vocab: int) -> int:
    """GluonNLP's AWDRNN parameter count, shape by shape: the embedding weight [V, E]; each
    LSTM (MXNet's rnn.LSTM, one layer) with i2h_weight [4H, I], h2h_weight [4H, H], i2h_bias
    [4H] and h2h_bias [4H]; the decoder, a Dense(V) whose weight is the embedding's when tied
    (not counted again; else its own [V, H] over the last layer) and whose bias [V] is its
    own."""
    embed, sizes = hparams["embed_size"], gluonnlp_lstm_sizes(hparams)
    lstms = sum(4 * h * i + 4 * h * h + 4 * h + 4 * h for i, h in sizes)
    last = sizes[-1][1]  # the decoder's input (= embed_size when tied)
    decoder = vocab if hparams["tie_weights"] else last * vocab + vocab
    return vocab * embed + lstms + decoder


@pytest.mark.parametrize("name", list(GLUONNLP))
def test_the_preset_has_gluonnlps_shapes_and_dropouts(name):
    hparams = GLUONNLP[name]
    config = preset_config(name, WIKITEXT2_VOCAB)
    assert {FIELD[k]: getattr(config, FIELD[k]) for k in hparams} == {
        FIELD[k]: v for k, v in hparams.items()}
    assert config.layer_sizes() == tuple(h for _, h in gluonnlp_lstm_sizes(hparams))
    assert config.two_biases  # MXNet's LSTM has an i2h and an h2h bias
    assert config.softmax == "full"


@pytest.mark.parametrize(("name", "gluonnlp_count"), [("awd_lstm_lm_1150", 33_556_078),
                                                      ("awd_lstm_lm_600", 12_140_078)])
def test_the_preset_counts_gluonnlps_parameters_less_one_bias_a_layer(name, gluonnlp_count):
    """keraslm's LSTM keeps MXNet's two summed biases (i2h + h2h) as one variable that counts
    twice in the clipping norm and moves twice as far (`--two-biases`): the model holds 4H
    fewer parameters a layer than GluonNLP's and computes the same function."""
    hparams = GLUONNLP[name]
    config = preset_config(name, WIKITEXT2_VOCAB)
    assert gluonnlp_parameters(hparams, WIKITEXT2_VOCAB) == gluonnlp_count
    twin_biases = sum(4 * h for _, h in gluonnlp_lstm_sizes(hparams))
    assert config.num_parameters() + twin_biases == gluonnlp_count
    small = preset_config(name, 1000)  # the Keras model itself, at a small vocabulary
    assert build_model(small).count_params() == small.num_parameters() == (
        gluonnlp_parameters(hparams, 1000) - twin_biases)


def test_untied_the_last_layer_is_as_wide_as_the_others_as_in_gluonnlp():
    hparams = {**GLUONNLP["awd_lstm_lm_600"], "tie_weights": False}
    config = preset_config("awd_lstm_lm_600", 1000, tied=False)
    assert config.layer_sizes() == tuple(h for _, h in gluonnlp_lstm_sizes(hparams)) == (
        600, 600, 600)
    assert config.num_parameters() + 4 * 600 * 3 == gluonnlp_parameters(hparams, 1000)


def test_the_presets_are_flags_and_keep_their_dropouts_unless_given(capsys):
    with pytest.raises(SystemExit):
        train_cli.main(["--help"])
    listed = capsys.readouterr().out
    assert "awd_lstm_lm_1150" in listed and "awd_lstm_lm_600" in listed
    assert "--last-layer-emsize" in listed
    model = train_cli.config_from_argv(["--preset", "awd_lstm_lm_600"]).model.resolve(1000)
    assert model == preset_config("awd_lstm_lm_600", 1000)
    assert list(PRESETS)[:3] == ["standard_lstm_lm_200", "standard_lstm_lm_650",
                                 "standard_lstm_lm_1500"]
    changed = train_cli.config_from_argv(["--preset", "awd_lstm_lm_1150", "--dropout-h", "0.3",
                                          "--emsize", "300"]).model.resolve(1000)
    assert (changed.dropout_h, changed.dropout_i, changed.layer_sizes()) == (
        0.3, 0.65, (1150, 1150, 300))


@pytest.mark.parametrize("name", list(GLUONNLP))
def test_the_model_drops_as_gluonnlps_awdrnn(name):
    """Locked dropout on the embedding's output (drop_i) and between layers (drop_h), on the
    last output (dropout); embedding and weight dropout are the trainer's (not layers)."""
    config = preset_config(name, 100)
    model = build_model(config)
    dropouts = [model.get_layer(n) for n in ("embedding_dropout", "lstm0_dropout",
                                             "lstm1_dropout", "lstm2_dropout")]
    hparams = GLUONNLP[name]
    assert [d.rate for d in dropouts] == pytest.approx(
        [hparams["drop_i"], hparams["drop_h"], hparams["drop_h"], hparams["dropout"]])
    assert all(d.shared_over_time for d in dropouts)
    assert (config.dropout_e, config.weight_dropout) == (hparams["drop_e"],
                                                         hparams["weight_drop"])
