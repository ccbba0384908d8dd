"""Generation FID of a pipeline against a reference split, beside the tokenizer's rFID on the same images.

    python scripts/evaluate_generation.py --pipeline outputs/demo/pipeline --dataset synthetic-faces \
        --image_size 32 --dataset_num_images 4000 --num_reference_images 1000 --num_generated_images 1000 \
        --output_dir outputs/demo/generation_eval

Writes metrics.json (gFID, rFID, LPIPS / SSIM / PSNR, codebook usage, and the recipe: reference split and
size, resize path, weights, package versions), samples.png, reconstructions.png and code_usage.png.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from pipelines import VQARPipeline
from pipelines.end_to_end import EvaluationConfig, ReferenceData, evaluate_pipeline
from stage1_tokenizer.config import load_config


@dataclass
class GenerationEvaluationConfig(EvaluationConfig):
    pipeline: str = "outputs/demo/pipeline"  # folder or Hub id (VQARPipeline.from_pretrained)
    dataset: str = "synthetic-faces"
    image_size: int = 64
    dataset_num_images: int | None = None  # size of the whole source, as the tokenizer was trained with
    data_seed: int = 0
    cache_dir: str | None = None
    output_dir: str = "outputs/generation_eval"


def main(argv=None):
    cfg = load_config(GenerationEvaluationConfig, argv)
    pipe = VQARPipeline.from_pretrained(cfg.pipeline)
    data = ReferenceData(cfg.dataset, cfg.image_size, cfg.dataset_num_images, cfg.data_seed, cfg.cache_dir)
    record = evaluate_pipeline(pipe, cfg, data, Path(cfg.output_dir))
    record["pipeline"] = cfg.pipeline
    (Path(cfg.output_dir) / "metrics.json").write_text(json.dumps(record, indent=2, default=str))
    print(json.dumps({"gfid": record["gfid"], "rfid": record["tokenizer"]["rfid"]}, indent=2))


if __name__ == "__main__":
    main()
