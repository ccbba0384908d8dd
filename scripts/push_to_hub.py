"""Publish a tokenizer, a prior or a whole pipeline to a Hub model repository, with a model card.

    python scripts/push_to_hub.py --kind pipeline --path outputs/demo/pipeline --repo_id me/driftvq-faces \
        --metrics outputs/demo/metrics.json --datasets synthetic-faces
    python scripts/push_to_hub.py --kind tokenizer --path outputs/tokenizer/tokenizer --repo_id me/tok \
        --metrics outputs/tokenizer/eval/metrics.json --dry_run      # writes the folder only

The folder that is uploaded (weights, configs, README.md card, for a pipeline also pipeline.py) is first
written to --out, so --dry_run shows exactly what would be published. The token comes from `hf auth login`
or HF_TOKEN; it is never printed, and there is deliberately no --token flag (shell histories keep them).
"""

import argparse
from pathlib import Path

from pipelines.hub import KINDS, push_folder, read_metrics, write_publish_folder


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", required=True, choices=KINDS, help="what --path holds")
    parser.add_argument("--path", required=True, help="a saved tokenizer / prior / pipeline folder (or Hub id)")
    parser.add_argument("--repo_id", default=None, help="user/name on the Hub (required unless --dry_run)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--metrics", default=None, help="JSON file of measured numbers (metrics.json, result.json)")
    parser.add_argument("--datasets", nargs="*", default=None, help="Hub ids or names of the training data")
    parser.add_argument("--out", default=None, help="where to write the folder (default outputs/hub/<repo name>)")
    parser.add_argument("--dry_run", action="store_true", help="write the folder, upload nothing")
    args = parser.parse_args(argv)
    if args.repo_id is None and not args.dry_run:
        parser.error("--repo_id is required to upload (or pass --dry_run to only write the folder)")

    out = Path(args.out or Path("outputs") / "hub" / (args.repo_id or args.kind).replace("/", "--"))
    metrics = read_metrics(args.metrics) if args.metrics else None
    folder = write_publish_folder(args.kind, args.path, out, metrics=metrics, datasets=args.datasets,
                                  repo_id=args.repo_id)
    print(f"wrote {folder}")
    if not args.dry_run:
        print(f"uploaded: {push_folder(folder, args.repo_id, private=args.private)}")


if __name__ == "__main__":
    main()
