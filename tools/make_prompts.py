"""Write a prompt file (JSONL: prompt, task, answer/meta) for `vp2o train`'s ``rl.prompts``.

    python tools/make_prompts.py --digit-sum --n 256 --seed 0 --out data/prompts/digit_sum_train.jsonl
    python tools/make_prompts.py --digit-product --n 256 --seed 4 --out data/prompts/digit_product_train.jsonl
    python tools/make_prompts.py --reasoning-gym NAME --n 256 --seed 0 --out FILE

The generators live in ``megatron_vp2o.generation.prompts``.
"""

from __future__ import annotations

import argparse

from megatron_vp2o.generation.prompts import (make_digit_product_prompts, make_digit_sum_prompts,
                                              reasoning_gym_prompts, write_prompts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--digit-sum", action="store_true", help="the built-in digit_sum task")
    source.add_argument("--digit-product", action="store_true",
                        help="the built-in digit_product task (digits multiplying to N)")
    source.add_argument("--reasoning-gym", metavar="NAME", help="a reasoning-gym generator")
    parser.add_argument("--n", type=int, required=True, help="number of prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-terms", type=int, default=2, help="digit_sum: digits per answer")
    parser.add_argument("--n-digits", type=int, default=3, help="digit_product: digits per answer")
    parser.add_argument("--out", required=True, help="output JSONL path")
    args = parser.parse_args(argv)
    if args.digit_sum:
        records = make_digit_sum_prompts(args.n, args.seed, args.n_terms)
    elif args.digit_product:
        records = make_digit_product_prompts(args.n, args.seed, args.n_digits)
    else:
        records = reasoning_gym_prompts(args.reasoning_gym, args.n, args.seed)
    print(f"wrote {len(records)} prompts to {write_prompts(records, args.out)}")


if __name__ == "__main__":
    main()
