"""The HTTP server: completions match the library; keys, unknown models, bad bodies, a full
queue and path traversal get the right status codes, in OpenAI's error shape (since issue 18:
bad bodies are 400, not 422, and a missing key is 401, not 403; tests/test_serving_openai.py
covers the rest of the OpenAI API)."""

import queue
import shutil
import threading

import pytest
import torch
from conftest import LLAMA_KINDS, randomize_adapter, tiny_llama
from fastapi.testclient import TestClient

from moslora import MoSConfig, get_mos_model
from moslora.serving import BASE, MultiAdapterModel
from benchmarks.loadtest import word_tokenizer
from moslora.serving.decoding import Sampling
from moslora.serving.scheduler import Job
from moslora.serving.server import ApiKeys, create_app

KEYS = {"*": "admin-key", "secret": "secret-key"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    for i, (name, targets) in enumerate({"open": LLAMA_KINDS, "secret": ["q_proj", "v_proj"]}.items()):
        model = get_mos_model(tiny_llama(), MoSConfig(target_modules=targets, rank=4, budget_rank=2, seed=i))
        randomize_adapter(model, std=0.2, seed=i)
        model.save_pretrained(root / name)
    (root / "outside").mkdir()
    return root


def serve(root, keys=None, **kwargs):
    mm = MultiAdapterModel(tiny_llama())
    mm.load_adapter("open", root / "open")
    mm.load_adapter("secret", root / "secret")
    return mm, create_app(mm, word_tokenizer(), root, ApiKeys(keys or {"secret": "secret-key"}), **kwargs)


@pytest.fixture(scope="module")
def served(root):
    mm, app = serve(root)
    with TestClient(app) as client:  # the context runs the lifespan: the worker thread
        yield mm, client


def complete(client, model, prompt="w1 w2 w3", key=None, **body):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": model, "prompt": prompt, "temperature": 0, **body}  # greedy, as the library oracle
    return client.post("/v1/completions", json=body, headers=headers)


def message(r):
    return r.json()["error"]["message"]


def library_text(mm, model, prompt, max_tokens):
    tok = word_tokenizer()
    ids = torch.tensor([tok(prompt)["input_ids"]])
    out = mm.generate(ids, adapter_names=[model], max_new_tokens=max_tokens, do_sample=False,
                      pad_token_id=0, eos_token_id=2)[0, ids.shape[1]:].tolist()
    return tok.decode(out[: out.index(2)] if 2 in out else out, skip_special_tokens=True)


def test_completions_match_the_library_per_adapter(served):
    mm, client = served
    texts = {}
    for model, key in (("open", None), ("secret", "secret-key"), (BASE, None)):
        r = complete(client, model, "w5 w9 w17 w4", key=key, max_tokens=6)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["text"] == library_text(mm, model, "w5 w9 w17 w4", 6)
        assert body["usage"]["prompt_tokens"] == 4 and body["model"] == model
        texts[model] = body["choices"][0]["text"]
    assert len(set(texts.values())) == 3, "the adapters must change the completion"


def test_concurrent_clients_are_batched_and_each_gets_its_own_answer(root):
    mm, app = serve(root, batch_window=0.2, max_batch=8)
    prompts = [("open", "w1 w2"), (BASE, "w3 w4 w5 w6"), ("open", "w7"), ("secret", "w8 w9 w10")]
    answers = {}
    with TestClient(app) as client:
        def ask(i, model, prompt):
            answers[i] = complete(client, model, prompt, key="secret-key", max_tokens=4 + i)

        threads = [threading.Thread(target=ask, args=(i, *p)) for i, p in enumerate(prompts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        metrics = client.get("/metrics.json").json()
    for i, (model, prompt) in enumerate(prompts):
        assert answers[i].status_code == 200
        assert answers[i].json()["choices"][0]["text"] == library_text(mm, model, prompt, 4 + i)
    assert metrics["requests"] == 4 and metrics["completion_tokens"] > 0


def test_protected_adapter_needs_its_key(served):
    _, client = served
    assert complete(client, "secret").status_code == 401
    assert complete(client, "secret", key="wrong").status_code == 401
    assert complete(client, "secret", key="secret-key", max_tokens=1).status_code == 200
    assert complete(client, "open", max_tokens=1).status_code == 200


def test_unknown_model_is_404(served):
    _, client = served
    r = complete(client, "nope")
    assert r.status_code == 404 and "/v1/models" in message(r)


@pytest.mark.parametrize("body", [
    {"model": "open"},                                        # no prompt
    {"model": "open", "prompt": ""},
    {"model": "open", "prompt": "w1", "max_tokens": 0},
    {"model": "open", "prompt": "w1", "temperature": 2.1},    # OpenAI's range is 0..2
    {"prompt": "w1"},
])
def test_bad_body_is_400(served, body):
    _, client = served
    assert client.post("/v1/completions", json=body).status_code == 400


def test_full_queue_is_503(root):
    _, app = serve(root, queue_size=1)
    client = TestClient(app)  # no context: the worker is not running, so the queue stays full
    app.state.scheduler.submit(Job("open", [5], Sampling(max_tokens=1)))
    r = complete(client, "open")
    assert r.status_code == 503 and "queue is full" in message(r)
    with pytest.raises(queue.Full):
        app.state.scheduler.submit(Job("open", [5], Sampling(max_tokens=1)))


def test_adapters_load_and_unload_only_from_under_the_root(root):
    _, app = serve(root, keys=KEYS)
    admin = {"Authorization": "Bearer admin-key"}

    def load(name, path, headers=admin):
        return client.post("/v1/adapters", json={"name": name, "path": path}, headers=headers)

    with TestClient(app) as client:
        assert load("x", "open", headers={}).status_code == 401
        for path in ("../elsewhere", "/etc", "open/../../x", str(root.parent)):
            r = load("x", path)
            assert r.status_code == 400 and "outside the adapter root" in message(r), path
        assert load("../y", "open").status_code == 400
        assert load("open", "open").status_code == 409
        assert load("z", "missing").status_code == 404
        assert load("z", "outside").status_code == 404  # a directory with no adapter in it
        assert load("x", "open").status_code == 200
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [BASE, "open", "secret", "x"]
        assert complete(client, "x", key="admin-key", max_tokens=2).status_code == 200
        assert client.delete("/v1/adapters/x", headers={}).status_code == 401
        assert client.delete("/v1/adapters/x", headers=admin).status_code == 200
        assert client.delete("/v1/adapters/x", headers=admin).status_code == 404
        assert complete(client, "x", key="admin-key").status_code == 404
        assert client.get("/health").json() == {"status": "ok", "adapters": 2, "queue_depth": 0}
        assert client.get("/metrics.json").json()["memory_bytes"]["adapters_total"] > 0


def test_adapters_under_the_root_are_served_from_disk_within_the_budget(served, root, tmp_path):
    reference, _ = served  # both adapters loaded explicitly
    for name in ("open", "secret"):
        shutil.copytree(root / name, tmp_path / name)
    mm = MultiAdapterModel(tiny_llama(), adapter_root=tmp_path, max_resident_bytes=0)  # one call's adapters at most
    mm.root.ttl = 0.0
    with TestClient(create_app(mm, word_tokenizer(), tmp_path, ApiKeys())) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [BASE, "open", "secret"]
        assert mm.adapters() == [], "nothing is loaded at start"
        for model in ("open", "secret", "open"):
            r = complete(client, model, "w5 w9 w17 w4", max_tokens=6)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == library_text(reference, model, "w5 w9 w17 w4", 6)
            assert mm.adapters() == [model], "the budget holds one adapter: the other was evicted"
        shutil.copytree(root / "open", tmp_path / "added")
        shutil.rmtree(tmp_path / "secret")
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [BASE, "added", "open"]
        assert complete(client, "secret").status_code == 404
        assert complete(client, "added", max_tokens=2).status_code == 200
        text = client.get("/metrics").text
    assert "moslora_adapter_loads_total 4.0" in text and "moslora_adapter_evictions_total 3.0" in text
    assert "moslora_adapters_available 2.0" in text and 'moslora_resident_bytes{part="budget"} 0.0' in text
