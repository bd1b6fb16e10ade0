"""Prompt layouts with images: where the image placeholder tokens go.

* PaliGemma: every image's tokens first, then ``<bos>``, the prefix text and a newline
  (the model then writes the suffix). The text may not contain image markers.
* Gemma 3: the text marks each image with ``<start_of_image>`` (as the chat template does), which
  expands to ``\\n\\n<start_of_image>`` + 256 x ``<image_soft_token>`` + ``<end_of_image>\\n\\n``. A prompt
  without any marker gets one per image at its start. With pan & scan an image is followed by its
  crops, each a full image sequence, in the reference processor's wording.
* Gemma 3n: Gemma 3's layout for images; the audio token's piece (``<audio_soft_token>``) marks each
  clip and expands to ``\\n\\n<start_of_audio>`` + 188 x ``<audio_soft_token>`` + ``<end_of_audio>\\n\\n``
  (processing_gemma3n.py). A prompt without any marker gets one per clip at its start.
"""

from __future__ import annotations

from gemmakit.errors import InvalidRequestError, TokenizerError

GEMMA3_MARKER = "<start_of_image>"


def build_prompt(config, tokenizer, text: str, crops_per_image: list[int], clips: int = 0) -> list[int]:
    """Token ids of ``text`` with image placeholders for ``len(crops_per_image)`` images and audio
    placeholders for ``clips`` clips (Gemma 3n)."""
    num_images = len(crops_per_image)
    image_piece = _piece(tokenizer, config.image_token_id)
    if clips:
        text = _expand_audio(config, tokenizer, text, clips)
    if config.layout == "paligemma":
        if image_piece in text:
            raise InvalidRequestError(f"PaliGemma places the images itself; remove {image_piece} from the prompt")
        total = num_images + sum(crops_per_image)
        ids = [config.image_token_id] * (config.tokens_per_image * total)
        ids += tokenizer.encode(text + "\n", add_bos=True)
    else:
        boi, eoi = _piece(tokenizer, config.boi_token_id), _piece(tokenizer, config.eoi_token_id)
        markers = text.count(boi)
        if markers == 0:
            text = boi * num_images + text
        elif markers != num_images:
            raise InvalidRequestError(
                f"the prompt marks {markers} image(s) with {boi} but {num_images} image(s) were given")
        sequence = f"\n\n{boi}{image_piece * config.tokens_per_image}{eoi}\n\n"
        pieces = text.split(boi)
        out = [pieces[0]]
        for crops, rest in zip(crops_per_image, pieces[1:]):
            if crops:
                out.append(f"Here is the original image {sequence} and here are some crops to help you see better "
                           + " ".join([sequence] * crops))
            else:
                out.append(sequence)
            out.append(rest)
        ids = tokenizer.encode("".join(out), add_bos=True)
    expected = config.tokens_per_image * (num_images + sum(crops_per_image))
    if ids.count(config.image_token_id) != expected:
        raise TokenizerError(f"the tokenizer does not encode {image_piece!r} as the image token "
                             f"{config.image_token_id}; is this the model's own tokenizer?")
    if clips and ids.count(config.audio_token_id) != clips * config.audio.soft_tokens:
        raise TokenizerError(f"the tokenizer does not encode the audio token's piece as {config.audio_token_id}; "
                             "is this the model's own tokenizer?")
    return ids


def _expand_audio(config, tokenizer, text: str, clips: int) -> str:
    """``text`` with each audio marker replaced by its clip's whole placeholder sequence."""
    if config.audio_token_id is None:
        raise InvalidRequestError("this model takes no audio")
    audio = _piece(tokenizer, config.audio_token_id)
    markers = text.count(audio)
    if markers == 0:
        text = audio * clips + text
    elif markers != clips:
        raise InvalidRequestError(f"the prompt marks {markers} audio clip(s) with {audio} but {clips} were given")
    boa, eoa = _piece(tokenizer, config.boa_token_id), _piece(tokenizer, config.eoa_token_id)
    return text.replace(audio, f"\n\n{boa}{audio * config.audio.soft_tokens}{eoa}\n\n")


def _piece(tokenizer, token_id: int | None) -> str:
    if token_id is None:
        raise InvalidRequestError("this model's config names no image marker token")
    try:
        return tokenizer.id_to_piece(token_id)
    except Exception:
        raise TokenizerError(f"the tokenizer has no token {token_id} (the model's image token)") from None
