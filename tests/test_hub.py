"""Publishing: the exact folders and cards, the upload through huggingface_hub's own client against a local
stand-in for the Hub (127.0.0.1), the token's path, the CLI, and diffusers' custom-pipeline route."""

from __future__ import annotations

import base64
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import constants as hub_constants

from pipelines import VQARPipeline, hub
from stage1_tokenizer import VQTokenizer
from stage2_prior import ImageTokenPrior, sample_grids
from test_pipeline import seeded, tiny_pipeline, tiny_prior, tiny_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_thisIsATestTokenNeverToBeSeen"


class FakeHub:
    """The Hub endpoints that huggingface_hub's ``create_repo`` / ``upload_folder`` and its downloads
    (``snapshot_download``, ``hf_hub_download``, ``model_info``) call, served on 127.0.0.1.

    Every file is declared "regular" at preupload, so content arrives base64 inside the commit (no LFS).
    ``repos`` maps a repo id to its files; ``requests`` records (method, path, headers, body) of every call;
    ``unexpected`` every call no route answered.
    """

    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.created: list[dict] = []
        self.commits: list[dict] = []
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.unexpected: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def sha(self, repo: str) -> str:
        digest = hashlib.sha1()
        for path, content in sorted(self.repos[repo].items()):
            digest.update(path.encode() + b"\0" + hashlib.sha1(content).digest())
        return digest.hexdigest()

    def _handler(self):
        hub_state = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def _send(self, status, payload=None, headers=None, body=None):
                data = body if body is not None else json.dumps(payload).encode() if payload is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream" if body is not None else "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _record(self) -> tuple[str, bytes]:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                hub_state.requests.append((self.command, self.path, dict(self.headers), body))
                return urlsplit(self.path).path, body

            def do_POST(self):
                path, body = self._record()
                if path == "/api/repos/create":
                    request = json.loads(body)
                    hub_state.created.append(request)
                    repo = f"{request['organization']}/{request['name']}"
                    hub_state.repos.setdefault(repo, {})
                    return self._send(200, {"url": f"{hub_state.url}/{repo}", "name": repo})
                if path == "/api/validate-yaml":
                    yaml.safe_load(json.loads(body)["content"].split("---")[1])
                    return self._send(200, {"errors": [], "warnings": []})
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
                if match and match[1] in hub_state.repos:
                    repo, action = match[1], match[2]
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        return self._send(200, {"files": [
                            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                            for f in files]})
                    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                    hub_state.commits.append(lines[0]["value"])
                    for line in lines[1:]:
                        assert line["key"] == "file" and line["value"]["encoding"] == "base64", line
                        hub_state.repos[repo][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                    sha = hub_state.sha(repo)
                    return self._send(200, {"commitUrl": f"{hub_state.url}/{repo}/commit/{sha}",
                                            "commitOid": sha, "pullRequestUrl": None})
                hub_state.unexpected.append(f"POST {self.path}")
                self._send(404, {"error": "not served by the fake hub"})

            def do_GET(self):
                path, _ = self._record()
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
                if match and match[1] in hub_state.repos:
                    repo = match[1]
                    return self._send(200, {"id": repo, "sha": hub_state.sha(repo), "private": False,
                                            "siblings": [{"rfilename": p} for p in sorted(hub_state.repos[repo])]})
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path)
                if match and match[1] in hub_state.repos:
                    files = hub_state.repos[match[1]]
                    return self._send(200, [
                        {"type": "file", "path": p, "size": len(c), "oid": hashlib.sha1(c).hexdigest()}
                        for p, c in sorted(files.items())])
                match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if match and match[1] in hub_state.repos and unquote(match[3]) in hub_state.repos[match[1]]:
                    content = hub_state.repos[match[1]][unquote(match[3])]
                    return self._send(200, body=content, headers={
                        "X-Repo-Commit": hub_state.sha(match[1]), "ETag": f'"{hashlib.sha1(content).hexdigest()}"'})
                # huggingface_hub's best-effort agent detection asks for this registry (and caches an answer
                # under HF_HOME); a 404 leaves it with none, as offline.
                if path != "/api/agent-harnesses":
                    hub_state.unexpected.append(f"{self.command} {self.path}")
                self._send(404, {"error": "not served by the fake hub"})

            do_HEAD = do_GET

        return Handler


@pytest.fixture(scope="session")
def xet_cache(tmp_path_factory) -> Path:
    """Where hf_xet (loaded by uploads) writes its logs: read once per process, so one folder per session."""
    return tmp_path_factory.mktemp("xet_cache")


@pytest.fixture
def fake_hub(monkeypatch, xet_cache):
    server = FakeHub()
    # HfApi reads the endpoint when it is created; HF_ENDPOINT itself is read once, at import.
    monkeypatch.setattr(hub_constants, "ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_XET_CACHE", str(xet_cache))
    yield server
    server.close()


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def card_metadata(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    return yaml.safe_load(text.split("---")[1]), text


# -- the folders and their cards -----------------------------------------------------------------------------

def test_prior_folder_and_card(tmp_path):
    prior = tiny_prior(num_classes=2)
    prior.config.tokenizer_hash = "feedbeef"
    folder = hub.save_prior_folder(prior, tmp_path / "prior", metrics={"loss": 1.25, "bits_per_token": 1.8034},
                                   datasets=["synthetic-faces"], repo_id="someone/prior")
    assert set(folder_files(folder)) == {"README.md", "config.json", "generation_config.json", "model.safetensors"}
    metadata, card = card_metadata(folder)
    assert metadata["library_name"] == "transformers"
    assert {"driftvq", "image-token-prior", "autoregressive"} <= set(metadata["tags"])
    assert metadata["datasets"] == ["synthetic-faces"]
    assert metadata["metrics"] == ["loss", "bits_per_token"]
    for text in ("| codebook size K | 8 |", "| token grid | 4 x 4", "| classes | 2 |", "feedbeef",
                 "| validation loss (nats / token) | 1.25 |", "| validation bits / token | 1.803 |",
                 'ImageTokenPrior.from_pretrained("someone/prior")', "class_labels=[0] * 4"):
        assert text in card, text
    loaded = ImageTokenPrior.from_pretrained(folder).eval()
    assert torch.equal(sample_grids(loaded, batch_size=3, generator=seeded(1), class_labels=1),
                       sample_grids(prior, batch_size=3, generator=seeded(1), class_labels=1))


def test_pipeline_folder_layout_card_and_code_files(tmp_path):
    pipe = tiny_pipeline("transvq")
    metrics = {"gfid": 41.37, "rfid": 12.5, "lpips": 0.1, "utilisation": 0.875, "dead_codes": 1}
    folder = hub.save_pipeline_folder(pipe, tmp_path / "pipe", metrics=metrics, datasets=["synthetic-faces"],
                                      repo_id="someone/pipe")
    files = folder_files(folder)
    assert set(files) == {
        "README.md", "pipeline.py", "model_index.json",
        "tokenizer/config.json", "tokenizer/diffusion_pytorch_model.safetensors", "tokenizer/stage1_tokenizer.model.py",
        "prior/config.json", "prior/generation_config.json", "prior/model.safetensors", "prior/stage2_prior.prior.py",
    }
    index = json.loads(files["model_index.json"])
    assert index["_class_name"] == ["pipeline", "VQARPipeline"]
    assert index["tokenizer"] == ["stage1_tokenizer.model", "VQTokenizer"]
    assert index["prior"] == ["stage2_prior.prior", "ImageTokenPrior"]
    # Each code file only imports the installed class: executing it defines exactly that name, that object.
    for path, (module, name) in {"pipeline.py": ("pipelines.pipeline_vqar", "VQARPipeline"),
                                 "tokenizer/stage1_tokenizer.model.py": ("stage1_tokenizer.model", "VQTokenizer"),
                                 "prior/stage2_prior.prior.py": ("stage2_prior.prior", "ImageTokenPrior")}.items():
        namespace: dict = {}
        exec(compile(files[path], path, "exec"), namespace)
        assert namespace[name] is getattr(importlib.import_module(module), name)
        assert namespace["__all__"] == [name]
    # The TransVQ codebook is published as the plain table it computes.
    assert json.loads(files["tokenizer/config.json"])["quantizer"] == "vq"

    metadata, card = card_metadata(folder)
    assert metadata["library_name"] == "diffusers"
    assert metadata["pipeline_tag"] == "unconditional-image-generation"
    assert {"driftvq", "transvq", "autoregressive"} <= set(metadata["tags"])
    assert metadata["datasets"] == ["synthetic-faces"]
    assert metadata["metrics"] == ["gfid", "rfid", "lpips", "utilisation", "dead_codes"]
    for text in ("| tokenizer quantizer (training) | transvq |", "| image size | 32 x 32 |",
                 "| gFID (generated samples) | 41.37 |", "| rFID (tokenizer reconstructions) | 12.5 |",
                 "| dead codes | 1 |", 'DiffusionPipeline.from_pretrained("someone/pipe", trust_remote_code=True)',
                 'VQARPipeline.from_pretrained("someone/pipe", trust_remote_code=True)'):
        assert text in card, text

    # The weights: components loaded directly (loading the folder as a pipeline runs its code files, which the
    # fresh-process tests below do with their own HF_HOME).
    loaded = VQARPipeline(tokenizer=VQTokenizer.from_pretrained(folder / "tokenizer").eval(),
                          prior=ImageTokenPrior.from_pretrained(folder / "prior").eval())
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(loaded(batch_size=2, generator=seeded(3), output_type="pt").images,
                               pipe(batch_size=2, generator=seeded(3), output_type="pt").images, rtol=0, atol=1e-6)


def test_loading_the_published_folder_needs_trust_remote_code(tmp_path):
    folder = hub.save_pipeline_folder(tiny_pipeline(), tmp_path / "pipe")
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        VQARPipeline.from_pretrained(folder)


def test_tokenizer_folder_from_a_saved_tokenizer_splits_metrics_and_usage(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "trained")
    folder = hub.write_publish_folder("tokenizer", tmp_path / "trained", tmp_path / "publish",
                                      metrics={"rfid": 7.25, "psnr": 24.5, "utilisation": 0.5, "dead_codes": 4},
                                      repo_id="someone/tok")
    metadata, card = card_metadata(folder)
    assert metadata["metrics"] == ["rfid", "psnr"]
    for text in ("| rFID | 7.2500 |", "| PSNR (dB) | 24.5000 |", "50.0%", "| dead codes | 4 |"):
        assert text in card, text
    with pytest.raises(ValueError, match="kind must be one of"):
        hub.write_publish_folder("scheduler", tmp_path / "trained", tmp_path / "other")
    with pytest.raises(ValueError, match="is not empty"):
        hub.write_publish_folder("tokenizer", tmp_path / "trained", folder)


def test_unknown_metric_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"unknown metric names \['fid'\]"):
        hub.save_prior_folder(tiny_prior(), tmp_path, metrics={"fid": 3.0})


def test_read_metrics_understands_the_project_result_files(tmp_path):
    end_to_end = {"quantizer": "nsvq", "codebook_size": 1024, "gfid": 30.5,
                  "tokenizer": {"rfid": 4.0, "lpips": 0.05, "utilisation": 0.99, "dead_codes": 3, "num_images": 500},
                  "recipe": {"reference": {"num_images": 500}, "sampling": {"top_k": 5}},
                  "wall_time_seconds": {"tokenizer_training": 100.0}}
    evaluation = {"metrics": {"rfid": 4.0, "psnr": 25.1, "ssim": 0.8}, "recipe": {"lpips": 0.0}}
    prior_result = {"step": 10, "losses": [2.0, 1.0], "validation": {"loss": 1.5, "bits_per_token": 2.16}}
    expected = [{"gfid": 30.5, "rfid": 4.0, "lpips": 0.05, "utilisation": 0.99, "dead_codes": 3},
                {"rfid": 4.0, "psnr": 25.1, "ssim": 0.8},
                {"loss": 1.5, "bits_per_token": 2.16}]
    for index, (record, want) in enumerate(zip((end_to_end, evaluation, prior_result), expected)):
        path = tmp_path / f"{index}.json"
        path.write_text(json.dumps(record))
        assert hub.read_metrics(path) == want
    (tmp_path / "twice.json").write_text(json.dumps({"gfid": 1.0, "run": {"gfid": 2.0}}))
    with pytest.raises(ValueError, match="gives gfid twice"):
        hub.read_metrics(tmp_path / "twice.json")
    (tmp_path / "none.json").write_text(json.dumps({"step": 3}))
    with pytest.raises(ValueError, match="holds none of the metrics"):
        hub.read_metrics(tmp_path / "none.json")


# -- the upload ----------------------------------------------------------------------------------------------

def assert_token_only_in_authorization(fake_hub: FakeHub, captured: str, xet_cache: Path):
    assert fake_hub.requests
    for method, path, headers, body in fake_hub.requests:
        authorization = {k.lower(): v for k, v in headers.items()}.get("authorization")
        if method == "POST":
            assert authorization == f"Bearer {TOKEN}", (method, path)
        others = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        assert TOKEN not in path + json.dumps(others) and TOKEN.encode() not in body, (method, path)
    assert TOKEN not in captured
    for log in xet_cache.rglob("*"):
        assert not log.is_file() or TOKEN.encode() not in log.read_bytes(), log


@pytest.mark.parametrize("kind", hub.KINDS)
def test_push_uploads_exactly_the_folder_and_never_shows_the_token(kind, tmp_path, fake_hub, xet_cache, capsys,
                                                                   caplog):
    caplog.set_level(logging.DEBUG)
    if kind == "pipeline":
        folder = hub.save_pipeline_folder(tiny_pipeline(), tmp_path / kind, repo_id=f"me/{kind}")
    elif kind == "prior":
        folder = hub.save_prior_folder(tiny_prior(), tmp_path / kind, repo_id=f"me/{kind}")
    else:
        from stage1_tokenizer.model_card import save_tokenizer_folder

        folder = save_tokenizer_folder(tiny_tokenizer(), tmp_path / kind, repo_id=f"me/{kind}")
    assert hub.folder_kind(folder) == kind

    url = hub.push_folder(folder, f"me/{kind}", private=True)

    assert fake_hub.unexpected == []
    assert fake_hub.created == [{"name": kind, "organization": "me", "visibility": "private", "type": "model"}]
    assert fake_hub.repos[f"me/{kind}"] == folder_files(folder)
    assert fake_hub.commits[-1]["summary"] == f"Upload driftvq {kind}"
    assert url == f"{fake_hub.url}/me/{kind}/commit/{fake_hub.sha(f'me/{kind}')}"
    captured = capsys.readouterr()
    assert_token_only_in_authorization(fake_hub, captured.out + captured.err + caplog.text, xet_cache)


def test_push_refuses_a_folder_without_a_card(tmp_path, fake_hub):
    tiny_prior().save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="no README.md model card"):
        hub.push_folder(tmp_path / "bare", "me/bare")
    assert fake_hub.requests == []


def load_cli():
    spec = importlib.util.spec_from_file_location("push_to_hub_cli", REPO_ROOT / "scripts" / "push_to_hub.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_dry_run_writes_the_folder_and_pushes_nothing(tmp_path, fake_hub, capsys):
    tiny_prior().save_pretrained(tmp_path / "trained")
    (tmp_path / "result.json").write_text(json.dumps({"validation": {"loss": 1.5, "bits_per_token": 2.16}}))
    out = tmp_path / "publish"
    load_cli().main(["--kind", "prior", "--path", str(tmp_path / "trained"), "--repo_id", "me/prior",
                     "--metrics", str(tmp_path / "result.json"), "--datasets", "synthetic-faces",
                     "--out", str(out), "--dry_run"])
    assert fake_hub.requests == []
    assert set(folder_files(out)) == {"README.md", "config.json", "generation_config.json", "model.safetensors"}
    metadata, card = card_metadata(out)
    assert metadata["metrics"] == ["loss", "bits_per_token"] and metadata["datasets"] == ["synthetic-faces"]
    assert "| validation bits / token | 2.16 |" in card
    assert str(out) in capsys.readouterr().out


def test_cli_pushes_a_pipeline(tmp_path, fake_hub, xet_cache, capsys):
    tiny_pipeline().save_pretrained(tmp_path / "trained")
    (tmp_path / "metrics.json").write_text(json.dumps({"gfid": 50.0, "tokenizer": {"rfid": 9.0}}))
    load_cli().main(["--kind", "pipeline", "--path", str(tmp_path / "trained"), "--repo_id", "me/pipe",
                     "--metrics", str(tmp_path / "metrics.json"), "--out", str(tmp_path / "publish")])
    assert fake_hub.unexpected == []
    assert fake_hub.repos["me/pipe"] == folder_files(tmp_path / "publish")
    assert "pipeline.py" in fake_hub.repos["me/pipe"]
    assert "| gFID (generated samples) | 50.0 |" in fake_hub.repos["me/pipe"]["README.md"].decode()
    captured = capsys.readouterr()
    assert f"{fake_hub.url}/me/pipe/commit/" in captured.out
    assert_token_only_in_authorization(fake_hub, captured.out + captured.err, xet_cache)


# -- loading with diffusers alone, in a fresh process ---------------------------------------------------------

DIFFUSERS_ONLY_LOAD = """
import sys
import numpy as np
import torch
torch.set_num_threads(1)
from diffusers import DiffusionPipeline

source, out = sys.argv[1], sys.argv[2]
assert not any(name.split(".")[0] in ("pipelines", "stage1_tokenizer", "stage2_prior") for name in sys.modules)
try:
    DiffusionPipeline.from_pretrained(source)
except ValueError as error:
    assert "trust_remote_code=True" in str(error), error
else:
    raise AssertionError("the repository's code ran without trust_remote_code=True")
pipe = DiffusionPipeline.from_pretrained(source, trust_remote_code=True)
assert type(pipe).__module__ == "pipelines.pipeline_vqar", type(pipe)
pipe.set_progress_bar_config(disable=True)
np.save(out, pipe(batch_size=2, generator=torch.Generator().manual_seed(7), output_type="np").images)
"""

INSTALLED_LOAD = """
import sys
import numpy as np
import torch
torch.set_num_threads(1)
from pipelines import VQARPipeline

pipe = VQARPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
np.save(sys.argv[2], pipe(batch_size=2, generator=torch.Generator().manual_seed(7), output_type="np").images)
"""


def run_fresh(script: str, args: list[str], env: dict[str, str], cwd: Path) -> None:
    result = subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, env={**os.environ, **env},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow  # a fresh interpreter imports torch, diffusers and transformers: ~25 s on a loaded 2-core CPU
def test_diffusers_alone_loads_the_published_folder(tmp_path):
    pipe = tiny_pipeline()
    folder = hub.save_pipeline_folder(pipe, tmp_path / "pipe")
    env = {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    run_fresh(DIFFUSERS_ONLY_LOAD, [str(folder), str(tmp_path / "out.npy")], env, tmp_path)
    expected = pipe(batch_size=2, generator=seeded(7), output_type="np").images
    # Same tokens; pixels may differ ~3e-6 where the two processes' conv kernels sum in another order.
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=0, atol=1e-5)


@pytest.mark.slow  # two fresh interpreters
def test_both_user_lines_load_a_pushed_pipeline_from_the_hub(tmp_path, fake_hub):
    pipe = tiny_pipeline()
    hub.push_folder(hub.save_pipeline_folder(pipe, tmp_path / "pipe", repo_id="me/pipe"), "me/pipe")
    expected = pipe(batch_size=2, generator=seeded(7), output_type="np").images
    for name, script in (("diffusers", DIFFUSERS_ONLY_LOAD), ("installed", INSTALLED_LOAD)):
        env = {"HF_ENDPOINT": fake_hub.url, "HF_HOME": str(tmp_path / f"hf_home_{name}"), "HF_TOKEN": TOKEN}
        run_fresh(script, ["me/pipe", str(tmp_path / f"{name}.npy")], env, tmp_path)
        np.testing.assert_allclose(np.load(tmp_path / f"{name}.npy"), expected, rtol=0, atol=1e-5)
    assert fake_hub.unexpected == []
