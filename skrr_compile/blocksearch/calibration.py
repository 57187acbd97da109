"""Calibration data: read prompt files, tokenize them in chunks, always with the null prompt ""."""

from __future__ import annotations

import csv
import io
import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import torch

PROMPT_FORMATS = ".txt (one prompt a line), .jsonl (--field), .tsv/.csv (--field names the column)"
DEFAULT_FIELDS = ("prompt", "Prompt", "caption", "text", "IIW-P5B")


class PromptError(ValueError):
    """A prompt source that cannot be read as a list of prompts."""


BUILTIN_SETS = {"builtin": "prompts.txt", "builtin-heldout": "heldout.txt"}


def builtin_prompts(name: str = "builtin") -> list[str]:
    """The small prompt sets shipped with skrr-compile: "builtin" (calibration), "builtin-heldout"."""
    text = resources.files("skrr_compile.data").joinpath(BUILTIN_SETS[name]).read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def read_prompts(source: str | Path | Sequence[str], field: str | None = None, limit: int | None = None) -> list[str]:
    """Prompts from a list, a .txt/.jsonl/.tsv/.csv file, "builtin" or "builtin-heldout"."""
    if isinstance(source, (list, tuple)):
        bad = next(((i, p) for i, p in enumerate(source) if not isinstance(p, str)), None)
        if bad is not None:
            raise PromptError(f"prompt {bad[0]} of the list is a {type(bad[1]).__name__} ({bad[1]!r:.40}), "
                              "not a string; prompts must be text")
        prompts = list(source)
    elif str(source) in BUILTIN_SETS:
        prompts = builtin_prompts(str(source))
    else:
        prompts = _read_file(Path(source), field)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise PromptError(f"limit must be a number of prompts >= 1 (or None for all), got {limit!r}")
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise PromptError(f"no prompts in {source if not isinstance(source, (list, tuple)) else 'the given list'}")
    return prompts[:limit] if limit else prompts


def _read_file(path: Path, field: str | None) -> list[str]:
    if not path.is_file():
        raise PromptError(f"prompt file {str(path)!r} does not exist; accepted: {PROMPT_FORMATS}")
    suffix = path.suffix.lower()
    try:
        text = path.read_bytes().decode("utf-8-sig")  # no newline translation: csv reads \r in quoted fields
    except (OSError, UnicodeDecodeError) as e:
        raise PromptError(f"cannot read prompt file {str(path)!r}: {e}") from e
    if suffix == ".txt":
        return [line.strip() for line in _lines(text)]
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(_lines(text), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise PromptError(f"{path}:{n} is not valid JSON: {e}") from e
        return _column(rows, field, path)
    if suffix in (".tsv", ".csv"):
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        try:
            rows = [(reader.line_num, r) for r in reader]
        except csv.Error as e:
            raise PromptError(f"{path}:{reader.line_num} cannot be read as {suffix[1:]}: {e}") from e
        return _column(rows, field, path)
    raise PromptError(f"unsupported prompt file type {suffix!r} ({path}); accepted: {PROMPT_FORMATS}")


def _lines(text: str) -> list[str]:
    """Lines split at \n, \r\n or \r only: str.splitlines also splits at \x1c-\x1e, \x85, \u2028, ... inside prompts."""
    return re.split(r"\r\n|\r|\n", text)


def _column(rows: list[tuple[int, dict]], field: str | None, path: Path) -> list[str]:
    """The prompt of every (line number, row); a row without the field, or with a non-string, is an error."""
    if not rows:
        raise PromptError(f"{path} has no rows")
    n0, first = rows[0]
    if not isinstance(first, dict):
        raise PromptError(f"{path}:{n0} is a JSON {type(first).__name__}, not an object; each line must be an "
                          'object such as {"prompt": "a photo of a cat"}')
    keys = list(first.keys())
    if field is None:
        field = next((f for f in DEFAULT_FIELDS if f in keys), None)
        if field is None:
            raise PromptError(f"{path}: name the field holding the prompt (--field); available: {keys}")
    if field not in keys:
        raise PromptError(f"{path}: field {field!r} does not exist; available: {keys}")
    out = []
    for n, row in rows:
        if not isinstance(row, dict):
            raise PromptError(f"{path}:{n} is a JSON {type(row).__name__}, not an object with field {field!r}")
        if field not in row or row[field] is None:
            raise PromptError(f"{path}:{n} has no field {field!r} (it has {list(row)}); every row needs the prompt")
        value = row[field]
        if not isinstance(value, str):
            raise PromptError(f"{path}:{n}: field {field!r} is a {type(value).__name__} ({value!r:.40}), "
                              "not a string; prompts must be text")
        out.append(value)
    return out


@dataclass
class Calibration:
    """Tokenized prompts in chunks plus the null prompt, as the discrepancy reads them.

    `read` says which positions the consumer of the embeddings reads: "mask" (the attention-mask tokens,
    e.g. PixArt) or "all" (every padded position, e.g. CLIP in Stable Diffusion).
    """

    prompts: list[str]
    chunks: list[tuple[torch.Tensor, torch.Tensor]]  # (input_ids, attention_mask) per chunk
    null: tuple[torch.Tensor, torch.Tensor]
    read: str = "mask"
    truncated: int = 0
    dropped: int = 0
    max_length: int | None = None
    info: dict = field(default_factory=dict)
    template: str | None = None  # "...{prompt}..." every prompt (and the null prompt) went through
    drop_tokens: int = 0  # the first N tokens of each embedding are not scored (Qwen-Image's system prefix)

    def read_mask(self, mask: torch.Tensor) -> torch.Tensor:
        read = mask.bool() if self.read == "mask" else torch.ones_like(mask, dtype=torch.bool)
        if self.drop_tokens:  # the first N attention-mask tokens of each row, wherever the padding side puts them
            real = mask.bool()
            read = read & ~(real & (real.long().cumsum(-1) <= self.drop_tokens))
        return read

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    def to(self, device) -> Calibration:
        move = lambda pair: (pair[0].to(device), pair[1].to(device))  # noqa: E731
        return replace(self, chunks=[move(c) for c in self.chunks], null=move(self.null))


def tokenize(
    tokenizer,
    prompts: Sequence[str],
    *,
    max_length: int | None = None,
    padding: str = "longest",
    chunk_size: int = 16,
    min_tokens: int | None = None,
    max_tokens: int | None = None,
    read: str = "mask",
    template: str | None = None,
    drop_tokens: int = 0,
) -> Calibration:
    """Tokenize `prompts` (padding + attention mask) in chunks; warn about truncation, never hide it.

    `min_tokens`/`max_tokens` keep only prompts whose untruncated length lies in that range (the Skrr paper
    calibrates on 150-250-token captions). `padding="max_length"` pads every chunk to `max_length`, as
    pipelines that read padded positions do.

    `template` ("...{prompt}...") wraps every prompt, the null prompt "" included, as LLM-encoder pipelines do
    (chat templates, Sana's instruction); `drop_tokens` leaves the first N tokens of each embedding out of the
    discrepancy (Qwen-Image drops its system prefix). Token ranges and truncation count the templated text.
    A prompt left with no token to score (a tokenizer without BOS gives "" zero tokens) is a PromptError.
    """
    if read not in ("mask", "all"):
        raise ValueError(f"read must be 'mask' or 'all', got {read!r}")
    if template is not None and "{prompt}" not in template:
        raise PromptError(f"the template must contain '{{prompt}}' where the prompt goes, got {template!r}")
    if drop_tokens < 0:
        raise PromptError(f"drop_tokens must be >= 0, got {drop_tokens}")
    wrap = (lambda p: p) if template is None else (lambda p: template.replace("{prompt}", p))  # noqa: E731
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if max_length is None:
        limit = getattr(tokenizer, "model_max_length", None)
        max_length = limit if limit and limit < 100_000 else 512
    lengths = [len(ids) for ids in tokenizer([wrap(p) for p in prompts], truncation=False)["input_ids"]]
    keep = [
        p for p, n in zip(prompts, lengths)
        if (min_tokens is None or n >= min_tokens) and (max_tokens is None or n <= max_tokens)
    ]
    dropped = len(prompts) - len(keep)
    if not keep:
        raise PromptError(
            f"no prompt has between {min_tokens} and {max_tokens} tokens "
            f"(lengths range {min(lengths)}-{max(lengths)})"
        )
    truncated = sum(1 for p, n in zip(prompts, lengths) if p in set(keep) and n > max_length)
    if truncated:
        warnings.warn(
            f"{truncated} of {len(keep)} prompts are longer than max_length={max_length} tokens and were truncated",
            stacklevel=2,
        )

    def encode(batch):
        enc = tokenizer(
            [wrap(p) for p in batch], padding=padding, truncation=True, max_length=max_length, return_tensors="pt"
        )
        _check_tokens(batch, enc["attention_mask"], template, drop_tokens)
        return enc["input_ids"], enc["attention_mask"]

    null = encode([""])
    chunks = [encode(keep[i : i + chunk_size]) for i in range(0, len(keep), chunk_size)]
    return Calibration(
        prompts=list(keep), chunks=chunks, null=null, read=read, truncated=truncated,
        dropped=dropped, max_length=max_length, template=template, drop_tokens=drop_tokens,
    )


def _check_tokens(batch, mask: torch.Tensor, template: str | None, drop_tokens: int) -> None:
    """Every prompt must keep at least one token to score: never a reshape error deep inside the encoder."""
    for prompt, n in zip(batch, mask.sum(-1).tolist()):
        if n > drop_tokens:
            continue
        name = "the null prompt \"\"" if prompt == "" else f"prompt {prompt[:80]!r}"
        how = f"through the template {template!r}" if template is not None else "without a template"
        if n == 0:
            raise PromptError(
                f"{name} tokenizes to 0 tokens {how}: this tokenizer adds no start (BOS) token, so the encoder "
                "would get an empty sequence; pass the pipeline's prompt template (--template '...{prompt}...') "
                "so every prompt has tokens"
            )
        raise PromptError(
            f"{name} has {n} tokens {how}, and --drop-tokens {drop_tokens} drops all of them from the "
            "embedding; nothing is left to score (lower --drop-tokens or use a longer template)"
        )
