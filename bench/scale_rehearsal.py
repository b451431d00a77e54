"""CPU scale rehearsal of the real path in the paper's setting (issue 27, item 7).

ViT-B/16 at 224 px (random weights), the paper preset (experiments/configs/presets/paper.yaml) with the overrides a
2-core CPU needs, on a FiF-format fixture of a few hundred 224 px images converted by fomo_ray's own converter
(`fomo-ray prepare pool` + `fomo-ray prepare fif`, FFCV betons, token ids of ViT-B-16's tokenizer), through:

1. the budget measurement (`budget.steps_per_task` / `method_record`, finetune and EWC, at the config's batch);
2. 2-rank DDP training steps (gloo on 127.0.0.1, `loop.run_stream` on each rank);
3. EWC's Fisher pass (`TaskLosses.sum_over`, timed by a wrapper);
4. an evaluation point (`loop.evaluate_point`, timed by a wrapper);
5. a checkpoint (the snapshot `on_checkpoint` receives, written with `checkpoint.save_state`);
6. a resume from the task-1 checkpoint on 2 ranks, whose results must equal the uninterrupted run's.

Every phase prints its wall seconds and its peak RSS per rank (VmHWM, reset by writing 5 to /proc/self/clear_refs).
A shard guard wraps `batch_step.model_input` (training and Fisher batches) and `evaluation.model_input`: the script
exits non-zero if any training or Fisher pass encoded more rows than a rank's shard ceil(b / W).

Then it extrapolates every phase to the paper's b = 512 on 8 GPUs (a rank's shard 64) for ViT-B/16 and ViT-L/14,
with and without gradient checkpointing, from the budget's own count on fake tensors, and checks the Target:
"ViT-L/14 at b = 512 on 8 ranks with checkpointing: peak device memory per phase < 80 GB".

    nice .venv/bin/python bench/scale_rehearsal.py [--keep DIR] [--extrapolate-only]
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

PRESET = REPO / "experiments" / "configs" / "presets" / "paper.yaml"
WORLD = 2
BATCH = 4  # global batch: a shard of 2 per rank
SHARD = -(-BATCH // WORLD)
PAPER_B, PAPER_W = 512, 8
PAPER_SHARD = -(-PAPER_B // PAPER_W)  # 64
DEVICE_TFLOPS, MFU = 989.0, 0.40  # declared device: H100 bf16 dense at 40% MFU
GB = 1e9


# --------------------------------------------------------------------------------------------------- memory / time
def reset_hwm() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def hwm_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / GB
    return float("nan")


class Phases:
    """Wall seconds and peak RSS (VmHWM since the phase began) of named phases in this process."""

    def __init__(self):
        self.rows: list[tuple[str, float, float]] = []
        self.t0 = time.perf_counter()
        reset_hwm()

    def mark(self, name: str) -> None:
        """Close the phase running since the last mark under ``name``; the next one starts now."""
        now = time.perf_counter()
        self.rows.append((name, now - self.t0, hwm_gb()))
        self.t0 = time.perf_counter()
        reset_hwm()

    def wrap(self, name_fn, fn):
        def wrapped(*a, **k):
            self.mark("(between)")
            try:
                return fn(*a, **k)
            finally:
                self.mark(name_fn(*a, **k) if callable(name_fn) else name_fn)
        return wrapped


# --------------------------------------------------------------------------------------------------- fixture
def build_fixture(base: Path) -> Path:
    """A FiF-format benchmark of ~400 224 px images: the authors' folder layout (DTD, CUB200; built with
    tests/_fif_fixtures.py's helpers) plus a webdataset pool, converted by `fomo-ray prepare pool/fif` at 224 px
    with ViT-B-16's token ids (FFCV betons, jpg)."""
    from _fif_fixtures import CUB_CLASSES, DTD_CLASSES, colour, entry, image_bytes, write_json, write_shard

    from fomo_ray.cli.prepare import fif_main, pool_main

    root, info = base / "data", base / "00_info"
    n = 0

    def img(dataset, key, fmt, size):
        nonlocal n
        path = root / dataset / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes(colour(n), size, fmt))
        n += 1

    write_json(info / "DTD_classnames.json", DTD_CLASSES)
    for split, per_class in (("train", 50), ("test", 10)):
        rows = {}
        for t, cls in enumerate(DTD_CLASSES):
            for i in range(per_class):
                key = f"dtd/dtd/images/{cls}/{cls}_{split}_{i:04d}.jpg"
                rows[key] = entry(cls, t, merged=[f"a {cls} texture, sample {i}"], primer=f"A photo of a {cls} texture.")
                img("DTD", key, "JPEG", (64, 48))
        write_json(info / f"DTD_{split}.json", rows)
    write_json(info / "CUB200_classnames.json", CUB_CLASSES)
    for split, count in (("train", 100), ("test", 20)):
        rows = {}
        for i in range(count):
            key = f"cub-200-images-{split}/{i}.png"
            rows[key] = entry(CUB_CLASSES[i % 2], i % 2, merged=f"a {CUB_CLASSES[i % 2].lower()} over the sea")
            img("CUB200", key, "PNG", (48, 48))
        write_json(info / f"CUB200_{split}.json", rows)
    write_shard(base / "shards" / "00000.tar",
                [{"key": f"{i:09d}", "files": {"jpg": image_bytes(colour(5000 + i), (64, 64)), "txt": f"web caption {i}"}}
                 for i in range(100)])
    common = ["--image-size", "224", "--workers", "1", "--no-progress", "--model", "ViT-B-16"]
    if pool_main(["--shards", str(base / "shards"), "--out", str(base / "pool"), *common]) != 0:
        raise SystemExit("FAIL: pool conversion")
    if fif_main(["--root", str(root), "--info-dir", str(info), "--out", str(base / "fif"), "--datasets",
                 "DTD,CUB200", "--pool", str(base / "pool"), *common]) != 0:
        raise SystemExit("FAIL: FiF conversion")
    return base / "fif"


def rehearsal_config(bench: Path, work: Path, mode: str, **extra):
    from fomo_ray.config import load_config

    over = {
        "data.root": str(bench), "data.loader": "ffcv", "data.num_workers": 1, "data.prefetch": 1,
        "backbone.pretrained": "", "backbone.precision": "fp32",
        "mixture.batch_size": BATCH, "stream.num_tasks": 2, "stream.ordering": "random",
        "budget.mode": mode, "budget.total_ft_steps": 4, "budget.cache_dir": str(work / "budget"),
        "method.name": "ewc", "method.reg.ewc_fisher_batches": 1,
        "evaluation.subset_min": 8, "evaluation.subset_fraction": 0.01, "evaluation.full_at_ends": False,
        "evaluation.batch_size": 8, "tracking.enabled": False, "ray.checkpoint_every_steps": 1,
        "ray.num_workers": WORLD, "output_dir": str(work / "runs"),
    }
    over.update(extra)
    return load_config(str(PRESET), over)


# --------------------------------------------------------------------------------------------------- the ranks
def _rank_main(rank, world, bench, work, port, mode):
    import torch.distributed as dist

    from fomo_ray.core import batch_step, checkpoint, loop

    from fomo_ray.models import evaluation

    torch.set_num_threads(1)
    work = Path(work)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ph = Phases()
    largest = {"train": 0, "fisher": 0, "eval": 0}
    in_fisher = [False]
    fisher_count = [0]
    real_input, real_eval_input, real_sum = batch_step.model_input, evaluation.model_input, \
        batch_step.TaskLosses.sum_over

    def guarded_input(images, *a, **k):
        kind = "fisher" if in_fisher[0] else "train"
        largest[kind] = max(largest[kind], int(images.shape[0]))
        return real_input(images, *a, **k)

    def eval_input(images, *a, **k):
        largest["eval"] = max(largest["eval"], int(images.shape[0]))
        return real_eval_input(images, *a, **k)

    def timed_sum(self, n, per_batch):
        in_fisher[0] = True
        ph.mark("(between)")
        try:
            return real_sum(self, n, per_batch)
        finally:
            in_fisher[0] = False
            fisher_count[0] += 1
            ph.mark(f"3 Fisher pass #{fisher_count[0]} (EWC, {n} batch)")

    batch_step.model_input = guarded_input
    evaluation.model_input = eval_input
    batch_step.TaskLosses.sum_over = timed_sum
    loop.evaluate_point = ph.wrap(lambda run, point, full: f"4 evaluation point {point}", loop.evaluate_point)
    loop.build_run = ph.wrap("1 build run (open data, budget, model, evaluator)", loop.build_run)
    loop.take_snapshot = ph.wrap(lambda run, t, s, *a: f"5a snapshot (t={t}, step={s})", loop.take_snapshot)
    saved: dict = {}
    final_model: dict = {}

    def on_step(t, step, loss, lr, norm, gstep):
        ph.mark(f"2 training step (t={t}, step={step})")

    def on_checkpoint(state):
        # rank 0 holds the state; only the uninterrupted run writes (and times) it: the resumed run needs none
        if rank == 0 and not isinstance(state, checkpoint.CheckpointMarker):
            if tag[0] == "full":
                d = work / "ckpt" / f"{tag[0]}_t{state.task}_s{state.step}"
                ph.mark("(between)")
                checkpoint.save_state(state, d)
                ph.mark(f"5b save_state (t={state.task}, step={state.step}, "
                        f"{'with' if state.optimizer else 'no'} optimizer)")
                size = sum(f.stat().st_size for f in d.iterdir()) / GB
                saved[(state.task, state.step)] = (str(d), size)
                if (state.task, state.step) != (1, 0):
                    shutil.rmtree(d, ignore_errors=True)
            final_model.clear()  # a fingerprint, not a copy: bitwise comparison without holding the weights twice
            final_model.update({k: hashlib.sha256(v.detach().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
                                for k, v in state.model.items()})
        ph.mark("(between)")

    from fomo_ray.core.loop import RunHooks

    hooks = RunHooks(on_step=on_step, on_checkpoint=on_checkpoint)
    cfg = rehearsal_config(Path(bench), work, mode)
    tag = ["full"]
    ph.mark("(setup)")
    df = loop.run_stream(cfg, hooks=hooks, device="cpu")
    ph.mark("(end)")
    full = {"df": df, "rows": list(ph.rows), "largest": dict(largest), "saved": dict(saved),
            "final": dict(final_model) if rank == 0 else None}
    full_final = full["final"]
    # ---- resume from the task-1 checkpoint (written by rank 0)
    dist.barrier()
    ph.rows.clear()
    for k in largest:
        largest[k] = 0
    tag[0] = "resumed"
    t0 = time.perf_counter()
    reset_hwm()
    state = checkpoint.load_state(work / "ckpt" / "full_t1_s0")
    del full["final"]  # (rank 0's fingerprints are kept below)
    ph.rows.append(("6a load_state (t=1)", time.perf_counter() - t0, hwm_gb()))
    ph.mark("(setup)")
    t_resume = time.perf_counter()
    df2 = loop.run_stream(cfg, hooks=hooks, resume=state, device="cpu")
    ph.rows.append(("6b resumed run, task 1 to the end", time.perf_counter() - t_resume, float("nan")))
    full["final"] = full_final
    out = {"rank": rank, "full": full,
           "resumed": {"df": df2, "rows": list(ph.rows), "largest": dict(largest),
                       "final": dict(final_model) if rank == 0 else None}}
    torch.save(out, work / f"rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------- extrapolation
def eval_forward_peak(name: str, batch: int) -> float:
    """Peak bytes alive during a no-grad bf16 ``encode_image`` of ``batch`` images of ``name`` (evaluation's pass),
    parameters excluded: counted on fake tensors by a dispatch mode that adds each new output storage and drops it
    once no tensor refers to it any more (a weakref finalizer per tensor)."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    from fomo_ray.budgets.budget import backbone_spec
    from fomo_ray.budgets.step_measure import _fake_mode, _storage_key, fake_model

    spec = backbone_spec(name)
    model = fake_model(spec.factory()).eval()
    refs: dict = {}
    live, peak = [0], [0]

    def drop(key):
        refs[key][1] -= 1
        if refs[key][1] == 0:
            live[0] -= refs.pop(key)[0]

    class Live(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor):
                    key = _storage_key(t)
                    if key not in refs:
                        refs[key] = [t.untyped_storage().nbytes(), 0]
                        live[0] += refs[key][0]
                        peak[0] = max(peak[0], live[0])
                    refs[key][1] += 1
                    weakref.finalize(t, drop, key)
            return out

    with _fake_mode(list(model.parameters())), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        images = torch.zeros(batch, 3, spec.image_size, spec.image_size)
        with Live():
            model.encode_image(images)
    return float(peak[0])


def extrapolate(work: Path, measured: dict) -> bool:
    """Every phase at the paper's b = 512 on 8 ranks, from the budget's own records at a rank's shard (counted on
    fake tensors; with ``backbone.grad_checkpointing`` the record charges the recomputed forward and keeps the
    activations ``memory_saving.block_ledger`` counted: outside the blocks + every block's input + one block)."""
    from fomo_ray.budgets.budget import method_record, steps_per_task
    from fomo_ray.config import load_config

    sec = lambda gflops: gflops * 1e9 / (DEVICE_TFLOPS * 1e12 * MFU)  # noqa: E731
    print(f"\n== Extrapolation to the paper's b = {PAPER_B} on {PAPER_W} GPUs (a rank's shard {PAPER_SHARD}) ==")
    print(f"declared device: {DEVICE_TFLOPS:g} TFLOP/s bf16 at {MFU:.0%} MFU; time = counted FLOPs / "
          f"({DEVICE_TFLOPS:g}e12 x {MFU})")
    print("memory: budget.method_record at the rank's shard (bf16 autocast, cpu_analytic = params + grads + AdamW + "
          "method state + saved activations; checkpointed: the record charged by memory_saving.charge_memory_saving)")
    ok = True
    table = []
    for name in ("ViT-B-16", "ViT-L-14"):
        base = {"backbone.name": name, "backbone.pretrained": "", "backbone.precision": "bf16",
                "mixture.batch_size": PAPER_B, "ray.num_workers": PAPER_W, "budget.cache_dir": str(work / "budget_x"),
                "method.name": "ewc"}
        t0 = time.perf_counter()
        reset_hwm()
        cfg = load_config(str(PRESET), base)
        steps = {m: steps_per_task(cfg, m, 20, device="cpu") for m in ("finetune", "ewc")}
        t_budget, hwm_budget = time.perf_counter() - t0, hwm_gb()
        recs = {ckpt: {m: method_record(cfg.replace({"backbone.grad_checkpointing": ckpt}), m, device="cpu",
                                        batch_size=PAPER_SHARD, store=False) for m in ("finetune", "ewc")}
                for ckpt in (False, True)}
        plain = recs[False]["finetune"]
        eval_peak = eval_forward_peak(name, cfg.evaluation.batch_size)
        pbytes = 4 * plain.total_params  # fp32 master weights
        print(f"\n-- {name}: {plain.total_params / 1e6:.1f} M parameters; budget (fake-tensor count, b={PAPER_B}, "
              f"W={PAPER_W}, T=20): finetune {steps['finetune']} steps/task, EWC {steps['ewc']} steps/task; counting "
              f"took {t_budget:.1f} s wall, peak RSS {hwm_budget:.2f} GB")
        print(f"   activations saved at shard {PAPER_SHARD}: plain {plain.batch_bytes / GB:.2f} GB, checkpointed "
              f"{plain.checkpointed_batch_bytes / GB:.2f} GB; state (finetune: params + grads + AdamW = 4 x fp32 "
              f"params = {4 * pbytes / GB:.2f} GB): the record's {(plain.peak_bytes - plain.batch_bytes) / GB:.2f} GB")
        for ckpt in (False, True):
            tag = "ckpt on " if ckpt else "ckpt off"
            for m in ("finetune", "ewc"):
                r = recs[ckpt][m]
                rows = {"2 training step": (r.peak_bytes, sec(r.counted_gflops),
                                            "record peak; t = counted FLOPs at the shard / dev")}
                if m == "ewc":
                    fisher_batches = cfg.method.reg.ewc_fisher_batches
                    rows["3 Fisher pass"] = (r.peak_bytes + 2 * pbytes, fisher_batches * sec(r.counted_gflops),
                                             f"train + 2 x fp32 params (accumulator, all-reduce buffer); t = "
                                             f"{fisher_batches} batches x step FLOPs / dev")
                    eval_b = cfg.evaluation.batch_size
                    state = r.peak_bytes - (r.checkpointed_batch_bytes if ckpt else r.batch_bytes)
                    rows["4 evaluation"] = (state + eval_peak,
                                            1000 * sec(recs[False][m].counted_gflops / 3) / PAPER_SHARD,
                                            f"resident training state + no-grad encode_image peak at eval "
                                            f"b={eval_b} ({eval_peak / GB:.2f} GB); t per 1,000 images = 1,000 x "
                                            f"fwd FLOPs/sample / dev")
                    rows["5 checkpoint (rank-0 host RAM)"] = (5 * pbytes, float("nan"),
                                                              "params + AdamW exp_avg/exp_avg_sq + EWC fisher/anchor, "
                                                              "fp32 (a mid-task snapshot)")
                for phase, (mem, t, formula) in rows.items():
                    table.append((name, tag, m, phase, mem / GB, t, formula))
    for row in table:
        if row[0] == "ViT-L-14" and row[1] == "ckpt on " and not row[3].startswith("5"):
            ok &= row[4] < 80
    print(f"\n{'backbone':9} {'ckpt':8} {'method':8} {'phase':31} {'GB/rank':>8} {'s':>9}  formula")
    for name, tag, m, phase, mem, t, formula in table:
        ts = f"{t:9.3f}" if t == t else "        -"
        print(f"{name:9} {tag:8} {m:8} {phase:31} {mem:8.2f} {ts}  {formula}")
    if measured.get("save_rate"):
        for name in ("ViT-B-16", "ViT-L-14"):
            host = [r for r in table if r[0] == name and r[3].startswith("5")][0][4]
            print(f"checkpoint write of {name}: {host:.2f} GB at this machine's measured save_state rate "
                  f"{measured['save_rate']:.2f} GB/s -> {host / measured['save_rate']:.1f} s (rank 0, background)")
    worst = max(r[4] for r in table if r[0] == "ViT-L-14" and r[1] == "ckpt on " and not r[3].startswith("5"))
    print(f"\nTarget 'ViT-L/14 at b = 512 on 8 ranks with checkpointing: peak device memory per phase < 80 GB': "
          f"{'PASS' if ok else 'FAIL'} (largest device phase {worst:.2f} GB per rank)")
    return ok


# --------------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keep", help="work directory to keep (default: a temporary one, removed)")
    ap.add_argument("--extrapolate-only", action="store_true", help="skip the CPU run; print the b = 512 figures")
    args = ap.parse_args()
    if args.extrapolate_only:
        with tempfile.TemporaryDirectory(prefix="scale_rehearsal_") as work:
            return 0 if extrapolate(Path(work), {}) else 1
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="scale_rehearsal_"))
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    failures = []
    try:
        print(f"== Scale rehearsal: ViT-B-16 @ 224 px, random weights, paper preset, b = {BATCH}, W = {WORLD} "
              f"(shard {SHARD}), torch {torch.__version__}, {os.cpu_count()} CPUs ==")
        ph = Phases()
        bench = build_fixture(work / "fixture")
        from fomo_ray.data.format import open_benchmark

        b = open_benchmark(bench)
        ph.mark("0 fixture (convert pool + FiF at 224 px)")
        print(f"fixture: {bench} image_size={b.image_size}, rows: "
              + ", ".join(f"{s} {b.num_rows(s)}" for s in b.splits) + f"; tokens: {sorted(b.manifest['tokens'])}")

        # ---- phase 1: budget measurement at the config's batch
        from fomo_ray.budgets import step_measure
        from fomo_ray.budgets.budget import BudgetError, method_record, steps_per_task

        real_clip_batch, passes = step_measure.clip_batch, []

        def spy_clip_batch(batch_size, *a, **k):
            out = real_clip_batch(batch_size, *a, **k)
            passes.append((batch_size, hasattr(out[0], "fake_mode")))
            return out
        step_measure.clip_batch = spy_clip_batch
        reset_hwm()
        t0 = time.perf_counter()
        cfg_maf = rehearsal_config(bench, work, "maf")
        recs = {m: method_record(cfg_maf, m, device="cpu") for m in ("finetune", "ewc")}
        steps = {}
        for m in ("finetune", "ewc"):
            try:
                steps[m] = steps_per_task(cfg_maf, m, 2, device="cpu")
            except BudgetError as e:
                steps[m] = f"BudgetError: {str(e)[:90]}..."
        ph.rows.append(("1 budget measurement (finetune + EWC)", time.perf_counter() - t0, hwm_gb()))
        step_measure.clip_batch = real_clip_batch
        for m, r in recs.items():
            print(f"budget {m}: {r.step_gflops:.1f} GFLOP/step at b={r.batch_size}, peak {r.peak_bytes / GB:.2f} GB "
                  f"({r.memory_kind}), task {r.task_gflops:.1f} GFLOP, measured: {r.measured}; steps/task (maf): "
                  f"{steps[m]}")
        real = [bs for bs, fake in passes if not fake]
        print(f"budget passes run: {passes} (real passes: {real or 'none'})")
        if any(bs > SHARD for bs in real):
            failures.append(f"budget ran a real pass of {max(real)} rows > shard {SHARD}")
        mode = "maf" if all(isinstance(v, int) and v >= 1 for v in steps.values()) else "equal_steps"
        print(f"training with budget.mode={mode}" + ("" if mode == "maf" else
              " (under maf, EWC gets < 1 step with 2 fine-tuning steps per task: its per-task Fisher charge)"))
        ph.t0 = time.perf_counter()

        # ---- phases 2-6 on 2 ranks
        import torch.multiprocessing as mp

        t0 = time.perf_counter()
        mp.spawn(_rank_main, args=(WORLD, str(bench), str(work), _free_port(), mode), nprocs=WORLD, join=True)
        t_ddp = time.perf_counter() - t0
        ranks = [torch.load(work / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
        print(f"\n== Measured phases (this machine; wall s, peak RSS GB per rank) — 2-rank spawn took {t_ddp:.1f} s ==")
        print(f"{'phase':58} " + " ".join(f"{'rank' + str(r) + ' s':>9} {'GB':>6}" for r in range(WORLD)))
        print(f"{ph.rows[0][0]:58} {ph.rows[0][1]:9.1f} {ph.rows[0][2]:6.2f}   (driver)")
        print(f"{ph.rows[1][0]:58} {ph.rows[1][1]:9.1f} {ph.rows[1][2]:6.2f}   (driver)")
        save_rate = None
        for part in ("full", "resumed"):
            print(f"-- {part} run")
            per_rank = [[row for row in r[part]["rows"] if not row[0].startswith("(")] for r in ranks]
            names = list(dict.fromkeys(row[0] for rows in per_rank for row in rows))
            for n in names:
                cells = []
                for rows in per_rank:
                    hit = [row for row in rows if row[0] == n]
                    cells.append(f"{hit[0][1]:9.2f} {hit[0][2]:6.2f}" if hit else f"{'-':>9} {'-':>6}")
                print(f"{n[:58]:58} " + " ".join(cells))
                if n.startswith("5b") and "with optimizer" in n:
                    d = ranks[0]["full"]["saved"]
                    sizes = [v[1] for v in d.values()]
                    hit = [row for row in per_rank[0] if row[0] == n][0]
                    save_rate = save_rate or (max(sizes) / hit[1] if hit[1] > 0 else None)
        print("checkpoint files (rank 0): " + ", ".join(f"(t={k[0]}, s={k[1]}) {v[1]:.2f} GB"
                                                       for k, v in ranks[0]["full"]["saved"].items()))
        # ---- shard guard
        print(f"\n== Shard guard: a rank's shard is ceil({BATCH}/{WORLD}) = {SHARD} rows ==")
        for r in ranks:
            for part in ("full", "resumed"):
                lg = r[part]["largest"]
                print(f"rank {r['rank']} {part:8}: largest training batch {lg['train']}, Fisher batch {lg['fisher']}, "
                      f"evaluation batch {lg['eval']}")
                for kind in ("train", "fisher"):
                    if lg[kind] > SHARD:
                        failures.append(f"rank {r['rank']} ({part}) ran a {kind} pass of {lg[kind]} rows > shard {SHARD}")
                    if part == "full" and lg[kind] == 0:
                        failures.append(f"rank {r['rank']} ran no {kind} pass (the guard saw nothing)")
        # ---- resume equality
        import pandas as pd

        a, b2 = ranks[0]["full"]["df"], ranks[0]["resumed"]["df"]
        try:
            pd.testing.assert_frame_equal(a.reset_index(drop=True), b2.reset_index(drop=True), check_exact=True)
            same_df = True
        except AssertionError as e:
            same_df = False
            failures.append(f"resumed results differ from the uninterrupted run's: {str(e)[:300]}")
        fa, fb = ranks[0]["full"]["final"], ranks[0]["resumed"]["final"]
        differ = [k for k in fa if fa[k] != fb.get(k)] if fa and fb else ["(no final state)"]
        print(f"\n== Resume from the task-1 checkpoint on 2 ranks: results table equal (exact): {same_df}; "
              f"final weights bitwise equal (sha256 per tensor): {not differ} ({len(fa or {})} tensors, "
              f"{len(a)} result rows) ==")
        if differ:
            failures.append(f"resumed final weights differ from the uninterrupted run's in {len(differ)} tensors")
        ok = extrapolate(work, {"save_rate": save_rate})
        if not ok:
            failures.append("Target FAIL: ViT-L/14 checkpointed peak >= 80 GB in some phase")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\ntotal wall time {time.perf_counter() - t_all:.1f} s")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("OK: no pass over more than a rank's shard; resume exact")
    return 0


if __name__ == "__main__":
    sys.exit(main())
