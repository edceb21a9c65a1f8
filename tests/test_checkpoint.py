"""Issue 2: checkpoints. Round trip, atomic save, official-format import parity against the
independent reference in tests/parcae_reference.py, and every bad checkpoint input."""
from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch

import loopdyn.models.checkpoint as checkpoint
from loopdyn.models import CheckpointError, InputError, LoopedLM, load, save
from tests import parcae_reference as ref
from tests.test_models import make_model, tokens


def _assert_same_model(a: LoopedLM, b: LoopedLM, idx: torch.Tensor) -> None:
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    with torch.no_grad():
        assert torch.equal(a(idx).logits, b(idx).logits)
        if a.config.looped:
            assert torch.equal(a(idx, n_loops=7).logits, b(idx, n_loops=7).logits)


# ---- loopdyn format ----------------------------------------------------------------------

@pytest.mark.parametrize("injection", ["diagonal", "linear", "additive", "none"])
@pytest.mark.parametrize("tied", [True, False])
def test_save_load_round_trip_is_bit_exact(tmp_path, injection, tied):
    extra = dict(bias=True, input_gain="zoh") if injection == "diagonal" and not tied else {}
    model = make_model(seed=3, injection=injection, tie_embeddings=tied, **extra)
    path = save(model, tmp_path / "ckpt")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    raw = json.loads((path / "config.json").read_text())
    stored = "fixed" if injection == "none" else injection  # "none": an input alias of "fixed" (models/config.py)
    assert raw["format"] == "loopdyn" and raw["version"] == 1 and raw["config"]["injection"] == stored
    if injection == "none":  # a config.json written with the alias (loopdyn 0.1) loads the same model
        raw["config"]["injection"] = "none"
        (path / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    loaded = load(path)
    assert not loaded.training
    assert loaded.checkpoint_info.format == "loopdyn" and loaded.checkpoint_info.nonfinite == []
    assert Path(loaded.checkpoint_info.weights_file) == path / "model.safetensors"
    _assert_same_model(model, loaded, tokens(B=2, S=9, seed=1))
    assert (loaded.lm_head.weight is loaded.wte.weight) == tied
    # the folder, its config.json or its weights file all name the checkpoint
    _assert_same_model(model, load(path / "config.json"), tokens(B=1, S=5))
    _assert_same_model(model, load(str(path / "model.safetensors")), tokens(B=1, S=5))


def _crash_during_weights(monkeypatch):
    import safetensors.torch

    def broken_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)


def _crash_during_config(monkeypatch):
    real = os.replace
    done = []

    def broken_replace(src, dst):
        if str(dst).endswith("config.json") and not done:
            done.append(dst)
            raise KeyboardInterrupt  # interrupted half way: the new weights are already in place
        return real(src, dst)
    monkeypatch.setattr(os, "replace", broken_replace)


@pytest.mark.parametrize("crash", [_crash_during_weights, _crash_during_config])
def test_interrupted_save_keeps_the_old_checkpoint(tmp_path, monkeypatch, crash):
    old = make_model(seed=1)
    path = save(old, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    crash(monkeypatch)
    with pytest.raises((InputError, KeyboardInterrupt)):
        save(make_model(seed=2), path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary or partial folder left
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    _assert_same_model(old, load(path), tokens())
    # a first save that fails leaves nothing at all
    crash(monkeypatch)
    with pytest.raises((InputError, KeyboardInterrupt)):
        save(old, tmp_path / "fresh")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_save_replaces_an_existing_checkpoint(tmp_path):
    save(make_model(seed=1), tmp_path / "ckpt")
    new = make_model(seed=2, injection="linear")
    save(new, tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    _assert_same_model(new, load(tmp_path / "ckpt"), tokens())
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="file"):
        save(new, tmp_path / "file")



def test_ctrl_c_between_the_two_renames_of_a_save_puts_the_old_checkpoint_back(tmp_path, monkeypatch, capfd):
    """save() swaps the weights in, then the config; interrupted between the two, it puts the
    previous pair back from its backup (kill -9 there: tests/test_files_safety.py)."""
    old = make_model(seed=1)
    save(old, tmp_path / "ckpt")
    _crash_during_config(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        save(make_model(seed=2), tmp_path / "ckpt")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors"]
    _assert_same_model(old, load(tmp_path / "ckpt"), tokens())
    assert capfd.readouterr().err == ""  # nothing to announce: the folder is whole again

# ---- official format: parity with the independent reference ------------------------------

LAYERS_213 = dict(n_layers_in_prelude=2, n_layers_in_recurrent_block=1, n_layers_in_coda=3,
                  mean_recurrence=8, mean_backprop_depth=4)
OFFICIAL = {
    "diagonal": lambda: ref.official_parcae_config(),
    "linear-bias-untied": lambda: ref.official_parcae_config(injection_type="linear", bias=True, tie_embeddings=False),
    "add-qkbias": lambda: ref.official_parcae_config(injection_type="add", qk_bias=True),
    # GQA (Hkv = 2) and ds = 48 ≠ d; with 2/1/3 layers the core block has no live value embedding
    "gqa-ds-no-core-ve": lambda: ref.official_parcae_config(
        num_key_value_heads=2, recurrent_embedding_dimension=48, recurrent_num_attention_heads=3,
        recurrent_intermediation_embedding_dimension=96, **LAYERS_213),
    "odd-layers-linear": lambda: ref.official_parcae_config(
        injection_type="linear", n_layers_in_prelude=3, n_layers_in_recurrent_block=3, n_layers_in_coda=1,
        mean_recurrence=5, mean_backprop_depth=3),
    "softcap-gated-takase": lambda: ref.official_parcae_config(
        mlp_class_name="GatedMLP", nonlin_name="SiLU", logit_softcap=4.0, init_strategy="takase-scaled"),
    "gated-gelu-clip": lambda: ref.official_parcae_config(mlp_class_name="GatedMLP", nonlin_name="GELU",
                                                          clip_qkv=0.8, rope_settings={"rope_base": 10000}),
    "gpt-tied": lambda: ref.official_gpt_config(n_layer=3),
    "gpt-untied-triton": lambda: ref.official_gpt_config(tie_embeddings=False),  # head stored (d, V)
    "gpt-untied-plain": lambda: ref.official_gpt_config(tie_embeddings=False, use_fused_head="", n_layer=5),
}


def _parity(model: LoopedLM, cfg: dict, sd: dict, idx: torch.Tensor, loops=(1, 8, 16)) -> None:
    for T in loops if model.config.looped else (None,):
        want = ref.official_forward(cfg, sd, idx, T)
        with torch.no_grad():
            got = model(idx, n_loops=T).logits if T is not None else model(idx).logits
        assert got.shape == want.shape
        err = (got - want).abs().max()
        assert err <= 1e-5 * want.abs().max(), (T, float(err))


@pytest.mark.parametrize("variant", list(OFFICIAL))
def test_official_import_matches_the_reference_forward(tmp_path, variant):
    cfg = OFFICIAL[variant]()
    sd = ref.random_official_state_dict(cfg, seed=7)
    ref.write_official_checkpoint(tmp_path / "official", cfg, sd)
    model = load(tmp_path / "official")
    assert model.checkpoint_info.format == "parcae" and model.checkpoint_info.nonfinite == []
    assert model.config.vocab_size == 128 and model.config.looped == (cfg["_class_name"] == "ParcaeConfig")
    idx = tokens(B=2, S=24, seed=11, vocab=cfg["vocab_size"])
    _parity(model, cfg, sd, idx)
    # ... and through a loopdyn save → load round trip
    _parity(load(save(model, tmp_path / "ours")), cfg, sd, idx, loops=(3,))


@pytest.mark.parametrize("weights_name,prefix,class_name,wrap", [
    ("pytorch_model.bin", "", True, None),
    ("model.pt", "module.", True, None),
    ("model.pt", "_orig_mod.", True, None),
    ("model.pt", "", False, None),
    ("model.pt", "", True, "model"),
    ("model.bin", "_orig_mod.module.", False, "model"),
    ("model.safetensors", "", True, None),
])
def test_official_weight_file_layouts(tmp_path, weights_name, prefix, class_name, wrap):
    cfg = ref.official_parcae_config(injection_type="linear", n_layers_in_coda=1)
    sd = ref.random_official_state_dict(cfg, seed=3)
    ref.write_official_checkpoint(tmp_path, cfg, sd, weights_name=weights_name, key_prefix=prefix,
                                  include_class_name=class_name, wrap_in=wrap)
    model = load(tmp_path / weights_name)
    assert Path(model.checkpoint_info.weights_file).name == weights_name
    _parity(model, cfg, sd, tokens(B=1, S=10, vocab=96), loops=(2,))


def test_official_tied_head_stored_once(tmp_path):
    cfg = ref.official_parcae_config()
    sd = ref.random_official_state_dict(cfg, seed=4)
    one = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    ref.write_official_checkpoint(tmp_path, cfg, one)
    _parity(load(tmp_path), cfg, sd, tokens(B=1, S=8, vocab=96), loops=(3,))


def test_official_unused_value_embeddings_are_noted_and_dropped(tmp_path):
    cfg = ref.official_parcae_config(**LAYERS_213)
    sd = ref.random_official_state_dict(cfg, seed=5)
    ref.write_official_checkpoint(tmp_path, cfg, sd)
    model = load(tmp_path)
    live = {b.table_key for b in ref.derived(cfg).blocks if b.live}
    assert {int(k) for k in model.value_embeds} == live
    assert any("never used" in note for note in model.checkpoint_info.notes)


# ---- bad checkpoints ---------------------------------------------------------------------

def _official_dir(tmp_path, **overrides):
    cfg = ref.official_parcae_config(**overrides)
    sd = ref.random_official_state_dict(cfg, seed=0)
    ref.write_official_checkpoint(tmp_path / "official", cfg, sd)
    return tmp_path / "official", cfg, sd


def _raises(path, *words):
    """load(path) raises a CheckpointError (an InputError) whose one-line message has every word."""
    with pytest.raises(CheckpointError) as info:
        load(path)
    message = str(info.value)
    assert isinstance(info.value, InputError) and "\n" not in message
    for word in words:
        assert str(word) in message, (word, message)
    return message


def test_missing_checkpoint(tmp_path):
    _raises(tmp_path / "nowhere", "nowhere", "no such checkpoint")
    (tmp_path / "empty").mkdir()
    _raises(tmp_path / "empty", "empty", "config.json")


def test_config_json_that_is_not_json(tmp_path):
    path = save(make_model(), tmp_path / "ckpt")
    (path / "config.json").write_text("{not json")
    _raises(path, path / "config.json", "not valid JSON")
    (path / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    _raises(path, path / "config.json")
    (path / "config.json").write_text("[1, 2]")
    _raises(path, path / "config.json", "JSON object")
    (path / "config.json").write_text('{"hello": 1}')
    _raises(path, path / "config.json", "not a loopdyn, official Parcae, Huginn/Raven or Ouro config")


def _edit_json(path: Path, edit) -> None:
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def test_unknown_or_missing_config_fields(tmp_path):
    path = save(make_model(), tmp_path / "ckpt")
    cfg_file = path / "config.json"
    original = cfg_file.read_text()
    _edit_json(cfg_file, lambda r: r["config"].update(dropout=0.1))
    _raises(path, cfg_file, "unknown", "dropout")
    cfg_file.write_text(original)
    _edit_json(cfg_file, lambda r: r["config"].pop("d_model"))
    _raises(path, cfg_file, "missing", "d_model")
    cfg_file.write_text(original)
    _edit_json(cfg_file, lambda r: r["config"].update(mean_loops="eight"))
    _raises(path, cfg_file, "mean_loops")
    cfg_file.write_text(original)
    _edit_json(cfg_file, lambda r: r.update(version=99))
    _raises(path, cfg_file, "version")

    official, _, _ = _official_dir(tmp_path)
    cfg_file = official / "config.json"
    original = cfg_file.read_text()
    _edit_json(cfg_file, lambda r: r.update(use_magic=True))
    _raises(official, cfg_file, "unknown", "use_magic")
    cfg_file.write_text(original)
    _edit_json(cfg_file, lambda r: r.pop("n_embd"))
    _raises(official, cfg_file, "missing", "n_embd")
    cfg_file.write_text(original)
    _edit_json(cfg_file, lambda r: r.update(injection_type="gru"))
    _raises(official, cfg_file, "injection_type", "gru")


def test_weights_that_do_not_match_the_config(tmp_path):
    path = save(make_model(), tmp_path / "ckpt")
    _edit_json(path / "config.json", lambda r: r["config"].update(d_mlp=96))
    _raises(path, path / "model.safetensors", "prelude.0.mlp.fc.weight", "shape", "(96, 64)")
    _edit_json(path / "config.json", lambda r: r["config"].update(d_mlp=128, n_coda=2))
    _raises(path, path / "model.safetensors", "missing", "coda.1")

    official, cfg, sd = _official_dir(tmp_path)
    _edit_json(official / "config.json", lambda r: r.update(intermediate_size=192))
    _raises(official, official / "model.pt", "shape", "mlp.fc.weight")
    bad = dict(sd)
    bad.pop("transformer.coda.1.attn.ve_gate.weight")
    bad["transformer.extra.weight"] = torch.zeros(3)
    ref.write_official_checkpoint(official, cfg, bad)
    _raises(official, official / "model.pt", "missing", "ve_gate", "unexpected", "transformer.extra.weight")


def test_unreadable_or_corrupt_weights(tmp_path):
    path = save(make_model(), tmp_path / "ckpt")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    _raises(path, weights, "unreadable")
    weights.write_bytes(b"\x00" * 64)
    _raises(path, weights)
    weights.unlink()
    _raises(path, weights, "missing")

    official, _, _ = _official_dir(tmp_path)
    pt = official / "model.pt"
    pt.write_bytes(pt.read_bytes()[:1000])
    _raises(official, pt)
    pt.write_bytes(b"not a zip, not a pickle")
    _raises(official, pt)
    pt.unlink()
    _raises(official, official, "no weights file")
    torch.save([torch.zeros(400_000)], pt)  # a list, not a state dict (as large as the weights)
    _raises(official, pt, "state dict")


class _Evil:
    """Unpickling this object creates a file: the marker that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_that_is_not_plain_tensors_is_refused(tmp_path):
    official, cfg, sd = _official_dir(tmp_path)
    marker = tmp_path / "pwned"
    state = dict(sd)
    state["transformer.ln_f.weight"] = _Evil(marker)
    torch.save(state, official / "model.pt")
    _raises(official, official / "model.pt", "refused")
    assert not marker.exists()
    # control: the same file, unpickled without weights_only, does run the code
    control = tmp_path / "control"
    torch.save({"x": _Evil(control)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()
    # a plain pickle (not a torch zip) with the same payload is refused too
    with open(official / "model.pt", "wb") as f:
        pickle.dump({"x": _Evil(marker)}, f, protocol=2)
    _raises(official, official / "model.pt", "refused")
    assert not marker.exists()


def test_non_finite_weights_load_with_a_warning_and_a_flag(tmp_path):
    model = make_model()
    with torch.no_grad():
        model.core[1].mlp.fc.weight[0, 0] = float("nan")
        model.injection.dt_bias[3] = float("inf")
    path = save(model, tmp_path / "ckpt")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        loaded = load(path)
    assert sorted(loaded.checkpoint_info.nonfinite) == ["core.1.mlp.fc.weight", "injection.dt_bias"]
    assert torch.isnan(loaded.core[1].mlp.fc.weight[0, 0])

    official, cfg, sd = _official_dir(tmp_path)
    sd = dict(sd)
    wte = sd["transformer.wte.weight"].clone()
    wte[5, 2] = float("-inf")
    sd["transformer.wte.weight"] = sd["lm_head.weight"] = wte  # tied: the same tensor
    sd["transformer.adapter.A_log"] = torch.full_like(sd["transformer.adapter.A_log"], float("nan"))
    ref.write_official_checkpoint(official, cfg, sd)
    with pytest.warns(RuntimeWarning, match="model.pt"):
        loaded = load(official)
    assert sorted(loaded.checkpoint_info.nonfinite) == ["injection.A_log", "wte.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(save(make_model(), tmp_path / "clean"))  # no warning when every weight is finite


def test_official_loader_helpers_are_strict():
    from loopdyn.models.importers import parcae

    assert parcae._strip_prefixes("_orig_mod.module.transformer.wte.weight") == "transformer.wte.weight"
    with pytest.raises(CheckpointError, match="unknown config field.*surprise"):
        parcae.official_config_to_loop_config(dict(ref.official_parcae_config(), surprise=1))


def test_outputs_get_the_permissions_a_plain_write_would(tmp_path):
    """Atomic writes go through mkstemp/mkdtemp (0600/0700); the results must look like files
    and folders made with open() and mkdir() under the same umask."""
    from loopdyn.io import atomic_write_text

    atomic_write_text(tmp_path / "report.txt", "x")
    save(make_model(seed=1), tmp_path / "ckpt")
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain_dir").mkdir()
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "report.txt") == mode(tmp_path / "plain.txt")
    assert mode(tmp_path / "ckpt" / "config.json") == mode(tmp_path / "plain.txt")
    assert mode(tmp_path / "ckpt") == mode(tmp_path / "plain_dir")
