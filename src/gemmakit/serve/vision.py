"""Chat completions with images and audio for models with media towers (PaliGemma, Gemma 3,
Gemma 3n, Gemma 4).

A request's media are decoded and checked when it arrives (:meth:`VisionRunner.prepare`), then
run through the towers once on a worker thread (:meth:`VisionRunner.media`); the request goes to
the batching engine with those embeddings (:class:`~gemmakit.models.multimodal.PromptMedia`),
where it shares the batch with text requests and every sampling option applies.

Images arrive as OpenAI ``image_url`` content parts holding ``data:`` URIs; the server has no
network, so remote URLs are refused. Everything (URI, base64, image bytes, placeholders, length)
is checked before the request is accepted, so bad input is an HTTP 400 and never a failed stream.

Audio arrives as OpenAI ``input_audio`` parts (base64 ``data`` and a ``format``) for a Gemma 4
or Gemma 3n checkpoint with its audio tower; each becomes the model's audio marker (``<|audio|>``,
``<audio_soft_token>``) where it stood in its turn, and its clip is decoded (and checked) with the
images.
"""

from __future__ import annotations

import base64
import binascii
import threading
from typing import Any

from gemmakit.chat import render_chat
from gemmakit.engine.scheduler import Event, Request
from gemmakit.models.multimodal import ImagePrompt, PromptMedia
from gemmakit.serve.errors import FieldError
from gemmakit.serve.schemas import AudioPart, ImagePart, Message, VideoPart, chat_dicts
from gemmakit.vision.generate import prepare_vision
from gemmakit.vision.preprocess import load_image


def decode_data_uri(url: Any, kind: str = "image", example: str = "image/png") -> bytes:
    """The bytes of a ``data:[<mime>][;base64],<data>`` URI holding a readable image (or, with
    ``kind="video"``, a video)."""
    if not isinstance(url, str) or not url:
        raise FieldError(f"a {kind}_url part needs a 'url' string (a data: URI)", "messages")
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0] if ":" in url else "a bare path"
        raise FieldError(f"only data: URIs are accepted for {kind}s (got {scheme}); this server has no network "
                         f"access, so send the {kind} inline as data:{example};base64,...", "messages",
                         f"invalid_{kind}_url")
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise FieldError(f"the {kind} data: URI has no ',' before its data", "messages", f"invalid_{kind}_url")
    if not header.endswith(";base64"):
        raise FieldError(f"the {kind} data: URI must be base64-encoded (data:{kind}/...;base64,...)", "messages",
                         f"invalid_{kind}_url")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(f"the {kind} data: URI holds invalid base64", "messages", f"invalid_{kind}") from None
    try:  # decode now: bytes of something else are a 400 before any model work
        if kind == "video":
            from gemmakit.vision.video import probe_video

            probe_video(data)
        else:
            load_image(data)
    except Exception as exc:  # InvalidRequestError from Pillow's or FFmpeg's failures
        raise FieldError(f"the {kind} cannot be read: {exc}", "messages", f"invalid_{kind}") from None
    return data


AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "opus", "aiff")  # what libsndfile (audio/io.py) reads


class AudioClip(bytes):
    """A decoded ``input_audio`` clip among a request's media, told apart from image bytes by its type."""


class VideoClip(bytes):
    """A ``video_url`` part's video among a request's media."""


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


def vision_chat(messages: list[Message], layout: str, audio_marker: str | None = None,
                video_marker: str | None = None) -> tuple[list[dict[str, Any]], list[bytes]]:
    """``messages`` for render_chat plus the decoded images and clips (:class:`AudioClip`), in the
    order they appear.

    Gemma 3 marks each image inside its turn with ``<start_of_image>`` (render_chat's ``image``
    part); PaliGemma takes its images before the whole prompt, so its parts leave no marker, as in
    ``gemmakit chat``. A clip becomes ``audio_marker`` and a video ``video_marker`` (None: the
    model takes none).
    """
    images: list[bytes] = []

    def take(part: ImagePart | AudioPart | VideoPart) -> dict | None:
        if isinstance(part, VideoPart):
            if video_marker is None:
                raise FieldError("this model does not accept video (it needs a Gemma 4 checkpoint with its "
                                 "vision tower)", "messages")
            images.append(VideoClip(decode_data_uri(part.url, "video", "video/mp4")))
            return {"type": "text", "text": video_marker}
        if isinstance(part, AudioPart):
            if audio_marker is None:
                raise FieldError("this model does not accept audio (it needs a Gemma 4 or Gemma 3n checkpoint "
                                 "with its audio tower)", "messages")
            images.append(decode_audio(part))
            return {"type": "text", "text": audio_marker}
        images.append(decode_data_uri(part.url))
        return {"type": "image"} if layout == "gemma3" else None

    return chat_dicts(messages, take), images


class VisionRunner:
    """Prepares a media model's chat requests for the batching engine: renders and checks them,
    and runs their media through the towers (one request's at a time: the lock bounds the memory
    of the towers' activations)."""

    def __init__(self, model, tokenizer, engine=None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.engine = engine
        self.layout = model.config.layout
        self.audio_marker = model.audio_marker(tokenizer) if tokenizer is not None else None
        self.video_marker = model.video_marker(tokenizer) if tokenizer is not None else None
        self.context = model.config.max_position_embeddings
        self._lock = threading.Lock()

    def prepare(self, messages: list[Message], plan=None) -> tuple[ImagePrompt | None, list[int]]:
        """``(the model bound to the request's media, or None without media; prompt ids)`` of a chat
        request's messages (``plan`` its tools and template variables, a ChatPlan; None for
        /tokenize). The media are decoded and preprocessed here, once; raises
        FieldError/GemmakitError for bad input."""
        chat, media = vision_chat(messages, self.layout, self.audio_marker, self.video_marker)
        prompt = plan.render(chat, self.tokenizer) if plan is not None else render_chat(chat, tokenizer=self.tokenizer)
        bound, ids, _ = prepare_vision(self.model, self.tokenizer, prompt, *_split(media))
        if not isinstance(ids, list):  # text only (Gemma 3): its text decoder reads the prompt
            ids = self.tokenizer.encode(ids, add_bos=True)
        if len(ids) >= self.context:
            raise FieldError(f"the prompt has {len(ids)} tokens but the model's context is {self.context} tokens",
                             "messages", "context_length_exceeded")
        return (bound if media else None), ids

    def media(self, bound: ImagePrompt, ids: list[int]) -> PromptMedia:
        """The embeddings of a prepared prompt with its media (the towers run here, one request at a time)."""
        with self._lock:
            return bound.prompt_media(ids)

    def transcribe(self, prompt: str, clip: bytes, max_tokens: int) -> str:
        """The greedy reply to ``prompt`` (which marks the clip with :attr:`audio_marker`), from the batching engine."""
        bound, ids, _ = prepare_vision(self.model, self.tokenizer, prompt, None, False, [clip])
        request = Request(prompt_ids=tuple(ids), max_tokens=max_tokens, media=self.media(bound, ids))
        pieces: list[str] = []
        done = threading.Event()
        failure: list[str] = []

        def on_event(ev: Event) -> None:
            pieces.append(ev.text)
            if ev.finish_reason is not None:
                if ev.finish_reason == "error":
                    failure.append(ev.error or "the generation failed")
                done.set()

        self.engine.submit(request, on_event)
        done.wait()
        if failure:
            raise RuntimeError(failure[0])
        return "".join(pieces)


def _split(media: list[bytes]) -> tuple[list[bytes] | None, bool, list[bytes] | None, list[bytes] | None]:
    """prepare_vision's ``images``, ``pan_and_scan``, ``audio`` and ``videos`` from a request's media."""
    images = [m for m in media if not isinstance(m, (AudioClip, VideoClip))]
    audio = [bytes(m) for m in media if isinstance(m, AudioClip)]
    videos = [bytes(m) for m in media if isinstance(m, VideoClip)]
    return images or None, False, audio or None, videos or None
