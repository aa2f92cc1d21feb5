"""GPU timings of the paper protocol, sized for one short call on a lent GPU (`bench/gpu.sh`).

Sections, in priority order, each timed with CUDA synchronisation and written out as soon as it ends
(a run stopped by the time limit still leaves what it measured):

1. mnet-24-32 (width 256, 12 layers), --amp: two supernet epochs (the first includes the warm-up:
   allocations, cuDNN's heuristics, FFT plans; the second is steady state; the depthwise choice of
   `search.depthwise` is timed apart) and 200 controller steps; extrapolated to the paper protocol
   (100 supernet epochs + 5000 controller steps) in GPU-hours, one-time costs (the depthwise choice,
   the first epoch's warm-up) included.
   Also: how much of a supernet step and of scoring a path is the CPU issuing work (`issue`) vs
   the synchronised time — equal numbers mean the loop is bound by the CPU, not the GPU.
2. mnet-120-160 from a shorter sample (a few supernet steps and controller steps), extrapolated alike.
3. One standalone-child epoch (a uniformly sampled mnet-24-32 arch, --amp) on the same data.
4. Inference of that child: batch 1 and 128, fp32 and bf16 autocast.
5. Depthwise k×k (k = 15…39, dilation 2, C = 256, batch 128, forward + backward) through PyTorch/cuDNN
   vs the dense form (`search.dense`, where its matrix fits) vs the FFT form (`search.fft`), at every
   feature size of both geometries, in fp32 and under --amp autocast (bf16: conv and dense run in
   bf16, the FFT in fp32); tells whether FFT beats cuDNN there.

Data: the synthetic mango set, rendered small and tiled to 5600 train + 800 dev images (timing does
not depend on image content). `--smoke` runs every section at tiny sizes on any device (CPU here) so
the script is tested before it spends GPU time.

    python bench/gpu_bench.py [--smoke] [--budget-s 420] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from mnet.search.batches import DeviceData, fast_path
from mnet.search.controller import ControllerConfig, Reinforce
from mnet.search.dense import MAX_DENSE_ELEMENTS, dense_depthwise
from mnet.search.depthwise import select_depthwise
from mnet.search.enas import SearchConfig, SupernetTrainer, split_train_val, supernet_step, train_controller
from mnet.search.fft import fft_depthwise
from mnet.search.model import MNet
from mnet.search.supernet import Evaluator
from mnet.search.train import autocast, load_splits

from mnet.arch import Layer, SearchSpace, cropped_kernel, get_preset
from mnet.data import Split
from mnet.preprocess import Preprocess

PAPER = {"supernet_epochs": 100, "controller_steps": 5000}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timings(fn, device: torch.device, reps: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of `reps` calls: to issue `fn` (CPU time until it returns, kernels may still
    run) and to finish it (synchronised).

    Equal numbers mean the CPU (Python, dispatch, kernel launches) is the bound, not the GPU: then
    CUDA graphs or fewer, larger ops pay, not faster kernels. On a CPU both are the same time."""
    for _ in range(warmup):
        fn()
    issue, done = [], []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        _sync(device)
        issue.append(t1 - t0)
        done.append(time.perf_counter() - t0)
    return {"issue": sorted(issue)[reps // 2], "synchronised": sorted(done)[reps // 2]}


def _time(fn, device: torch.device, reps: int, warmup: int = 1) -> float:
    """Median seconds of `reps` synchronised calls."""
    return _timings(fn, device, reps, warmup)["synchronised"]


def _source_digest() -> str:
    """sha256 of the package's Python sources: which code a result file measured (the GPU machine
    gets a copy of the tree without git)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    stages = ("mnet", "search", "calibration", "export", "runtime")
    for f in sorted(p for d in stages for p in (root / d).rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _tile(split: Split, n: int) -> Split:
    reps = -(-n // len(split))
    idx = np.tile(np.arange(len(split)), reps)[:n]
    return Split(split.name, split.images[idx], split.labels[idx], split.classes, [split.paths[i] for i in idx])


def _space(preset: str, smoke: bool) -> SearchSpace:
    p = get_preset(preset)
    if smoke:  # same geometry (input, stem stride, reductions), a fraction of the work
        return SearchSpace(p.name, 4, 8, p.input_hw, p.stem_stride)
    return p


class _Bench:
    def __init__(self, args):
        self.args, self.smoke = args, args.smoke
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.t_start = time.time()
        self.batch = 8 if self.smoke else 128
        # --amp as the paper-protocol runs would use it on a GPU; bf16 large-kernel convs on a CPU are
        # orders of magnitude slower than fp32, so a CPU (smoke) run times fp32
        self.amp = self.device.type == "cuda"
        self.layout = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        self.result: dict = {
            "bench": "gpu", "smoke": self.smoke, "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor(),
            "torch": torch.__version__, "cudnn": torch.backends.cudnn.version() if self.device.type == "cuda" else None,
            "date": datetime.date.today().isoformat(), "source_sha256": _source_digest(),
            "paper_protocol": PAPER, "sections": {}, "skipped": [], "errors": {},
        }
        self.out = Path(args.out) if args.out else (
            Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else
            Path(__file__).resolve().parent / "results" / ("gpu_smoke.json" if self.smoke else "gpu.json"))

    def left(self) -> float:
        return self.args.budget_s - (time.time() - self.t_start)

    def write(self) -> None:
        self.result["seconds"] = time.time() - self.t_start
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=2))
        tmp.replace(self.out)

    def section(self, name: str, fn, need_s: float) -> None:
        if self.left() < need_s:
            self.result["skipped"].append(name)
            return
        t0 = time.time()
        try:
            self.result["sections"][name] = {**fn(), "section_seconds": time.time() - t0}
        except Exception as e:  # noqa: BLE001 — one failed section must not lose the others' numbers
            self.result["errors"][name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"
        self.write()
        print(f"[gpu_bench] {name}: {time.time() - t0:.1f}s, {self.left():.0f}s left", file=sys.stderr, flush=True)

    # -- data -------------------------------------------------------------------------------------

    def data(self, hw: tuple[int, int]) -> dict[str, Split]:
        from mnet.synth import synthesize

        if not hasattr(self, "_root"):
            self._tmp = tempfile.TemporaryDirectory()
            self._root = Path(self._tmp.name) / "synth"
            n_train, n_dev = (48, 12) if self.smoke else (560, 80)
            synthesize(self._root, n_train=n_train, n_dev=n_dev, n_test=0, image_size=(96, 128), seed=0)
        splits = load_splits(self._root, Preprocess(hw))
        n_train, n_dev = (96, 24) if self.smoke else (5600, 800)
        return {"train": _tile(splits["train"], n_train), "dev": _tile(splits["dev"], n_dev)}

    # -- sections ---------------------------------------------------------------------------------

    def search_timing(self, preset: str, sample_steps: int | None, controller_steps: int) -> dict:
        """Supernet epoch time (measured, or from `sample_steps` steps) and controller step time."""
        space = _space(preset, self.smoke).with_classes(3)
        split = self.data(space.input_hw)["train"]
        cfg = SearchConfig(preset=preset, batch_size=self.batch, amp=self.amp, device=str(self.device))
        train_idx, val_idx = split_train_val(split.labels, cfg.val_fraction, cfg.seed)
        pre = Preprocess(space.input_hw)
        full = DeviceData(split, pre, self.device, train_idx)
        val = DeviceData(split, pre, self.device, val_idx)
        steps_per_epoch = full.num_batches(self.batch)
        data = full if sample_steps is None else DeviceData(split, pre, self.device,
                                                            train_idx[:sample_steps * self.batch])
        trainer = SupernetTrainer(space, data, cfg, self.device)
        trainer.fast_path(val)
        t0 = time.time()
        counts = select_depthwise(trainer.supernet, batch=self.batch, amp=self.amp)  # as `mnet search` does
        select_s = time.time() - t0
        rng = random.Random(0)
        epochs = []
        for _ in range(2):  # the first warms up every new layer shape; the second is steady state
            _sync(self.device)
            t0 = time.perf_counter()
            trainer.train_epoch(lambda: space.sample(rng), lambda done, total: None)
            _sync(self.device)
            epochs.append(time.perf_counter() - t0)
        step_s = epochs[-1] / data.num_batches(self.batch)
        epoch_s = step_s * steps_per_epoch
        agent = Reinforce(space, ControllerConfig(steps=controller_steps), seed=3)
        evaluator = Evaluator(trainer.supernet, val, self.batch, amp=self.amp, seed=2)
        warm = max(2, controller_steps // 20)
        train_controller(agent, evaluator, warm)
        _sync(self.device)
        t0 = time.perf_counter()
        train_controller(agent, evaluator, warm + controller_steps)
        _sync(self.device)
        ctrl_s = (time.perf_counter() - t0) / controller_steps
        # where a controller step goes: the policy (CPU LSTM sample + REINFORCE update) vs scoring one path
        n = max(5, controller_steps // 4)
        t0 = time.perf_counter()
        for _ in range(n):
            arch, log_p, entropy = agent.sample()
            agent.update(log_p, entropy, 0.5)
        policy_s = (time.perf_counter() - t0) / n
        _sync(self.device)
        t0 = time.perf_counter()
        for _ in range(n):
            evaluator(arch)
        _sync(self.device)
        score_s = (time.perf_counter() - t0) / n
        # is a step bound by the GPU or by the CPU issuing it?
        gen = torch.Generator().manual_seed(0)
        x, y = val.sample_batch(self.batch, gen)
        trainer.supernet.train()
        reps = min(n, 10)
        step = _timings(lambda: supernet_step(trainer.supernet, trainer.optimizer, x, y, space.sample(rng),
                                              self.amp), self.device, reps)
        score = _timings(lambda: evaluator.logits(space.sample(rng), x), self.device, reps)
        # one-time costs a real search pays too: the depthwise choice and the first epoch's warm-up
        # (allocations, cuDNN heuristics, FFT plans) beyond a steady epoch
        fixed_s = select_s + max(0.0, epochs[0] - epochs[1])
        total_s = fixed_s + PAPER["supernet_epochs"] * epoch_s + PAPER["controller_steps"] * ctrl_s
        return {
            "space": {"preset": preset, "layers": space.num_layers, "width": space.width,
                      "input_hw": list(space.input_hw)},
            "batch": self.batch, "amp": self.amp, "depthwise_select_s": select_s, "depthwise_impls": counts,
            "supernet_epoch_s": {"measured_steps": data.num_batches(self.batch), "first": epochs[0],
                                 "steady": epochs[1], "per_step": step_s, "full_epoch_estimate": epoch_s,
                                 "steps_per_epoch": steps_per_epoch},
            "controller_step_s": ctrl_s, "controller_steps_timed": controller_steps,
            "controller_step_split_s": {"policy_sample_update": policy_s, "score_one_path": score_s},
            "issue_vs_synchronised_s": {"supernet_step": step, "score_one_path": score},
            "paper_protocol_gpu_hours": total_s / 3600,
            "paper_protocol_split_hours": {"one_time": fixed_s / 3600,
                                           "supernet": PAPER["supernet_epochs"] * epoch_s / 3600,
                                           "controller": PAPER["controller_steps"] * ctrl_s / 3600},
        }

    def _child(self) -> MNet:
        space = _space("mnet-24-32", self.smoke).with_classes(3)
        torch.manual_seed(0)
        model = MNet(space.sample(random.Random(1))).to(self.device)
        select_depthwise(model, batch=self.batch, amp=self.amp)
        return model

    def child_epoch(self) -> dict:
        splits = self.data((24, 32))
        data = DeviceData(splits["train"], Preprocess((24, 32)), self.device)
        model = self._child()
        fast_path(model, [data], self.device)
        opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9, weight_decay=5e-4)
        gen = torch.Generator().manual_seed(0)
        model.train()

        def epoch(limit: int | None = None) -> torch.Tensor:
            loss_sum = torch.zeros((), device=self.device)
            for i, (x, y) in enumerate(data.batches(self.batch, shuffle=True, flip_p=0.5, generator=gen)):
                if limit is not None and i == limit:
                    break
                with autocast(self.device, self.amp):
                    loss = F.cross_entropy(model(x).float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach()
            return loss_sum

        epoch(3)  # warm-up: autotuning
        _sync(self.device)
        t0 = time.perf_counter()
        float(epoch())
        seconds = time.perf_counter() - t0
        return {"arch": [[x.kernel, x.dilation, x.skip] for x in model.arch.layers], "images": len(data),
                "batch": self.batch, "amp": self.amp, "epoch_s": seconds,
                "paper_train_hours_100_epochs": 100 * seconds / 3600}

    def inference(self) -> dict:
        model = self._child().eval()
        fast_path(model, [], self.device)
        out = {}
        for batch in (1, 128):
            x = torch.randn(batch, 3, 24, 32, device=self.device)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            for precision in ("fp32", "bf16"):
                def run(x=x, precision=precision):
                    with torch.no_grad(), autocast(self.device, precision == "bf16"):
                        model(x)
                s = _time(run, self.device, reps=5 if self.smoke else 50, warmup=3)
                out[f"b{batch}_{precision}"] = {"ms": s * 1e3, "images_per_s": batch / s}
        return out

    def depthwise(self) -> dict:
        c, n = (8, 4) if self.smoke else (256, 128)
        kernels = (15, 39) if self.smoke else tuple(range(15, 40, 4))
        reps = 3 if self.smoke else 5
        rows = []
        for preset in ("mnet-24-32", "mnet-120-160"):
            space = _space(preset, self.smoke)
            skel = space.skeleton([Layer(*space.ops[0])] * space.num_layers)
            sizes = sorted({tuple(skel.node_hw(i)) for i in range(1, space.num_layers + 1)}, reverse=True)
            for h, w in sizes:
                for k in kernels:
                    kh, kw = cropped_kernel(k, 2, h, w)
                    # the layout the runs compute in (search.batches.fast_path: channels_last on CUDA)
                    x = torch.randn(n, c, h, w, device=self.device).to(memory_format=self.layout).requires_grad_()
                    wt = torch.randn(c, 1, kh, kw, device=self.device).to(memory_format=self.layout).requires_grad_()
                    pad = (2 * (kh // 2), 2 * (kw // 2))
                    forms = {"conv": lambda x, wt, pad=pad: F.conv2d(x, wt, None, 1, pad, 2, c),
                             "fft": lambda x, wt: fft_depthwise(x, wt, 2)}
                    if c * (h * w) ** 2 <= MAX_DENSE_ELEMENTS:
                        forms["dense"] = lambda x, wt: dense_depthwise(x, wt, 2)
                    row = {"preset": preset, "hw": [h, w], "kernel": k, "cropped": [kh, kw], "dilation": 2,
                           "channels": c, "batch": n}
                    # amp only where the runs use it (bf16 large-kernel convs on a CPU are far too slow)
                    for precision in ("fp32", "amp") if self.amp else ("fp32",):
                        for name, form in forms.items():
                            def run(form=form, amp=precision == "amp", x=x, wt=wt):
                                with autocast(self.device, amp):
                                    y = form(x, wt)
                                y.float().sum().backward()

                            try:
                                row[f"{name}_{precision}_ms"] = _time(run, self.device, reps) * 1e3
                            except RuntimeError as e:  # e.g. out of memory: keep the table's other cells
                                row[f"{name}_{precision}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                                if self.device.type == "cuda":
                                    torch.cuda.empty_cache()
                        times = {name: row[f"{name}_{precision}_ms"] for name in forms
                                 if f"{name}_{precision}_ms" in row}
                        if times:
                            row[f"best_{precision}"] = min(times, key=times.get)
                        if "conv" in times and "fft" in times:
                            row[f"conv_over_fft_{precision}"] = times["conv"] / times["fft"]
                    x.grad = wt.grad = None
                    rows.append(row)
        return {"pass": "forward+backward; amp = autocast bf16 (fp16 without bf16), the FFT inside in fp32",
                "memory_format": str(self.layout), "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on any device: tests the script")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting sections after this")
    ap.add_argument("--out", help="JSON file (default $OUT/gpu.json, else bench/results/gpu.json)")
    args = ap.parse_args()
    b = _Bench(args)
    if b.device.type != "cuda" and not args.smoke:
        print("[gpu_bench] no CUDA device: running anyway; numbers are for this CPU", file=sys.stderr)
    if b.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 matmuls of the dense depthwise form
        torch.backends.cudnn.allow_tf32 = True
    b.result["cudnn_benchmark"] = False  # search.batches.fast_path: autotuning measured not to pay
    b.section("search_24x32", lambda: b.search_timing("mnet-24-32", None, 200 if not args.smoke else 4), 60)
    b.section("search_120x160", lambda: b.search_timing("mnet-120-160", 4 if not args.smoke else 2,
                                                        30 if not args.smoke else 3), 60)
    b.section("child_epoch_24x32", b.child_epoch, 20)
    b.section("inference_24x32", b.inference, 10)
    b.section("depthwise", b.depthwise, 60)
    s = b.result["sections"]
    b.result["gpu_hours_paper_protocol"] = {
        "24x32": s.get("search_24x32", {}).get("paper_protocol_gpu_hours"),
        "120x160": s.get("search_120x160", {}).get("paper_protocol_gpu_hours"),
    }
    b.write()
    print(json.dumps({k: v for k, v in b.result.items() if k != "sections"}, indent=2))
    print(f"[gpu_bench] full result → {b.out}", file=sys.stderr)
    return 1 if b.result["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
