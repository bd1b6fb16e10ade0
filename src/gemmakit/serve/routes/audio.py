"""``POST /v1/audio/transcriptions``: OpenAI's speech-to-text route, for Gemma 4 with its audio tower.

The body is ``multipart/form-data`` with the fields ``file`` (the clip: wav, flac, mp3, ...),
``model``, and optionally ``prompt`` (earlier text to follow), ``language`` (the spoken language's
name or code, said in the instruction) and ``response_format`` (``json``: ``{"text": ...}``, or
``text``). Any other field is a 400 that names it. The model is asked, greedily, to transcribe
the clip in a user turn of its chat template; the form is parsed with the standard library's
MIME parser, so the route needs no extra package.
"""

from __future__ import annotations

import asyncio
from email.parser import BytesParser
from email.policy import HTTP

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from gemmakit.chat import render_chat
from gemmakit.serve.dependencies import State
from gemmakit.serve.errors import FieldError
from gemmakit.serve.vision import read_clip

router = APIRouter()

FIELDS = ("file", "model", "prompt", "language", "response_format")


def form_fields(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """``name -> (filename, bytes)`` of a ``multipart/form-data`` body."""
    if not content_type.startswith("multipart/form-data"):
        raise FieldError("send the request as multipart/form-data (a 'file' field with the audio)", "file")
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
                                                  + body)
    if not message.is_multipart():
        raise FieldError("the multipart/form-data body has no parts (is its boundary right?)", "file")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            raise FieldError("a form part has no name", "file")
        fields[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


def instruction(language: str | None, prompt: str | None, marker: str) -> str:
    where = f" in {language} into {language} text" if language else " into text"
    context = f"It follows: {prompt}\n" if prompt else ""
    return f"{context}Transcribe the following speech segment{where}.{marker}"


@router.post("/v1/audio/transcriptions")
async def transcriptions(request: Request, state: State):
    state.require_tokenizer()
    fields = form_fields(request.headers.get("content-type", ""), await request.body())
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise FieldError(f"unsupported field(s): {', '.join(unknown)} (this route takes {', '.join(FIELDS)})",
                         unknown[0])
    if "file" not in fields or not fields["file"][1]:
        raise FieldError("the 'file' field (the audio clip) is missing or empty", "file")
    if "model" not in fields:
        raise FieldError("the 'model' field is missing", "model")
    text = {name: value.decode("utf-8", "replace").strip() for name, (_, value) in fields.items() if name != "file"}
    response_format = text.get("response_format") or "json"
    if response_format not in ("json", "text"):
        raise FieldError(f"response_format {response_format!r} is not supported (json or text)", "response_format")
    runner = state.vision
    if runner is None or runner.audio_marker is None:
        raise FieldError("this model does not accept audio (it needs a Gemma 4 or Gemma 3n checkpoint with its "
                         "audio tower)", "file")
    clip = await asyncio.to_thread(read_clip, fields["file"][1], "file")  # libsndfile knows the format by its bytes
    prompt = render_chat([{"role": "user", "content": instruction(text.get("language"), text.get("prompt"),
                                                                             runner.audio_marker)}],
                         tokenizer=state.tokenizer)
    result = await asyncio.to_thread(runner.transcribe, prompt, bytes(clip), state.default_max_tokens)
    if response_format == "text":
        return PlainTextResponse(result)
    return {"text": result}
