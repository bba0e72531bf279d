"""Training data for a LoRA job: from the feedback store or a user's file, cleaned, split, described.

Sources:

* the feedback store (``slm_app.feedback``): rows rated 4 or 5 only, the user's correction in place
  of the model's answer when there is one;
* a user's file: OpenAI's chat fine-tuning JSONL (``{"messages": [{"role", "content"}, ...]}`` per
  line, the last message the assistant's answer), or plain text (paragraphs separated by a blank
  line, each one example learnt as a whole).

Cleaning, each drop counted by its reason in the manifest: empty prompt or answer, items over
``max_chars`` characters, exact duplicate prompts and near-duplicates (the same words after
case-folding and dropping punctuation, or word sets with Jaccard similarity >= ``near_duplicate``),
the first one kept. Options: lower-casing, dedupe on/off, split ratios, seed.

Deterministic: the same input and options give byte-identical files (the manifest holds no clock).
Output: ``train.jsonl``, ``validation.jsonl``, ``test.jsonl`` (each line ``{"messages": [...]}`` or
``{"text": ...}``) and ``manifest.json`` (source and its sha256, options, counts, drop reasons, each
file's sha256).

    python -m slm_app.finetune.data --out DIR [--file data.jsonl | --feedback] [--lowercase]
        [--no-dedupe] [--ratios 0.8 0.1 0.1] [--seed 0]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import random
import re
import sys
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from slm_app.evaluate import parse_jsonl
from slm_app.errors import RequestError

ROLES = ("system", "user", "assistant")
SPLITS = ("train", "validation", "test")
MIN_RATING = 4
MAX_ITEMS = 5_000  # near-duplicate search is pairwise: bounded so a big file cannot stall a job


@dataclass(frozen=True)
class DataOptions:
    lowercase: bool = False
    dedupe: bool = True
    near_duplicate: float = 0.9  # word-set Jaccard at or above which two prompts are one
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train, validation, test
    seed: int = 0
    max_chars: int = 4_000  # prompt + answer; longer items do not fit a small model's training context

    def __post_init__(self) -> None:
        if len(self.ratios) != 3 or any(not 0 <= r <= 1 for r in self.ratios) or abs(sum(self.ratios) - 1) > 1e-6:
            raise RequestError(f"ratios must be three numbers in [0, 1] summing to 1 (train, validation, test), "
                               f"got {list(self.ratios)}", param="ratios")
        if self.ratios[0] == 0:
            raise RequestError("the train ratio must be above 0", param="ratios")
        if not 0 < self.near_duplicate <= 1:
            raise RequestError(f"near_duplicate must be in (0, 1], got {self.near_duplicate}", param="near_duplicate")
        if self.max_chars < 1:
            raise RequestError(f"max_chars must be at least 1, got {self.max_chars}", param="max_chars")


@dataclass
class Prepared:
    """The splits and the manifest that describes them."""

    splits: dict[str, list[dict[str, Any]]]
    manifest: dict[str, Any] = field(default_factory=dict)

    def write(self, out: Path) -> dict[str, Any]:
        """Write the split files and ``manifest.json`` into ``out``; returns the manifest."""
        out.mkdir(parents=True, exist_ok=True)
        files = {}
        for name in SPLITS:
            body = "".join(json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n" for item in self.splits[name])
            (out / f"{name}.jsonl").write_text(body, encoding="utf-8")
            files[f"{name}.jsonl"] = hashlib.sha256(body.encode("utf-8")).hexdigest()
        self.manifest["files"] = files
        (out / "manifest.json").write_text(json.dumps(self.manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return self.manifest


# ---- reading sources ----------------------------------------------------------------------------------

def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise RequestError(f"{where}: \"messages\" must be a non-empty list", param="training_file")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise RequestError(f"{where}: messages[{i}] must be {{\"role\": system|user|assistant, "
                               f"\"content\": text}}", param="training_file")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant":
        raise RequestError(f"{where}: the last message must be the assistant's answer to learn", param="training_file")
    if not any(m["role"] == "user" for m in out[:-1]):
        raise RequestError(f"{where}: no user message before the answer", param="training_file")
    return out


def parse_file(text: str, fmt: str = "auto") -> list[dict[str, Any]]:
    """Items from a user's file: chat JSONL or plain text (``fmt``: auto, chat, text)."""
    if fmt not in ("auto", "chat", "text"):
        raise RequestError(f"format must be auto, chat or text, got {fmt!r}", param="format")
    if "\x00" in text:
        raise RequestError("the file holds a NUL character: not a text file", param="training_file")
    if not text.strip():
        raise RequestError("the training file is empty", param="training_file")
    if fmt == "auto":
        fmt = "chat" if text.lstrip().startswith("{") else "text"
    if fmt == "text":
        return [{"text": p.strip()} for p in re.split(r"\n\s*\n", text) if p.strip()]
    items = []
    for row in parse_jsonl(text, "training file (JSONL, one {\"messages\": [...]} object per line)",
                           param="training_file", max_items=None):  # the file size caps it
        number = row["_line"]
        if "messages" not in row:
            raise RequestError(f"line {number} must be an object with \"messages\"", param="training_file")
        items.append({"messages": _check_messages(row["messages"], f"line {number}")})
    return items


def feedback_items(rows: Iterable[dict[str, Any]], counts: collections.Counter) -> list[dict[str, Any]]:
    """Training items from feedback rows (``FeedbackStore.all()``): rated >= 4, correction as the answer."""
    items = []
    for row in rows:
        if row["rating"] < MIN_RATING:
            counts["rated below 4"] += 1
            continue
        turns = row["messages"] or [{"role": "user", "content": row["prompt"] or ""}]
        answer = row["correction"] if row.get("correction") else row["output"]
        items.append({"messages": [*turns, {"role": "assistant", "content": answer or ""}]})
    return items


# ---- cleaning and splitting ---------------------------------------------------------------------------

def prompt_of(item: dict[str, Any]) -> str:
    """What the item asks: the conversation before the answer (or the plain text)."""
    if "text" in item:
        return item["text"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in item["messages"][:-1])


def answer_of(item: dict[str, Any]) -> str:
    return item["text"] if "text" in item else item["messages"][-1]["content"]


def _normalized(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def _lower(item: dict[str, Any]) -> dict[str, Any]:
    if "text" in item:
        return {"text": item["text"].lower()}
    return {"messages": [{"role": m["role"], "content": m["content"].lower()} for m in item["messages"]]}


def _strip(item: dict[str, Any]) -> dict[str, Any]:
    if "text" in item:
        return {"text": item["text"].strip()}
    return {"messages": [{"role": m["role"], "content": m["content"].strip()} for m in item["messages"]]}


def clean(items: Sequence[dict[str, Any]], options: DataOptions, counts: collections.Counter) -> list[dict[str, Any]]:
    """Drop empty, oversized and duplicate items (first kept), counting each reason."""
    kept: list[dict[str, Any]] = []
    keys: set[str] = set()
    word_sets: list[frozenset[str]] = []
    for item in items:
        item = _strip(_lower(item) if options.lowercase else item)
        prompt, answer = prompt_of(item), answer_of(item)
        if not answer or ("messages" in item and not any(m["content"] for m in item["messages"][:-1])):
            counts["empty prompt or answer"] += 1
            continue
        if len(prompt) + (0 if "text" in item else len(answer)) > options.max_chars:
            counts[f"over {options.max_chars} characters"] += 1
            continue
        if options.dedupe:
            key = _normalized(prompt)
            if key in keys:
                counts["duplicate prompt"] += 1
                continue
            words = frozenset(key.split())
            if options.near_duplicate < 1 and any(_jaccard(words, other) >= options.near_duplicate
                                                  for other in word_sets):
                counts["near-duplicate prompt"] += 1
                continue
            keys.add(key)
            word_sets.append(words)
        kept.append(item)
    return kept


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def split(items: Sequence[dict[str, Any]], options: DataOptions) -> dict[str, list[dict[str, Any]]]:
    """Shuffle with ``seed`` and cut by the ratios; validation and test get at least one item each when
    their ratio is above 0 and there are at least three items."""
    order = list(items)
    random.Random(options.seed).shuffle(order)
    n = len(order)
    _, r_val, r_test = options.ratios
    n_val = round(n * r_val) if n >= 3 else 0
    n_test = round(n * r_test) if n >= 3 else 0
    if n >= 3:
        n_val = max(n_val, 1 if r_val > 0 else 0)
        n_test = max(n_test, 1 if r_test > 0 else 0)
    n_train = n - n_val - n_test
    return {"train": order[:n_train], "validation": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}


def prepare(items: Sequence[dict[str, Any]], options: DataOptions, source: str, source_sha256: str,
            counts: collections.Counter | None = None) -> Prepared:
    """Clean and split ``items``; the manifest says where they came from and what was dropped why."""
    counts = counts if counts is not None else collections.Counter()
    n_input = len(items) + sum(counts.values())
    if len(items) > MAX_ITEMS:
        raise RequestError(f"{len(items):,} items; a job takes at most {MAX_ITEMS:,}", status=413, param="training_file")
    kept = clean(items, options, counts)
    if not kept:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(counts.items())) or "no items at all"
        raise RequestError(f"no training data left from {source} ({reasons})", param="training_file")
    splits = split(kept, options)
    manifest = {
        "source": source,
        "source_sha256": source_sha256,
        "options": {**asdict(options), "ratios": list(options.ratios)},
        "kind": "text" if "text" in kept[0] else "chat",
        "counts": {"input": n_input, "kept": len(kept), **{name: len(splits[name]) for name in SPLITS}},
        "dropped": dict(sorted(counts.items())),
    }
    return Prepared(splits, manifest)


def from_file(text: str, options: DataOptions, name: str = "file", fmt: str = "auto") -> Prepared:
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return prepare(parse_file(text, fmt), options, f"file:{name}", digest)


def from_feedback(rows: Sequence[dict[str, Any]], options: DataOptions, name: str = "feedback") -> Prepared:
    """From ``FeedbackStore.all()`` rows; the source digest covers the rows used (id, rating, texts)."""
    counts: collections.Counter = collections.Counter()
    digest = hashlib.sha256(json.dumps([[r["id"], r["rating"], r.get("prompt"), r.get("messages"), r["output"],
                                         r.get("correction")] for r in rows], ensure_ascii=False).encode()).hexdigest()
    return prepare(feedback_items(rows, counts), options, name, digest, counts)


def read_split(directory: Path, name: str) -> list[dict[str, Any]]:
    path = Path(directory) / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---- the CLI ----------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slm_app.finetune.data",
                                     description="Prepare fine-tuning data: splits and a manifest.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--file", help="chat JSONL ({\"messages\": [...]} per line) or plain text ('-' for stdin)")
    source.add_argument("--feedback", action="store_true",
                        help="the app's feedback store (SLM_DATA_DIR; the default source)")
    parser.add_argument("--format", choices=("auto", "chat", "text"), default="auto")
    parser.add_argument("--out", required=True, help="directory for train/validation/test.jsonl and manifest.json")
    parser.add_argument("--lowercase", action="store_true")
    parser.add_argument("--no-dedupe", action="store_true", help="keep duplicate and near-duplicate prompts")
    parser.add_argument("--near-duplicate", type=float, default=0.9, help="word-set Jaccard threshold (default 0.9)")
    parser.add_argument("--ratios", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-chars", type=int, default=4_000)
    args = parser.parse_args(argv)
    try:
        options = DataOptions(lowercase=args.lowercase, dedupe=not args.no_dedupe, near_duplicate=args.near_duplicate,
                              ratios=tuple(args.ratios), seed=args.seed, max_chars=args.max_chars)
        if args.file:
            text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
            prepared = from_file(text, options, Path(args.file).name, args.format)
        else:
            from slm_app.feedback import store_for
            from slm_app.settings import load_settings

            store = store_for(load_settings())
            prepared = from_feedback(store.all(), options, f"feedback:{store.path}")
    except RequestError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    manifest = prepared.write(Path(args.out))
    print(json.dumps({k: manifest[k] for k in ("source", "counts", "dropped")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
