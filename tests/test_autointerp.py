"""Automatic interpretation: metrics against hand computation, the OpenAI-compatible backend against a local
stub server on 127.0.0.1 (retries, cache, logprobs), the local-LM backend against its own logits, and the
whole pipeline on a site whose planted latent the stub explains perfectly."""

from __future__ import annotations

import http.server
import json
import math
import re
import threading
from collections import Counter

import pytest
import test_dashboard
import torch

from hf_sae.autointerp.explain import (
    accuracy,
    auroc,
    clean_explanation,
    detection_prompt,
    explain_prompt,
    render_context,
)

PLANTED_LATENT, PLANTED_WORD = test_dashboard.PLANTED_LATENT, test_dashboard.PLANTED_WORD
planted_sae = test_dashboard.planted_sae
tiny_tokenizer, tiny_lm = test_dashboard.tiny_tokenizer, test_dashboard.tiny_lm  # fixtures


# ------------------------------------------------------------------------------------------ metrics and prompts
def test_auroc_and_accuracy_by_hand():
    scores, labels = [0.9, 0.8, 0.3, 0.6, 0.2, 0.6], [1, 1, 1, 0, 0, 0]
    # positives 0.9, 0.8, 0.3 vs negatives 0.6, 0.2, 0.6: wins 3 + 3 + 1 = 7 of 9
    assert auroc(scores, labels) == pytest.approx(7 / 9)
    assert accuracy(scores, labels) == pytest.approx(3 / 6)  # 0.9, 0.8 right; 0.3 wrong; 0.6, 0.6 wrong; 0.2 right
    assert auroc([0.5, 0.5], [1, 0]) == 0.5  # a tie counts one half
    assert math.isnan(auroc([0.1], [1])) and math.isnan(accuracy([], []))


def test_prompts_and_cleaning():
    tok = ["The", " lord", " Jesus", " said"]
    ctx = {"t": [0, 1, 2, 3], "v": [0, 0, 100, 0], "c": 2, "a": 3.0}
    assert render_context(ctx, tok, {2}) == "The lord <<Jesus>> said"
    assert render_context(ctx, tok) == "The lord Jesus said"
    chat = explain_prompt([ctx], tok)
    assert chat[-1]["role"] == "user" and "1. The lord <<Jesus>> said" in chat[-1]["content"]
    assert "fires on: names\n" in detection_prompt("names", ctx, tok)[-1]["content"]
    assert clean_explanation(' "The word Jesus."\nmore') == "The word Jesus"
    assert clean_explanation("1. numbers") == "numbers" and clean_explanation("") == ""


# ------------------------------------------------------------------------------------------ a stub OpenAI server
class StubLM:
    """Answers like an instruction LM that knows one rule: a feature is the word most often marked."""

    def __init__(self, fail_first: int = 0):
        self.requests, self.fail_first, self.lock = 0, fail_first, threading.Lock()

    def answer(self, body: dict) -> tuple[str, float]:
        text = body["messages"][-1]["content"]
        if "have in common" in text:
            word = Counter(m for m in re.findall(r"<<(.+?)>>", text) if m != "like this").most_common(1)[0][0]
            return f'The word "{word}".', 1.0
        word = re.search(r'fires on: The word "(.+?)"', text)
        excerpt = text.split("Text: ", 1)[1].split("\n\n")[0]
        if word is None:
            return "No", 0.2
        word = word.group(1)
        if "Are the tokens marked" in text:
            marked = re.findall(r"<<(.+?)>>", excerpt)
            yes = bool(marked) and all(m == word for m in marked)
        else:
            yes = word in excerpt  # the tiny word-level tokenizer decodes tokens without spaces
        return ("Yes", 0.9) if yes else ("No", 0.1)

    def server(self):
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                with stub.lock:
                    stub.requests += 1
                    n = stub.requests
                if self.path != "/v1/chat/completions":
                    self.send_error(404)
                    return
                if n <= stub.fail_first:
                    self.send_error(503, "overloaded")
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content, p_yes = stub.answer(body)
                choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                if body.get("logprobs"):
                    choice["logprobs"] = {
                        "content": [
                            {
                                "token": content[:3],
                                "logprob": 0.0,
                                "top_logprobs": [
                                    {"token": "Yes", "logprob": math.log(p_yes)},
                                    {"token": "No", "logprob": math.log(1 - p_yes)},
                                    {"token": "Maybe", "logprob": -9.0},
                                ],
                            }
                        ]
                    }
                data = json.dumps(
                    {"id": "x", "object": "chat.completion", "model": body["model"], "choices": [choice]}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)


@pytest.fixture()
def stub():
    lm = StubLM(fail_first=1)
    server = lm.server()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    lm.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield lm
    server.shutdown()
    server.server_close()


def test_openai_backend_retries_and_logprobs(stub):
    from hf_sae.autointerp.backends import BackendError, OpenAIChat

    b = OpenAIChat(stub.url, "stub", concurrency=2, backoff=0.0)
    tok = [" Jesus", " wept", " Moses"]
    yes = detection_prompt('The word "Jesus"', {"t": [0, 1], "v": [0, 0], "c": 0}, tok)
    no = detection_prompt('The word "Jesus"', {"t": [2, 1], "v": [0, 0], "c": 0}, tok)
    assert b.yes_probability([yes, no]) == pytest.approx([0.9, 0.1])  # from top_logprobs (Maybe ignored)
    assert stub.requests == 3  # the first answer was a 503, retried
    assert b.generate([explain_prompt([{"t": [0, 1], "v": [100, 0], "c": 0}], tok)]) == ['The word "Jesus".']
    dead = OpenAIChat("http://127.0.0.1:9/v1", "stub", retries=1, backoff=0.0, timeout=5)
    with pytest.raises(BackendError, match="did not answer after 2 attempts"):
        dead.generate([yes])
    with pytest.raises(ValueError, match="http"):
        OpenAIChat("127.0.0.1:8000", "stub")


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_lm, tiny_tokenizer):
    from hf_sae.dashboard import build_dashboard

    out = tmp_path_factory.mktemp("ai_site")
    sae = planted_sae(tiny_lm, tiny_tokenizer, n=64, k=4)
    build_dashboard(
        sae,
        out,
        model=tiny_lm,
        tokenizer=tiny_tokenizer,
        n_tokens=4000,
        window=64,
        n2g_latents=0,
        texts=["Jesus wept"],
        progress=False,
    )
    return out


def test_autointerp_cli_with_stub_server_and_cache(site, stub, tmp_path):
    from hf_sae.cli import main
    from hf_sae.dashboard.site import read_data

    ids = [PLANTED_LATENT, 3, 11, 20]
    argv = [
        "autointerp",
        str(site),
        "--backend",
        "openai",
        "--api-base",
        stub.url,
        "--model",
        "stub",
        "--latent-ids",
        *map(str, ids),
        "--n-explain",
        "3",
        "--n-detect",
        "4",
        "--n-fuzz",
        "2",
        "--no-progress",
        "--api-key-env",
        "",
    ]
    assert main(argv) == 0
    res = json.loads((site / "autointerp.json").read_text())
    planted = res["latents"][str(PLANTED_LATENT)]
    assert planted["explanation"] == f'The word "{PLANTED_WORD}"'
    assert planted["detection_accuracy"] == 1.0 and planted["detection_auroc"] == 1.0
    assert planted["fuzzing_accuracy"] == 1.0
    assert planted["n_detect"] >= 4 and planted["n_detect"] % 2 == 0 and planted["n_fuzz"] == 4  # pos + as many neg
    # the shuffled baseline gives the planted latent another latent's word: it cannot find all its contexts
    assert planted["baseline_explanation"] != planted["explanation"]
    assert planted["baseline_detection_accuracy"] < 1.0
    s = res["summary"]
    assert s["n_latents"] == 4 and s["detection_accuracy"] >= s["baseline_detection_accuracy"]
    # the browser gets the scores
    assert read_data(site / "data" / "meta.js")["autointerp"] is True
    assert read_data(site / "data" / "autointerp.js")["latents"][str(PLANTED_LATENT)]["detection_accuracy"] == 1.0
    assert (site / "autointerp.html").is_file() and (site / "autointerp.png").is_file()
    # a rerun is answered from the cache: the server sees no new request
    before = stub.requests
    assert main(argv) == 0
    assert stub.requests == before
    assert json.loads((site / "autointerp.json").read_text())["summary"] == s


def test_cache_keeps_the_answered_chunks_of_an_interrupted_call(tmp_path):
    from hf_sae.autointerp.backends import Backend, Cached

    class Flaky(Backend):
        name = "flaky"

        def __init__(self, fail_after):
            self.asked, self.fail_after = [], fail_after

        def yes_probability(self, chats):
            if len(self.asked) + len(chats) > self.fail_after:
                raise KeyboardInterrupt  # the run is stopped mid-call
            self.asked += chats
            return [len(c[0]["content"]) / 100 for c in chats]

    chats = [[{"role": "user", "content": "x" * i}] for i in range(70)]
    path = tmp_path / "cache.jsonl"
    cached = Cached(Flaky(fail_after=64), path)
    cached.CHUNK = 32
    with pytest.raises(KeyboardInterrupt):
        cached.yes_probability(chats)  # chunks 1 and 2 answered, chunk 3 interrupted
    assert len(path.read_text().splitlines()) == 64
    again = Cached(Flaky(fail_after=100), path)  # a new run asks only the 6 unanswered chats
    assert again.yes_probability(chats) == [i / 100 for i in range(70)]
    assert again.inner.asked == chats[64:] and (again.hits, again.misses) == (64, 6)


def test_autointerp_bad_inputs(tmp_path, capsys):
    from hf_sae.cli import main

    assert main(["autointerp", str(tmp_path)]) != 0      # one error line, before any model is loaded
    assert "not a feature-browser site" in capsys.readouterr().err
    from hf_sae.autointerp.backends import make_backend

    with pytest.raises(ValueError, match="--api-base"):
        make_backend("openai", model="x")
    with pytest.raises(ValueError, match="unknown backend"):
        make_backend("magic")


def test_local_backend_matches_its_logits(tmp_path, tiny_lm, tiny_tokenizer, site):
    from hf_sae.autointerp.backends import LocalLM
    from hf_sae.autointerp.run import autointerp_site

    tiny_lm.save_pretrained(tmp_path / "lm")
    tiny_tokenizer.save_pretrained(tmp_path / "lm")
    b = LocalLM(str(tmp_path / "lm"), batch_size=2)
    chats = [[{"role": "user", "content": "Jesus said unto them"}], [{"role": "user", "content": "the"}]]
    ids_of = tiny_tokenizer.convert_tokens_to_ids
    assert b._yes == [ids_of("Yes")] and b._no == sorted([ids_of("No"), ids_of("no")])  # "yes" is <unk>: left out
    p = b.yes_probability(chats)  # a batch of two prompts of different lengths (left padding)
    for chat, got in zip(chats, p):  # by hand: P(Yes)/(P(Yes)+P(No)) for one unpadded prompt
        text = b._prompts([chat])[0]
        ids = tiny_tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            lp = tiny_lm(ids).logits[0, -1].log_softmax(-1)
        p_yes, p_no = lp[b._yes].exp().sum(), lp[b._no].exp().sum()
        assert got == pytest.approx((p_yes / (p_yes + p_no)).item(), abs=1e-4)
    out = b.generate(chats, max_tokens=3)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    res = autointerp_site(site, b, n_latents=3, n_detect=2, n_fuzz=1, progress=False)
    assert res["summary"]["n_latents"] == 3 and res["backend"].startswith("local:")
