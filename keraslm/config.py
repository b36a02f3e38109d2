"""Typed configuration of a training run, free of TensorFlow and of argparse.

A run is described by four sections: `DataConfig` (which text, how it is tokenized),
`ModelOptions` (a GluonNLP preset and the sizes you change; resolved with the vocabulary into an
`LMConfig`), `OptimConfig` (what shapes the weights) and `RunConfig` (where the run goes and how
this process runs it). Each field carries its help text and what `--resume` does with it:

    SAVED     fixed by the run: a resumed run keeps the saved value (giving another is an error)
    OVERRIDE  a resumed run keeps the saved value unless the flag is given again
    PROCESS   belongs to this process only: never saved, never inherited

The command line (`keraslm.train`) is generated from these fields; `config.json` stores
`TrainConfig.to_dict()`; `resume_config` merges a saved run with the flags given again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from keraslm.errors import UserError

SAVED, OVERRIDE, PROCESS = "saved", "override", "process"


def option(default: Any, help: str, *, resume: str = SAVED, choices: tuple | None = None,
           metavar: str | None = None) -> Any:
    """A config field with its command-line help and its `--resume` policy."""
    return field(default=default, metadata={"help": help, "resume": resume, "choices": choices,
                                            "metavar": metavar})


# ---- the model --------------------------------------------------------------------------------

SOFTMAXES = ("full", "adaptive")
DEFAULT_CUTOFFS = (5_000, 15_000, 50_000, 250_000)  # default_cutoffs' candidates
SMALL_HEAD_CUTOFF = 2_000  # ... and its cutoff for vocabularies under 10,000 words
DEFAULT_DIV_VALUE = 4.0  # PyTorch's, and LMConfig's when a config does not say
TIED_DIV_VALUE = 1.0    # the default of tied models: tails read their words' embedding rows


def default_div_value(tied: bool) -> float:
    """`--div-value` when none is given: 1 for a tied model (its tails score with their words'
    embedding rows themselves, which trained to the full softmax's perplexity where narrower
    tails did not; docs/RESULTS.md), PyTorch's 4 for an untied one."""
    return TIED_DIV_VALUE if tied else DEFAULT_DIV_VALUE


def default_cutoffs(vocab_size: int) -> tuple[int, ...]:
    """The adaptive softmax's cutoffs when none are given: 5,000, 15,000, 50,000 and 250,000,
    each kept only up to half the vocabulary (so the words past the last cutoff are at least as
    many). Under 10,000 words the head is 2,000 words, and under 4,000 there is no tail: a
    plain softmax over the head. 33,278 words (WikiText-2): 5,000 and 15,000; 10,002: 5,000;
    267,735 (WikiText-103): 5,000, 15,000 and 50,000.

    A 5,000-word head trains to the full softmax's perplexity on WikiText-2 where a 2,000-word
    head did not, and scores about 3x faster than the full softmax where a 10,000-word head
    reaches only 2x (docs/RESULTS.md)."""
    cutoffs = tuple(c for c in DEFAULT_CUTOFFS if 2 * c <= vocab_size)
    if not cutoffs and 2 * SMALL_HEAD_CUTOFF <= vocab_size:
        cutoffs = (SMALL_HEAD_CUTOFF,)
    return cutoffs


def check_cutoffs(cutoffs: Sequence[int], vocab_size: int, hidden_size: int,
                  div_value: float) -> tuple[int, ...]:
    """`cutoffs` as a tuple, or UserError: increasing, each in [1, vocab_size), and every tail
    projection at least one unit wide."""
    cutoffs = tuple(int(c) for c in cutoffs)
    if any(b <= a for a, b in pairwise(cutoffs)) or (
            cutoffs and not 0 < cutoffs[0] <= cutoffs[-1] < vocab_size):
        raise UserError(f"--cutoffs must increase within (0, {vocab_size}) (the vocabulary's "
                        f"size), got {','.join(map(str, cutoffs))}")
    if div_value <= 0:
        raise UserError(f"--div-value must be positive, got {div_value:g}")
    if cutoffs and hidden_size // div_value ** len(cutoffs) < 1:
        raise UserError(f"the last tail of {len(cutoffs)} would project {hidden_size} units to "
                        f"none (--div-value {div_value:g}); use fewer cutoffs or a smaller "
                        f"--div-value")
    return cutoffs


def tail_widths(hidden_size: int, cutoffs: Sequence[int], div_value: float) -> list[int]:
    """Units of each tail cluster's projection: hidden_size // div_value**i for tail i (from 1)."""
    return [int(hidden_size // div_value ** i) for i in range(1, len(cutoffs) + 1)]


def parse_cutoffs(text: str) -> tuple[int, ...]:
    """'2000,10000' -> (2000, 10000); UserError for anything else."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(f"--cutoffs must be comma-separated integers, got {text!r}") from None


@dataclass(frozen=True)
class LMConfig:
    """Shape of an LSTM language model (what the run, the export and the bundle record)."""

    vocab_size: int
    emsize: int = 200
    nhid: int = 200
    nlayers: int = 2
    dropout: float = 0.2
    tied: bool = True
    # GluonNLP's AWDRNN: a tied model's last LSTM layer is `emsize` units wide, the others
    # `nhid`, so the decoder ties with the embedding whatever `nhid` is. Off (and untied): every
    # layer is `nhid` wide. `layer_sizes()` is the rule; on for the awd_lstm_lm presets.
    last_layer_emsize: bool = False
    # MXNet's LSTM keeps two summed biases (i2h + h2h) that both get the same gradient: the
    # effective bias learns twice as fast and counts twice in the clipping norm. The trainer
    # reproduces that exactly (see keraslm.training.step); on for the GluonNLP presets.
    two_biases: bool = False
    # The output layer: a full softmax over the vocabulary, or the adaptive softmax (Grave et
    # al. 2017; keraslm.adaptive) cut at `cutoffs` with tails projected by `div_value`.
    softmax: str = "full"
    cutoffs: tuple[int, ...] = ()
    div_value: float = DEFAULT_DIV_VALUE
    # The AWD-LSTM's regularisers (Merity et al. 2018, GluonNLP's AWDRNN). `dropout_i` (on the
    # embedding's output) and `dropout_h` (between LSTM layers) are locked, one mask per column
    # and unit over time; None keeps the standard models' element-wise `dropout` in that place.
    # `dropout_e` drops whole words of the input embedding, `weight_dropout` elements of the
    # hidden-to-hidden kernels (DropConnect); both are applied by the trainer, one mask a step.
    dropout_h: float | None = None
    dropout_i: float | None = None
    dropout_e: float = 0.0
    weight_dropout: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "cutoffs", tuple(int(c) for c in self.cutoffs))
        if self.softmax not in SOFTMAXES:
            raise UserError(f"--softmax must be one of {', '.join(SOFTMAXES)}, got "
                            f"{self.softmax!r}")
        if self.softmax == "full" and self.cutoffs:
            raise UserError("--cutoffs apply only to --softmax adaptive")
        if self.vocab_size < 2:
            raise UserError(f"vocab_size must be at least 2, got {self.vocab_size}")
        if min(self.emsize, self.nhid, self.nlayers) < 1:
            raise UserError("--emsize, --nhid and --nlayers must be positive")
        if self.softmax == "adaptive":
            check_cutoffs(self.cutoffs, self.vocab_size, self.output_size(), self.div_value)
        for name in ("dropout", "dropout_h", "dropout_i", "dropout_e", "weight_dropout"):
            rate = getattr(self, name)
            if rate is not None and not 0.0 <= rate < 1.0:
                raise UserError(f"--{name.replace('_', '-')} must be in [0, 1), got {rate}")
        if self.tied and self.emsize != self.output_size():
            raise UserError(
                f"tied embeddings need --emsize == --nhid (got {self.emsize} and {self.nhid}); "
                "use --no-tied for different sizes, or --last-layer-emsize for a last LSTM "
                "layer as wide as the embedding"
            )

    def to_dict(self) -> dict:
        """The fields as JSON keeps them (cutoffs a list)."""
        return {**dataclasses.asdict(self), "cutoffs": list(self.cutoffs)}

    @classmethod
    def from_dict(cls, d: dict) -> LMConfig:
        """From `to_dict()`; fields a config from an older version lacks take their defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    def layer_sizes(self) -> tuple[int, ...]:
        """Units of each LSTM layer, first to last: `nhid`, except a tied model's last layer
        with `last_layer_emsize`, which is `emsize` (GluonNLP's AWDRNN)."""
        sizes = [self.nhid] * self.nlayers
        if self.tied and self.last_layer_emsize:
            sizes[-1] = self.emsize
        return tuple(sizes)

    def output_size(self) -> int:
        """Units of the last LSTM layer: the width of what the decoder (and the continuous
        cache) read."""
        return self.layer_sizes()[-1]

    def state_names(self) -> list[str]:
        """Names of the state tensors, in the order the model takes and returns them."""
        return [f"{kind}{layer}" for layer in range(self.nlayers) for kind in ("h", "c")]

    def state_sizes(self) -> list[int]:
        """Units of each state tensor, in `state_names` order (h and c of a layer: its size)."""
        return [size for size in self.layer_sizes() for _ in ("h", "c")]

    def num_parameters(self) -> int:
        """Trainable parameters (tied weights counted once; a layer's LSTM bias once, however
        many MXNet biases it stands for: `count_params()` of the Keras model)."""
        v, e = self.vocab_size, self.emsize
        sizes = self.layer_sizes()
        lstm = sum(4 * h * (i + h + 1) for i, h in zip((e, *sizes[:-1]), sizes))
        h = sizes[-1]  # the decoder's input
        if self.softmax == "full":
            decoder = v + (0 if self.tied else v * h)
        else:
            shortlist = self.cutoffs[0] if self.cutoffs else v
            clusters = len(self.cutoffs)
            # the head's clusters (and words, untied), and a bias for every logit
            decoder = h * (clusters + (0 if self.tied else shortlist)) + v + clusters
            sizes = [end - start for start, end in pairwise((*self.cutoffs, v))]
            # tail i: its projection [H, w], and its output [w, size] (tied: Q_i [H, w])
            decoder += sum(w * (h + (size if not self.tied else 0 if w == h else h))
                           for w, size in
                           zip(tail_widths(h, self.cutoffs, self.div_value), sizes))
        return v * e + lstm + decoder


# GluonNLP's standard_lstm_lm_* models: embedding = hidden size, 2 layers, tied weights, and
# MXNet's two LSTM biases.
PRESETS: dict[str, dict] = {
    name: {"emsize": size, "nhid": size, "nlayers": 2, "dropout": dropout, "tied": True,
           "two_biases": True}
    for name, size, dropout in (("standard_lstm_lm_200", 200, 0.2),
                                ("standard_lstm_lm_650", 650, 0.5),
                                ("standard_lstm_lm_1500", 1500, 0.65))
}
# GluonNLP's awd_lstm_lm_* models (its AWDRNN and their predefined arguments): 3 layers, tied,
# the last layer as wide as the embedding, MXNet's two biases, and the AWD-LSTM's dropouts
# (GluonNLP's dropout, drop_h, drop_i, drop_e, weight_drop).
PRESETS.update({
    name: {"emsize": emsize, "nhid": nhid, "nlayers": 3, "tied": True, "last_layer_emsize": True,
           "two_biases": True, "dropout": dropout, "dropout_h": drop_h, "dropout_i": drop_i,
           "dropout_e": drop_e, "weight_dropout": weight_drop}
    for name, emsize, nhid, dropout, drop_h, drop_i, drop_e, weight_drop in (
        ("awd_lstm_lm_1150", 400, 1150, 0.4, 0.2, 0.65, 0.1, 0.5),
        ("awd_lstm_lm_600", 200, 600, 0.2, 0.1, 0.3, 0.05, 0.2))
})


def preset_config(name: str, vocab_size: int, **overrides) -> LMConfig:
    """The preset `name` for a vocabulary, with any fields overridden (None means keep)."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    fields = dict(PRESETS[name])
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return LMConfig(vocab_size=vocab_size, **fields)


# LMConfig's fields that regularise training without changing the model's shape
REGULARISER_FIELDS = ("dropout", "dropout_h", "dropout_i", "dropout_e", "weight_dropout")


# ---- the sections of a training run -----------------------------------------------------------

def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


@dataclass(frozen=True)
class DataConfig:
    """Which text to train on and how to turn it into tokens."""

    corpus: str | None = option(None, "named corpus (default wikitext-2 unless --train is given)")
    train: str | None = option(None, "your own training file", metavar="PATH")
    valid: str | None = option(None, "your own validation file", metavar="PATH")
    test: str | None = option(None, "your own test file", metavar="PATH")
    format: str | None = option(None, "tokens: one sample per line, whitespace tokens; raw: "
                                      "sentences + Moses", choices=("tokens", "raw"))
    moses_tutorial: bool = option(False, "the tutorial's Moses settings (XML escaping on, <unk> "
                                         "not protected)")
    data_root: str | None = option(None, "corpora folder (default $KERASLM_DATA)",
                                   resume=OVERRIDE)
    min_freq: int = option(1, "keep tokens seen at least this often in the training split")
    max_vocab: int | None = option(None, "keep at most this many tokens (the most frequent)")

    def __post_init__(self) -> None:
        _require(self.min_freq >= 1, f"--min-freq must be at least 1, got {self.min_freq}")
        _require(self.max_vocab is None or self.max_vocab >= 1,
                 f"--max-vocab must be at least 1, got {self.max_vocab}")


@dataclass(frozen=True)
class ModelOptions:
    """A GluonNLP preset and the sizes changed from it (None: the preset's)."""

    preset: str = option("standard_lstm_lm_200", f"GluonNLP model preset: {', '.join(PRESETS)}")
    emsize: int | None = option(None, "embedding size")
    nhid: int | None = option(None, "LSTM hidden size (of every layer but the last with "
                                    "--last-layer-emsize)")
    nlayers: int | None = option(None, "LSTM layers")
    dropout: float | None = option(None, "dropout rate")
    tied: bool | None = option(None, "tie the input and output embeddings")
    last_layer_emsize: bool | None = option(None, "a tied model's last LSTM layer is --emsize "
                                                  "units wide, so the decoder ties whatever "
                                                  "--nhid is (GluonNLP's AWDRNN; on for the "
                                                  "awd_lstm_lm presets)")
    two_biases: bool | None = option(None, "MXNet's twin LSTM biases (on for the presets)")
    softmax: str = option("full", "output layer: the full softmax, or the adaptive softmax for "
                                  "large vocabularies (Grave et al. 2017)",
                          choices=SOFTMAXES)
    cutoffs: str | None = option(None, "adaptive softmax: where the frequency-ordered vocabulary "
                                       "is cut into head and tail clusters (default: 5000,15000,"
                                       "50000,250000, each up to half the vocabulary; 2000 "
                                       "under 10,000 words)",
                                 metavar="C1,C2,...")
    div_value: float | None = option(None, "adaptive softmax: tail cluster i projects the hidden "
                                           "state to nhid / div_value**i units (default: 1 tied, "
                                           "4 untied)")
    dropout_h: float | None = option(None, "AWD-LSTM: locked dropout between LSTM layers, one "
                                           "mask per column and unit over time (default: the "
                                           "preset's; the standard presets drop element-wise at "
                                           "--dropout)")
    dropout_i: float | None = option(None, "AWD-LSTM: locked dropout on the input embedding's "
                                           "output (default: the preset's)")
    dropout_e: float | None = option(None, "AWD-LSTM: embedding dropout, whole words dropped "
                                           "from the input embedding, one mask a step (default: "
                                           "the preset's)")
    weight_dropout: float | None = option(None, "AWD-LSTM: DropConnect on the LSTMs' "
                                                "hidden-to-hidden kernels, one mask a step, never "
                                                "at evaluation (default: the preset's)")

    def __post_init__(self) -> None:
        _require(self.preset in PRESETS, f"unknown preset {self.preset!r}; choose one of "
                                         f"{', '.join(PRESETS)}")
        _require(self.softmax in SOFTMAXES, f"--softmax must be one of {', '.join(SOFTMAXES)}")
        if self.cutoffs is not None:
            parse_cutoffs(self.cutoffs)

    def regularisers(self) -> dict[str, float]:
        """The dropout rates given (not None), which a fine-tune applies to its source run's
        model: the shape is the source's, how it is regularised is the new run's."""
        return {name: getattr(self, name) for name in REGULARISER_FIELDS
                if getattr(self, name) is not None}

    def resolve(self, vocab_size: int) -> LMConfig:
        """The model for a vocabulary of `vocab_size` tokens."""
        _require(self.softmax == "adaptive" or (self.cutoffs is None and
                                                self.div_value is None),
                 "--cutoffs and --div-value apply only to --softmax adaptive")
        output = {"softmax", "cutoffs", "div_value"}
        sizes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.name != "preset" and f.name not in output}
        if self.softmax == "adaptive":
            cutoffs = (default_cutoffs(vocab_size) if self.cutoffs is None
                       else parse_cutoffs(self.cutoffs))
            tied = PRESETS[self.preset]["tied"] if self.tied is None else self.tied
            div_value = default_div_value(tied) if self.div_value is None else self.div_value
            sizes.update(softmax="adaptive", cutoffs=cutoffs, div_value=div_value)
        return preset_config(self.preset, vocab_size, **sizes)


@dataclass(frozen=True)
class OptimConfig:
    """Everything that decides the weights: batches, optimizer, schedule, seed."""

    epochs: int = option(3, "epochs to train (in all, counting those already done)",
                         resume=OVERRIDE)
    batch_size: int = option(20, "training batch size (BPTT columns)")
    bptt: int = option(35, "truncated-BPTT length")
    variable_bptt: bool = option(False, "GluonNLP's variable-length BPTT: each training batch's "
                                        "length drawn around --bptt (around half of it one "
                                        "time in 20), its learning rate scaled by length / bptt")
    lr: float = option(20.0, "initial learning rate")
    clip: float = option(0.25, "global gradient norm (0: off)")
    lr_decay: float = option(0.25, "learning-rate factor when validation perplexity does not "
                                   "improve")
    lr_update_interval: int | None = option(
        None, "GluonNLP's script's step schedule instead of the plateau decay: multiply the "
              "learning rate by --lr-update-factor after N validations without improvement "
              "(counted since the last improvement or update); when given, --lr-decay is not used",
        metavar="N")
    lr_update_factor: float = option(0.1, "the step schedule's learning-rate factor")
    ntasgd: bool = option(False, "NT-ASGD: once validation is worse than the best before the "
                                 "last --nonmono validations, average the weights from every "
                                 "step on and validate, test, keep and export the average; a "
                                 "fine-tune averages from its first step")
    nonmono: int = option(5, "NT-ASGD's window: validations not compared by its trigger")
    optimizer: str = option("sgd", "optimizer", choices=("sgd", "adam"))
    momentum: float = option(0.0, "SGD momentum")
    weight_decay: float = option(0.0, "decoupled weight decay (Keras')")
    wd: float = option(0.0, "L2 weight decay as GluonNLP's trainer applies it: wd * weight added "
                            "to every weight's gradient after clipping")
    alpha: float = option(0.0, "AR: alpha * mean(square(last LSTM layer's dropped output)) "
                               "added to the loss")
    beta: float = option(0.0, "TAR: beta * mean(square(h_t - h_{t-1})) of the last LSTM layer's "
                              "undropped output added to the loss")
    last_batch: str = option("discard", "training batches: drop the incomplete tail (tutorial) "
                                        "or pad it", choices=("discard", "keep"))
    eval_batch_size: int = option(10, "validation batch size")
    test_batch_size: int = option(1, "test batch size")
    seed: int = option(0, "random seed (initialisation and dropout masks)")
    precision: str = option("fp32", "compute precision: bf16 is mixed precision (bf16 matmuls, "
                                    "fp32 weights, softmax, loss and clipping) for CPUs with "
                                    "AVX512-BF16/AMX and GPUs of compute capability 8.0+",
                            choices=("fp32", "bf16"))
    max_batches: int | None = option(None, "stop each epoch after this many batches (quick "
                                           "trials)")

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "bptt", "eval_batch_size", "test_batch_size"):
            value = getattr(self, name)
            _require(value >= (0 if name == "epochs" else 1),
                     f"--{_flag(name)} must be positive, got {value}")
        _require(self.lr > 0, f"--lr must be positive, got {self.lr}")
        _require(self.clip >= 0, f"--clip must be 0 (off) or positive, got {self.clip}")
        _require(0 < self.lr_decay <= 1, f"--lr-decay must be in (0, 1], got {self.lr_decay}")
        _require(0 < self.lr_update_factor <= 1,
                 f"--lr-update-factor must be in (0, 1], got {self.lr_update_factor}")
        _require(self.lr_update_interval is None or self.lr_update_interval >= 1,
                 f"--lr-update-interval must be at least 1, got {self.lr_update_interval}")
        _require(min(self.momentum, self.weight_decay, self.wd, self.alpha, self.beta) >= 0,
                 "--momentum, --weight-decay, --wd, --alpha and --beta must not be negative")
        _require(self.nonmono >= 1, f"--nonmono must be at least 1, got {self.nonmono}")
        _require(self.max_batches is None or self.max_batches >= 1,
                 f"--max-batches must be at least 1, got {self.max_batches}")
        _require(self.precision in ("fp32", "bf16"),
                 f"--precision must be fp32 or bf16, got {self.precision!r}")


@dataclass(frozen=True)
class RunConfig:
    """Where the run is written and how this process runs it."""

    runs_dir: str = option("runs", "folder of runs", resume=PROCESS)
    name: str | None = option(None, "run name (default run-<timestamp>)")
    resume: str | None = option(None, "continue an interrupted run from its last checkpoint",
                                resume=PROCESS, metavar="RUN")
    finetune_from: str | None = option(None, "start from a run's best weights and vocabulary",
                                       metavar="RUN")
    checkpoint_every: int = option(0, "also save a resumable checkpoint every N batches",
                                   resume=OVERRIDE, metavar="N")
    log_interval: int = option(200, "print a progress line every N batches (0: never)",
                               resume=OVERRIDE, metavar="N")
    cpu_replicas: int | None = option(None, "split the CPU into N replicas (when there is no "
                                            "GPU)", resume=OVERRIDE, metavar="N")
    strategy: str = option("mirrored", "multiworker: MultiWorkerMirroredStrategy over the hosts "
                                       "in $TF_CONFIG (run the same command on every host; only "
                                       "the chief writes the run)",
                           resume=OVERRIDE, choices=("mirrored", "multiworker"))
    log_losses: str | None = option(None, "debug: append every step's loss, lr and gradient norm "
                                          "to PATH (JSON lines, this process only)",
                                    resume=PROCESS, metavar="PATH")
    jit: bool = option(False, "XLA-compile the whole per-replica step (measured slower on CPU)",
                       resume=OVERRIDE)
    quiet: bool = option(False, "no progress bar", resume=OVERRIDE)

    def __post_init__(self) -> None:
        _require(self.checkpoint_every >= 0 and self.log_interval >= 0,
                 "--checkpoint-every and --log-interval must not be negative")
        _require(self.cpu_replicas is None or self.cpu_replicas >= 1,
                 f"--cpu-replicas must be at least 1, got {self.cpu_replicas}")


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelOptions, "optim": OptimConfig,
                             "run": RunConfig}


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run: `train(TrainConfig(...))` is what `python -m keraslm.train` does."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelOptions = field(default_factory=ModelOptions)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @classmethod
    def from_values(cls, values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
        """`base` (default: the defaults) with the fields named in `values` replaced."""
        base = base or cls()
        unknown = set(values) - set(FIELDS)
        if unknown:
            raise UserError(f"unknown training settings: {', '.join(sorted(unknown))}")
        sections = {}
        for name in SECTIONS:
            current = getattr(base, name)
            changes = {k: v for k, v in values.items() if FIELDS[k][0] == name}
            sections[name] = dataclasses.replace(current, **changes) if changes else current
        return cls(**sections)

    def values(self) -> dict[str, Any]:
        """Every field by name (names are unique across sections)."""
        return {name: getattr(getattr(self, section), name) for name, (section, _) in FIELDS.items()}

    def to_dict(self) -> dict:
        """What config.json keeps: every section, without this process's own fields."""
        return {section: {f.name: getattr(getattr(self, section), f.name)
                          for f in dataclasses.fields(cls) if f.metadata["resume"] != PROCESS}
                for section, cls in SECTIONS.items()}

    def to_argv(self) -> list[str]:
        """The flags of `python -m keraslm.train` that give this configuration (non-defaults)."""
        argv: list[str] = []
        for name, value in self.values().items():
            field_ = FIELDS[name][1]
            if value == field_.default:
                continue
            if isinstance(value, bool):
                argv.append(flag_name(name) if value else f"--no-{_flag(name)}")
            else:
                argv += [flag_name(name), str(value)]
        return argv

    @classmethod
    def from_saved(cls, saved: dict) -> TrainConfig:
        """From a run's config.json: `train` (this version) or the flat `args` of older runs.

        Settings an older version recorded that no longer exist are ignored; ones it lacked take
        their defaults.
        """
        if isinstance(saved.get("train"), dict):
            values = {k: v for section in saved["train"].values() if isinstance(section, dict)
                      for k, v in section.items()}
        elif isinstance(saved.get("args"), dict):
            values = saved["args"]
        else:
            raise UserError("the run's config.json records no training settings")
        kept = {k: v for k, v in values.items()
                if k in FIELDS and FIELDS[k][1].metadata["resume"] != PROCESS}
        return cls.from_values(kept)


def _all_fields() -> dict[str, tuple[str, dataclasses.Field]]:
    found: dict[str, tuple[str, dataclasses.Field]] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name not in found, f"config field {f.name} appears in two sections"
            found[f.name] = (section, f)
    return found


FIELDS = _all_fields()  # field name -> (section, dataclasses.Field)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def flag_name(name: str) -> str:
    """The command-line option of a config field: `batch_size` -> `--batch-size`."""
    return f"--{_flag(name)}"


def resume_config(saved: TrainConfig, given: dict[str, Any]) -> TrainConfig:
    """The configuration that continues a run: the saved one, with the OVERRIDE and PROCESS
    fields the user gave again. Giving a SAVED field a different value is an error, since the
    run's weights already depend on it."""
    for name, value in given.items():
        section, f = FIELDS[name]
        kept = getattr(getattr(saved, section), name)
        if f.metadata["resume"] == SAVED and value != kept:
            raise UserError(f"{flag_name(name)} cannot change when resuming: the run was "
                            f"started with {kept!r}; start a new run (or --finetune-from it) "
                            f"to change it")
    changes = {name: value for name, value in given.items()
               if FIELDS[name][1].metadata["resume"] != SAVED}
    return TrainConfig.from_values(changes, base=saved)
