"""Tasks where the adapter has to store what the base model does not know.

On short classification tasks LoRA gains nothing from rank, so they cannot tell a method that
buys rank (MoS's claim) from one that does not. Rank matters when the update must hold
information: key -> value memorization and knowledge injection (MoRA, arXiv 2405.12130).

- ``facts``: made-up names, each with three words drawn uniformly from ``WORDS`` (one token
  each on SmolLM2's tokenizer), generated from a seed. A model that knows the format but not
  the fact scores ln(len(WORDS)) nats per answer token: that is chance, and the nats below it
  are information the adapter stored.
- ``codebook``: a secret code, three random permutations of ``WORDS`` drawn from a seed, one
  per position: "apple river stone ->" becomes " tiger lemon castle" when apple -> tiger in
  the first place, river -> lemon in the second, stone -> castle in the third. It trains on
  phrases and is scored on phrases it never saw, so the adapter must store the code
  (3 x 99 entries, ~1,970 bits) *and* apply it to new combinations: generalization, where
  capacity still matters. Chance is the same ln(len(WORDS)) per answer token.
- ``wikidata``: BIG-bench's ``qa_wikidata`` ("The capital of Occitania is" -> "Toulouse"),
  kept to the facts the base model gets wrong (see ``unknown``), read from the ``bigbench``
  sdist (not installed: it pulls in tensorflow) and cached outside the repository, which
  never holds the data (it carries BIG-bench's canary).

Facts and wikidata are scored on the items they were trained on, by design; wikidata's held-out
unknown facts are the control. The codebook is scored on held-out phrases. Items are plain text (``Example.chat=False``): a chat template would
triple the tokens of a ten-token item.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import tarfile
from pathlib import Path

from .assets import cache_dir
from .atomic import atomic_file

# 99 common nouns, each a single token after a space on SmolLM2's tokenizer (tested)
WORDS = tuple("""apple river stone cloud bread horse candle mirror garden forest window bottle
pencil rabbit silver copper violin tiger lemon castle island ocean desert valley bridge tower
wheel engine rocket planet button carpet ribbon basket hammer needle pillow blanket ladder
lantern marble feather shadow thunder winter summer autumn spring orange purple yellow green
circle square anchor arrow banana cherry coffee cotton crystal diamond dragon eagle falcon
garlic ginger hollow honey jacket kettle kitten lizard magnet meadow monkey mountain olive
oyster parrot peanut pepper pirate pocket potato pumpkin puzzle quartz saddle salmon sponge
statue spider sugar tablet tomato trumpet tunnel turtle""".split())
ANSWER_WORDS = 3
CHANCE_NLL = math.log(len(WORDS))  # nats per answer token of a model that knows only the format

_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"

BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
_WIKIDATA_MEMBER = "bigbench-1.0.0/bigbench/benchmark_tasks/qa_wikidata/task.json"
# a fact counts as unknown to the base when greedy decoding misses it and the answer's
# probability is below 1 / len(WORDS): no better than guessing among facts' word lists
UNKNOWN_NLL = math.log(len(WORDS))


def _name(rng: random.Random) -> str:
    def word(syllables: int) -> str:
        return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))

    return f"{word(2).title()} {word(2).title()}{rng.choice(_CONSONANTS)}"


def facts(size: int, seed: int = 0) -> list[tuple[str, str]]:
    """``size`` (prompt, completion) pairs like ("Kavo Rilen:", " apple river stone")."""
    if size < 1:
        raise ValueError(f"facts needs at least 1 item, got {size}")
    rng = random.Random(seed)
    names: dict[str, str] = {}
    while len(names) < size:
        name = _name(rng)
        if name not in names:  # a name with two answers could not be memorized
            names[name] = " " + " ".join(rng.choice(WORDS) for _ in range(ANSWER_WORDS))
    return [(f"{name}:", answer) for name, answer in names.items()]


CODEBOOK_HELD_OUT = (128, 256)  # phrases for validation and test, never trained on


def codebook(size: int, seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, str]]]:
    """``size`` training phrases and ``CODEBOOK_HELD_OUT`` validation and test phrases, all
    distinct, as (prompt, completion) pairs like ("apple river stone ->", " tiger lemon castle")."""
    if size < 1:
        raise ValueError(f"codebook needs at least 1 training phrase, got {size}")
    rng = random.Random(seed)
    code = [dict(zip(WORDS, rng.sample(WORDS, len(WORDS)))) for _ in range(ANSWER_WORDS)]
    wanted = size + sum(CODEBOOK_HELD_OUT)
    if wanted > len(WORDS) ** ANSWER_WORDS:
        raise ValueError(f"codebook:{size} asks for more phrases than there are: at most "
                         f"{len(WORDS) ** ANSWER_WORDS - sum(CODEBOOK_HELD_OUT)}")
    phrases: dict[tuple[str, ...], None] = {}
    while len(phrases) < wanted:
        phrases[tuple(rng.choice(WORDS) for _ in range(ANSWER_WORDS))] = None
    pairs = [(" ".join(p) + " ->", " " + " ".join(c[w] for c, w in zip(code, p))) for p in phrases]
    validation = size + CODEBOOK_HELD_OUT[0]
    return pairs[:size], pairs[size:validation], pairs[validation:]


def bigbench_sdist() -> Path:
    """Where the setup step put the ``bigbench`` sdist (``MOSLORA_BIGBENCH_SDIST`` overrides)."""
    override = os.environ.get("MOSLORA_BIGBENCH_SDIST")
    return Path(override) if override else Path(sys.prefix) / "share" / "moslora" / BIGBENCH_SDIST


def wikidata_unavailable() -> str | None:
    """Why the wikidata task cannot load on this machine, or None when it can.

    It needs BIG-bench's sdist, an optional asset that the registry no longer serves, or the
    pairs a machine that had it extracted into the cache."""
    if _wikidata_cache().is_file() or bigbench_sdist().is_file():
        return None
    return (f"the wikidata task is unavailable: it needs {BIGBENCH_SDIST} (bigbench==1.0.0, an "
            "optional asset the package registry no longer serves, so set-up skipped it), not found "
            f"at {bigbench_sdist()}; set MOSLORA_BIGBENCH_SDIST to a copy, or use facts:N")


def _wikidata_cache() -> Path:
    return cache_dir() / "qa_wikidata.json"


def wikidata_facts() -> list[tuple[str, str]]:
    """Every qa_wikidata fact with a single answer, as (prompt, " answer"), in file order.

    Read once out of the sdist (a 358 MB archive, ~10 s) and cached as plain pairs in the
    moslora cache folder. Raises ``FileNotFoundError`` when neither is there."""
    cached = _wikidata_cache()
    if not cached.is_file():
        reason = wikidata_unavailable()
        if reason:
            raise FileNotFoundError(reason)
        sdist = bigbench_sdist()
        with tarfile.open(sdist, "r:gz") as archive:
            member = archive.extractfile(_WIKIDATA_MEMBER)
            if member is None:
                raise ValueError(f"{sdist} holds no {_WIKIDATA_MEMBER}")
            examples = json.load(member)["examples"]
        pairs = [(e["input"], " " + e["target"]) for e in examples if isinstance(e["target"], str)]
        with atomic_file(cached) as staging:
            staging.write_text(json.dumps(pairs))
    return [tuple(p) for p in json.loads(cached.read_text())]


def unknown(scores: list[tuple[float, int, bool]]) -> list[bool]:
    """For each item's base-model score (log-probability, tokens, greedy exact): unknown?"""
    return [not exact and -logprob > UNKNOWN_NLL for logprob, _, exact in scores]


def metrics(scores: list[tuple[float, int, bool]], chance_nll: float | None = None) -> dict[str, float]:
    """``accuracy``: greedy exact match of the whole answer; ``loss``: NLL per answer token;
    with ``chance_nll`` (nats per token), ``bits``: information stored, summed over items
    (chance's NLL minus the model's, in bits; negative when worse than chance)."""
    if not scores:
        raise ValueError("no items to score")
    nll = -sum(lp for lp, _, _ in scores)
    tokens = sum(n for _, n, _ in scores)
    result = {"accuracy": sum(e for _, _, e in scores) / len(scores), "loss": nll / tokens}
    if chance_nll is not None:
        result["bits"] = (chance_nll * tokens - nll) / math.log(2)
    return result
