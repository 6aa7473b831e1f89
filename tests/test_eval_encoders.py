"""load_encoder: every checkpoint layout the tests write, features equal to the source model's, and each bad file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, TensorDataset

from magma_composer.checkpoints import export_encoder, file_sha256
from magma_composer.evaluate.encoders import EncoderError, load_encoder
from magma_composer.evaluate.features import encode
from magma_composer.models import ComposerMAE
from magma_composer.models.mae import encoder_architecture
from magma_composer.models.pos_embed import sincos_2d
from magma_composer.options import OptionError
from tests.conftest import TINY_MODEL, quick_trainer

TINY_ARCH = {
    "embed_dim": 32,
    "depth": 4,
    "num_heads": 2,
    "patch_size": 8,
    "img_size": 32,
    "in_chans": 3,
    "mlp_ratio": 4.0,
    "qkv_bias": True,
}


def images(n: int = 6, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[ComposerMAE, Path]:
    """A tiny ComposerMAE after 2 real training steps, and the Composer checkpoint that run saved."""
    folder = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = ComposerMAE(**TINY_MODEL, mask_seed=0)
    data = TensorDataset(images(16, seed=1), torch.zeros(16, dtype=torch.long))
    trainer, _ = quick_trainer(
        model, [], DataLoader(data, batch_size=8), max_duration="2ba", save_folder=str(folder), save_interval="2ba"
    )
    trainer.fit()
    trainer.close()
    model.eval()
    return model, folder / "ep0-ba2-rank0.pt"


def checkpoint_copy(source: Path, target: Path, edit) -> Path:
    ckpt = torch.load(source, weights_only=False)
    edit(ckpt)
    torch.save(ckpt, target)
    return target


def assert_same_features(loaded, model: ComposerMAE) -> None:
    x = images()
    with torch.no_grad():
        for pool in ("cls", "mean"):
            expected = model.extract_features(x, pool=pool)
            got = encode(loaded.vit, x, pool, loaded.prepare)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def timm_vit(embed_dim: int = 192, num_heads: int = 3, seed: int = 2) -> VisionTransformer:
    torch.manual_seed(seed)
    vit = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=embed_dim, depth=2, num_heads=num_heads, num_classes=0
    ).eval()
    with torch.no_grad():  # timm's init leaves biases and the CLS token at zero: make every tensor count
        for p in vit.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return vit


# ------------------------------------------------------------------------------------------------ our checkpoints
def test_composer_checkpoint_gives_the_trained_encoder(trained):
    model, path = trained
    loaded = load_encoder(str(path))
    assert loaded.format == "composer" and loaded.weights == "checkpoint" and loaded.source == str(path)
    assert loaded.sha256 == file_sha256(path)
    # 32 wide is no standard timm width: num_heads 2 can only come from the checkpoint's record
    assert loaded.arch == encoder_architecture(model.encoder) == TINY_ARCH
    assert loaded.prepare is None and loaded.normalize == "imagenet"
    assert not loaded.vit.training and loaded.vit.num_classes == 0
    assert next(loaded.vit.parameters()).device.type == "cpu"
    for name, tensor in model.encoder.state_dict().items():
        assert torch.equal(loaded.vit.state_dict()[name], tensor), name
    assert_same_features(loaded, model)
    # the symbolic link Composer writes points at the same file
    assert load_encoder(str(path.parent / "latest-rank0.pt")).sha256 == loaded.sha256


def test_truncated_checkpoint_is_refused_by_its_hash_file(trained, tmp_path):
    _, path = trained
    copy = tmp_path / "ckpt.pt"
    data = path.read_bytes()
    copy.write_bytes(data[: len(data) // 2])
    (tmp_path / "ckpt.pt.sha256").write_text(f"{file_sha256(path)}  ckpt.pt\n")  # as CheckpointHashes writes it
    with pytest.raises(EncoderError, match=r"ckpt\.pt is altered or truncated"):
        load_encoder(str(copy))


def test_composer_checkpoint_with_a_module_prefix(trained, tmp_path):
    model, path = trained

    def prefix(ckpt):
        ckpt["state"]["model"] = {f"module.{k}": v for k, v in ckpt["state"]["model"].items()}

    loaded = load_encoder(str(checkpoint_copy(path, tmp_path / "ddp.pt", prefix)), format="composer")
    assert loaded.arch["num_heads"] == 2
    assert_same_features(loaded, model)


def test_checkpoint_without_the_architecture_record(trained, tmp_path):
    """Checkpoints written before the record: the model still loads them; the encoder needs num_heads."""
    model, path = trained

    def old(ckpt):
        del ckpt["state"]["model"]["_extra_state"]["encoder"]

    old_path = checkpoint_copy(path, tmp_path / "old.pt", old)
    with pytest.raises(EncoderError, match=r"old\.pt: the number of attention heads is not recorded.*give num_heads"):
        load_encoder(str(old_path))
    assert_same_features(load_encoder(str(old_path), num_heads=2), model)
    fresh = ComposerMAE(**TINY_MODEL, mask_seed=9)
    fresh.load_state_dict(torch.load(old_path, weights_only=False)["state"]["model"])
    assert fresh.mask_seed == model.mask_seed and fresh.get_extra_state()["encoder"] == TINY_ARCH


def test_model_refuses_a_checkpoint_of_another_architecture(trained):
    _, path = trained
    state = torch.load(path, weights_only=False)["state"]["model"]
    other = ComposerMAE(**{**TINY_MODEL, "encoder": {"embed_dim": 32, "depth": 4, "num_heads": 4}})
    # the shapes agree: only the record can tell 2 heads from 4
    with pytest.raises(ValueError, match=r"num_heads 2 \(this model: 4\)"):
        other.load_state_dict(state)


def test_num_heads_contradicting_the_record(trained):
    _, path = trained
    with pytest.raises(EncoderError, match="num_heads 4 contradicts the file's record"):
        load_encoder(str(path), num_heads=4)
    assert load_encoder(str(path), num_heads=2).arch["num_heads"] == 2


# ------------------------------------------------------------------------------------------------ exported (timm)
def test_exported_encoder_and_its_sidecar(trained, tmp_path):
    model, _ = trained
    path = tmp_path / "encoder.pt"
    digest = export_encoder(model, str(path))
    sidecar = json.loads((tmp_path / "encoder.pt.json").read_text())
    assert sidecar == {"format": "magma_composer.encoder/1", "sha256": digest, "architecture": TINY_ARCH}
    loaded = load_encoder(str(path))
    assert loaded.format == "timm" and loaded.sha256 == digest and loaded.arch == TINY_ARCH
    assert_same_features(loaded, model)

    # the file replaced by another tool: its .sha256 no longer matches, and without that file the sidecar says so
    torch.save(torch.load(path, weights_only=True), path)
    with pytest.raises(EncoderError, match=r"encoder\.pt is altered or truncated"):
        load_encoder(str(path))
    (tmp_path / "encoder.pt.sha256").unlink()
    with pytest.raises(EncoderError, match=r"encoder\.pt\.json was written for another file"):
        load_encoder(str(path))
    # no sidecar, a width with no standard head count: num_heads is required, then used
    (tmp_path / "encoder.pt.json").unlink()
    with pytest.raises(EncoderError, match="embed_dim 32 is not a standard timm width.*give num_heads"):
        load_encoder(str(path))
    assert_same_features(load_encoder(str(path), num_heads=2), model)
    # exporting again replaces file and sidecar together
    digest = export_encoder(model, str(path))
    assert json.loads((tmp_path / "encoder.pt.json").read_text())["sha256"] == digest == file_sha256(path)


def test_safetensors_in_timm_layout(tmp_path):
    from safetensors.torch import save_file

    vit = timm_vit()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    loaded = load_encoder(str(path))
    assert loaded.format == "timm" and loaded.arch["num_heads"] == 3  # 192 wide: timm's ViT-Tiny heads
    assert loaded.arch == {**TINY_ARCH, "embed_dim": 192, "depth": 2, "num_heads": 3}
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(encode(loaded.vit, x), vit.forward_features(x)[:, 0], rtol=1e-5, atol=1e-6)
    # timm's pytorch_model.bin: the same tensors through torch.save
    torch.save(vit.state_dict(), tmp_path / "pytorch_model.bin")
    assert load_encoder(str(tmp_path / "pytorch_model.bin")).arch == loaded.arch


# ------------------------------------------------------------------------------------------------ facebookresearch/mae
def mae_state(vit: VisionTransformer, decoder_dim: int = 16) -> dict[str, torch.Tensor]:
    """facebookresearch/mae's MaskedAutoencoderViT keys: the timm encoder's, then the decoder's."""
    g = torch.Generator().manual_seed(3)
    state = dict(vit.state_dict())
    n = vit.patch_embed.num_patches
    state.update(
        {
            "mask_token": torch.randn(1, 1, decoder_dim, generator=g),
            "decoder_pos_embed": torch.randn(1, n + 1, decoder_dim, generator=g),
            "decoder_embed.weight": torch.randn(decoder_dim, vit.embed_dim, generator=g),
            "decoder_embed.bias": torch.randn(decoder_dim, generator=g),
            "decoder_blocks.0.norm1.weight": torch.randn(decoder_dim, generator=g),
            "decoder_blocks.0.attn.qkv.weight": torch.randn(3 * decoder_dim, decoder_dim, generator=g),
            "decoder_norm.weight": torch.randn(decoder_dim, generator=g),
            "decoder_pred.weight": torch.randn(8 * 8 * 3, decoder_dim, generator=g),
            "decoder_pred.bias": torch.randn(8 * 8 * 3, generator=g),
        }
    )
    return state


def test_mae_pretrain_checkpoint_drops_the_decoder(tmp_path):
    vit = timm_vit()
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": mae_state(vit)}, path)
    loaded = load_encoder(str(path))
    assert loaded.format == "mae" and loaded.arch["embed_dim"] == 192 and loaded.arch["num_heads"] == 3
    assert set(loaded.vit.state_dict()) == set(vit.state_dict())
    x = images()
    with torch.no_grad():
        for pool, expected in (
            ("cls", vit.forward_features(x)[:, 0]),
            ("mean", vit.forward_features(x)[:, 1:].mean(1)),
        ):
            torch.testing.assert_close(encode(loaded.vit, x, pool), expected, rtol=1e-5, atol=1e-6)
    # forcing the layout of another kind of file says what the file holds
    with pytest.raises(EncoderError, match=r"not a Composer checkpoint \(no state\.model\).*'model'"):
        load_encoder(str(path), format="composer")
    with pytest.raises(EncoderError, match=r"not a timm state dict"):
        load_encoder(str(path), format="timm")


def test_mae_finetuned_checkpoint(tmp_path):
    vit = timm_vit()
    state = dict(vit.state_dict())
    state.update({"head.weight": torch.randn(10, 192), "head.bias": torch.zeros(10)})
    # with the CLS token (global_pool=False) the final norm stays: the head is dropped
    torch.save(
        {"model": {**state, "fc_norm.weight": torch.ones(192), "fc_norm.bias": torch.zeros(192)}}, tmp_path / "a.pth"
    )
    assert set(load_encoder(str(tmp_path / "a.pth")).vit.state_dict()) == set(vit.state_dict())
    # global pooling deleted the final norm: no per-token features exist
    pooled = {k: v for k, v in state.items() if not k.startswith("norm.")}
    torch.save(
        {"model": {**pooled, "fc_norm.weight": torch.ones(192), "fc_norm.bias": torch.zeros(192)}}, tmp_path / "b.pth"
    )
    with pytest.raises(EncoderError, match=r"b\.pth is a fine-tuned classifier with global pooling"):
        load_encoder(str(tmp_path / "b.pth"))


# ------------------------------------------------------------------------------------------------ random init
def test_random_weights_baseline(trained):
    model, path = trained
    a = load_encoder(str(path), weights="random", seed=1)
    b = load_encoder(str(path), weights="random", seed=1)
    c = load_encoder(str(path), weights="random", seed=2)
    assert a.weights == "random" and a.arch == TINY_ARCH and a.format == "composer"
    assert a.sha256 == b.sha256 != c.sha256 and a.sha256 != file_sha256(path)
    for name, tensor in a.vit.state_dict().items():
        assert torch.equal(tensor, b.vit.state_dict()[name]), name
    assert not torch.equal(a.vit.blocks[0].attn.qkv.weight, c.vit.blocks[0].attn.qkv.weight)
    assert not torch.equal(a.vit.blocks[0].attn.qkv.weight, model.encoder.blocks[0].attn.qkv.weight)
    # the MAE initialisation: fixed sin-cos positions, xavier linears with zero biases, unit norms
    torch.testing.assert_close(a.vit.pos_embed[0], sincos_2d(32, 4, 4, num_prefix_tokens=1))
    assert torch.count_nonzero(a.vit.blocks[0].mlp.fc1.bias) == 0 and torch.all(a.vit.norm.weight == 1)
    # and the global RNG is untouched
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    load_encoder(str(path), weights="random", seed=3)
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------------------------------------------------ PCA basis (PMAE)
@pytest.fixture
def basis_file(tmp_path) -> Path:
    from magma_composer.pca.basis import PCABasis, save_basis

    g = torch.Generator().manual_seed(4)
    d = 3 * 32 * 32
    components, _ = torch.linalg.qr(torch.randn(d, 5, generator=g, dtype=torch.float64))
    basis = PCABasis(
        mean=torch.rand(d, generator=g, dtype=torch.float64),
        std=0.5 + torch.rand(d, generator=g, dtype=torch.float64),
        components=components.float(),
        eigenvalues=torch.linspace(5, 1, 5, dtype=torch.float64),
        ratios=torch.linspace(5, 1, 5, dtype=torch.float64) / d,
        image_size=32,
        channels=3,
        num_images=10,
        total_variance=float(d),
        method="exact",
    )
    return Path(save_basis(basis, tmp_path / "basis.pt").path)


def test_basis_standardises_raw_pixels(trained, basis_file, tmp_path):
    from magma_composer.algorithms.pca_masking import PCAMasking

    model, path = trained
    loaded = load_encoder(str(path), basis=str(basis_file))
    assert loaded.normalize == "none" and loaded.basis_sha256 is not None
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(loaded.prepare(pixels), PCAMasking(str(basis_file)).standardize(pixels))
    # the loaded encoder on raw pixels = the trained model fed the model's prepared input
    model.use_input_transform(PCAMasking(str(basis_file)))
    try:
        with torch.no_grad():
            torch.testing.assert_close(
                encode(loaded.vit, pixels, "cls", loaded.prepare), model.extract_features(pixels), rtol=1e-5, atol=1e-6
            )
    finally:
        model._input_transform = None
    with pytest.raises(OptionError, match="basis: PCA basis file .*does not exist"):
        load_encoder(str(path), basis=str(tmp_path / "none.pt"))


def test_a_pca_masking_checkpoint_needs_its_basis(trained, basis_file, tmp_path):
    from magma_composer.pca.basis import load_basis

    _, path = trained
    sha = load_basis(basis_file).sha256

    def pmae(sha256):
        def edit(ckpt):
            ckpt["state"]["algorithms"] = [("PCAMasking", {"basis_path": str(basis_file), "basis_sha256": sha256})]

        return edit

    pmae_path = checkpoint_copy(path, tmp_path / "pmae.pt", pmae(sha))
    with pytest.raises(EncoderError, match=r"pmae\.pt was trained with PCA masking on the basis .*basis\.pt"):
        load_encoder(str(pmae_path))
    assert load_encoder(str(pmae_path), basis=str(basis_file)).normalize == "none"
    other = checkpoint_copy(path, tmp_path / "other.pt", pmae("0" * 64))
    with pytest.raises(OptionError, match="is not the basis .*other.pt was trained with"):
        load_encoder(str(other), basis=str(basis_file))


def test_basis_of_another_image_size(tmp_path, basis_file):
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=192, depth=1, num_heads=3, num_classes=0)
    torch.save(vit.state_dict(), tmp_path / "small.pt")
    with pytest.raises(
        OptionError, match="basis: .* was fitted on 3 x 32 x 32 images, but the encoder takes 3 x 16 x 16"
    ):
        load_encoder(str(tmp_path / "small.pt"), basis=str(basis_file))


# ------------------------------------------------------------------------------------------------ bad files
def test_not_an_encoder(tmp_path):
    resnet_like = {
        "conv1.weight": torch.zeros(8, 3, 7, 7),
        "bn1.weight": torch.ones(8),
        "layer1.0.conv1.weight": torch.zeros(8, 8, 3, 3),
        "fc.weight": torch.zeros(10, 8),
    }
    torch.save(resnet_like, tmp_path / "resnet.pt")
    with pytest.raises(EncoderError, match=r"resnet\.pt holds no ViT encoder: .*'conv1\.weight', 'bn1\.weight'"):
        load_encoder(str(tmp_path / "resnet.pt"))
    torch.save({"model": resnet_like}, tmp_path / "classifier.pth")
    with pytest.raises(EncoderError, match=r"classifier\.pth holds no ViT encoder"):
        load_encoder(str(tmp_path / "classifier.pth"))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(EncoderError, match=r"list\.pt is not an encoder checkpoint: it holds a list"):
        load_encoder(str(tmp_path / "list.pt"))


def test_shapes_that_do_not_form_a_vit(tmp_path):
    state = dict(timm_vit().state_dict())
    del state["blocks.1.norm1.weight"]
    torch.save(state, tmp_path / "cut.pt")
    with pytest.raises(EncoderError, match=r"cut\.pt: .*missing keys \['blocks\.1\.norm1\.weight'\]"):
        load_encoder(str(tmp_path / "cut.pt"))
    state = dict(timm_vit().state_dict())
    state["pos_embed"] = state["pos_embed"][:, :-1]
    torch.save(state, tmp_path / "pos.pt")
    with pytest.raises(EncoderError, match=r"pos\.pt: pos_embed has shape \(1, 16, 192\)"):
        load_encoder(str(tmp_path / "pos.pt"))
    state = {k: v for k, v in timm_vit().state_dict().items() if k != "cls_token"}
    torch.save(state, tmp_path / "nocls.pt")
    with pytest.raises(EncoderError, match=r"nocls\.pt: the encoder's tensors do not form a ViT: missing cls_token"):
        load_encoder(str(tmp_path / "nocls.pt"))


def test_missing_garbage_and_folders(tmp_path):
    with pytest.raises(EncoderError, match=r"encoder checkpoint .*nothing\.pt does not exist"):
        load_encoder(str(tmp_path / "nothing.pt"))
    (tmp_path / "garbage.pt").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(EncoderError, match=r"garbage\.pt is not a torch or safetensors file \(2048 bytes"):
        load_encoder(str(tmp_path / "garbage.pt"))
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(EncoderError, match=r"bad\.safetensors is not a readable safetensors file"):
        load_encoder(str(tmp_path / "bad.safetensors"))
    vit_state = timm_vit().state_dict()
    torch.save(vit_state, tmp_path / "whole.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:5000])
    with pytest.raises(EncoderError, match=r"truncated\.pt is not a torch or safetensors file"):
        load_encoder(str(tmp_path / "truncated.pt"))
    sharded = tmp_path / "ep1-ba100"
    sharded.mkdir()
    (sharded / "__0_0.distcp").write_bytes(b"x")
    (sharded / ".metadata").write_bytes(b"x")
    with pytest.raises(EncoderError, match=r"ep1-ba100 is a sharded \(FSDP\) checkpoint folder: not supported"):
        load_encoder(str(sharded))
    with pytest.raises(EncoderError, match="is a folder, not a checkpoint file"):
        load_encoder(str(tmp_path / ".."))


def test_unknown_num_heads_and_bad_options(tmp_path):
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=4, num_classes=0)
    torch.save(vit.state_dict(), tmp_path / "odd.pt")
    with pytest.raises(EncoderError, match=r"odd\.pt: the number of attention heads is not recorded and embed_dim 48"):
        load_encoder(str(tmp_path / "odd.pt"))
    with pytest.raises(EncoderError, match="num_heads 5 does not divide embed_dim 48"):
        load_encoder(str(tmp_path / "odd.pt"), num_heads=5)
    assert load_encoder(str(tmp_path / "odd.pt"), num_heads=4).arch["num_heads"] == 4
    for kwargs, message in (
        ({"format": "onnx"}, "format: 'onnx' is not valid"),
        ({"num_heads": 0}, "num_heads: must be >= 1"),
        ({"weights": "imagenet"}, "weights: 'imagenet' is not valid"),
        ({"seed": -1}, "seed: must be >= 0"),
        ({"basis": ""}, "basis: expected a PCA basis file"),
    ):
        with pytest.raises(OptionError, match=message):
            load_encoder(str(tmp_path / "odd.pt"), **kwargs)
    with pytest.raises(OptionError, match="path: expected the encoder's checkpoint file"):
        load_encoder("")


def test_random_hash_depends_on_architecture_and_seed(tmp_path):
    torch.save(timm_vit().state_dict(), tmp_path / "a.pt")
    loaded = load_encoder(str(tmp_path / "a.pt"), weights="random", seed=0)
    identity = json.dumps({"weights": "random", "seed": 0, "arch": loaded.arch}, sort_keys=True)
    assert loaded.sha256 == hashlib.sha256(identity.encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ SimCLR / VICReg
def two_view_checkpoint(folder: Path, model) -> Path:
    """``model`` after 2 real training steps on two-view batches, and the checkpoint that run saved."""
    views = torch.randn(16, 2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    data = TensorDataset(views, torch.zeros(16, dtype=torch.long))
    trainer, _ = quick_trainer(
        model, [], DataLoader(data, batch_size=8), max_duration="2ba", save_folder=str(folder), save_interval="2ba"
    )
    trainer.fit()
    trainer.close()
    model.eval()
    return folder / "ep0-ba2-rank0.pt"


@pytest.fixture(scope="module")
def simclr_vit(tmp_path_factory):
    from magma_composer.models.simclr import ComposerSimCLR

    torch.manual_seed(0)
    model = ComposerSimCLR({"embed_dim": 32, "depth": 4, "num_heads": 2}, img_size=32, patch_size=8,
                           proj_hidden_dim=32, proj_output_dim=16)  # fmt: skip
    return model, two_view_checkpoint(tmp_path_factory.mktemp("simclr"), model)


@pytest.fixture(scope="module")
def vicreg_resnet(tmp_path_factory):
    from magma_composer.models.vicreg import ComposerVICReg

    torch.manual_seed(0)
    model = ComposerVICReg("resnet18", img_size=32, cifar_stem=True, proj_hidden_dim=32, proj_output_dim=32)
    return model, two_view_checkpoint(tmp_path_factory.mktemp("vicreg"), model)


def test_simclr_vit_checkpoint(simclr_vit):
    """A SimCLR checkpoint's ViT (keys encoder.*, a projector beside it) gives the model's CLS and mean features."""
    model, path = simclr_vit
    loaded = load_encoder(str(path))
    assert loaded.kind == "vit" and loaded.format == "composer" and loaded.arch == TINY_ARCH
    assert set(loaded.net.state_dict()) == set(model.encoder.state_dict())
    for name, tensor in model.encoder.state_dict().items():
        assert torch.equal(loaded.net.state_dict()[name], tensor), name
    x = images()
    with torch.no_grad():
        for pool in ("cls", "mean"):
            assert torch.equal(encode(loaded.net, x, pool), model.extract_features(x, pool=pool))
    # the random baseline is initialised as SimCLR's backbone is (timm's, learned positions), not as the MAE
    random = load_encoder(str(path), weights="random", seed=1)
    assert random.arch == TINY_ARCH and random.sha256 != load_encoder(str(path), weights="random", seed=2).sha256
    assert not torch.equal(random.net.pos_embed[0], sincos_2d(32, 4, 4, num_prefix_tokens=1))


def test_vicreg_resnet_checkpoint(vicreg_resnet):
    """A CNN encoder is rebuilt from its record (timm name, channels, size, stem) and gives the pooled output."""
    model, path = vicreg_resnet
    loaded = load_encoder(str(path))
    assert loaded.kind == "cnn" and loaded.format == "composer"
    assert loaded.arch == {"timm_model": "resnet18", "in_chans": 3, "img_size": 32, "cifar_stem": True}
    assert loaded.vit is loaded.net and not loaded.net.training
    for name, tensor in model.encoder.state_dict().items():  # BatchNorm running statistics included
        assert torch.equal(loaded.net.state_dict()[name], tensor), name
    x = images()
    with torch.no_grad():
        assert torch.equal(encode(loaded.net, x, "mean"), model.extract_features(x))
    with pytest.raises(OptionError, match="pool: 'cls' needs a ViT's CLS token; this encoder .ResNet. has none"):
        encode(loaded.net, x, "cls")
    with pytest.raises(ValueError, match="takes B x 3 x H x W images"):
        encode(loaded.net, torch.zeros(2, 1, 32, 32), "mean")
    with pytest.raises(OptionError, match="num_heads: applies to ViT encoders"):
        load_encoder(str(path), num_heads=2)
    # the random baseline: the same CNN, timm's initialisation, seeded, the global RNG untouched
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    a = load_encoder(str(path), weights="random", seed=1)
    assert torch.equal(torch.rand(3), expected)
    b, c = load_encoder(str(path), weights="random", seed=1), load_encoder(str(path), weights="random", seed=2)
    assert a.kind == "cnn" and a.sha256 == b.sha256 != c.sha256 != file_sha256(path)
    assert torch.equal(a.net.conv1.weight, b.net.conv1.weight) and not torch.equal(
        a.net.conv1.weight, c.net.conv1.weight
    )
    assert a.net.conv1.kernel_size == (3, 3)  # the CIFAR stem of the record


def test_exported_cnn_encoder_with_its_record(vicreg_resnet, tmp_path):
    """A CNN encoder's timm state dict with an architecture record beside it (the layout export_encoder writes)."""
    from magma_composer.checkpoints import ENCODER_SIDECAR_FORMAT, write_with_hash
    from magma_composer.models.two_view import backbone_architecture

    model, _ = vicreg_resnet
    path = tmp_path / "encoder.pt"
    digest = write_with_hash(path, lambda f: torch.save(model.encoder.state_dict(), f))
    record = backbone_architecture(model.encoder, "resnet18", 32, True)
    sidecar = {"format": ENCODER_SIDECAR_FORMAT, "sha256": digest, "architecture": record}
    (tmp_path / "encoder.pt.json").write_text(json.dumps(sidecar))
    loaded = load_encoder(str(path))
    assert loaded.kind == "cnn" and loaded.format == "timm" and loaded.arch == record
    x = images()
    with torch.no_grad():
        assert torch.equal(encode(loaded.net, x, "mean"), model.extract_features(x))
    # a record whose stem does not fit the tensors
    (tmp_path / "encoder.pt.json").write_text(json.dumps({**sidecar, "architecture": {**record, "cifar_stem": False}}))
    with pytest.raises(EncoderError, match=r"tensors of the wrong shape for a timm resnet18: conv1.weight"):
        load_encoder(str(path))
    # an incomplete record
    (tmp_path / "encoder.pt.json").write_text(json.dumps({**sidecar, "architecture": {"timm_model": "resnet18"}}))
    with pytest.raises(EncoderError, match="its CNN record .* is incomplete: in_chans, img_size, cifar_stem"):
        load_encoder(str(path))
    # a name timm does not know
    bad = {**record, "timm_model": "resnet_nonexistent"}
    (tmp_path / "encoder.pt.json").write_text(json.dumps({**sidecar, "architecture": bad}))
    with pytest.raises(EncoderError, match="cannot be rebuilt: encoder: 'resnet_nonexistent' is not a timm model"):
        load_encoder(str(path))
    # without a record, a CNN state dict cannot be read: the message says where records come from
    (tmp_path / "encoder.pt.json").unlink()
    with pytest.raises(EncoderError, match="holds no ViT encoder.*A CNN encoder .a ResNet. is read from our SimCLR"):
        load_encoder(str(path))
