"""Evaluate a trained tokenizer: rFID, LPIPS (AlexNet), SSIM, PSNR, codebook usage.

    python scripts/evaluate_tokenizer.py --tokenizer outputs/tokenizer/tokenizer --split test \
        --num_images 1000 --output_dir outputs/tokenizer/eval
"""

import json

from stage1_tokenizer.config import load_config
from stage1_tokenizer.evaluation import TokenizerEvaluationConfig, run_evaluation


def main(argv=None):
    cfg = load_config(TokenizerEvaluationConfig, argv)
    record = run_evaluation(cfg)
    print(json.dumps(record["metrics"], indent=2))


if __name__ == "__main__":
    main()
