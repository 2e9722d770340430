"""SAGE tasks as data: prompts whose inputs vary in declared attributes, with counterfactual twins.

A task is a set of *clean* prompts plus, for each attribute, a *corrupted* counterpart of every
prompt that differs from it in that attribute only (same template, same token length, so that
token index ``t`` means the same slot in both). Every prompt carries:

- its attribute values (e.g. IOI: ``io`` name, ``s`` name, ``order``),
- the token id of the correct next token (``answer_ids``) and of the competing one (``wrong_ids``);
  the task metric is the *logit difference* ``LD = logit[answer] - logit[wrong]`` at the last
  prompt token (``END``), in logits (nats of the unnormalized log-probability),
- named token positions (``END`` always; IOI adds ``IO``, ``S1``, ``S2``).

Two tasks ship here (both need names that are single tokens, with a leading space, in the model's
tokenizer; candidates that are not are skipped):

``ioi`` — indirect object identification (Wang et al. 2022): "When Mary and John went to the
store, John gave a drink to" -> " Mary". Attributes ``io`` (the indirect-object name), ``s`` (the
subject name, which is repeated) and ``order`` (``"ABB"``: IO comes first in the first clause;
``"BAB"``: S comes first). Corruptions: ``io`` replaces the IO name by another name, ``s``
replaces both S occurrences by another name, ``order`` swaps the two names of the first clause.
LD = logit[IO] - logit[S].

``gender`` — pronoun gender: "Yesterday, Mary was late for work because" -> " she" (vs " he").
Attributes ``gender`` (``male``/``female``) and ``name`` (nested in gender: ``Task.nested``).
Corruptions: ``gender`` swaps the name for one of the other gender (answer and wrong pronoun swap), ``name``
swaps it for another name of the
same gender. LD = logit[correct pronoun] - logit[other pronoun].

Prompts are right-padded to a common length; as the LMs here are causal, padding after a prompt
never changes its activations, so no attention mask is used.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "TaskPrompts",
    "Task",
    "IOI_TEMPLATES",
    "GENDER_TEMPLATES",
    "DEFAULT_NAMES",
    "MALE_NAMES",
    "FEMALE_NAMES",
    "single_token_names",
    "make_ioi_task",
    "make_gender_task",
    "TASKS",
    "make_task",
]

#: IOI templates: ``{A}``/``{B}`` the two names of the first clause, ``{C}`` the repeated one (S).
#: None starts with a name (position 0 of a sequence has an outsized residual norm).
IOI_TEMPLATES = (
    "When {A} and {B} went to the store, {C} gave a drink to",
    "When {A} and {B} went to the park, {C} gave a ball to",
    "After {A} and {B} went to the office, {C} handed a letter to",
    "While {A} and {B} were working at the school, {C} gave a book to",
    "Then, {A} and {B} had a long argument, and afterwards {C} said to",
    "After the lunch, {A} and {B} went to the beach. {C} gave a towel to",
)

#: Pronoun-gender templates: ``{N}`` the name; the next token is " he" or " she".
GENDER_TEMPLATES = (
    "Yesterday, {N} was late for work because",
    "This morning {N} went to the doctor because",
    "Last week {N} bought a new car because",
    "In the evening, {N} called the office because",
    "At the party, {N} left early because",
    "On Monday, {N} stayed at home because",
)

MALE_NAMES = (
    "John",
    "Tom",
    "James",
    "David",
    "Michael",
    "Paul",
    "Mark",
    "Peter",
    "Daniel",
    "Jack",
    "Kevin",
    "Eric",
    "Steve",
    "George",
    "Robert",
    "Richard",
    "Thomas",
    "William",
    "Henry",
    "Frank",
)
FEMALE_NAMES = (
    "Mary",
    "Sarah",
    "Anna",
    "Lisa",
    "Emma",
    "Kate",
    "Laura",
    "Susan",
    "Rachel",
    "Alice",
    "Jane",
    "Amy",
    "Emily",
    "Grace",
    "Helen",
    "Karen",
    "Linda",
    "Lucy",
    "Maria",
    "Julia",
)
#: Name pool for IOI (mixed genders, alternating so that a prefix of the pool stays balanced).
DEFAULT_NAMES = tuple(n for pair in zip(FEMALE_NAMES, MALE_NAMES) for n in pair)


@dataclass
class TaskPrompts:
    """A batch of tokenized prompts with attributes, answers and named positions.

    Attributes:
        prompts: the N prompt strings.
        input_ids: LongTensor [N, T], right-padded with ``pad_id``.
        lengths: LongTensor [N], number of real tokens of each prompt.
        answer_ids: LongTensor [N], token id of the correct next token.
        wrong_ids: LongTensor [N], token id of the competing next token.
        attributes: ``{attribute: [value per prompt]}`` (values are strings).
        positions: ``{position name: LongTensor [N]}`` token index of each named slot; ``END``
            (the last real token, where the next token is predicted) is always present.
    """

    prompts: list[str]
    input_ids: Tensor
    lengths: Tensor
    answer_ids: Tensor
    wrong_ids: Tensor
    attributes: dict[str, list[str]]
    positions: dict[str, Tensor]

    def __len__(self) -> int:
        return len(self.prompts)

    def as_counterfactual_of(self, clean: TaskPrompts) -> TaskPrompts:
        """These (corrupted) prompts with ``clean``'s answer/wrong tokens and named positions.

        Used to score a corrupted prompt with the clean prompt's metric and to read its
        activations at the clean prompt's token indices (patching is aligned by token index;
        e.g. IOI's ``order`` corruption moves the IO name to the other slot).
        """
        if len(clean) != len(self) or clean.input_ids.shape[1] != self.input_ids.shape[1]:
            raise ValueError(
                f"as_counterfactual_of: prompts {tuple(self.input_ids.shape)} and clean "
                f"{tuple(clean.input_ids.shape)} must have the same shape"
            )
        return TaskPrompts(
            self.prompts,
            self.input_ids,
            self.lengths,
            clean.answer_ids,
            clean.wrong_ids,
            self.attributes,
            clean.positions,
        )

    def select(self, index: Sequence[int] | Tensor) -> TaskPrompts:
        """The prompts at ``index`` (a list/tensor of ints), trimmed to their longest length."""
        idx = torch.as_tensor(index, dtype=torch.long)
        lengths = self.lengths[idx]
        t_max = int(lengths.max()) if len(idx) else 0
        return TaskPrompts(
            prompts=[self.prompts[i] for i in idx.tolist()],
            input_ids=self.input_ids[idx, :t_max],
            lengths=lengths,
            answer_ids=self.answer_ids[idx],
            wrong_ids=self.wrong_ids[idx],
            attributes={k: [v[i] for i in idx.tolist()] for k, v in self.attributes.items()},
            positions={k: v[idx] for k, v in self.positions.items()},
        )


@dataclass
class Task:
    """A SAGE task: clean prompts, declared attributes and one corrupted counterpart per attribute.

    Attributes:
        name: task name (``ioi``, ``gender``, ...).
        attribute_names: the attributes that vary across prompts (keys of ``clean.attributes``).
        position_names: the named token positions (keys of ``clean.positions``).
        clean: the clean prompts [N].
        corrupted: ``{attribute: TaskPrompts [N]}``; prompt ``j`` of ``corrupted[a]`` is prompt ``j``
            of ``clean`` with attribute ``a`` changed (same template, same token indices).
        description: one-line description with the logit-difference definition.
        nested: ``{child attribute: parent attribute}`` when a child's value determines the parent's
            (gender task: ``{"name": "gender"}``); supervised dictionaries centre such a child on its
            parent (see :mod:`.dictionaries`).
        metadata: names, templates and seed the task was built from.
    """

    name: str
    attribute_names: tuple[str, ...]
    position_names: tuple[str, ...]
    clean: TaskPrompts
    corrupted: dict[str, TaskPrompts]
    description: str = ""
    metadata: dict = field(default_factory=dict)
    nested: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.clean)

    def select(self, index: Sequence[int] | Tensor) -> Task:
        """The sub-task made of prompts ``index`` (clean and every counterpart alike)."""
        return Task(
            name=self.name,
            attribute_names=self.attribute_names,
            position_names=self.position_names,
            clean=self.clean.select(index),
            corrupted={a: p.select(index) for a, p in self.corrupted.items()},
            description=self.description,
            metadata=dict(self.metadata),
            nested=dict(self.nested),
        )

    def split(self, n_first: int) -> tuple[Task, Task]:
        """``(first n_first prompts, the rest)``: e.g. a fit set for dictionaries and an eval set."""
        if not 0 < n_first < len(self):
            raise ValueError(
                f"split: n_first={n_first} must be in [1, {len(self) - 1}] for a task of {len(self)} prompts"
            )
        return self.select(range(n_first)), self.select(range(n_first, len(self)))


# --------------------------------------------------------------------------- tokenization helpers


def _token_id(tokenizer, word: str) -> int | None:
    """Id of ``" " + word`` if it is a single (known, non-``unk``) token of ``tokenizer``, else None."""
    ids = tokenizer.encode(" " + word, add_special_tokens=False)
    unk = getattr(tokenizer, "unk_token_id", None)
    return int(ids[0]) if len(ids) == 1 and (unk is None or ids[0] != unk) else None


def single_token_names(tokenizer, names: Sequence[str]) -> list[str]:
    """The names among ``names`` that ``tokenizer`` encodes (with a leading space) as one token."""
    return [n for n in names if _token_id(tokenizer, n) is not None]


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


def _encode(tokenizer, prompt: str) -> list[int]:
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def _find(ids: list[int], token: int) -> list[int]:
    return [i for i, t in enumerate(ids) if t == token]


def _pack(rows: list[dict], attribute_names: Sequence[str], position_names: Sequence[str], pad_id: int) -> TaskPrompts:
    """Rows of {prompt, ids, answer, wrong, attrs{}, pos{}} -> right-padded TaskPrompts."""
    t_max = max(len(r["ids"]) for r in rows)
    ids = torch.full((len(rows), t_max), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["ids"])] = torch.tensor(r["ids"], dtype=torch.long)
    lengths = torch.tensor([len(r["ids"]) for r in rows], dtype=torch.long)
    positions = {p: torch.tensor([r["pos"][p] for r in rows], dtype=torch.long) for p in position_names if p != "END"}
    positions["END"] = lengths - 1
    return TaskPrompts(
        prompts=[r["prompt"] for r in rows],
        input_ids=ids,
        lengths=lengths,
        answer_ids=torch.tensor([r["answer"] for r in rows], dtype=torch.long),
        wrong_ids=torch.tensor([r["wrong"] for r in rows], dtype=torch.long),
        attributes={a: [str(r["attrs"][a]) for r in rows] for a in attribute_names},
        positions={p: positions[p] for p in position_names},
    )


def _check_count(n_prompts: int, what: str) -> None:
    if not isinstance(n_prompts, int) or isinstance(n_prompts, bool) or n_prompts < 2:
        raise ValueError(f"{what}: n_prompts must be an integer >= 2, got {n_prompts!r}")


# --------------------------------------------------------------------------- IOI


def _ioi_row(tokenizer, template: str, io: str, s: str, order: str) -> dict | None:
    a, b = (io, s) if order == "ABB" else (s, io)
    prompt = template.format(A=a, B=b, C=s)
    ids = _encode(tokenizer, prompt)
    io_id, s_id = _token_id(tokenizer, io), _token_id(tokenizer, s)
    io_pos, s_pos = _find(ids, io_id), _find(ids, s_id)
    # The names must survive tokenization in context as single tokens: IO once, S twice.
    if len(io_pos) != 1 or len(s_pos) != 2:
        return None
    return {
        "prompt": prompt,
        "ids": ids,
        "answer": io_id,
        "wrong": s_id,
        "attrs": {"io": io, "s": s, "order": order},
        "pos": {"IO": io_pos[0], "S1": s_pos[0], "S2": s_pos[1]},
    }


def make_ioi_task(
    tokenizer,
    n_prompts: int = 128,
    seed: int = 0,
    names: Sequence[str] | None = None,
    n_names: int = 16,
    templates: Sequence[str] = IOI_TEMPLATES,
) -> Task:
    """Build the IOI task with ``n_prompts`` clean prompts and their ``io``/``s``/``order`` counterparts.

    Args:
        tokenizer: the model's tokenizer (names must be single tokens with a leading space).
        n_prompts: number of clean prompts N.
        seed: RNG seed (prompts, names and orders are sampled deterministically from it).
        names: candidate names (default :data:`DEFAULT_NAMES`); the first ``n_names`` that are single
            tokens are used. Fewer values per attribute give better-estimated supervised features.
        n_names: size of the name pool (>= 3, since a corruption needs a third name).
        templates: strings with ``{A}``, ``{B}`` (first clause) and ``{C}`` (the repeated subject).
    Returns:
        a :class:`Task` with positions ``IO``, ``S1``, ``S2``, ``END`` and LD = logit[IO] - logit[S].
    """
    _check_count(n_prompts, "make_ioi_task")
    pool = single_token_names(tokenizer, names if names is not None else DEFAULT_NAMES)[:n_names]
    if len(pool) < 3:
        raise ValueError(
            f"make_ioi_task needs >= 3 names that are single tokens in this tokenizer, found {pool}; "
            "pass names=[...] that the tokenizer encodes as one token each (with a leading space)"
        )
    for t in templates:
        if not all(k in t for k in ("{A}", "{B}", "{C}")):
            raise ValueError(f"IOI template {t!r} must contain {{A}}, {{B}} and {{C}}")
    rng = random.Random(seed)
    attrs = ("io", "s", "order")
    positions = ("IO", "S1", "S2", "END")
    clean, corr = [], {a: [] for a in attrs}
    tries = 0
    while len(clean) < n_prompts:
        tries += 1
        if tries > 20 * n_prompts + 100:
            raise ValueError(
                f"make_ioi_task could only build {len(clean)} of {n_prompts} prompts: the names/templates do "
                "not tokenize as single, distinct tokens in context; check the templates and names"
            )
        template = templates[len(clean) % len(templates)]
        io, s, io2, s2 = rng.sample(pool, 4) if len(pool) >= 4 else (*rng.sample(pool, 3), None)
        if s2 is None:  # only three names: the S corruption borrows the third one too
            s2 = io2
        order = "ABB" if (len(clean) // len(templates)) % 2 == 0 else "BAB"
        row = _ioi_row(tokenizer, template, io, s, order)
        rows = {
            "io": _ioi_row(tokenizer, template, io2, s, order),
            "s": _ioi_row(tokenizer, template, io, s2, order),
            "order": _ioi_row(tokenizer, template, io, s, "BAB" if order == "ABB" else "ABB"),
        }
        if row is None or any(r is None or len(r["ids"]) != len(row["ids"]) for r in rows.values()):
            continue
        clean.append(row)
        for a in attrs:
            corr[a].append(rows[a])
    pad = _pad_id(tokenizer)
    return Task(
        name="ioi",
        attribute_names=attrs,
        position_names=positions,
        clean=_pack(clean, attrs, positions, pad),
        corrupted={a: _pack(corr[a], attrs, positions, pad) for a in attrs},
        description="indirect object identification; LD = logit[IO] - logit[S] at END",
        metadata={"names": list(pool), "templates": list(templates), "seed": seed},
    )


# --------------------------------------------------------------------------- pronoun gender


def _gender_row(tokenizer, template: str, name: str, gender: str, he: int, she: int) -> dict | None:
    prompt = template.format(N=name)
    ids = _encode(tokenizer, prompt)
    pos = _find(ids, _token_id(tokenizer, name))
    if len(pos) != 1:
        return None
    answer, wrong = (he, she) if gender == "male" else (she, he)
    return {
        "prompt": prompt,
        "ids": ids,
        "answer": answer,
        "wrong": wrong,
        "attrs": {"gender": gender, "name": name},
        "pos": {"NAME": pos[0]},
    }


def make_gender_task(
    tokenizer,
    n_prompts: int = 128,
    seed: int = 0,
    male_names: Sequence[str] = MALE_NAMES,
    female_names: Sequence[str] = FEMALE_NAMES,
    n_names: int = 8,
    templates: Sequence[str] = GENDER_TEMPLATES,
) -> Task:
    """Build the pronoun-gender task: "<...> {name} <...> because" -> " he" / " she".

    Args:
        tokenizer: the model's tokenizer (names and " he"/" she" must be single tokens).
        n_prompts: number of clean prompts N (half male, half female).
        seed: RNG seed.
        male_names, female_names: candidate names; the first ``n_names`` single-token ones of each are used.
        n_names: names per gender (>= 2, since the ``name`` corruption needs a second one).
        templates: strings with ``{N}``.
    Returns:
        a :class:`Task` with attributes ``gender``, ``name``; positions ``NAME``, ``END``;
        LD = logit[correct pronoun] - logit[other pronoun].
    """
    _check_count(n_prompts, "make_gender_task")
    he, she = _token_id(tokenizer, "he"), _token_id(tokenizer, "she")
    if he is None or she is None:
        raise ValueError("make_gender_task needs ' he' and ' she' to be single tokens of the tokenizer")
    males = single_token_names(tokenizer, male_names)[:n_names]
    females = single_token_names(tokenizer, female_names)[:n_names]
    if len(males) < 2 or len(females) < 2:
        raise ValueError(f"make_gender_task needs >= 2 single-token names per gender, found {males} and {females}")
    for t in templates:
        if "{N}" not in t:
            raise ValueError(f"gender template {t!r} must contain {{N}}")
    rng = random.Random(seed)
    attrs, positions = ("gender", "name"), ("NAME", "END")
    clean, corr = [], {a: [] for a in attrs}
    tries = 0
    while len(clean) < n_prompts:
        tries += 1
        if tries > 20 * n_prompts + 100:
            raise ValueError(
                f"make_gender_task could only build {len(clean)} of {n_prompts} prompts; check names/templates"
            )
        template = templates[len(clean) % len(templates)]
        gender = "male" if (len(clean) // len(templates)) % 2 == 0 else "female"
        same, other = (males, females) if gender == "male" else (females, males)
        name, name2 = rng.sample(same, 2)
        row = _gender_row(tokenizer, template, name, gender, he, she)
        rows = {
            "gender": _gender_row(
                tokenizer, template, rng.choice(other), "female" if gender == "male" else "male", he, she
            ),
            "name": _gender_row(tokenizer, template, name2, gender, he, she),
        }
        if row is None or any(r is None or len(r["ids"]) != len(row["ids"]) for r in rows.values()):
            continue
        clean.append(row)
        for a in attrs:
            corr[a].append(rows[a])
    pad = _pad_id(tokenizer)
    return Task(
        name="gender",
        attribute_names=attrs,
        position_names=positions,
        clean=_pack(clean, attrs, positions, pad),
        corrupted={a: _pack(corr[a], attrs, positions, pad) for a in attrs},
        description="pronoun gender; LD = logit[correct pronoun] - logit[other pronoun] at END",
        metadata={"male_names": males, "female_names": females, "templates": list(templates), "seed": seed},
        nested={"name": "gender"},
    )


#: Registry of task builders: ``name -> fn(tokenizer, n_prompts=..., seed=..., **kw) -> Task``.
TASKS: dict[str, Callable[..., Task]] = {"ioi": make_ioi_task, "gender": make_gender_task}


def make_task(name: str, tokenizer, n_prompts: int = 128, seed: int = 0, **kwargs) -> Task:
    """Build the registered task ``name`` (see :data:`TASKS`)."""
    if name not in TASKS:
        raise ValueError(f"unknown SAGE task {name!r}; available: {sorted(TASKS)}")
    return TASKS[name](tokenizer, n_prompts=n_prompts, seed=seed, **kwargs)
