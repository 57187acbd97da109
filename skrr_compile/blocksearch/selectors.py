"""Which encoder output the denoiser reads: the last hidden state, another layer, or a stack of layers.

SDXL reads CLIP's penultimate layer (`hidden_states[-2]`), FLUX.2 a stack of Mistral layers concatenated
along the channels (`torch.cat([hidden_states[k] for k in layers], -1)`, its context embedder's input).
A selector is a callable on the encoder's output (see `discrepancy.Selector`); one that reads
`hidden_states` says so with `needs_hidden_states`, and `with_hidden_states` makes a HF model (or a
PrunedEncoder) return them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from skrr_compile.blocksearch.discrepancy import last_hidden_state


def parse_layers(spec: int | str | Sequence[int]) -> tuple[int, ...]:
    """`-2`, `"-2"`, `"10,20,30"` or `[10, 20, 30]` as a tuple of hidden-state indices."""
    if isinstance(spec, bool):
        raise ValueError(f"hidden layer must be an integer or a comma list of integers, got {spec!r}")
    if isinstance(spec, int):
        return (spec,)
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
    else:
        parts = list(spec)
    try:
        layers = tuple(int(p) for p in parts)
    except (TypeError, ValueError) as e:
        raise ValueError(f"hidden layer must be an integer or a comma list of integers, got {spec!r}") from e
    if not layers:
        raise ValueError(f"no hidden layer given in {spec!r}")
    return layers


class HiddenLayers:
    """`output.hidden_states[k]` (one layer) or those layers concatenated along the channels (several).

    Indices are those of HF's `hidden_states` tuple: 0 is the embedding output, k the output of layer k,
    -1 the last entry (for most models the final-normed last layer, equal to `last_hidden_state`).
    """

    needs_hidden_states = True

    def __init__(self, layers: int | str | Sequence[int]):
        self.layers = parse_layers(layers)

    def __call__(self, output) -> torch.Tensor:
        hidden = getattr(output, "hidden_states", None)
        if hidden is None:
            raise ValueError(
                "the encoder output has no hidden_states; call the encoder with output_hidden_states=True "
                "(with_hidden_states does)"
            )
        n = len(hidden)
        bad = [k for k in self.layers if not -n <= k < n]
        if bad:
            raise ValueError(f"hidden layer {bad} out of range: this encoder has {n} hidden states "
                             f"(embeddings + {n - 1} layers), valid indices {-n}..{n - 1}")
        if len(self.layers) == 1:
            return hidden[self.layers[0]]
        return torch.cat([hidden[k] for k in self.layers], dim=-1)

    def __repr__(self) -> str:
        return f"hidden_states[{','.join(map(str, self.layers))}]"


def output_selector(hidden_layer: int | str | Sequence[int] | None = None) -> Callable:
    """The selector for `--hidden-layer` (None: the last hidden state)."""
    return last_hidden_state if hidden_layer is None else HiddenLayers(hidden_layer)


def with_hidden_states(fn: Callable, select: Callable) -> Callable:
    """`fn(ids, attention_mask=...)`, asked for every hidden state when `select` reads them."""
    if not getattr(select, "needs_hidden_states", False):
        return fn

    def call(input_ids, attention_mask=None):
        return fn(input_ids, attention_mask=attention_mask, output_hidden_states=True)

    return call
