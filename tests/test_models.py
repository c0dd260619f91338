"""Model layer: REACT gated blocks, tuning modes, checkpoints, errors. No Ray involved."""

from __future__ import annotations

import subprocess
import sys

import open_clip
import pytest
import torch

from react_ray.config import ModelConfig
from react_ray.models import (
    GatedResidualBlock,
    apply_tuning_mode,
    build_model,
    export_react_checkpoint,
    gate_values,
    gated_blocks,
    insert_gated_blocks,
    react_gated_layers,
    read_state_dict,
)
from react_ray.models.factory import _resolve_pretrained, register_tiny_models
from react_ray.models.gated import set_gated_grad_checkpointing
from react_ray.models.params import parameter_report

# The gated keys of REACT's released checkpoints, per block, in their order.
REACT_GATED_SUFFIXES = [
    "alpha_attn",
    "alpha_dense",
    "ln_1.weight",
    "ln_1.bias",
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "attn.out_proj.weight",
    "attn.out_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
]


def _gated_pair(name: str = "react-micro", k: int = 2):
    base = build_model(ModelConfig(name=name, gated_layers=0))
    gated = build_model(ModelConfig(name=name, gated_layers=k))
    gated.model.load_state_dict(base.model.state_dict(), strict=False)
    return base, gated


def test_model_layer_imports_no_ray():
    code = "import sys, react_ray.models, react_ray.models.params; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_step0_gated_model_equals_base():
    base, gated = _gated_pair()
    torch.manual_seed(0)
    images = torch.randn(6, 3, 32, 32)
    texts = ["a red circle", "a blue star on a striped background", ""]
    assert torch.allclose(base.encode_images(images), gated.encode_images(images), atol=1e-6)
    assert torch.allclose(base.encode_texts(texts), gated.encode_texts(texts), atol=1e-6)
    # ...and only because the gates are zero: opening them changes the image features.
    for block in gated_blocks(gated.model):
        block.alpha_attn.data.fill_(1.0)
    assert not torch.allclose(base.encode_images(images), gated.encode_images(images), atol=1e-3)


@pytest.mark.parametrize(
    "name, indices, width",
    [
        ("ViT-B-32", range(6, 12), 768),
        ("ViT-B-16", range(6, 12), 768),
        ("ViT-L-14", range(18, 24), 1024),
    ],
)
def test_real_configs_match_react_keys_and_shapes(name, indices, width):
    register_tiny_models()
    with torch.device("meta"):
        model = open_clip.create_model(name, device="meta")
        assert insert_gated_blocks(model, 6) == list(indices)
    gated = {k: tuple(v.shape) for k, v in model.state_dict().items() if ".gated_attn_block." in k}
    expected = [
        f"visual.transformer.resblocks.{i}.gated_attn_block.{s}"
        for i in indices
        for s in REACT_GATED_SUFFIXES
    ]
    assert list(gated) == expected
    i = indices[0]
    prefix = f"visual.transformer.resblocks.{i}.gated_attn_block."
    assert gated[prefix + "alpha_attn"] == ()
    assert gated[prefix + "attn.in_proj_weight"] == (3 * width, width)
    assert gated[prefix + "mlp.c_fc.weight"] == (4 * width, width)
    assert gated[prefix + "mlp.c_proj.weight"] == (width, 4 * width)
    per_block = sum(p.numel() for p in gated_blocks(model)[0].parameters())
    assert per_block == 12 * width * width + 13 * width + 2  # weights, biases and norms, two gates


def test_random_weight_models_are_identical_across_builds():
    """Every actor of a pool must embed with the same model, even without pretrained weights."""
    a, b = build_model("react-micro"), build_model(ModelConfig(name="react-micro", gated_layers=2))
    shared = a.model.state_dict()
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in shared.items())
    c = build_model(ModelConfig(name="react-micro", gated_layers=2))
    assert all(torch.equal(v, c.model.state_dict()[k]) for k, v in b.model.state_dict().items())
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    build_model("react-micro")
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is left alone


def test_vit_b32_gated_parameter_count_matches_react():
    report = parameter_report("ViT-B-32")
    assert (report.gated_layers, report.gated_block_params) == (6, 7_087_874)
    assert report.gated_image_trainable == 6 * 7_087_874 + 1  # + logit_scale


def test_activation_follows_the_base_model():
    with torch.device("meta"):
        quick = open_clip.create_model("ViT-B-32-quickgelu", device="meta")
        plain = open_clip.create_model("ViT-B-32", device="meta")
        insert_gated_blocks(quick, 1)
        insert_gated_blocks(plain, 1)
    assert type(gated_blocks(quick)[0].mlp.gelu) is open_clip.transformer.QuickGELU
    assert type(gated_blocks(plain)[0].mlp.gelu) is torch.nn.GELU


def test_trainable_sets_per_mode():
    _, gated = _gated_pair()
    names = [n for n, _ in gated.model.named_parameters()]
    trainable = apply_tuning_mode(gated.model, "gated-image")
    assert set(trainable) == {n for n in names if ".gated_attn_block." in n} | {"logit_scale"}
    base = build_model(ModelConfig(name="react-micro"))
    trainable = apply_tuning_mode(base.model, "locked-text")
    assert set(trainable) == {
        n for n, _ in base.model.named_parameters() if n.startswith("visual.")
    } | {"logit_scale"}
    text_params = [
        n
        for n, _ in base.model.named_parameters()
        if not n.startswith("visual.") and n != "logit_scale"
    ]
    assert text_params and not set(text_params) & set(trainable)
    with pytest.raises(ValueError, match="tuning mode: got 'frozen'.*gated-image, locked-text"):
        apply_tuning_mode(base.model, "frozen")
    with pytest.raises(ValueError, match="needs gated blocks"):
        apply_tuning_mode(base.model, "gated-image")


def test_gradients_reach_only_the_trainable_set():
    _, gated = _gated_pair()
    trainable = set(apply_tuning_mode(gated.model, "gated-image"))
    for block in gated_blocks(gated.model):  # open the gates so gradients flow through the blocks
        block.alpha_attn.data.fill_(0.5)
        block.alpha_dense.data.fill_(0.5)
    gated.model.train()
    image_features, text_features, scale = gated.model(
        torch.randn(4, 3, 32, 32), gated.tokenizer(["a"] * 4)
    )
    (scale * image_features @ text_features.T).logsumexp(1).mean().backward()
    with_grad = {
        n
        for n, p in gated.model.named_parameters()
        if p.grad is not None and p.grad.abs().sum() > 0
    }
    assert with_grad == trainable


def test_gradient_checkpointing_gives_identical_gradients():
    _, gated = _gated_pair()
    apply_tuning_mode(gated.model, "gated-image")
    for block in gated_blocks(gated.model):
        block.alpha_dense.data.fill_(0.3)
    gated.model.train()
    images = torch.randn(3, 3, 32, 32)

    def grads():
        gated.model.zero_grad()
        gated.model.encode_image(images).sum().backward()
        return [p.grad.clone() for p in gated_blocks(gated.model)[0].parameters()]

    plain = grads()
    set_gated_grad_checkpointing(gated.model, True)
    checkpointed = grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))


def test_react_checkpoint_round_trip_is_bit_exact(tmp_path):
    _, gated = _gated_pair()
    for block in gated_blocks(gated.model):
        torch.nn.init.normal_(block.alpha_attn, std=0.5)
    first = tmp_path / "react.pt"
    export_react_checkpoint(gated.model, str(first), gated.spec)
    saved = read_state_dict(str(first))
    assert all(v.dtype == torch.float16 for v in saved.values())
    # Gated layers are read off the checkpoint's keys; strict loading.
    loaded = build_model(ModelConfig(name="react-micro", checkpoint=f"file://{first}"))
    assert loaded.gated_indices == gated.gated_indices
    second = tmp_path / "again.pt"
    export_react_checkpoint(loaded.model, str(second), loaded.spec)
    again = read_state_dict(str(second))
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    assert gate_values(loaded.model) == pytest.approx(gate_values(gated.model), abs=1e-3)


def test_checkpoint_with_module_prefix_loads(tmp_path):
    _, gated = _gated_pair()
    state = {f"module.{k}": v.half() for k, v in gated.model.state_dict().items()}
    torch.save(state, tmp_path / "ddp.pt")
    loaded = build_model(ModelConfig(name="react-micro", checkpoint=str(tmp_path / "ddp.pt")))
    images = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded.encode_images(images), gated.encode_images(images), atol=1e-2)


def test_checkpoint_mismatch_is_a_precise_error(tmp_path):
    base = build_model(ModelConfig(name="react-micro"))
    state = base.model.state_dict()
    del state["logit_scale"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(
        ValueError,
        match=r"broken.pt does not fit the model: 1 missing keys \(e.g. \['logit_scale'\]\)",
    ):
        build_model(ModelConfig(name="react-micro", checkpoint=str(tmp_path / "broken.pt")))
    # a gated checkpoint forced into a plain model
    with pytest.raises(ValueError, match="unexpected keys"):
        _, gated = _gated_pair()
        export_react_checkpoint(gated.model, str(tmp_path / "gated.pt"), gated.spec)
        build_model(
            ModelConfig(name="react-micro", checkpoint=str(tmp_path / "gated.pt"), gated_layers=0)
        )


def test_unknown_model_and_pretrained_errors(tmp_path):
    with pytest.raises(
        ValueError, match=r"model.name: unknown model 'ViT-B-33'\. Close matches: .*ViT-B-32"
    ):
        build_model("ViT-B-33")
    with pytest.raises(
        ValueError,
        match=r"model.pretrained: 'laion9b' is not a tag of ViT-B-32; its tags are: .*openai",
    ):
        build_model(ModelConfig(name="ViT-B-32", pretrained="laion9b"))
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        build_model(ModelConfig(name="react-micro", pretrained=str(tmp_path / "missing.pt")))
    with pytest.raises(ValueError, match=r"gated_layers: got 9; the image tower has 4 blocks"):
        build_model(ModelConfig(name="react-micro", gated_layers=9))


def test_quickgelu_weights_need_the_quickgelu_model_and_keep_reacts_k():
    """OpenAI's weights were trained with QuickGELU; open_clip would only warn and build GELU."""
    with pytest.raises(
        ValueError,
        match=r"the 'openai' weights of ViT-B-32 were trained with QuickGELU; use name: "
        r"ViT-B-32-quickgelu",
    ):
        build_model(ModelConfig(name="ViT-B-32", pretrained="openai"))
    # accepted before any download
    assert _resolve_pretrained("ViT-B-32-quickgelu", "openai") == "openai"
    assert _resolve_pretrained("ViT-B-32", "laion2b_s34b_b79k") == "laion2b_s34b_b79k"
    assert [
        react_gated_layers(f"{n}-quickgelu")
        for n in ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-bigG-14")
    ] == [6, 6, 6, 12]


def test_pretrained_weights_file_loads(tmp_path):
    """The `pretrained=` path open_clip takes for a downloaded weights file."""
    base = build_model("react-micro")
    torch.save(base.model.state_dict(), tmp_path / "weights.pt")
    again = build_model(ModelConfig(name="react-micro", pretrained=str(tmp_path / "weights.pt")))
    assert all(
        torch.equal(a, b)
        for a, b in zip(base.model.state_dict().values(), again.model.state_dict().values())
    )


@pytest.mark.s3
def test_checkpoint_from_s3(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("REACT_RAY_CACHE", str(tmp_path / "cache"))
    _, gated = _gated_pair()
    uri = f"{s3_bucket}/checkpoints/react.pt"
    export_react_checkpoint(gated.model, uri, gated.spec)
    loaded = build_model(ModelConfig(name="react-micro", checkpoint=uri))
    assert loaded.gated_indices == [2, 3]
    assert isinstance(gated_blocks(loaded.model)[0], GatedResidualBlock)


def test_bigg_gated_blocks_keep_reacts_mlp_ratio():
    """REACT's gated block never takes the tower's MLP ratio: 4.0 on bigG, whose own blocks use
    4.9231."""
    with torch.device("meta"):
        model = open_clip.create_model("ViT-bigG-14", device="meta")
        assert insert_gated_blocks(model, react_gated_layers("ViT-bigG-14")) == list(range(36, 48))
    block = model.visual.transformer.resblocks[36]
    assert tuple(block.mlp.c_fc.weight.shape) == (8192, 1664)  # int(1664 * 4.9231)
    assert tuple(block.gated_attn_block.mlp.c_fc.weight.shape) == (4 * 1664, 1664)


def _react_release_state(name: str, indices: list[int]) -> dict[str, torch.Tensor]:
    """A state_dict with a released checkpoint's exact keys and shapes, on the meta device: the
    base model's OpenCLIP keys, then REACT's gated keys (reference/react-method.md) per block."""
    state = {
        k: torch.empty(v.shape, dtype=torch.float16, device="meta")
        for k, v in open_clip.create_model(name, device="meta").state_dict().items()
    }
    width = open_clip.get_model_config(name)["vision_cfg"]["width"]
    shapes = {
        "alpha_attn": (),
        "alpha_dense": (),
        "ln_1.weight": (width,),
        "ln_1.bias": (width,),
        "attn.in_proj_weight": (3 * width, width),
        "attn.in_proj_bias": (3 * width,),
        "attn.out_proj.weight": (width, width),
        "attn.out_proj.bias": (width,),
        "ln_2.weight": (width,),
        "ln_2.bias": (width,),
        "mlp.c_fc.weight": (4 * width, width),
        "mlp.c_fc.bias": (4 * width,),
        "mlp.c_proj.weight": (width, 4 * width),
        "mlp.c_proj.bias": (width,),
    }
    for i in indices:
        for suffix in REACT_GATED_SUFFIXES:
            state[f"visual.transformer.resblocks.{i}.gated_attn_block.{suffix}"] = torch.empty(
                shapes[suffix], dtype=torch.float16, device="meta"
            )
    return state


@pytest.mark.parametrize(
    "name, tag, model, indices, mean",
    [
        (
            "react_ViT-B-32",
            "react_clip_ret_laion400m",
            "ViT-B-32-quickgelu",
            range(6, 12),
            0.48145466,
        ),
        (
            "react_ViT-B-32-quickgelu",
            "react_openclip_laion400m_ret_laion400m",
            "ViT-B-32-quickgelu",
            range(6, 12),
            0.48145466,
        ),
        (
            "react_ViT-B-32",
            "react_openclip_laion2b_ret_laion400m",
            "ViT-B-32",
            range(6, 12),
            0.48145466,
        ),
        # locked-text
        (
            "ViT-B-32",
            "react_clip_ret_laion400m",
            "ViT-B-32-quickgelu",
            [],
            0.48145466,
        ),
        (
            "react_ViT-B-16",
            "react_clip_ret_laion400m",
            "ViT-B-16-quickgelu",
            range(6, 12),
            0.48145466,
        ),
        ("ViT-B-16", "react_clip_ret_laion400m", "ViT-B-16-quickgelu", [], 0.48145466),
        (
            "react_ViT-L-14",
            "react_clip_ret_laion2b",
            "ViT-L-14-quickgelu",
            range(18, 24),
            0.48145466,
        ),
        ("react_ViT-L-14", "react_openclip_laion2b_ret_laion2b", "ViT-L-14", range(18, 24), 0.5),
        (
            "react_ViT-bigG-14",
            "react_openclip_laion2b_ret_laion2b",
            "ViT-bigG-14",
            range(36, 48),
            0.48145466,
        ),
    ],
)
def test_reacts_released_checkpoints_load_by_their_names(
    tmp_path, monkeypatch, name, tag, model, indices, mean
):
    """A `model:` entry names a release as REACT does; the local copy (exact keys and shapes, meta
    tensors: no 10 GB files here) loads strictly into the model that fits it."""
    from react_ray.models.releases import RELEASED_FILES

    monkeypatch.setenv("REACT_RAY_WEIGHTS", str(tmp_path))
    spec = ModelConfig(name=name, pretrained=tag)
    assert (spec.name, spec.gated_layers, spec.release) == (model, len(indices), f"{name}:{tag}")
    missing = pytest.raises(
        FileNotFoundError,
        match=rf"REACT's {name}:{tag} is read from .*; fetch "
        r"react-vl/react-in1k/\S+\.pt from the Hugging Face hub",
    )
    with missing:
        build_model(spec, device="meta")
    file = RELEASED_FILES[(name.removesuffix("-quickgelu"), tag)]
    torch.save(_react_release_state(model, list(indices)), tmp_path / file)
    clip = build_model(spec, device="meta")
    assert clip.gated_indices == list(indices)
    activation = type(clip.model.visual.transformer.resblocks[-1].mlp.gelu)
    assert (activation is open_clip.transformer.QuickGELU) == model.endswith("-quickgelu")
    assert clip.preprocess_cfg.mean[0] == pytest.approx(mean)
    with pytest.raises(
        ValueError, match="REACT released no react_ViT-B-16:react_clip_ret_laion2b; its checkpoints"
    ):
        ModelConfig(name="react_ViT-B-16", pretrained="react_clip_ret_laion2b")
