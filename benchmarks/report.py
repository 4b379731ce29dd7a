"""Regenerate docs/performance.md from benchmarks/results/*.json.

    python -m benchmarks report

Every figure comes from a JSON written by a benchmark; each table names the command
that reproduces it, the machine, the versions and the load average during the run.
"""

from __future__ import annotations

import json
import os

from .common import HERE, RESULTS

DOC = os.path.join(os.path.dirname(HERE), "docs", "performance.md")


def _load(name):
    path = os.path.join(RESULTS, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _mib(b):
    return "n/a" if b is None else f"{b / 2**20:.0f}"


def _f(v, fmt=".2f"):
    return "n/a" if v is None else format(v, fmt)


def _load_line(d):
    a, b = d.get("loadavg_start"), d.get("loadavg_end")
    if not a:
        return ""
    s = f"1-minute load average {a[0]:.2f} at the start"
    if b:
        s += f", {b[0]:.2f} at the end"
    return s + (" (quiet: < 1.0)" if a[0] < 1.0 else " (**contended**: other processes shared the 2 cores)")


def _machine(d):
    m = d["machine"]
    v = ", ".join(f"{k} {x}" for k, x in m["versions"].items())
    return f"{m.get('cpu_model') or m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}; {v}; {m['date']}"


def section_floor(d, lines):
    lines += ["## 1. The limit: FFT rate and the FFT floor of one iteration", "",
              f"Command: `{d['command'].strip()}` (median of {d['repeats']} runs, one thread). Machine: {_machine(d)}. {_load_line(d)}.", "",
              "| library | N | batch | us per 2-D FFT | GFLOP/s (5 N^2 log2 N^2) |", "|---|---|---|---|---|"]
    for r in d["fft_rates"]:
        lines.append(f"| {r['library']} | {r['n']} | {r['batch']} | {r['us_per_fft']:.1f} | {r['gflops']:.2f} |")
    it = d["iteration"]
    best = d["best_us_per_fft_by_library"]
    n = d["dataset"]["detector"]
    ratio = ""
    if "pyfftw (reused plan)" in best and "scipy.fft" in best:
        ratio = (f" At N = {n}: pyFFTW {best['scipy.fft'] / best['pyfftw (reused plan)']:.1f}x faster than scipy.fft, "
                 f"scipy.fft {best['numpy.fft'] / best['scipy.fft']:.1f}x faster than numpy.fft.")
    lines += ["", f"FFT library on the hot path: **{d['fft_backend_in_use']}** (`daskptycho.fft.backend: auto`).{ratio}",
              f"Streaming bandwidth (`a = b + c`, float32, 256 MiB arrays): {d['stream_bandwidth_bytes_per_s'] / 1e9:.2f} GB/s.", "",
              f"One iteration (forward + gradient) of the multislice model on the engines dataset "
              f"({d['dataset']['scan'][0]}x{d['dataset']['scan'][1]} positions, {n} px, {d['dataset']['slices']} slices), "
              f"counted by instrumenting `backend.fft2/ifft2` during a real `ml` step: **{it['ffts']} FFTs** "
              f"({it['ffts_per_position_per_slice']:.2f} per position per slice: the far field and its adjoint once per position, "
              f"two propagation FFTs per slice boundary each way), {it['bytes'] / 2**30:.2f} GiB through the FFTs. "
              f"Floor = FFT count x best time per FFT = **{d['floor_s_per_iteration']:.3f} s per iteration** "
              f"(those bytes at the streaming bandwidth alone: {d['fft_bytes_at_stream_bandwidth_s']:.3f} s).", ""]
    if "numpy_path" in it:
        npath = it["numpy_path"]
        lines += [f"The same `ml` step timed in this process (one thread, warm, median of {it['repeats']}, the two paths "
                  f"alternated): **{it['step_seconds']:.3f} s** on the default CPU path ({it['path']}), "
                  f"floor / step = {d['floor_s_per_iteration'] / it['step_seconds']:.2f}; "
                  f"{npath['step_seconds']:.3f} s on the NumPy reference path (`daskptycho.kernels: numpy`, "
                  f"{npath['step_seconds'] / it['step_seconds']:.1f}x slower), of which {npath['fft_share_of_step']:.0%} inside "
                  f"the batched FFT calls at {npath['us_per_fft_in_step']:.1f} us per FFT (best isolated: "
                  f"{d['best_us_per_fft_cpu'][str(n)]:.1f} us) and the rest elementwise NumPy passes (products with the "
                  "object windows, kernels and conjugates, |psi|^2, the cost, window cut and add).", ""]


def _s(r):
    return r.get("s_per_iteration", r.get("iteration_s_median"))


TARGET_NAMES = {"ml_floor_fraction": "ml: floor / measured", "gd1_over_ml": "gd 1 tile: extra time over ml",
                "gd4_speedup_2_vs_1_worker": "gd 4 tiles: speedup 2 workers vs 1"}


def _engine_rows(d, lines):
    lines += ["| engine | tiles | workers | s / iteration (median of runs) | range over runs | floor / measured | "
              "same, FFT timed before the run | peak MiB per worker (above baseline) | compute s / it | transfer s / it | "
              "idle worker-s / it | final cost |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        ts = r["task_stream"]
        per = ts.get("per_iteration") or {k: None for k in ("compute_s", "transfer_s", "idle_s")}
        rng = r.get("s_per_iteration_range")
        lines.append(f"| {r['label']} | {r['tiles']} | {r['workers']} | {_s(r):.3f} | "
                     f"{f'{rng[0]:.3f}-{rng[1]:.3f}' if rng else 'n/a'} | {_f(r['floor_fraction'])} | "
                     f"{_f(r.get('floor_now_fraction'))} ({_f(r.get('us_per_fft_before_case'), '.1f')} us) | "
                     f"{_mib(r['peak_above_baseline_bytes_max'])} | {_f(per['compute_s'], '.3f')} | {_f(per['transfer_s'], '.3f')} | "
                     f"{_f(per['idle_s'], '.3f')} | {r['final_cost']:.4g} |")
    for f in d.get("failed", []):
        lines.append(f"| {f['label']} | failed: {f['error'][:120]} | | | | | | | | | | |")


def _target_rows(d, lines):
    lines += ["| target | value (median of rounds) | each round | required | met |", "|---|---|---|---|---|"]
    for k, t in d["targets"].items():
        each = ", ".join(f"{x:.3f}" for x in t.get("per_round", [t["value"]]))
        lines.append(f"| {TARGET_NAMES.get(k, k)} | {t['value']:.3f} | {each} ({t.get('rounds_met', '?')} of "
                     f"{len(t.get('per_round', [1]))} met) | {t['target']} | {'yes' if t['met'] else '**no**'} |")


def section_engines(d, floor, lines):
    lines += ["## 2. Engines: time per iteration, memory, Dask overhead", "",
              f"Command: `{d['command'].strip()}`; dataset {d['dataset']}; {d['iterations']} iterations per run, "
              f"{d.get('repeats', 1)} runs of every case, the rounds interleaved (every case once, then again); "
              f"fresh process LocalCluster per run, 1 thread per worker; message batching `{d.get('message_interval', 'auto')}` "
              f"(`daskptycho.cluster.message-interval`). Machine: {_machine(d)}. {_load_line(d)}.", "",
              f"A run's time per iteration is its steady state: the wall time between the arrivals of the {d.get('skip', 2)}nd and "
              "the last iteration's costs at the client, over the iterations between (`daskptycho.metrics.steady_iteration_s`). "
              "With one iteration kept in flight ahead the costs arrive in bursts (0.02 s, then 1.1 s), so the median of single "
              "intervals, used before, could land on either side of the rate; the table gives the median over runs and the range. "
              f"Peer exchange runs blocks of {d.get('block_iterations', 16)} iterations here, whose costs arrive together, and a "
              "client busy building the next blocks' graphs may fetch two blocks' costs at once: the span starts at the end of "
              "the first such group of arrivals after the 2nd cost (`benchmarks.engines.arrival_groups`: the next cost more "
              "than 5% of the run's mean interval later).", ""]
    _engine_rows(d, lines)
    lines += ["", "`ml` and `gd 1 tile` run on one of the two workers, so half their worker-seconds are idle by construction. "
              "Task-stream columns cover the steady-state iterations, per iteration (median over runs): compute and "
              "transfer summed over workers; idle = workers x wall - compute - transfer (scheduler round trips, waiting "
              "on a neighbour's strip, the client's work between iterations). The floor is the ml FFT count (dm: its own, "
              "3 FFTs per position: Fourier error, projection and back) x the best measured time per FFT (section 1); the "
              "next column uses instead the time of one FFT measured (median of 300) just before each run, the machine's "
              "speed at that moment.", "", "### Targets", "",
              "Each ratio is formed within a round from its two rows, run one after the other, and the median over rounds "
              "is reported (the machine's speed drifts between rounds).", ""]
    _target_rows(d, lines)
    lines.append("")
    batched = _load("engines_batched")
    if batched:
        lines += ["**With distributed's own message batching** (`daskptycho.cluster.message-interval: default`: the scheduler "
                  "sends a worker at most one batch every 5 ms, a worker the scheduler one every 2 ms), "
                  f"`{batched['command'].strip()}` with `DASK_DASKPTYCHO__CLUSTER__MESSAGE_INTERVAL=default` "
                  f"({_load_line(batched)}):", ""]
        _engine_rows(batched, lines)
        lines.append("")
        _target_rows(batched, lines)
        lines.append("")
    reasons = _reasons(d, floor)
    if reasons:
        lines += ["Why a target is missed (from the measurements above):", ""] + [f"- {r}" for r in reasons] + [""]


def _reasons(d, floor):
    """One sentence per missed target, built from the figures (not written by hand)."""
    by = {r["label"]: r for r in d["rows"]}
    out = []
    t = d["targets"]
    busy = d.get("loadavg_start", [0])[0] >= 1.0

    def per(r, k):
        return r["task_stream"].get("per_iteration", {}).get(k, float("nan"))

    if "ml_floor_fraction" in t and not t["ml_floor_fraction"]["met"] and floor and "numpy_path" in floor["iteration"]:
        it = floor["iteration"]
        m = by["ml"]
        out.append(f"ml at {t['ml_floor_fraction']['value']:.2f} of the floor in its worker (best FFT time of the fft_floor run); "
                   f"against the FFT time measured just before the runs ({m['us_per_fft_before_case']:.1f} us) it is at "
                   f"{m['floor_now_fraction']:.2f}; the same step in a plain process reached "
                   f"{floor['floor_s_per_iteration'] / it['step_seconds']:.2f}. Path: {it['path']}."
                   + (" The machine was shared with other processes during the run." if busy else ""))
    if "gd1_over_ml" in t and not t["gd1_over_ml"]["met"]:
        g, m = by["gd 1 tile"], by["ml"]
        out.append(f"gd 1 tile {t['gd1_over_ml']['value']:.0%} over ml: {per(g, 'compute_s'):.3f} s of compute per iteration "
                   f"against ml's {per(m, 'compute_s'):.3f} s, idle {per(g, 'idle_s'):.3f} s (ml {per(m, 'idle_s'):.3f} s)."
                   + (" Contended machine: timings are noisy." if busy else ""))
    if "gd4_speedup_2_vs_1_worker" in t and not t["gd4_speedup_2_vs_1_worker"]["met"]:
        g2, g1 = by["gd 4 tiles"], by["gd 4 tiles on 1 worker"]
        out.append(f"gd 4 tiles: {t['gd4_speedup_2_vs_1_worker']['value']:.2f}x from 1 to 2 workers: compute "
                   f"{per(g1, 'compute_s'):.3f} s per iteration on 1 worker vs {per(g2, 'compute_s'):.3f} s on 2 (the "
                   f"scheduler and client share the 2 cores), transfer {per(g2, 'transfer_s'):.3f} s, idle "
                   f"{per(g2, 'idle_s'):.3f} worker-s per iteration."
                   + (f" Load average {d['loadavg_start'][0]:.1f} at the start: other processes held the cores." if busy else ""))
    return out


def section_peers(d, lines):
    lines += ["## 3. A peer: Pty-Chi LSQML on the same data", "",
              f"Command: `{d['command'].strip()}` (its own venv: `bash benchmarks/peers/setup.sh`; not part of `make bench`). "
              f"Dataset {d['dataset']}; {d['iterations']} iterations each; peer versions {d['peer_versions']}. "
              f"Machine: {_machine(d)}. {_load_line(d)}.", "",
              "| variant | code | threads | s / iteration (median, first excluded) | phase r vs truth | phase RMS (rad) |",
              "|---|---|---|---|---|---|"]
    for r in d["rows"]:
        code = r["code"] + (f" (batch {r['batch_size']})" if r.get("batch_size") else "")
        lines.append(f"| {r['variant']} | {code} | {r['threads']} | {r['iteration_s_median']:.3f} | {r['phase_r']:.4f} | {r['phase_rms_rad']:.4f} |")
    lines += ["", "Same object grid and start (ones), same fixed probe, same integer positions, same iterations; "
              "error by `daskptycho.metrics.phase_correlation` over the scanned field for both. "
              "daskptycho's `ml` runs full batch (gradient descent with a diagonal preconditioner) and in minibatches of "
              "Pty-Chi's size; Pty-Chi's LSQML uses minibatches with solved step sizes. At equal iterations the fair "
              "error comparison is minibatch against minibatch; full batch makes one update per iteration.", ""]


def section_scaling(d, lines):
    c = d["calibration"]
    lp = d["loopback"]
    lines += ["## 4. Scaling model against the paper (Tables II and III)", "",
              f"Command: `{d['command'].strip()}` (reads engines.json and fft_floor.json). {_load_line(d)}.", "",
              f"Calibration: {c['c_pos_slice_s_at_bench'] * 1e3:.3f} ms per position per slice at N = {c['bench_N']} on one core here "
              f"(ml row); x N^2 log N^2 to N = 1024: {c['c_pos_slice_s_cpu_1024'] * 1e3:.1f} ms on one core. "
              f"V100 (assumed): {c['ffts_per_position_per_slice']:.2f} FFTs per position per slice x {c['v100_fft_1024_s_assumed'] * 1e6:.0f} us "
              f"(1024^2 complex64 FFT, two read+write passes at 900 GB/s) / the ml floor fraction measured here ({_f(c['ml_floor_fraction'])}) = "
              f"{c['c_pos_slice_s_v100_1024_assumed'] * 1e3:.2f} ms. Loopback between two worker processes (measured): "
              f"latency {lp['alpha_s'] * 1e3:.2f} ms, {lp['beta_bytes_per_s'] / 1e9:.2f} GB/s. Summit (assumed): "
              f"{d['summit_assumed']['alpha_s'] * 1e6:.0f} us, {d['summit_assumed']['beta_bytes_per_s'] / 1e9:.1f} GB/s per GPU "
              "(EDR InfiniBand 12.5 GB/s per node shared by 6 GPUs).", ""]
    hop = d.get("hop")
    if hop:
        lines += [f"Scheduler (measured, `benchmarks.scaling.measure_hop`, message batching as a run sets it): a dependency "
                  f"costs a round trip of **{hop['same_worker_s'] * 1e3:.2f} ms** between tasks on one worker and "
                  f"**{hop['alternating_s'] * 1e3:.2f} ms** between two workers (a chain of 200 trivial tasks); independent "
                  f"tasks go through at {hop['per_task_s'] * 1e3:.3f} ms each. With distributed's own batching a round trip "
                  "took 5.7-5.8 ms here (the scheduler's 5 ms send interval). The Summit predictions assume the same "
                  "scheduler.", ""]
    if d.get("peer_message_s") is not None:
        node = d.get("summit_node_assumed", {})
        lines += [f"Peer exchange (`daskptycho.schedule.exchange: peer`, the default): one message between two workers' stages "
                  f"(`benchmarks.scaling.measure_peer_hop`, 1 KiB bounced 200 times) costs **{d['peer_message_s'] * 1e3:.3f} ms** "
                  f"here, with no scheduler in between; the scheduler sees a stage and a message per worker per block of "
                  f"{d.get('block_iterations', 8)} iterations. On Summit a message costs max(that, the link's latency) + bytes / "
                  f"bandwidth, between the {node.get('gpus', 6)} GPUs of a node over NVLink (assumed "
                  f"{node.get('alpha_s', 1e-5) * 1e6:.0f} us, {node.get('beta_bytes_per_s', 5e10) / 1e9:.0f} GB/s, the paper's "
                  "per-link figure), between nodes as above; the placement puts consecutive tiles of a row on one node.", ""]
    lines += ["### Validation here", "", "| run | schedule | measured s/it | predicted s/it | compute | passes and hops | scheduler (tasks x s/task) | "
              "measured / predicted |", "|---|---|---|---|---|---|---|---|"]
    for v in d["validation"]:
        lines.append(f"| {v['label']} | {v.get('schedule', 'tile graph')} | {v['measured_s']:.3f} | {v['predicted_s']:.3f} | {v['predicted_compute_s']:.3f} | "
                     f"{v['predicted_comm_s']:.3f} | {_f(v.get('predicted_scheduler_s'), '.3f')} ({_f(v.get('tasks'), '.0f')} tasks) | "
                     f"{v['ratio_measured_over_predicted']:.2f} |")
    lines += ["", "### Predictions for the paper's datasets (100 iterations, V100 assumption)", "",
              "| dataset | engine | halos | schedule | workers | tiles | predicted min | (compute + comm) | scheduler min (tasks / it) | paper min | predicted GB/worker | same, wave checkpoints c = 10 (min) | paper GB/GPU | max positions per tile | extended tile px |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in d["predictions"]:
        sched = p.get("schedule", "tile graph")
        if "error" in p:
            lines.append(f"| {p['dataset']} | {p['engine']} | {p.get('halos', 'whole windows')} | {sched} | {p['workers']} | | {p['error']} | | | | | | | | |")
            continue
        tasks = p.get("tasks_per_iteration", "n/a")
        tasks = f"{tasks:,.0f}" if isinstance(tasks, (int, float)) else tasks
        lines.append(f"| {p['dataset']} | {p['engine']} | {p.get('halos', 'whole windows')} | {sched} | {p['workers']} | {p['tiles'][0]}x{p['tiles'][1]} | {p['predicted_minutes_100_it_v100']:.1f} | "
                     f"{p['predicted_compute_minutes']:.1f} + {p['predicted_comm_minutes']:.1f} | "
                     f"{_f(p.get('predicted_scheduler_minutes'), '.1f')} ({tasks}) | {_f(p['paper_minutes'], '.1f')} | "
                     f"{p['predicted_memory_gb']:.2f} | {_c10(p)} | {_f(p['paper_memory_gb'])} | {p['max_positions_per_tile']} | {p['extended_px_max']} |")
    refined = [p for p in d["predictions"] if "probe_refined_minutes_100_it_v100" in p and p["dataset"] == "large"]
    if refined:
        lines += ["", "With the probe refined as well (the paper's runs keep it fixed), the large dataset, peer rows "
                  "(`benchmarks.scaling.probe_seconds`: each round sums the probe gradient over the workers, steps the probe on "
                  "`daskptycho.schedule.probe_steppers` = 4 of them and relays it down a binary tree of workers to the others, "
                  "alongside the strips; the last column: every worker stepping its own copy from the two halves of the sum, "
                  "which then go to every worker):", "",
                  "| workers | probe fixed (min / 100 it) | probe refined, relayed | probe's share of a round (s) | every worker stepping it |",
                  "|---|---|---|---|---|"]
        lines += [f"| {p['workers']} | {p['predicted_minutes_100_it_v100']:.1f} | {p['probe_refined_minutes_100_it_v100']:.1f} | "
                  f"{p['probe_refined_probe_s_per_round']:.3f} | {p['probe_refined_every_worker_steps_minutes_100_it_v100']:.1f} |"
                  for p in refined]
    lines += ["", _why_different(d), ""]


def _c10(p):
    c10 = p.get("wave_checkpoints_by_interval", {}).get("10")
    return f"{c10['memory_gb']:.2f} ({c10['minutes_100_it_v100']:.1f})" if c10 else ""


WHY_DIFFERENT = """**Where and why the model differs from the paper.** (1) *Halos.* With whole-window
halos (N/2 = 512 px) a 48 px tile core at 4158 tiles has a ~1070 px extended region and ~1000 px
strips; the rows with the paper's 60 px probe-support halos (`halo="probe"`, section "Probe-support
halos") hold and send far less. (2) *The one scheduler.* As a tile graph, gd's {gd_tasks} tasks per
iteration at 4158 tiles take {gd_sched:.0f} min per 100 iterations on the scheduler alone
({per_task_ms:.2f} ms per task, calibrated here), over 10x the paper's 2.2 min. With peer exchange
(the default) the scheduler sees {peer_tasks:.0f} tasks per iteration at 4158 workers, one per
GPU as dask-cuda starts them ({peer_sched:.1f} min per 100 iterations, hidden behind the compute;
with one worker per node, 693 six-GPU workers, it would be {node_tasks:.0f}); the client makes each
later block by rebinding the first block of its shape ({client_us:.1f} us per tile and iteration,
measured by the many-tile benchmark with a tile per worker: {peer_client:.2f} min per 100 iterations,
a floor far below the compute), and builds and fuses the first block of each shape once, before
anything runs ({first_ms:.2f} ms per tile and iteration: {peer_first:.1f} min per run, for a block of
{block} iterations and the last, shorter one); the strips, now messages worker to worker (each pair of
neighbours swapping its strips at once, along the columns then the rows), cost
{peer_comm:.1f} min: predicted {peer_total:.1f} min against the paper's 2.2 min. (3) *Memory* per worker, the peer rows: with
every slice's incident wave kept (`daskptycho.reconstruct.wave_checkpoints` 1, what `auto` picks on a
16 GB V100, where it fits) it falls {mem_ratio:.1f}x from 6 to 4158 workers (the paper: 51x), to
{mem_c1:.2f} GB, whose floor is one position's adjoint working set ({working_c1:.2f} GB at S = 100,
N = 1024). Recomputing the waves from every c-th slice (`wave_checkpoints` c, section "Wave
checkpoints") lowers that floor: with c = 10 memory falls {mem_ratio_c10:.0f}x, to {mem_c10:.2f} GB at 4158
workers (the paper: 0.18 GB), for {factor_c10:.2f}x the FFTs, and 4158 workers then take {minutes_c10:.2f} min
per 100 iterations (the communication, not the compute, bounds them there). The largest extended
region at 4158 is {ext_px:,} px. (4) *Super-linear scaling.* The paper's 6-GPU
runtimes (360 and 5543 min) are 2-5x above a linear model because a GPU holding 1/6 of the problem
runs out of cache and memory bandwidth headroom (the paper's own explanation for efficiencies of
336-518%); the model is linear in positions per tile. (5) *The GPU per-position cost* is an
assumption (FFT-bound at HBM bandwidth, at the efficiency measured here on a CPU), not a measurement:
the GPU script (section 5) exists to replace it. (6) *hve*: daskptycho's baseline gives a tile every
position whose window reaches into its core (so that its full-batch core update is exact), the paper
its two extra rows of positions; with 1024 px windows that is most of the scan for every tile, so
the model's hve compute hardly falls with more workers, and its one task per (core, halo) pair makes
it scheduler-bound from {hve_bound} workers. The paper's 'NA' beyond 54 GPUs (small set) is its
tile-size constraint. (7) *Validation here*: measured / predicted is {vmin:.2f}-{vmax:.2f} over the rows
measured here; the model has no term for the scheduler and client sharing the 2 cores with the
workers (compute per iteration rises by {inflation:.0%} from 1 to 2 workers of gd 4 tiles)."""


def _why_different(d):
    ratios = [v["ratio_measured_over_predicted"] for v in d["validation"]] or [float("nan")]
    eng = _load("engines") or {"rows": []}
    rows = {r["label"]: r for r in eng["rows"]}
    try:
        inflation = rows["gd 4 tiles"]["task_stream"]["per_iteration"]["compute_s"] / \
            rows["gd 4 tiles on 1 worker"]["task_stream"]["per_iteration"]["compute_s"] - 1
    except (KeyError, ZeroDivisionError, TypeError):
        inflation = float("nan")
    preds = [p for p in d["predictions"] if "tasks_per_iteration" in p]

    def pick(dataset, engine, workers, schedule, probe):
        for p in preds:
            if (p["dataset"], p["engine"], p["workers"], p.get("schedule", "tile graph")) == (dataset, engine, workers, schedule) \
                    and p.get("halos", "").startswith("probe") == probe:
                return p
        return {}

    def by_c(row, c, field):
        return row.get("wave_checkpoints_by_interval", {}).get(c, {}).get(field, nan)

    graph = pick("large", "gd", 4158, "tile graph", True)
    peer = pick("large", "gd", 4158, "peer", True)
    peer6 = pick("large", "gd", 6, "peer", True)
    nan = float("nan")
    bound = sorted({p["workers"] for p in preds if p["engine"] == "hve"
                    and p["predicted_scheduler_minutes"] >= p["predicted_compute_minutes"] + p["predicted_comm_minutes"]})
    return WHY_DIFFERENT.format(vmin=min(ratios), vmax=max(ratios), inflation=inflation,
                                hve_bound=f"{bound[0]}" if bound else "(none of the counts modelled)",
                                per_task_ms=d.get("scheduler_per_task_s", d.get("hop", {}).get("per_task_s", nan)) * 1e3,
                                gd_tasks=graph.get("tasks_per_iteration", "n/a"), gd_sched=graph.get("predicted_scheduler_minutes", nan),
                                peer_tasks=peer.get("tasks_per_iteration", nan), peer_sched=peer.get("predicted_scheduler_minutes", nan),
                                node_tasks=2 * 693 / d.get("block_iterations", 8) + 1,
                                client_us=d.get("client_s_per_tile_iteration", nan) * 1e6,
                                peer_client=peer.get("predicted_client_minutes", nan),
                                first_ms=d.get("client_first_block_s_per_tile_iteration", nan) * 1e3,
                                peer_first=peer.get("predicted_first_blocks_minutes", nan), block=d.get("block_iterations", 8),
                                peer_comm=peer.get("predicted_comm_minutes", nan), peer_total=peer.get("predicted_minutes_100_it_v100", nan),
                                mem_ratio=peer6.get("predicted_memory_gb", nan) / peer.get("predicted_memory_gb", nan) if peer else nan,
                                mem_c1=peer.get("predicted_memory_gb", nan), working_c1=by_c(peer, "1", "working_set_gb"),
                                mem_c10=by_c(peer, "10", "memory_gb"), factor_c10=by_c(peer, "10", "compute_factor"),
                                mem_ratio_c10=by_c(peer6, "10", "memory_gb") / by_c(peer, "10", "memory_gb"),
                                minutes_c10=by_c(peer, "10", "minutes_100_it_v100"), ext_px=peer.get("extended_px_max", 0))


GPU_READY = """What is ready:

- **The device hot path** (`daskptycho/physics/cuda.py`): custom CUDA kernels through
  CuPy's `RawModule` (NVRTC; the source compiles for `compute_90`, checked without a GPU by
  `scripts/check_cuda_source.py`), each one pass over a batch of waves that reads the object windows in
  place: `window_multiply` (the transmission through a slice), `cost_gradient` (the
  amplitude or Poisson cost map and `2 dL/dPsi*` written over the far field, patterns read
  by row from the device-resident array), `adjoint_slice` (object gradient and
  illumination added with float-pair atomics, since CUDA has no complex atomics; the wave
  gradient multiplied by `conj(O)` in the same pass), `window_abs2_sum` (the probe's
  preconditioner), `scatter_windows`/`gather_windows` (any float or complex target,
  float64 included), and for the difference map `dm_views_in`, `dm_fourier` (eq. 4 and the
  Fourier error), `dm_views_out` (eq. 3 and the eq. 6 sums in one pass) and `dm_probe_sums`
  (eq. 5). FFTs run in place through cuFFT's cached plans (`cupyx.scipy.fft`,
  unnormalised, the scale folded into the kernels). Launches take as many positions as
  `daskptycho.gpu.memory_fraction` (default 0.5) of the free device memory holds: the whole
  2304-position case of the issue in one launch. The state stays on the device between
  iterations; the only synchronisation inside an iteration is the scalar cost at its end;
  results reach the client only through explicit host-copy tasks.
- **Each kernel has a NumPy reference** (the same function on NumPy arrays), and the
  orchestration around them (`cuda.gradients`, the dm part step) runs on the CPU against
  the CPU model in `tests/test_cuda_kernels.py` (float32 rounding, both costs, 1 and 3
  slices, 1 and 2 modes; the adjoint identity of the window multiply). The `gpu`-marked
  tests compare every kernel with its reference and every engine (ml full and minibatch,
  gd batch and local updates, hve, dm with modes), checkpoint/resume, a lost GPU worker
  and `cluster="cuda"` with the CPU result (`tests/test_gpu_engines.py`).
- **The run** (`bash benchmarks/gpu.sh`, wheels in `.whl/`, see its header): the `gpu`
  tests, then `python -m benchmarks gpu` (cuFFT floor; ml on the issue's 2304-position,
  128 px, 8-slice case in process and on a one-worker cluster against that floor; gd 2x2
  on 4 and 1 workers and hve 2x2 against ml; dm at the second paper's scale, 10,000
  positions of 192 px with 4 probe modes, 50 iterations; a 2 and a 32 MiB strip moved
  between two GPU workers over TCP and UCX), then Pty-Chi on the same GPU and data
  (`benchmarks/peers/ptychi_vs_daskptycho.py --device gpu`).

What the design expects (arithmetic, not measurement): one ml iteration of the issue's case
is 2304 x 30 FFTs of 128^2 (0.18 us each measured by the issue's author: 12 ms) plus about
three read-write passes over the waves per slice and direction (2304 x 128^2 complex64 =
0.3 GB per pass, ~0.15 ms at 4 TB/s: ~7 ms), so 20-30 ms if the atomics of the adjoint
(113 M float atomics per slice, onto 60 k object pixels: ~2,800 windows overlap each pixel
at a 2.4 px step) do not dominate. Whether they do is the first thing the GPU run will show."""


def section_many_tiles(d, lines):
    """The many-tile measurement (benchmarks/many_tiles.py): tile graph against fused."""
    rows = d["rows"]
    first = rows[0]
    lines += ["### The scheduler's share, measured, and fused iterations (issue 16)", "",
              f"`{d['command']}` (`benchmarks/results/many_tiles.json`, {d['machine']['date']}): gd on many tiles of a "
              f"{d['scan']} x {d['scan']}-position, 16 px X-ray scan over {first['workers']} workers, where compute per tile is "
              "negligible, so an iteration takes what the scheduler and the client need (steady-state medians). "
              + ("Every run takes the update rule the scaling model predicts the papers' runs with: full batch (one "
                 "pass round per iteration), the probe held fixed (the library's default of 4 minibatch rounds makes 4x "
                 "the tasks)." if d.get("update") else "") + "", "",
              "| tiles | schedule | tasks per iteration | s per iteration | s per task | model with trivial tasks / measured |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        per = f"{r['seconds_per_task'] * 1e3:.2f} ms" if r["schedule"] == "tile graph" else ""
        ratio = f"{r['model_over_measured']:.2f}" if r.get("model_over_measured") else ""
        lines.append(f"| {r['tiles']:,} | {r['schedule']} | {r['tasks_per_iteration']:,.1f} | {r['iteration_s']:.2f} | {per} | {ratio} |")
    lines += ["", "The fused iteration (`daskptycho.schedule.fuse`, `schedule/fuse.py`) is one task per worker and stage "
              "plus one per message between workers: a few tasks however many tiles (`tests/test_fuse.py` checks that "
              "the count grows with workers, not tiles), bit for bit the tile graph's result. What is left of its time is "
              "the client building and fusing the whole tile graph every iteration and the workers running their tiny "
              "tile tasks in turn. With peer exchange (the default) the strips between the two workers go worker to "
              "worker and a block of iterations is one stage per worker. The client builds and fuses a block's graph "
              "once per shape and sends the stages' bodies to their workers once; every later block is that graph "
              "rebound to its inputs (`schedule.fuse.rebind`).", ""]
    peer_rows = [r for r in rows if r["schedule"] == "peer exchange" and "client_block_s_per_tile_iteration" in r]
    if peer_rows:
        lines += ["The client's seconds per tile and iteration (graph builders, fuse, rebind and serialisation in the "
                  "client process, no cluster; median of 3):", "",
                  "| tiles | layout | first block of a shape (build, fuse) | every later block (rebind) |", "|---|---|---|---|"]
        for r in peer_rows:
            for layout, suffix in (("2 workers", ""), ("a tile per worker", "_one_tile_per_worker")):
                lines.append(f"| {r['tiles']:,} | {layout} | {r['client_first_block_s_per_tile_iteration' + suffix] * 1e3:.3f} ms | "
                             f"{r['client_block_s_per_tile_iteration' + suffix] * 1e3:.4f} ms |")
        lines += [""]
    cal = d.get("calibration")
    lines += [f"Independent trivial tasks take {d['hop']['per_task_s'] * 1e3:.2f} ms each here; a real iteration graph's "
              "tasks carry dependencies and data, and cost more."]
    if cal:
        checks = "; ".join(f"{c['tiles']:,} tiles: predicted {c['predicted_s']:.2f} s, measured {c['measured_s']:.2f} s "
                           f"({c['predicted_over_measured']:.2f})" for c in cal["checks"])
        lines += [f" The scheduler term is therefore calibrated on the {cal['from_tiles']:,}-tile graph: "
                  f"{cal['per_task_s'] * 1e3:.2f} ms per task, and checked on the other sizes ({checks}). The paper "
                  "predictions of section 4 above use this calibrated figure."]
    lines += [""]


def _row(d, label):
    return next(r for r in d["rows"] if r["label"] == label)


def section_stage_timeline(d, lines):
    """Where the default run's time goes inside its peer blocks (benchmarks/stage_timeline.py)."""
    sm = d["summary"]
    kinds = [k for k in ("minibatch", "full batch") if k in sm]
    lines += ["### Inside the default run's peer blocks (issue 16)", "",
              f"`{d['command'].strip()}` (`benchmarks/results/stage_timeline.json`, {d['machine']['date']}; {_load_line(d)}): "
              f"the default run's case with each worker recording its peer stages' timeline "
              "(`daskptycho.tasks.peer.record_timeline`), medians over the 2 workers and "
              f"{d['repeats']} runs, ms per worker and iteration, over the default run's minibatch iterations (4 pass rounds "
              "each) and its full-batch ones. A task's wall time beyond its CPU time is time its thread was ready "
              "without a core; *waiting* is the rounds' barriers (a stage waiting for its peer's strips and probe half); "
              "*inside stages* is the stages' own bookkeeping and sending; *between stages* is the scheduler's round trip "
              "from one block to the next.", "",
              "| | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds),
              "| iteration (wall) | " + " | ".join(f"{sm[k]['iteration_ms']:.1f}" for k in kinds) + " |"]
    names = list(dict.fromkeys(n for k in kinds for n in sm[k]["tasks"]))
    for n in names:
        cells = []
        for k in kinds:
            t = sm[k]["tasks"].get(n)
            cells.append(f"{t['wall_ms']:.2f} ({t['cpu_ms']:.2f} CPU, {t['per_iteration']:.1f} calls)" if t else "")
        if any(sm[k]["tasks"].get(n, {}).get("wall_ms", 0) >= 0.05 for k in kinds):
            lines.append(f"| task `{n}` | " + " | ".join(cells) + " |")
    for q, label in (("tasks_wall_ms", "all tasks (wall)"), ("tasks_cpu_ms", "all tasks (CPU)"), ("waiting_ms", "waiting"),
                     ("inside_stages_ms", "inside stages, besides tasks and waits"), ("between_stages_ms", "between stages")):
        lines.append(f"| {label} | " + " | ".join(f"{sm[k][q]:.2f}" for k in kinds) + " |")
    for k in kinds:
        m = sm[k]
        if m.get("latency_ms"):
            lines.append("")
            lines.append(f"Messages, {k}: {m['messages_per_worker_iteration']:.1f} per worker and iteration of "
                         f"{m['message_bytes']['median'] / 1e3:.0f} kB (median); the sending thread's time "
                         f"{m['send_ms']['median']:.2f} ms (p90 {m['send_ms']['p90']:.2f}); from the start of the send to the "
                         f"message in the receiver's mailbox {m['latency_ms']['median']:.2f} ms (p90 {m['latency_ms']['p90']:.2f}).")
    lines.append("")


def section_cluster_settings(d, lines):
    """The run's settings, each against distributed's own or the earlier default (benchmarks/cluster_settings.py)."""
    lines += ["### What the embedded cluster's and the schedule's settings are worth (issue 16)", "",
              f"`{d['command'].strip()}` (`benchmarks/results/cluster_settings.json`, {d['machine']['date']}; {_load_line(d)}): "
              "the default run's case on a fresh 2-worker `local_cluster` per run, with the library's settings and with one "
              "of them changed back to distributed's behaviour (or, for the blocks, to the earlier default), "
              f"{d['blocks']} blocks of four runs in ABBA order per comparison; "
              "time per iteration over the run after its first block, medians, and the pairs (a block's outer runs against "
              "its inner ones) in which the defaults were faster.", "",
              "| changed back | defaults ms/it | changed ms/it | defaults faster by | pairs the defaults won |", "|---|---|---|---|---|"]
    for r in d["rows"]:
        change = ", ".join(f"`{k}: {v}`" for k, v in r["change"].items())
        lines.append(f"| {r['label']} ({change}) | {r['defaults_s_per_iteration'] * 1e3:.1f} | {r['changed_s_per_iteration'] * 1e3:.1f} | "
                     f"{(r['speedup'] - 1) * 100:.1f}% | {r['defaults_faster_pairs']} of {r['pairs']} |")
    lines.append("")


def section_default_run(d, lines):
    """The default run against ml on one worker (benchmarks/default_run.py)."""
    t = d["targets"]
    sp = d["spans"]
    lines += ["### The default run against the single-task reference (issue 16)", "",
              f"`{d['command'].strip()}` (`benchmarks/results/default_run.json`, {d['machine']['date']}; {_load_line(d)}): "
              f"{d['dataset']}; `daskptycho.reconstruct` with its defaults ({d['iterations']} iterations, the first "
              f"{d['minibatch_iterations']} in minibatches, probe refined; gd 2x2 on 2 workers, peer exchange in blocks of "
              f"{d['block_iterations']} iterations) against `ml` on a 1-worker cluster, the same gd with "
              "`daskptycho.schedule.exchange: scheduler` (every strip a task), and both engines in full batch with the probe "
              f"fixed; back to back, {d['repeats']} rounds" + (", each case on a fresh cluster, every other round in reverse order"
              if d.get("cluster_per_case") else "") + ". A peer block's costs reach the client together, so every span "
              f"runs from the end of a block to the end of another: the run after its first block (iterations "
              f"{sp['run'][0] + 1}-{sp['run'][1]}), its minibatch iterations ({sp['minibatch'][0] + 1}-{sp['minibatch'][1]}) and "
              f"full-batch ones ({sp['full batch'][0] + 1}-{sp['full batch'][1]}). FFT floor: {d['ffts_per_iteration']:,} FFTs "
              f"per iteration x {d['us_per_fft_96_one_thread']:.1f} us (96^2, one thread" +
              (f"; the machine's fast speed: {len(d['us_per_fft_runs'])} measurements, one before and one after each run, "
               f"{min(d['us_per_fft_runs']):.1f}-{max(d['us_per_fft_runs']):.1f} us, "
               f"{sum(x > 1.1 * min(d['us_per_fft_runs']) for x in d['us_per_fft_runs'])} of them in its slow state (over 10% "
               "slower than the fastest)" if "us_per_fft_runs" in d else "") + ") / 2 cores = "
              f"{d['rows'][0]['floor_2_threads_s'] * 1e3:.1f} ms.", "",
              "| run | ms per iteration, whole run (rounds) | minibatch iterations | full-batch iterations | floor fraction (run) "
              "| CPU ms per iteration (run) | CPU bound on the floor fraction | final cost |",
              "|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        def cell(k, r=r):  # the minibatch and full-batch spans only split a run at the defaults
            split = k == "run" or r["options"].get("batch_size", "auto") is not None
            return f"{r[k]['s_per_iteration'] * 1e3:.1f}" if k in r and split else ""
        lines.append(f"| {r['label']} | {cell('run')} ({', '.join(f'{x * 1e3:.1f}' for x in r['run']['runs'])}) | "
                     f"{cell('minibatch')} | {cell('full batch')} | {r['run']['floor_fraction']:.2f} | "
                     f"{r['cpu_s_per_iteration'] * 1e3:.1f} | {_f(r.get('cpu_bound_floor_fraction'))} | {r['final_cost']:.4g} |")
    sp, ff = t["default_speedup_over_ml"], t["default_floor_fraction"]
    lines += ["", f"The default run over ml: **{sp['value']:.2f}x** (per round {', '.join(f'{x:.2f}' for x in sp['per_round'])}; "
              f"target {sp['target']}: {'met' if sp['met'] else 'NOT met'}); in its minibatch iterations "
              f"{t['minibatch_speedup_over_ml']['value']:.2f}x, in its full-batch ones {t['full_batch_speedup_over_ml']['value']:.2f}x. "
              f"Floor fraction of the whole run **{ff['value']:.2f}** (" + (f"per round {', '.join(f'{x:.2f}' for x in ff['per_round'])}; "
              if ff.get("per_round") else "") + f"target {ff['target']}: {'met' if ff['met'] else 'NOT met'})" +
              (f"; over the {sum(ff['steady_rounds'])} rounds whose default run had the machine at its fast speed before and "
               f"after, **{ff['steady_value']:.2f}**" if ff.get("steady_value") is not None else
               ("; no round's default run had the machine at its fast speed before and after" if "steady_rounds" in ff else "")) + ". "
              f"With every strip a task: {t['scheduler_exchange_speedup_over_ml']['value']:.2f}x. With the peer messages over the "
              f"workers' comms instead of their Unix sockets: {t['comms_speedup_over_ml']['value']:.2f}x (the sockets are "
              f"{t['sockets_over_comms']['value']:.2f}x faster, per round "
              f"{', '.join(f'{x:.2f}' for x in t['sockets_over_comms']['per_round'])}). In full batch with the probe "
              f"fixed gd is {t['full_batch_pair_speedup']['value']:.2f}x ml, and its object differs from ml's by at most "
              f"{d['full_batch_relative_difference_to_ml']['max']:.1e} (relative, over the field the tiles hold)."
              + (f" With the live dashboard page publishing (`daskptycho.dashboard.live`, on by default; the other rows run "
                 f"without it) the default run is {t['live_page_speedup']['value']:.2f}x its speed without (per round "
                 f"{', '.join(f'{x:.2f}' for x in t['live_page_speedup']['per_round'])}), floor fraction "
                 f"{_row(d, 'gd 2x2, live page on')['run']['floor_fraction']:.2f}." if "live_page_speedup" in t else ""), "",
              "A minibatch iteration is 4 pass rounds, and every round ends in a barrier: each tile's next gradient needs "
              "its neighbours' strips (here swapped at once, one message each way) and the probe stepped from every tile's "
              "part (each worker steps its own copy from the two halves of the sum). A stage sends its round's values for the "
              "peer as soon as no further value for that peer is one quick task away, before its own strips, probe step and "
              "tile updates (`daskptycho.tasks.peer`; measured ABBA on fresh clusters, iterations 16-49: 23.7 against 24.2 ms "
              "per iteration with the peer's message waiting behind those, faster in 4 of 6 blocks). "
              "Between workers of one machine those messages "
              "go over the receivers' Unix sockets, written by the sending stage's own thread and read by a thread of the "
              "receiver (`daskptycho.schedule.same_host_sockets`): over the workers' comms instead, each message waits for the "
              "sender's and then the receiver's event loop to get a core, while the two stages fill both, and costs both "
              f"event loops CPU (the run's CPU per iteration: {_row(d, 'gd 2x2 (default)')['cpu_s_per_iteration'] * 1e3:.1f} ms "
              f"over sockets, {_row(d, 'gd 2x2, messages over comms')['cpu_s_per_iteration'] * 1e3:.1f} ms over comms; per "
              "message below, \"What one peer message costs\"). gd's final cost is above ml's because of the probe-support "
              "halos (window pixels beyond a tile's halo held fixed; the whole-window row ends near ml's), while its phase "
              f"differs from the whole-window run's by at most {d['default_phase_difference_to_whole_windows']['max']:.2%} "
              "over the field the tiles hold.", ""]
    lines += _cpu_budget(d)


def _idle(row):
    """The share of the 2 cores' time a run left idle: 1 - CPU per iteration / (2 x its wall time)."""
    return 1 - row["cpu_s_per_iteration"] / (2 * row["run"]["s_per_iteration"])


def _cpu_budget(d):
    """Where a run's CPU goes on the 2 cores, and the bound it sets on the floor fraction."""
    rows = [r for r in d["rows"] if "cpu_by_role" in r and r["workers"] > 1]
    if not rows:
        return []
    out = ["\"CPU bound\" is the floor over half the CPU per iteration: the most of the floor a run could reach on these "
           "2 cores at that CPU cost if no core ever waited. By role, ms per iteration over the run (the workers summed):", "",
           "| run | workers' task threads | workers' event loops | peer reader threads | scheduler and client | bound "
           "| cores idle (1 - CPU / (2 x wall)) |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["cpu_by_role"]
        out.append(f"| {r['label']} | {c['worker_tasks'] * 1e3:.1f} | {c['worker_event_loops'] * 1e3:.1f} | "
                   f"{c['worker_peer_readers'] * 1e3:.1f} | {c['scheduler_and_client'] * 1e3:.1f} | {r['cpu_bound_floor_fraction']:.2f} "
                   f"| {_idle(r):.0%} |")
    default, full = _row(d, "gd 2x2 (default)"), _row(d, "gd 2x2, full batch")
    if default and full and "cpu_bound_floor_fraction" in default:
        out += ["", f"The default run's CPU alone bounds its floor fraction at {default['cpu_bound_floor_fraction']:.2f}: "
                "its workers' task threads run the position kernel (FFTs and the passes over each window, "
                "`physics/_compiled.py`) and, 4 times an iteration, each round's steps, strips and probe, while the "
                "scheduler, the client and the workers' event loops share the same 2 cores. 0.5 needs the CPU per iteration "
                f"at or below {4 * default['floor_2_threads_s'] * 1e3:.1f} ms and no core ever idle at the rounds' barriers; "
                f"the cores were idle {_idle(default):.0%} of the run, against {_idle(full):.0%} in full batch with the "
                "probe fixed (one barrier per iteration instead of 4): a stage at a barrier waits for the other worker's "
                "message (the round's strips and probe half).", ""]
    return out


def section_peer_messages(d, lines):
    """What one peer message costs (benchmarks/peer_messages.py)."""
    lines += ["### What one peer message costs", "",
              f"`{d['command'].strip()}` (`benchmarks/results/peer_messages.json`, {d['machine']['date']}; {_load_line(d)}): "
              f"{d['messages']} messages from one worker to another's mailbox, back to back: from A's event loop as a request "
              "awaiting its reply, and one way over a comm kept open (`reply=False`, how `PeerExchange.send` sends to a "
              "worker on another machine); and from a task's thread on A straight to B's Unix socket, read into B's mailbox "
              "by B's reader thread (`same-host socket`, how it sends to a worker on the same machine: wall time from A's "
              f"first write until B holds the last message). Per message, medians of {d['repeats']} runs; the CPU time is "
              "each worker process's, what its stage loses when the stages fill the cores.", "",
              "| payload | way | wall ms | sender CPU ms | receiver CPU ms |", "|---|---|---|---|---|"]
    for r in d["rows"]:
        lines.append(f"| {r['payload']} ({r['payload_bytes']:,} bytes) | {r['way']} | {r['wall_ms']:.3f} | "
                     f"{r['sender_cpu_ms']:.3f} | {r['receiver_cpu_ms']:.3f} |")
    lines += [""]


def section_halos(d, lines):
    """Probe-support halos against whole windows (benchmarks/halos.py)."""
    lines += ["### Probe-support halos (issue 16)", "",
              "gd's tiles need not hold every window whole. `halo=\"probe\"` (the default) sizes each tile's halo by the "
              "probe's support: per axis, the half-width about the window's centre that holds `halo_fraction` (default "
              "0.999) of `sum_k |P_k|^2` (`physics.probe.support_half_widths`), widened in multislice by the farthest a "
              "wave moves sideways through the slab, `(S - 1) dz lambda / (2 dx^2)` pixels (the grid's largest angle), "
              "and never wider than the windows need. Window pixels beyond a tile's extended region are held fixed at "
              "the tile's edge values and their gradient is dropped, as the paper's tiles do; `halo=\"window\"` keeps "
              "every window whole, so batch-mode gd stays exactly full-batch gradient descent (= ml, as the tests "
              f"check). `{d['command']}` (gd 2x2, {d['iterations']} iterations; phase difference over the scanned field "
              "from the whole-window run; `benchmarks/results/halos.json`):", "",
              "| case | halo | fraction | halo px | largest tile px | tile bytes | phase rel. diff. | final cost |",
              "|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        frac = "" if r["halo_fraction"] is None else f"{r['halo_fraction']:g}"
        lines.append(f"| {r['case']} ({r['slices']} slice{'s' if r['slices'] > 1 else ''}, {r['window_px']} px) | {r['halo']} | "
                     f"{frac} | {r['halo_px'][0]} | {r['largest_extended_px']} | {r['tile_object_bytes_max']:,} | "
                     f"{r['phase_rel_diff_vs_window']:.4f} | {r['final_cost']:,.0f} |")
    lines += ["", "Both probes here come from a sharp aperture, whose intensity falls off slowly (Airy rings), so 99.9% "
              "of it reaches the window's edge and the default halo is the whole window (no saving, no error); holding "
              "only 99% costs a few percent of phase error, 90% is not usable. The saving the scaling model needs (the "
              "paper's 60 px halos against 512 px windows) depends on a probe whose support is much smaller than its "
              "window; it has not been measured here on such a case.", ""]


def section_wave_memory(d, lines):
    """Wave checkpoints in the adjoint: memory against time on a thick sample (benchmarks/wave_memory.py)."""
    c = d["case"]
    lines += ["### Wave checkpoints in the adjoint: memory against time", "",
              "The adjoint needs every slice's incident wave. With `daskptycho.reconstruct.wave_checkpoints` c > 1 the "
              "forward pass keeps them only at slices 0, c, 2c, ... (and the last segment's), and the backward pass "
              "recomputes each earlier segment from its checkpoint just before going back through it: about "
              "ceil(S/c) + c waves per position instead of S, for (ceil(S/c) - 1)(c - 1) repeated propagations "
              "(2 FFTs per mode each), the same bits. `auto` (the default) keeps every wave when one position's working "
              "set fits the gradient call's budget (`working_set_mib`/`working_set_fraction` on a CPU, "
              "`gpu.memory_fraction` of the free device memory on a GPU), else the least c that fits. "
              f"`{d['command'].strip()}` (`benchmarks/results/wave_memory.json`, {d['machine']['date']}; {_load_line(d)}): "
              f"{c['slices']} slices, {c['detector']} px windows, {c['modes']} probe mode(s), {c['positions']} positions; one "
              f"gradient call: the compiled per-position model on all positions, the NumPy path on {c['numpy_chunk']} "
              f"(median of {c['repeats']} warm calls; traced peak: `tracemalloc`, the accumulators made before the call).", "",
              "| path | c | s per call | time vs c = 1 | traced peak MiB | peak vs c = 1 | scratch MiB | FFTs (model) | FFTs vs c = 1 |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        scratch = "" if r["scratch_bytes"] is None else f"{r['scratch_bytes'] / 2**20:.2f}"
        name = "per-position (Numba)" if r["path"] == "positions" else f"NumPy ({r['positions_per_call']} positions)"
        lines.append(f"| {name} | {r['interval']} | {r['s_per_call']:.3f} | {r['time_relative_to_keep_all']:.2f} | "
                     f"{r['traced_peak_bytes'] / 2**20:.1f} | {r['peak_relative_to_keep_all']:.2f} | {scratch} | "
                     f"{r['ffts']:,} ({r['model_ffts']:,}) | {r['ffts_relative_to_keep_all']:.2f} |")
    lines += ["", "The per-position model's time follows its FFT count. The NumPy path's hardly moves: the elementwise "
              "passes over a chunk's waves, not the FFTs, take most of its time (section 1), and the repeated "
              "propagations add FFTs only. One run each; read the load average.", ""]


def section_follow(d, lines):
    """Reconstructing while the scan is measured (benchmarks/follow.py)."""
    rows = d["rows"]
    first = rows[0]
    lines += ["## Reconstructing while the scan is measured (issue 18)", "",
              f"`{d['command'].strip()}` (`benchmarks/results/follow.json`, {d['machine']['date']}; {_load_line(d)}): a simulated "
              f"X-ray scan of {first['frames']} frames (32 px) written as a growing store in chunks of {first['chunk_frames']} at each "
              "rate, by a thread of the benchmark's process, while `daskptycho.follow` (defaults: gd 2x2 on 2 workers) reconstructs "
              "it in rounds of 2 iterations, then 20 after the scan. A frame's delay runs from its commit (the writer's callback) "
              "to the start of the first round that uses it; its iterations are those that ran meanwhile. The offline run is the "
              "same 20 iterations on the finished store.", "",
              "| frames/s | acquisition s | first round after the first commit, s | rounds during the scan | frames in use before the scan ended | "
              "delay s (median, max; steady state: 95th percentile, max) | delay iterations (median, max) | keeps up | phase correlation: follow / offline |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['rate_hz']:g} | {r['acquisition_s']:.1f} | {r['first_round_after_first_commit_s']:.2f} | {r['rounds_during_scan']} | "
                     f"{r['frames_used_before_the_end']} of {r['frames']} | {r['delay_s_median']:.2f}, {r['delay_s_max']:.2f}; "
                     f"{r['delay_s_p95_steady']:.2f}, {r['delay_s_max_steady']:.2f} | "
                     f"{r['delay_iterations_median']:.0f}, {r['delay_iterations_max']} | {'yes' if r['keeps_up'] else 'no'} | "
                     f"{r['phase_correlation_follow']:.3f} / {r['phase_correlation_offline']:.3f} |")
    kept = d.get("highest_rate_kept_up_hz")
    lines += ["", f"Highest rate up to which every rate measured kept up here: **{kept:g} frames/s** (after the first round, 95% of the frames in use within two rounds "
              "of their commit, and at least 75% of the scan in the live image before the scan ended). The first round waits until "
              "the frames reach every tile (a raster's first rows do not)." if kept else
              "No rate measured was kept up.", ""]


def section_positions(d, lines):
    """Scan-position correction in ml and gd (benchmarks/positions.py)."""
    lines += ["## Scan-position correction (issue 17)", "",
              f"`{d['command'].strip()}` (`benchmarks/results/positions.json`, {d['machine']['date']}; {_load_line(d)}): "
              f"{d['dataset']}; ml full batch, {d['iterations']} iterations, in one process, without and with "
              "`position_correction` (docs/position-correction.md). Position error: rms over both coordinates, the common shift "
              "removed (it is free); object error: mean `error_map` against the truth and phase correlation, at the best "
              "whole-pixel registration. One row per error draw (seed).", "",
              "| rms error (px) | seed | max shift (px) | before (px) | after (px) | recovered | object error off / on | "
              "phase r off / on | s off / on |", "|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        off = r["off"]
        for key in sorted(k for k in r if k.startswith("on_max_shift_")):
            on = r[key]
            lines.append(f"| {r['rms_px']:g} | {r['seed']} | {key.rsplit('_', 1)[1]} | {r['rms_before_px']:.3f} | "
                         f"{on['rms_after_px']:.3f} | {on['recovered']:.0%} | {off['object_error']:.4f} / {on['object_error']:.4f} | "
                         f"{off['phase_pearson_r']:.4f} / {on['phase_pearson_r']:.4f} | {off['seconds']:.2f} / {on['seconds']:.2f} |")
    lines += ["", "The design's ablation at 1 px rms (the same draws): recovered share per seed.", "",
              "| variant | recovered | object error |", "|---|---|---|"]
    variants = []
    for a in d["ablation"]:
        if a["variant"] not in variants:
            variants.append(a["variant"])
    for v in variants:
        rows = [a for a in d["ablation"] if a["variant"] == v]
        recovered = ", ".join(format(a["recovered"], ".0%") for a in rows)
        errors = ", ".join(format(a["object_error"], ".4f") for a in rows)
        lines.append(f"| {v} | {recovered} | {errors} |")
    lines += [""]
    if d.get("gd"):
        ml = {r["seed"]: r["on_max_shift_3"] for r in d["rows"] if r["rms_px"] == 1.0 and "on_max_shift_3" in r}
        lines += ["Engine gd, 2x2 tiles on a 2-worker LocalCluster, each tile refining the positions it owns on its own patch "
                  "(docs/position-correction.md), at 1 px rms (the same draws), max shift 3; ml's recovery on the same draw "
                  "beside it. `narrow probe`: a probe much smaller than its window (`halo_fraction=0.99`: windows reach past "
                  "the tiles). Time: the whole `reconstruct` call, off / on.", "",
                  "| dataset | seed | halo px (on) | before (px) | after (px) | recovered | ml recovered | object error off / on | "
                  "s off / on | scheduler exchange |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in d["gd"]:
            off, on = r["gd_off"], r["gd_on"]
            m = r.get("ml_on") or ml.get(r["seed"])
            same = r.get("scheduler_exchange_bit_identical")
            sched = "" if same is None else f"{'same bits' if same else '**differs**'}, {r['scheduler_exchange_seconds']:.1f} s"
            lines.append(f"| {r['dataset']} | {r['seed']} | {on['halo_px'][0]} | {r['rms_before_px']:.3f} | {on['rms_after_px']:.3f} | "
                         f"{on['recovered']:.0%} | {format(m['recovered'], '.0%') if m else ''} | "
                         f"{off['object_error']:.4f} / {on['object_error']:.4f} | {off['seconds']:.1f} / {on['seconds']:.1f} | {sched} |")
        lines += [""]


def section_dm_drift(d, lines):
    """dm over 100 iterations on noisy fly scans, both view updates (benchmarks/dm_drift.py)."""
    lines += ["## dm on noisy fly scans: error against the truth per iteration (issue 17)", "",
              f"`{d['command'].strip()}` (`benchmarks/results/dm_drift.json`, {d['machine']['date']}; {_load_line(d)}): "
              f"{d['dataset']}, {d['partitions']} parts on {d['workers']} workers. Mean `error_map` against the truth over the "
              "scanned field (after the best constant phase; in brackets after the best complex scale, which the data do not "
              "fix). `raar` is the default view update, `dm` the paper's eq. 3 (docs/difference-map.md).", "",
              "| dataset | view update | probe modes | " + " | ".join(f"it {n}" for n in sorted({r['iterations'] for r in d['rows']})) + " |",
              "|---|---|---|" + "---|" * len({r['iterations'] for r in d['rows']})]
    its = sorted({r["iterations"] for r in d["rows"]})
    for label in dict.fromkeys(r["dataset"] for r in d["rows"]):
        for variant in dict.fromkeys(r["view_update"] for r in d["rows"]):
            for m in sorted({r["probe_modes"] for r in d["rows"]}):
                at = {r["iterations"]: r for r in d["rows"] if r["dataset"] == label and r["view_update"] == variant and r["probe_modes"] == m}
                cells = [f"{at[n]['error_vs_truth']:.4f} ({at[n]['error_after_scale']:.4f})" if n in at else "" for n in its]
                lines.append(f"| {label} | {variant} | {m} | " + " | ".join(cells) + " |")
    verdicts = []
    for s in d["summary"]:
        if "drifts" in s:
            verdicts.append(f"{s['view_update']} {s['probe_modes']} mode{'s' if s['probe_modes'] > 1 else ''} at {s['dataset'].split(' (')[0]}: "
                            f"{'**drifts**' if s['drifts'] else 'no drift'}")
        else:
            verdicts.append(f"{s['view_update']} at {s['dataset'].split(' (')[0]}: 4 modes {'beat' if s['four_modes_beat_one'] else '**do not beat**'} 1")
    lines += ["", "Iteration " + str(its[-1]) + " against 40: " + "; ".join(verdicts) + ".", ""]


def section_defaults(d, lines):
    """The evidence for the default update rule (benchmarks/defaults.py, docs/convergence.md)."""
    lines += ["## The default update rule (issue 17)", "",
              f"`{d['command'].strip()}` (`benchmarks/results/defaults.json`, {d['machine']['date']}). daskptycho's own "
              f"simulations, {d['iterations']} iterations, scored by the independent benchmark's scorer (phase NRMSE of the "
              "projected phase; in brackets the complex error of the projected transmission). The default is 4 equal "
              "minibatches per iteration (gd: pass rounds) for the first 70% of the iterations, then full batch; "
              "docs/convergence.md explains the choice.", "",
              "| case | rule | ml | gd 2x2 |", "|---|---|---|---|"]
    rows = {}
    for r in d["rows"]:
        rows.setdefault((r["case"], r["rule"]), {})[r["engine"]] = r
    for (case, rule), by in rows.items():
        cells = [f"{by[e]['phase_nrmse']:.3f} ({by[e]['complex_error']:.3f})" if e in by else "" for e in ("ml", "gd")]
        lines.append(f"| {case} | {rule} | " + " | ".join(cells) + " |")
    lines.append("")


def section_independent(d, lines):
    """The independent quality benchmark (benchmarks/independent.py, docs/quality.md)."""
    lines += ["## Quality on independent data (issue 17)", "",
              f"`python -m benchmarks independent` (`benchmarks/results/independent.json`; the last invocation `{d['command'].strip()}` "
              f"on {d['machine']['date']}, {_load_line(d)}; a run of some `--cases` keeps the other cases' rows from the runs before). "
              "Data daskptycho did not simulate: `thin` and `thick` PbTiO3 4D-STEM made by abTEM (1 and 20 reconstruction "
              "slices), `flyscan` an X-ray fly scan with 4 incoherent probe modes and motion blur written by the benchmark "
              "itself; the method, sizes and doses are in docs/quality.md. Error: phase NRMSE of the projected phase over the "
              "scanned field after the best whole-pixel registration and the best global phase offset (0 = perfect, 1 = no "
              "better than a flat phase); in brackets the complex (phase-wrapped) error of the projected transmission after "
              "the best complex scale. The same scorer for both codes. daskptycho: `reconstruct(store, engine=..., "
              f"iterations=..., slices=...)` and nothing else unless the options say so; Pty-Chi: LSQML, its defaults with "
              f"probe optimisation on, batch {d.get('ptychi_batch_size', 100)}, 1 thread.", ""]
    tree = d.get("daskptycho_tree") or {}
    if tree.get("commit"):
        dirty = tree.get("daskptycho_uncommitted")
        lines += [f"daskptycho from commit `{tree['commit'][:10]}`" + (
            f", **with uncommitted changes** in {', '.join(x.split()[-1] for x in dirty)} (the engines' defaults were being changed "
            "in the same working tree: rerun for the committed state)" if dirty else "") + ".", ""]
    its = sorted({int(n) for r in d["rows"] for n in r.get("errors", {})})
    lines += ["| case | code | engine | options | " + " | ".join(f"it {n}" for n in its) + " | phase r (last) | s (last) |",
              "|---|---|---|---|" + "---|" * len(its) + "---|---|"]
    order = {c: i for i, c in enumerate(("thin", "thick", "flyscan"))}
    for r in sorted(d["rows"], key=lambda r: (order.get(r["case"], 9), r["code"] != "daskptycho")):  # stable within
        opts = ", ".join(f"{k}={v}" for k, v in r.get("options", {}).items()) or "defaults"
        if "failed" in r:
            lines.append(f"| {r['case']} | {r['code']} | {r['engine']} | {opts} | failed: {r['failed'][:150]} |" + " |" * (len(its) + 1))
            continue
        e = r["errors"]
        key = "phase_nrmse_unwrapped" if r["case"] == "thick" else "phase_nrmse"  # see below the table
        cells = [f"{e[str(n)][key]:.3f} ({e[str(n)]['complex_error']:.3f})" if str(n) in e else "" for n in its]
        last = e[max(e, key=int)]
        total = r.get("run_s")
        if total is None and r.get("seconds"):  # Pty-Chi's are cumulative, daskptycho's per stage
            total = max(r["seconds"].values()) if r["code"] != "daskptycho" else sum(r["seconds"].values())
        lines.append(f"| {r['case']} | {r['code']} | {r['engine']} | {opts} | " + " | ".join(cells) +
                     f" | {last['phase_r']:.3f} | {_f(total, '.0f')} |")
    unwrapped = [r for r in d["rows"] if r["case"] == "thick" and "errors" in r]
    if unwrapped:
        lines += ["", "thick: the table gives the phase NRMSE *unwrapped* (the slices' phases summed as they are; the truth's "
                  "slices stay below pi each), because the total projected phase spans many radians and a wrapped difference, "
                  "at most pi, divided by its spread understates the error; the wrapped one, at the last iteration: " + "; ".join(
                      f"{r['code']} {r['engine']}: {r['errors'][max(r['errors'], key=int)]['phase_nrmse']:.3f}"
                      for r in unwrapped) + "."]
    lines += ["", "s: wall seconds of the run to the last iteration count (daskptycho: that `reconstruct` call, loading and the cluster's tasks "
              "included; Pty-Chi: its task's epochs, without starting Python and torch). Data: " + "; ".join(f"{k}: {v['patterns'][0]} patterns of {v['patterns'][1]} px, {v['slices']} slice(s), "
                                               f"{v['mean_counts']:.3g} counts per pattern" for k, v in d["data"].items()) + ".", ""]


def section_gpu(d, lines):
    """The GPU section: benchmarks/gpu.py's figures when a GPU run brought them back."""
    lines += ["## 5. GPU", ""]
    if not d:
        lines += ["**Not yet measured on a GPU.** Every figure of this section waits for a lent GPU machine: the "
                  "session that wrote the GPU path (2026-12-04) was lent an H200, but new loans were paused before its "
                  "first call, so nothing here ran on a GPU.", "", GPU_READY, ""]
        return
    g = d["gpu"]
    lines += [f"`{d['command']}` on **{g['gpu']}** ({g['gpu_memory_gib']} GiB; CUDA runtime {g['cuda_runtime']}, driver "
              f"{g['cuda_driver']}; CuPy {g['cupy']}), {d['machine']['date']}:", "",
              "| case | s / iteration | fraction of the GPU FFT floor | GPU pool bytes |", "|---|---|---|---|"]
    for name, c in d["cases"].items():
        if not isinstance(c, dict) or "iteration_s" not in c:
            continue
        frac = c.get("fraction_of_fft_floor")
        lines.append(f"| {name} | {c['iteration_s']:.4f} | {'' if frac is None else f'{frac:.2f}'} | {c.get('gpu_pool_bytes')} |")
    floor = d["cases"].get("floor")
    if floor:
        lines += ["", f"cuFFT: {floor['us_per_fft']} us per transform; FFTs per ml iteration {floor['ffts_per_ml_iteration']}, "
                  f"floor {floor['ml_floor_s'] * 1e3:.1f} ms."]
    errors = {k: v for k, v in d["cases"].items() if k.endswith("error")}
    if errors:
        lines += ["", "Failed cases: " + "; ".join(f"{k}: {v}" for k, v in errors.items())]
    lines += ["", GPU_READY, ""]


def main(argv=None):
    lines = ["# Performance", "",
             "Generated by `make bench` (`python -m benchmarks report` rebuilds this page from "
             "`benchmarks/results/*.json`; do not edit by hand). Every timing is a median over repeated runs "
             "(engines: of each run's steady-state time per iteration, the first iterations excluded); no timing is "
             "asserted in a test.", "",
             "**Read the load averages.** These figures were taken on a 2-core virtual machine whose speed drifts: "
             "the same isolated 128 x 128 FFT with the same plan measured between 33 and 73 us within one afternoon "
             "(it drifts with the machine otherwise idle too, so it comes from the host; the load averages recorded here "
             "were partly the decaying tail of an earlier benchmark's 16-worker cluster), and the "
             "same `ml` step 2x apart at different moments. Ratios taken close together (the engines table's "
             "floor measured just before each row, gd vs ml, the peer comparison) are more trustworthy than absolute "
             "seconds; rerun `make bench` to see this machine's figures.", "",
             "What the hot path does (issue 6). On the CPU, with the `fast` extra (pyFFTW and Numba), one compiled "
             "loop runs the whole multislice model and its adjoint one position at a time "
             "(`daskptycho/physics/_compiled.py: position_gradients`): the probe times each object slice's window "
             "(read in place), FFTW's new-array execute on out-of-place plans of the position's K modes, each wave "
             "moving between two scratch buffers (made from the same machine-wide wisdom as the backend's plans, so "
             "every process computes the same bits; in the far field the gradient's inverse transform runs as the "
             "conjugate of a forward one, the conjugations inside the cost's and the adjoint's loops, so every transform "
             "runs the forward plan the FFT floor is measured with), the Fresnel "
             "kernel, the cost and its gradient, then back through the slices adding the object gradient and "
             "illumination into the tile's accumulators. A position's waves (128 KiB per mode at 128 px) stay in the "
             "core's cache through all their FFTs, and no (positions x N x N) array exists. Without Numba the NumPy "
             "reference path runs (`daskptycho.kernels: numpy`): batched in-place FFTs through one cached FFTW plan per "
             "shape, direction and thread (`daskptycho.fft.backend`: auto, pyfftw, scipy, numpy; cupy.fft for CuPy "
             "arrays), elementwise NumPy passes between them. Both: complex64; the propagation and far-field pairs "
             "unnormalised with their scale folded into the kernel and the cost; glibc's mmap/trim thresholds raised "
             "once per process, because Dask's nanny starts workers with `MALLOC_TRIM_THRESHOLD_=65536`, which made "
             "every temporary a fresh mapping and gradient calls 2-3x slower in a worker than in a plain process. "
             "The GPU path stays batched and vectorised (CuPy).", ""]
    floor = _load("fft_floor")
    eng = _load("engines")
    peers = _load("peers")
    scaling = _load("scaling")
    if floor:
        section_floor(floor, lines)
    if eng:
        section_engines(eng, floor, lines)
    if peers:
        section_peers(peers, lines)
    else:
        lines += ["## 3. A peer: Pty-Chi", "", "Not run yet: `bash benchmarks/peers/setup.sh && "
                  "benchmarks/peers/.venv/bin/python benchmarks/peers/ptychi_vs_daskptycho.py`.", ""]
    if scaling:
        section_scaling(scaling, lines)
    # the sections of benchmarks that have run, in this order
    for name, section in (("many_tiles", section_many_tiles), ("halos", section_halos), ("default_run", section_default_run), ("stage_timeline", section_stage_timeline), ("cluster_settings", section_cluster_settings), ("peer_messages", section_peer_messages),
                          ("wave_memory", section_wave_memory), ("follow", section_follow), ("positions", section_positions),
                          ("dm_drift", section_dm_drift), ("defaults", section_defaults), ("independent", section_independent)):
        d = _load(name)
        if d:
            section(d, lines)
    section_gpu(_load("gpu"), lines)
    tmp = DOC + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, DOC)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
