"""Model cards (front matter and content) and what push_to_hub would upload (HfApi calls replaced)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hf_dataselect.errors import InputError
from hf_dataselect.sae.card import render_model_card
from hf_dataselect.sae.model import TopKSAE

METADATA = {
    "base_model": "meta-llama/Llama-3.2-1B",
    "dataset": "tatsu-lab/alpaca",
    "training_tokens": 123456,
    "training_rows": 5000,
    "training_steps": 30,
    "batch_tokens": 4096,
    "fvu": 0.1234,
    "eval_fvu": 0.1301,
    "l0": 32.0,
    "dead_fraction": 0.021,
    "dead_tokens_threshold": 1000000,
    "lr": 0.00028,
    "library_version": "0.1.0",
}


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _sae(seed: int, **metadata) -> TopKSAE:
    return TopKSAE(8, 32, 4, seed=seed, metadata={**METADATA, **metadata})


def test_model_card_front_matter_and_metrics():
    entry = {**METADATA, "hookpoint": "layers.12", "d_in": 2048, "num_latents": 32768, "k": 32}
    card = render_model_card([entry], repo_id="me/llama-saes", license="mit")
    front = _front_matter(card)
    assert front == {
        "library_name": "hf_dataselect",
        "base_model": "meta-llama/Llama-3.2-1B",
        "tags": [
            "sparse-autoencoder",
            "sae",
            "topk-sae",
            "interpretability",
            "data-selection",
            "hf_dataselect",
        ],
        "datasets": ["tatsu-lab/alpaca"],
        "license": "mit",
    }
    row = "| `layers.12` | 2048 | 32768 | 32 | 123,456 | 0.123 | 0.130 | 32.0 | 2.1 % |"
    assert row in card
    assert 'TopKSAE.from_pretrained("me/llama-saes", hookpoint="layers.12")' in card
    assert 'SAEFeatures(model="meta-llama/Llama-3.2-1B", sae="me/llama-saes", hookpoint="layers.12")' in card
    assert 'select(ds, "sae-greedy", budget=1000)' in card
    assert "1,000,000 training tokens" in card


def test_local_paths_are_not_written_as_hub_ids(tmp_path):
    entry = {
        **METADATA,
        "base_model": str(tmp_path),
        "dataset": str(tmp_path / "data.jsonl"),
        "hookpoint": "h",
    }
    front = _front_matter(render_model_card([entry], location=str(tmp_path)))
    assert "base_model" not in front and "datasets" not in front
    assert front["license"] == "apache-2.0"
    with pytest.raises(InputError, match="at least one SAE"):
        render_model_card([])


class _Recorder:
    """Stands in for the network half of HfApi: records calls and the files an upload would send."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: dict[str, bytes] = {}

    def create_repo(self, api, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, api, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        folder = Path(kwargs["folder_path"])
        self.uploaded = {
            p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
        }

        class Commit:
            commit_url = f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"

        return Commit()


@pytest.fixture
def recorder(monkeypatch):
    from huggingface_hub import HfApi

    rec = _Recorder()
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: rec.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(HfApi, "upload_folder", lambda api, **kw: rec.upload_folder(api, **kw))
    return rec


def test_push_several_hookpoints_to_one_repo(recorder):
    from hf_dataselect.sae.hub import push_to_hub

    url = push_to_hub("me/saes", {"layers.0": _sae(0), "layers.1": _sae(1)}, private=True, license="mit")
    assert url == "https://huggingface.co/me/saes/commit/abc"
    assert [name for name, _ in recorder.calls] == ["create_repo", "upload_folder"]
    assert recorder.calls[0][1] == {
        "repo_id": "me/saes",
        "private": True,
        "exist_ok": True,
        "repo_type": "model",
    }
    upload = recorder.calls[1][1]
    assert upload["repo_id"] == "me/saes" and upload["repo_type"] == "model"
    assert upload["commit_message"] == "Upload SAEs for layers.0, layers.1"
    assert sorted(recorder.uploaded) == [
        "README.md",
        "layers.0/cfg.json",
        "layers.0/hf_dataselect.json",
        "layers.0/sae.safetensors",
        "layers.1/cfg.json",
        "layers.1/hf_dataselect.json",
        "layers.1/sae.safetensors",
    ]
    card = recorder.uploaded["README.md"].decode()
    assert _front_matter(card)["license"] == "mit"
    assert 'TopKSAE.from_pretrained("me/saes", hookpoint="layers.0")' in card and "`layers.1`" in card


def test_push_a_saved_folder_uploads_only_sae_files(recorder, tmp_path):
    from hf_dataselect.sae.hub import push_to_hub

    _sae(0).save_pretrained(tmp_path, hookpoint="encoder.layer.3")
    (tmp_path / "notes.txt").write_text("not part of the upload")
    (tmp_path / "encoder.layer.3" / "optimizer.pt").write_bytes(b"a pickle is never uploaded")
    before = {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    push_to_hub("me/minilm-sae", tmp_path)
    assert sorted(recorder.uploaded) == [
        "README.md",
        "encoder.layer.3/cfg.json",
        "encoder.layer.3/hf_dataselect.json",
        "encoder.layer.3/sae.safetensors",
    ]
    assert recorder.uploaded["encoder.layer.3/sae.safetensors"] == before["encoder.layer.3/sae.safetensors"]
    assert 'TopKSAE.from_pretrained("me/minilm-sae"' in recorder.uploaded["README.md"].decode()
    after = {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # the user's folder (and its local README) is left as it was


def test_push_one_sae_uses_its_recorded_hookpoint(recorder):
    _sae(0, hookpoint="layers.5").push_to_hub("me/one")
    assert sorted(recorder.uploaded) == [
        "README.md",
        "layers.5/cfg.json",
        "layers.5/hf_dataselect.json",
        "layers.5/sae.safetensors",
    ]


def test_push_errors(recorder, tmp_path):
    from hf_dataselect.sae.hub import push_to_hub

    with pytest.raises(InputError, match="'owner/name'"):
        push_to_hub("no-owner", {"h": _sae(0)})
    with pytest.raises(InputError, match="holds no SAE"):
        push_to_hub("me/x", tmp_path)
    with pytest.raises(InputError, match="needs hookpoint="):
        TopKSAE(8, 32, 4).push_to_hub("me/x")
    assert recorder.calls == []
