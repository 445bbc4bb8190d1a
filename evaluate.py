"""Evaluate checkpoints: UA, RA, TA, MIA-efficacy, plus the RTE and peak GPU memory recorded at training.

    python evaluate.py model_weights/resnet50_*.pth --json results/eval.json
    python evaluate.py model_weights/resnet50_lora.pth --probe --cka --relearn
    python evaluate.py my_resnet50_state_dict.pth --arch resnet50   # weights saved elsewhere

UA = 100 - accuracy on the forget set; RA = accuracy on the retain set; TA = accuracy on the test set
without the forgotten classes; MIA-efficacy = share of forget samples that Unlearn-Sparse's SVC
membership-inference attack calls non-members. All in percent. Arch, dataset (read from --data in its
standard layout), forget setting and the seed of the MIA's samples come from each checkpoint's meta (the original
model, which has no forget setting, is scored on class 3 unless --forget-* is given; --seed overrides the MIA seed).
Weights from elsewhere (a plain or wrapped state dict, DataParallel/DDP or torch.compile prefixes, .safetensors)
load too; --arch, --preset and --dataset describe a file without this project's meta, whose own meta always wins.
--probe, --cka and --relearn add representation-level metrics (unlearning/representation.py): whether the features
still know the forgotten data, however the outputs look. They draw their samples with the same seed.
"""
import common
from unlearning import representation


def main(argv=None):
    parser = common.make_parser(__doc__)
    parser.add_argument("checkpoints", nargs="+", metavar="PATH",
                        help="checkpoints of this project's scripts, or weights from elsewhere (.pth, .safetensors)")
    common.add_described_arguments(parser)
    common.add_dataset_arguments(parser, dataset=False)
    common.add_forget_arguments(parser)
    parser.add_argument("--seed", type=common.seed_int,
                        help="seed of the MIA's member/non-member samples and of the probe's, CKA's and "
                        "relearning's samples (default: the training seed recorded in each checkpoint)")
    common.add_device_argument(parser)
    representation.add_arguments(parser)
    parser.add_argument("--json", metavar="OUT", help="also write the results as a JSON list to OUT")
    args = parser.parse_args(argv)
    spec = common.forget_spec_from_args(args)
    options = representation.options_from_args(args)
    if args.json:
        common.check_writable(args.json, "--json")
    data_cache = {}
    described = common.described_by(args)
    rows = [representation.evaluate_checkpoint(path, args.data, args.device, spec, args.seed, data_cache,
                                               described=described, **options)
            for path in args.checkpoints]
    columns = dict(common.EVALUATE_COLUMNS)
    path_header = columns.pop("path")
    columns.update(representation.columns(options["probe"], options["cka"], options["relearn"]), path=path_header)
    columns = common.with_compile_columns(columns, rows)
    print(common.markdown_table([representation.for_table(row) for row in rows], columns))
    if args.json:
        common.write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    common.cli(main)
