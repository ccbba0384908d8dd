"""Train both stages, evaluate, and save the pipeline and a report into one folder.

    accelerate launch scripts/train.py --config configs/demo_tiny.yaml
    python scripts/train.py                                   # the tiny preset on synthetic-faces
    python scripts/train.py --config configs/demo_tiny.yaml --set tokenizer.quantizer=nsvq --output_dir outputs/nsvq

Rerunning the same command after an interruption resumes: finished stages are skipped, an interrupted
training stage continues from its last checkpoint.
"""

import argparse
import json
import logging
from pathlib import Path

from pipelines.end_to_end import build_config, run_end_to_end

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo_tiny.yaml"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="end-to-end preset (YAML)")
    parser.add_argument("--output_dir", default=None, help="overrides the preset's output_dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one field, e.g. --set tokenizer.quantizer=nsvq (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    metrics = run_end_to_end(build_config(args.config, overrides))
    if metrics:
        print(json.dumps({k: metrics[k] for k in ("quantizer", "gfid", "tokenizer", "wall_time_seconds")}, indent=2))


if __name__ == "__main__":
    main()
