"""The shipped recipes carry exactly the published settings (docs/algorithms.md, "Published recipes")."""

import pytest
import torch

from magma_composer import registry
from magma_composer.config import ConfigError, load_config, read_recipe
from tests.conftest import REPO, is_evidence_settings

IMAGENET = REPO / "yamls" / "imagenet"


def check_mae_vitb16(cfg):
    m = cfg.model
    assert (m["encoder"], m["img_size"], m["patch_size"]) == ("vit_base_patch16_224", 224, 16)
    assert (m["decoder_dim"], m["decoder_depth"], m["decoder_heads"]) == (512, 8, 16)
    assert m["mask_ratio"] == 0.75 and m["norm_pix_loss"] is True
    o = cfg.optimizer
    assert o["betas"] == [0.9, 0.95] and o["weight_decay"] == 0.05 and o["base_lr"] == 1.5e-4 and "lr" not in o
    assert (
        cfg.train_data["batch_size"] == 256 and cfg.train_data["crop_scale"] == [0.08, 1.0] and cfg.train_data["hflip"]
    )
    assert cfg.train_data.get("image_size") in (None, 224)
    assert (
        cfg.scheduler["warmup"] == "10ep" and cfg.scheduler.get("alpha_f", 0.0) == 0.0 and cfg.max_duration == "400ep"
    )
    assert cfg.precision in ("amp_fp16", "amp_bf16")


@pytest.mark.parametrize("name", ["mae", "m-mae", "u-mae", "mu-mae"])
def test_imagenet_family(name):
    cfg = load_config(IMAGENET / f"{name}-vitb16.yaml")
    check_mae_vitb16(cfg)
    algos = cfg.algorithms
    prefix = name.split("-")[0]
    assert ("magma" in algos) == (prefix in ("m", "mu"))
    assert ("uniformity" in algos) == (prefix in ("u", "mu"))
    if "magma" in algos:
        magma = algos["magma"]
        assert magma["reference_layers"] == [10] and magma["target_layer"] == 11
        assert magma["weight"] == {"type": "warmup", "start": "10ep", "end": "110ep", "value": 1.0}
        assert magma.get("rbf_scale", 1.0) == 1.0 and magma.get("eps", 1e-4) == 1e-4
        assert cfg.device_train_microbatch_size == cfg.train_data["batch_size"]
    if "uniformity" in algos:
        assert algos["uniformity"]["weight"] == 0.01
        assert cfg.device_train_microbatch_size == cfg.train_data["batch_size"]


@pytest.mark.parametrize("name", ["m-mae", "mu-mae"])
def test_imagenet1k_window(name):
    cfg = load_config(IMAGENET / f"{name}-vitb16-in1k.yaml")
    check_mae_vitb16(cfg)
    assert cfg.algorithms["magma"]["weight"] == {"type": "warmup", "start": "3ep", "end": "103ep", "value": 1.0}
    assert ("uniformity" in cfg.algorithms) == (name == "mu-mae")


def test_cifar10_family_shares_the_baseline():
    base = load_config(REPO / "yamls" / "cifar10" / "mae-vit-tiny.yaml")
    assert base.model["encoder"] == "vit_tiny_patch16_224" and base.model["img_size"] == 32
    for name in ("m-mae", "u-mae", "mu-mae"):
        cfg = load_config(REPO / "yamls" / "cifar10" / f"{name}-vit-tiny.yaml")
        assert cfg.model == base.model and cfg.optimizer == base.optimizer
        assert cfg.device_train_microbatch_size == cfg.train_data["batch_size"]


def test_base_recipe_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml.*the base of"):
        load_config(tmp_path / "c.yaml")


def test_pmae_recipes_follow_the_pmae_paper():
    cfg = load_config(REPO / "yamls" / "cifar10" / "pmae-vit-tiny.yaml")
    assert cfg.model["encoder"] == "vit_tiny_patch16_224" and (cfg.model["img_size"], cfg.model["patch_size"]) == (
        32,
        8,
    )
    assert (cfg.model["decoder_dim"], cfg.model["decoder_depth"]) == (512, 8)
    pca = cfg.algorithms["pca_masking"]
    assert pca["ratio"] == 0.2 and pca["per_sample"] is False and pca["residual"] == "drop"
    assert cfg.scheduler["warmup"] == "40ep" and cfg.max_duration == "800ep"
    assert (
        cfg.optimizer["base_lr"] == 1.5e-4
        and cfg.optimizer["betas"] == [0.9, 0.95]
        and cfg.optimizer["weight_decay"] == 0.05
    )
    assert cfg.train_data["crop_scale"] == [0.2, 1.0] and cfg.train_data["hflip"]
    assert cfg.train_data["normalize"] == "none" and cfg.eval_data["normalize"] == "none"
    big = load_config(IMAGENET / "pmae-vitb16.yaml")
    assert (big.model["img_size"], big.model["patch_size"]) == (224, 16)
    assert big.algorithms["pca_masking"]["ratio"] == 0.2 and big.train_data["normalize"] == "none"


# ---------------------------------------------------------------------- every shipped recipe loads
RECIPES = sorted(p.relative_to(REPO) for p in (REPO / "yamls").rglob("*.yaml") if not is_evidence_settings(p))
EVAL_PROTOCOLS = ("linear-fast", "knn", "linear", "mlp", "finetune")  # longest prefix first


def _stand_in_basis(image_size: int):
    """A 4-component basis of the right image shape, so that PCAMasking's options can be checked without the file."""
    from magma_composer.pca.basis import PCABasis

    dim = 3 * image_size * image_size
    eigenvalues = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    return PCABasis(
        mean=torch.zeros(dim, dtype=torch.float64),
        std=torch.ones(dim, dtype=torch.float64),
        components=torch.eye(dim, 4),
        eigenvalues=eigenvalues,
        ratios=eigenvalues / 10.0,
        image_size=image_size,
        channels=3,
        num_images=16,
        total_variance=10.0,
        method="exact",
    )


def _build_cheap_parts(cfg) -> None:
    """Builds what needs no data and no file: the model (on the meta device: no memory, no initialisation cost),
    the algorithms (a stand-in basis for PCA masking) and their checks against the model, the optimizer and the
    learning-rate schedule. Each owner checks its values, so a value no owner accepts fails here."""
    from magma_composer.config import build_section
    from magma_composer.train import build_components, build_optimizer, build_scheduler

    options = {k: v for k, v in cfg.model.items() if k != "name"}
    model_class = registry.resolve(registry.MODELS, cfg.model.get("name", "mae"), "model")
    try:
        with torch.device("meta"):
            model = build_section("model", model_class, **options)
    except (RuntimeError, NotImplementedError) as exc:  # a model that draws a number while it is built
        if "meta" not in str(exc):
            raise
        model = build_section("model", model_class, **options)
    algorithms = {}
    for name, algo_options in cfg.algorithms.items():
        if name == "pca_masking":
            algo_options = {**algo_options, "basis": _stand_in_basis(model.img_size)}
        (algorithms[name],) = build_components("algorithms", {name: algo_options}, registry.ALGORITHMS, {})
    for name, algorithm in algorithms.items():
        if hasattr(algorithm, "check_model"):
            build_section(f"algorithms.{name}", algorithm.check_model, model)
    build_section("optimizer", build_optimizer, model, cfg.train_data["batch_size"], **cfg.optimizer)
    build_section("scheduler", build_scheduler, **cfg.scheduler)


@pytest.mark.parametrize("recipe", RECIPES, ids=str)
def test_every_shipped_recipe_loads(recipe):
    """Every recipe under yamls/ is read (its bases too), every key and type checked against its owner, and the
    parts that need no data built (evaluation recipes through the evaluation reader, for their protocol)."""
    path = REPO / recipe
    raw = read_recipe(path)
    if "encoder" in raw:  # an evaluation recipe: its protocol is the start of its name
        from magma_composer.evaluate.recipe import load_eval_config

        protocol = next((p for p in EVAL_PROTOCOLS if recipe.stem.startswith(p)), None)
        assert protocol is not None, f"{recipe}: an evaluation recipe's name starts with its protocol"
        cfg, _ = load_eval_config(protocol, str(path), ["encoder.path=x.pt"])
        assert cfg.encoder["path"] == "x.pt"
        return
    cfg = load_config(path)
    assert cfg.train_data["batch_size"] >= 1 and cfg.max_duration
    _build_cheap_parts(cfg)


def test_values_no_owner_accepts_fail_the_load_check(tmp_path):
    """The cheap build catches what keys and types cannot: a weight mapping that inherited a key its new type does
    not take (base recipes merge mappings key by key), and option values."""
    (tmp_path / "base.yaml").write_text(
        f"base: {REPO / 'yamls/cifar100/m-mae-vit-small.yaml'}\n"
        "algorithms: {magma: {weight: {type: step, milestones: [10ep]}}}\n"  # keeps the warm-up's start/end
    )
    cfg = load_config(tmp_path / "base.yaml")  # keys and types are fine
    with pytest.raises(ConfigError, match=r"algorithms.magma.weight: .*unknown keys \['end'\]"):
        _build_cheap_parts(cfg)
    cfg = load_config(REPO / "yamls/cifar10/pmae-mae-rd-vit-tiny.yaml", ["model.mask_ratio_range=[0.9, 0.1]"])
    with pytest.raises(ConfigError, match="model.mask_ratio_range: low 0.9 is above high 0.1"):
        _build_cheap_parts(cfg)
    cfg = load_config(REPO / "yamls/cifar10/pmae-mae-rd-vit-tiny.yaml", ["model.mask_ratio=0.75"])
    with pytest.raises(ConfigError, match="model.mask_ratio_range: .*cannot be combined with mask_ratio"):
        _build_cheap_parts(cfg)
    cfg = load_config(REPO / "yamls/cifar10/pmae-top-vit-tiny.yaml", ["algorithms.pca_masking.per_sample=true"])
    with pytest.raises(ConfigError, match="algorithms.pca_masking.per_sample"):
        _build_cheap_parts(cfg)
    cfg = load_config(REPO / "yamls/imagenet100/m-mae-vitb16-step.yaml", ["algorithms.magma.target_layer=12"])
    with pytest.raises(ConfigError, match="algorithms.magma"):
        _build_cheap_parts(cfg)


# ---------------------------------------------------------------------- issue 12: the papers' data sets and ablations
SMALL_MAGMA = {"cifar100": (32, 4), "stl10": (96, 12), "tiny-imagenet": (64, 8)}


@pytest.mark.parametrize("dataset", sorted(SMALL_MAGMA))
def test_magma_small_data_families_follow_the_base_codes_stock_recipe(dataset):
    folder = REPO / "yamls" / dataset
    base = load_config(folder / "mae-vit-small.yaml")
    m = base.model
    assert m["encoder"] == "vit_small_patch16_224" and (m["img_size"], m["patch_size"]) == SMALL_MAGMA[dataset]
    assert (m["decoder_dim"], m["decoder_depth"], m["decoder_heads"]) == (512, 8, 16)
    assert m["mask_ratio"] == 0.75 and m["norm_pix_loss"] is True
    assert base.optimizer == {"base_lr": 2.0e-4, "betas": [0.9, 0.95], "weight_decay": 0.05}
    assert base.scheduler == {"warmup": "10ep"} and base.max_duration == "1000ep"
    assert base.train_data["batch_size"] == 256 and base.train_data["crop_scale"] == [0.08, 1.0]
    assert base.train_data["remote"] == base.eval_data["remote"] == f"data/{dataset}-mds"
    # STL-10: the base code's pre-training split (train + unlabeled, no labels); Tiny-ImageNet: its labelled val
    assert base.train_data["split"] == ("train+unlabeled" if dataset == "stl10" else "train")
    assert base.eval_data["split"] == ("val" if dataset == "tiny-imagenet" else "test") and base.algorithms == {}
    assert ("knn_monitor" in base.callbacks) == (dataset != "stl10")  # no memory bank without labels
    for name in ("m-mae", "u-mae", "mu-mae"):
        cfg = load_config(folder / f"{name}-vit-small.yaml")
        assert cfg.model == base.model and cfg.optimizer == base.optimizer and cfg.train_data == base.train_data
        assert cfg.run_name == f"{dataset}-{name}-vit-small"
        assert cfg.device_train_microbatch_size == cfg.train_data["batch_size"]
        assert ("magma" in cfg.algorithms) == (name != "u-mae") and ("uniformity" in cfg.algorithms) == (
            name != "m-mae"
        )
        if "magma" in cfg.algorithms:
            magma = cfg.algorithms["magma"]
            assert magma["reference_layers"] == [10] and magma["target_layer"] == 11
            assert magma["weight"] == {"type": "warmup", "start": "0.025dur", "end": "0.275dur", "value": 1.0}
        if "uniformity" in cfg.algorithms:
            assert cfg.algorithms["uniformity"] == {"weight": 0.01}


@pytest.mark.parametrize("name", ["mae", "m-mae", "u-mae", "mu-mae"])
def test_imagenet100_family_is_the_released_recipe_on_the_100_classes(name):
    cfg = load_config(REPO / "yamls" / "imagenet100" / f"{name}-vitb16.yaml")
    check_mae_vitb16(cfg)
    assert cfg.run_name == f"imagenet100-{name}-vitb16"
    assert cfg.train_data["remote"] == cfg.eval_data["remote"] == "data/imagenet100-mds"
    assert cfg.train_data["local"] is None and cfg.eval_data["local"] is None
    assert (cfg.train_data["split"], cfg.eval_data["split"]) == ("train", "val")  # the preparer's splits
    prefix = name.split("-")[0]
    assert ("magma" in cfg.algorithms) == (prefix in ("m", "mu"))
    assert ("uniformity" in cfg.algorithms) == (prefix in ("u", "mu"))
    if "magma" in cfg.algorithms:
        assert cfg.algorithms["magma"]["weight"] == {"type": "warmup", "start": "10ep", "end": "110ep", "value": 1.0}


def test_magma_schedule_ablations_at_hand_worked_epochs():
    from composer.core import Timestamp

    from magma_composer.schedules import build_schedule

    def weights(recipe, epochs):
        cfg = load_config(REPO / "yamls" / recipe)
        check_mae_vitb16(cfg)
        schedule = build_schedule(cfg.algorithms["magma"]["weight"])
        return [schedule.value_at(Timestamp(epoch=e)) for e in epochs]

    triangle = weights("imagenet100/m-mae-vitb16-triangle.yaml", [0, 9, 10, 35, 60, 85, 109, 110, 300])
    assert triangle == pytest.approx([0, 0, 0, 0.5, 1.0, 0.5, 0.02, 0, 0])
    step = weights("imagenet100/m-mae-vitb16-step.yaml", [0, 4, 5, 109, 110, 209, 210, 399])
    assert step == pytest.approx([0, 0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    base = load_config(REPO / "yamls" / "cifar100" / "m-mae-vit-small.yaml")
    for name in ("triangle", "step"):
        cfg = load_config(REPO / "yamls" / "cifar100" / f"m-mae-vit-small-{name}.yaml")
        assert cfg.model == base.model and cfg.optimizer == base.optimizer
        assert cfg.device_train_microbatch_size == base.device_train_microbatch_size
        magma = {k: v for k, v in cfg.algorithms["magma"].items() if k != "weight"}
        assert magma == {k: v for k, v in base.algorithms["magma"].items() if k != "weight"}
        assert cfg.algorithms["magma"]["weight"]["type"] == name


PMAE_SETS = {
    "cifar10/": ("data/cifar10-mds", 32, "runs/bases/cifar10-32.pt"),
    "tiny-imagenet/": ("data/tiny-imagenet-mds", 64, "runs/bases/tiny-imagenet-64.pt"),
    "medmnist/bloodmnist-": ("data/bloodmnist-mds", 64, "runs/bases/bloodmnist-64.pt"),
    "medmnist/dermamnist-": ("data/dermamnist-mds", 64, "runs/bases/dermamnist-64.pt"),
    "medmnist/pathmnist-": ("data/pathmnist-mds", 64, "runs/bases/pathmnist-64.pt"),
    "imagenet/": ("s3://my-bucket/imagenet", 224, "/shared/bases/imagenet-224-k2048.pt"),
}


@pytest.mark.parametrize("prefix", sorted(PMAE_SETS))
def test_pmae_families_mae_mae_rd_and_pmae_share_everything_but_the_masking(prefix):
    remote, size, basis = PMAE_SETS[prefix]
    pmae = load_config(REPO / "yamls" / f"{prefix}pmae-vit-tiny.yaml")
    m = pmae.model
    assert m["encoder"] == "vit_tiny_patch16_224" and (m["img_size"], m["patch_size"]) == (
        size,
        8 if size < 224 else 16,
    )
    assert (m["decoder_dim"], m["decoder_depth"]) == (512, 8)
    assert pmae.train_data["remote"] == pmae.eval_data["remote"] == remote
    assert pmae.scheduler["warmup"] == "40ep" and pmae.max_duration == "800ep"
    assert pmae.optimizer["base_lr"] == 1.5e-4 and pmae.train_data["crop_scale"] == [0.2, 1.0]
    pca = pmae.algorithms["pca_masking"]
    assert pca["basis"] == basis and pca["ratio"] == 0.2 and pca["per_sample"] is False
    assert pca.get("strategy", "random") == "random"
    assert pmae.train_data["normalize"] == pmae.eval_data["normalize"] == "none"

    mae = load_config(REPO / "yamls" / f"{prefix}pmae-mae-vit-tiny.yaml")
    assert mae.algorithms == {} and mae.model == {**pmae.model, "mask_ratio": 0.75, "norm_pix_loss": False}
    for data in (mae.train_data, mae.eval_data):  # the PMAE code standardises every input, the MAE's too
        assert data["normalize"] == "pixel" and data["pixel_stats"] == basis
    assert (mae.optimizer, mae.scheduler, mae.max_duration) == (pmae.optimizer, pmae.scheduler, pmae.max_duration)
    assert "reconstruction_images" in mae.callbacks  # its pictures get the data's pixel_stats from the builder

    rd = load_config(REPO / "yamls" / f"{prefix}pmae-mae-rd-vit-tiny.yaml")
    assert rd.model == {**mae.model, "mask_ratio": None, "mask_ratio_range": (0.1, 0.9)}
    assert rd.train_data == mae.train_data and rd.algorithms == {} and rd.run_name != mae.run_name


@pytest.mark.parametrize("strategy", ["top", "bottom"])
def test_pmae_strategy_ablations(strategy):
    pmae = load_config(REPO / "yamls" / "cifar10" / "pmae-vit-tiny.yaml")
    cfg = load_config(REPO / "yamls" / "cifar10" / f"pmae-{strategy}-vit-tiny.yaml")
    # the PMAE code's bvt / tvb settings: the head of the eigenvalue order up to 80 % of the variance
    assert cfg.algorithms["pca_masking"] == {**pmae.algorithms["pca_masking"], "strategy": strategy, "ratio": 0.8}
    assert cfg.model == pmae.model and cfg.train_data == pmae.train_data


# ---------------------------------------------------------------------- the ablation paths, run from their recipes
def _tiny(demo_mds, max_duration: str, keep_eval: bool = False) -> list[str]:
    """Overrides that turn a shipped recipe into a few CPU steps of a tiny model on the demo data (32 px); the
    recipe's evaluation data and callbacks are dropped unless ``keep_eval`` (then the caller points them at the demo
    data)."""
    drop = [] if keep_eval else ["eval_data=null", "eval_interval=null", "callbacks={}"]
    return drop + [
        "model.encoder={embed_dim: 32, depth: 4, num_heads: 2}",
        "model.img_size=32",
        "model.patch_size=8",
        "model.decoder_dim=32",
        "model.decoder_depth=1",
        "model.decoder_heads=2",
        f"train_data.remote={demo_mds}",
        "train_data.batch_size=16",
        "train_data.num_workers=0",
        "loggers={in_memory: {}}",
        "save_folder=null",
        "save_interval=null",
        "autoresume=false",
        "device_train_microbatch_size=null",
        f"max_duration={max_duration}",
        "progress_bar=false",
        "device=cpu",
        "precision=fp32",
    ]


def _fit(recipe: str, overrides: list[str]):
    """Trains a shipped recipe with overrides through the recipe reader and builder; returns its logged values."""
    from composer.loggers import InMemoryLogger

    from magma_composer.train import build_trainer

    trainer = build_trainer(load_config(REPO / "yamls" / recipe, overrides))
    try:
        trainer.fit()
        (memory,) = [d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger)]
        logged = {key: [value for _, value in rows] for key, rows in memory.data.items()}
        return trainer.state, logged
    finally:
        trainer.close()


@pytest.mark.parametrize(
    "name, expected",
    [
        # 8 batches, 'dur' = batches / 8: triangle 0.025 -> 0.15 -> 0.275: at 0.125 rising (0.8), at 0.25 falling (0.2)
        ("triangle", [0.0, 0.8, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0]),
        # step: on from 0.0125 (batch 1), x 0.1 from 0.275 (batch 3), x 0.1 again from 0.525 (batch 5)
        ("step", [0.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01, 0.01]),
    ],
)
def test_magma_schedule_ablation_runs_from_its_recipe(demo_mds, name, expected):
    overrides = _tiny(demo_mds, "8ba") + ["algorithms.magma.reference_layers=[2]", "algorithms.magma.target_layer=3"]
    state, logged = _fit(f"cifar100/m-mae-vit-small-{name}.yaml", overrides)
    assert int(state.timestamp.batch) == 8
    assert logged["magma/weight"] == pytest.approx(expected)
    assert all(torch.isfinite(torch.tensor(v)) for v in logged["loss/train/total"])


def test_mae_rd_with_pixel_standardisation_runs_from_its_recipe(demo_mds, tmp_path):
    from magma_composer.pca.fit import compute_pixel_stats

    stats = tmp_path / "demo-32-stats.pt"
    compute_pixel_stats(str(demo_mds), 32, out=stats, split="train", progress=False)
    overrides = _tiny(demo_mds, "6ba", keep_eval=True) + [
        f"train_data.pixel_stats={stats}",
        f"eval_data.remote={demo_mds}",
        "eval_data.batch_size=40",
        "eval_data.num_workers=0",
        f"eval_data.pixel_stats={stats}",
        "eval_interval=3ba",
        "callbacks.knn_monitor=false",
        "callbacks.lr_monitor=false",
        "callbacks.reconstruction_images.interval=3ba",
        f"callbacks.reconstruction_images.folder={tmp_path / 'pictures'}",
    ]
    state, logged = _fit("cifar10/pmae-mae-rd-vit-tiny.yaml", overrides)
    dataset = state.train_dataloader.dataset
    assert dataset.normalize == "pixel" and dataset.pixel_stats == str(stats)
    model = state.model.module if hasattr(state.model, "module") else state.model
    assert model.mask_ratio_range == (0.1, 0.9) and model.mask_ratio == pytest.approx(0.5)
    ratios = logged["mae/mask_ratio"]
    assert len(ratios) == 6 and len(set(ratios)) == 6 and all(0.1 <= r <= 0.9 for r in ratios)
    assert "pca_masking/masked_variance" not in logged  # the MAE baseline: no PCA masking
    assert list((tmp_path / "pictures").glob("*.png"))  # the pictures de-standardise with the same statistics


@pytest.mark.parametrize("strategy", ["top", "bottom"])
def test_pmae_strategy_ablation_runs_from_its_recipe(demo_mds, tmp_path_factory, strategy):
    from magma_composer.pca.fit import fit_basis

    path = tmp_path_factory.getbasetemp() / "demo-32-basis.pt"
    basis = fit_basis(str(demo_mds), 32, out=path, split="train", progress=False) if not path.exists() else None
    if basis is None:
        from magma_composer.pca import load_basis

        basis = load_basis(path)
    overrides = _tiny(demo_mds, "3ba") + [f"algorithms.pca_masking.basis={path}"]
    _, logged = _fit(f"cifar10/pmae-{strategy}-vit-tiny.yaml", overrides)
    # by hand: the head of the eigenvalue order is the t largest components, t = argmin_j |c_j - 0.8| (c_j the sum of
    # the j + 1 largest ratios); 'top' masks the head, 'bottom' masks the rest
    ratios = sorted(basis.ratios.tolist(), reverse=True)
    cumulative = [sum(ratios[: j + 1]) for j in range(len(ratios))]
    t = max(min(range(len(ratios)), key=lambda j: abs(cumulative[j] - 0.8)), 1)
    head = sum(ratios[:t])
    masked = head if strategy == "top" else sum(ratios) - head
    assert logged["pca_masking/masked_variance"] == pytest.approx([masked] * 3, rel=1e-6)
    assert logged["pca_masking/masked_components"] == [float(t if strategy == "top" else len(ratios) - t)] * 3
