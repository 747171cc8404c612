"""``remote:`` backend: a BPO model served by vLLM / SGLang behind OpenAI's ``/v1/completions``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiohttp
from yarl import URL

from optimizer.base import (
    Mode,
    OptimizerError,
    OptimizerOptions,
    OptimizerStatus,
    OptimizerUnavailable,
    Rewrite,
    State,
)
from optimizer.budget import estimate_tokens, min_new_tokens, token_budget
from optimizer.identity import remote_identity
from optimizer.template import (
    BANNED_STRINGS,
    DECODING,
    build_prompt,
    clean_output,
)
from optimizer.urls import redact_url, without_credentials

log = logging.getLogger("bpo.optimizer.remote")

# How long start-up waits for the server before /readyz says "failed" (probing goes on behind it).
STARTUP_GRACE_SECONDS = 10.0
PROBE_MIN_SECONDS, PROBE_MAX_SECONDS = 0.5, 30.0
# While rewrites flow, /v1/models is read again this often, so the identity follows a server restarted
# under a new name or model path even when no request saw it go down.
IDENTITY_REFRESH_SECONDS = 60.0
# vLLM / SGLang sampling fields that OpenAI's schema lacks; a strict server names one when it refuses it.
EXTRA_FIELDS = ("min_tokens", "bad_words")


def normalize_base_url(base_url: str) -> str:
    """``http://host:8000`` and ``http://host:8000/v1/`` both mean the server's ``/v1``."""
    url = base_url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def error_message(payload: Any) -> str:
    """The human part of an error answer, in OpenAI's, vLLM's or FastAPI's shape; never the echoed body."""
    if isinstance(payload, str):
        return payload
    if not isinstance(payload, dict):
        return ""
    error = payload.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or "")
    if isinstance(error, str):
        return error
    detail = payload.get("detail")
    if isinstance(detail, list):
        # FastAPI / pydantic: [{"loc": ["body", "min_tokens"], "msg": "Extra inputs are not permitted"}]
        return "; ".join(f"{item.get('loc')}: {item.get('msg')}" for item in detail if isinstance(item, dict))
    return str(payload.get("message") or detail or "")


def rejects_extras(status: int, payload: Any) -> bool:
    """A 400 that names one of the sampling extras: the server does not know them (other 400s keep them)."""
    message = error_message(payload)
    return status == 400 and any(field in message for field in EXTRA_FIELDS)


def completion_body(model: str, text: str, mode: Mode, options: OptimizerOptions,
                    extras: bool = True) -> dict[str, Any]:
    """The ``/v1/completions`` request for one rewrite, with the mode's decoding settings.

    ``extras`` adds vLLM / SGLang sampling fields that OpenAI's schema lacks (``min_tokens``,
    ``bad_words``); servers that reject them get the plain body (see ``RemoteOptimizer``).
    """
    decoding = DECODING[mode]
    # The server does not tell us its token count; the estimate sizes the budget and aggressive's minimum.
    prompt_tokens = estimate_tokens(text)
    budget = token_budget(prompt_tokens, options.max_new_tokens)
    body: dict[str, Any] = {
        "model": model,
        "prompt": build_prompt(text),
        "max_tokens": budget,
        "temperature": decoding.temperature,
        "top_p": decoding.top_p,
        "n": 1,
        "stream": False,
    }
    if options.seed is not None:
        body["seed"] = options.seed
    if decoding.stop_at_newline:
        body["stop"] = ["\n"]
    minimum = min_new_tokens(prompt_tokens, mode)
    if extras and minimum is not None:
        # Below the budget, or the server could only stop on it; a prompt too long for both is never sent.
        body["min_tokens"] = min(minimum, budget - 1)
        body["bad_words"] = list(BANNED_STRINGS)
    return body


def hopeless(text: str, mode: Mode, cap: int) -> bool:
    """Aggressive mode's minimum does not fit under the cap: the rewrite could only end cut, so skip it."""
    minimum = min_new_tokens(estimate_tokens(text), mode)
    return minimum is not None and minimum >= token_budget(estimate_tokens(text), cap)


class RemoteOptimizer:
    """Rewrites through an OpenAI-compatible completions server with one pooled aiohttp session.

    ``start()`` returns at once; a background probe discovers the model from ``/v1/models`` (or checks the
    configured one) and keeps probing while the server is unreachable. A connection failure during
    serving flips the status to ``failed`` and restarts the probe, so ``/readyz`` tells the truth. While
    serving, the probe runs again every ``identity_refresh`` seconds and on a 404 (the model went away).
    """

    def __init__(self, base_url: str, options: OptimizerOptions, *,
                 startup_grace: float = STARTUP_GRACE_SECONDS,
                 identity_refresh: float = IDENTITY_REFRESH_SECONDS) -> None:
        # Credentials in the URL become Basic auth (unless an API key is set); the URL without them is the
        # only one ever shown: identity, /readyz, logs, errors.
        url, self._basic_auth = without_credentials(URL(normalize_base_url(base_url)))
        self._url = str(url)
        self.base_url = redact_url(self._url)
        self.options = options
        self.startup_grace = startup_grace
        self.identity_refresh = identity_refresh
        self._refresh_at = 0.0
        self._model: str | None = options.remote_model
        self._identity = f"remote:{self._model or self.base_url}@pending"
        self._state: State = "loading"
        self._detail = f"probing {self.base_url}/models"
        self._extras = True
        self._session: aiohttp.ClientSession | None = None
        self._probe: asyncio.Task[None] | None = None

    @property
    def identity(self) -> str:
        return self._identity

    def status(self) -> OptimizerStatus:
        return OptimizerStatus(self._state, self._identity, self._detail)

    async def start(self) -> None:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self.options.request_timeout)
            connector = aiohttp.TCPConnector(limit=max(64, self.options.max_batch_size * 8),
                                             keepalive_timeout=60)
            self._session = aiohttp.ClientSession(timeout=timeout, connector=connector,
                                                  headers=self._headers())
        self._start_probe()

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
            self._probe = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def optimize(self, text: str, mode: Mode) -> Rewrite:
        if self._state != "ready" or self._session is None or self._model is None:
            raise OptimizerUnavailable(f"remote optimizer not ready: {self._detail}")
        if asyncio.get_running_loop().time() >= self._refresh_at:
            self._start_probe()  # in the background: this rewrite goes on under the identity known now
        identity = self._identity
        if hopeless(text, mode, self.options.max_new_tokens):
            return Rewrite("", identity, truncated=True)
        body = completion_body(self._model, text, mode, self.options, self._extras)
        payload = await self._post_completion(body)
        try:
            choice = payload["choices"][0]
            generated = str(choice["text"])
        except (KeyError, IndexError, TypeError) as exc:
            raise OptimizerError(f"{self.base_url}/completions answered without choices[0].text") from exc
        # "length": the server stopped at max_tokens, not at EOS or a stop string.
        truncated = isinstance(choice, dict) and choice.get("finish_reason") == "length"
        return Rewrite(clean_output(generated, mode), identity, truncated=truncated)

    def _headers(self) -> dict[str, str]:
        if self.options.api_key:
            return {"Authorization": f"Bearer {self.options.api_key}"}
        return {"Authorization": self._basic_auth} if self._basic_auth else {}

    async def _post_completion(self, body: dict[str, Any]) -> dict[str, Any]:
        status, payload = await self._request("POST", "/completions", body)
        if self._extras and "min_tokens" in body and rejects_extras(status, payload):
            # A strict OpenAI-compatible server refuses vLLM's sampling extras: drop them from now on. Any
            # other 400 (a prompt over the context length) says nothing about them, so they stay on.
            # Its message is not logged: an error text may quote the request, and so the prompt.
            log.warning("%s rejected min_tokens/bad_words (%d); sending plain OpenAI fields", self.base_url, status)
            self._extras = False
            body = {k: v for k, v in body.items() if k not in EXTRA_FIELDS}
            status, payload = await self._request("POST", "/completions", body)
        if status == 404:
            # The server no longer serves this name (restarted as bpo@v4): find out what it serves now.
            self._start_probe()
        if status != 200 or not isinstance(payload, dict):
            # Status only: the body of a refused rewrite may echo the prompt, and this message is logged.
            raise OptimizerError(f"{self.base_url}/completions answered {status}")
        return payload

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        """One call to the server; foreign errors become ours here."""
        assert self._session is not None
        try:
            async with self._session.request(method, self._url + path, json=body) as response:
                try:
                    payload = await response.json(content_type=None)
                except ValueError:
                    payload = (await response.text())[:200]
                return response.status, payload
        except TimeoutError as exc:
            raise OptimizerError(f"{self.base_url}{path} did not answer within "
                                 f"{self.options.request_timeout:g} s") from exc
        except aiohttp.ClientConnectionError as exc:
            self._mark_unreachable(exc)
            raise OptimizerUnavailable(f"{self.base_url} is unreachable: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise OptimizerError(f"{self.base_url}{path} failed: {exc}") from exc

    def _mark_unreachable(self, exc: Exception) -> None:
        if self._state == "ready":
            log.warning("remote optimizer %s became unreachable: %s", self.base_url, exc)
            self._set_failed(f"{self.base_url} unreachable: {exc}; retrying")
            self._start_probe()

    def _set_failed(self, detail: str) -> None:
        if self._identity.endswith("@pending"):  # never reached: say so, rather than "on its way"
            self._identity = self._identity.removesuffix("@pending") + "@failed"
        self._state, self._detail = "failed", detail

    def _start_probe(self) -> None:
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._probe_until_ready(), name="bpo-remote-probe")

    async def _probe_until_ready(self) -> None:
        loop = asyncio.get_running_loop()
        give_up_loading_at = loop.time() + self.startup_grace
        delay = PROBE_MIN_SECONDS
        while True:
            try:
                await self._discover()
                return
            except OptimizerError as exc:
                if not self.options.retry_unreachable:
                    self._set_failed(str(exc))
                    return
                # Keep "loading" through the grace period, so a server that starts with us is not reported down.
                if self._state == "loading" and loop.time() < give_up_loading_at:
                    self._detail = f"{exc}; retrying in {delay:g} s"
                else:
                    if self._state != "failed":
                        log.warning("remote optimizer not available, passing prompts through: %s", exc)
                    self._set_failed(f"{exc}; retrying in {delay:g} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, PROBE_MAX_SECONDS)

    async def _discover(self) -> None:
        status, payload = await self._request("GET", "/models")
        if status != 200 or not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
            raise OptimizerError(f"{self.base_url}/models answered {status}: {str(payload)[:200]}")
        models = {str(m.get("id")): m for m in payload["data"] if isinstance(m, dict) and m.get("id")}
        model = self.options.remote_model or next(iter(models), None)
        if model is None:
            raise OptimizerError(f"{self.base_url}/models lists no model")
        if model not in models:
            raise OptimizerError(f"{self.base_url} does not serve {model!r} (it serves: {', '.join(models)})")
        identity = remote_identity(model, models[model])
        if identity != self._identity:
            log.info("remote optimizer ready: %s (was %s)", identity, self._identity)
        self._model, self._identity = model, identity
        self._state, self._detail = "ready", f"serving {model} from {self.base_url}"
        self._refresh_at = asyncio.get_running_loop().time() + self.identity_refresh
