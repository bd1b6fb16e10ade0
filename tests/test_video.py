"""Video files for Gemma 4: decoded by PyAV (gemmakit.vision.video), against transformers' own PyAV
reader and Gemma4VideoProcessor on the same file, then through the whole tiny model
(test_gemma4_vision.py's), the CLI's --video, the batching engine and the server's video_url parts.

The files are MP4s (H.264) written by PyAV from drawn frames whose shapes move a little each frame.
"""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")
transformers = pytest.importorskip("transformers")

from test_gemma4_vision import BOI, EOI, IMAGE, VIDEO, _tokenizer, _video, pair, picture  # noqa: E402,F401 (pair)

import gemmakit  # noqa: E402
from gemmakit.errors import InvalidRequestError  # noqa: E402
from gemmakit.vision.video import load_video  # noqa: E402


def write_mp4(path, frames: np.ndarray, fps: int):
    """``frames [T, H, W, 3]`` uint8 as an H.264 MP4 at ``fps``."""
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 4-frame MP4 at 2 fps (short enough for the tiny model's 512 positions at 70 tokens a frame)."""
    return write_mp4(tmp_path_factory.mktemp("video") / "clip.mp4", _video(4, (64, 48)), fps=2)


def test_frames_equal_transformers_pyav_reader(tmp_path):
    from transformers.video_utils import load_video as hf_load_video

    path = write_mp4(tmp_path / "long.mp4", _video(20, (96, 64)), fps=6)
    frames, times = load_video(path, num_frames=5)
    theirs, metadata = hf_load_video(str(path), num_frames=5, backend="pyav")
    assert frames.dtype == np.uint8 and np.array_equal(frames, theirs)
    assert times == [i / metadata.fps for i in metadata.frames_indices] and metadata.fps == 6
    again, _ = load_video(path.read_bytes(), num_frames=5)  # the file's bytes, as the server has them
    assert np.array_equal(again, frames)
    assert len(load_video(path, num_frames=None)[0]) == 20  # None: every frame


def _processed(path):
    """Gemma4VideoProcessor's tensors for the file, decoded by transformers' PyAV reader (the
    processor's own fetch wants torchcodec)."""
    from transformers.models.gemma4.video_processing_gemma4 import Gemma4VideoProcessor
    from transformers.video_utils import load_video as hf_load_video

    frames, metadata = hf_load_video(str(path), backend="pyav")
    # (transformers refuses a video shorter than num_frames, where gemmakit takes all its frames)
    n = min(32, metadata.total_num_frames)
    return Gemma4VideoProcessor(num_frames=n)([frames], video_metadata=[metadata], return_tensors="pt")


def test_file_inputs_equal_the_video_processor(clip):
    from gemmakit.vision.gemma4_preprocess import video_inputs

    pytest.importorskip("torchvision")  # the processor resizes with torchvision
    theirs = _processed(clip)
    pixels, positions, tokens, times = video_inputs(str(clip))
    assert (pixels - theirs["pixel_values_videos"]).abs().max() <= 1e-6
    assert torch.equal(positions, theirs["video_position_ids"].long())
    assert tokens == theirs["num_soft_tokens_per_video"][0] and times == [0.0, 0.5, 1.0, 1.5]


def test_logits_with_a_video_file_match_transformers(pair, clip):
    from gemmakit.vision.gemma4_preprocess import build_video_prompt
    from gemmakit.vision.generate import prepare_vision

    pytest.importorskip("torchvision")
    hf, ours, _ = pair
    tokenizer = _tokenizer()
    bound, ids, _ = prepare_vision(ours, tokenizer, "<|image|> then <|video|> so", [picture(1, (50, 70))],
                                   videos=[clip])
    theirs = _processed(clip)
    per_frame = int(theirs["num_soft_tokens_per_video"][0])
    assert ids == build_video_prompt(ours.config, tokenizer, "<|image|> then <|video|> so",
                                     [(per_frame, [0.0, 0.5, 1.0, 1.5])], [ids.count(IMAGE)])
    input_ids = torch.tensor([ids])
    types = (input_ids == IMAGE).long() + 2 * (input_ids == VIDEO).long()
    with torch.no_grad():
        expected = hf(input_ids=input_ids, pixel_values=bound.pixel_values, image_position_ids=bound.image_positions,
                      pixel_values_videos=theirs["pixel_values_videos"], video_position_ids=theirs["video_position_ids"],
                      num_frames_per_video=torch.tensor([4]), mm_token_type_ids=types).logits
        got = bound(input_ids)
    assert (got - expected).abs().max() <= 1e-4


def test_bad_videos_are_one_line_errors(pair, tmp_path):
    from gemmakit.vision.generate import prepare_vision

    _, ours, _ = pair
    tokenizer = _tokenizer()
    (tmp_path / "not.mp4").write_bytes(b"no video in here")
    for source, words in ((tmp_path / "not.mp4", "cannot read video file"), (tmp_path / "missing.mp4", "no such file"),
                          (b"\x00" * 64, "cannot read video bytes")):
        with pytest.raises(InvalidRequestError, match=words):
            prepare_vision(ours, tokenizer, "what", None, videos=[source])


def test_cli_generate_with_a_video(pair, clip, capsys, tmp_path):
    import json

    from gemmakit.cli import main

    _, ours, path = pair
    assert main(["generate", "--model", str(path), "--video", str(clip), "--json", "-n", "3", "describe"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 3 and out["prompt_ids"].count(BOI) == 4 == out["prompt_ids"].count(EOI)
    (tmp_path / "bad.mp4").write_bytes(b"junk")
    assert main(["generate", "--model", str(path), "--video", str(tmp_path / "bad.mp4"), "describe"]) != 0
    assert "cannot read video file" in capsys.readouterr().err


def test_video_requests_batched_equal_one_at_a_time(pair, clip, tmp_path):
    from test_engine_media import batched

    from gemmakit.api import stream_generation
    from gemmakit.engine.sampling import SamplingParams
    from gemmakit.engine.scheduler import Request
    from gemmakit.vision.generate import prepare_vision

    _, ours, _ = pair
    tokenizer = _tokenizer()
    other = write_mp4(tmp_path / "other.mp4", _video(3, (48, 64))[::-1].copy(), fps=3)
    cases = [("<|video|> what happens", [clip]), ("plain", None), ("and <|video|>?", [other])]

    def alone(prompt, videos):
        result = None
        for _, result in stream_generation(ours, tokenizer, prompt, max_tokens=5, videos=videos,
                                           stop_ids=frozenset()):
            pass
        return result.token_ids

    expected = [alone(p, v) for p, v in cases]
    requests = []
    for prompt, videos in cases:
        bound, ids, _ = prepare_vision(ours, tokenizer, prompt, None, videos=videos)
        ids = ids if videos else tokenizer.encode(prompt, add_bos=True)
        requests.append(Request(prompt_ids=tuple(ids), max_tokens=5, stop_ids=frozenset(), params=SamplingParams(),
                                media=bound.prompt_media(ids) if videos else None))
    assert batched(ours, tokenizer, requests, chunk=16) == expected


def test_served_video_url_equals_the_plain_api(pair, clip):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from live_server import live_server

    from gemmakit.api import stream_generation
    from gemmakit.chat import render_chat
    from gemmakit.serve import build_app

    _, ours, _ = pair
    tokenizer = _tokenizer()
    data = clip.read_bytes()
    prompt = render_chat([{"role": "user", "content": "<|video|>what happens"}])
    result = None
    for _, result in stream_generation(ours, tokenizer, prompt, max_tokens=4, videos=[data], stop_ids=frozenset()):
        pass

    def messages(url):
        return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                             {"type": "text", "text": "what happens"}]}]

    uri = "data:video/mp4;base64," + base64.b64encode(data).decode()
    with live_server(build_app(ours, tokenizer, "gemma4", max_batch=2)) as base:
        url = f"{base}/v1/chat/completions"
        reply = httpx.post(url, timeout=60, json={"max_tokens": 4, "temperature": 0, "ignore_eos": True,
                                                  "messages": messages(uri)}).json()
        assert reply["usage"]["prompt_tokens"] == len(result.prompt_ids)
        assert reply["choices"][0]["message"]["content"] == result.text
        for bad in ("data:video/mp4;base64," + base64.b64encode(b"not a video").decode(),
                    "https://example.com/v.mp4", "data:video/mp4;base64,@@@"):
            r = httpx.post(url, timeout=60, json={"max_tokens": 2, "messages": messages(bad)})
            assert r.status_code == 400 and r.json()["error"]["message"], bad


def test_chat_attaches_a_video(pair, clip, capsys, monkeypatch, tmp_path):
    """`/video FILE` marks the next message; the reply is the plain API's for the rendered history."""
    import io

    from gemmakit.api import stream_generation
    from gemmakit.chat import render_chat
    from gemmakit.cli import main

    _, ours, path = pair
    (tmp_path / "bad.mp4").write_bytes(b"junk")
    script = f"/video {tmp_path / 'bad.mp4'}\n/video {clip}\nwhat happens\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    assert main(["chat", "--model", str(path), "-n", "3"]) == 0
    captured = capsys.readouterr()
    assert "cannot read video file" in captured.err and f"(video attached: {clip})" in captured.err
    assert "Traceback" not in captured.err
    tokenizer = _tokenizer()
    prompt = render_chat([{"role": "user", "content": "<|video|>what happens"}], tokenizer=tokenizer)
    expected = "".join(p for p, _ in stream_generation(ours, tokenizer, prompt, max_tokens=3, videos=[clip]))
    assert captured.out == expected + "\n"
