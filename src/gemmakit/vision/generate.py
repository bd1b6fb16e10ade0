"""Turn a generate request with images into what the text engine runs: ids + a bound model."""

from __future__ import annotations

from gemmakit.errors import InvalidRequestError, TokenizerError
from gemmakit.models.gemma4_vision import Gemma4VisionLanguageModel
from gemmakit.models.multimodal import ImagePrompt, VisionLanguageModel
from gemmakit.vision.prompt import build_prompt


def prepare_vision(model, tokenizer, prompt, images, pan_and_scan: bool = False, audio=None, videos=None):
    """``(model_for_engine, prompt, engine_kwargs)`` for a request; text-only requests pass through.

    Every check (model kind, image files, placeholder counts, context length) happens here, before
    the engine starts, so bad input never fails half-way through a generation.
    """
    if isinstance(model, Gemma4VisionLanguageModel):  # its own encoder, processor and prompt layout
        from gemmakit.vision.gemma4_preprocess import prepare

        return prepare(model, tokenizer, prompt, images, pan_and_scan, audio, videos)
    if videos:
        raise InvalidRequestError("video needs a Gemma 4 model with its vision tower")
    is_vlm = isinstance(model, VisionLanguageModel)
    if audio and getattr(model, "audio_tower", None) is None:
        raise InvalidRequestError("this model has no audio tower; audio needs a Gemma 4 or Gemma 3n checkpoint "
                                  "with one")
    if not images and not audio:
        if pan_and_scan:
            raise InvalidRequestError("pan & scan needs an image")
        if not is_vlm:
            return model, prompt, {}
        if model.config.layout == "paligemma":
            raise InvalidRequestError("PaliGemma answers about an image: pass one (--image PATH / images=[...])")
        return model.decoder, prompt, {}  # Gemma 3 without images is its text decoder
    if not is_vlm:
        raise InvalidRequestError("this is a text-only model; images need a vision model "
                                  "(PaliGemma, PaliGemma 2, or Gemma 3 4B/12B/27B with its vision tower: a GGUF "
                                  "needs its mmproj file, --mmproj FILE / mmproj=...)")
    if not isinstance(prompt, str):
        raise InvalidRequestError("a prompt with images must be text (image tokens are placed for you)")
    if tokenizer is None:
        raise TokenizerError("this model has no tokenizer; a prompt with images needs one")
    if pan_and_scan and not model.config.pan_and_scan:
        raise InvalidRequestError("pan & scan is a Gemma 3 option; PaliGemma and Gemma 3n see one fixed-size view")
    pixel_values, crops, features, mask = None, [], None, None
    if images:
        from gemmakit.vision.preprocess import preprocess, spec_for  # PIL, tens of ms: only requests with images

        pixel_values, crops = preprocess(list(images), spec_for(model.config), pan_and_scan)
        pixel_values = pixel_values.to(model.dtype)
    if audio:
        from gemmakit.audio.prompt import audio_inputs

        features, mask, _ = audio_inputs(list(audio), num_mel_bins=model.config.audio.num_mel_bins,
                                         tokens_per_clip=model.config.audio.soft_tokens)
    ids = build_prompt(model.config, tokenizer, prompt, crops, len(audio or ()))
    context = model.config.max_position_embeddings
    if len(ids) >= context:
        raise InvalidRequestError(f"the prompt with its media is {len(ids)} tokens; the model's context is {context}")
    bound = ImagePrompt(model, pixel_values, features, mask)
    return bound, ids, {"prefill_chunk": len(ids)}
