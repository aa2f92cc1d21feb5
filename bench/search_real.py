"""Does the search beat chance on real data? Fashion-MNIST (Debian's dataset-fashion-mnist), 28×28.

Sections (sizes in the JSON's `setup`; every retrain uses one recipe, scored on the full 10,000-image
test set):
1. ground truth: `--gt-archs` uniformly sampled architectures retrained standalone, the first
   `--gt-seeds2` of them again with a second seed (seed noise);
2. per seed (`--seeds`): one two-stage supernet, then ENAS's controller and derivation on it, and a
   random search at equal budget on the same supernet (the two-stage supernet is strategy-agnostic);
   each pick retrained, its percentile among the ground-truth archs; archs sampled from the final
   policies retrained (policy vs uniform);
3. supernet fidelity: Kendall τ (bootstrap 95% CI) between each supernet's whole-reward-split accuracy
   and standalone test accuracy over the ground-truth archs, for both weight-sharing modes, and the
   highest τ the ground truth's own seed noise lets any predictor show (`kendall_tau_ceiling`);
4. hand-designed baselines with the same epochs: ShuffleNetV2 x0.5 and MobileNetV3-small from
   scratch at 28×28 and upsampled to `--baseline-size`, and a 2-conv CNN under 100K parameters;
5. the user's figure: search + train wall time, the found model's test accuracy, parameters and
   onnxruntime latency, against the 2-conv CNN trained for the same total wall time.

Every retrain's result is cached in `--work` (default /tmp/mnet-search-real), so an interrupted run
resumes where it stopped.

    python bench/search_real.py [--gt-archs 30 --seeds 3 ...]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from _common import emit
from search_quality import kendall_tau, retrain
from torch import nn

import _fashion
from mnet.arch import Arch
from mnet.data import Split
from mnet.preprocess import Preprocess
from mnet.search.batches import DeviceData
from mnet.search.controller import ControllerConfig
from mnet.search.derive import derive
from mnet.search.enas import SearchConfig, open_run, search
from mnet.search.train import TrainConfig, evaluate, fit


def _cached(path: Path, fn):
    if path.is_file():
        return json.loads(path.read_text())
    r = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(r))
    return r


def _key(arch) -> str:
    return "_".join(f"{x.kernel}.{x.dilation}.{'n' if x.skip is None else x.skip}" for x in arch.layers)


def tau_ci(x: list[float], y: list[float], reps: int = 2000, seed: int = 0) -> list[float | None]:
    """Bootstrap 95% interval of Kendall τ (pairs resampled with replacement)."""
    rng = np.random.default_rng(seed)
    taus = []
    for _ in range(reps):
        idx = rng.integers(0, len(x), len(x))
        t = kendall_tau([x[i] for i in idx], [y[i] for i in idx])
        if t is not None:
            taus.append(t)
    return [float(np.percentile(taus, 2.5)), float(np.percentile(taus, 97.5))] if taus else [None, None]


def tau_ceiling(gt: list[float], pairs: list[tuple[float, float]]) -> dict:
    """The Kendall τ a perfect predictor could reach against a ground truth measured with seed noise.

    Each standalone accuracy = the arch's own + seed noise; the noise variance comes from the archs
    retrained twice (var(a - b) / 2), the arch-to-arch variance from a robust spread of the ground
    truth (1.4826 MAD: one arch that failed to train must not count as signal for all). With
    reliability r = corr(measured, true), a bivariate-normal pair has τ = (2/π) asin(r) (Greiner):
    no supernet can be shown to rank better than that on this ground truth.
    """
    if len(pairs) < 2:
        return {"tau": None}
    noise_var = float(np.mean([(a - b) ** 2 for a, b in pairs]) / 2)
    spread = float(1.4826 * np.median(np.abs(np.asarray(gt) - np.median(gt))))
    r = float(np.sqrt(max(0.0, 1.0 - noise_var / spread ** 2))) if spread > 0 else 0.0
    return {"tau": float(2 / np.pi * np.arcsin(r)), "reliability": r, "seed_noise_std": float(np.sqrt(noise_var)),
            "gt_robust_std": spread, "pairs": len(pairs)}


def percentile(value: float, population: list[float]) -> float:
    """Share of the population strictly below `value`, ties counted half (0–100)."""
    below = sum(v < value for v in population) + 0.5 * sum(v == value for v in population)
    return 100.0 * below / len(population)


class TwoConv(nn.Module):
    """What a user would write instead: conv-BN-ReLU-pool twice, then a linear layer (~50K params at 28×28)."""

    def __init__(self, classes: int, hw: tuple[int, int]):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.fc = nn.Linear(64 * (hw[0] // 4) * (hw[1] // 4), classes)

    def forward(self, x):
        return self.fc(self.body(x))


def _resized(split: Split, size: int) -> Split:
    images = np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_LINEAR) for im in split.images])
    return Split(split.name, images, split.labels, split.classes, split.paths)


def train_module(model: nn.Module, splits: dict[str, Split], out: Path, cfg: TrainConfig, size: int) -> dict:
    """Any nn.Module through the project's training loop; test accuracy of its best-dev epoch."""
    pre = Preprocess((size, size))
    sp = splits if size == splits["train"].images.shape[1] else {k: _resized(v, size) for k, v in splits.items()}
    t0 = time.time()
    fit(model, sp["train"], sp["dev"], out, cfg, pre, {"kind": "baseline"})
    state = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    test, _ = evaluate(model, DeviceData(sp["test"], pre), sp["train"].classes)
    return {"test_acc": test.accuracy, "params": sum(p.numel() for p in model.parameters()),
            "seconds": time.time() - t0}


def final_run(args, splits: dict[str, Split], work: Path, seed0: dict) -> dict:
    from mnet.export.onnx import export_onnx
    from mnet.runtime.benchmark import measure_bundle

    big = _fashion.load(args.final_train, args.n_dev)
    arch = Arch.from_json({**json.loads((work / "search_s0" / "arch.json").read_text()), "width": args.final_width})
    cfg = TrainConfig(epochs=args.final_epochs, lr=args.retrain_lr, device="cpu")
    r = retrain(Path("fashion-mnist"), arch, work / "runs" / "final", big, cfg)
    export_onnx(work / "runs" / "final" / "best.pt", work / "final_bundle", overwrite=True)
    _, lat = measure_bundle(work / "final_bundle", "onnxruntime", threads=1)
    wall = seed0["search_seconds"] + r["seconds"]
    # the CNN gets the same wall time: one timed epoch, then as many epochs as fit, from scratch
    probe = train_module(TwoConv(10, (28, 28)), big, work / "runs" / "two_conv_probe",
                         TrainConfig(epochs=1, lr=args.retrain_lr, device="cpu"), 28)
    epochs = max(1, int(wall // probe["seconds"]))
    cnn = train_module(TwoConv(10, (28, 28)), big, work / "runs" / "two_conv_final",
                       TrainConfig(epochs=epochs, lr=args.retrain_lr, device="cpu"), 28)
    return {"train_images": len(big["train"]), "width": args.final_width, "epochs": args.final_epochs,
            "mnet": {"test_acc": r["test_acc"], "params": arch.num_params(), "search_s": seed0["search_seconds"],
                     "train_s": r["seconds"], "wall_s": wall, "ort_latency_ms": lat["p50_ms"],
                     "arch": arch.to_json()["layers"]},
            "two_conv": {**cnn, "epochs": epochs}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-train", type=int, default=9600)
    ap.add_argument("--n-dev", type=int, default=1000)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=24)
    ap.add_argument("--kernels", type=str, default="3,5,7,9")
    ap.add_argument("--dilations", type=str, default="1,2")
    ap.add_argument("--gt-archs", type=int, default=30)
    ap.add_argument("--gt-seeds2", type=int, default=6)
    ap.add_argument("--retrain-epochs", type=int, default=3)
    ap.add_argument("--retrain-lr", type=float, default=0.05)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--supernet-epochs", type=int, default=8)
    ap.add_argument("--supernet-lr", type=float, default=0.05)
    ap.add_argument("--controller-steps", type=int, default=1000)
    ap.add_argument("--derive-samples", type=int, default=100)
    ap.add_argument("--policy-archs", type=int, default=2, help="Archs per seed sampled from the final policy.")
    ap.add_argument("--baseline-size", type=int, default=64)
    ap.add_argument("--final-epochs", type=int, default=8)
    ap.add_argument("--final-train", type=int, default=12000)
    ap.add_argument("--final-width", type=int, default=32)
    ap.add_argument("--skip-final", action="store_true",
                    help="Leave out section 5 (its keys are null): it costs about twice the search + train time.")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mnet-search-real"))
    args = ap.parse_args()
    t_start = time.time()
    work = args.work
    kernels = tuple(int(v) for v in args.kernels.split(","))
    dilations = tuple(int(v) for v in args.dilations.split(","))
    splits = _fashion.load(args.n_train, args.n_dev)
    tcfg = TrainConfig(epochs=args.retrain_epochs, lr=args.retrain_lr, device="cpu")

    def base_cfg(seed: int, **kw) -> SearchConfig:
        kw = {"derive_samples": args.derive_samples, "controller": ControllerConfig(steps=args.controller_steps), **kw}
        return SearchConfig(preset="tiny", input_hw=(28, 28), layers=args.layers, width=args.width, kernels=kernels,
                            dilations=dilations, supernet_epochs=args.supernet_epochs, lr=args.supernet_lr,
                            seed=seed, device="cpu", **kw)

    space = base_cfg(0).space().with_classes(len(_fashion.CLASSES))

    def standalone(arch, seed: int = 0) -> dict:
        cfg = TrainConfig(**{**tcfg.__dict__, "seed": seed})
        return _cached(work / "retrain" / f"{_key(arch)}_s{seed}.json",
                       lambda: retrain(Path("fashion-mnist"), arch, work / "runs" / f"{_key(arch)}_s{seed}",
                                       splits, cfg))

    # 1. ground truth
    rng = random.Random(12345)
    gt_archs = [space.sample(rng) for _ in range(args.gt_archs)]
    gt = [standalone(a) for a in gt_archs]
    gt_acc = [r["test_acc"] for r in gt]
    seed2 = [standalone(a, seed=1)["test_acc"] for a in gt_archs[:args.gt_seeds2]]
    seed_diffs = [abs(a - b) for a, b in zip(gt_acc, seed2)]

    # 2. search vs random per seed, 3. fidelity
    per_seed, fidelity = [], {}
    for seed in range(args.seeds):
        out = work / f"search_s{seed}"
        t0 = time.time()
        if not (out / "arch.json").is_file():
            if out.exists():
                shutil.rmtree(out)
            search(None, out, base_cfg(seed), splits={"train": splits["train"]}, plots=False)
        search_s = json.loads((out / "search.json").read_text())["seconds"]["total"]
        opened = open_run(out, splits={"train": splits["train"]}, device="cpu")
        cfg = opened.config
        enas_pick = json.loads((out / "topk.json").read_text())[0]
        enas_arch = Arch.from_json(enas_pick["arch"])
        t0 = time.time()
        rand = derive(opened.space, opened.evaluator, None, samples=args.derive_samples + args.controller_steps,
                      seed=seed, rescore_top=cfg.rescore_top)
        random_s = time.time() - t0
        sup = [opened.evaluator.split_score(a).accuracy for a in gt_archs]
        tau = kendall_tau(sup, gt_acc)
        fidelity[f"seed{seed}"] = {"sharing": cfg.sharing, "tau": tau, "ci95": tau_ci(sup, gt_acc)}
        gen = torch.Generator().manual_seed(seed + 777)
        with torch.no_grad():
            policy = [opened.agent.controller.sample(gen)[0] for _ in range(args.policy_archs)]
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        last_sup = [r for r in records if r["stage"] == "supernet"][-1]
        tail = [r for r in records if r["stage"] == "controller"][-100:]
        e, r = standalone(enas_arch), standalone(rand[0].arch)
        per_seed.append({
            "seed": seed, "enas_test_acc": e["test_acc"], "random_test_acc": r["test_acc"],
            "enas_percentile": percentile(e["test_acc"], gt_acc), "random_percentile": percentile(r["test_acc"], gt_acc),
            "enas_arch": enas_arch.to_json()["layers"], "random_arch": rand[0].arch.to_json()["layers"],
            "policy_test_acc": [standalone(a)["test_acc"] for a in policy],
            "supernet_final_train_acc": last_sup["acc"], "supernet_uniform_split_acc_mean": float(np.mean(sup)),
            "controller_last_100": {"reward": float(np.mean([t["reward"] for t in tail])),
                                    "entropy": float(np.mean([t["entropy"] for t in tail]))},
            "search_seconds": search_s, "random_derive_seconds": random_s,
        })
    # the other sharing mode, seed 0: fidelity only
    other = "exact" if per_seed and base_cfg(0).sharing == "entangled" else "entangled"
    out = work / f"supernet_{other}"
    if not (out / "arch.json").is_file():
        if out.exists():
            shutil.rmtree(out)
        search(None, out, base_cfg(0, sharing=other, strategy="random", derive_samples=1, controller_batch=1,
                                   controller=ControllerConfig(steps=0)),
               splits={"train": splits["train"]}, plots=False)
    opened = open_run(out, splits={"train": splits["train"]}, device="cpu")
    sup = [opened.evaluator.split_score(a).accuracy for a in gt_archs]
    fidelity[f"{other}_seed0"] = {"sharing": other, "tau": kendall_tau(sup, gt_acc), "ci95": tau_ci(sup, gt_acc),
                                  "supernet_uniform_split_acc_mean": float(np.mean(sup))}

    # 4. baselines, same epochs
    import torchvision

    baselines = {}
    for name, build in (("shufflenet_v2_x0_5", lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=10)),
                        ("mobilenet_v3_small", lambda: torchvision.models.mobilenet_v3_small(num_classes=10))):
        for size in (28, args.baseline_size):
            baselines[f"{name}@{size}"] = _cached(
                work / "baselines" / f"{name}_{size}.json",
                lambda: train_module(build(), splits, work / "runs" / f"{name}_{size}", tcfg, size))
    baselines["two_conv@28"] = _cached(work / "baselines" / "two_conv.json",
                                       lambda: train_module(TwoConv(10, (28, 28)), splits, work / "runs" / "two_conv",
                                                            tcfg, 28))

    # 5. the user's figure: the seed-0 search's pick, widened to --final-width, trained on --final-train
    # images; against the 2-conv CNN trained for the same total wall time on the same images
    final = None if args.skip_final else _cached(work / "final.json", lambda: final_run(args, splits, work, per_seed[0]))

    enas = [s["enas_test_acc"] for s in per_seed]
    rnd = [s["random_test_acc"] for s in per_seed]
    policy = [a for s in per_seed for a in s["policy_test_acc"]]
    emit("search_real", {
        "setup": {"data": "Fashion-MNIST (Debian dataset-fashion-mnist), 28x28 grey as RGB",
                  "train/dev/test": [len(splits[s]) for s in ("train", "dev", "test")],
                  "space": space.to_json(), "space_size": space.size(), "space_effective_size": space.effective_size(),
                  "search": base_cfg(0).to_json(), "retrain": tcfg.__dict__, "threads": torch.get_num_threads()},
        "n_archs": len(gt_archs),
        "kendall_tau": fidelity["seed0"]["tau"], "kendall_tau_ci95": fidelity["seed0"]["ci95"],
        "kendall_tau_ceiling": tau_ceiling(gt_acc, list(zip(gt_acc, seed2))),
        "fidelity": fidelity,
        "gt_test_acc": {"mean": float(np.mean(gt_acc)), "std": float(np.std(gt_acc)), "min": min(gt_acc),
                        "max": max(gt_acc), "p90": float(np.percentile(gt_acc, 90))},
        "seed_noise_abs_diff_mean": float(np.mean(seed_diffs)) if seed_diffs else None,
        "search_test_acc_mean": statistics.mean(enas), "search_test_acc_std": statistics.pstdev(enas),
        "random_test_acc_mean": statistics.mean(rnd), "random_test_acc_std": statistics.pstdev(rnd),
        "search_pick_percentiles": [s["enas_percentile"] for s in per_seed],
        "random_pick_percentiles": [s["random_percentile"] for s in per_seed],
        "policy_test_acc_mean": float(np.mean(policy)), "uniform_test_acc_mean": float(np.mean(gt_acc)),
        **({k: None for k in ("fashion_best_test_acc", "fashion_best_params", "fashion_wall_s", "fashion_ort_latency_ms",
                               "fashion_two_conv_same_wall_test_acc")} if final is None else {
            "fashion_best_test_acc": final["mnet"]["test_acc"], "fashion_best_params": final["mnet"]["params"],
            "fashion_wall_s": final["mnet"]["wall_s"], "fashion_ort_latency_ms": final["mnet"]["ort_latency_ms"],
            "fashion_two_conv_same_wall_test_acc": final["two_conv"]["test_acc"]}),
        "final": final,
        "per_seed": per_seed,
        "baselines": baselines,
        "gt_archs": [{"layers": a.to_json()["layers"], **r} for a, r in zip(gt_archs, gt)],
        "seconds": time.time() - t_start,
    })


if __name__ == "__main__":
    main()
