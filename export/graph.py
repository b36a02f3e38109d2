"""The scoring graph: a Keras LM as a `tf.function`, converted by tf2onnx, then tidied for serving.

The exported graph scores text instead of returning logits: the [batch, time, vocab] tensor never
leaves the runtime. Its inputs and outputs are the bundle contract's (keraslm/contract.py):
tokens, targets and the LSTM state in; logprobs (0 at padding), the state out, next_logprobs and
hidden (the last LSTM layer's output, which the decoder reads; the continuous cache needs it).

The opset is the caller's choice (export/to_onnx.py explains its default).

The decoder's bias is folded into its matmul (a constant-1 input column against a bias row of the
weight): the matmul adds it, which saves onnxruntime a full read and write of the [batch, time,
vocab] logits (measured 7-10 % faster scoring at batch 20). The log-distribution stays one
`LogSoftmax`: onnxruntime runs it as one fused kernel, a row at a time in cache, while
`logits[target] - log-sum-exp(logits)` measured 5-10 % slower (onnxruntime 1.32's
ReduceLogSumExp is a scalar loop, 46x slower than LogSoftmax on 35 rows; TensorFlow's composite
`reduce_logsumexp` becomes five ops, each a pass over the logits).

tf2onnx 1.17 rewrites Keras 3 `LSTM(use_cudnn=False)` loops into native ONNX `LSTM` ops
(its TF2 Keras-LSTM pattern, onnx/tensorflow-onnx#1752); `check_native_lstm` makes the export
fail rather than ship a slow Loop if a future version stops matching.
"""

from __future__ import annotations  # noqa: I001  (keraslm.backend must precede tf2onnx)

import contextlib
from collections.abc import Iterator
from itertools import pairwise

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# keraslm.backend before tf2onnx: tf2onnx imports TensorFlow, and TensorFlow imports Keras
# on the backend the environment says, unless keraslm.backend has set it first.
from keraslm.backend import keras, tf
import tf2onnx
from keraslm import contract
from keraslm.adaptive import AdaptiveSoftmax
from keraslm.model import LMConfig, full_decoder_weights, split_decoder


def input_names(config: LMConfig) -> list[str]:
    """The graph's inputs, in order (the contract's for this config)."""
    return contract.input_names(config.nlayers)


def output_names(config: LMConfig) -> list[str]:
    """The graph's outputs, in order (the contract's for this config)."""
    return contract.output_names(config.nlayers)


def scoring_function(model: keras.Model, config: LMConfig, *,
                     fold_bias: bool = True) -> tf.types.experimental.Function:
    """`(tokens, targets, *state) -> {logprobs, <state>_out..., next_logprobs, hidden}` as a
    tf.function.

    `fold_bias` computes the decoder as one matmul `[hidden, 1] @ [[W], [bias]]` (see the module
    doc); without it the bias is its own add, which int8 quantization wants: its per-tensor
    weight scale would otherwise have to span the bias too.
    """
    features, decoder = split_decoder(model)
    states = contract.state_names(config.nlayers)
    signature = [
        tf.TensorSpec([None, None], tf.int32, name=contract.INPUT_TOKENS),
        tf.TensorSpec([None, None], tf.int32, name=contract.INPUT_TARGETS),
        *(tf.TensorSpec([None, size], tf.float32, name=n)
          for n, size in zip(states, config.state_sizes())),
    ]
    decode = (_adaptive_decoder(decoder) if isinstance(decoder, AdaptiveSoftmax)
              else _full_decoder(decoder, fold_bias))

    @tf.function(input_signature=signature)
    def score(tokens, targets, *state):
        no_dropout_keys = tf.zeros(tf.shape(tokens)[:1], tf.int32)
        hidden, *new_state = features([tokens, no_dropout_keys, *state], training=False)
        batch, steps = tf.shape(targets)[0], tf.shape(targets)[1]
        flat_hidden = tf.reshape(hidden, [-1, hidden.shape[-1]])
        flat_targets = tf.reshape(targets, [-1])
        picked, next_logprobs = decode(flat_hidden, flat_targets, batch, steps)
        outputs = {contract.OUTPUT_LOGPROBS: tf.reshape(picked, [batch, steps])}
        for name, value in zip(states, new_state):
            outputs[contract.state_output(name)] = value
        outputs[contract.OUTPUT_NEXT_LOGPROBS] = next_logprobs
        # the decoder's input, returned for the continuous cache
        outputs[contract.OUTPUT_HIDDEN] = tf.identity(hidden)
        return outputs

    return score


def _full_decoder(decoder: keras.layers.Layer, fold_bias: bool):
    """`(flat hidden [B*T, H], flat targets [B*T], B, T) -> (log p(target) [B*T], 0 at padding;
    the last position's log-distribution [B, V])` for a full softmax."""
    kernel, bias, transposed = full_decoder_weights(decoder)

    def decode(flat_hidden, flat_targets, batch, steps):
        # The decoder runs only where it is read: at every target, and at each row's last
        # position (next_logprobs). Padding then costs the LSTM, not the [vocab]-wide decoder.
        is_target = flat_targets >= 0
        is_last = tf.range(batch * steps) % steps == steps - 1
        decoded = tf.where(is_target | is_last)[:, 0]  # flat positions, in order
        inputs = tf.gather(flat_hidden, decoded)  # [N, H]
        weight = tf.transpose(kernel) if transposed else kernel  # [H, V]
        if fold_bias:
            inputs = tf.concat([inputs, tf.ones_like(inputs[:, :1])], axis=-1)
            logits = tf.matmul(inputs, tf.concat([weight, bias[None, :]], axis=0))
        else:
            logits = tf.matmul(inputs, weight) + bias
        logprobs = tf.nn.log_softmax(logits)  # [N, V]: stays inside the graph
        wanted = tf.gather(flat_targets, decoded)
        # (row, word) pairs, never a flat row * vocab + word: that int32 product wraps negative
        # past 2**31 logits in one call, and Gather reads negative indices from the end. Mask
        # before gathering: a -1 index would silently read the last word.
        pairs = tf.stack([tf.range(tf.shape(wanted)[0]), tf.maximum(wanted, 0)], axis=1)
        picked = tf.gather_nd(logprobs, pairs)
        picked = tf.where(wanted >= 0, picked, tf.zeros_like(picked))
        scattered = tf.scatter_nd(decoded[:, None], picked, tf.cast([batch * steps], tf.int64))
        # each row's last position among the decoded ones: a [B, V] slice of what is computed
        order = tf.cumsum(tf.cast(is_target | is_last, tf.int32)) - 1
        last = tf.gather(logprobs, tf.gather(order, tf.range(1, batch + 1) * steps - 1))
        return scattered, last

    return decode


def _adaptive_decoder(decoder: AdaptiveSoftmax):
    """The same as `_full_decoder` for an adaptive softmax: the targets' log-probabilities from
    the head and, per tail, only the rows whose target is in it; the whole distribution only
    for each row's last position."""
    def decode(flat_hidden, flat_targets, batch, steps):
        targeted = tf.where(flat_targets >= 0)[:, 0]  # padding is never gathered
        picked = decoder.target_log_probs(tf.gather(flat_hidden, targeted),
                                          tf.gather(flat_targets, targeted))
        scattered = tf.scatter_nd(targeted[:, None], picked, tf.cast([batch * steps], tf.int64))
        last = tf.gather(flat_hidden, tf.range(1, batch + 1) * steps - 1)  # [B, H]
        return scattered, decoder.log_probs(last)

    return decode


def convert(model: keras.Model, config: LMConfig, opset: int, *,
            large: bool = False, share_tied: bool = True,
            fold_bias: bool | None = None) -> onnx.ModelProto:
    """The finished scoring graph: converted, I/O named, LSTMs checked, tied weights shared.

    `large` takes tf2onnx's large-model path (weights outside the 2 GiB protobuf while
    converting); the returned proto then holds every tensor inline again, so save it with
    external data. `share_tied=False` keeps tf2onnx's transposed copy of a tied embedding, which
    int8 quantization wants (it quantizes only a MatMul whose weight is a constant); `fold_bias`
    (default: `share_tied`, i.e. not for quantization) is `scoring_function`'s.
    """
    function = scoring_function(model, config,
                                fold_bias=share_tied if fold_bias is None else fold_bias)
    with _numpy2_compat_for_tf2onnx():
        proto, storage = tf2onnx.convert.from_function(
            function, input_signature=function.input_signature, opset=opset, large_model=large
        )
    if storage is not None:
        inline_external_tensors(proto, storage.name_to_tensor_data)
    set_io_contract(proto, config)
    check_native_lstm(proto, config.nlayers)
    if share_tied:
        share_tied_weights(proto, model, config)
    return proto


def share_tied_weights(proto: onnx.ModelProto, model: keras.Model, config: LMConfig) -> None:
    """Replace every constant tf2onnx folded out of a tied embedding (the full softmax's
    transpose; the adaptive head's rows and each tail's rows times its projection) by nodes
    reading the one embedding initializer. Nothing to do for an untied model."""
    if not config.tied:
        return
    embedding = embedding_matrix(model)
    share_tied_embedding(proto, embedding, tied_words(config))
    if config.softmax == "adaptive" and config.cutoffs:
        bounds = (*config.cutoffs, config.vocab_size)
        share_tied_tails(proto, embedding, bounds,
                         [None if q is None else q.numpy()
                          for q in model.get_layer("decoder").outputs])
        share_embedding_rows(proto, embedding, (0, *bounds))


def embedding_matrix(model: keras.Model) -> np.ndarray:
    return model.get_layer("embedding").embeddings.numpy()


@contextlib.contextmanager
def _numpy2_compat_for_tf2onnx() -> Iterator[None]:
    """tf2onnx 1.17's large-model path calls `np.product`, which NumPy 2 removed."""
    missing = not hasattr(np, "product")
    if missing:
        np.product = np.prod
    try:
        yield
    finally:
        if missing:
            del np.product


def inline_external_tensors(proto: onnx.ModelProto, data: dict[str, bytes]) -> None:
    """Put tf2onnx's externally stored tensors back into the proto (saving moves them out again)."""
    for tensor in _all_tensors(proto.graph):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        location = {entry.key: entry.value for entry in tensor.external_data}["location"]
        tensor.raw_data = data[location]
        del tensor.external_data[:]
        tensor.data_location = TensorProto.DEFAULT


def _all_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


def share_tied_embedding(proto: onnx.ModelProto, embedding: np.ndarray,
                         words: int | None = None) -> None:
    """Replace tf2onnx's folded copies of the tied embedding by nodes that read the embedding
    initializer, so that its weights are stored once.

    A copy holds embedding[:words].T (`words`: every word for the full softmax, the head's
    shortlist for the adaptive softmax), possibly with columns of its own to its right (the
    adaptive head's cluster logits) and one row below (the full softmax's folded bias). It
    becomes Transpose (of a Slice, for the shortlist) of the embedding, its own columns and row
    concatenated back as small initializers. onnxruntime folds these constant nodes when it
    loads, so the decoder still multiplies by a constant.
    """
    graph = proto.graph
    rows = embedding.shape[1]
    words = len(embedding) if words is None else words
    top = embedding[:words].T
    copies = {t.name: t for t in graph.initializer if _extends(t, top)}
    if not copies:
        return
    original = _initializers_equal_to(graph, embedding)
    if not original:
        raise RuntimeError("tied export: the embedding initializer is missing from the graph")
    kept = [t for t in graph.initializer if t.name not in copies]
    source, new_nodes = original[0], []
    if words < len(embedding):  # the first `words` rows
        bounds = [f"{source}__{part}" for part in ("start", "words", "axis")]
        kept += [numpy_helper.from_array(np.array([value], np.int64), name)
                 for name, value in zip(bounds, (0, words, 0))]
        new_nodes.append(helper.make_node("Slice", [source, *bounds], [f"{source}__head"],
                                          name=f"{source}__head"))
        source = f"{source}__head"
    transposed = f"{source}__transposed"
    new_nodes.append(helper.make_node("Transpose", [source], [transposed],
                                      name="tied_decoder_weight", perm=[1, 0]))
    renamed = {}
    for name, tensor in copies.items():
        array, value = numpy_helper.to_array(tensor), transposed
        if array.shape[1] > words:  # columns of its own, right of the embedding's
            columns = f"{name}__columns"
            kept.append(numpy_helper.from_array(array[:rows, words:], columns))
            new_nodes.append(helper.make_node("Concat", [value, columns], [f"{name}__wide"],
                                              name=f"{name}__wide", axis=1))
            value = f"{name}__wide"
        if array.shape[0] > rows:  # the folded bias, one row below
            bias, row, axis = f"{name}__bias", f"{name}__bias_row", f"{name}__axis0"
            kept += [numpy_helper.from_array(array[rows], bias),
                     numpy_helper.from_array(np.array([0], np.int64), axis)]
            new_nodes += [helper.make_node("Unsqueeze", [bias, axis], [row], name=row),
                          helper.make_node("Concat", [value, row], [f"{name}__tied"],
                                           name=f"{name}__tied", axis=0)]
            value = f"{name}__tied"
        renamed[name] = value
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for node in reversed(new_nodes):
        graph.node.insert(0, node)


def share_tied_tails(proto: onnx.ModelProto, embedding: np.ndarray, bounds: tuple[int, ...],
                     projections: list[np.ndarray | None]) -> None:
    """Compute a tied adaptive softmax's tail output matrices from the embedding in the graph.

    Tied, tail i's output matrix is (E[start:end] @ Q_i)^T, its words' embedding rows projected
    (keraslm.adaptive; E[start:end]^T itself when Q_i is None, a tail as wide as the hidden
    state); tf2onnx folds each into a constant as big as an untied tail's. Each becomes
    Transpose(MatMul(Slice(E), Q_i)) with Q_i [H, width] the only new initializer, which
    onnxruntime folds back into a constant when it loads. `bounds` are the cutoffs and the
    vocabulary size; `projections` the Q_i in tail order.
    """
    graph = proto.graph
    original = _initializers_equal_to(graph, embedding)
    if not original:
        raise RuntimeError("tied export: the embedding initializer is missing from the graph")
    renamed, new_nodes, added = {}, [], []
    for i, ((start, end), projection) in enumerate(zip(pairwise(bounds), projections), 1):
        rows = embedding[start:end]
        folded = (rows if projection is None else rows @ projection).T
        copies = [t.name for t in graph.initializer if tuple(t.dims) == folded.shape
                  and np.allclose(numpy_helper.to_array(t), folded, rtol=1e-4, atol=1e-6)]
        if not copies:
            continue
        tail = f"tied_tail{i}"
        names = [f"{tail}__{part}" for part in ("start", "end", "axis", "projection")]
        added += [numpy_helper.from_array(np.array([value], np.int64), name)
                  for name, value in zip(names, (start, end, 0))]
        new_nodes.append(helper.make_node("Slice", [original[0], *names[:3]],
                                          [f"{tail}__rows"], name=f"{tail}__rows"))
        projected = f"{tail}__rows"
        if projection is not None:
            added.append(numpy_helper.from_array(projection.astype(np.float32), names[3]))
            projected = f"{tail}__projected"
            new_nodes.append(helper.make_node("MatMul", [f"{tail}__rows", names[3]],
                                              [projected], name=projected))
        new_nodes.append(helper.make_node("Transpose", [projected], [f"{tail}__weight"],
                                          name=f"{tail}__weight", perm=[1, 0]))
        renamed.update(dict.fromkeys(copies, f"{tail}__weight"))
    _replace_initializers(graph, renamed, new_nodes, added)


def share_embedding_rows(proto: onnx.ModelProto, embedding: np.ndarray,
                         bounds: tuple[int, ...]) -> None:
    """Replace folded copies of the embedding's row blocks E[a:b], for consecutive a, b of
    `bounds` (the tied adaptive softmax splits it so; tf2onnx's large-model path folds the
    pieces), by Slices of the embedding initializer."""
    graph = proto.graph
    original = _initializers_equal_to(graph, embedding)
    if not original:
        raise RuntimeError("tied export: the embedding initializer is missing from the graph")
    renamed, new_nodes, added = {}, [], []
    for start, end in pairwise(bounds):
        copies = _initializers_equal_to(graph, embedding[start:end])
        if not copies or (start, end) == (0, len(embedding)):
            continue
        rows = f"tied_rows_{start}_{end}"
        names = [f"{rows}__{part}" for part in ("start", "end", "axis")]
        added += [numpy_helper.from_array(np.array([value], np.int64), name)
                  for name, value in zip(names, (start, end, 0))]
        new_nodes.append(helper.make_node("Slice", [original[0], *names], [rows], name=rows))
        renamed.update(dict.fromkeys(copies, rows))
    _replace_initializers(graph, renamed, new_nodes, added)


def _replace_initializers(graph: onnx.GraphProto, renamed: dict[str, str],
                          new_nodes: list[onnx.NodeProto], added: list[TensorProto]) -> None:
    """Drop the initializers `renamed` maps, read their replacements instead, and put
    `new_nodes` (which compute those) and the initializers they need first in the graph."""
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
    kept = [t for t in graph.initializer if t.name not in renamed]
    del graph.initializer[:]
    graph.initializer.extend([*kept, *added])
    for node in reversed(new_nodes):
        graph.node.insert(0, node)


def tied_words(config: LMConfig) -> int:
    """How many of the embedding's rows the tied output layer reads: every word's for the full
    softmax, the head's shortlist (the first cutoff) for the adaptive softmax."""
    if config.softmax == "adaptive" and config.cutoffs:
        return config.cutoffs[0]
    return config.vocab_size


def _initializers_equal_to(graph: onnx.GraphProto, value: np.ndarray) -> list[str]:
    return [
        t.name for t in graph.initializer
        if tuple(t.dims) == value.shape and np.array_equal(numpy_helper.to_array(t), value)
    ]


def _extends(tensor: TensorProto, top: np.ndarray) -> bool:
    """Whether `tensor` is `top`, possibly with columns to its right and one more row (the
    folded bias) below it."""
    dims = tuple(tensor.dims)
    if (len(dims) != 2 or not top.shape[0] <= dims[0] <= top.shape[0] + 1
            or dims[1] < top.shape[1]):
        return False
    return np.array_equal(numpy_helper.to_array(tensor)[:top.shape[0], :top.shape[1]], top)


def set_io_contract(proto: onnx.ModelProto, config: LMConfig) -> None:
    """Order the outputs as documented and give every input/output its declared shape."""
    graph = proto.graph
    shapes = io_shapes(config)
    by_name = {o.name: o for o in graph.output}
    missing = [name for name in output_names(config) if name not in by_name]
    if missing or {i.name for i in graph.input} != set(input_names(config)):
        raise RuntimeError(f"converted graph has unexpected I/O (missing outputs {missing})")
    ordered = [by_name[name] for name in output_names(config)]
    del graph.output[:]
    graph.output.extend(ordered)
    for value in [*graph.input, *graph.output]:
        dtype, shape = shapes[value.name]
        if value.type.tensor_type.elem_type != dtype:
            raise RuntimeError(f"converted graph: {value.name} has the wrong dtype")
        value.CopyFrom(helper.make_tensor_value_info(value.name, dtype, shape))
    del graph.value_info[:]  # stale converter guesses with anonymous dims; runtimes re-infer


def io_shapes(config: LMConfig) -> dict[str, tuple[int, list]]:
    """Every graph input and output: ONNX element type and shape with symbolic batch/time."""
    specs = contract.io_specs(config.layer_sizes(), config.vocab_size)
    return {name: (helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape)
            for name, (dtype, shape) in specs.items()}


def check_native_lstm(proto: onnx.ModelProto, nlayers: int) -> None:
    """Fail unless every recurrent layer became one ONNX LSTM op (no Loop/Scan)."""
    ops = [node.op_type for node in proto.graph.node]
    if "Loop" in ops or "Scan" in ops or ops.count("LSTM") != nlayers:
        raise RuntimeError(
            f"tf2onnx did not produce {nlayers} native LSTM op(s) (got {ops.count('LSTM')} "
            f"LSTM, {ops.count('Loop')} Loop, {ops.count('Scan')} Scan)"
        )


def external_data_files(proto: onnx.ModelProto) -> list[str]:
    """The files (relative to the model) that hold tensors stored outside it."""
    return sorted({entry.value for tensor in _all_tensors(proto.graph)
                   if tensor.data_location == TensorProto.EXTERNAL
                   for entry in tensor.external_data if entry.key == "location"})


def describe_io(proto: onnx.ModelProto
                ) -> tuple[tuple[contract.TensorSpec, ...], tuple[contract.TensorSpec, ...]]:
    """The graph's (inputs, outputs) as bundle.json records them: name, dtype, shape."""
    def record(value: onnx.ValueInfoProto) -> contract.TensorSpec:
        tensor = value.type.tensor_type
        dims = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in tensor.shape.dim]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name
        return contract.TensorSpec(value.name, dtype, tuple(dims))

    return (tuple(record(v) for v in proto.graph.input),
            tuple(record(v) for v in proto.graph.output))
