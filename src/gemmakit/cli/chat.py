"""``gemmakit chat``: an interactive multi-turn chat in Gemma's turn format."""

from __future__ import annotations

import sys

from gemmakit.cli.common import (
    EPILOG, add_decode_args, add_mmproj_args, add_model_args, add_sampling_args, load_model, print_error,
    sampling_kwargs, tokenizer_missing,
)
from gemmakit.errors import GemmakitError


def add_parser(sub) -> None:
    c = sub.add_parser("chat", help="interactive multi-turn chat", epilog=EPILOG,
                       description="Chat with a model in Gemma's turn format. /reset clears the history, "
                                   "/image PATH attaches an image to your next message (vision models), "
                                   "/exit (or Ctrl-D) quits.")
    add_model_args(c)
    add_sampling_args(c)
    c.add_argument("--system", default=None, help="a system message (Gemma 1-3: folded into the first user turn)")
    c.add_argument("--think", nargs="?", const="show", choices=["show", "hide"], default=None,
                   help="Gemma 4: let the model reason before it answers; its thoughts are shown dimmed "
                        "(show, the default; on stderr when stdout is not a terminal) or not at all (hide)")
    c.add_argument("--adapter", metavar="DIR", default=None, help="a LoRA adapter directory (PEFT layout) to apply")
    c.add_argument("--pan-and-scan", action="store_true", help="Gemma 3 vision: add crops of wide/tall images")
    add_decode_args(c)
    add_mmproj_args(c)
    c.set_defaults(func=run, max_tokens=512)


def run(args) -> int:
    from gemmakit.api import require_generative, settle_for_serving, stream_generation
    from gemmakit.chat import pretrained_warning, render_chat
    from gemmakit.chat.thinking import ThoughtSplitter
    from gemmakit.cli.attachments import chat_audio, chat_videos
    from gemmakit.vision.chat import ChatImages

    model, tokenizer, report = load_model(args)
    require_generative(model)
    if tokenizer is None:
        raise tokenizer_missing(args.model)
    if warning := pretrained_warning(tokenizer, report.source):
        print(warning, file=sys.stderr)
    settle_for_serving(model)  # a chat waits for its user anyway: no reply pays the huge-page copy
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    images = ChatImages(model)
    clips, videos = chat_audio(model, tokenizer), chat_videos(model, tokenizer)
    interactive = sys.stdin.isatty()
    if interactive:
        print("gemmakit chat: /reset clears the history, /image PATH attaches an image, /audio FILE a clip, "
              "/video FILE a video, /exit or Ctrl-D quits.",
              file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = history[:1] if args.system else []
            images.reset()
            clips.reset()
            videos.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        if text.startswith("/image"):
            try:
                print(images.attach(text[len("/image"):].strip()), file=sys.stderr)
            except GemmakitError as exc:  # a bad image costs the user nothing but this line
                print_error(exc)
            continue
        attachments = next((a for a in (clips, videos) if text.startswith("/" + a.command)), None)
        if attachments is not None:
            try:
                print(attachments.attach(text[len(attachments.command) + 1:].strip()), file=sys.stderr)
            except GemmakitError as exc:  # so does a bad clip or video
                print_error(exc)
            continue
        history.append({"role": "user", "content": videos.mark(clips.mark(images.mark(text)))})
        prompt = render_chat(history, tokenizer=tokenizer, enable_thinking=args.think is not None)
        splitter = ThoughtSplitter()
        pieces = stream_generation(model, tokenizer, prompt, images=images.all() or None, audio=clips.all() or None,
                                   videos=videos.all() or None, pan_and_scan=args.pan_and_scan,
                                   **sampling_kwargs(args))
        for piece, _ in pieces:
            _show(splitter.push(piece), args.think)
        _show(splitter.flush(), args.think)
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": splitter.answer})  # the template drops thoughts anyway
    return 0


def _show(events: list[tuple[str, str]], think: str | None) -> None:
    """Write a reply's answer to stdout and its thoughts, unless hidden, dimmed (or to stderr when
    stdout is not a terminal, so that stdout carries the answer alone)."""
    for kind, text in events:
        if kind == "answer":
            sys.stdout.write(text)
        elif think != "hide":
            if sys.stdout.isatty():
                sys.stdout.write(f"\x1b[2m{text}\x1b[0m")
            else:
                sys.stderr.write(text)
    sys.stdout.flush()
