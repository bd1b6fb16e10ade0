"""``gemmakit info``: architecture, parameters and memory of a model or preset."""

from __future__ import annotations

import json

from gemmakit.cli.common import EPILOG, add_matformer_arg


def add_parser(sub) -> None:
    i = sub.add_parser("info", help="architecture, parameters and memory of a model or preset", epilog=EPILOG)
    i.add_argument("--model", "-m", metavar="SRC", default=None,
                   help="a .gguf file, checkpoint directory or preset name (see --list)")
    i.add_argument("--context", type=int, default=None, help="context length for the KV-cache figure "
                                                              "(default: the model's maximum)")
    add_matformer_arg(i)
    i.add_argument("--list", action="store_true", help="list the preset names")
    i.add_argument("--all-presets", action="store_true",
                   help="a table of weights + KV-cache memory for every preset (bf16, int8, int4)")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=run)


def run(args) -> int:
    from gemmakit.info import describe, format_report, preset_table
    from gemmakit.models.config import PRESETS
    from gemmakit.models.multimodal import VISION_PRESETS

    if args.list:
        print("\n".join(sorted([*PRESETS, *VISION_PRESETS])))
        return 0
    if args.all_presets:
        print(preset_table(args.context))
        return 0
    report = describe(args.model, args.context, matformer=args.matformer)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
