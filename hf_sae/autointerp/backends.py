"""Language-model backends for automatic interpretation: one interface, three sources.

A backend answers two kinds of requests, each a list of chat conversations (``[{"role", "content"}]``):

- ``generate(chats, max_tokens)`` -> one completion string per chat (greedy / temperature 0);
- ``yes_probability(chats)`` -> P(the answer starts with "Yes") / (P(Yes) + P(No)) per chat, in [0, 1].

Backends:

- :class:`LocalLM` -- any local HF causal LM folder, or the embedded SmolLM2-135M-Instruct (the default:
  weak, but offline). Batched with left padding; the chat template of the tokenizer is used when it has
  one. ``yes_probability`` reads the next-token logits of the Yes/No tokens directly.
- :class:`OpenAIChat` -- any OpenAI-compatible ``/chat/completions`` endpoint (vLLM, llama.cpp server,
  TGI, ...). Requests run ``concurrency`` at a time, with retries and exponential backoff on connection
  errors, 429 and 5xx. ``yes_probability`` uses the returned ``top_logprobs`` of the first token when the
  server gives them, else 1.0 / 0.0 from the answer text.
- :class:`Cached` wraps either with a JSON-lines cache of answers keyed by the request (a rerun asks the
  LM nothing it has already answered).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

__all__ = ["Backend", "LocalLM", "OpenAIChat", "Cached", "make_backend", "BackendError"]

YES = ("Yes", " Yes", "yes", " yes", "YES")
NO = ("No", " No", "no", " no", "NO")


class BackendError(RuntimeError):
    """The LM could not answer (after the retries)."""


class Backend:
    """Interface; ``name`` identifies the LM in reports and in cache keys."""

    name = "backend"

    def generate(self, chats: Sequence[list], max_tokens: int = 48) -> list[str]:
        raise NotImplementedError

    def yes_probability(self, chats: Sequence[list]) -> list[float]:
        raise NotImplementedError


def _answer_to_probability(text: str) -> float:
    t = text.strip().lower()
    return 1.0 if t.startswith("yes") else 0.0


# ------------------------------------------------------------------------------------------------ local HF LM
class LocalLM(Backend):
    """A local HF causal LM (``hf_sae.data.models.load_model``: a folder, or ``"default"`` = embedded SmolLM2)."""

    def __init__(self, model: str = "default", batch_size: int = 8, device: str = "cpu", max_prompt_tokens: int = 1024):
        import torch

        from hf_sae.data.models import load_model

        self.model, self.tokenizer = load_model(model, device=device)
        self.device, self.batch_size, self.max_prompt_tokens = torch.device(device), batch_size, max_prompt_tokens
        self.name = f"local:{model}"
        vocab = self.tokenizer.get_vocab()
        self._yes = sorted({i for w in YES for i in self._first_ids(w, vocab)})
        self._no = sorted({i for w in NO for i in self._first_ids(w, vocab)})
        if not self._yes or not self._no:
            raise ValueError(f"the tokenizer of {model} has no single token for Yes/No; use another model.")
        # only the last position's logits are read: skip the unembedding of the others where the model allows it
        params = inspect.signature(self.model.forward).parameters
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def _first_ids(self, word: str, vocab: dict) -> list[int]:
        """[the id] when ``word`` is one token that decodes back to it (not <unk>), else []."""
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        ok = len(ids) == 1 and self.tokenizer.decode(ids).strip() == word.strip()
        return ids if ok else []

    def _prompts(self, chats: Sequence[list]) -> list[str]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            return [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
        return ["".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in c) + "Assistant:" for c in chats]

    def _encode(self, prompts: list[str]):
        tok = self.tokenizer
        tok.padding_side = "left"
        enc = tok(
            prompts,
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
            truncation=True,
            max_length=self.max_prompt_tokens,
        )
        return {k: v.to(self.device) for k, v in enc.items()}

    def generate(self, chats: Sequence[list], max_tokens: int = 48) -> list[str]:
        import torch

        out = []
        prompts = self._prompts(chats)
        for s in range(0, len(prompts), self.batch_size):
            enc = self._encode(prompts[s : s + self.batch_size])
            with torch.no_grad():
                gen = self.model.generate(
                    **enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
                )
            new = gen[:, enc["input_ids"].shape[1] :]
            out += [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        return out

    def yes_probability(self, chats: Sequence[list]) -> list[float]:
        import torch

        out = []
        prompts = self._prompts(chats)
        for s in range(0, len(prompts), self.batch_size):
            enc = self._encode(prompts[s : s + self.batch_size])
            # left padding: positions count real tokens only (as generate() does), else RoPE shifts them
            position_ids = (enc["attention_mask"].long().cumsum(-1) - 1).clamp_min(0)
            with torch.no_grad():
                out_ = self.model(**enc, position_ids=position_ids, use_cache=False, **self._last_only)
                logits = out_.logits[:, -1].float()
            lp = logits.log_softmax(-1)
            yes, no = lp[:, self._yes].logsumexp(-1), lp[:, self._no].logsumexp(-1)
            out += torch.sigmoid(yes - no).tolist()
        return out


# ------------------------------------------------------------------------------------------------ OpenAI-compatible
class OpenAIChat(Backend):
    """An OpenAI-compatible chat endpoint: ``POST {api_base}/chat/completions``.

    Args:
        api_base: e.g. ``http://127.0.0.1:8000/v1`` (vLLM), ``http://127.0.0.1:8080/v1`` (llama.cpp server).
        model: the ``model`` field sent.
        api_key: sent as ``Authorization: Bearer ...`` when given.
        concurrency: requests in flight at once.
        retries: further attempts after a connection error, a 429 or a 5xx answer (backoff 0.5 s x 2^i).
    """

    def __init__(
        self,
        api_base: str,
        model: str,
        api_key: Optional[str] = None,
        concurrency: int = 4,
        retries: int = 4,
        timeout: float = 120.0,
        backoff: float = 0.5,
    ):
        if not api_base.startswith(("http://", "https://")):
            raise ValueError(f"api_base must be an http(s) URL like http://127.0.0.1:8000/v1, got {api_base!r}.")
        self.url = api_base.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.concurrency = model, api_key, max(1, concurrency)
        self.retries, self.timeout, self.backoff = retries, timeout, backoff
        self.name = f"openai:{model}@{api_base}"

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = None
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return json.loads(r.read().decode())
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {e.read()[:200]!r}"
                if e.code != 429 and e.code < 500:
                    raise BackendError(
                        f"{self.url} refused the request ({last}); check --api-model / --api-key."
                    ) from e
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError) as e:
                last = f"{type(e).__name__}: {e}"
            if attempt < self.retries:
                time.sleep(self.backoff * 2**attempt)
        raise BackendError(f"{self.url} did not answer after {self.retries + 1} attempts (last: {last}).")

    def _map(self, fn, items):
        if self.concurrency == 1 or len(items) <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(fn, items))

    def generate(self, chats: Sequence[list], max_tokens: int = 48) -> list[str]:
        def one(chat):
            r = self._post({"model": self.model, "messages": chat, "max_tokens": max_tokens, "temperature": 0})
            try:
                return (r["choices"][0]["message"]["content"] or "").strip()
            except (KeyError, IndexError, TypeError) as e:
                raise BackendError(f"{self.url} answered without choices[0].message.content: {str(r)[:200]}") from e

        return self._map(one, list(chats))

    def yes_probability(self, chats: Sequence[list]) -> list[float]:
        def one(chat):
            r = self._post(
                {
                    "model": self.model,
                    "messages": chat,
                    "max_tokens": 1,
                    "temperature": 0,
                    "logprobs": True,
                    "top_logprobs": 10,
                }
            )
            try:
                choice = r["choices"][0]
                text = choice["message"]["content"] or ""
            except (KeyError, IndexError, TypeError) as e:
                raise BackendError(f"{self.url} answered without choices[0].message.content: {str(r)[:200]}") from e
            try:
                top = choice["logprobs"]["content"][0]["top_logprobs"]
            except (KeyError, IndexError, TypeError):
                top = None
            if top:
                yes = [t["logprob"] for t in top if t.get("token") in YES]
                no = [t["logprob"] for t in top if t.get("token") in NO]
                if yes or no:
                    p_yes = sum(math.exp(v) for v in yes)
                    p_no = sum(math.exp(v) for v in no)
                    return p_yes / (p_yes + p_no)
            return _answer_to_probability(text)

        return self._map(one, list(chats))


# ------------------------------------------------------------------------------------------------ cache
class Cached(Backend):
    """Answers of ``inner`` cached in a JSON-lines file, keyed by (backend name, request kind, chat, max_tokens)."""

    CHUNK = 32
    """Requests passed to ``inner`` at once; each chunk's answers are on disk before the next is asked."""

    def __init__(self, inner: Backend, path):
        self.inner, self.path, self.name = inner, Path(path), inner.name
        self.memory: dict[str, object] = {}
        self.hits = self.misses = 0
        self._lock = threading.Lock()
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    self.memory[rec["key"]] = rec["answer"]
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a kill
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _key(self, kind: str, chat, extra) -> str:
        blob = json.dumps([self.inner.name, kind, chat, extra], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _run(self, kind: str, chats: Sequence[list], extra, fn):
        keys = [self._key(kind, c, extra) for c in chats]
        todo = [i for i, k in enumerate(keys) if k not in self.memory]
        self.hits += len(chats) - len(todo)
        self.misses += len(todo)
        # asked and saved CHUNK at a time, so that a run stopped midway keeps what was answered
        for s in range(0, len(todo), self.CHUNK):
            part = todo[s : s + self.CHUNK]
            answers = fn([chats[i] for i in part])
            with self._lock, open(self.path, "a", encoding="utf-8") as f:
                for i, a in zip(part, answers):
                    self.memory[keys[i]] = a
                    f.write(json.dumps({"key": keys[i], "answer": a}, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return [self.memory[k] for k in keys]

    def generate(self, chats: Sequence[list], max_tokens: int = 48) -> list[str]:
        return self._run("generate", chats, max_tokens, lambda c: self.inner.generate(c, max_tokens))

    def yes_probability(self, chats: Sequence[list]) -> list[float]:
        return self._run("yes", chats, None, self.inner.yes_probability)


def make_backend(
    kind: str = "local",
    model: Optional[str] = None,
    api_base: Optional[str] = None,
    api_key: Optional[str] = None,
    cache: Optional[str] = None,
    batch_size: int = 8,
    concurrency: int = 4,
    device: str = "cpu",
) -> Backend:
    """``kind``: ``local`` (``model``: a folder or ``default``) or ``openai`` (``api_base`` and ``model`` required)."""
    if kind == "local":
        b: Backend = LocalLM(model or "default", batch_size=batch_size, device=device)
    elif kind == "openai":
        if not api_base or not model:
            raise ValueError(
                "the openai backend needs --api-base URL (e.g. http://127.0.0.1:8000/v1) and --model NAME."
            )
        b = OpenAIChat(api_base, model, api_key=api_key, concurrency=concurrency)
    else:
        raise ValueError(f"unknown backend {kind!r}; choose 'local' or 'openai'.")
    return Cached(b, cache) if cache else b
