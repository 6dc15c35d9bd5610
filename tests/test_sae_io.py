"""Files: our format round trip, sparsify and SAELens folders built here, Hub download of one hookpoint, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_dataselect.errors import InputError
from hf_dataselect.sae.model import TopKSAE

D_IN, LATENTS, K = 12, 48, 5


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    W_dec = rng.normal(size=(LATENTS, D_IN)).astype(np.float32)
    return {
        "W_enc": rng.normal(size=(LATENTS, D_IN)).astype(np.float32) * 0.5,  # [latents, d_in]
        "b_enc": rng.normal(size=LATENTS).astype(np.float32) * 0.1,
        "W_dec": W_dec / np.linalg.norm(W_dec, axis=1, keepdims=True),
        "b_dec": rng.normal(size=D_IN).astype(np.float32) * 0.2,
        "threshold": rng.uniform(0.1, 0.6, size=LATENTS).astype(np.float32),
    }


def _inputs(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(25, D_IN)).astype(np.float32)


def _reference_topk(w, x, *, subtract_b_dec=True, k=K) -> np.ndarray:
    """Dense numpy TopK code: topk(relu(W_enc (x - b_dec) + b_enc))."""
    pre = np.maximum((x - w["b_dec"] if subtract_b_dec else x) @ w["W_enc"].T + w["b_enc"], 0)
    code = np.zeros_like(pre)
    top = np.argsort(-pre, axis=1)[:, :k]
    np.put_along_axis(code, top, np.take_along_axis(pre, top, axis=1), axis=1)
    return code


def _dense(sae: TopKSAE, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return sae.dense_activations(torch.from_numpy(x)).numpy()


def _tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


# -- our format ---------------------------------------------------------------------------------------------------
def test_save_load_round_trip_is_identical_and_in_the_sparsify_layout(tmp_path):
    sae = TopKSAE(D_IN, LATENTS, K, seed=3, metadata={"base_model": "org/model", "training_tokens": 1000})
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.encoder.bias.normal_()
    folder = Path(sae.save_pretrained(tmp_path, hookpoint="layers.1"))
    assert folder == tmp_path / "layers.1"
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "hf_dataselect.json", "sae.safetensors"]
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg == {
        "activation": "topk",
        "expansion_factor": 4,
        "normalize_decoder": True,
        "num_latents": LATENTS,
        "k": K,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": D_IN,
    }
    shapes = {k: tuple(v.shape) for k, v in load_file(folder / "sae.safetensors").items()}
    assert shapes == {
        "encoder.weight": (LATENTS, D_IN),
        "encoder.bias": (LATENTS,),
        "W_dec": (LATENTS, D_IN),
        "b_dec": (D_IN,),
    }
    loaded = TopKSAE.from_pretrained(tmp_path, hookpoint="model.layers.1")
    x = torch.from_numpy(_inputs())
    with torch.no_grad():
        for a, b in zip(sae.encode(x), loaded.encode(x), strict=True):
            assert torch.equal(a, b)
        assert torch.equal(sae(x).reconstruction, loaded(x).reconstruction)
    assert loaded.metadata["base_model"] == "org/model" and loaded.metadata["hookpoint"] == "layers.1"
    assert loaded.metadata["library"] == "hf_dataselect"
    assert TopKSAE.from_pretrained(tmp_path / "layers.1").hookpoint == "layers.1"  # the folder itself
    assert TopKSAE.from_pretrained(tmp_path, hookpoint=1).hookpoint == "layers.1"  # a layer index
    assert TopKSAE.from_pretrained(tmp_path).hookpoint == "layers.1"  # the only hookpoint


def test_saving_twice_replaces_atomically_and_lists_every_hookpoint(tmp_path):
    TopKSAE(D_IN, LATENTS, K, seed=0).save_pretrained(tmp_path, hookpoint="layers.0")
    TopKSAE(D_IN, LATENTS, K, seed=1).save_pretrained(tmp_path, hookpoint="layers.1")
    replacement = TopKSAE(D_IN, LATENTS, K, seed=2)
    replacement.save_pretrained(tmp_path, hookpoint="layers.0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "layers.0", "layers.1"]
    loaded = TopKSAE.from_pretrained(tmp_path, hookpoint="layers.0")
    assert torch.equal(loaded.W_dec, replacement.W_dec)
    readme = (tmp_path / "README.md").read_text()
    assert "`layers.0`" in readme and "`layers.1`" in readme
    with pytest.raises(InputError, match=r"several hookpoints \['layers.0', 'layers.1'\]"):
        TopKSAE.from_pretrained(tmp_path)
    with pytest.raises(
        InputError, match=r"no SAE for hookpoint 'layers.7'; hookpoints it holds: \['layers.0', 'layers.1'\]"
    ):
        TopKSAE.from_pretrained(tmp_path, hookpoint="layers.7")


# -- EleutherAI sparsify ------------------------------------------------------------------------------------------
def _write_sparsify(folder: Path, w: dict[str, np.ndarray], cfg: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(
        _tensors(
            {
                "encoder.weight": w["W_enc"],
                "encoder.bias": w["b_enc"],
                "W_dec": w["W_dec"],
                "b_dec": w["b_dec"],
            }
        ),
        str(folder / "sae.safetensors"),
    )


def test_old_sparsify_folder_loads_and_encodes_like_the_reference(tmp_path):
    w = _weights()
    # an old sparsify config: `signed` (removed since), no multi_topk / skip_connection / transcode / activation
    _write_sparsify(
        tmp_path / "layers.3",
        w,
        {
            "expansion_factor": 4,
            "normalize_decoder": True,
            "num_latents": 0,
            "k": K,
            "signed": False,
            "d_in": D_IN,
        },
    )
    sae = TopKSAE.from_pretrained(tmp_path, hookpoint="layers.3")
    assert sae.metadata["format"] == "sparsify" and sae.hookpoint == "layers.3"
    assert (sae.d_in, sae.num_latents, sae.k) == (D_IN, LATENTS, K)
    x = _inputs()
    np.testing.assert_allclose(_dense(sae, x), _reference_topk(w, x), atol=1e-5)
    with torch.no_grad():
        values, indices = sae.encode(torch.from_numpy(x))
        reconstruction = sae.decode(values, indices).numpy()
    np.testing.assert_allclose(reconstruction, _reference_topk(w, x) @ w["W_dec"] + w["b_dec"], atol=1e-5)


def test_sparsify_refusals(tmp_path):
    w = _weights()
    base = {"k": K, "num_latents": LATENTS, "d_in": D_IN}
    _write_sparsify(tmp_path / "groupmax", w, {**base, "activation": "groupmax"})
    _write_sparsify(tmp_path / "transcoder", w, {**base, "transcode": True})
    _write_sparsify(tmp_path / "wrong", w, {**base, "num_latents": LATENTS * 2})
    with pytest.raises(InputError, match="groupmax"):
        TopKSAE.from_pretrained(tmp_path / "groupmax")
    with pytest.raises(InputError, match="transcoder"):
        TopKSAE.from_pretrained(tmp_path / "transcoder")
    with pytest.raises(InputError, match=r"num_latents=96 but encoder\.weight has 48"):
        TopKSAE.from_pretrained(tmp_path / "wrong")


# -- SAELens ------------------------------------------------------------------------------------------------------
def _write_saelens(folder: Path, w: dict[str, np.ndarray], cfg: dict, *, threshold: bool = False) -> None:
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps({"d_in": D_IN, "d_sae": LATENTS, "dtype": "float32", **cfg}))
    tensors = {"W_enc": w["W_enc"].T, "b_enc": w["b_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]}
    if threshold:
        tensors["threshold"] = w["threshold"]
    save_file(_tensors(tensors), str(folder / "sae_weights.safetensors"))


def test_saelens_topk_loads_and_encodes_like_the_reference(tmp_path):
    w = _weights()
    metadata = {"hook_name": "blocks.4.hook_resid_post", "model_name": "gpt2-small"}
    _write_saelens(tmp_path / "topk", w, {"architecture": "topk", "k": K, "metadata": metadata})
    sae = TopKSAE.from_pretrained(tmp_path / "topk")
    assert sae.metadata["format"] == "saelens" and sae.hookpoint == "4"
    x = _inputs()
    np.testing.assert_allclose(_dense(sae, x), _reference_topk(w, x), atol=1e-5)
    # apply_b_dec_to_input=False: the input is not centred before encoding
    _write_saelens(tmp_path / "raw", w, {"architecture": "topk", "k": K, "apply_b_dec_to_input": False})
    raw = TopKSAE.from_pretrained(tmp_path / "raw")
    np.testing.assert_allclose(_dense(raw, x), _reference_topk(w, x, subtract_b_dec=False), atol=1e-5)
    # legacy config: architecture "standard" with a topk activation function
    _write_saelens(
        tmp_path / "legacy",
        w,
        {"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}},
    )
    np.testing.assert_allclose(
        _dense(TopKSAE.from_pretrained(tmp_path / "legacy"), x), _reference_topk(w, x), atol=1e-5
    )


def test_saelens_decoder_norm_rescaling_is_folded_exactly(tmp_path):
    w = _weights()
    w["W_dec"] = w["W_dec"] * np.random.default_rng(5).uniform(0.5, 2.0, size=(LATENTS, 1)).astype(np.float32)
    _write_saelens(
        tmp_path / "sae", w, {"architecture": "topk", "k": K, "rescale_acts_by_decoder_norm": True}
    )
    sae = TopKSAE.from_pretrained(tmp_path / "sae")
    x = _inputs()
    norms = np.linalg.norm(w["W_dec"], axis=1)
    pre = ((x - w["b_dec"]) @ w["W_enc"].T + w["b_enc"]) * norms  # SAELens: hidden_pre * ||W_dec||
    code = np.zeros_like(pre)
    top = np.argsort(-pre, axis=1)[:, :K]
    np.put_along_axis(code, top, np.maximum(np.take_along_axis(pre, top, axis=1), 0), axis=1)
    expected_reconstruction = (code / norms) @ w["W_dec"] + w["b_dec"]
    with torch.no_grad():
        values, indices = sae.encode(torch.from_numpy(x))
        reconstruction = sae.decode(values, indices).numpy()
    np.testing.assert_allclose(_dense(sae, x), code, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(reconstruction, expected_reconstruction, atol=1e-5)


def test_saelens_jumprelu_keeps_its_threshold_and_relu_loads(tmp_path):
    w = _weights()
    _write_saelens(tmp_path / "jump", w, {"architecture": "jumprelu"}, threshold=True)
    sae = TopKSAE.from_pretrained(tmp_path / "jump")
    assert sae.cfg.activation == "jumprelu" and sae.k is None
    x = _inputs()
    pre = (x - w["b_dec"]) @ w["W_enc"].T + w["b_enc"]
    np.testing.assert_allclose(_dense(sae, x), np.where(pre > w["threshold"], pre, 0), atol=1e-5)
    _write_saelens(tmp_path / "relu", w, {"architecture": "standard"})
    np.testing.assert_allclose(
        _dense(TopKSAE.from_pretrained(tmp_path / "relu"), x), np.maximum(pre, 0), atol=1e-5
    )


@pytest.mark.parametrize(
    ("cfg", "threshold", "message"),
    [
        ({"architecture": "gated"}, False, "architecture 'gated' is not supported"),
        ({"architecture": "jumprelu"}, False, r"missing \['threshold'\]"),
        (
            {"architecture": "topk", "k": K, "normalize_activations": "expected_average_only_in"},
            False,
            "scaling factor",
        ),
        ({"architecture": "topk", "k": K, "reshape_activations": "hook_z"}, False, "hook_z"),
        ({"architecture": "topk"}, False, "needs k"),
    ],
)
def test_saelens_refusals(tmp_path, cfg, threshold, message):
    _write_saelens(tmp_path / "sae", _weights(), cfg, threshold=threshold)
    with pytest.raises(InputError, match=message):
        TopKSAE.from_pretrained(tmp_path / "sae")


# -- unknown formats and pickles ----------------------------------------------------------------------------------
def test_only_safetensors_and_known_layouts_are_read(tmp_path):
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "cfg.json").write_text("{}")
    (tmp_path / "pickled" / "sae.pt").write_bytes(b"not read")
    with pytest.raises(InputError, match=r"only safetensors are read"):
        TopKSAE.from_pretrained(tmp_path / "pickled")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "cfg.json").write_text("{}")
    (tmp_path / "other" / "weights.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match=r"Unknown SAE format .*found \['cfg.json', 'weights.safetensors'\]"):
        TopKSAE.from_pretrained(tmp_path / "other")
    with pytest.raises(InputError, match="No such SAE folder"):
        TopKSAE.from_pretrained(tmp_path / "missing")


# -- the Hub ------------------------------------------------------------------------------------------------------
def test_hub_download_fetches_only_the_requested_hookpoint(tmp_path, monkeypatch):
    import fnmatch

    import huggingface_hub

    remote = tmp_path / "remote"
    for layer in range(3):
        TopKSAE(D_IN, LATENTS, K, seed=layer).save_pretrained(remote, hookpoint=f"layers.{layer}")
    calls: list[list[str]] = []

    def fake_snapshot_download(repo_id, *, allow_patterns=None, **kwargs):
        assert repo_id == "someone/saes"
        calls.append(list(allow_patterns))
        local = tmp_path / "snapshot"
        for file in remote.rglob("*"):
            relative = file.relative_to(remote).as_posix()
            if file.is_file() and any(fnmatch.fnmatch(relative, p) for p in allow_patterns):
                (local / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, local / relative)
        local.mkdir(exist_ok=True)
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    sae = TopKSAE.from_pretrained("someone/saes", hookpoint="model.layers.2")
    assert torch.equal(sae.W_dec, TopKSAE.from_pretrained(remote, hookpoint="layers.2").W_dec)
    assert all(p.startswith(("model.layers.2/", "layers.2/")) for p in calls[0])
    snapshot = tmp_path / "snapshot"
    downloaded = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    assert downloaded == ["layers.2/cfg.json", "layers.2/hf_dataselect.json", "layers.2/sae.safetensors"]
    with pytest.raises(InputError, match=r"has no SAE for hookpoint 'layers\.9'"):
        TopKSAE.from_pretrained("someone/saes", hookpoint="layers.9")
