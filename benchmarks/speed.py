"""Speed: metalab against the learn2learn-style reference, measured in the same run.

    python -m benchmarks.speed                     # all cases, table with ratios
    python -m benchmarks.speed --precisions fp32   # skip the bfloat16 rows
    python -m benchmarks.speed --case maml         # one case (prints JSON; used internally)
    python -m benchmarks.speed --paired protonet anil --paired-rounds 6 --steps 8
                                                   # paired ratios against the reference as run
    python -m benchmarks.speed --device cuda       # the same table on a GPU (both arms on it)
    python -m benchmarks.speed --fused-ab maml fomaml   # metalab with / without conv4's compiled first block

Meta-training step time (median over ``--steps`` steps after 3 warm-up steps) and tasks/s for
second-order MAML, first-order MAML, ANIL and ProtoNet on Omniglot-sized inputs (conv4, 28×28,
5-way 1-shot, 15 queries, meta-batch 32, 1 inner step), each case in its own process so its
peak resident memory is its own; adaptation latency (image 20-way 5-shot, text 150-way 5-shot
from cached embeddings); peak memory of 2nd-order MAML with 5 inner steps with and without
checkpointed inner steps; Omniglot episode sampling rate. Each training case also runs with
``train.precision: bf16`` (bfloat16 autocast, float32 weights). Every row is compared with the
reference *as run* (float32, glibc's default allocator: what a learn2learn user runs) and with the
reference under the *same settings* (the row's precision, metalab's allocator setting), so the
table shows how much of a speed-up is settings and how much is the methods' own engineering; a last
column gives metalab's fp32 step with ``train.task_threads: 1`` (its tasks one after another instead
of side by side on the cores, :mod:`metalab.algorithms.task_threads`). The reference is
:mod:`benchmarks.reference_l2l` (learn2learn's clone()/adapt() loop, re-implemented because
learn2learn cannot be installed beside torch 2.13 / Python 3.11).

With ``--device cuda`` the batch, metalab and the reference all live on the GPU, each timed step
ends with ``torch.cuda.synchronize()`` (kernels are asynchronous), and the memory columns are the
peak of ``torch.cuda.max_memory_allocated`` during the timed steps instead of resident memory.
Episode sampling stays on the CPU (that is where the sampler runs in training too).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import statistics
import subprocess
import sys
import time

import torch

from metalab.engine.precision import PRECISIONS

TASKS, WAYS, SHOTS, QUERIES = 32, 5, 1, 15


def _batch(device: torch.device = torch.device("cpu")):
    from metalab.data import EpisodeSampler
    from metalab.data.omniglot import load_omniglot

    return EpisodeSampler(load_omniglot(28), WAYS, SHOTS, QUERIES, TASKS, seed=0).sample(0).to(device)


def _device(name: str) -> torch.device:
    """``--device`` checked up front (the trainer's check), so that a missing GPU is one clear line."""
    from metalab.engine.trainer import resolve_device
    from metalab.errors import ConfigError

    try:
        device = resolve_device(name)
    except ConfigError as exc:
        raise SystemExit(f"--device: {exc}") from None
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {name}: only cpu and cuda[:N] are benchmarked.")
    return device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(step, steps: int, device: torch.device = torch.device("cpu")) -> list[float]:
    """Seconds of each of ``steps`` calls of ``step`` after 3 warm-up calls; on a GPU each call
    is timed to the end of its kernels."""
    for _ in range(3):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> float:
    """Reset the process's peak resident memory to its current value (Linux ``clear_refs`` 5) and
    return it in MB. ``ru_maxrss`` is not used: after fork + exec it can start at the parent's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    current = _status_mb("VmRSS")
    return current if current is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_rss() -> float:
    """Peak resident memory (MB) since the last :func:`_reset_peak_rss`."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(case: str, steps: int, precision: str = "fp32", allocator: str = "metalab", device: str = "cpu") -> dict:
    """One training case on ``device``; ``allocator="metalab"`` applies the trainer's CPU allocator
    setting (:mod:`metalab.engine.cpu_memory`), ``"system"`` leaves glibc's default (a learn2learn user's)."""
    from metalab.engine.cpu_memory import keep_freed_memory
    from metalab.engine.precision import training_precision

    if allocator == "metalab" and not keep_freed_memory():
        print("note: the allocator setting is not available here (not glibc)", file=sys.stderr)
    torch.manual_seed(0)
    dev = _device(device)
    batch = _batch(dev)
    case, _, threads = case.partition("@")  # "protonet@1": train.task_threads = 1 (tasks one after another)
    if case.startswith("ref-"):
        from benchmarks import reference_l2l as ref

        algo = case[4:]
        if algo in ("maml", "fomaml"):
            maml = ref.ReferenceMAML(ref.omniglot_cnn(WAYS), lr=0.4, first_order=algo == "fomaml").to(dev)
            opt = torch.optim.Adam(maml.parameters(), 1e-3)
            ref_step = lambda: ref.meta_step(maml, opt, batch)  # noqa: E731
        elif algo == "protonet":
            model = ref.omniglot_cnn(WAYS)[:-1].to(dev)
            opt = torch.optim.Adam(model.parameters(), 1e-3)
            ref_step = lambda: ref.protonet_step(model, opt, batch)  # noqa: E731
        elif algo == "anil":
            full = ref.omniglot_cnn(WAYS).to(dev)
            features, head = full[:-1], ref.ReferenceMAML(full[-1], lr=0.5)
            opt = torch.optim.Adam(list(features.parameters()) + list(head.parameters()), 1e-3)
            ref_step = lambda: ref.anil_step(features, head, opt, batch)  # noqa: E731
        else:
            raise SystemExit(f"unknown case {case}")

        def step():  # a learn2learn user would wrap the loop in torch.autocast the same way
            with training_precision(precision, dev):
                ref_step()
    else:
        algorithm = _metalab_algorithm(case, dev, threads)
        opt = torch.optim.Adam(algorithm.parameters(), 1e-3)

        def step():  # exactly what MetaTrainer does per step
            opt.zero_grad(set_to_none=True)
            with training_precision(precision, dev):
                algorithm.meta_backward(algorithm.params(), batch)
            opt.step()

    if dev.type == "cuda":  # "peak_rss_mb" is then the GPU's peak allocated memory, "step_rss_mb" the step's share
        _sync(dev)
        baseline = torch.cuda.memory_allocated(dev) / 2**20
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        baseline = _reset_peak_rss()
    times = _time(step, steps, dev)
    median = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else _peak_rss()
    return {"case": case + (f"@{threads}" if threads else ""), "precision": precision, "allocator": allocator,
            "device": str(dev), "median_s": median, "tasks_per_s": TASKS / median, "peak_rss_mb": peak,
            "step_rss_mb": peak - baseline}


def _metalab_algorithm(case: str, device: torch.device, threads: str = ""):
    """metalab's model for a training case, built as the trainer builds it (``threads``: a
    ``train.task_threads`` number, or ``""`` for ``auto``)."""
    from metalab.engine import RunConfig
    from metalab.engine.trainer import build_model

    # MAML and FOMAML with the reference's head (a Linear(64, 5) per class): the configuration whose
    # accuracy equals the reference's (benchmarks.maml_accuracy --head per-class); the default
    # shared-row head costs the same per step
    head = {"head": "per-class", "head_ways": WAYS}
    options = {"maml": {"inner_lr": 0.4, "inner_steps": 1, **head}, "fomaml": {"inner_lr": 0.4, "inner_steps": 1, **head},
               "anil": {"inner_lr": 0.5, "inner_steps": 1}, "protonet": {},
               "maml-5step": {"inner_lr": 0.4, "inner_steps": 5, **head},
               "maml-5step-checkpointed": {"inner_lr": 0.4, "inner_steps": 5, "checkpoint_inner": True, **head}}
    if case not in options:
        raise SystemExit(f"unknown case {case}; choose one of: {', '.join(options)}")
    algo = "maml" if case.startswith("maml-5step") else case
    cfg = RunConfig.from_dict({"train": {"algo": algo, "algo_options": options[case], "device": str(device),
                                         "task_threads": int(threads) if threads else "auto"},
                               "eval": {"settings": [[WAYS, SHOTS]]}})
    return build_model(cfg, (1, 28, 28), device, {"task": "classification"})


def sampling_rate(seconds: float = 3.0) -> dict:
    """Episodes/s of metalab's tensor sampler (float images, as training gets them) at the
    training meta-batch (32 tasks) and at 256 tasks per call, against a per-item Python sampler
    (the anchors' way: pick classes, pick items, stack items)."""
    from metalab.data import EpisodeSampler
    from metalab.data.omniglot import load_omniglot

    source = load_omniglot(28)
    out = {}
    for tasks in (TASKS, 256):
        sampler = EpisodeSampler(source, 5, 1, 15, tasks=tasks, seed=0)
        n, start, i = 0, time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            sampler.sample(i)
            n += sampler.tasks
            i += 1
        out[f"metalab_eps_{tasks}"] = n / (time.perf_counter() - start)
    by_class: dict[int, list[int]] = {}
    for idx, y in enumerate(source.y.tolist()):
        by_class.setdefault(y, []).append(idx)
    classes = list(by_class)
    rng = random.Random(0)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        chosen = rng.sample(classes, 5)
        items = [(source.x[j], label) for label, c in enumerate(chosen) for j in rng.sample(by_class[c], 16)]
        torch.stack([x for x, _ in items]).float().div(255)
        n += 1
    out["reference_eps"] = n / (time.perf_counter() - start)
    return out


def adaptation_latency(repeats: int = 20, device: torch.device = torch.device("cpu")) -> dict:
    """Milliseconds to adapt to a new 20-way 5-shot image task and predict 20×15 queries
    (median of ``repeats``): ProtoNet (prototypes) and MAML (10 SGD steps on all weights)."""
    from metalab.data import EpisodeSampler
    from metalab.data.omniglot import load_omniglot
    from metalab.engine import RunConfig
    from metalab.engine.trainer import build_model

    batch = EpisodeSampler(load_omniglot(28), 20, 5, 15, tasks=1, seed=0).sample(0).to(device)
    out = {}
    for algo, options in (("protonet", {}), ("maml", {"test_inner_steps": 10})):
        cfg = RunConfig.from_dict({"train": {"algo": algo, "algo_options": options, "device": str(device)}})
        algorithm = build_model(cfg, (1, 28, 28), device, {"task": "classification"}).eval()
        params = algorithm.params()

        def once():
            algorithm.adapt(params, batch.support_x[0], batch.support_y[0], 20).predict(batch.query_x[0])

        out[algo] = 1000 * statistics.median(_time(once, repeats, device))
    return out


def text_latency(repeats: int = 20, device: torch.device = torch.device("cpu")) -> dict:
    """Milliseconds to adapt to a new 150-way 5-shot CLINC150 task from cached embeddings and
    predict one utterance (median of ``repeats``), per head; the first call encodes and caches."""
    from metalab.algorithms.frozen_heads import fit_head
    from metalab.data.text import load_clinc150
    from metalab.engine.text_eval import draw_support
    from metalab.models.text_encoder import SentenceEncoder, embed_corpus

    source = embed_corpus(load_clinc150(), SentenceEncoder(layers=(4, 5, 6)), progress=False)
    support, _ = draw_support(source, 5, 0)
    sx, sy, q = source.x[support].to(device), source.y[support].to(device), source.x[:1].to(device)
    out = {}
    for kind in ("prototypes", "ridge", "logistic"):
        out[kind] = 1000 * statistics.median(_time(lambda: fit_head(kind, sx, sy, 150).scores(q), repeats, device))
    return out


def memory(steps: int, device: str = "cpu") -> dict:
    """Second-order MAML with 5 inner steps, with and without checkpointed inner steps."""
    out = {}
    for case in ("maml-5step", "maml-5step-checkpointed"):
        out[case] = run_case_process(case, steps, device=device)
    return out


def run_case_process(case: str, steps: int, precision: str = "fp32", allocator: str = "metalab", device: str = "cpu") -> dict:
    """:func:`run_case` in a fresh process (its peak memory and allocator setting its own)."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--case", case, "--steps", str(steps),
                          "--precision", precision, "--allocator", allocator, "--device", device],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"benchmark case {case} ({precision}, {device}) failed:\n{out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fused_block_ab(algo: str, rounds: int = 6, steps: int = 4) -> tuple[float, float]:
    """Median s/step of metalab's ``algo`` (the speed table's configuration) with and without
    conv4's compiled first block (:mod:`metalab.models.first_block`), in one process, alternating
    which goes first each round (2 warm-up and ``steps`` timed steps per arm and round)."""
    from metalab.engine.cpu_memory import keep_freed_memory

    keep_freed_memory()
    algorithm = _metalab_algorithm(algo, torch.device("cpu"))
    opt = torch.optim.Adam(algorithm.parameters(), 1e-3)
    batch = _batch()

    def step():
        opt.zero_grad(set_to_none=True)
        algorithm.meta_backward(algorithm.params(), batch)
        opt.step()

    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(rounds):
        for fused in ((True, False) if r % 2 == 0 else (False, True)):
            algorithm.backbone.fused_first_block = fused
            for _ in range(2):
                step()
            for _ in range(steps):
                start = time.perf_counter()
                step()
                times[fused].append(time.perf_counter() - start)
    return statistics.median(times[True]), statistics.median(times[False])


def _machine(device: torch.device) -> str:
    """The machine line of the table: the CPU's architecture and threads, and the GPU's name."""
    where = f"{platform.machine()}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        where += f", GPU {torch.cuda.get_device_name(device)}"
    return where


def paired_ratios(algo: str, rounds: int, steps: int, log=print, device: str = "cpu") -> list[float]:
    """Speed-up of metalab (fp32) over the reference as run, one ratio per round of two back-to-back
    runs (order alternating), so that a slow or fast spell of the shared machine hits both arms
    of a ratio alike; the spread of the ratios is the run-to-run uncertainty of the figure."""
    ratios = []
    for r in range(rounds):
        order = [(algo, "metalab"), (f"ref-{algo}", "system")]
        times = {case: run_case_process(case, steps, allocator=allocator, device=device)["median_s"]
                 for case, allocator in (order if r % 2 == 0 else order[::-1])}
        ratios.append(times[f"ref-{algo}"] / times[algo])
        log(f"{algo} round {r}: metalab {times[algo]:.3f} s/step, reference as run {times[f'ref-{algo}']:.3f} s/step, "
            f"{ratios[-1]:.2f}x")
    return ratios


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", help="run one case in this process and print JSON")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per arm; the best median counts")
    parser.add_argument("--algos", nargs="*", default=["maml", "fomaml", "anil", "protonet"])
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="with --case: training precision")
    parser.add_argument("--precisions", nargs="*", choices=PRECISIONS, default=list(PRECISIONS),
                        help="training precisions to tabulate (bf16 rows compare with the fp32 and the bf16 reference)")
    parser.add_argument("--allocator", choices=("metalab", "system"), default="metalab",
                        help="with --case: the trainer's CPU allocator setting, or glibc's default")
    parser.add_argument("--only-extras", action="store_true", help="skip the training-step cases")
    parser.add_argument("--paired", nargs="*", metavar="ALGO",
                        help="only paired ratios against the reference as run for these algorithms (fp32)")
    parser.add_argument("--paired-rounds", type=int, default=6, help="with --paired: rounds per algorithm")
    parser.add_argument("--fused-ab", nargs="*", metavar="ALGO",
                        help="only metalab with and without conv4's compiled first block (CPU, fp32), alternating in one process; ALGO: maml, fomaml, anil or protonet")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto: where the batch, metalab and the reference run")
    args = parser.parse_args(argv)
    device = _device(args.device)
    if args.case:
        print(json.dumps(run_case(args.case, args.steps, args.precision, args.allocator, args.device)))
        return
    where = _machine(device)
    if args.fused_ab:
        print(f"machine: {where}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}; "
              f"compiled first block on / off, 6 alternating rounds of 4 steps")
        for algo in args.fused_ab:
            on, off = fused_block_ab(algo)
            print(f"{algo}: compiled first block {on:.3f} s/step, conv4's ops {off:.3f} s/step, {off / on:.2f}x", flush=True)
        return
    if args.paired:
        print(f"machine: {where}, torch {torch.__version__}, "
              f"{time.strftime('%Y-%m-%d %H:%M')}; paired rounds, median of {args.steps} steps after 3 warm-up per run")
        for algo in args.paired:
            ratios = paired_ratios(algo, args.paired_rounds, args.steps, device=args.device)
            print(f"{algo}: speed-up against the reference as run, median of {len(ratios)} paired rounds "
                  f"{statistics.median(ratios):.2f}x (min {min(ratios):.2f}x, max {max(ratios):.2f}x)", flush=True)
        return
    from metalab.engine.cpu_memory import keep_freed_memory

    keep_freed_memory()  # as in every metalab training case: the in-process figures below get it too
    print(f"machine: {where}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}; conv4 28x28, {WAYS}w{SHOTS}s {QUERIES}q, meta-batch {TASKS}, 1 inner step")
    if device.type == "cuda":
        print("GPU: the MB columns are peak allocated GPU memory during the timed steps; the allocator setting is CPU-only")
    print("reference as run: fp32, glibc's default allocator (a learn2learn user's setup); reference, same settings: "
          "the row's precision and metalab's allocator setting (the speed-up that is the methods' own)")
    print(f"{'algorithm':10s} {'precision':>9s} {'metalab s/step':>15s} {'ref as run':>11s} {'speed-up':>9s} "
          f"{'ref same settings':>18s} {'speed-up':>9s} {'metalab tasks/s':>16s} {'metalab MB':>11s} {'reference MB':>13s} "
          f"{'metalab, tasks in turn':>23s}")
    for algo in [] if args.only_extras else args.algos:
        ref = f"ref-{algo}"
        arms = [(case, precision, "metalab") for precision in args.precisions for case in (algo, ref)]
        arms.append((ref, "fp32", "system"))
        arms.append((f"{algo}@1", "fp32", "metalab"))  # metalab with its tasks one after another
        res: dict[tuple[str, str, str], dict] = {}
        for _ in range(args.rounds):  # arms alternate, so background load hits all alike
            for case, precision, allocator in arms:
                r = run_case_process(case, args.steps, precision, allocator, args.device)
                if (case, precision, allocator) not in res or r["median_s"] < res[case, precision, allocator]["median_s"]:
                    res[case, precision, allocator] = r
        as_run = res[ref, "fp32", "system"]
        for precision in args.precisions:
            ours, same = res[algo, precision, "metalab"], res[ref, precision, "metalab"]
            print(f"{algo:10s} {precision:>9s} {ours['median_s']:15.3f} {as_run['median_s']:11.3f} "
                  f"{as_run['median_s'] / ours['median_s']:8.2f}x {same['median_s']:18.3f} {same['median_s'] / ours['median_s']:8.2f}x "
                  f"{ours['tasks_per_s']:16.1f} {ours['peak_rss_mb']:11.0f} {same['peak_rss_mb']:13.0f} "
                  + (f"{res[f'{algo}@1', 'fp32', 'metalab']['median_s']:13.3f} s ({res[f'{algo}@1', 'fp32', 'metalab']['peak_rss_mb']:.0f} MB)"
                     if precision == "fp32" else ""), flush=True)
    lat = adaptation_latency(device=device)
    print(f"adapt + predict, new 20-way 5-shot image task (300 queries): protonet {lat['protonet']:.1f} ms, "
          f"maml (10 steps) {lat['maml']:.1f} ms")
    t = text_latency(device=device)
    print("adapt + predict, new 150-way 5-shot text task from cached embeddings (CLINC150, MiniLM layers 4-6): "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in t.items()))
    m = memory(max(5, args.steps // 4), args.device)
    plain, ckpt = m["maml-5step"], m["maml-5step-checkpointed"]
    peak = "peak GPU memory" if device.type == "cuda" else "peak RSS"
    print(f"2nd-order MAML, 5 inner steps, meta-batch {TASKS}: {plain['median_s']:.3f} s/step, {peak} {plain['peak_rss_mb']:.0f} MB "
          f"(+{plain['step_rss_mb']:.0f} MB for the step); checkpointed inner steps: {ckpt['median_s']:.3f} s/step, "
          f"{peak} {ckpt['peak_rss_mb']:.0f} MB (+{ckpt['step_rss_mb']:.0f} MB)")
    s = sampling_rate()
    print(f"episode sampling (Omniglot 5w1s15q, float images gathered): metalab {s[f'metalab_eps_{TASKS}']:,.0f} "
          f"episodes/s at {TASKS} tasks per call ({s['metalab_eps_256']:,.0f} at 256), per-item reference "
          f"{s['reference_eps']:,.0f} episodes/s, {s[f'metalab_eps_{TASKS}'] / s['reference_eps']:.1f}x")


if __name__ == "__main__":
    main()
