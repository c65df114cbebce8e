"""Method-owned model parts (`common.parts`): the shared model names no method, each part's arrays live under its
name, private parts never leave the node, a code part draws its initialisation after its tower's shared arrays, and
runs saved before parts existed still load."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import common.parts as parts
from common.blocks import ModelConfig
from common.model import XmrModel, load_numpy_state, state_to_numpy, upload_keys
from common.parts import PartSpec, fedcafe, personal, upgrade_state

CFG = dict(img_dim=12, txt_dim=10, embed_dim=16, adapter_dim=4, hash_bits=8, dropout=0.0)


def _model(seed: int = 0, **kw) -> XmrModel:
    torch.manual_seed(seed)
    return XmrModel(ModelConfig(**CFG, **kw))


def test_the_shared_model_names_no_method() -> None:
    text = (Path(__file__).resolve().parents[1] / "common" / "model.py").read_text()
    found = re.findall(r"afe|memory|personal|fedcafe|plfedcmh|rcsr", text, flags=re.IGNORECASE)
    assert not found, f"common/model.py mentions {sorted(set(found))}"


def test_parts_arrays_live_under_their_names_and_private_parts_are_not_uploaded() -> None:
    model = _model(parts=("personal", "fedcafe"), concepts=5)
    keys = list(model.state_dict())
    plain = set(_model().state_dict())
    extra = sorted(set(keys) - plain)
    assert extra and all(re.match(r"^(img|txt)\.(personal|fedcafe)\.", k) for k in extra), extra
    assert f"img.{fedcafe.NAME}.memory" == fedcafe.memory_key("img") in keys
    sent = upload_keys(keys, ("img", "txt"))
    assert not any(".personal." in k for k in sent), "a private part never leaves the node"
    assert fedcafe.memory_key("img") in sent and "img.fedcafe.classifier.weight" in sent
    assert set(sent) | {k for k in keys if ".personal." in k} == set(keys)


def test_a_code_part_draws_its_initialisation_after_its_towers_shared_arrays() -> None:
    """The image tower (built first) starts as without the part; the text tower draws after the image tower's
    part, as it did when the head was built into the tower."""
    with_head = state_to_numpy(_model(seed=3, parts=("fedcafe",), concepts=5))
    plain = state_to_numpy(_model(seed=3))
    for key, value in plain.items():
        if key.startswith("txt."):
            continue
        np.testing.assert_array_equal(with_head[key], value, err_msg=key)


def test_views_and_code_parts_act_where_they_sit() -> None:
    model = _model(parts=("personal", "fedcafe"), concepts=5).eval()
    x = torch.randn(4, 12)
    torch.testing.assert_close(model.img.embed(x, personal.NAME), model.img.embed(x), msg="zero-init: identity")
    with torch.no_grad():
        model.img.personal.up.weight.fill_(0.1)
    assert not torch.allclose(model.img.embed(x, personal.NAME), model.img.embed(x))
    out = model.img.code(model.img.embed(x))
    assert out.aux is not None and out.aux.shape == (4, 5)
    torch.testing.assert_close(model.img(x)[1], torch.tanh(out.feature))
    with pytest.raises(ValueError, match="no 'personal' view"):
        _model().img.embed(x, personal.NAME)


def test_bad_part_lists_are_refused_naming_them(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown model parts \\['halo'\\]"):
        _model(parts=("halo",))
    with pytest.raises(ValueError, match="repeat"):
        _model(parts=("personal", "personal"))
    with pytest.raises(ValueError, match="concept count"):
        _model(parts=("fedcafe",))
    monkeypatch.setitem(parts.PARTS, "second", PartSpec("code", fedcafe.build))
    with pytest.raises(ValueError, match="at most one code part"):
        _model(parts=("fedcafe", "second"), concepts=3)


def test_a_run_saved_before_parts_existed_still_loads() -> None:
    model = _model(seed=1, parts=("personal", "fedcafe"), concepts=5)
    old_state = {k.replace(".fedcafe.", "."): v for k, v in state_to_numpy(model).items()}
    assert "img.classifier.weight" in old_state and "img.memory" in old_state
    old_cfg = {k: v for k, v in ModelConfig(**CFG).to_dict().items() if k not in ("parts", "concepts")}
    old_cfg |= {"personal": True, "afe_concepts": 5}
    assert ModelConfig.from_dict(old_cfg).parts == (personal.NAME, fedcafe.NAME)
    again = XmrModel(ModelConfig.from_dict(old_cfg))
    load_numpy_state(again, upgrade_state(old_state))
    for key, value in state_to_numpy(model).items():
        np.testing.assert_array_equal(state_to_numpy(again)[key], value, err_msg=key)
    assert ModelConfig.from_dict(model.cfg.to_dict()) == model.cfg


def test_a_checkpoint_and_a_node_state_saved_before_parts_existed_still_load(tmp_path: Path) -> None:
    from fedxmr_client.state_store import NodeStateStore
    from fedxmr_server.strategies.state import StrategyState

    old = {"img.classifier.weight": np.ones((2, 3), np.float32), "img.memory": np.zeros((2, 3), np.float32)}
    StrategyState(arrays=dict(old), clients={"client-0": dict(old)}).save(tmp_path / "state.npz")
    state = StrategyState.load(tmp_path / "state.npz")
    assert set(state.arrays) == set(state.clients["client-0"]) == {"img.fedcafe.classifier.weight",
                                                                    fedcafe.memory_key("img")}
    store = NodeStateStore(tmp_path / "node")
    store.save(1, {"node-model": dict(old)}, selected_round=1)
    assert set(store.load(1)["node-model"]) == {"img.fedcafe.classifier.weight", fedcafe.memory_key("img")}
