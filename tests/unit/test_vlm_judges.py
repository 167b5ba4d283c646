"""VLM judges through the real loading path: a tiny LLaVA-structured model saved and loaded back."""
import json
import time

import pytest
import torch

from pl_modules.prior.tiny_models import save_tiny_vlm
from pl_modules.scoring.judges import build_judge
from pl_modules.scoring.metrics import Unavailable

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    return save_tiny_vlm(tmp_path_factory.mktemp("vlm"))


def images(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, 3, 40, 56, generator=g) for _ in range(3)]


def test_a_local_vlm_answers_from_option_logits_with_both_orders_averaged(tiny_vlm, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFCODEC_CACHE", str(tmp_path))
    judge = build_judge(f"vlm:{tiny_vlm}")
    reference, a, b = images()
    forward = judge.prefer(reference, a, b)
    assert forward.shape == (3,) and ((forward > 0) & (forward < 1)).all()
    # Asked both ways, the answers are complements: the position bias is averaged out.
    assert torch.allclose(forward + judge.prefer(reference, b, a), torch.ones(3), atol=1e-6)
    tokenizer = judge.processor.tokenizer
    assert tokenizer("A", add_special_tokens=False).input_ids[0] in judge.options[0]
    assert len(list((tmp_path / "judgments").iterdir())) == 6  # cached by the pixels of (reference, a, b)


def test_cached_judgments_are_reused_and_keyed_by_pixels(tiny_vlm, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFCODEC_CACHE", str(tmp_path))
    judge = build_judge(f"vlm:{tiny_vlm}")
    reference, a, b = images(batch=2)
    first = judge.prefer(reference, a, b)
    monkeypatch.setattr(judge, "first_option_probability", lambda requests: pytest.fail("not cached"))
    assert torch.equal(judge.prefer(reference, a, b), first)
    changed = a.clone()
    changed[1, :, 0, 0] = 1 - changed[1, :, 0, 0]
    asked = []
    monkeypatch.setattr(judge, "first_option_probability", lambda requests: asked.extend(requests) or [0.5] * len(requests))
    assert judge.prefer(reference, changed, b)[0] == first[0] and len(asked) == 2 * len(judge.prompts)


def test_a_missing_vlm_is_unavailable_not_downloaded(tmp_path):
    with pytest.raises(Unavailable, match="not available locally"):
        build_judge(f"vlm:{tmp_path / 'no-such-vlm'}")


class ScriptedChat:
    """An OpenAI-compatible /chat/completions on loopback that answers from a script: a reply text,
    'timeout' (sleeps past the client's timeout), 'malformed' (not JSON) or an HTTP status code."""

    def __init__(self, script):
        import http.server
        import threading

        self.script, self.requests = list(script), []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                step = server.script.pop(0)
                if step == "timeout":
                    time.sleep(1.0)
                    return  # the client has given up: an answer would hit a closed socket (BrokenPipeError)
                if isinstance(step, int):
                    self.send_response(step)
                    self.end_headers()
                    return
                payload = b"{not json" if step == "malformed" else json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": step}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_served_vlm_is_asked_both_ways_and_every_failure_is_retried_counted_and_no_vote(monkeypatch, caplog):
    from pl_modules.scoring.vlm_judges import ServedVLMJudge

    monkeypatch.setenv("DIFFCODEC_JUDGE_API_KEY", "sk-secret-123")
    chat = ScriptedChat([
        "A has finer texture.\nAnswer: A", "The left one is blurrier.\nAnswer: B",      # item 0: a wins both ways
        "timeout", "malformed", 500, "I cannot compare these images.", "Answer: C",    # item 1: never an answer
        "Answer: B", "Answer: B"])                                                     # item 2: a split vote
    try:
        judge = ServedVLMJudge(f"judge-model@{chat.url}", timeout_s=0.3, retries=4, requests_per_second=1000,
                               backoff_s=0.01)
        with caplog.at_level("WARNING"):
            prefs = judge.prefer(*images(batch=3))
    finally:
        chat.close()
    assert prefs[0] == 1.0 and torch.isnan(prefs[1]) and prefs[2] == 0.5
    assert judge.failures == 1 and len(chat.requests) == 2 + 5 + 2  # item 1's swapped order is never asked
    assert all(r["path"] == "/v1/chat/completions" and r["auth"] == "Bearer sk-secret-123" for r in chat.requests)
    message = chat.requests[0]["body"]["messages"][0]["content"]
    assert [m["type"] for m in message].count("image_url") == 3 and "Answer: A" in message[0]["text"]
    assert len([r for r in caplog.records if "attempt" in r.getMessage()]) == 5
    assert "sk-secret-123" not in caplog.text + repr(judge)


def test_the_answer_line_is_parsed_strictly():
    from pl_modules.scoring.vlm_judges import parse_choice

    assert parse_choice("Both are close.\nAnswer: B") == "B"
    assert parse_choice("**Answer: a**") == "A"
    for reply in ("", "A", "Answer: A\nActually, B is better.", "I'd say A.", "Answer: A or B"):
        assert parse_choice(reply) is None, reply
