"""Chat completions with images for vision models (PaliGemma, Gemma 3 multimodal).

The batching engine's per-row cache has no place for image embeddings, so a vision model's chat
requests take a simpler path: the one-request-at-a-time generation of the API and CLI
(:func:`gemmakit.api.stream_generation` with ``images=``), run in a worker thread under a lock.
Its events have the engine's shape (:class:`~gemmakit.engine.scheduler.Event` through a
:class:`~gemmakit.engine.scheduler.RequestHandle`), so the app streams and collects them with the
same code as text requests.

Images arrive as OpenAI ``image_url`` content parts holding ``data:`` URIs; the server has no
network, so remote URLs are refused. Everything (URI, base64, image bytes, placeholders, length)
is checked before the request is accepted, so bad input is an HTTP 400 and never a failed stream.

Audio arrives as OpenAI ``input_audio`` parts (base64 ``data`` and a ``format``) for a Gemma 4
checkpoint with its audio tower; each becomes the audio marker ``<|audio|>`` where it stood in its
turn, and its clip is decoded (and checked) with the images.
"""

from __future__ import annotations

import base64
import binascii
import threading
from collections.abc import Callable
from typing import Any

from gemmakit.api import generate, stream_generation
from gemmakit.chat import render_chat
from gemmakit.engine.sampling import SamplingParams
from gemmakit.engine.scheduler import Event, Request, RequestHandle
from gemmakit.engine.stopping import StopStrings
from gemmakit.serve.errors import FieldError
from gemmakit.serve.schemas import AudioPart, Common, ImagePart, Message, chat_dicts
from gemmakit.vision.generate import prepare_vision
from gemmakit.vision.preprocess import load_image


def decode_data_uri(url: Any) -> bytes:
    """The bytes of a ``data:[<mime>][;base64],<data>`` URI holding a readable image."""
    if not isinstance(url, str) or not url:
        raise FieldError("an image_url part needs a 'url' string (a data: URI)", "messages")
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0] if ":" in url else "a bare path"
        raise FieldError(f"only data: URIs are accepted for images (got {scheme}); this server has no network "
                         "access, so send the image inline as data:image/png;base64,...", "messages",
                         "invalid_image_url")
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise FieldError("the image data: URI has no ',' before its data", "messages", "invalid_image_url")
    if not header.endswith(";base64"):
        raise FieldError("the image data: URI must be base64-encoded (data:image/...;base64,...)", "messages",
                         "invalid_image_url")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise FieldError("the image data: URI holds invalid base64", "messages", "invalid_image") from None
    try:
        load_image(data)  # decode now: non-image bytes are a 400 before any model work
    except Exception as exc:  # InvalidRequestError from Pillow's failures
        raise FieldError(f"the image cannot be read: {exc}", "messages", "invalid_image") from None
    return data


AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "opus", "aiff")  # what libsndfile (audio/io.py) reads


class AudioClip(bytes):
    """A decoded ``input_audio`` clip among a request's media, told apart from image bytes by its type."""


def decode_audio(part: AudioPart) -> AudioClip:
    """The bytes of an ``input_audio`` part holding a readable clip."""
    if part.format not in AUDIO_FORMATS:
        raise FieldError(f"input_audio.format must be one of {', '.join(AUDIO_FORMATS)} (got {part.format!r})",
                         "messages", "invalid_audio")
    if not isinstance(part.data, str) or not part.data:
        raise FieldError("an input_audio part needs its 'data' as a base64 string", "messages", "invalid_audio")
    try:
        data = base64.b64decode("".join(part.data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise FieldError("the input_audio data is invalid base64", "messages", "invalid_audio") from None
    return read_clip(data, "messages")


def read_clip(data: bytes, param: str) -> AudioClip:
    """``data`` as a clip, decoded now: bytes that are no clip are a 400 before any model work."""
    from gemmakit.audio.io import load_audio

    try:
        load_audio(data)
    except Exception as exc:  # InvalidRequestError from soundfile's failures, or a missing package
        raise FieldError(f"the audio cannot be read: {exc}", param, "invalid_audio") from None
    return AudioClip(data)


def vision_chat(messages: list[Message], layout: str,
                accepts_audio: bool = False) -> tuple[list[dict[str, Any]], list[bytes]]:
    """``messages`` for render_chat plus the decoded images and clips (:class:`AudioClip`), in the
    order they appear.

    Gemma 3 marks each image inside its turn with ``<start_of_image>`` (render_chat's ``image``
    part); PaliGemma takes its images before the whole prompt, so its parts leave no marker, as in
    ``gemmakit chat``.
    """
    images: list[bytes] = []

    def take(part: ImagePart | AudioPart) -> dict | None:
        if isinstance(part, AudioPart):
            if not accepts_audio:
                raise FieldError("this model does not accept audio (it needs a Gemma 4 checkpoint with its "
                                 "audio tower)", "messages")
            images.append(decode_audio(part))
            return {"type": "text", "text": "<|audio|>"}
        images.append(decode_data_uri(part.url))
        return {"type": "image"} if layout == "gemma3" else None

    return chat_dicts(messages, take), images


class VisionRunner:
    """Runs one vision request at a time in worker threads; the lock keeps them in turn."""

    def __init__(self, model, tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.layout = model.config.layout
        self.accepts_audio = getattr(model, "audio_tower", None) is not None
        self.context = model.config.max_position_embeddings
        self._lock = threading.Lock()

    def prepare(self, messages: list[Message], common: Common | None = None, logprobs: bool = False,
                plan=None) -> tuple[str, list[bytes], list[int]]:
        """``(rendered prompt, images, prompt ids)`` of a chat request's messages (``common`` and ``logprobs``
        its other fields, ``plan`` its tools and template variables (a ChatPlan); None for /tokenize);
        raises FieldError/GemmakitError for bad input."""
        if common is not None:
            _check_supported(common, logprobs)
        chat, images = vision_chat(messages, self.layout, self.accepts_audio)
        prompt = plan.render(chat, self.tokenizer) if plan is not None else render_chat(chat, tokenizer=self.tokenizer)
        _, ids, _ = prepare_vision(self.model, self.tokenizer, prompt, *_split(images))
        if not isinstance(ids, list):  # text only (Gemma 3): its text decoder reads the prompt
            ids = self.tokenizer.encode(ids, add_bos=True)
        if len(ids) >= self.context:
            raise FieldError(f"the prompt has {len(ids)} tokens but the model's context is {self.context} tokens",
                             "messages", "context_length_exceeded")
        return prompt, images, ids

    def transcribe(self, prompt: str, clip: bytes, max_tokens: int) -> str:
        """The greedy reply to ``prompt`` (which marks the clip with ``<|audio|>``), in turn with chat requests."""
        with self._lock:
            return generate(self.model, self.tokenizer, prompt, max_tokens=max_tokens, audio=[clip])

    def submit(self, prompt: str, images: list[bytes], prompt_ids: list[int], common: Common,
               on_event: Callable[[Event], None], grammar=None) -> RequestHandle:
        request = Request(prompt_ids=tuple(prompt_ids), max_tokens=common.max_tokens, params=common.params,
                          stop=common.stop, stop_ids=frozenset() if common.ignore_eos else None, grammar=grammar)
        handle = RequestHandle(0, request, on_event)
        threading.Thread(target=self._run, args=(handle, prompt, images), daemon=True,
                         name="gemmakit-vision").start()
        return handle

    def _run(self, handle: RequestHandle, prompt: str, images: list[bytes]) -> None:
        request, emit = handle.request, handle.on_event
        stop_ids = request.stop_ids if request.stop_ids is not None else self.tokenizer.stop_ids()
        if request.grammar is not None:
            stop_ids = stop_ids | request.grammar.eos_ids
        p: SamplingParams = request.params
        stopper = StopStrings(request.stop)
        finish = "length"
        try:
            with self._lock:
                if handle.cancelled:
                    emit(Event(0, finish_reason="cancelled"))
                    return
                seen = 0
                result = None
                for piece, result in stream_generation(
                        self.model, self.tokenizer, prompt, max_tokens=request.max_tokens,
                        temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=p.seed,
                        stop_ids=stop_ids, images=_split(images)[0], audio=_split(images)[2],
                        grammar=request.grammar):
                    new = result.token_ids[seen:]
                    seen = len(result.token_ids)
                    handle.completion_tokens = seen
                    if new and new[-1] in stop_ids:
                        finish = "stop"
                    text, stopped = stopper.push(piece)
                    if text or new:
                        emit(Event(0, token_id=new[-1] if new else None, text=text))
                    if stopped:
                        finish = "stop"
                        break
                    if handle.cancelled:
                        emit(Event(0, finish_reason="cancelled"))
                        return
                if request.grammar is not None and seen < request.max_tokens:  # the output is complete
                    finish = "stop"
                tail = stopper.flush()  # empty after a stop string
                emit(Event(0, text=tail, finish_reason=finish))
        except Exception as exc:  # reported to the client as a server error, the server keeps serving
            emit(Event(0, finish_reason="error", error=f"{type(exc).__name__}: {exc}"))


def _split(media: list[bytes]) -> tuple[list[bytes] | None, bool, list[bytes] | None]:
    """prepare_vision's ``images``, ``pan_and_scan`` and ``audio`` from a request's media."""
    images = [m for m in media if not isinstance(m, AudioClip)]
    audio = [bytes(m) for m in media if isinstance(m, AudioClip)]
    return images or None, False, audio or None


def _check_supported(common: Common, logprobs: bool) -> None:
    """The simple path samples with temperature, top-k, top-p and seed only; refuse the rest loudly."""
    if common.n != 1:
        raise FieldError("this vision model's server generates one choice per request ('n' must be 1)", "n")
    if logprobs:
        raise FieldError("logprobs are not available for vision models", "logprobs")
    p, default = common.params, SamplingParams()
    for name in ("min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias"):
        if getattr(p, name) != getattr(default, name):
            raise FieldError(f"'{name}' is not supported for vision models", name)
