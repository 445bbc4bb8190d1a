"""Export weights as .safetensors, the format model hubs expect, with this project's meta as the file's metadata.

    python export.py model_weights/resnet50_loraprune.pth      # -> model_weights/resnet50_loraprune.safetensors
    python export.py my_state_dict.pth --arch vit --out vit_original.safetensors

Reads whatever evaluate.py reads (this project's checkpoints, plain or wrapped state dicts, .safetensors); --arch,
--preset and --dataset describe a file without this project's meta, and the exported file carries them. Every input is
loaded into its model first, so an export always fits its arch; nothing is written unless every input loads.
evaluate.py and every script's --weights read the export back, meta included.
"""
from pathlib import Path

import common


def main(argv=None):
    parser = common.make_parser(__doc__)
    parser.add_argument("checkpoints", nargs="+", metavar="PATH", help="weights to export (.pth or .safetensors)")
    common.add_described_arguments(parser)
    parser.add_argument("--out", help="file to write, for a single PATH (default: PATH with the suffix .safetensors)")
    args = parser.parse_args(argv)
    if args.out and len(args.checkpoints) > 1:
        raise common.UserError("--out names one file: export several checkpoints without it")
    outs = [Path(args.out) if args.out else Path(path).with_suffix(common.SAFETENSORS_SUFFIX)
            for path in args.checkpoints]
    for path, out in zip(args.checkpoints, outs, strict=True):
        if out.suffix != common.SAFETENSORS_SUFFIX:
            raise common.UserError(f"{out}: an export is a {common.SAFETENSORS_SUFFIX} file")
        if out.exists() and out.resolve() == Path(path).resolve():
            raise common.UserError(f"{path} is a {common.SAFETENSORS_SUFFIX} file already: pass --out for a copy")
        common.check_writable(out, "--out" if args.out else "output")
    if len(set(outs)) < len(outs):
        raise common.UserError("two checkpoints would be exported to the same file: export them one by one with --out")
    described = common.described_by(args)
    models = [common.load_checkpoint(path, "cpu", **described) for path in args.checkpoints]
    for (model, meta), out in zip(models, outs, strict=True):
        common.save_checkpoint(out, model, meta)
        print(f"{meta.get('method') or 'weights'} ({meta['arch']}, {meta['preset']} preset) -> {out}")
    return outs


if __name__ == "__main__":
    common.cli(main)
