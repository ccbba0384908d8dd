"""Compare several trained tokenizers on the same images: one table, one picture, one shared rFID reference.

The paper's comparison at CPU scale (docs/results.md): train each quantizer with
configs/tokenizer_paper_cpu64.yaml, then

    python scripts/compare_tokenizers.py --runs outputs/paper/vq outputs/paper/ema outputs/paper/fc \
        outputs/paper/simvq outputs/paper/nsvq outputs/paper/transvq \
        --dataset_num_images 8000 --split test --num_images 1000 --output_dir outputs/paper/comparison

Writes comparison.json (metrics, training time per step from each run's train_result.json, the recipe),
comparison.md (the table), reconstructions.png (inputs, then one row per tokenizer) and code_usage.png.
"""

import json

from stage1_tokenizer.config import load_config
from stage1_tokenizer.evaluation import TokenizerComparisonConfig, run_comparison


def main(argv=None):
    cfg = load_config(TokenizerComparisonConfig, argv)
    record = run_comparison(cfg)
    print(json.dumps(record["metrics"], indent=2))


if __name__ == "__main__":
    main()
