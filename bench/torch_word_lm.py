"""Baseline: the PyTorch `word_language_model` example's training step, timed on the same batches.

The model and loop follow pytorch/examples `word_language_model` (`--model LSTM --tied`):
Embedding -> Dropout -> nn.LSTM(2 layers, dropout) -> Dropout -> Linear tied to the embedding,
CrossEntropyLoss, backward, `clip_grad_norm_`, plain SGD by `p.data.add_(grad, alpha=-lr)`, hidden
state detached between batches. `--adaptive-cutoffs 2000,10000 --div-value 4` swaps the decoder
for PyTorch's `nn.AdaptiveLogSoftmaxWithLoss` (untied), the baseline of issue 24. Run by
`bench/bench_train.py` in its own process (PyTorch and TensorFlow each want the cores) and prints
one JSON line.

    python bench/torch_word_lm.py --ids ids.npy --vocab 33278 --batches 30
    python bench/torch_word_lm.py --ids ids.npy --vocab 33278 --adaptive-cutoffs 2000,10000
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch import nn


class WordLM(nn.Module):
    """The example's model; with `cutoffs`, its decoder is PyTorch's own adaptive softmax
    (`nn.AdaptiveLogSoftmaxWithLoss`, untied: it has no full-vocabulary matrix to tie)."""

    def __init__(self, vocab: int, size: int, layers: int, dropout: float,
                 cutoffs: list[int] | None = None, div_value: float = 4.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab, size)
        self.rnn = nn.LSTM(size, size, layers, dropout=dropout)
        if cutoffs:
            self.decoder = nn.AdaptiveLogSoftmaxWithLoss(size, vocab, cutoffs, div_value)
        else:
            self.decoder = nn.Linear(size, vocab)
            self.decoder.weight = self.encoder.weight

    def forward(self, tokens, hidden):
        """The decoder's input [time, batch, size] and the state."""
        output, hidden = self.rnn(self.drop(self.encoder(tokens)), hidden)
        return self.drop(output), hidden

    def loss(self, features, targets, criterion):
        """Mean cross-entropy of the targets."""
        flat = features.reshape(-1, features.shape[-1])
        if isinstance(self.decoder, nn.AdaptiveLogSoftmaxWithLoss):
            return self.decoder(flat, targets.reshape(-1)).loss
        return criterion(self.decoder(flat), targets.reshape(-1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ids", required=True, help=".npy int32 id stream")
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--size", type=int, default=200)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--adaptive-cutoffs", default=None, metavar="C1,C2,...",
                   help="use nn.AdaptiveLogSoftmaxWithLoss with these cutoffs (untied)")
    p.add_argument("--div-value", type=float, default=4.0)
    args = p.parse_args()
    cutoffs = [int(c) for c in args.adaptive_cutoffs.split(",")] if args.adaptive_cutoffs else None
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    ids = torch.from_numpy(np.load(args.ids).astype(np.int64))
    columns = ids.numel() // args.batch_size
    data = ids[: columns * args.batch_size].view(args.batch_size, -1).t().contiguous()  # [time, batch]
    model = WordLM(args.vocab, args.size, args.layers, args.dropout, cutoffs, args.div_value)
    model.train()
    criterion = nn.CrossEntropyLoss()
    hidden = tuple(torch.zeros(args.layers, args.batch_size, args.size) for _ in range(2))
    lr, clip = 20.0, 0.25

    def step(i: int, hidden):
        start = i * args.bptt
        inputs, targets = data[start:start + args.bptt], data[start + 1:start + 1 + args.bptt]
        hidden = tuple(h.detach() for h in hidden)
        model.zero_grad()
        features, hidden = model(inputs, hidden)
        loss = model.loss(features, targets, criterion)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        for param in model.parameters():
            param.data.add_(param.grad, alpha=-lr)
        return loss.item(), hidden

    for i in range(args.warmup):
        _, hidden = step(i, hidden)
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.batches):
        loss, hidden = step(i, hidden)
    seconds = time.perf_counter() - start
    tokens = args.batches * args.batch_size * args.bptt
    print(json.dumps({"tokens_per_s": tokens / seconds, "seconds": seconds, "loss": loss,
                      "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "softmax": "adaptive" if cutoffs else "full", "cutoffs": cutoffs,
                      "div_value": args.div_value if cutoffs else None,
                      "parameters": sum(p.numel() for p in model.parameters())}))


if __name__ == "__main__":
    main()
