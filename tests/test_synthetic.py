"""Tests of the synthetic BraTS-like generator (the project's embedded default data)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np
import pytest

from fedbrats.constants import MODALITIES
from fedbrats.data import synthetic
from fedbrats.data.conventions import get_convention, institution_of
from fedbrats.data.synthetic import (
    TISSUE_NAMES,
    SiteStyle,
    generate_case,
    generate_dataset,
    main,
    site_style_for,
    synthesize,
    synthetic_case_id,
)

KEYS = (*MODALITIES, "seg")
T = {name: i for i, name in enumerate(TISSUE_NAMES)}
CONTRAST_SEEDS = range(8)


def load_case(case_dir: str, convention: str = "brats2018") -> dict[str, np.ndarray]:
    conv = get_convention(convention)
    case_id = os.path.basename(case_dir)
    return {k: np.asarray(nib.load(os.path.join(case_dir, conv.filename(case_id, k))).dataobj) for k in KEYS}


def separability(a: np.ndarray, b: np.ndarray) -> float:
    """Difference of means over pooled standard deviation."""
    return float(abs(a.mean() - b.mean()) / np.sqrt((a.var() + b.var()) / 2))


@pytest.fixture(scope="module")
def contrast_cases() -> list[synthetic.SyntheticVolumes]:
    return [synthesize(24, seed=seed) for seed in CONTRAST_SEEDS]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[str], tuple[int, int, int]]]:
    root = tmp_path_factory.mktemp("synthetic")
    return {
        "brats2018": (
            generate_dataset(str(root / "b18"), 6, institutions=("INSTA", "INSTB", "INSTC"), size=20, seed=3),
            (20, 20, 20),
        ),
        "brats2023": (
            generate_dataset(
                str(root / "b23"), 3, institutions=("INSTA", "INSTB"), convention="brats2023", size=(16, 20, 18)
            ),
            (16, 20, 18),
        ),
    }


@pytest.mark.parametrize("convention", ["brats2018", "brats2023"])
def test_files_shapes_dtypes_affine(datasets, convention: str) -> None:
    paths, shape = datasets[convention]
    conv = get_convention(convention)
    for case_dir in paths:
        case_id = os.path.basename(case_dir)
        assert sorted(os.listdir(case_dir)) == sorted(conv.filename(case_id, k) for k in KEYS)
        for key in KEYS:
            image = nib.load(os.path.join(case_dir, conv.filename(case_id, key)))
            assert image.shape == shape
            assert image.get_data_dtype() == (np.uint8 if key == "seg" else np.float32)
            np.testing.assert_array_equal(image.affine, np.eye(4))
            assert image.header.get_zooms() == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("convention", ["brats2018", "brats2023"])
def test_labels_follow_convention_and_tumour_present(datasets, convention: str) -> None:
    conv = get_convention(convention)
    for case_dir in datasets[convention][0]:
        case = load_case(case_dir, convention)
        assert set(np.unique(case["seg"])) <= set(conv.labels)
        assert (case["seg"] > 0).any(), "every case needs whole-tumour voxels"
        brain = case["t1"] > 0
        assert brain.mean() > 0.2
        assert not (case["seg"][~brain]).any(), "labels must lie inside the brain"
        for m in MODALITIES:
            assert np.isfinite(case[m]).all() and case[m].min() >= 0
            assert not case[m][0, 0, 0], "skull-stripped: background is exactly 0"


@pytest.mark.parametrize("convention", ["brats2018", "brats2023"])
def test_ids_round_robin_and_institution_of(datasets, convention: str) -> None:
    paths = datasets[convention][0]
    institutions = ("INSTA", "INSTB", "INSTC") if convention == "brats2018" else ("INSTA", "INSTB")
    prefix = "" if convention == "brats2018" else "SYN"
    got = [institution_of(os.path.basename(p)) for p in paths]
    assert got == [prefix + institutions[i % len(institutions)] for i in range(len(paths))]
    assert synthetic_case_id("INSTB", 7) == "Synth18_INSTB_007_1"
    assert synthetic_case_id("INSTB", 7, "brats2023") == "BraTS-SYNINSTB-00007-000"


def test_same_seed_identical_different_seed_differs(tmp_path) -> None:
    a = load_case(generate_case(str(tmp_path / "a"), "Synth18_X_000_1", size=16, seed=5))
    b = load_case(generate_case(str(tmp_path / "b"), "Synth18_X_000_1", size=16, seed=5))
    c = load_case(generate_case(str(tmp_path / "c"), "Synth18_X_000_1", size=16, seed=6))
    for key in KEYS:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["seg"], c["seg"])
    assert not np.array_equal(a["t1ce"], c["t1ce"])


def test_conventions_share_images_and_map_et_label() -> None:
    v18 = synthesize(16, seed=2, convention="brats2018")
    v23 = synthesize(16, seed=2, convention="brats2023")
    for m in MODALITIES:
        np.testing.assert_array_equal(v18.images[m], v23.images[m])
    assert (v18.seg == 4).any()
    np.testing.assert_array_equal(np.where(v18.seg == 4, 3, v18.seg), v23.seg)


def test_case_does_not_depend_on_n_cases_or_first_index(tmp_path) -> None:
    three = generate_dataset(str(tmp_path / "three"), 3, institutions=("INSTA", "INSTB"), size=16, seed=1)
    one = generate_dataset(str(tmp_path / "one"), 1, institutions=("INSTA", "INSTB"), size=16, seed=1)
    tail = generate_dataset(str(tmp_path / "tail"), 2, institutions=("INSTA", "INSTB"), size=16, seed=1, first_index=1)
    assert [os.path.basename(p) for p in tail] == [os.path.basename(p) for p in three[1:]]
    for got, want in [(one[0], three[0]), (tail[0], three[1]), (tail[1], three[2])]:
        for key, array in load_case(got).items():
            np.testing.assert_array_equal(array, load_case(want)[key])
    assert not np.array_equal(load_case(three[0])["t1"], load_case(three[2])["t1"])


def test_t1ce_enhancing_rim_brightest(contrast_cases) -> None:
    checked = 0
    for case in contrast_cases:
        t1ce, tissue = case.images["t1ce"], case.tissue
        if not ((tissue == T["enhancing"]).any() and (tissue == T["necrosis"]).any()):
            continue
        et = t1ce[tissue == T["enhancing"]].mean()
        assert et > t1ce[tissue == T["necrosis"]].mean()
        assert et > t1ce[tissue == T["white_matter"]].mean()
        others = [k for k in np.unique(tissue) if k not in (T["background"], T["enhancing"])]
        assert et > max(t1ce[tissue == k].mean() for k in others)
        checked += 1
    assert checked >= len(contrast_cases) // 2


def test_healthy_and_edema_contrasts(contrast_cases) -> None:
    for case in contrast_cases:
        tissue = case.tissue
        mean = {
            m: {n: case.images[m][tissue == T[n]].mean() for n in ("csf", "grey_matter", "white_matter")}
            for m in MODALITIES
        }
        assert mean["t1"]["white_matter"] > mean["t1"]["grey_matter"] > mean["t1"]["csf"]
        assert mean["t2"]["csf"] > mean["t2"]["grey_matter"] > mean["t2"]["white_matter"]
        assert mean["flair"]["csf"] < mean["flair"]["white_matter"] < mean["flair"]["grey_matter"]
        if (tissue == T["edema"]).any():
            assert case.images["flair"][tissue == T["edema"]].mean() > mean["flair"]["csf"]
            assert case.images["flair"][tissue == T["edema"]].mean() > mean["flair"]["grey_matter"]


def test_sequences_carry_region_information_others_lack(contrast_cases) -> None:
    pooled = {key: {m: [] for m in MODALITIES} for key in ("enhancing", "necrosis", "edema", "csf")}
    for case in contrast_cases:
        for key in pooled:
            for m in MODALITIES:
                pooled[key][m].append(case.images[m][case.tissue == T[key]])
    voxels = {key: {m: np.concatenate(v) for m, v in per.items()} for key, per in pooled.items()}

    et_vs_ncr = {m: separability(voxels["enhancing"][m], voxels["necrosis"][m]) for m in MODALITIES}
    assert et_vs_ncr["t1ce"] > 3.0
    assert et_vs_ncr["t1ce"] > 3 * max(et_vs_ncr[m] for m in ("t1", "t2", "flair")), et_vs_ncr

    edema_vs_csf = {m: separability(voxels["edema"][m], voxels["csf"][m]) for m in MODALITIES}
    assert edema_vs_csf["flair"] > 2 * edema_vs_csf["t2"], edema_vs_csf


def test_low_grade_cases_without_enhancing_tumour_exist() -> None:
    cases = [synthesize(16, seed=seed) for seed in range(60)]
    assert all((c.seg > 0).any() for c in cases)
    no_et = [c for c in cases if not (c.seg == 4).any()]
    assert 1 <= len(no_et) <= 15
    assert all((c.seg == 1).any() for c in no_et), "low-grade-like lesions still have a tumour core"


def test_site_styles_distinct_and_change_intensities() -> None:
    styles = [site_style_for(i) for i in range(12)]
    assert len(set(styles)) == len(styles)
    assert site_style_for(3) == site_style_for(3)
    assert styles[0].bias_field_strength == 0 and styles[0].intensity_scale == 1

    cases = {i: synthesize(20, seed=4, style=styles[i]) for i in range(4)}
    wm = cases[0].tissue == T["white_matter"]
    np.testing.assert_array_equal(cases[0].tissue, cases[1].tissue)  # style changes appearance, not anatomy
    wm_mean = {i: float(c.images["t1"][wm].mean()) for i, c in cases.items()}
    for i in (1, 2, 3):
        ratio = wm_mean[i] / wm_mean[0]
        assert ratio == pytest.approx(styles[i].intensity_scale, rel=0.15)
    # Coefficient of variation within white matter grows with noise and bias field.
    cv = {i: float(c.images["t1"][wm].std() / c.images["t1"][wm].mean()) for i, c in cases.items()}
    assert cv[3] > 1.5 * cv[0]
    # The bias field shows as a smooth spatial variation of the ratio to the clean site's image.
    no_bias = SiteStyle(styles[2].intensity_scale, 0.0, styles[2].noise_std)
    ratio_spread = {}
    for name, case in (("bias", cases[2]), ("no_bias", synthesize(20, seed=4, style=no_bias))):
        ratio = case.images["t1"][wm] / cases[0].images["t1"][wm]
        ratio_spread[name] = float(ratio.std() / ratio.mean())
    assert ratio_spread["bias"] > 2 * ratio_spread["no_bias"], ratio_spread


def test_dataset_styles_per_institution(tmp_path) -> None:
    paths = generate_dataset(
        str(tmp_path), 2, institutions=("INSTA", "INSTB"), size=16, styles={"INSTB": SiteStyle(intensity_scale=3.0)}
    )
    a, b = (load_case(p) for p in paths)
    ratio = b["t1"][b["t1"] > 0].mean() / a["t1"][a["t1"] > 0].mean()
    assert 2.2 < ratio < 4.0


def test_site_style_validation() -> None:
    with pytest.raises(ValueError, match="intensity_scale"):
        SiteStyle(intensity_scale=0)
    with pytest.raises(ValueError, match="bias_field_strength"):
        SiteStyle(bias_field_strength=1.0)
    with pytest.raises(ValueError, match="noise_std"):
        SiteStyle(noise_std=-0.1)
    with pytest.raises(ValueError, match="index"):
        site_style_for(-1)


def test_reuse_skips_complete_cases_and_repairs_incomplete(tmp_path) -> None:
    out = str(tmp_path)
    paths = generate_dataset(out, 2, size=16, seed=9)
    conv = get_convention("brats2018")
    first_id = os.path.basename(paths[0])
    t1 = os.path.join(paths[0], conv.filename(first_id, "t1"))
    before = load_case(paths[0])
    mtime = os.stat(t1).st_mtime_ns
    marker = os.path.join(paths[0], "marker.txt")
    with open(marker, "w") as fh:
        fh.write("kept")

    assert generate_dataset(out, 2, size=16, seed=9) == paths
    assert os.stat(t1).st_mtime_ns == mtime
    assert os.path.exists(marker), "a complete case folder must not be rewritten"

    os.remove(os.path.join(paths[1], conv.filename(os.path.basename(paths[1]), "seg")))
    generate_dataset(out, 2, size=16, seed=9)
    assert os.path.exists(os.path.join(paths[1], conv.filename(os.path.basename(paths[1]), "seg")))
    for key, array in load_case(paths[0]).items():
        np.testing.assert_array_equal(array, before[key])
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in paths), "no temporary folders left"


def test_concurrent_generation_is_safe(tmp_path) -> None:
    out = str(tmp_path)
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda _: generate_dataset(out, 3, size=16, seed=2), range(3)))
    assert results[0] == results[1] == results[2]
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in results[0])
    reference = [synthesize(16, seed=int(np.random.SeedSequence([2, i]).generate_state(1)[0])) for i in range(3)]
    for path, ref in zip(results[0], reference):
        np.testing.assert_array_equal(load_case(path)["seg"], ref.seg)


def test_generate_case_replaces_existing_folder(tmp_path) -> None:
    case_dir = generate_case(str(tmp_path), "Synth18_INSTA_000_1", size=16, seed=1)
    generate_case(str(tmp_path), "Synth18_INSTA_000_1", size=16, seed=2)
    np.testing.assert_array_equal(load_case(case_dir)["seg"], synthesize(16, seed=2).seg)
    assert os.listdir(str(tmp_path)) == ["Synth18_INSTA_000_1"]


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"n_cases": 0}, "n_cases"),
        ({"size": 15}, "size"),
        ({"size": (16, 16)}, "size"),
        ({"size": (16, 16, 8)}, "size"),
        ({"convention": "brats2020"}, "convention"),
        ({"institutions": ("INST1",)}, "institutions"),
        ({"institutions": ()}, "institutions"),
        ({"institutions": ("INSTA", "INSTA")}, "institutions"),
        ({"styles": {"INSTZ": SiteStyle()}}, "styles"),
        ({"first_index": -1}, "first_index"),
    ],
)
def test_generate_dataset_rejects_bad_arguments(tmp_path, kwargs: dict, argument: str) -> None:
    out = tmp_path / "out"
    call = {"n_cases": 2, "size": 16, **kwargs}
    with pytest.raises(ValueError, match=argument):
        generate_dataset(str(out), call.pop("n_cases"), **call)
    assert not out.exists(), "validation must happen before anything is written"


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [({"size": 8}, "size"), ({"convention": "brats19"}, "convention"), ({"case_id": "a/b"}, "case_id")],
)
def test_generate_case_rejects_bad_arguments(tmp_path, kwargs: dict, argument: str) -> None:
    call = {"case_id": "Synth18_INSTA_000_1", "size": 16, **kwargs}
    with pytest.raises(ValueError, match=argument):
        generate_case(str(tmp_path / "out"), call.pop("case_id"), **call)


def test_cli_writes_dataset(tmp_path) -> None:
    out = str(tmp_path / "cli")
    argv = ["--out-dir", out, "--n-cases", "3", "--size", "16,18,16", "--institutions", "INSTA,INSTB"]
    assert main([*argv, "--convention", "brats2023", "--seed", "4"]) == 0
    names = sorted(os.listdir(out))
    assert names == sorted(f"BraTS-SYNINST{s}-{i:05d}-000" for i, s in [(0, "A"), (1, "B"), (2, "A")])
    assert load_case(os.path.join(out, names[0]), "brats2023")["t2"].shape == (16, 18, 16)


@pytest.mark.parametrize(
    ("extra", "argument"),
    [
        (["--n-cases", "0"], "n_cases"),
        (["--size", "12"], "size"),
        (["--size", "16,16"], "size"),
        (["--convention", "nope"], "convention"),
        (["--institutions", "INST1,INST2"], "institutions"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path, extra: list[str], argument: str, caplog) -> None:
    caplog.set_level("ERROR", logger="fedbrats")
    assert main(["--out-dir", str(tmp_path / "cli"), *extra]) == 1  # one line naming the argument, no traceback
    assert argument in caplog.text
    assert not (tmp_path / "cli").exists() or not any((tmp_path / "cli").iterdir())
