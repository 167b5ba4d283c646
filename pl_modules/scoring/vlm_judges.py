"""VLM judges of 2AFC: which of two reconstructions is closer to the reference image.

``vlm:<hub id or folder>``: a local multi-image VLM through transformers (AutoModelForImageTextToText
and AutoProcessor, its own chat template; Qwen2/2.5-VL, SmolVLM, Idefics3, LLaVA-OneVision, Gemma 3).
The probability is read from the next-token logits of the two options, every tokenizer spelling of
each combined ("A", " A", "a", " a"), never parsed from generated text. Both orders are asked and
averaged (a VLM's first-position bias cancels), several prompts self-ensembled, requests batched,
and judgments cached on disk by the hashes of the three images' pixels.

``served:<model>@<base url>``: an OpenAI-compatible chat endpoint asked to reason, then answer.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path

import torch

from foundation.files import atomic_write_text
from foundation.locations import cache_dir
from pl_modules.prior.presets import resolve_pretrained
from pl_modules.scoring.metrics import Unavailable

LOG = logging.getLogger(__name__)
PROMPTS = (
    "The first image is the original. Which of the next two images, A or B, is closer to it? Answer A or B.",
    "Image 1 is a reference photograph; images A and B are two reconstructions of it. Which reconstruction "
    "looks more like the reference to a human observer? Reply with A or B only.",
)


def image_bytes(x: torch.Tensor) -> bytes:
    """The 8-bit pixels a judge sees: what identifies an image for the cache."""
    return x.detach().clamp(0, 1).mul(255).round().byte().cpu().numpy().tobytes() + str(tuple(x.shape)).encode()


class LocalVLMJudge:
    def __init__(self, name_or_path: str, prompts: tuple[str, ...] = PROMPTS, batch_size: int = 8,
                 cache: Path | None = None):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        source = resolve_pretrained(name_or_path)
        try:
            self.model = AutoModelForImageTextToText.from_pretrained(source, local_files_only=True).eval()
            self.processor = AutoProcessor.from_pretrained(source, local_files_only=True)
        except OSError as err:
            raise Unavailable(f"VLM '{name_or_path}' is not available locally ({str(err).splitlines()[0][:120]})")
        self.processor.tokenizer.padding_side = "left"  # the next token sits at the last position of every row
        self.name, self.prompts, self.batch_size = f"vlm:{name_or_path}", prompts, batch_size
        self.options = [self.option_ids(letter) for letter in ("A", "B")]
        if self.options[0] & self.options[1]:
            raise ValueError(f"{name_or_path}: the tokenizer spells A and B with a shared token")
        self.cache = cache or cache_dir("judgments")
        self.identity = hashlib.sha256(json.dumps([name_or_path, list(prompts)]).encode()).hexdigest()

    def option_ids(self, letter: str) -> set[int]:
        tokenizer = self.processor.tokenizer
        spellings = (letter, f" {letter}", letter.lower(), f" {letter.lower()}")
        return {ids[0] for ids in (tokenizer(s, add_special_tokens=False).input_ids for s in spellings) if ids}

    def conversation(self, prompt: str) -> str:
        content = [{"type": "text", "text": prompt}, {"type": "text", "text": " Original:"}, {"type": "image"},
                   {"type": "text", "text": " A:"}, {"type": "image"}, {"type": "text", "text": " B:"},
                   {"type": "image"}, {"type": "text", "text": " Answer:"}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    @torch.no_grad()
    def first_option_probability(self, requests: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]) -> list[float]:
        """P(A) for each (prompt, reference, A, B), from the logits of the next token."""
        out = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start: start + self.batch_size]
            inputs = self.processor(images=[img.clamp(0, 1) for _, *images in chunk for img in images],
                                    text=[self.conversation(prompt) for prompt, *_ in chunk], return_tensors="pt",
                                    padding=True, do_rescale=False)
            logits = self.model(**inputs).logits[:, -1].float()
            scores = torch.stack([logits[:, sorted(ids)].logsumexp(-1) for ids in self.options], dim=-1)
            out += scores.softmax(-1)[:, 0].tolist()
        return out

    def prefer(self, reference: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        reference, a, b = reference.cpu().float(), a.cpu().float(), b.cpu().float()  # the VLM lives on the CPU
        results: list[float | None] = []
        pending = []
        for i in range(len(reference)):
            key = hashlib.sha256(self.identity.encode() + b"".join(image_bytes(x[i]) for x in (reference, a, b)))
            path = self.cache / f"{key.hexdigest()}.json"
            results.append(json.loads(path.read_text())["p_a"] if path.is_file() else None)
            if results[-1] is None:
                pending.append((i, path))
        requests = [(prompt, reference[i], first[i], second[i]) for i, _ in pending
                    for first, second in ((a, b), (b, a)) for prompt in self.prompts]
        probabilities = iter(self.first_option_probability(requests) if requests else [])
        for i, path in pending:
            in_order = [next(probabilities) for _ in self.prompts]
            swapped = [next(probabilities) for _ in self.prompts]
            # Order-swap debiasing: P(a) asked as A, and 1 − P(b) asked with b as A.
            results[i] = (sum(in_order) + sum(1 - p for p in swapped)) / (2 * len(self.prompts))
            atomic_write_text(path, json.dumps({"p_a": results[i], "judge": self.name}))
        return torch.tensor(results)


ANSWER = re.compile(r"\**answer:\s*\**\s*([AB])\s*\**\.?", re.IGNORECASE)
REASON_THEN_ANSWER = (
    "The first image is an original photograph; A and B are two reconstructions of it. Compare each with "
    "the original: describe the differences you see (detail, texture, colour, artefacts), then decide which "
    "a careful human observer would find closer to the original. End your reply with one line, exactly "
    "'Answer: A' or 'Answer: B'.")
API_KEY_VARIABLE = "DIFFCODEC_JUDGE_API_KEY"


def parse_choice(reply: str) -> str | None:
    """'A' or 'B' from the reply's last non-empty line, which must be the answer line; else None."""
    lines = [line.strip() for line in reply.strip().splitlines() if line.strip()]
    match = ANSWER.fullmatch(lines[-1]) if lines else None
    return match.group(1).upper() if match else None


class ServedVLMJudge:
    """``served:<model>@<base url>``: an OpenAI-compatible chat endpoint (vLLM, a hosted model),
    asked with the reason-then-answer prompt in both orders; the final line is parsed strictly. A
    request that fails, times out or yields no answer line is retried with back-off, then counted
    in ``failures`` and returned as NaN (no vote). The API key comes only from $DIFFCODEC_JUDGE_API_KEY
    and is never logged or written anywhere."""

    def __init__(self, spec: str, timeout_s: float = 60.0, retries: int = 3, requests_per_second: float = 2.0,
                 backoff_s: float = 1.0):
        model, _, base_url = spec.partition("@")
        if not model or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"served judge '{spec}' must be 'served:<model>@<http(s) base url>'")
        self.name, self.model, self.url = f"served:{spec}", model, base_url.rstrip("/") + "/chat/completions"
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.interval, self.last_request = 1.0 / requests_per_second, 0.0
        self.failures = 0

    def __repr__(self) -> str:
        return f"ServedVLMJudge({self.model!r} at {self.url!r})"

    def request(self, images: list[torch.Tensor]) -> str:
        import base64
        import io
        import urllib.request

        from PIL import Image

        content = [{"type": "text", "text": REASON_THEN_ANSWER}]
        for label, image in zip(("Original:", "A:", "B:"), images):
            buffer = io.BytesIO()
            pixels = image.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
            Image.fromarray(pixels).save(buffer, format="PNG")
            content += [{"type": "text", "text": label}, {"type": "image_url", "image_url": {
                "url": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()}}]
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": content}],
                           "temperature": 0.0}).encode()
        headers = {"Content-Type": "application/json"}
        if os.environ.get(API_KEY_VARIABLE):
            headers["Authorization"] = f"Bearer {os.environ[API_KEY_VARIABLE]}"
        wait = self.last_request + self.interval - time.monotonic()
        if wait > 0:
            time.sleep(wait)  # the rate limit
        self.last_request = time.monotonic()
        with urllib.request.urlopen(urllib.request.Request(self.url, body, headers), timeout=self.timeout_s) as reply:
            return json.loads(reply.read())["choices"][0]["message"]["content"]

    def choice(self, images: list[torch.Tensor]) -> str | None:
        for attempt in range(self.retries + 1):
            try:
                answer = parse_choice(self.request(images))
                if answer:
                    return answer
                why = "no 'Answer: A/B' line"
            except (OSError, ValueError, KeyError, IndexError, TypeError) as err:  # network, HTTP, JSON, shape
                why = type(err).__name__
            LOG.warning("served judge %s: attempt %d failed (%s)", self.model, attempt + 1, why)
            time.sleep(self.backoff_s * 2 ** attempt)
        self.failures += 1
        return None

    def prefer(self, reference: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(len(reference)):
            in_order = self.choice([reference[i], a[i], b[i]])
            swapped = self.choice([reference[i], b[i], a[i]]) if in_order else None
            out.append(((in_order == "A") + (swapped == "B")) / 2 if swapped else float("nan"))
        return torch.tensor(out)
