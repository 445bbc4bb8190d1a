"""Evaluate checkpoints: UA, RA, TA, MIA-efficacy, plus the RTE and peak GPU memory recorded at training.

    python evaluate.py model_weights/resnet50_*.pth --json results/eval.json

UA = 100 - accuracy on the forget set; RA = accuracy on the retain set; TA = accuracy on the test set
without the forgotten classes; MIA-efficacy = share of forget samples that Unlearn-Sparse's SVC
membership-inference attack calls non-members. All in percent. Arch, forget setting and the seed of the
MIA's samples come from each checkpoint's meta (the original model, which has no forget setting, is scored
on class 3 unless --forget-* is given; --seed overrides the MIA seed).
"""
import common


def main(argv=None):
    parser = common.make_parser(__doc__)
    parser.add_argument("checkpoints", nargs="+", metavar="PATH", help="checkpoints written by this project's scripts")
    parser.add_argument("--data", default="data", help="folder holding cifar-10-batches-py (default: data)")
    common.add_forget_arguments(parser)
    parser.add_argument("--seed", type=int, help="seed of the MIA's member/non-member samples "
                                                 "(default: the training seed recorded in each checkpoint)")
    common.add_device_argument(parser)
    parser.add_argument("--json", metavar="OUT", help="also write the results as a JSON list to OUT")
    args = parser.parse_args(argv)
    spec = common.forget_spec_from_args(args)
    data_cache = {}
    rows = [common.evaluate_checkpoint(path, args.data, args.device, spec, args.seed, data_cache)
            for path in args.checkpoints]
    print(common.markdown_table(rows, common.EVALUATE_COLUMNS))
    if args.json:
        common.write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    common.cli(main)
